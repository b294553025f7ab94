"""SoftVQ-VAE (arXiv 2412.10958): a ViT encoder that writes L learned latent tokens, a soft categorical posterior over
G codebooks that turns each token into a convex mix of unit codewords, and a ViT decoder that paints mask tokens
from those latents. Everything here computes what the official code (Hhhhhhao/continuous_tokenizer) computes, with
the same parameter names, so released checkpoints load unchanged (shared/spec/softvq.md §2-3).
"""
import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ViT, check_state_dict, load_state_dict_file


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
    token_dim: int = 64  # d: width of each token (64 for 32 tokens, 32 for 64 tokens: 2048 floats per image)
    codebook_size: int = 8192  # K
    num_codebooks: int = 4  # G: token groups of L/G consecutive tokens, one codebook each
    tau: float = 0.07  # posterior temperature (§3)
    entropy_temperature: float = 0.01  # the entropy regulariser's own temperature (official `compute_entropy_loss`)
    latent_mean: float = 0.0  # scalar latent statistics for the generator: x = (z - mean) / std (§7)
    latent_std: float = 1.0

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not divisible by the patch size {self.patch_size}; "
                             f"use a multiple of {self.patch_size}")
        if self.num_tokens % self.num_codebooks:
            raise ValueError(f"{self.num_tokens} tokens cannot be split into {self.num_codebooks} codebook groups")


# (width, depth, heads) of the DINOv2 ViTs the official presets are built from.
VIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}


def _preset(enc, dec, tokens, image_size):
    (ew, ed, eh), (dw, dd, dh) = VIT_SIZES[enc], VIT_SIZES[dec]
    return dict(image_size=image_size, enc_width=ew, enc_depth=ed, enc_heads=eh, dec_width=dw, dec_depth=dd,
                dec_heads=dh, num_tokens=tokens, token_dim=2048 // tokens)


# softvq-{s,b,bl,l}-{32,64} at 256 px, and the same with a -512 suffix at 512 px. BL = ViT-B encoder + ViT-L decoder.
PRESETS = {f"softvq-{name}-{tokens}{'' if size == 256 else '-512'}": _preset(enc, dec, tokens, size)
           for name, (enc, dec) in {"s": ("s", "s"), "b": ("b", "b"), "bl": ("b", "l"), "l": ("l", "l")}.items()
           for tokens in (32, 64) for size in (256, 512)}
# A CPU-sized model for the quickstart and the tests: 32 px images, 64 patches of 4x4, 16 tokens of width 16.
PRESETS["softvq-tiny"] = dict(image_size=32, patch_size=4, enc_width=128, enc_depth=4, enc_heads=4, dec_width=128,
                              dec_depth=4, dec_heads=4, num_tokens=16, token_dim=16, codebook_size=512)


def tokenizer_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return TokenizerConfig(**{**PRESETS[preset], **overrides})


class SoftVectorQuantizer(nn.Module):
    """Soft VQ (§3): tokens are split into G groups of L/G consecutive tokens; group g uses codebook g. With unit
    vectors, p = softmax(<ẑ, sg(e_k)> / τ) and z = Σ_k p_k e_k. The codebook is detached inside the logits, so the
    encoder learns through p and the codebook only through the weighted sum z. No codebook or commitment loss."""

    def __init__(self, codebook_size, token_dim, num_codebooks, tau):
        super().__init__()
        self.tau = tau
        # Official init: uniform(±1/K) then row-normalised.
        emb = torch.empty(num_codebooks, codebook_size, token_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        self.embedding = nn.Parameter(F.normalize(emb, dim=-1))
        # The last 65,536 argmax indices per codebook, for the usage statistic (float32, as in the released layout).
        # -1 marks an empty slot. Logging only; unlike the official code we store each codebook's own indices.
        self.register_buffer("codebook_used", torch.full((num_codebooks, 65536), -1.0))

    def forward(self, h):  # (B, L, d) -> z (B, L, d), logits (B, G, L/G, K)
        B, L, d = h.shape
        G = self.embedding.shape[0]
        h = F.normalize(h.view(B, G, L // G, d), dim=-1)
        codebook = F.normalize(self.embedding, dim=-1)  # (G, K, d)
        logits = torch.einsum("bgld,gkd->bglk", h, codebook.detach())  # cosine similarities in [-1, 1]
        probs = torch.softmax(logits / self.tau, dim=-1)
        z = torch.einsum("bglk,gkd->bgld", probs.to(codebook.dtype), codebook)
        if self.training:
            self._record_usage(logits)
        return z.reshape(B, L, d), logits

    @torch.no_grad()
    def _record_usage(self, logits):
        idx = logits.argmax(-1).transpose(0, 1).reshape(logits.shape[1], -1).float()  # (G, B*L/G), per codebook
        n = min(idx.shape[1], self.codebook_used.shape[1])
        self.codebook_used.copy_(torch.cat([self.codebook_used[:, n:], idx[:, -n:]], dim=1))

    @torch.no_grad()
    def usage(self):
        """Mean over codebooks of (distinct indices among the recorded ones) / K. Syncs: call at log time only."""
        K = self.embedding.shape[1]
        return sum(len(torch.unique(row[row >= 0])) for row in self.codebook_used) / (K * len(self.codebook_used))


def entropy_loss(logits, temperature=0.01):
    """The official "KL" regulariser (§3): on the raw cosine logits at its own temperature, pooled over all codebooks
    and tokens: mean per-row entropy (sharp assignments) minus the entropy of the mean assignment (spread usage)."""
    flat = logits.reshape(-1, logits.shape[-1]).float() / temperature  # (rows, K)
    probs = torch.softmax(flat, dim=-1)
    # The official code takes log_softmax(flat + 1e-5): a constant shift, so log_softmax(flat) is the same number.
    sample_entropy = -(probs * torch.log_softmax(flat, dim=-1)).sum(-1).mean()
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-6)).sum()
    return sample_entropy - avg_entropy


class Encoder(nn.Module):
    """ViT over [cls, patches + 2-D learned position embedding, L latent tokens + their 1-D position embedding];
    returns the last L outputs after the final norm (§2.1)."""

    def __init__(self, cfg):
        super().__init__()
        self.model = ViT(cfg.image_size, cfg.patch_size, cfg.enc_width, cfg.enc_depth, cfg.enc_heads)
        self.latent_tokens = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.enc_width) * 0.02)
        self.latent_pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, cfg.num_tokens, cfg.enc_width),
                                                                   std=0.02))

    def forward(self, images):  # (B, 3, H, W) -> (B, L, D_enc)
        x = self.model.embed(self.model.patch_embed(images))  # (B, 1 + N, D)
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)
        x = torch.cat([x, latents], dim=1)
        for blk in self.model.blocks:
            x = blk(x)
        return self.model.norm(x)[:, -latents.shape[1]:]


