"""SiT flow-matching generator on 1-D token sequences (the SoftVQ "SiT-XL/1" recipe): model,
training loss, samplers, generation (noise -> latents -> images through the tokenizer's decoder),
checkpoints and the tokenizer pairing.

Model: DiT/SiT adaLN-Zero transformer (Peebles & Xie, DiT models.py; Ma et al., SiT), patch size 1
on the tokenizer's L tokens of width d: a per-token Linear embedding replaces the patchifier, a
fixed 1-D sin-cos table the 2-D one (Hhhhhhao/continuous_tokenizer `modelling/sit.py`,
`vae_1d=True`); names as the released SiT weights, which load as is.

Flow convention (README, Conventions): x_t = (1 - t) x + t eps, t = 0 data, t = 1 noise, the network
predicts v = eps - x, and raw t in [0, 1] enters the timestep embedding. The flow is integrated from
t = 1 to 0."""
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import (Attention, Mlp, bf16_autocast, check_state_dict, load_state_dict_file,
                   run_blocks, sincos_1d)
from tokenizer import denormalize_latents, load_tokenizer


@dataclass
class SiTConfig:
    num_tokens: int = 32  # L, from the tokenizer
    token_dim: int = 64  # d, from the tokenizer
    width: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    # the label table has one extra row: the null class (= num_classes) for CFG
    num_classes: int = 1000
    class_dropout: float = 0.1  # label-drop probability in training (classifier-free guidance)


# SiT sizes (patch 1 on 1-D tokens), plus a tiny one for the CPU quickstart (why width 96:
# BENCHMARKS.md) and tests.
GENERATOR_PRESETS = {
    "sit-tiny": dict(width=96, depth=4, num_heads=3),
    "sit-s": dict(width=384, depth=12, num_heads=6),
    "sit-b": dict(width=768, depth=12, num_heads=12),
    "sit-l": dict(width=1024, depth=24, num_heads=16),
    "sit-xl": dict(width=1152, depth=28, num_heads=16),
}


def sit_config(name, num_tokens, token_dim, **overrides):
    """SiTConfig of a preset on a tokenizer's (num_tokens, token_dim); `overrides` e.g.
    num_classes=10."""
    if name not in GENERATOR_PRESETS:
        raise ValueError(f"unknown generator preset {name!r}; choose from "
                         f"{sorted(GENERATOR_PRESETS)}")
    sizes = {"num_tokens": num_tokens, "token_dim": token_dim}
    return SiTConfig(**{**GENERATOR_PRESETS[name], **sizes, **overrides})


def modulate(x, shift, scale):  # adaLN: (B, L, D) * (1 + (B, 1, D)) + (B, 1, D)
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (raw, not x1000) -> 256-d frequency features [cos | sin] (GLIDE/DiT order) -> MLP
    -> (B, D)."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):  # (B,) -> (B, D)
        half = self.freq_dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000.0) * k / half)
        # features in float32, then t's dtype (as the released sit.py)
        args = t.float()[:, None] * freqs[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(t.dtype) if t.is_floating_point() else feats)


class LabelEmbedder(nn.Module):
    """Class table with a null row (index num_classes); in training each label becomes null with
    prob p (CFG)."""

    def __init__(self, num_classes, width, dropout):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y):  # (B,) int64 -> (B, D)
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class SiTBlock(nn.Module):
    """adaLN-Zero block (DiT): c regresses shift/scale/gate for both branches; gates start at 0 ->
    identity block."""

    def __init__(self, width, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), gelu_approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):  # x (B, L, D), c (B, D)
        # adaLN-Zero (DiT): shift, scale and gate of the attention and of the MLP
        modulation = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):  # (B, L, D), (B, D) -> (B, L, d)
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class SiT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        cfg = config
        self.x_embedder = nn.Linear(cfg.token_dim, cfg.width)
        # A fixed table, but a Parameter (requires_grad=False): the released state dicts hold it.
        pos_embed = torch.zeros(1, cfg.num_tokens, cfg.width)
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.t_embedder = TimestepEmbedder(cfg.width)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.width, cfg.class_dropout)
        self.blocks = nn.ModuleList(SiTBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.width, cfg.token_dim)
        self.grad_checkpointing = False
        self.reset_parameters()

    def set_grad_checkpointing(self, enabled=True):
        """Activation checkpointing of every SiT block (model.run_blocks); off by default."""
        self.grad_checkpointing = enabled
        return self

    def reset_parameters(self):
        # DiT/SiT init: xavier-uniform Linears with zero bias; N(0, 0.02) label table and
        # timestep-MLP weights; adaLN and output projections zeroed, so every block starts as the
        # identity and the output is exactly 0.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_1d(self.config.num_tokens, self.config.width)[None])
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[1] for b in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # x (B, L, d) noisy tokens, t (B,) in [0, 1], y (B,) labels -> v (B, L, d)
    def forward(self, x, t, y):
        h = self.x_embedder(x) + self.pos_embed  # (B, L, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        h = run_blocks(self.blocks, h, c, checkpointing=self.grad_checkpointing)
        return self.final_layer(h, c)  # (B, L, d)


