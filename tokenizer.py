"""SoftVQ-VAE (arXiv 2412.10958): a ViT encoder that writes L learned latent tokens, a soft
categorical posterior over G codebooks that turns each token into a convex mix of unit codewords,
and a ViT decoder that paints mask tokens from those latents. Parameter names are those of the
released checkpoints (Hhhhhhao/continuous_tokenizer, `modelling/tokenizer.py`), so they load
unchanged. Part 1 is the model: config and presets, the soft quantizer, encoder, decoder,
checkpoints and latent normalisation. Part 2 is the training objective: MSE + entropy + LPIPS
(VGG16) + hinge GAN against a frozen-DINO discriminator (DiffAugment, LeCam, consistency
regularisation) + REPA alignment to a frozen DINOv2, and DINOv2 encoder initialisation. Pretrained
networks are local files (README, "Pretrained networks"): a term whose file is missing is switched
off with a loud WARNING and recorded in `TokenizerLoss.disabled`."""
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import ViT, cast_autocast_weights, check_state_dict, load_state_dict_file, run_blocks


@dataclass
class TokenizerConfig:
    image_size: int = 256
    patch_size: int = 16
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    num_tokens: int = 32  # L: 1-D latent tokens per image
    # d: width of each token (64 for 32 tokens, 32 for 64 tokens: 2048 floats per image)
    token_dim: int = 64
    codebook_size: int = 8192  # K
    num_codebooks: int = 4  # G: token groups of L/G consecutive tokens, one codebook each
    tau: float = 0.07  # posterior temperature (0.07 in the paper)
    # scalar latent statistics for the generator: x = (z - mean) / std (see `normalize_latents`)
    latent_mean: float = 0.0
    latent_std: float = 1.0

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not divisible by the patch size "
                             f"{self.patch_size}; use a multiple of {self.patch_size}")
        if self.num_tokens % self.num_codebooks:
            raise ValueError(f"{self.num_tokens} tokens cannot be split into "
                             f"{self.num_codebooks} codebook groups")


# (width, depth, heads) of the DINOv2 ViTs the released presets are built from.
VIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}


# tokens x token_dim = 2048 floats per image in every preset
def _preset(enc, dec, tokens, image_size):
    ew, ed, eh = VIT_SIZES[enc]
    dw, dd, dh = VIT_SIZES[dec]
    return dict(image_size=image_size, enc_width=ew, enc_depth=ed, enc_heads=eh,
                dec_width=dw, dec_depth=dd, dec_heads=dh,
                num_tokens=tokens, token_dim=2048 // tokens)


# name: encoder ViT, decoder ViT, tokens, image size; BL = ViT-B encoder + ViT-L decoder
PRESETS = {
    "softvq-s-32": _preset("s", "s", 32, 256), "softvq-s-64": _preset("s", "s", 64, 256),
    "softvq-b-32": _preset("b", "b", 32, 256), "softvq-b-64": _preset("b", "b", 64, 256),
    "softvq-bl-32": _preset("b", "l", 32, 256), "softvq-bl-64": _preset("b", "l", 64, 256),
    "softvq-l-32": _preset("l", "l", 32, 256), "softvq-l-64": _preset("l", "l", 64, 256),
    "softvq-s-32-512": _preset("s", "s", 32, 512), "softvq-s-64-512": _preset("s", "s", 64, 512),
    "softvq-b-32-512": _preset("b", "b", 32, 512), "softvq-b-64-512": _preset("b", "b", 64, 512),
    "softvq-bl-32-512": _preset("b", "l", 32, 512), "softvq-bl-64-512": _preset("b", "l", 64, 512),
    "softvq-l-32-512": _preset("l", "l", 32, 512), "softvq-l-64-512": _preset("l", "l", 64, 512),
    # CPU-sized for the quickstart and tests: 32 px, 16 patches of 8x8, 16 tokens of width 16
    # (BENCHMARKS.md: why)
    "softvq-tiny": dict(image_size=32, patch_size=8, enc_width=64, enc_depth=4, enc_heads=2,
                        dec_width=64, dec_depth=4, dec_heads=2, num_tokens=16, token_dim=16,
                        codebook_size=512),
}


def tokenizer_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose one of: "
                         f"{', '.join(sorted(PRESETS))}")
    return TokenizerConfig(**{**PRESETS[preset], **overrides})


