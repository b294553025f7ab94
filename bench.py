"""The device check: one command whose sections print as they finish.

    python bench.py                                    # every section, each under its own limit
    python bench.py --sections end_to_end,sit --out runs/bench

Each section runs in a process of its own (its GPU memory and compiled graphs are its own; one past
its limit is cut, and the next starts) and prints one JSON line: `section`, `limit_s`, `seconds`,
then its figures, or `error` (the failing line), or `cut` with what it had measured by then. A
summary table ends the run. The limits add up to 540 s on one cold H100, compilation included. On a
CPU the same command runs every section at toy sizes. Pretrained networks are stand-ins of the
published sizes with random weights: nothing is downloaded. BENCHMARKS.md says what each section
is compared with.

Sections, most important first:
  environment  versions, the torchrun options the README uses, a bf16 matmul and a copy
  end_to_end   train.py (tokenizer: a SIGTERM, then --resume; cache; generator), sample.py, fid.py
               under torchrun (one rank: the process group and DDP), compiled and bf16 on CUDA
  tokenizer    B-32 at 256 px, batch 64: MSE + entropy (the official row), then the whole objective
  sit          SiT-XL/1 on 32 tokens, batch 128, MFU; the fixed cost of a step (clip, AdamW, EMA)
  fid          Inception features, exact fp32 and TF32
  sampling     SDE-250 with CFG at batch 256, decoding included; the ratio to SiT-XL/2 on 256 tokens
"""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import fid
import generator as G
import train
from model import ViT, cast_autocast_weights
from tokenizer import LPIPS, SoftVQVAE, tokenizer_config

# section: its time limit in seconds, on one cold H100 (a CPU runs toy sizes within them)
SECTIONS = {"environment": 15, "end_to_end": 180, "tokenizer": 120, "sit": 100, "fid": 35,
            "sampling": 90}
# dense bf16 TFLOP/s, NVIDIA data sheets (H100 and H200 SXM)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

GPU_SIZES = dict(
    matmul=8192, tokenizer="softvq-b-32", tokenizer_batch=64, full_size_standins=True,
    tokenizer_extra=[], steps=40, sit="sit-xl", sit_tokens=(32, 64), sit_batch=128,
    fixed_cost_steps=10, fid_images=2000, fid_size=256, sampling_tokenizer="softvq-b-32",
    sampling_batch=256, sampling_steps=250, ratio_batch=64, ratio_steps=25, baseline_side=32,
    sd_vae_channels=(512, 512, 256, 128), compile="on", workers=4)
CPU_SIZES = dict(
    matmul=256, tokenizer="softvq-tiny", tokenizer_batch=8, full_size_standins=False,
    tokenizer_extra=["--repa-patch-size", "4"], steps=6,
    sit="sit-tiny", sit_tokens=(16, 16), sit_batch=8, fixed_cost_steps=2, fid_images=16,
    fid_size=64, sampling_tokenizer="softvq-tiny", sampling_batch=4, sampling_steps=6,
    ratio_batch=2, ratio_steps=3, baseline_side=8, sd_vae_channels=(32, 32), compile="off",
    workers=0)


# --------------------------------------------------------------------------------------------------
# Stand-ins for the pretrained networks, random weights in their published layouts.

# torchvision vgg16 `features`: (index, in, out) of the 13 convs; pools sit before 5, 10, 17, 24.
VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
               (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512),
               (24, 512, 512), (26, 512, 512), (28, 512, 512)]