class PixelHead(nn.Module):
    """Per-token Linear to a p x p x 3 patch, then unpatchify (official `to_pixel='linear'`, key to_pixel.model)."""

    def __init__(self, width, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.model = nn.Linear(width, 3 * patch_size * patch_size)

    def forward(self, x):  # (B, N, D) -> (B, 3, H, W)
        B, N, _ = x.shape
        p, h = self.patch_size, int(N ** 0.5)
        x = self.model(x).view(B, h, h, p, p, 3)  # per-patch layout (row, col, channel)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, 3, h * p, h * p)


class Decoder(nn.Module):
    """ViT over [cls, N mask tokens + 2-D learned position embedding, L projected latents + 1-D position embedding];
    the N mask-token outputs after the final norm become pixels (§2.2). Randomly initialised, never pretrained."""

    def __init__(self, cfg):
        super().__init__()
        self.model = ViT(cfg.image_size, cfg.patch_size, cfg.dec_width, cfg.dec_depth, cfg.dec_heads,
                         patch_embed=False)
        self.mask_token = nn.Parameter(torch.randn(1, 1, cfg.dec_width) * 0.02)
        self.latent_pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, cfg.num_tokens, cfg.dec_width),
                                                                   std=0.02))
        self.to_pixel = PixelHead(cfg.dec_width, cfg.patch_size)

    def forward(self, h):  # (B, L, D_dec) -> (B, 3, H, W)
        N = self.model.num_patches
        x = self.model.embed(self.mask_token.expand(h.shape[0], N, -1))  # (B, 1 + N, D)
        x = torch.cat([x, h + self.latent_pos_embed], dim=1)
        for blk in self.model.blocks:
            x = blk(x)
        return self.to_pixel(self.model.norm(x)[:, 1:1 + N])