class SoftVectorQuantizer(nn.Module):
    """The soft categorical posterior of arXiv 2412.10958 (continuous_tokenizer
    `modelling/quantizers/softvq.py`). G groups of L/G consecutive tokens, group g on codebook g.
    With unit vectors, p = softmax(<ẑ, sg(e_k)> / τ) and z = Σ_k p_k e_k: the encoder learns
    through p, the codebook only through z. No codebook or commitment loss."""

    def __init__(self, codebook_size, token_dim, num_codebooks, tau):
        super().__init__()
        self.tau = tau
        # Init as the released code: uniform(±1/K), then row-normalised.
        emb = torch.empty(num_codebooks, codebook_size, token_dim)
        emb.uniform_(-1 / codebook_size, 1 / codebook_size)
        self.embedding = nn.Parameter(F.normalize(emb, dim=-1))
        # The last 65,536 argmax indices of each codebook (-1: empty), for the logged usage (README,
        # Differences).
        self.register_buffer("codebook_used", torch.full((num_codebooks, 65536), -1.0))

    def forward(self, h):  # (B, L, d) -> z (B, L, d), logits (B, G, L/G, K)
        B, L, d = h.shape
        G = self.embedding.shape[0]
        h = F.normalize(h.view(B, G, L // G, d), dim=-1)
        codebook = F.normalize(self.embedding, dim=-1)  # (G, K, d)
        # cosine similarities in [-1, 1]
        logits = torch.einsum("bgld,gkd->bglk", h, codebook.detach())
        probs = torch.softmax(logits / self.tau, dim=-1)
        z = torch.einsum("bglk,gkd->bgld", probs.to(codebook.dtype), codebook)
        if self.training:
            self._record_usage(logits)
        return z.reshape(B, L, d), logits

    @torch.no_grad()
    def _record_usage(self, logits):
        # (G, B*L/G), per codebook
        idx = logits.argmax(-1).transpose(0, 1).reshape(logits.shape[1], -1).float()
        n = min(idx.shape[1], self.codebook_used.shape[1])
        self.codebook_used.copy_(torch.cat([self.codebook_used[:, n:], idx[:, -n:]], dim=1))

    @torch.no_grad()
    def usage(self):
        """Mean over codebooks of (distinct indices among the recorded ones) / K.
        A host sync: call it at log time only."""
        K = self.embedding.shape[1]
        distinct = sum(len(torch.unique(row[row >= 0])) for row in self.codebook_used)
        return distinct / (K * len(self.codebook_used))


def entropy_loss(logits, temperature):
    """The "KL" regulariser to a uniform prior (arXiv 2412.10958: KL = H(q) - H(E q)) on the cosine
    logits at its own temperature, over all codebooks and tokens. Its first term, the mean entropy
    of each token's assignment, is small when every token picks few codewords (sharp); its second,
    the entropy of the mean assignment over the batch, is large when the batch as a whole uses
    the codebook evenly (no collapse onto a few codewords)."""
    flat = logits.reshape(-1, logits.shape[-1]).float() / temperature  # (rows, K)
    probs = torch.softmax(flat, dim=-1)
    sample_entropy = -(probs * torch.log_softmax(flat, dim=-1)).sum(-1).mean()
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-6)).sum()
    return sample_entropy - avg_entropy


class Encoder(nn.Module):
    """ViT over [cls, patches + learned 2-D position embedding, L latent tokens + 1-D ones] -> the
    last L, normed."""

    def __init__(self, cfg):
        super().__init__()
        self.model = ViT(cfg.image_size, cfg.patch_size, cfg.enc_width, cfg.enc_depth,
                         cfg.enc_heads)
        self.latent_tokens = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.enc_width) * 0.02)
        pos = torch.empty(1, cfg.num_tokens, cfg.enc_width)
        self.latent_pos_embed = nn.Parameter(nn.init.trunc_normal_(pos, std=0.02))
        self.grad_checkpointing = False  # SoftVQVAE.set_grad_checkpointing

    def forward(self, images):  # (B, 3, H, W) -> (B, L, D_enc)
        x = self.model.embed(self.model.patch_embed(images))  # (B, 1 + N, D)
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)
        x = torch.cat([x, latents], dim=1)
        x = run_blocks(self.model.blocks, x, checkpointing=self.grad_checkpointing)
        return self.model.norm(x)[:, -latents.shape[1]:]