def dinov2_standin(g, width=128, depth=2, official=True):
    """A DINOv2 in the facebookresearch layout (patch 14, 37 x 37 grid at 518 px, mask_token)."""
    sd = {"cls_token": torch.randn(1, 1, width, generator=g),
          "pos_embed": torch.randn(1, 1 + 37 * 37, width, generator=g),
          "patch_embed.proj.weight": torch.randn(width, 3, 14, 14, generator=g) * 0.05,
          "patch_embed.proj.bias": torch.randn(width, generator=g) * 0.1,
          "norm.weight": 1 + 0.1 * torch.randn(width, generator=g),
          "norm.bias": 0.1 * torch.randn(width, generator=g)}
    if official:
        sd["mask_token"] = torch.zeros(1, width)
    shapes = {"norm1.weight": (width,), "norm1.bias": (width,),
              "attn.qkv.weight": (3 * width, width), "attn.qkv.bias": (3 * width,),
              "attn.proj.weight": (width, width), "attn.proj.bias": (width,), "ls1.gamma": (width,),
              "norm2.weight": (width,), "norm2.bias": (width,),
              "mlp.fc1.weight": (4 * width, width), "mlp.fc1.bias": (4 * width,),
              "mlp.fc2.weight": (width, 4 * width),
              "mlp.fc2.bias": (width,), "ls2.gamma": (width,)}
    for i in range(depth):
        for k, s in shapes.items():
            t = torch.randn(*s, generator=g) / math.sqrt(s[-1] if len(s) == 2 else 10)
            sd[f"blocks.{i}.{k}"] = 1 + t if k.startswith("norm") else t
    return sd