class SoftVQVAE(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Linear(cfg.enc_width, cfg.token_dim)
        self.quantize = SoftVectorQuantizer(cfg.codebook_size, cfg.token_dim, cfg.num_codebooks, cfg.tau)
        self.post_quant_conv = nn.Linear(cfg.token_dim, cfg.dec_width)
        self.decoder = Decoder(cfg)

    def encode(self, images):  # (B, 3, H, W) in [-1, 1] -> z (B, L, d)
        return self.quantize(self.quant_conv(self.encoder(images)))[0]

    def decode(self, z):  # (B, L, d) -> images (B, 3, H, W), roughly [-1, 1] (not clamped)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images):  # -> reconstruction (B, 3, H, W), z (B, L, d), posterior logits (B, G, L/G, K)
        z, logits = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decode(z), z, logits

    def normalize(self, z):  # latent -> generator space (§7)
        return (z - self.config.latent_mean) / self.config.latent_std

    def denormalize(self, x):
        return x * self.config.latent_std + self.config.latent_mean


# ---------------------------------------------------------------------------------------------------------------
# Released checkpoints: the official state dict (.safetensors or torch.save) plus its config.json (the fields of the
# official `ModelArgs`). The decoder's patch embedding is carried unused by later official files: we drop it.
OFFICIAL_UNUSED = ("decoder.model.patch_embed.",)
_DINOV2_SIZES = {"vit_small": "s", "vit_base": "b", "vit_large": "l"}


def config_from_official(cfg_json):
    """Map an official config.json (flat ModelArgs fields, or nested under "config") to a TokenizerConfig."""
    c = cfg_json.get("config", cfg_json)

    def vit(name):
        for prefix, size in _DINOV2_SIZES.items():
            if str(name).startswith(prefix):
                return VIT_SIZES[size]
        raise ValueError(f"official config names backbone {name!r}; only DINOv2 ViT-S/B/L backbones are supported")

    (ew, ed, eh), (dw, dd, dh) = vit(c["encoder_model"]), vit(c["decoder_model"])
    if c.get("enc_patch_size", 16) != c.get("dec_patch_size", 16) or c.get("to_pixel", "linear") != "linear" \
            or c.get("use_rope", False) or c.get("enc_type", "vit") != "vit":
        raise ValueError("official config uses options SoftVQ does not (RoPE, non-linear pixel head, CNN, "
                         "different patch sizes); this loader supports the released SoftVQ models")
    return TokenizerConfig(image_size=c["image_size"], patch_size=c.get("enc_patch_size", 16), enc_width=ew,
                           enc_depth=ed, enc_heads=eh, dec_width=dw, dec_depth=dd, dec_heads=dh,
                           num_tokens=c["num_latent_tokens"], token_dim=c["codebook_embed_dim"],
                           codebook_size=c["codebook_size"], num_codebooks=c.get("num_codebooks", 1),
                           tau=c.get("tau", 0.07), latent_mean=float(c.get("vq_mean", 0.0)),
                           latent_std=float(c.get("vq_std", 1.0)))


def load_tokenizer(path, config_json=None, use_ema=True):
    """A SoftVQVAE in eval mode from our checkpoint (kind 'tokenizer'; EMA weights by default) or from a released
    official state dict plus its config.json (by default the config.json next to the weights file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer checkpoint")
    sd = load_state_dict_file(path)
    if "kind" in sd:  # one of our checkpoints
        if sd["kind"] != "tokenizer":
            raise ValueError(f"{path} is a {sd['kind']} checkpoint, not a tokenizer checkpoint")
        known = {f.name for f in fields(TokenizerConfig)}
        cfg = TokenizerConfig(**{k: v for k, v in sd["config"].items() if k in known})
        model = SoftVQVAE(cfg)
        check_state_dict(model, sd["ema"] if use_ema and "ema" in sd else sd["model"])
        return model.eval()
    config_json = config_json or os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config_json):
        raise FileNotFoundError(f"{path} looks like an official state dict but {config_json} is missing; pass the "
                                f"released config.json (--config) next to the weights")
    with open(config_json) as f:
        cfg = config_from_official(json.load(f))
    model = SoftVQVAE(cfg)
    check_state_dict(model, sd, ignore=OFFICIAL_UNUSED)
    return model.eval()


def tokenizer_checkpoint(model, ema=None, **extra):
    """Our plain-dict checkpoint layout (loads with torch.load(weights_only=True))."""
    ckpt = {"kind": "tokenizer", "config": asdict(model.config), "model": model.state_dict()}
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    return {**ckpt, **extra}
