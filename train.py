"""Training for both stages, one loop for any world size (nanoGPT style).

    python train.py --stage tokenizer --preset softvq-tiny --data builtin --out runs/tok        # CPU, one process
    torchrun --nproc_per_node=8 train.py --stage tokenizer --preset softvq-b-32 --data /imagenet/train --out runs/b32
    torchrun --nproc_per_node=8 train.py --stage cache --tokenizer runs/b32/ckpt.pt --data /imagenet/train --out runs/b32/latents
    torchrun --nproc_per_node=8 train.py --stage generator --preset sit-xl --latents runs/b32/latents --out runs/sit

DDP comes from torchrun's environment (NCCL on CUDA, gloo on CPU); on CUDA the model is torch.compile'd and runs
under bf16 autocast. Everything random in a step is seeded by (seed, step, rank) and the data order by (seed, epoch),
so `--resume` continues with exactly the losses an uninterrupted run would have had.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from generator import SiT, flow_matching_loss, sit_config
from sample import generate_images, labelled_grid, psnr, to_uint8
from tokenizer import (PRESETS, LossConfig, SoftVQVAE, TokenizerLoss, init_encoder_from_dinov2, load_tokenizer,
                       tokenizer_checkpoint, tokenizer_config)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", required=True, choices=["tokenizer", "cache", "generator"])
    p.add_argument("--preset", help="model preset (tokenizer: softvq-*, generator: sit-*)")
    p.add_argument("--data", help="ImageNet-layout folder, or 'builtin' for the procedural shapes dataset")
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, PNG grids")
    p.add_argument("--image-size", type=int, help="override the preset's image size (a multiple of the patch size)")
    p.add_argument("--steps", type=int, default=250_000)
    p.add_argument("--batch-size", type=int, default=256, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, help="peak learning rate (tokenizer default 1e-4 x batch/256; generator 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=5004, help="tokenizer: linear warmup from 1e-5, then cosine")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="0 = Adam without decay, what the released tokenizers ran; >0 = AdamW on >=2-D weights")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # Tokenizer objective (spec §4-§6; defaults: the official L-64 recipe). A term whose weights file is missing is
    # switched off with a WARNING at start and in the log; a weight of 0 switches it off quietly.
    p.add_argument("--entropy-weight", type=float, default=0.01, help="tokenizer: weight of the entropy regulariser")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight (needs --vgg and --lpips)")
    p.add_argument("--perceptual-warmup", type=int, default=10_000, help="steps of the LPIPS weight's linear ramp")
    p.add_argument("--adversarial-weight", type=float, default=0.2, help="GAN weight (needs --dino)")
    p.add_argument("--disc-start", type=int, default=20_000, help="step at which D and the GAN term start")
    p.add_argument("--lecam-weight", type=float, default=0.001)
    p.add_argument("--consistency-weight", type=float, default=4.0, help="D consistency regularisation")
    p.add_argument("--adaptive-disc-weight", action="store_true", help="VQGAN gradient-norm balance of the GAN term")
    p.add_argument("--repa-weight", type=float, default=0.1, help="alignment to DINOv2 (needs --dinov2)")
    p.add_argument("--repa-patch-size", type=int, default=16, help="patch size of the DINOv2 teacher")
    p.add_argument("--vgg", help="torchvision vgg16-397923af.pth (LPIPS backbone)")
    p.add_argument("--lpips", help="LPIPS v0.1 vgg.pth (linear heads)")
    p.add_argument("--dino", help="dino_deitsmall16_pretrain.pth (discriminator backbone)")
    p.add_argument("--dinov2", help="DINOv2 checkpoint of the REPA teacher (e.g. dinov2_vitl14_pretrain.pth)")
    p.add_argument("--init-encoder", help="DINOv2 checkpoint of the encoder's size to initialise it from")
    p.add_argument("--tokenizer", help="generator/cache: tokenizer checkpoint (ours, or official weights + config.json)")
    p.add_argument("--tokenizer-config", help="config.json of an official tokenizer (default: next to the weights)")
    p.add_argument("--latents", help="generator: latent cache folder written by --stage cache (else encode on the fly)")
    p.add_argument("--time-dist", default="lognormal", choices=["lognormal", "uniform"],
                   help="generator: flow-matching time sampling (logit-normal(0, 1) as the official code)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=5000, help="PNG grid of reconstructions / samples")
    p.add_argument("--ckpt-every", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=8, help="data loader workers per rank")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    args = p.parse_args(argv)
    if args.stage in ("tokenizer", "generator") and not args.preset:
        p.error(f"--stage {args.stage} needs --preset")
    if args.stage == "tokenizer" and args.preset not in PRESETS:
        p.error(f"unknown tokenizer preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    if args.stage in ("tokenizer", "cache") and not args.data or args.stage == "generator" and not (args.data or args.latents):
        p.error(f"--stage {args.stage} needs --data" + (" or --latents" if args.stage == "generator" else ""))
    if args.stage in ("cache", "generator") and not args.tokenizer and not args.latents:
        p.error(f"--stage {args.stage} needs --tokenizer")
    for name in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or args.warmup_steps < 0 or args.weight_decay < 0 or not 0 <= args.ema_decay < 1:
        p.error("--workers, --warmup-steps, --weight-decay must be >= 0 and --ema-decay in [0, 1)")
    return args


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def learning_rate(step, args):
    """timm-style per-iteration schedule (spec §6): linear warmup from 1e-5, cosine to 0.1 x peak; constant for SiT."""
    if args.stage == "generator":
        return args.lr
    if step < args.warmup_steps:
        return 1e-5 + (args.lr - 1e-5) * step / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.1 * args.lr + 0.9 * args.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params, args, device, betas):
    params = [p for p in params if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    if args.weight_decay > 0:  # the intended AdamW: decay matrices, not biases, norms or gains (spec §6, §13.1)
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=args.lr, betas=betas, **fused)
    return torch.optim.Adam(params, lr=args.lr, betas=betas, **fused)


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_p, p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def average_gradients(params, world):
    """Mean of the gradients over ranks, in one flat all-reduce, for parameters outside DDP (projector, D heads)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads]).div_(world)
        dist.all_reduce(flat)
        torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


