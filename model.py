"""The transformer parts the tokenizer and the generator are built from, and the reading of weight
files every loader uses.

Parts: SDPA attention, MLP, the DINOv2-style ViT block and backbone, the 1-D sin-cos table, a block
runner with optional activation checkpointing, the project's one bf16 autocast and a one-time cast
of frozen weights. Weight files: a hand-written `.safetensors` reader, `torch.save` state dicts
(never unpickling code) and a strict state-dict check whose error names the fix. Parameter names
follow timm's VisionTransformer (`patch_embed.proj`, `blocks.i.attn.qkv`, `blocks.i.ls1.gamma`,
`norm`, ...), so the released SoftVQ, DINOv2 and DINO checkpoints load without a renaming table."""
import json
import math
import os
import struct
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection (timm layout), by SDPA (flash kernels
    on CUDA)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear. DINOv2 uses the exact GELU, DiT/SiT the tanh approximation."""

    def __init__(self, dim, hidden_dim, gelu_approximate="none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT/DINOv2); timm initialises it to 1e-5 for the DINOv2 models.
    """

    def __init__(self, dim, init_value=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm DINOv2 block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)));
    layerscale=False: DINO v1's."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, layerscale=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x):  # (B, T, D)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens in raster order, by a strided conv (timm's
    `patch_embed.proj`)."""

    def __init__(self, patch_size, dim, in_chans=3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """A timm/DINOv2-layout ViT backbone: [cls, patches] + learned absolute position embedding,
    blocks, final norm. The tokenizer uses its pieces (latent tokens after the position embedding);
    DINOv2, DINO call `forward_features`."""

    def __init__(self, image_size, patch_size, width, depth, num_heads, mlp_ratio=4.0,
                 layerscale=True, patch_embed=True):
        super().__init__()
        assert image_size % patch_size == 0, \
            f"image size {image_size} is not divisible by patch size {patch_size}"
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        # the decoder never patchifies
        self.patch_embed = PatchEmbed(patch_size, width) if patch_embed else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, layerscale)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self):
        # timm's default ViT init: trunc-normal 0.02 for Linear weights and the position table, zero
        # biases, cls ~ N(0, 1e-6), LayerNorm (1, 0); conv patch embedding keeps PyTorch's default
        # (lecun-uniform-like).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    # (B, N, D) patch or mask tokens -> (B, 1 + N, D) with cls and position embedding
    def embed(self, tokens):
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def forward_features(self, x, taps=()):
        """Image (B, 3, H, W) -> normed tokens (B, 1 + N, D); with `taps`, also the outputs of those
        blocks (index -1 = the embedding before any block), as the DINO discriminator needs."""
        x = self.embed(self.patch_embed(x))
        feats = [x] if -1 in taps else []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in taps:
                feats.append(x)
        return (self.norm(x), feats) if taps else self.norm(x)


def run_blocks(blocks, x, *args, checkpointing=False):
    """x = block(x, *args) for each block. checkpointing (only while recording gradients): keep each
    block's input and recompute its activations in the backward (torch.utils.checkpoint,
    non-reentrant): less memory, same grads."""
    use = checkpointing and torch.is_grad_enabled()
    for blk in blocks:
        x = checkpoint(blk, x, *args, use_reentrant=False) if use else blk(x, *args)
    return x


def cast_autocast_weights(module, dtype):
    """Cast the weights and biases of every Linear / Conv in `module` to `dtype` (e.g. bfloat16), in
    place, once: the tensors autocast casts on every call (it caches casts only of weights that
    require grad), so under autocast the outputs are unchanged. Frozen networks only, which then
    need autocast (float32 inputs meet bf16 weights)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.to(dtype)
    return module


def bf16_autocast(device, enabled=True):
    """The one autocast of the project: bf16 on CUDA, off elsewhere (CPU runs in float32).
    device: a torch.device or its type ("cuda", "cpu")."""
    device_type = getattr(device, "type", device)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device_type == "cuda")


def sincos_1d(num_positions, dim):
    """Fixed 1-D sin-cos table (num_positions, dim), as `positionalencoding1d` in
    continuous_tokenizer's modelling/sit.py: sin on even and cos on odd channels, frequency
    10000^(-2k/dim) for channel pair k, in float32."""
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table  # (P, D)


# .safetensors by hand: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then the raw little-endian tensor bytes. Released SoftVQ and SiT weights use this
# format.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path):
    """{name: tensor} from a .safetensors file, each header entry checked against its bytes."""
    size = os.path.getsize(path)

    def bad(why):
        return ValueError(f"{path}: not a valid .safetensors file ({why}); download it again")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("no header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise bad(f"header length {n} > file size")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("corrupt header") from None
    if not isinstance(header, dict):
        raise bad("the header is not a mapping")
    # The tensor bytes are memory-mapped (copy-on-write), not read: each tensor is copied out of the
    # page cache once.
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n) if size > 8 + n else bytearray()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(o) for o in info["data_offsets"])
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        if not 0 <= start <= end <= len(data) or min(shape, default=0) < 0:
            raise bad(f"tensor {name!r} has offsets {start}..{end} outside the {len(data)} "
                      f"data bytes")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes:
            raise bad(f"tensor {name!r} of shape {shape} {info['dtype']} needs {nbytes} bytes, "
                      f"its offsets hold {end - start}")
        if end > start:
            count = (end - start) // dtype.itemsize
            t = torch.frombuffer(data, dtype=dtype, offset=start, count=count)
        else:
            t = torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape).clone()
    return out


def load_state_dict_file(path):
    """A plain state dict from `.safetensors` or a `torch.save` file (weights_only: never unpickles
    code). Zip-format files (torch.save since 1.6) are memory-mapped, so N ranks loading one large
    checkpoint do not each hold a copy."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:  # the legacy (pre-1.6) format cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # truncated zip, pickle with code (refused: never unpickled), ...
        raise ValueError(f"{path}: not a readable checkpoint of tensors ({type(e).__name__}); it "
                         f"is truncated or not a weights file, so it is not loaded") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a dict of tensors")
    return sd


def check_state_dict(module, sd, ignore=()):
    """Strict key and shape check with a readable message, then load.
    ignore: key prefixes to drop first."""
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(ignore))} if ignore else sd
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"shape mismatch: {wrong[:3]}" if wrong else ""]
        found = "; ".join(p for p in parts if p)
        raise ValueError(f"checkpoint does not fit {type(module).__name__}: {found} -- is it a "
                         f"checkpoint of this kind and preset?")
    module.load_state_dict(sd, strict=True)
    return module