# Training objective (continuous_tokenizer losses/sit_loss.py: path "linear", prediction "v")

def draw_time(n, time_dist="lognormal", device=None, rng=None):
    """(n,) training times in (0, 1). "lognormal" is EDM's sigma = exp(N(0,1)), t = sigma / (1 +
    sigma), i.e. logit-normal(0, 1) = sigmoid(N(0, 1)) (the SoftVQ default); "uniform" is U(0, 1).
    """
    if time_dist == "lognormal":
        return torch.sigmoid(torch.randn(n, device=device, generator=rng))
    if time_dist == "uniform":
        return torch.rand(n, device=device, generator=rng)
    raise ValueError(f"unknown time distribution {time_dist!r} (lognormal | uniform)")


def flow_matching_loss(model, x, y, time_dist="lognormal", t=None, noise=None):
    """Plain MSE over all elements between v(x_t, t, y) and eps - x. x: (B, L, d) normalised
    latents, y: (B,). t and noise are drawn here unless given (tests pass them to compare with an
    independent computation)."""
    t = draw_time(x.shape[0], time_dist, x.device) if t is None else t
    noise = torch.randn_like(x) if noise is None else noise
    t_ = t.to(x.dtype)[:, None, None]
    x_t = (1 - t_) * x + t_ * noise
    return F.mse_loss(model(x_t, t.to(x.dtype), y).float(), (noise - x).float())


# Integrating the flow (continuous_tokenizer modelling/samplers.py, REPA style) in float64, the
# model in its dtype: "ode" (Euler) N calls, "heun" 2N - 1 (no corrector on the last step), "sde" N
# (N - 1 Euler-Maruyama steps on linspace(1, 0.04, N), then a noise-free 0.04 -> 0). CFG doubles the
# batch only at guidance_low <= t <= guidance_high.

@dataclass
class Sampling:
    """How to integrate: solver, number of steps, classifier-free guidance scale and the t-interval
    it acts in; for the SDE, the path whose score it takes from the velocity (score_from_velocity).
    """
    solver: str = "sde"  # "ode" (Euler) | "heun" | "sde" (Euler-Maruyama)
    steps: int = 250
    cfg_scale: float = 1.0  # s >= 1: v = v_uncond + s (v_cond - v_uncond); 1 = no guidance
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    path_type: str = "linear"  # "linear" (the training path) | "cosine"

    # the messages name sample.py's flags: that is where these numbers come from
    def __post_init__(self):
        if self.solver not in ("ode", "heun", "sde"):
            raise ValueError(f"--sampler {self.solver!r}: choose ode, heun or sde")
        if self.steps < 1:
            raise ValueError(f"--num-sampling-steps {self.steps}: need at least 1 step")
        if not self.cfg_scale >= 1.0:
            raise ValueError(f"--cfg-scale {self.cfg_scale}: the guidance scale must be >= 1 "
                             f"(1 = no guidance)")
        if not self.guidance_low <= self.guidance_high:
            raise ValueError(f"--guidance-low {self.guidance_low} > --guidance-high "
                             f"{self.guidance_high}: the guidance interval is empty")
        if self.path_type not in ("linear", "cosine"):
            raise ValueError(f"--path-type {self.path_type!r}: choose linear or cosine")
        if self.path_type != "linear" and self.solver != "sde":
            raise ValueError(f"--path-type {self.path_type} changes the SDE's score only; the "
                             f"{self.solver} sampler follows the velocity: use --sampler sde")