class PixelHead(nn.Module):
    """Per-token Linear to a p x p x 3 patch, then unpatchify (released `to_pixel='linear'`, key
    to_pixel.model): (B, N, D) -> (B, 3, H, W). `eager_pixels`, when set, runs it outside
    torch.compile (SoftVQVAE.set_eager_pixel_head)."""

    def __init__(self, width, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.model = nn.Linear(width, 3 * patch_size * patch_size)
        self.eager_pixels = None

    def forward(self, x):  # (B, N, D) -> (B, 3, H, W)
        # The adaptive GAN weight takes two retain_graph gradients of this layer's weight a step:
        # in a compiled graph each would rerun the whole compiled backward (which AOTAutograd
        # refuses once it donates buffers); eager, they stop at this layer's input.
        return self.pixels(x) if self.eager_pixels is None else self.eager_pixels(self, x)

    def pixels(self, x):
        B, N, _ = x.shape
        p = self.patch_size
        h = int(N ** 0.5)
        x = self.model(x).view(B, h, h, p, p, 3)  # per-patch layout (row, col, channel)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, 3, h * p, h * p)


class Decoder(nn.Module):
    """ViT over [cls, N mask tokens + 2-D position embedding, L projected latents + 1-D ones]; the N
    normed mask-token outputs become pixels. Randomly initialised, never pretrained."""

    def __init__(self, cfg):
        super().__init__()
        self.model = ViT(cfg.image_size, cfg.patch_size, cfg.dec_width, cfg.dec_depth,
                         cfg.dec_heads, patch_embed=False)
        self.mask_token = nn.Parameter(torch.randn(1, 1, cfg.dec_width) * 0.02)
        pos = torch.empty(1, cfg.num_tokens, cfg.dec_width)
        self.latent_pos_embed = nn.Parameter(nn.init.trunc_normal_(pos, std=0.02))
        self.to_pixel = PixelHead(cfg.dec_width, cfg.patch_size)
        self.grad_checkpointing = False  # SoftVQVAE.set_grad_checkpointing

    def forward(self, h):  # (B, L, D_dec) -> (B, 3, H, W)
        N = self.model.num_patches
        x = self.model.embed(self.mask_token.expand(h.shape[0], N, -1))  # (B, 1 + N, D)
        x = run_blocks(self.model.blocks, torch.cat([x, h + self.latent_pos_embed], dim=1),
                       checkpointing=self.grad_checkpointing)
        return self.to_pixel(self.model.norm(x)[:, 1:1 + N])


class SoftVQVAE(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Linear(cfg.enc_width, cfg.token_dim)
        self.quantize = SoftVectorQuantizer(cfg.codebook_size, cfg.token_dim, cfg.num_codebooks,
                                            cfg.tau)
        self.post_quant_conv = nn.Linear(cfg.token_dim, cfg.dec_width)
        self.decoder = Decoder(cfg)

    def encode(self, images):  # (B, 3, H, W) in [-1, 1] -> z (B, L, d)
        return self.quantize(self.quant_conv(self.encoder(images)))[0]

    def decode(self, z):  # (B, L, d) -> images (B, 3, H, W), roughly [-1, 1] (not clamped)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images):
        z, logits = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decode(z), z, logits

    def set_grad_checkpointing(self, enabled=True):
        """Activation checkpointing of every encoder and decoder block (model.run_blocks), for the
        large presets."""
        self.encoder.grad_checkpointing = enabled
        self.decoder.grad_checkpointing = enabled
        return self

    def set_eager_pixel_head(self, enabled=True):
        """Run the pixel head outside torch.compile, for the adaptive GAN weight (see PixelHead).
        Unbound, so a deepcopy (the EMA) calls its own head; made here as torch.compiler.disable
        imports torch._dynamo."""
        eager = torch.compiler.disable(PixelHead.pixels) if enabled else None
        self.decoder.to_pixel.eager_pixels = eager
        return self


# The generator works on x = (z - mean) / std, scalar statistics of the trained tokenizer's
# training-set latents stored in its config (released configs: vq_mean, vq_std).
def normalize_latents(z, mean, std):  # tokenizer latents -> generator space
    return (z - mean) / std


def denormalize_latents(x, mean, std):  # generator space -> tokenizer latents
    return x * std + mean


# Checkpoints: ours (a plain dict, kind "tokenizer"), or a released state dict (.safetensors or
# torch.save) plus its config.json (the fields of the released `ModelArgs`). Released files carry an
# unused decoder patch embedding.
OFFICIAL_UNUSED = ("decoder.model.patch_embed.",)
_DINOV2_SIZES = {"vit_small": "s", "vit_base": "b", "vit_large": "l"}


def config_from_official(cfg_json):
    """Map a released config.json (flat ModelArgs fields, or nested under "config") to a
    TokenizerConfig."""
    c = cfg_json.get("config", cfg_json)

    def vit(name):
        for prefix, size in _DINOV2_SIZES.items():
            if str(name).startswith(prefix):
                return VIT_SIZES[size]
        raise ValueError(f"config.json names backbone {name!r}; only DINOv2 ViT-S/B/L backbones "
                         f"are supported")

    ew, ed, eh = vit(c["encoder_model"])
    dw, dd, dh = vit(c["decoder_model"])
    unsupported = [c.get("enc_patch_size", 16) != c.get("dec_patch_size", 16),
                   c.get("to_pixel", "linear") != "linear", c.get("use_rope", False),
                   c.get("enc_type", "vit") != "vit"]
    if any(unsupported):
        raise ValueError("config.json uses options SoftVQ does not (RoPE, non-linear pixel head, "
                         "CNN, different patch sizes); this loader supports the released SoftVQ "
                         "models")
    return TokenizerConfig(image_size=c["image_size"], patch_size=c.get("enc_patch_size", 16),
                           enc_width=ew, enc_depth=ed, enc_heads=eh,
                           dec_width=dw, dec_depth=dd, dec_heads=dh,
                           num_tokens=c["num_latent_tokens"], token_dim=c["codebook_embed_dim"],
                           codebook_size=c["codebook_size"],
                           num_codebooks=c.get("num_codebooks", 1), tau=c.get("tau", 0.07),
                           latent_mean=float(c.get("vq_mean", 0.0)),
                           latent_std=float(c.get("vq_std", 1.0)))


def load_tokenizer(path, config_json=None, use_ema=True):
    """A SoftVQVAE in eval mode from our checkpoint (kind 'tokenizer'; EMA weights by default) or
    from a released state dict plus its config.json (by default the config.json next to the weights
    file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer checkpoint")
    sd = load_state_dict_file(path)
    if "kind" in sd:  # one of our checkpoints
        if sd["kind"] != "tokenizer":
            raise ValueError(f"{path} is a {sd['kind']} checkpoint, not a tokenizer checkpoint")
        known = {f.name for f in fields(TokenizerConfig)}
        cfg = TokenizerConfig(**{k: v for k, v in sd["config"].items() if k in known})
        weights = sd["ema"] if use_ema and "ema" in sd else sd["model"]
        return check_state_dict(SoftVQVAE(cfg), weights).eval()
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    config_json = config_json or beside
    if not os.path.isfile(config_json):
        raise FileNotFoundError(f"{path} looks like a released state dict but {config_json} is "
                                f"missing; put the released config.json next to the weights or "
                                f"name it (sample.py --config, train.py --tokenizer-config)")
    with open(config_json) as f:
        cfg = config_from_official(json.load(f))
    return check_state_dict(SoftVQVAE(cfg), sd, ignore=OFFICIAL_UNUSED).eval()


def tokenizer_checkpoint(model, ema=None, **extra):
    """Our plain-dict checkpoint layout (loads with torch.load(weights_only=True))."""
    ema_sd = {"ema": ema.state_dict()} if ema is not None else {}
    return {"kind": "tokenizer", "config": asdict(model.config), "model": model.state_dict(),
            **ema_sd, **extra}


# ==================================================================================================
# Part 2: the training objective (continuous_tokenizer `losses/vq_loss.py`,
# `configs/softvq-l-64.yaml`)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetNormalize(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> [0, 1] -> ImageNet mean/std, as DINO and DINOv2 expect;
    non-persistent buffers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return ((x + 1) / 2 - self.mean) / self.std


def _freeze(net):
    return net.requires_grad_(False).eval()


class UsesFrozen(nn.Module):
    """Frozen networks live in `self.frozen`, a plain dict: never optimised, trained or saved;
    `.to()` moves them."""

    def __init__(self):
        super().__init__()
        self.frozen = {}

    def _apply(self, fn, recurse=True):
        for net in self.frozen.values():
            net._apply(fn)
        return super()._apply(fn, recurse)


# a ViT whose every weight is about to be loaded strictly: skip the random init
def _unset_vit(*args, **kwargs):
    with torch.device("meta"):  # (trunc-normal init of a ViT-L takes tens of seconds on a CPU)
        return ViT(*args, **kwargs).to_empty(device="cpu")


def _vit_checkpoint(path):  # timm-layout ViT state dict -> (state dict, width, depth, mlp_ratio)
    sd = load_state_dict_file(path) if isinstance(path, str) else dict(path)
    if "cls_token" not in sd or "pos_embed" not in sd or "blocks.0.mlp.fc1.weight" not in sd:
        name = path if isinstance(path, str) else "state dict"
        raise ValueError(f"{name}: not a ViT checkpoint in the DINO/DINOv2 (facebookresearch or "
                         f"timm) layout")
    width = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return sd, width, depth, sd["blocks.0.mlp.fc1.weight"].shape[0] / width


# LPIPS v0.1 with VGG16 (Zhang et al. 2018; richzhang/PerceptualSimilarity, via taming-transformers'
# copy).
class LPIPS(nn.Module):
    """Per-image LPIPS distance for images in [-1, 1]. Weights: torchvision `vgg16-397923af.pth`
    (features.* only) and LPIPS `vgg.pth` (lin{0..4}.model.1.weight). Frozen, always in eval mode:
    no head dropout (README, Differences)."""
    CHANNELS = (64, 128, 256, 512, 512)
    # torchvision `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    TAPS = (3, 8, 15, 22, 29)

    def __init__(self, vgg_path, lpips_path):
        super().__init__()
        # torchvision's VGG16 `features` layout: conv at 0, 2, 5, 7, ...; max-pool at 4, 9, 16, 23
        layers = []
        # input channels of the next conv
        c = 3
        widths = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        for v in widths:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        # indices 0..29 (the final pool, 30, is never needed)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in self.CHANNELS)
        # LPIPS's ScalingLayer for [-1, 1] inputs: constants, not in the state dict
        shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
        scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        vgg = load_state_dict_file(vgg_path)
        vgg = {k: v for k, v in vgg.items() if not k.startswith("classifier.")}
        heads = load_state_dict_file(lpips_path)
        # slot 0 of each head is LPIPS's dropout
        names = [f"lin{i}.model.1.weight" for i in range(5)]
        if sorted(heads) != names:
            raise ValueError(f"{lpips_path}: expected the LPIPS v0.1 vgg.pth heads {names}, found "
                             f"{sorted(heads)[:6]}")
        lins = {f"lins.{i}.weight": heads[n] for i, n in enumerate(names)}
        check_state_dict(self, {**vgg, **lins})
        _freeze(self)

    # frozen: stays in eval mode whatever the parent module is switched to
    def train(self, mode=True):
        return super().train(False)

    # (B, 3, H, W) in [-1, 1] -> 5 maps, unit-normalised over channels (eps 1e-10)
    def features_at_taps(self, x):
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    # reference a, compared b: (B, 3, H, W) x2 in [-1, 1] -> (B,) distances
    def forward(self, a, b):
        # One VGG pass per image set: the pass over a (real images, no gradient) records no graph,
        # so the backward and saved activations cover b alone; VGG has no batch norm: as one pass
        # over both, up to rounding.
        total = 0
        for lin, fa, fb in zip(self.lins, self.features_at_taps(a), self.features_at_taps(b)):
            # squared difference, 1x1 head, spatial mean
            total = total + lin((fa - fb) ** 2).mean((1, 2, 3))
        return total


# DiffAugment (Zhao et al. 2020; continuous_tokenizer utils/diff_aug.py): each policy fires with
# probability `prob`, once per batch, with per-sample parameters. Weak: G and D steps. Strong:
# consistency regularisation.
WEAK = ("color", "translation", "cutout_0.2")
STRONG = ("color", "translation", "cutout_0.5")


def _per_sample(x):  # (B, 1, 1, 1) uniform [0, 1)
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)


def _color(x):  # brightness +U(-.5, .5), saturation x U(0, 2), contrast x U(.5, 1.5), per sample
    x = x + (_per_sample(x) - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (_per_sample(x) * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (_per_sample(x) + 0.5) + mean


# integer shift in [-ratio*size, ratio*size] per sample and axis, zero fill
def _translate(x, ratio=0.125):
    B, _, H, W = x.shape
    # the largest shift per axis
    sh = int(H * ratio + 0.5)
    sw = int(W * ratio + 0.5)
    shift_rows = torch.randint(-sh, sh + 1, (B, 1, 1), device=x.device)
    rows = torch.arange(H, device=x.device).view(1, H, 1) + shift_rows
    shift_cols = torch.randint(-sw, sw + 1, (B, 1, 1), device=x.device)
    cols = torch.arange(W, device=x.device).view(1, 1, W) + shift_cols
    inside = ((rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)).unsqueeze(1)  # (B, 1, H, W)
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    channels_last = x.permute(0, 2, 3, 1)
    out = channels_last[batch, rows.clamp(0, H - 1), cols.clamp(0, W - 1)].permute(0, 3, 1, 2)
    return out * inside


# zero a (ratio*H, ratio*W) rectangle per sample, centred anywhere, clipped at the border
def _cutout(x, ratio):
    B, _, H, W = x.shape
    ch = int(H * ratio + 0.5)
    cw = int(W * ratio + 0.5)
    top = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), device=x.device) - ch // 2
    left = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), device=x.device) - cw // 2
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    hole = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)  # (B, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def diff_augment(x, policy=WEAK, prob=0.5):
    ops = {"color": _color, "translation": _translate, "cutout_0.2": lambda t: _cutout(t, 0.2),
           "cutout_0.5": lambda t: _cutout(t, 0.5)}
    for name in policy:
        if torch.rand(()).item() <= prob:  # CPU generator: no device sync
            x = ops[name](x)
    return x


# Frozen-DINO discriminator (VAR-style; continuous_tokenizer
# modelling/discriminators/discriminator_dino.py).
def dino_vit16(path):
    """Frozen DINO v1 ViT/16 at 224 px (`dino_deitsmall16_pretrain.pth`: ViT-S), strict keys; width
    and depth read from the file (heads = width / 64). tanh-GELU MLPs, as the discriminator's
    `MLPNoDrop` (README, Differences)."""
    sd, width, depth, _ = _vit_checkpoint(path)
    if depth < 12:
        raise ValueError(f"{path}: the DINO discriminator taps block 11, but the checkpoint has "
                         f"{depth} blocks")
    vit = _unset_vit(224, 16, width, depth, width // 64, layerscale=False)
    for blk in vit.blocks:
        blk.mlp.act = nn.GELU(approximate="tanh")
    return _freeze(check_state_dict(vit, sd))


def _world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with an all_reduce(SUM) backward, as torch.distributed.nn's deprecated
    all_reduce."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch of all ranks (the released 'sbn', SyncBatchNorm). Local
    batches are equal in size, so training needs one all_reduce of the per-channel [sum, sum of
    squares] (2, C), any backend, no host sync (its backward likewise); running statistics as
    BatchNorm1d's, equal on all ranks. One process or eval: plain BatchNorm1d. Variance E[x²] -
    E[x]² in float32: fine for these heads' O(1) features, not for |mean| >> std."""

    def forward(self, x):  # (B, C, T) -> (B, C, T)
        world = _world()
        if not self.training or world == 1:
            return super().forward(x)
        n = x.shape[0] * x.shape[2] * world
        xf = x.float()  # statistics in float32 under autocast, as cuDNN's batch norm keeps them
        sums = _SumOverRanks.apply(torch.stack([xf.sum((0, 2)), xf.pow(2).sum((0, 2))]))  # (2, C)
        mean = sums[0] / n
        var = (sums[1] / n - mean * mean).clamp_min(0)  # biased, as used to normalise
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * (n / (n - 1))).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return ((xf - mean[:, None]) * scale[:, None] + self.bias[:, None]).to(x.dtype)


def _unit_columns(x):  # (heads, n, 1) -> each column divided by its norm (F.normalize's eps)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class HeadConvs(nn.Module):
    """`heads` Conv1d layers (c_in -> c_out, kernel k, circular padding), each spectral-normalised
    as torch.nn.utils.parametrizations.spectral_norm (a power iteration per training forward), as
    one grouped convolution: (B, heads * c_in, T) -> (B, heads * c_out, T), a block per head."""

    def __init__(self, heads, c_in, c_out, k):
        super().__init__()
        self.heads = heads
        self.k = k
        # nn.Conv1d's initialisation, per head (fan-in c_in x k)
        weight = torch.empty(heads * c_out, c_in, k)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(c_in * k)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.empty(heads * c_out).uniform_(-bound, bound))
        # each head's singular-vector estimates, as columns: (heads, c_out, 1), (heads, c_in k, 1)
        self.register_buffer("u", _unit_columns(torch.randn(heads, c_out, 1)))
        self.register_buffer("v", _unit_columns(torch.randn(heads, c_in * k, 1)))
        for _ in range(15):
            self.power_iteration(self.matrices())

    def matrices(self):  # (heads, c_out, c_in * k)
        return self.weight.view(self.heads, -1, self.weight[0].numel())

    @torch.no_grad()
    def power_iteration(self, W):
        # new tensors, not updates in place: an earlier call's backward needs the u and v it used
        self.u = _unit_columns(torch.bmm(W, self.v))
        self.v = _unit_columns(torch.bmm(W.transpose(1, 2), self.u))

    def forward(self, x):
        # the spectral norm in float32, as torch's keeps it (under autocast bmm would run in bf16)
        with torch.autocast(x.device.type, enabled=False):
            W = self.matrices()
            if self.training:
                self.power_iteration(W)
            # (heads, 1, 1): each head's largest singular value, u^T W v
            sigma = (self.u * torch.bmm(W, self.v)).sum(1, keepdim=True)
            weight = (W / sigma).view_as(self.weight)
        if self.k > 1:
            x = F.pad(x, (self.k // 2, self.k // 2), mode="circular")
        return F.conv1d(x, weight, self.bias, groups=self.heads)


class DiscriminatorHeads(nn.Module):
    """The DINO discriminator's heads (continuous_tokenizer discriminator_dino.py, one per tapped
    map: spectral-norm conv 1x1, batch norm, LeakyReLU, a residual of conv k, batch norm and
    LeakyReLU, a conv 1x1 to one logit per token) computed together, head h on channels [h C, (h +
    1) C): grouped convolutions, one batch norm per depth (one all-reduce over the ranks for every
    head). (B, heads * C, T) -> (B, heads, T)."""

    def __init__(self, heads, width, kernel):
        super().__init__()
        self.heads = heads
        self.conv1 = HeadConvs(heads, width, width, 1)
        self.norm1 = GlobalBatchNorm1d(heads * width, eps=1e-6)
        self.conv2 = HeadConvs(heads, width, width, kernel)
        self.norm2 = GlobalBatchNorm1d(heads * width, eps=1e-6)
        self.out = HeadConvs(heads, width, 1, 1)

    def forward(self, x):
        x = F.leaky_relu(self.norm1(self.conv1(x)), 0.2)
        x = (F.leaky_relu(self.norm2(self.conv2(x)), 0.2) + x) / math.sqrt(2)
        return self.out(x)


class DinoDiscriminator(UsesFrozen):
    """Five trainable heads (7.39 M parameters) on frozen DINO ViT-S/16 features: blocks 2, 5, 8, 11
    and the embedding before them."""
    TAPS = (-1, 2, 5, 8, 11)  # -1: the embedding output before any block

    def __init__(self, dino_path, kernel=9):
        super().__init__()
        self.frozen["backbone"] = dino_vit16(dino_path)
        self.backbone_input = ImageNetNormalize()
        width = self.frozen["backbone"].cls_token.shape[-1]
        self.heads = DiscriminatorHeads(len(self.TAPS), width, kernel)

    def forward(self, x):  # (B, 3, H, W) in [-1, 1] -> logits (B, 5 * 196)
        return self.logits(self.view(x))[0]

    def view(self, x):
        """(B, 3, H, W) in [-1, 1] -> what the backbone sees (B, 3, 224, 224), contiguous:
        ImageNet-normalised, then one random 224 crop or a resize for the whole batch."""
        x = self.backbone_input(x.float())
        H, W = x.shape[-2:]
        # one random 224 crop for the whole batch
        if H > 224 and W > 224 and torch.rand(()).item() < 0.5:
            i = torch.randint(0, H - 223, ()).item()
            j = torch.randint(0, W - 223, ()).item()
            x = x[..., i:i + 224, j:j + 224]
        # area when shrinking, bicubic when enlarging (as discriminator_dino.py)
        elif (H, W) != (224, 224):
            x = F.interpolate(x, size=(224, 224), mode="area" if H > 224 else "bicubic")
        # One memory layout whatever the crop or the augmentation before (a translation leaves the
        # channels last): a compiled backbone meets one graph, not one per layout
        return x.contiguous()

    def logits(self, *views):
        """Views (B_i, 3, 224, 224) -> their logits (B_i, 5 * 196), each as a call of its own (its
        own batch-norm statistics); the frozen backbone, which has no batch norm, runs once over
        them all."""
        # 5 x (sum B_i, 1 + 196, 384)
        _, feats = self.frozen["backbone"].forward_features(torch.cat(views), taps=self.TAPS)
        # Each tapped map: patch tokens + cls token, channels first, the heads' side by side:
        # (sum B_i, 5 * 384, 196)
        x = torch.cat([(f[:, 1:] + f[:, :1]).transpose(1, 2) for f in feats], dim=1)
        return [self.heads(part).flatten(1) for part in x.split([len(v) for v in views])]


# DINOv2 loading with patch 14 -> 16: what timm's checkpoint filter does when continuous_tokenizer
# builds `vit_*_patch14_dinov2` with patch_size=16 and the training image size.
def resample_patch_kernel(w, size):
    """FlexiViT pseudo-inverse resize (Beyer et al. 2023; timm `resample_patch_embed`) of a patch
    kernel (O, I, p, p) -> (O, I, size, size). M (size², p²) is the bicubic+antialias resize of
    p x p patches; the new kernel w·pinv(M) gives <M x, w_new> = <x, w> for every patch x when M
    has full column rank (upsampling, e.g. 14 -> 16)."""
    p = w.shape[-1]
    if p == size:
        return w
    basis = torch.eye(p * p, dtype=torch.float32).view(p * p, 1, p, p)
    M = F.interpolate(basis, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    M = M.view(p * p, size * size).T  # (size², p²): column i is basis patch i resized
    out = w.float().flatten(2) @ torch.linalg.pinv(M)  # (O, I, p²) @ (p², size²)
    return out.view(*w.shape[:2], size, size).to(w.dtype)


def resample_pos_embed(pos, grid):
    """(1, 1 + g², D) -> (1, 1 + grid², D): bicubic antialias patch grid, cls kept (timm
    `resample_abs_pos_embed`)."""
    g = math.isqrt(pos.shape[1] - 1)
    if g == grid:
        return pos
    table = pos[:, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True,
                          align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)
    return torch.cat([pos[:, :1], table], dim=1)


def init_encoder_from_dinov2(vit: ViT, path):
    """Load a DINOv2 checkpoint (path or state dict; facebookresearch or timm layout) into `vit`
    (e.g. `encoder.model`): patch kernel and position grid (37 x 37 at 518 px) resampled to vit's;
    mask_token (pretraining only) dropped."""
    sd, width, depth, _ = _vit_checkpoint(path)
    sd.pop("mask_token", None)
    if (width, depth) != (vit.cls_token.shape[-1], len(vit.blocks)):
        raise ValueError(f"DINOv2 checkpoint is width {width} / depth {depth} but the ViT is "
                         f"width {vit.cls_token.shape[-1]} / depth {len(vit.blocks)}: use the "
                         f"DINOv2 of the encoder's size (S 384/12, B 768/12, L 1024/24)")
    kernel = sd["patch_embed.proj.weight"]
    sd["patch_embed.proj.weight"] = resample_patch_kernel(kernel, vit.patch_size)
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], math.isqrt(vit.num_patches))
    return check_state_dict(vit, sd)


def dinov2_teacher(path, image_size, patch_size=16):
    """The frozen alignment teacher (REPA, Yu et al. 2024, as arXiv 2412.10958 applies it to the
    tokenizer's latents): DINOv2 at `patch_size` and the training image size (heads = width / 64).
    """
    sd, width, depth, mlp_ratio = _vit_checkpoint(path)
    vit = _unset_vit(image_size, patch_size, width, depth, width // 64, mlp_ratio=mlp_ratio)
    return _freeze(init_encoder_from_dinov2(vit, sd))


@dataclass
class LossConfig:  # defaults: continuous_tokenizer configs/softvq-l-64.yaml
    mse_weight: float = 1.0
    entropy_weight: float = 0.01
    # the regulariser's own temperature (released `compute_entropy_loss`)
    entropy_temperature: float = 0.01
    perceptual_weight: float = 1.0
    perceptual_warmup: int = 10000  # the LPIPS weight ramps linearly from 0 over these steps
    adversarial_weight: float = 0.2
    disc_start: int = 20000  # before it neither D nor the generator's GAN term trains
    lecam_weight: float = 0.001
    consistency_weight: float = 4.0
    repa_weight: float = 0.1
    repa_patch_size: int = 16  # teacher patch size: N = (image_size / 16)² teacher tokens
    repa_proj_dim: int = 1024
    # VQGAN gradient-norm balance; off in the released run (author: try it, #13)
    adaptive_disc_weight: bool = False
    vgg_path: Optional[str] = None  # torchvision vgg16-397923af.pth
    lpips_path: Optional[str] = None  # LPIPS v0.1 vgg.pth
    dino_path: Optional[str] = None  # dino_deitsmall16_pretrain.pth
    dinov2_path: Optional[str] = None  # dinov2_vit{s,b,l}14_pretrain.pth or the timm .safetensors


class TokenizerLoss(UsesFrozen):
    """Generator side: mse·MSE + entropy·H + warmup·perceptual·LPIPS + adv·(-D(aug x̂))
    + repa·REPA. Discriminator side, its own step after the generator's, from `disc_start` on:
    adv·(hinge + lecam·LeCam) + consistency·CR. Trainable: the REPA projector
    (`generator_parameters`) and the D heads (`discriminator_parameters`)."""

    def __init__(self, tcfg: TokenizerConfig, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        # why a term is off although its weight is > 0, for the run's log
        self.disabled = []
        if self._wanted("perceptual_weight", "LPIPS perceptual", "vgg_path", "lpips_path"):
            self.frozen["lpips"] = LPIPS(cfg.vgg_path, cfg.lpips_path)
        self.disc = None
        adversarial = "adversarial (DINO discriminator, LeCam, consistency)"
        if self._wanted("adversarial_weight", adversarial, "dino_path"):
            self.disc = DinoDiscriminator(cfg.dino_path)
        # LeCam EMAs of the mean D logits (checkpointed)
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))
        self.projector = None
        self.teacher_input = ImageNetNormalize()
        if self._wanted("repa_weight", "REPA alignment", "dinov2_path"):
            teacher = dinov2_teacher(cfg.dinov2_path, tcfg.image_size, cfg.repa_patch_size)
            self.frozen["teacher"] = teacher
            if teacher.num_patches % tcfg.num_tokens:
                raise ValueError(f"REPA 'repeat' needs the {teacher.num_patches} teacher tokens to "
                                 f"be a multiple of the {tcfg.num_tokens} latent tokens; change "
                                 f"repa_patch_size")
            h = cfg.repa_proj_dim
            d_t = teacher.cls_token.shape[-1]
            self.projector = nn.Sequential(nn.Linear(tcfg.token_dim, h), nn.SiLU(),
                                           nn.Linear(h, h), nn.SiLU(), nn.Linear(h, d_t))

    def prepare_frozen(self, dtype=None, compile=False):
        """Speed-ups of the frozen networks (LPIPS, the DINO backbone, the DINOv2 teacher). dtype:
        their Linear/Conv weights cast once. compile: torch.compile their forwards with static
        shapes, a fixed set of graphs the first step of each phase meets (LPIPS one, the teacher
        one, the backbone two: the generator's call, the discriminator's). With the adaptive weight
        the teacher only: LPIPS's and the backbone's backward then run twice a step, which a
        compiled backward with donated buffers refuses."""
        nets = dict(self.frozen)
        if self.disc is not None:
            nets["backbone"] = self.disc.frozen["backbone"]
        for name, net in nets.items():
            if dtype is not None:
                cast_autocast_weights(net, dtype)
            if compile and (name == "teacher" or not self.cfg.adaptive_disc_weight):
                method = "forward" if name == "lpips" else "forward_features"
                # an instance attribute over the method
                setattr(net, method, torch.compile(getattr(net, method), dynamic=False))
        return self

    # weight > 0 and every file present; else off, loudly if weight > 0
    def _wanted(self, weight, what, *paths):
        if getattr(self.cfg, weight) <= 0:
            return False
        missing = [f"{p}={getattr(self.cfg, p)!r}" for p in paths
                   if not (getattr(self.cfg, p) and os.path.isfile(getattr(self.cfg, p)))]
        if missing:
            msg = (f"{what} loss is OFF although {weight}={getattr(self.cfg, weight)}: weights "
                   f"file missing ({', '.join(missing)}); this run trains a different objective "
                   f"than SoftVQ-VAE")
            print("!" * 100 + "\nWARNING: " + msg + "\n" + "!" * 100, flush=True)
            self.disabled.append(msg)
        return not missing

    def generator_parameters(self):
        return list(self.projector.parameters()) if self.projector is not None else []

    def discriminator_parameters(self):
        return list(self.disc.parameters()) if self.disc is not None else []

    def discriminator_active(self, step):
        return self.disc is not None and step >= self.cfg.disc_start

    # released 'repeat' mode: -cos(proj(z_i), teacher patch n) for n in strip i
    def alignment_loss(self, images, z):
        with torch.no_grad():
            teacher_input = self.teacher_input(images.float())
            target = self.frozen["teacher"].forward_features(teacher_input)[:, 1:]  # (B, N, D_t)
        B, L, _ = z.shape
        # (B, L, N/L, D_t)
        target = F.normalize(target, dim=-1).view(B, L, target.shape[1] // L, -1)
        # (B, L, 1, D_t): each token repeated N/L times
        pred = F.normalize(self.projector(z), dim=-1).unsqueeze(2)
        return -(pred * target).sum(-1).mean()  # mean over batch and the N positions

    def generator_loss(self, images, recon, z, logits, step, last_layer=None):
        """images, recon (B, 3, H, W) in [-1, 1]; z (B, L, d) the SoftVQ latents; logits (B, G, L/G,
        K) the posterior cosine logits; last_layer: decoder.to_pixel.model.weight, for
        adaptive_disc_weight only (a compiled model runs that head eagerly:
        SoftVQVAE.set_eager_pixel_head) -> (loss, logs: detached scalar tensors, no host sync)."""
        cfg = self.cfg
        logs = {}
        logs["mse"] = F.mse_loss(recon.float(), images.float())
        # the reconstruction part, which the adaptive weight balances against
        nll = cfg.mse_weight * logs["mse"]
        if "lpips" in self.frozen:
            logs["lpips"] = self.frozen["lpips"](images, recon).mean()
            ramp = min(1.0, step / cfg.perceptual_warmup) if cfg.perceptual_warmup > 0 else 1.0
            nll = nll + cfg.perceptual_weight * ramp * logs["lpips"]
        loss = nll
        if cfg.entropy_weight > 0:
            logs["entropy"] = entropy_loss(logits, cfg.entropy_temperature)
            loss = loss + cfg.entropy_weight * logs["entropy"]
        if self.projector is not None:
            logs["repa"] = self.alignment_loss(images, z)
            loss = loss + cfg.repa_weight * logs["repa"]
        if self.discriminator_active(step):
            self.disc.requires_grad_(False)  # gradients go to x̂ only, never into D's .grad
            try:
                # hinge generator loss
                logs["g_adv"] = -self.disc(diff_augment(recon, WEAK, 0.5)).mean()
            finally:
                self.disc.requires_grad_(True)
            weight = cfg.adversarial_weight
            if cfg.adaptive_disc_weight:
                logs["adaptive_weight"] = self.adaptive_weight(nll, logs["g_adv"], last_layer)
                weight = weight * logs["adaptive_weight"]
            loss = loss + weight * logs["g_adv"]
        logs["loss"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}

    @staticmethod
    # VQGAN (Esser et al. 2021): ‖∇nll‖ / (‖∇g‖ + 1e-4)
    def adaptive_weight(nll, g_adv, last_layer):
        if last_layer is None:
            raise ValueError("adaptive_disc_weight needs "
                             "last_layer=model.decoder.to_pixel.model.weight")
        g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_adv, last_layer, retain_graph=True)[0]
        return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def discriminator_loss(self, images, recon, step):
        """images, recon (B, 3, H, W) in [-1, 1] (detached here) -> (loss, logs); zero before
        disc_start."""
        if not self.discriminator_active(step):
            zero = images.new_zeros(())
            return zero, {"d_loss": zero}
        cfg = self.cfg
        images = images.detach()
        recon = recon.detach()
        # real and fake augmented independently, and for the consistency term strongly: the views
        # in the order of one call each (the random draws), the backbone once over them all
        disc = self.disc
        views = [disc.view(diff_augment(images, WEAK, 0.5)),
                 disc.view(diff_augment(recon, WEAK, 0.5))]
        if cfg.consistency_weight > 0:
            views += [disc.view(diff_augment(t, STRONG, 1.0)) for t in (images, recon)]
        logits = disc.logits(*views)
        real = logits[0]
        fake = logits[1]
        hinge = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        # LeCam (Tseng et al. 2021): EMAs updated before use, as vq_loss.py does
        with torch.no_grad():
            means = torch.stack([real.mean(), fake.mean()]).to(self.lecam_ema_real.dtype)
            # the global batch's means: every rank holds the same EMAs, so rank 0's checkpoint
            # resumes all of them exactly (one small all_reduce, no host sync)
            if _world() > 1:
                dist.all_reduce(means)
                means /= _world()
            self.lecam_ema_real.lerp_(means[0], 0.001)
            self.lecam_ema_fake.lerp_(means[1], 0.001)
        lecam_real = F.relu(real - self.lecam_ema_fake).pow(2).mean()
        lecam_fake = F.relu(self.lecam_ema_real - fake).pow(2).mean()
        lecam = lecam_real + lecam_fake
        loss = cfg.adversarial_weight * (hinge + cfg.lecam_weight * lecam)
        logs = {"d_hinge": hinge, "lecam": lecam, "logits_real": real.mean(),
                "logits_fake": fake.mean()}
        # bCR: strong vs weak augmentation, gradients through both; not scaled by adv
        if cfg.consistency_weight > 0:
            strong = torch.cat(logits[2:])
            logs["consistency"] = F.mse_loss(torch.cat([real, fake]), strong)
            loss = loss + cfg.consistency_weight * logs["consistency"]
        logs["d_loss"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}