def write_objective_standins(folder, full_size=False):
    """Files for the objective's pretrained networks, written into `folder` -> {LossConfig path
    field: file}: VGG16 (He-scaled, so activations neither vanish nor explode) with the LPIPS
    heads, a DINO ViT/16 and a DINOv2; narrow (width 64, a 2-block DINOv2) unless `full_size`
    (DINO ViT-S/16, DINOv2 ViT-L/14)."""
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, c_in, c_out in VGG16_CONVS:
        std = math.sqrt(2 / (9 * c_in))
        vgg[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * std
        vgg[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.1
    # ignored by the loader (shrunk)
    vgg["classifier.0.weight"] = torch.zeros(8, 4)
    vgg["classifier.0.bias"] = torch.zeros(8)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
             for i, c in enumerate(LPIPS.CHANNELS)}
    width = 384 if full_size else 64
    with torch.device("meta"):
        vit = ViT(224, 16, width, 12, width // 64, layerscale=False)
    dino = {k: torch.randn(v.shape, generator=g) * (0.02 if v.ndim > 1 else 0.1)
            for k, v in vit.state_dict().items()}
    teacher = dinov2_standin(g, 1024, 24) if full_size else dinov2_standin(g)
    files = {"vgg_path": vgg, "lpips_path": heads, "dino_path": dino, "dinov2_path": teacher}
    for name, sd in files.items():
        torch.save(sd, os.path.join(folder, name + ".pth"))
    return {name: os.path.join(folder, name + ".pth") for name in files}


def objective_flags(files):
    """{LossConfig path field: file} -> train.py's flags for them: --vgg FILE --lpips FILE ..."""
    return [a for field, path in files.items() for a in (f"--{field.split('_')[0]}", path)]


def write_inception_standin(path):
    """The FID Inception's layout, random weights (features for speed and plumbing, not FID)."""
    torch.manual_seed(0)
    net = fid.InceptionV3FID()
    for p in net.parameters():
        p.data.normal_(0, 0.1 if p.ndim > 1 else 0.01)
    # positive variances for the batch norms
    sd = {k: v.abs() + 1 if k.endswith(".var") else v for k, v in net.state_dict().items()}
    torch.save(sd, path)
    return str(path)


def write_image_folder(folder, n=24, size=32):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = Path(folder) / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.png")
    return str(folder)


def write_latent_standin(folder, n, tokens, dim):
    """A latent cache of normal latents over 1000 classes, in data.write_latent_cache's layout."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(os.path.join(folder, "latents_rank0.npy"),
            rng.standard_normal((n, 2, tokens, dim)).astype(np.float16))
    np.save(os.path.join(folder, "labels_rank0.npy"), np.arange(n) % 1000)
    meta = {"count": n, "ranks": 1, "num_tokens": tokens, "token_dim": dim, "num_classes": 1000,
            "classes": [], "path": None, "config_json": None, "latent_mean": 0.0,
            "latent_std": 1.0}
    Path(folder, "meta.json").write_text(json.dumps(meta))
    return str(folder)


# --------------------------------------------------------------------------------------------------
# FLOPs of the SiT (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, app. B)
def sit_param_split(sit):
    """(per-token, per-sample) parameter counts of a SiT, by name. Once per sample, on the condition
    c (B, D): each block's and the final layer's adaLN modulation, the timestep MLP, the label table
    (229 M of SiT-XL's 675 M). Per token: the token embedding, attention, MLP, output projection and
    the position table (a lookup and an add, counted as weights all the same)."""
    named = list(sit.named_parameters())
    per_sample = sum(p.numel() for n, p in named
                     if n.startswith(("t_embedder.", "y_embedder.")) or ".adaLN_modulation." in n)
    per_token = sum(p.numel() for n, p in named
                    if n.startswith(("x_embedder.", "pos_embed", "final_layer.linear."))
                    or re.match(r"blocks\.\d+\.(attn|mlp)\.", n))
    return per_token, per_sample


def sit_forward_flops(sit):
    """Forward FLOPs of one sample: a weight is one multiply-add (2 FLOPs) per row it acts on, per
    token or once per sample; attention adds q k^T and attn v, L² D multiply-adds each per block."""
    c = sit.config
    per_token, per_sample = sit_param_split(sit)
    return 2 * per_token * c.num_tokens + 2 * per_sample + 4 * c.depth * c.num_tokens ** 2 * c.width


def sit_train_flops(sit, batch):
    """A training step's FLOPs: the backward costs twice the forward, so 3 x."""
    return 3 * sit_forward_flops(sit) * batch


class _VAEResBlock(nn.Module):  # (GroupNorm, SiLU, 3x3 conv) twice; 1x1 shortcut if widths differ
    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(32, c_in, eps=1e-6), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(32, c_out, eps=1e-6), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.body(x)


class _VAEAttention(nn.Module):  # one head over the H x W positions; 1x1 convs for q, k, v, output
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(attended)


class SDVAEDecoder(nn.Module):
    """A decoder of SD-VAE's architecture and size, random weights, for speed only: the f8 KL
    autoencoder's (Rombach et al. 2022; CompVis/latent-diffusion `Decoder`, ch 128, ch_mult
    1,2,4,4): post-quant 1x1 conv, conv_in 4 -> 512, mid res-attention-res, 3 res blocks per level
    of `channels`, a nearest x2 upsample and conv between levels, GroupNorm, SiLU, conv_out -> 3
    (49.49 M parameters). decode() takes SiT-XL/2's 2x2x4 patch tokens (B, (side/2)², 16)."""

    def __init__(self, latent_side=32, channels=(512, 512, 256, 128)):
        super().__init__()
        self.side = latent_side
        self.config = SimpleNamespace(num_tokens=(latent_side // 2) ** 2, token_dim=16,
                                      latent_mean=0.0, latent_std=1 / 0.18215)
        top = channels[0]
        layers = [nn.Conv2d(4, 4, 1), nn.Conv2d(4, top, 3, padding=1), _VAEResBlock(top, top),
                  _VAEAttention(top), _VAEResBlock(top, top)]
        for i, (c_in, c) in enumerate(zip(channels[:1] + channels[:-1], channels)):
            layers += [_VAEResBlock(c_in, c), _VAEResBlock(c, c), _VAEResBlock(c, c)]
            if i < len(channels) - 1:
                layers += [nn.Upsample(scale_factor=2.0), nn.Conv2d(c, c, 3, padding=1)]
        layers += [nn.GroupNorm(32, channels[-1], eps=1e-6), nn.SiLU(),
                   nn.Conv2d(channels[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def decode(self, tokens):  # (B, (side/2)², 2*2*4) -> latent (B, 4, side, side) -> (B, 3, H, W)
        half = self.side // 2
        latent = tokens.reshape(-1, half, half, 2, 2, 4).permute(0, 5, 1, 3, 2, 4)
        return self.net(latent.reshape(-1, 4, self.side, self.side))


# --------------------------------------------------------------------------------------------------
# Timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _elapsed(fn, device, reps=1):
    """Seconds of one call of fn, the mean of `reps` after the GPU's queue is empty."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def _fresh_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device):
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None


class SyntheticImages(torch.utils.data.Dataset):
    """Training items (uint8 image, label, 0) from a few images held in memory: data loading costs
    nothing, so the loop times the training."""

    def __init__(self, size, n=4096):
        self.images = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8)
        self.n = n
        self.epoch = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.images[i % 64], i % 1000, 0


def time_loop(stage, args, device, steps):
    """train.run_steps over `steps` steps, the real loop body (data, the step, EMA, the stop check,
    logging), timed per step by CUDA events (wall clock on a CPU) recorded after each step's EMA;
    the end of the run (latent statistics, a checkpoint) is left out. Warm-up lasts until the last
    step that compiled a graph; host syncs are counted over the steps after it. -> (figures, step
    seconds)."""
    from torch._dynamo.utils import counters
    marks = []
    caught = []
    real = (train.update_ema, train.save, stage.finish)

    def update_and_mark(*a, **k):
        real[0](*a, **k)
        event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if event is not None:
            event.record()
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        marks.append((event, time.perf_counter(), counters["stats"]["unique_graphs"], syncs))
    args.steps = steps
    log = train.Logger(args.out, steps, "bench", 0, 0)
    train.update_ema = update_and_mark
    train.save = lambda *a, **k: None
    stage.finish = lambda rank: None
    start = time.perf_counter()
    try:
        with data.GracefulStop(device) as stop, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            train.run_steps(stage, args, 0, False, 0, 1, log, stop)
            _sync(device)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        train.update_ema = real[0]
        train.save = real[1]
        stage.finish = real[2]
        log.bar.close()
    # the last step that compiled a graph; the steps after it are timed
    graphs = [m[2] for m in marks]
    warm = next(i for i, g in enumerate(graphs) if g == graphs[-1])
    if device.type == "cuda":
        times = [a[0].elapsed_time(b[0]) / 1e3 for a, b in zip(marks[warm:], marks[warm + 1:])]
    else:
        times = [b[1] - a[1] for a, b in zip(marks[warm:], marks[warm + 1:])]
    if not times:
        raise RuntimeError(f"every one of the {steps} steps compiled: no step left to time")
    median = float(np.median(times))
    syncs = (marks[-1][3] - marks[warm][3]) / len(times)
    return {"compile_s": round(marks[warm][1] - start, 2), "timed_steps": len(times),
            "step_ms_median": round(median * 1e3, 2),
            "step_ms_p90": round(float(np.percentile(times, 90)) * 1e3, 2),
            "img_per_s": round(args.batch_size / median, 1),
            "host_syncs_per_step": round(syncs, 2) if device.type == "cuda" else None,
            "graphs": graphs[-1]}, median


@contextlib.contextmanager
def one_rank_group(device):
    """A process group of one rank (NCCL on CUDA), as torchrun gives one process: the stages wrap
    their model in DDP and the stop check all-reduces, as on many GPUs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# The sections: each records its figures as it measures them
def environment(sizes, device, out, record):
    record(torch=torch.__version__, python=platform.python_version(),
           cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
           cpus=os.cpu_count())
    if device.type == "cuda":
        record(gpu=torch.cuda.get_device_name(), nccl=".".join(map(str, torch.cuda.nccl.version())))
    # the torchrun options the README's commands use
    from torch.distributed.run import get_args_parser
    options = {o for action in get_args_parser()._actions for o in action.option_strings}
    used = ("--standalone", "--nproc_per_node", "--signals-to-handle", "--shutdown-timeout")
    record(torchrun_options={o: o in options for o in used})
    n = sizes["matmul"]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    seconds = _elapsed(lambda: a @ b, device, reps=20)
    record(bf16_matmul_tflops=round(2 * n ** 3 / seconds / 1e12, 1))
    big = torch.empty(2 ** 28 if device.type == "cuda" else 2 ** 22, dtype=torch.uint8,
                      device=device)
    copy = torch.empty_like(big)
    copy.copy_(big)
    seconds = _elapsed(lambda: copy.copy_(big), device, reps=10)
    # read and write
    record(copy_gb_per_s=round(2 * big.numel() / seconds / 1e9, 1))


def _launch(cmd, out, name, timeout):
    """A command of the end-to-end section: its output in `out`/name.txt -> (ok, seconds, the last
    line of its error output)."""
    start = time.time()
    with open(os.path.join(out, name + ".txt"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              cwd=Path(__file__).parent)
    lines = Path(out, name + ".txt").read_text().strip().splitlines() or [""]
    errors = [line for line in lines if "error" in line.lower()]
    return proc.returncode, round(time.time() - start, 1), (errors or lines)[-1]


def end_to_end(sizes, device, out, record):
    """The entry points as a user runs them, each under torchrun with one rank (so the process
    group, DDP and, on CUDA, NCCL and compile are in force), on the built-in data and a small image
    folder: tokenizer (GAN phase from step 10, --eval-every 15) sent SIGTERM once step 2 is
    logged (it stops at an agreed step, exit 3, with that step's checkpoint), --resume to the end,
    latent cache, FID statistics, generator with --eval-every, a small .npz, FID."""
    e2e = Path(out, "e2e")
    e2e.mkdir(parents=True, exist_ok=True)
    standins = write_objective_standins(e2e)
    inception = write_inception_standin(e2e / "inception.pt")
    images = write_image_folder(e2e / "images")
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    compile_flag = ["--compile", sizes["compile"]]
    tok = ["train.py", "--stage", "tokenizer", "--preset", "softvq-tiny", "--data-path", "builtin",
           "--global-batch-size", "8", "--steps", "30", "--disc-start", "10",
           "--eval-every", "15", "--eval-images", "16", "--inception", inception,
           "--stats-images", "64", "--log-every", "1",
           "--repa-patch-size", "4", "--num-workers", "2", "--out", str(e2e / "tok"),
           *compile_flag, *objective_flags(standins)]
    results = {}
    # the tokenizer, stopped by SIGTERM once step 2 is logged, then resumed
    start = time.time()
    with open(e2e / "tokenizer_stopped.txt", "w") as log:
        proc = subprocess.Popen(torchrun + tok, stdout=log, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).parent)
        log_path = e2e / "tok" / "log.jsonl"
        while proc.poll() is None and not (log_path.exists() and '"step": 2,' in
                                           log_path.read_text()):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    records = [json.loads(line) for line in open(log_path)] if log_path.exists() else []
    stops = [r for r in records if r.get("event") == "stop"]
    ckpt = e2e / "tok" / "ckpt.pt"
    saved = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None
    results["tokenizer_sigterm"] = {
        "ok": bool(stops) and stops[0]["step"] == saved, "seconds": round(time.time() - start, 1),
        "stop": stops[0] if stops else None, "checkpoint_step": saved}
    record(**results)
    steps = [
        ("tokenizer_resume", torchrun + tok + ["--resume"]),
        ("cache", torchrun + ["train.py", "--stage", "cache", "--tokenizer", str(ckpt),
                              "--data-path", images, "--global-batch-size", "8",
                              "--out", str(e2e / "latents")]),
        ("fid_save_stats", [py, "fid.py", "--save-stats", images, str(e2e / "ref.npz"),
                            "--inception", inception]),
        ("generator", torchrun + [
            "train.py", "--stage", "generator", "--preset", "sit-tiny", "--latents",
            str(e2e / "latents"), "--tokenizer", str(ckpt), "--global-batch-size", "8",
            "--steps", "6", "--eval-every", "3", "--eval-images", "8", "--eval-ref",
            str(e2e / "ref.npz"), "--inception", inception, "--log-every", "1",
            "--num-workers", "2", *compile_flag, "--out", str(e2e / "sit")]),
        ("sample_npz", torchrun + [
            "sample.py", "--ckpt", str(e2e / "sit" / "ckpt.pt"), "--num-fid-samples", "16",
            "--per-proc-batch-size", "8", "--num-sampling-steps", "10", "--cfg-scale", "1.5",
            "--out", str(e2e / "samples.npz")]),
        ("fid", [py, "fid.py", str(e2e / "ref.npz"), str(e2e / "samples.npz"),
                 "--inception", inception]),
    ]
    for name, cmd in steps:
        code, seconds, last = _launch(cmd, e2e, name, timeout=170)
        results[name] = {"ok": code == 0, "seconds": seconds}
        if code:
            results[name]["error"] = last
        record(**results)
    record(all_ok=all(r["ok"] for r in results.values()))


def _tokenizer_args(sizes, out, extra=()):
    return train.parse_args([
        "--stage", "tokenizer", "--preset", sizes["tokenizer"], "--data-path", "builtin",
        "--global-batch-size", str(sizes["tokenizer_batch"]), "--out", str(out),
        "--log-every", "10", "--sample-every", "1000000", "--ckpt-every", "1000000",
        "--preflight", "off", "--num-workers", str(sizes["workers"]), "--compile",
        sizes["compile"], *sizes["tokenizer_extra"], *extra])


def tokenizer(sizes, device, out, record):
    """The tokenizer stage's loop: MSE + entropy (no pretrained files: the official 631 img/s row's
    objective), then the whole objective from step 0 (stand-ins of the published sizes)."""
    files = write_objective_standins(out, full_size=sizes["full_size_standins"])
    whole = objective_flags(files) + ["--disc-start", "0"]
    runs = [("mse_entropy", []), ("full_objective", whole)]
    with one_rank_group(device):
        for name, extra in runs:
            _fresh_memory(device)
            args = _tokenizer_args(sizes, Path(out, name), extra)
            os.makedirs(args.out, exist_ok=True)
            torch.manual_seed(0)
            with contextlib.redirect_stdout(sys.stderr):
                stage = train.TokenizerStage(args, device, 1, train.bf16_autocast(device))
            stage.dataset = SyntheticImages(stage.model.config.image_size)
            figures, _ = time_loop(stage, args, device, sizes["steps"])
            record(**{name: {"preset": args.preset, "batch": args.batch_size, **figures,
                             "peak_gib": _peak_gib(device)}})
            del stage
            torch._dynamo.reset()


def sit(sizes, device, out, record):
    """SiT training from a latent cache, MFU against the data sheet's bf16 peak and the measured
    matmul ceiling; then the fixed cost of a step alone (clip, fused AdamW, EMA over every
    parameter), the floor under every batch size."""
    tokens, dim = sizes["sit_tokens"]
    cache = write_latent_standin(Path(out, "latents"), 4096, tokens, dim)
    args = train.parse_args([
        "--stage", "generator", "--preset", sizes["sit"], "--latents", cache,
        "--global-batch-size", str(sizes["sit_batch"]), "--out", str(Path(out, "sit")),
        "--log-every", "10", "--sample-every", "1000000", "--ckpt-every", "1000000",
        "--preflight", "off", "--num-workers", str(sizes["workers"]),
        "--compile", sizes["compile"]])
    os.makedirs(args.out, exist_ok=True)
    with one_rank_group(device):
        _fresh_memory(device)
        torch.manual_seed(0)
        with contextlib.redirect_stdout(sys.stderr):
            stage = train.GeneratorStage(args, device, 1, train.bf16_autocast(device))
        figures, median = time_loop(stage, args, device, sizes["steps"])
        tflops = sit_train_flops(stage.model, args.batch_size) / median / 1e12
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items()
                     if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
        ceiling = _earlier(out, "environment").get("bf16_matmul_tflops")
        record(training={"preset": args.preset, "tokens": tokens, "batch": args.batch_size,
                         **figures, "model_tflops": round(tflops, 1),
                         "mfu_of_peak": round(tflops / peak, 3) if peak else None,
                         "mfu_of_measured_matmul": round(tflops / ceiling, 3) if ceiling else None,
                         "peak_gib": _peak_gib(device)})
        # the fixed cost: clipping, the fused optimizer and the EMA, with gradients in place
        for p in stage.params:
            p.grad = torch.randn_like(p)
        ema = [[list(m.parameters()), list(m.buffers())] for m in (stage.ema, stage.model)]

        def fixed():
            torch.nn.utils.clip_grad_norm_(stage.params, 1.0)
            stage.optimizer.step()
            train.update_ema(*ema, 0.9999)
        fixed()
        seconds = _elapsed(fixed, device, reps=sizes["fixed_cost_steps"])
        params = sum(p.numel() for p in stage.params)
        record(fixed_cost={"params": params, "ms": round(seconds * 1e3, 2)})


def _earlier(out, section):
    path = Path(out, f"{section}.json")
    return json.loads(path.read_text()) if path.exists() else {}


def fid_features(sizes, device, out, record):
    """fid.py's feature pass over uint8 images (batch 250), exact fp32 then TF32, after a first
    batch (cuDNN's autotuning)."""
    net = fid.load_inception(write_inception_standin(Path(out, "inception.pt")), device)
    n = sizes["fid_images"]
    size = sizes["fid_size"]
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for precision, tf32 in (("fp32", False), ("tf32", True)):
        fid.image_features(images[:min(n, 250)], net, stats=False, keep=True, tf32=tf32)

        def features():
            fid.image_features(images, net, spatial=False, tf32=tf32)
        seconds = _elapsed(features, device)
        record(**{precision: {"images": n, "size": size, "img_per_s": round(n / seconds, 1)}})


def _generation(sit_model, decoder, batch, steps, device):
    """images/s of generate_images as sample.py runs it (bf16 weights cast once and a compiled
    SiT on CUDA; per-sample SDE noise; SDE with CFG 1.75 on t in [0, 0.7]), decoding included; a
    2-step run first compiles the B and 2B graphs."""
    if device.type == "cuda":
        cast_autocast_weights(sit_model, torch.bfloat16)
        cast_autocast_weights(decoder, torch.bfloat16)
    net = torch.compile(sit_model) if device.type == "cuda" else sit_model
    c = decoder.config
    noise, labels, rngs = G.sample_inputs(0, range(batch), c.num_tokens, c.token_dim,
                                          sit_model.config.num_classes, device)

    def run(n):
        sampling = G.Sampling("sde", n, 1.75, guidance_high=0.7)
        return G.generate_images(net, decoder, noise, labels, sampling, rngs)
    start = time.perf_counter()
    run(2)
    _sync(device)
    compile_s = time.perf_counter() - start
    seconds = _elapsed(lambda: run(steps), device)
    return {"compile_s": round(compile_s, 2), "img_per_s": round(batch / seconds, 2),
            "sit_gflop_per_image_call": round(sit_forward_flops(sit_model) / 1e9, 1)}


def sampling(sizes, device, out, record):
    """SDE-250 sampling with CFG and decoding (the official 27.4 img/s row: SiT-XL/1 on B-32's 32
    tokens, batch 256); then, at a smaller batch and fewer steps, the images/s ratio of SiT-XL/1 on
    SoftVQ tokens to SiT-XL/2 on SD-VAE's 32 x 32 x 4 latent (256 tokens of 2 x 2 x 4) with a
    decoder of SD-VAE's size: the paper's generation-throughput claim."""
    def models(decoder_of):
        with torch.device(device):
            decoder = decoder_of().eval()
            c = decoder.config
            sit_model = G.SiT(G.sit_config(sizes["sit"], c.num_tokens, c.token_dim)).eval()
        return sit_model, decoder

    def softvq():
        return SoftVQVAE(tokenizer_config(sizes["sampling_tokenizer"]))

    def sd_vae():
        return SDVAEDecoder(sizes["baseline_side"], sizes["sd_vae_channels"])
    _fresh_memory(device)
    figures = _generation(*models(softvq), sizes["sampling_batch"], sizes["sampling_steps"],
                          device)
    record(sde250_cfg={"batch": sizes["sampling_batch"], "steps": sizes["sampling_steps"],
                       **figures, "peak_gib": _peak_gib(device)})
    ratio = {}
    for name, make in (("softvq", softvq), ("sit_xl2_sd_vae", sd_vae)):
        torch._dynamo.reset()
        _fresh_memory(device)
        ratio[name] = _generation(*models(make), sizes["ratio_batch"], sizes["ratio_steps"],
                                  device)
        record(throughput={"batch": sizes["ratio_batch"], "steps": sizes["ratio_steps"], **ratio})
    ratio["speedup"] = round(ratio["softvq"]["img_per_s"] / ratio["sit_xl2_sd_vae"]["img_per_s"], 2)
    record(throughput={"batch": sizes["ratio_batch"], "steps": sizes["ratio_steps"], **ratio})


RUNNERS = {"environment": environment, "end_to_end": end_to_end, "tokenizer": tokenizer,
           "sit": sit, "fid": fid_features, "sampling": sampling}


# --------------------------------------------------------------------------------------------------
# Running the sections
def run_section(name, out, results_path):
    """One section in this process: its figures go to `results_path` (JSON) as they come."""
    _, _, device = data.setup_distributed()
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    figures = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    def record(**values):
        figures.update(values)
        text = json.dumps(figures).encode()
        data.atomic_write(results_path, lambda f: f.write(text))
    record()
    RUNNERS[name](sizes, device, out, record)


def run_all(names, out):
    """Each section in a process of its own under its limit -> its JSON line; then the summary."""
    rows = []
    for name in names:
        limit = SECTIONS[name]
        results = Path(out, f"{name}.json")
        start = time.time()
        with open(Path(out, f"{name}.log"), "w") as log:
            proc = subprocess.Popen([sys.executable, __file__, "--section", name, "--out", out],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        line = {"section": name, "limit_s": limit, "seconds": round(time.time() - start, 1)}
        line.update(json.loads(results.read_text()) if results.exists() else {})
        if code is None:
            line["cut"] = True
        elif code:
            text = Path(out, f"{name}.log").read_text().strip().splitlines()
            line["error"] = text[-1] if text else f"exit status {code}"
        print(json.dumps(line), flush=True)
        rows.append(line)
    print(f"\n{'section':<12} {'limit_s':>7} {'seconds':>7}  result")
    for row in rows:
        status = "cut" if row.get("cut") else "error" if "error" in row else "ok"
        print(f"{row['section']:<12} {row['limit_s']:>7} {row['seconds']:>7}  {status}")
    return rows


def main(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated sections, in the order to run them")
    p.add_argument("--out", help="folder for the sections' files and logs (default: a new "
                                 "temporary folder)")
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="softvq-bench-")
    os.makedirs(out, exist_ok=True)
    if args.section:
        return run_section(args.section, out, Path(out, f"{args.section}.json"))
    names = args.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    print(json.dumps({"out": out, "limits_s": sum(SECTIONS[n] for n in names)}), flush=True)
    run_all(names, out)


if __name__ == "__main__":
    main()