# The in-training sample grid, as train_sit.py draws it
PREVIEW = Sampling("ode", steps=50, cfg_scale=4.0)
# train.py --eval-every samples with the README's sampler (Euler-Maruyama, CFG 1.75 on t in
# [0, 0.7]) in 50 steps instead of 250: a fifth of the cost, for a curve to follow.
# `sample.py --num-sampling-steps 50 --cfg-scale 1.75 --guidance-high 0.7` draws the same samples.
EVAL_SAMPLING = Sampling("sde", steps=50, cfg_scale=1.75, guidance_low=0.0, guidance_high=0.7)


def score_from_velocity(v, x, t, path_type="linear"):
    """The score of x_t = a(t) x + s(t) eps from the velocity v, as continuous_tokenizer's SDE
    sampler takes it (modelling/samplers.py): (r v - x) / (s^2 - r s' s) with r = a / a', here in
    closed form. linear (a = 1 - t, s = t, what SiT trains on): -((1 - t) v + x) / t. cosine
    (a = cos(pi t / 2), s = sin(pi t / 2)): the denominator is 1, and r = -(2 / pi) cot(pi t / 2).
    v, x: float64 (B, L, d); t a python float in (0, 1]."""
    if path_type == "linear":
        return -((1.0 - t) * v + x) / t
    return -(2 / math.pi) / math.tan(math.pi * t / 2) * v - x


def _sde_noise(x, rng, n):
    """The SDE's n noise draws like x (B, L, d): a function i -> standard normals (B, L, d). rng:
    None or a Generator (one draw per step), or a list of one generator per sample: each sample's n
    draws then come from its own, all at the start ((n, L, d) float32), so a sample's noise does not
    depend on its batch, and a batch costs B draws."""
    if isinstance(rng, (list, tuple)):
        table = None
        if n:
            per_sample = [torch.randn((n, *x.shape[1:]), generator=g, device=g.device) for g in rng]
            table = torch.stack([t.to(x.device) for t in per_sample], dim=1)  # (n, B, L, d)
        return lambda i: table[i].to(x.dtype)
    return lambda i: torch.randn(x.shape, generator=rng, dtype=x.dtype, device=x.device)