def save_checkpoint(obj, path):
    """Atomic: write a temp file, then rename over the old one. A kill mid-write leaves the previous file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(rows, path):
    """rows: list of (N, H, W, 3) uint8 arrays, drawn one above the other."""
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).save(path)


class Logger:
    """tqdm bar + JSON-lines log on rank 0. Values are accumulated as tensors and read once per `--log-every`."""

    def __init__(self, args, rank, start_step):
        self.rank, self.path, self.sums, self.count, self.t0 = rank, os.path.join(args.out, "log.jsonl"), {}, 0, None
        self.bar = tqdm(total=args.steps, initial=start_step, disable=rank != 0, dynamic_ncols=True,
                        desc=args.stage)

    def note(self, echo=True, **record):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if echo:
                tqdm.write(" ".join(f"{k}={v}" for k, v in record.items()))

    def add(self, logs):
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach()
        self.count += 1

    def flush(self, step, images_per_step, **extra):
        now = time.time()
        vals = {k: (v / self.count) for k, v in self.sums.items()}
        if dist.is_initialized():  # average over ranks: one small all-reduce per log line
            keys = sorted(vals)
            t = torch.stack([vals[k].float() for k in keys])
            dist.all_reduce(t)
            vals = dict(zip(keys, t / dist.get_world_size()))
        world = dist.get_world_size() if dist.is_initialized() else 1
        rec = {"step": step, **{k: float(v) for k, v in vals.items()}, **extra}
        if "skipped_images" in rec:  # a count, not a mean: unreadable files replaced since the last line, all ranks
            rec["skipped_images"] = round(rec["skipped_images"] * self.count * world)
        if self.t0 is not None:
            rec["img_per_s"] = round(images_per_step * self.count / (now - self.t0), 1)
        self.sums, self.count, self.t0 = {}, 0, now
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.bar.set_postfix(loss=f"{rec.get('loss', 0):.4f}", img_s=rec.get("img_per_s", "-"))


# ---------------------------------------------------------------------------------------------------------------
def train(args):
    rank, world, device = setup_distributed()
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    local_batch = args.batch_size // world
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.stage == "cache":
        return write_cache(args, rank, world, device, autocast)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    resume = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: {ckpt_path} does not exist; start without --resume")
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if resume.get("kind") != args.stage or resume["args"]["preset"] != args.preset:
            raise ValueError(f"--resume: {ckpt_path} is a {resume.get('kind')} {resume['args'].get('preset')} "
                             f"checkpoint, not {args.stage} {args.preset}; use another --out")
    elif os.path.isfile(ckpt_path):
        raise FileExistsError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    tokenizer = criterion = disc_optimizer = None
    warnings = []
    if args.stage == "tokenizer":
        overrides = {"image_size": args.image_size} if args.image_size else {}
        model = SoftVQVAE(tokenizer_config(args.preset, **overrides))
        if args.init_encoder:
            init_encoder_from_dinov2(model.encoder.model, args.init_encoder)
        else:
            warnings.append("the encoder starts from random weights (no --init-encoder DINOv2 checkpoint); "
                            "the released models start from DINOv2")
            print("WARNING: " + warnings[-1], flush=True)
        criterion = TokenizerLoss(model.config, LossConfig(
            entropy_weight=args.entropy_weight, perceptual_weight=args.perceptual_weight,
            perceptual_warmup=args.perceptual_warmup, adversarial_weight=args.adversarial_weight,
            disc_start=args.disc_start, lecam_weight=args.lecam_weight, consistency_weight=args.consistency_weight,
            repa_weight=args.repa_weight, repa_patch_size=args.repa_patch_size,
            adaptive_disc_weight=args.adaptive_disc_weight, vgg_path=args.vgg, lpips_path=args.lpips,
            dino_path=args.dino, dinov2_path=args.dinov2)).to(device)
        warnings += criterion.disabled
        args.lr = args.lr or 1e-4 * args.batch_size / 256  # spec §6: 1e-4 per 256 images
        betas = (0.9, 0.95)
        dataset = data.make_dataset(args.data, model.config.image_size, crop="random", flip=True, seed=args.seed)
        holdout = data.make_dataset(args.data, model.config.image_size, heldout=True, seed=args.seed)
        preview = torch.stack([holdout[i][0] for i in range(min(8, len(holdout)))])
    else:  # generator: SiT on normalised latents, from the cache or encoded on the fly (spec §8)
        if args.latents:
            dataset = data.LatentCache(args.latents, seed=args.seed)
            info = {k: dataset.meta.get(k) for k in ("path", "config_json", "latent_mean", "latent_std")}
            num_tokens, token_dim, num_classes = (dataset.meta[k] for k in ("num_tokens", "token_dim", "num_classes"))
            if args.tokenizer:
                info.update(path=os.path.abspath(args.tokenizer), config_json=args.tokenizer_config)
        else:
            tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_config).to(device).requires_grad_(False)
            tc = tokenizer.config
            dataset = data.make_dataset(args.data, tc.image_size, crop="center", flip=True, seed=args.seed)
            info = {"path": os.path.abspath(args.tokenizer), "config_json": args.tokenizer_config,
                    "latent_mean": tc.latent_mean, "latent_std": tc.latent_std}
            num_tokens, token_dim = tc.num_tokens, tc.token_dim
            num_classes = max(1, len(getattr(dataset, "classes", [])))
        model = SiT(sit_config(args.preset, num_tokens, token_dim, num_classes=num_classes))
        args.lr = args.lr or 1e-4
        betas = (0.9, 0.999)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    extra_params = criterion.generator_parameters() if criterion else []  # the REPA projector trains with the model
    params = list(model.parameters()) + extra_params
    optimizer = make_optimizer(params, args, device, betas)
    if criterion and criterion.discriminator_parameters():  # its own optimizer and clipping (spec §5.3)
        disc_optimizer = make_optimizer(criterion.discriminator_parameters(), args, device, betas)
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        if criterion is not None:
            criterion.load_state_dict(resume["criterion"])
        if disc_optimizer is not None:
            disc_optimizer.load_state_dict(resume["disc_optimizer"])
        step = resume["step"]

    # broadcast_buffers=False: the tokenizer's only buffer is each rank's own codebook-usage log.
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False) \
        if world > 1 else model
    forward = torch.compile(ddp) if device.type == "cuda" else ddp

    sampler = data.ShardedSampler(len(dataset), local_batch, rank, world, args.seed)
    stream = data.batches(dataset, sampler, local_batch, args.workers, step, pin_memory=device.type == "cuda")
    log = Logger(args, rank, step)
    if rank == 0 and resume is None:
        log.note(event="start", stage=args.stage, preset=args.preset, world=world, device=str(device),
                 params=sum(p.numel() for p in model.parameters()), lr=args.lr, steps=args.steps,
                 batch=args.batch_size)
        for message in warnings:  # already printed loudly when found; here they go into the log
            log.note(echo=False, event="warning", message=message)

    def checkpoint():
        if rank == 0:
            extra = dict(step=step, optimizer=optimizer.state_dict(), args=vars(args))
            if args.stage == "tokenizer":
                extra["criterion"] = criterion.state_dict()  # D heads, LeCam EMAs, REPA projector
                if disc_optimizer is not None:
                    extra["disc_optimizer"] = disc_optimizer.state_dict()
                save_checkpoint(tokenizer_checkpoint(model, ema, **extra), ckpt_path)
            else:
                save_checkpoint({"kind": "generator", "config": asdict(model.config), "model": model.state_dict(),
                                 "ema": ema.state_dict(), "tokenizer": info,
                                 "classes": list(getattr(dataset, "classes", [])), **extra}, ckpt_path)

    model.train()
    while step < args.steps:
        batch, labels, skipped = next(stream)
        batch, labels = batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        torch.manual_seed((args.seed * 1_000_003 + step) * 1009 + rank)  # per-step randomness: resumable
        for opt in filter(None, (optimizer, disc_optimizer)):
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args)
        with autocast:
            if args.stage == "tokenizer":
                recon, z, logits = forward(batch)
                loss, logs = criterion.generator_loss(batch, recon, z, logits, step,
                                                      last_layer=model.decoder.to_pixel.model.weight)
            else:
                if tokenizer is not None:
                    with torch.no_grad():
                        batch = tokenizer.encode(batch).float()
                x = (batch - info["latent_mean"]) / info["latent_std"]  # (B, L, d) normalised latents (spec §7)
                loss = flow_matching_loss(forward, x, labels, args.time_dist)
                logs = {}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(extra_params, world)  # DDP averages the model's gradients, not these
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        if criterion is not None and criterion.discriminator_active(step):  # after the generator step (spec §5.3)
            with autocast:
                d_loss, d_logs = criterion.discriminator_loss(batch, recon.detach(), step)
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            average_gradients(criterion.discriminator_parameters(), world)
            logs.update(d_logs, d_grad_norm=torch.nn.utils.clip_grad_norm_(criterion.discriminator_parameters(),
                                                                           args.grad_clip))
            disc_optimizer.step()
        update_ema(ema, model, args.ema_decay)
        step += 1
        log.add({"loss": loss, **logs, "grad_norm": grad_norm,
                 "skipped_images": skipped.to(device, torch.float32, non_blocking=True)})  # one device per all-reduce
        log.bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            extra = {"codebook_usage": round(model.quantize.usage(), 4)} if args.stage == "tokenizer" else {}
            log.flush(step, args.batch_size, lr=learning_rate(step - 1, args), **extra)
        if rank == 0 and (step % args.sample_every == 0 or step == args.steps):
            path = os.path.join(args.out, f"{'recon' if args.stage == 'tokenizer' else 'samples'}_{step:07d}.png")
            if args.stage == "tokenizer":
                with torch.no_grad(), autocast:
                    rec = ema(preview.to(device))
                save_grid([to_uint8(preview), to_uint8(rec[0])], path)
            else:
                decoder = tokenizer or preview_tokenizer(info, device, log)  # loaded once per preview
                if decoder is not None:
                    sample_grid(ema, decoder, info, num_classes, device, args.seed,
                                getattr(dataset, "classes", None) or None, path)
        if step == args.steps and args.stage == "tokenizer" and rank == 0:  # stored with the tokenizer (spec §7)
            mean, std = latent_stats(ema, dataset, device, autocast)
            model.config.latent_mean = ema.config.latent_mean = mean
            model.config.latent_std = ema.config.latent_std = std
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint()
    log.bar.close()
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and args.stage == "tokenizer":
        log.note(event="done", step=step, latent_mean=model.config.latent_mean, latent_std=model.config.latent_std,
                 **evaluate_tokenizer(ema, holdout, device, autocast))
    if dist.is_initialized():
        dist.destroy_process_group()
    return model, ema


def preview_tokenizer(info, device, log):
    """The tokenizer that decodes preview samples when training from the cache (its path is in the cache)."""
    if info.get("path") and os.path.isfile(info["path"]):
        return load_tokenizer(info["path"], info.get("config_json")).to(device)
    log.note(event="warning", message="no tokenizer for the sample grid; pass --tokenizer to get one")
    info["path"] = None
    return None


@torch.no_grad()
def sample_grid(ema, tokenizer, info, num_classes, device, seed, class_names, path, per_class=8):
    """The official in-training preview: Euler ODE, 50 steps, CFG 4.0; one row per class (up to 8 classes)."""
    classes = list(range(min(8, num_classes)))
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), ema.config.num_tokens, ema.config.token_dim, generator=g).to(device)
    images = generate_images(ema, tokenizer, noise, labels, info["latent_mean"], info["latent_std"], sampler="ode",
                             steps=50, cfg=4.0)
    labelled_grid(to_uint8(images), labels.tolist(), class_names).save(path)


@torch.no_grad()
def latent_stats(model, dataset, device, autocast, n=50_000, batch=64):
    """Scalar mean and std of z over (up to n images of) the training set: x = (z - mean) / std for the generator."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum, sum of squares; read once at the end
    for i in range(0, min(n, len(dataset)), batch):
        images = torch.stack([dataset[j][0] for j in range(i, min(i + batch, n, len(dataset)))]).to(device)
        with autocast:
            z = model.encode(images).double()
        sums += torch.stack([torch.tensor(float(z.numel()), device=device, dtype=torch.float64), z.sum(), z.pow(2).sum()])
    count, total, squares = sums.tolist()
    mean = total / count
    return mean, math.sqrt(max(squares / count - mean ** 2, 0.0) * count / (count - 1))


def write_cache(args, rank, world, device, autocast):
    tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_config).to(device)
    tc = tokenizer.config
    dataset = data.make_dataset(args.data, tc.image_size, crop="center", seed=args.seed)
    mean, std = data.write_latent_cache(tokenizer, dataset, args.out, rank, world, device, args.batch_size // world,
                                        args.workers, autocast, extra_meta={
                                            "path": os.path.abspath(args.tokenizer),
                                            "config_json": args.tokenizer_config and os.path.abspath(args.tokenizer_config),
                                            "latent_mean": tc.latent_mean, "latent_std": tc.latent_std})
    if rank == 0:
        print(f"cached {len(dataset)} images x 2 flips to {args.out}; measured latent mean {mean:.6g} std {std:.6g}, "
              f"normalising with the tokenizer's {tc.latent_mean:.6g} / {tc.latent_std:.6g}")
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def evaluate_tokenizer(model, dataset, device, autocast, n=512, batch=64):
    """PSNR of the reconstructions beside the PSNR of predicting the mean image, on the built-in data's held-out
    split (for a folder, which has no split, on its own centre crops)."""
    images = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    recon = []
    for i in range(0, len(images), batch):
        with autocast:
            recon.append(model(images[i:i + batch].to(device))[0].float().cpu())
    mean_image = images.mean(0, keepdim=True).expand_as(images)
    unit = lambda x: (x.clamp(-1, 1) + 1) / 2  # PSNR on the [0, 1] scale
    return {"heldout_psnr": round(psnr(unit(torch.cat(recon)), unit(images)).mean().item(), 3),
            "mean_image_psnr": round(psnr(unit(mean_image), unit(images)).mean().item(), 3)}


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