def _static(*tensors):
    """Mark dim 0 static (one compiled graph per batch size), only if dynamo is loaded: eager runs
    never import it."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        for t in tensors:
            dynamo.mark_static(t, 0)
    return tensors


def integrate_flow(velocity, noise, labels, sampling=Sampling(), rng=None, null_label=None):
    """Integrate dx/dt = v(x, t) from t = 1 (noise (B, L, d)) to t = 0 -> latents (B, L, d) in
    noise's dtype. velocity(x (B', L, d), t (B',), y (B',)) -> (B', L, d), called with float64 x and
    t (see sit_velocity for a SiT). The state is float64 throughout. Classifier-free guidance
    (cfg_scale > 1) evaluates the conditional and the unconditional velocity in one doubled batch;
    the unconditional label is null_label (the SiT's num_classes). rng: the SDE noise source (see
    _sde_noise)."""
    s = sampling.cfg_scale
    if s > 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs null_label (the model's num_classes)")

    def guided_velocity(x, t, guide):  # x float64 (B, L, d), t a python float -> float64 (B, L, d)
        if not (guide and s > 1.0):
            t_in = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
            return velocity(x, t_in, labels).to(torch.float64)
        x_in = torch.cat([x, x])
        y_in = torch.cat([labels, torch.full_like(labels, null_label)])
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
        v_cond, v_uncond = velocity(x_in, t_in, y_in).to(torch.float64).chunk(2)
        return v_uncond + s * (v_cond - v_uncond)

    x = noise.to(torch.float64)
    if sampling.solver == "sde":
        # SiT's SDE grid stops at t = 0.04 (the score -((1 - t) v + x) / t blows up at 0); one last
        # mean step to 0
        ts = torch.linspace(1.0, 0.04, sampling.steps, dtype=torch.float64).tolist() + [0.0]
        draw = _sde_noise(x, rng, sampling.steps - 1)  # no noise on the last step
    else:
        ts = torch.linspace(1.0, 0.0, sampling.steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            last = i == len(ts) - 2
            # The guidance interval (Kynkaanniemi et al. 2024): guide only while t is inside [low,
            # high]. Heun's corrector, evaluated at t_next, follows the decision taken at t, so that
            # one step uses one field.
            guide = sampling.guidance_low <= t <= sampling.guidance_high
            dt = t_next - t  # < 0
            v = guided_velocity(x, t, guide)
            if sampling.solver == "sde":
                # Euler-Maruyama on the reverse-time SDE that shares the flow's marginals, diffusion
                # w(t) = 2t, drift v - w s / 2 with the score s from the velocity. The last step
                # (from 0.04) takes only the drift: the mean of the final sample.
                w = 2.0 * t
                score = score_from_velocity(v, x, t, sampling.path_type)
                x = x + (v - 0.5 * w * score) * dt
                if not last:
                    x = x + math.sqrt(w) * math.sqrt(abs(dt)) * draw(i)
            elif sampling.solver == "heun" and not last:
                # Heun: an Euler predictor, then the mean of the slopes at both ends (Euler on the
                # last step)
                x_pred = x + dt * v
                x = x + dt * 0.5 * (v + guided_velocity(x_pred, t_next, guide))
            else:
                # Euler
                x = x + dt * v
    return x.to(noise.dtype)


def sit_velocity(model, amp=True):
    """integrate_flow's velocity from a SiT (or a torch.compile'd one). Inputs go in the model's
    dtype (float32; float64 for a float64 model) and are marked static in the batch dimension, so a
    compiled model gets one graph per batch size (B, and 2B with guidance); on CUDA the model runs
    under bf16 autocast unless amp is False."""
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32

    def velocity(x, t, y):  # (B, L, d), (B,), (B,) -> (B, L, d)
        with bf16_autocast(x.device, amp):
            return model(*_static(x.to(dtype), t.to(dtype), y))

    return velocity


@torch.no_grad()
def generate_latents(model, noise, labels, sampling=Sampling(), rng=None, amp=True):
    """Normalised latents (B, L, d) from noise (B, L, d); the model runs in eval mode, under bf16
    autocast on CUDA."""
    was_training = model.training
    model.eval()
    try:
        return integrate_flow(sit_velocity(model, amp), noise, labels, sampling, rng,
                              null_label=model.config.num_classes)
    finally:
        model.train(was_training)


def generate_images(model, tokenizer, noise, labels, sampling=Sampling(), rng=None, amp=True):
    """Images (B, 3, H, W) in [-1, 1]: integrate the flow, un-normalise with the tokenizer's latent
    stats, decode."""
    c = tokenizer.config
    x = generate_latents(model, noise, labels, sampling, rng, amp)
    z = denormalize_latents(x, c.latent_mean, c.latent_std)
    with torch.no_grad(), bf16_autocast(z.device, amp):
        return tokenizer.decode(z).float().clamp(-1, 1)


def sample_inputs(seed, indices, num_tokens, token_dim, num_classes, device, fixed_labels=None):
    """Noise (B, L, d), uniform labels (B,) and one SDE-noise generator per sample k, all seeded by
    (seed, k). `fixed_labels` (all n, --labels equal) replace the uniform ones; they are drawn all
    the same, so the SDE noise does not depend on the label protocol."""
    noise = []
    labels = []
    rngs = []
    for k in indices:
        rng = torch.Generator().manual_seed(data.seed_for(seed, k))
        noise.append(torch.randn(num_tokens, token_dim, generator=rng))
        labels.append(torch.randint(num_classes, (1,), generator=rng))
        # the SDE noise is drawn on the device, from a generator there with the same seed
        if device.type != "cpu":
            rng = torch.Generator(device).manual_seed(data.seed_for(seed, k))
        rngs.append(rng)
    labels = torch.cat(labels)
    if fixed_labels is not None:
        labels = torch.as_tensor(fixed_labels[list(indices)])
    return torch.stack(noise).to(device), labels.to(device), rngs


# Checkpoints: ours (a plain dict, kind "generator"), or a released SiT state dict (.safetensors /
# torch.save) with its config.json (fields hidden_size, depth, num_heads, input_size, in_channels,
# ...).

# The number of heads is not in the weights' shapes: it comes from the presets, by width
_HEADS_BY_WIDTH = {p["width"]: p["num_heads"] for p in GENERATOR_PRESETS.values()}


def tokenizer_info(path, config_json, latent_mean, latent_std):
    """What the latent cache and a generator checkpoint record of their tokenizer: its files as
    absolute paths (sample.py, run from anywhere, finds them) and the latent statistics the
    generator's inputs are normalised with."""
    return {"path": path and os.path.abspath(path),
            "config_json": config_json and os.path.abspath(config_json),
            "latent_mean": latent_mean, "latent_std": latent_std}


def generator_checkpoint(model, ema, tokenizer_info, classes, **extra):
    """Our layout; loads with torch.load(weights_only=True). tokenizer_info: the tokenizer's path,
    config_json and the latent statistics the generator trains with; classes: the class names of the
    training data."""
    return {"kind": "generator", "config": asdict(model.config), "model": model.state_dict(),
            "ema": ema.state_dict(), "tokenizer": tokenizer_info, "classes": classes, **extra}


def official_config(sd, config_json=None):
    """SiTConfig of a released state dict: sizes from the tensor shapes, heads from its config.json
    or the presets."""
    if "x_embedder.weight" not in sd or "pos_embed" not in sd:
        raise ValueError("not a SiT-on-tokens state dict (no x_embedder.weight / pos_embed)")
    width, token_dim = sd["x_embedder.weight"].shape
    hf = json.load(open(config_json)) if config_json else {}
    have = dict(hidden_size=width, in_channels=token_dim, input_size=sd["pos_embed"].shape[1],
                depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
    for key, val in have.items():
        if key in hf and hf[key] != val:
            raise ValueError(f"{config_json}: {key}={hf[key]} but the weights have {val}")
    heads = hf.get("num_heads", _HEADS_BY_WIDTH.get(width))
    if heads is None:
        raise ValueError(f"width {width} is no known preset: pass the model's config.json "
                         f"(num_heads) with --config")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    return SiTConfig(num_tokens=have["input_size"], token_dim=token_dim, width=width,
                     depth=have["depth"], num_heads=heads, mlp_ratio=mlp_ratio,
                     num_classes=have["num_classes"],
                     class_dropout=hf.get("class_dropout_prob", 0.1))


def load_generator(path, config_json=None, weights="ema"):
    """-> (SiT in eval mode, tokenizer info dict or None). Accepts our checkpoint (a dict with
    "kind"), a checkpoint of continuous_tokenizer's train_sit.py (its "ema"), or a released state
    dict + config.json."""
    ckpt = load_state_dict_file(path)
    info = None
    config = None
    if "kind" in ckpt:
        if ckpt["kind"] != "generator":
            raise ValueError(f"{path} is a {ckpt['kind']!r} checkpoint, not a generator "
                             f"(tokenizers go to --tokenizer)")
        if weights not in ckpt:
            raise ValueError(f"{path} holds no {weights!r} weights")
        sd = ckpt[weights]
        config = SiTConfig(**ckpt["config"])
        # class names for grids
        info = {**(ckpt.get("tokenizer") or {}), "classes": ckpt.get("classes") or None}
    else:
        sd = ckpt["ema"] if isinstance(ckpt.get("ema"), dict) else ckpt
    # compiled / DDP saves
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}
    if config is None:
        # HF layout: config.json beside the weights
        beside = os.path.join(os.path.dirname(path), "config.json")
        config = official_config(sd, config_json or (beside if os.path.isfile(beside) else None))
    return check_state_dict(SiT(config), sd).eval(), info


def load_tokenizer_for(model, info=None, path=None, config_json=None):
    """The tokenizer that decodes `model`'s latents, its config carrying the generator's latent
    statistics (they win over the tokenizer's own). `info`: the generator checkpoint's "tokenizer"
    entry; `path`, `config_json` override."""
    info = info or {}
    # the stored pair; an explicit --tokenizer comes with its own --tokenizer-config (or none)
    if not path:
        path = info.get("path")
        config_json = config_json or info.get("config_json")
    if not path:
        raise ValueError("no tokenizer: pass --tokenizer (released SiT weights don't name one)")
    for p in (path, config_json):
        if p and not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such tokenizer file")
    tok = load_tokenizer(path, config_json)
    tc = tok.config
    gc = model.config
    if (tc.num_tokens, tc.token_dim) != (gc.num_tokens, gc.token_dim):
        raise ValueError(f"tokenizer makes {tc.num_tokens}x{tc.token_dim} tokens, the generator "
                         f"expects {gc.num_tokens}x{gc.token_dim}")
    mean = info.get("latent_mean")
    std = info.get("latent_std")
    mean = tc.latent_mean if mean is None else mean
    std = tc.latent_std if std is None else std
    if (mean, std) != (tc.latent_mean, tc.latent_std):
        print(f"note: using the generator's latent stats mean={mean:.6g} std={std:.6g} "
              f"(tokenizer config: {tc.latent_mean:.6g}, {tc.latent_std:.6g})")
    tc.latent_mean = float(mean)
    tc.latent_std = float(std)
    return tok
