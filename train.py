"""Training for both stages, one loop for any world size (nanoGPT style).

    python train.py --stage tokenizer --preset softvq-tiny --data-path builtin --out runs/tok
    torchrun --nproc_per_node=8 train.py --stage tokenizer --preset softvq-b-32 \
        --data-path /imagenet/train --out runs/b32    # then --stage cache, generator (README)

Read top to bottom: the two stages (each builds its models and optimizers and takes one training
step, draws a preview and finishes), `train_step`, the loop (`run_steps`), the set-up around it
(`train`, the preflight, evaluation during training, the latent cache), the training helpers
(optimizer, EMA, DDP and compile, schedules, resume, checkpoints, the log) and the command line.
DDP comes from torchrun's environment (NCCL on CUDA, gloo on CPU); on CUDA the model is
torch.compile'd and runs under bf16 autocast. Every random draw of a step is seeded by (seed, step,
rank) and the data order by (seed, epoch): `--resume` continues with the losses of an uninterrupted
run.
"""
import copy
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import fid
from generator import (EVAL_SAMPLING, GENERATOR_PRESETS, PREVIEW, SiT, flow_matching_loss,
                       generate_images, generator_checkpoint, load_tokenizer_for, sample_inputs,
                       sit_config, tokenizer_info)
from model import bf16_autocast, check_state_dict, load_state_dict_file
from tokenizer import (PRESETS, LossConfig, SoftVQVAE, TokenizerLoss, init_encoder_from_dinov2,
                       load_tokenizer, normalize_latents, tokenizer_checkpoint, tokenizer_config)


# --------------------------------------------------------------------------------------------------
# The stages. Each builds (in this order, so that a seed gives the same initial weights): its model,
# its objective, its data; then the EMA copy and the optimizers; then loads `resume` and wraps the
# model for DDP / compile. What train() uses of a stage, all of it:
#   dataset          the training set (indexable; the loop's sampler shards it over the ranks)
#   model, ema       the trained module and its EMA copy
#   optimizers       every optimizer, for the learning rate of each step
#   warnings         why a term of the objective is off, for the log
#   preview_name     the prefix of the PNG grids
#   learning_rate(step)            the schedule
#   phases(start)                  [(name, first step)] of each objective, for the preflight
#   state_parts()                  [(checkpoint key, module or optimizer)] a step changes
#   step(batch, labels, step_index)  one optimisation step -> logs (device tensors)
#   log_extra()                    more fields of a log line (host values)
#   preview(path)                  write a PNG grid (rank 0)
#   finish(rank)                   after the last step, before the last checkpoint (every rank)
#   checkpoint(step)               the checkpoint dict
#   report(log, step)              the `done` record (rank 0)
#   eval_batches(rank, world, batch)  --eval-every: this rank's (real or None, generated) uint8
#                                  image batches
#   eval_setting                   what the `eval` event records of how they were made
class TokenizerStage:
    """SoftVQ-VAE with the full objective; the discriminator takes its own step after the
    generator's."""
    preview_name = "recon"

    def __init__(self, args, device, world, autocast, resume=None):
        self.args = args
        self.device = device
        self.world = world
        self.autocast = autocast
        overrides = {"image_size": args.image_size} if args.image_size else {}
        model = SoftVQVAE(tokenizer_config(args.preset, **overrides))
        self.warnings = []
        if args.init_encoder:
            init_encoder_from_dinov2(model.encoder.model, args.init_encoder)
        else:
            self.warnings.append("the encoder starts from random weights (no --init-encoder "
                                 "DINOv2 checkpoint); the released models start from DINOv2")
            print("WARNING: " + self.warnings[-1], flush=True)
        self.criterion = TokenizerLoss(model.config, LossConfig(
            entropy_weight=args.entropy_weight, perceptual_weight=args.perceptual_weight,
            perceptual_warmup=args.perceptual_warmup, adversarial_weight=args.adversarial_weight,
            disc_start=args.disc_start, lecam_weight=args.lecam_weight,
            consistency_weight=args.consistency_weight, repa_weight=args.repa_weight,
            repa_patch_size=args.repa_patch_size, adaptive_disc_weight=args.adaptive_disc_weight,
            vgg_path=args.vgg, lpips_path=args.lpips, dino_path=args.dino,
            dinov2_path=args.dinov2)).to(device)
        self.warnings += self.criterion.disabled
        # Under bf16 autocast the frozen nets' Linear/Conv weights go to bf16 once, not re-cast at
        # every call
        bf16 = device.type == "cuda" and args.precision == "bf16"
        frozen_dtype = torch.bfloat16 if bf16 else None
        self.criterion.prepare_frozen(frozen_dtype, compile=args.compile_frozen == "on")
        # its weight's gradients are taken before the backward
        model.set_eager_pixel_head(args.adaptive_disc_weight)
        model.set_grad_checkpointing(args.grad_checkpointing)
        self.dataset = data.make_dataset(args.data, model.config.image_size, crop="random",
                                         flip=True, seed=args.seed)
        # The built-in data has a held-out split; a folder has none: its own centre crops stand in
        self.eval_split = "heldout" if args.data == "builtin" else "train"
        self.eval_setting = {"split": self.eval_split}
        self.holdout = data.heldout_split(self.dataset)
        first = [self.holdout[i][0] for i in range(min(8, len(self.holdout)))]
        self.preview_images = data.to_model_range(torch.stack(first))
        self.model = model.to(device)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        # the REPA projector trains with the model
        self.extra_params = self.criterion.generator_parameters()
        self.params = list(model.parameters()) + self.extra_params
        self.optimizer = make_optimizer(self.params, args.lr, args.weight_decay, device,
                                        (0.9, 0.95))
        self.disc_params = self.criterion.discriminator_parameters()
        self.disc_optimizer = None
        if self.disc_params:
            self.disc_optimizer = make_optimizer(self.disc_params, args.lr, args.weight_decay,
                                                 device, (0.9, 0.95))
        self.optimizers = [o for o in (self.optimizer, self.disc_optimizer) if o is not None]
        if resume is not None:
            restore(resume, self.state_parts(), checkpoint_path(args))
        self.ddp, self.forward = wrap(model, device, args.compile)

    def state_parts(self):
        """(checkpoint key, module or optimizer) of everything a training step changes: the weights,
        the EMA, the optimizers and the criterion (REPA projector, D with its spectral-norm vectors,
        batch-norm statistics and the LeCam EMAs)."""
        parts = [("model", self.model), ("ema", self.ema), ("optimizer", self.optimizer),
                 ("criterion", self.criterion)]
        if self.disc_optimizer is not None:
            parts.append(("disc_optimizer", self.disc_optimizer))
        return parts

    def phases(self, start):
        """(name, first step) of each objective the steps from `start` on train with. The step's
        graph changes once, when D and the GAN term (with the adaptive weight, if set) start at
        --disc-start; LPIPS and REPA are in it from step 0 (the LPIPS ramp only scales its term)."""
        steps = self.args.steps
        gan_start = max(start, self.args.disc_start) if self.criterion.disc is not None else steps
        phases = []
        if start < min(gan_start, steps):
            phases.append(("reconstruction", start))
        if gan_start < steps:
            phases.append(("gan", gan_start))
        return phases

    # images (B, 3, H, W) in [-1, 1]; step_index: the global step -> logs (tensors)
    def step(self, images, labels, step_index):
        K = self.args.grad_accum
        per_micro = []
        recons = []
        for k, x in enumerate(images.chunk(K)):
            with micro_batch_sync(self.ddp, k, K):
                with self.autocast:
                    recon, z, logits = self.forward(x)
                    last_layer = self.model.decoder.to_pixel.model.weight
                    loss, logs = self.criterion.generator_loss(x, recon, z, logits, step_index,
                                                               last_layer=last_layer)
                (loss / K).backward()
            per_micro.append({"loss": loss.detach(), **logs})
            recons.append(recon.detach())
        grad_norm = clip_and_step(self.optimizer, self.params, self.args.grad_clip, self.world,
                                  self.extra_params)
        # D's step follows the generator's, on the detached reconstructions
        if self.criterion.discriminator_active(step_index):
            for k, (x, recon) in enumerate(zip(images.chunk(K), recons)):
                with self.autocast:
                    d_loss, d_logs = self.criterion.discriminator_loss(x, recon, step_index)
                # D is outside DDP: average_gradients all-reduces its gradients once
                d_loss.div(K).backward()
                per_micro[k].update(d_logs)
            d_grad_norm = clip_and_step(self.disc_optimizer, self.disc_params, self.args.grad_clip,
                                        self.world, self.disc_params)
            return {**mean_logs(per_micro), "d_grad_norm": d_grad_norm, "grad_norm": grad_norm}
        return {**mean_logs(per_micro), "grad_norm": grad_norm}

    def learning_rate(self, step):
        return warmup_then_cosine(step, self.args.lr, self.args.warmup_steps, self.args.steps)

    def log_extra(self):
        return {"codebook_usage": round(self.model.quantize.usage(), 4)}

    @torch.no_grad()
    def preview(self, path):  # top row: held-out (or training) images; bottom: EMA reconstructions
        with self.autocast:
            recon = self.ema(self.preview_images.to(self.device))[0]
        n = len(self.preview_images)
        data.labelled_grid(data.to_uint8(torch.cat([self.preview_images, recon.float().cpu()])),
                           [0] * n + [1] * n,
                           [self.eval_split, "recon"]).save(path)

    def eval_batches(self, rank, world, batch):
        """For --eval-every: this rank's share (r, r + world, ...) of the first --eval-images
        held-out images (for a folder: its own centre crops) and their EMA reconstructions, uint8
        (B, 3, H, W) pairs, made as sample.py --images makes them."""
        _, loader = data.rank_loader(self.holdout, rank, world, batch, self.args.workers,
                                     n=self.args.eval_images)
        for images, _, _ in loader:
            real = images.to(self.device)
            with self.autocast:
                recon = self.ema(data.to_model_range(real))[0].float().clamp(-1, 1)
            # a folder's images are uint8; the built-in ones are float, quantised as the recons
            if real.dtype != torch.uint8:
                real = data.to_uint8_tensor(real)
            yield real, data.to_uint8_tensor(recon)

    def finish(self, rank):
        """The generator's latent statistics (released configs: vq_mean, vq_std), on all ranks."""
        mean, std = data.latent_stats(self.ema, self.dataset, self.device, self.autocast, rank,
                                      self.world, self.args.workers,
                                      n=self.args.stats_images)
        for m in (self.model, self.ema):
            m.config.latent_mean = mean
            m.config.latent_std = std

    def report(self, log, step):
        log.note(event="done", step=step, latent_mean=self.model.config.latent_mean,
                 latent_std=self.model.config.latent_std,
                 **fid.reconstruction_psnr(self.ema, self.holdout, self.device, self.autocast,
                                           self.eval_split))

    def checkpoint(self, step):
        extra = dict(step=step, optimizer=self.optimizer.state_dict(), args=vars(self.args),
                     criterion=self.criterion.state_dict())  # D heads, LeCam EMAs, REPA projector
        if self.disc_optimizer is not None:
            extra["disc_optimizer"] = self.disc_optimizer.state_dict()
        return tokenizer_checkpoint(self.model, self.ema, **extra)


class GeneratorStage:
    """SiT flow matching on normalised latents, from the latent cache or encoded on the fly."""
    preview_name = "samples"

    def __init__(self, args, device, world, autocast, resume=None):
        self.args = args
        self.device = device
        self.world = world
        self.autocast = autocast
        self.warnings = []
        self.tokenizer = None
        if args.latents:
            self.dataset = data.LatentCache(args.latents, seed=args.seed)
            meta = self.dataset.meta
            # the cache's tokenizer, unless --tokenizer names where it is now (for the previews)
            path = meta.get("path")
            config_json = meta.get("config_json")
            if args.tokenizer:
                path = args.tokenizer
                config_json = args.tokenizer_config
            self.info = tokenizer_info(path, config_json, meta["latent_mean"], meta["latent_std"])
            num_tokens = meta["num_tokens"]
            token_dim = meta["token_dim"]
            num_classes = meta["num_classes"]
        else:
            self.tokenizer = load_tokenizer(args.tokenizer,
                                            args.tokenizer_config).to(device).requires_grad_(False)
            tc = self.tokenizer.config
            self.dataset = data.make_dataset(args.data, tc.image_size, crop="center", flip=True,
                                             seed=args.seed)
            self.info = tokenizer_info(args.tokenizer, args.tokenizer_config, tc.latent_mean,
                                       tc.latent_std)
            num_tokens = tc.num_tokens
            token_dim = tc.token_dim
            num_classes = max(1, len(getattr(self.dataset, "classes", [])))
        self.classes = list(getattr(self.dataset, "classes", []))
        self.eval_setting = {"sampling": asdict(EVAL_SAMPLING), "seed": args.seed}
        model = SiT(sit_config(args.preset, num_tokens, token_dim, num_classes=num_classes))
        model.set_grad_checkpointing(args.grad_checkpointing)
        self.model = model.to(device)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.params = list(model.parameters())
        self.optimizer = make_optimizer(self.params, args.lr, args.weight_decay, device,
                                        (0.9, 0.999))
        self.optimizers = [self.optimizer]
        if resume is not None:
            restore(resume, self.state_parts(), checkpoint_path(args))
        self.ddp, self.forward = wrap(model, device, args.compile)
        # Only rank 0 draws the previews: unless every rank samples for --eval-every, the other
        # ranks do not hold a second tokenizer in GPU memory
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.decoder = self.tokenizer
        if self.decoder is None and (rank == 0 or args.eval_every):
            self.decoder = self._preview_tokenizer()

    def state_parts(self):
        """(checkpoint key, module or optimizer) of everything a training step changes."""
        return [("model", self.model), ("ema", self.ema), ("optimizer", self.optimizer)]

    def phases(self, start):  # one objective throughout
        return [("flow-matching", start)] if start < self.args.steps else []

    def _preview_tokenizer(self):
        """The tokenizer that decodes the preview samples of a cached run, loaded once (EMA weights)
        and checked to fit the latents at the start, not at the first preview."""
        if self.info.get("path") and os.path.isfile(self.info["path"]):
            return load_tokenizer_for(self.model, self.info).to(self.device)
        self.warnings.append(f"no tokenizer at {self.info.get('path')} for the sample grids; pass "
                             "--tokenizer")
        print("WARNING: " + self.warnings[-1], flush=True)
        return None

    # batch: latents (B, L, d) or images (B, 3, H, W); step_index unused (one objective) -> logs
    def step(self, batch, labels, step_index):
        K = self.args.grad_accum
        losses = []
        for k, (x, y) in enumerate(zip(batch.chunk(K), labels.chunk(K))):
            with micro_batch_sync(self.ddp, k, K):
                with self.autocast:
                    if self.tokenizer is not None:  # images -> latents on the fly
                        with torch.no_grad():
                            x = self.tokenizer.encode(x).float()
                    # (B, L, d)
                    x = normalize_latents(x, self.info["latent_mean"], self.info["latent_std"])
                    loss = flow_matching_loss(self.forward, x, y, self.args.time_dist)
                (loss / K).backward()
            losses.append(loss.detach())
        grad_norm = clip_and_step(self.optimizer, self.params, self.args.grad_clip, self.world)
        return {"loss": sum(losses) / K, "grad_norm": grad_norm}

    @torch.no_grad()
    def preview(self, path, per_class=8):
        """Grid of EMA samples, one row per class (up to 8): Euler ODE, 50 steps, CFG 4.0, as
        train_sit.py does."""
        if self.decoder is None:
            return
        classes = list(range(min(8, self.ema.config.num_classes)))
        labels = torch.tensor(classes, device=self.device).repeat_interleave(per_class)
        rng = torch.Generator().manual_seed(self.args.seed)
        noise = torch.randn(len(labels), self.ema.config.num_tokens, self.ema.config.token_dim,
                            generator=rng)
        images = generate_images(self.ema, self.decoder, noise.to(self.device), labels, PREVIEW,
                                 amp=self.args.precision == "bf16")
        data.labelled_grid(data.to_uint8(images), labels.tolist(), self.classes or None).save(path)

    def eval_batches(self, rank, world, batch):
        """For --eval-every: this rank's share (k = r, r + world, ...) of --eval-images EMA
        samples, uint8 (B, 3, H, W), those of `sample.py --num-fid-samples K --seed SEED` with the
        EVAL_SAMPLING settings: sample k's noise, label and SDE noise come from (seed, k) (on a CPU
        the same images bit for bit; on a GPU up to the kernels' rounding at another batch)."""
        c = self.ema.config
        indices = list(range(rank, self.args.eval_images, world))
        for i in range(0, len(indices), batch):
            noise, labels, rngs = sample_inputs(self.args.seed, indices[i:i + batch], c.num_tokens,
                                                c.token_dim, c.num_classes, self.device)
            images = generate_images(self.ema, self.decoder, noise, labels, EVAL_SAMPLING, rngs,
                                     amp=self.args.precision == "bf16")
            yield None, data.to_uint8_tensor(images)

    def learning_rate(self, step):
        return warmup_then_flat(step, self.args.lr, self.args.warmup_steps, self.args.steps)

    def log_extra(self):  # no codebook to log
        return {}

    def finish(self, rank):  # nothing to measure at the end: the latents are the tokenizer's
        pass

    def report(self, log, step):  # no held-out metric of its own (sample.py and fid.py score it)
        pass

    def checkpoint(self, step):
        return generator_checkpoint(self.model, self.ema, self.info, self.classes, step=step,
                                    optimizer=self.optimizer.state_dict(), args=vars(self.args))


# --------------------------------------------------------------------------------------------------
# One step, and the loop.
def train_step(stage, args, batch, labels, step, rank):
    """One optimisation step at global step `step`: randomness seeded by (seed, step, rank), so that
    a resumed run repeats it; the schedule's learning rate; the stage's step (the EMA follows in the
    loop). -> (logs, finite: a device bool of the loss and gradient norm, no host sync)."""
    torch.manual_seed(data.seed_for(args.seed, step, rank))
    for opt in stage.optimizers:
        for group in opt.param_groups:
            group["lr"] = stage.learning_rate(step)
    logs = stage.step(batch, labels, step)
    finite = torch.isfinite(torch.stack([logs["loss"].float(), logs["grad_norm"].float()])).all()
    return logs, finite


def run_steps(stage, args, step, resumed, rank, world, log, stop, evaluation=None):
    """The training loop from `step` to --steps -> (the last step, whether a signal stopped it).
    On a stop every rank ends after the same step, and its checkpoint is written. evaluation:
    with --eval-every, the Inception and the FID reference (see evaluate)."""
    device = stage.device
    local_batch = args.batch_size // world
    sampler = data.ShardedSampler(len(stage.dataset), local_batch, rank, world, args.seed)
    stream = data.batches(stage.dataset, sampler, local_batch, args.workers, step,
                          pin_memory=device.type == "cuda")
    # 1 + first step with a non-finite loss; 0 = none
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    # Listed once: listing a module's tensors costs about 1 ms a step
    ema = [[list(m.parameters()), list(m.buffers())] for m in (stage.ema, stage.model)]
    saved_at = step if resumed else None
    while step < args.steps:
        if stop.should_stop(step):
            save_at_stop(stage, args, step, saved_at, rank, log, nonfinite)
            return step, True
        batch, labels, skipped = next(stream)
        # uint8 images: [-1, 1] on the device
        batch = data.to_model_range(batch.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        logs, finite = train_step(stage, args, batch, labels, step, rank)
        # on the device: no sync
        nonfinite = torch.where((nonfinite == 0) & ~finite, step + 1, nonfinite)
        update_ema(*ema, args.ema_decay)
        step += 1
        log.add({**logs, "skipped_images": skipped.to(device, torch.float32, non_blocking=True)})
        log.bar.update(1)
        last = step == args.steps
        if step % args.log_every == 0 or last:
            log_line(stage, args, step, log, nonfinite)
        if rank == 0 and (step % args.sample_every == 0 or last):
            stage.preview(os.path.join(args.out, f"{stage.preview_name}_{step:07d}.png"))
        if last:
            stage.finish(rank)
        evaluating = evaluation is not None and (step % args.eval_every == 0 or last)
        kept = args.keep_every and step % args.keep_every == 0
        # an evaluation follows its step's checkpoint: one that fails or is killed loses no step
        if step % args.ckpt_every == 0 or last or evaluating or kept:
            save(stage, args, step, rank, nonfinite)
            saved_at = step
        if evaluating:
            evaluate(stage, args, evaluation, step, rank, world, log)
    return step, False


def log_line(stage, args, step, log, nonfinite):
    """The log line of the steps since the last one (the ranks' means), then the divergence check
    (a host sync: only at log time)."""
    log.flush(step, args.batch_size, lr=stage.learning_rate(step - 1), **stage.log_extra())
    check_finite(nonfinite, step, checkpoint_path(args))


def save(stage, args, step, rank, nonfinite):
    """The checkpoint of `step` (rank 0 writes it), never of a diverged run; every --keep-every
    steps also kept under a name of its own."""
    check_finite(nonfinite, step, checkpoint_path(args))
    if rank == 0:
        save_checkpoint(stage.checkpoint(step), checkpoint_path(args))
        if args.keep_every and step % args.keep_every == 0:
            keep_checkpoint(checkpoint_path(args), step)


def save_at_stop(stage, args, step, saved_at, rank, log, nonfinite):
    """A signal stopped the loop after `step`: the log line of the steps since the last one, then
    that step's checkpoint, unless it was just written (and so passed the divergence check)."""
    if log.count:
        log_line(stage, args, step, log, nonfinite)
    if saved_at != step:
        save(stage, args, step, rank, nonfinite)


# --------------------------------------------------------------------------------------------------
# Set-up around the loop: the run from start to end, the preflight, evaluation during training and
# the latent cache.
def train(args):
    """--stage tokenizer or generator, on every rank: refuse bad input before any work, build the
    stage, the preflight, the loop, then the end of the run (or of a stopped one: exit STOPPED).
    -> (model, EMA)."""
    bf16 = args.precision == "bf16"
    rank, world, device = data.setup_distributed(timeout_s=args.timeout, tf32=bf16)
    autocast = bf16_autocast(device, bf16)
    if args.stage == "cache":
        return cache_latents(args, rank, world, device, autocast)
    lock = None
    try:
        # every refusal before any work, printed once (rank 0); rank 0 then holds OUT's lock until
        # the run ends, so a second command on the same folder is refused
        with data.refusals_once():
            if args.batch_size % (world * args.grad_accum):
                raise ValueError(f"--global-batch-size {args.batch_size} is not divisible by the "
                                 f"{world} ranks x --grad-accum {args.grad_accum}")
            # the folder's lock first: a run that holds it is the reason to refuse, whatever else
            lock = prepare_out(args, rank, ("ckpt.pt", "log.jsonl", "log.png"))
            resume = load_resume(args)
            # --eval-every's files, read now: a missing or wrong one ends the run before any work
            evaluation = None
            if args.eval_every:
                reference = fid.read_reference(args.eval_ref) if args.eval_ref else None
                evaluation = {"net": fid.load_inception(args.inception, device),
                              "reference": reference}
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        Stage = TokenizerStage if args.stage == "tokenizer" else GeneratorStage
        stage = Stage(args, device, world, autocast, resume)
        with data.refusals_once():
            if evaluation and isinstance(stage, GeneratorStage) and stage.decoder is None:
                raise ValueError("--eval-every needs the tokenizer to decode the samples: pass "
                                 "--tokenizer")
        step = resume["step"] if resume else 0
        resumed = resume is not None
        # The stage holds what it needs; the (memory-mapped) checkpoint is not kept for the run
        del resume
        log = Logger(args.out, args.steps, args.stage, rank, step)
        if not resumed:
            params = sum(p.numel() for p in stage.model.parameters())
            log.note(event="start", stage=args.stage, preset=args.preset, world=world,
                     device=str(device), params=params, lr=args.lr, steps=args.steps,
                     batch=args.batch_size)
            # already printed loudly when found; here they go into the log
            for message in stage.warnings:
                log.note(echo=False, event="warning", message=message)
        else:  # the log holds the steps a killed run made after this checkpoint: they repeat
            log.note(event="resume", step=step)
        stage.model.train()
        stop = data.GracefulStop(device, args.out)
        try:
            with stop:
                if args.preflight == "on":
                    preflight(stage, args, step, resumed, rank, world, device, log)
                step, stopped = run_steps(stage, args, step, resumed, rank, world, log, stop,
                                          evaluation)
        finally:  # the bar's line ends before any error message
            log.bar.close()
        if dist.is_initialized():
            dist.barrier()
        if stopped:
            end_stopped_run(args, stop, step, rank, log)
        end_run(stage, args, step, rank, log)
        return stage.model, stage.ema
    finally:
        if lock is not None:
            lock.close()


def end_run(stage, args, step, rank, log):
    """After the last step, on every rank: the `done` record and log.png (rank 0)."""
    if rank == 0:
        stage.report(log, step)
        plot_log(log.path, os.path.join(args.out, "log.png"))
    if dist.is_initialized():
        dist.destroy_process_group()


def end_stopped_run(args, stop, step, rank, log):
    """After a signal, on every rank, the checkpoint of `step` written: the `stop` event, log.png,
    one line on how to continue (rank 0), then exit status STOPPED, all ranks together."""
    log.note(echo=False, event="stop", signal=stop.name, step=step,
             seconds=round(time.time() - stop.since, 3))
    if rank == 0:
        plot_log(log.path, os.path.join(args.out, "log.png"))
        print(f"stopped by {stop.name} at step {step}: {checkpoint_path(args)} holds it; continue "
              f"with the same command and --resume", file=sys.stderr, flush=True)
    if dist.is_initialized():
        # The checkpoint is written: nothing is left to lose. Once one worker has exited (status
        # 3), torchrun sends SIGTERM to the others, which are exiting too
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(data.STOPPED)


def preflight(stage, args, start, resumed, rank, world, device, log):
    """Before the first step, one full training step of each phase the run will enter
    (stage.phases), through the same compiled, DDP-wrapped step and batch size: an out-of-memory, a
    compile failure or a non-finite loss in a later phase (the GAN from --disc-start) ends the run
    in its first minutes, not hours in. Then every state a step changes is put back
    (stage.state_parts: weights, optimizers, criterion buffers; the RNG), so the run's losses are
    those of --preflight off, bit for bit. Logs one `preflight` event."""
    phases = stage.phases(start)
    if not phases:
        return
    # The EMA is not updated here. The rest is put back from a file read through a memory map, so
    # that the ranks of a node share one copy in the page cache and hold none of their own: the
    # resumed checkpoint, or the initial state (the same on every rank) that rank 0 writes
    parts = [(name, obj) for name, obj in stage.state_parts() if obj is not stage.ema]
    saved = checkpoint_path(args) if resumed else os.path.join(args.out, PREFLIGHT_STATE)
    if rank == 0 and not resumed:
        save_checkpoint({name: obj.state_dict() for name, obj in parts}, saved)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    # A batch of the run's size read from the dataset itself: the run's data stream is not touched
    local_batch = args.batch_size // world
    n = len(stage.dataset)
    batch, labels, _ = data.collate([stage.dataset[(rank * local_batch + i) % n]
                                     for i in range(local_batch)])
    batch = data.to_model_range(batch.to(device))
    labels = labels.to(device)
    report = []
    for name, phase_step in phases:
        where = f"preflight: the {name} phase (the run enters it at step {phase_step})"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        try:
            _, finite = train_step(stage, args, batch, labels, phase_step, rank)
            finite = finite.to(torch.int32)
            if world > 1:  # every rank learns whether any rank's loss went non-finite
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            # A host sync; before the run it costs nothing
            finite = bool(finite)
        except torch.cuda.OutOfMemoryError:
            raise ValueError(f"{where} runs out of GPU memory at {local_batch} images per rank; "
                             "lower --global-batch-size or add --grad-accum or "
                             "--grad-checkpointing") from None
        except Exception as e:
            trace = os.path.join(args.out, f"preflight_error_rank{rank}.txt")
            with open(trace, "w") as f:
                traceback.print_exc(file=f)
            message = " ".join(str(e).split())[:300]
            raise ValueError(f"{where} fails: {type(e).__name__}: {message} "
                             f"(traceback: {trace})") from None
        record = {"phase": name, "step": phase_step, "seconds": round(time.time() - t0, 3),
                  "finite": finite}
        if device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
        report.append(record)
        if not finite:
            log.note(event="preflight", phases=report)
            raise FloatingPointError(f"{where}: the loss or gradient norm is not finite. Lower "
                                     "--lr, or check the data and the weights files")
    if dist.is_initialized():
        dist.barrier()
    restore(load_state_dict_file(saved), parts, saved)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and not resumed:
        os.remove(saved)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    log.note(event="preflight", phases=report)


def evaluate(stage, args, evaluation, step, rank, world, log):
    """--eval-every, on every rank: the stage's evaluation images (stage.eval_batches, EMA
    weights) scored by fid.evaluate_batches, logged as an `eval` event with its seconds. The
    generator's FID is against --eval-ref; the tokenizer's (rFID) against its real held-out images,
    whose statistics the first evaluation takes and keeps in `evaluation`."""
    start = time.time()
    batch = max(1, args.batch_size // (world * args.grad_accum))
    pairs = isinstance(stage, TokenizerStage)
    scores, evaluation["reference"] = fid.evaluate_batches(
        stage.eval_batches(rank, world, batch), evaluation["net"], evaluation["reference"], pairs)
    log.note(event="eval", step=step, **stage.eval_setting, **scores,
             seconds=round(time.time() - start, 3))


def cache_latents(args, rank, world, device, autocast):
    """--stage cache: every image and its flip encoded once; stopped by a signal, the same command
    continues where each rank stopped (data.write_latent_cache)."""
    lock = None
    try:
        with data.refusals_once():
            if args.batch_size % world:
                raise ValueError(f"--global-batch-size {args.batch_size} is not divisible by the "
                                 f"{world} ranks")
            lock = prepare_out(args, rank, ("meta.json",))
            if os.path.isfile(os.path.join(args.out, "meta.json")) and not args.overwrite:
                raise FileExistsError(f"{args.out} holds a complete latent cache; pass --overwrite "
                                      f"to replace it or choose another --out")
        tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_config).to(device)
        tc = tokenizer.config
        dataset = data.make_dataset(args.data, tc.image_size, crop="center", seed=args.seed)
        info = tokenizer_info(args.tokenizer, args.tokenizer_config, tc.latent_mean, tc.latent_std)
        with data.GracefulStop(device, args.out) as stop:
            moments = data.write_latent_cache(tokenizer, dataset, args.out, rank, world, device,
                                              args.batch_size // world, args.workers, autocast,
                                              extra_meta=info, stop=stop, fresh=args.overwrite)
        if moments is None:
            if rank == 0:
                print(f"stopped by a signal; the images encoded so far are kept in {args.out}: "
                      f"the same command continues", file=sys.stderr, flush=True)
            if dist.is_initialized():
                dist.destroy_process_group()
            sys.exit(data.STOPPED)
        if rank == 0:
            print(f"cached {len(dataset)} images x 2 flips to {args.out}; measured latent mean "
                  f"{moments[0]:.6g} std {moments[1]:.6g}, normalising with the tokenizer's "
                  f"{tc.latent_mean:.6g} / {tc.latent_std:.6g}")
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        if lock is not None:
            lock.close()


# --------------------------------------------------------------------------------------------------
# Training helpers: the optimizer, the EMA, gradients outside DDP, DDP and compile, the
# learning-rate schedules, resuming, checkpoints, the divergence check and the log with its plot.
def make_optimizer(params, lr, weight_decay, device, betas):
    """Adam, or with weight_decay > 0 AdamW that decays the matrices only; fused on CUDA."""
    params = [p for p in params if p.requires_grad]
    # CUDA: fused. CPU: foreach, bit-identical to the per-tensor loop, faster (fused rounds
    # otherwise: BENCHMARKS.md)
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    # the intended AdamW: decay matrices, not biases, norms or gains (README, Differences)
    if weight_decay > 0:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **impl)
    return torch.optim.Adam(params, lr=lr, betas=betas, **impl)


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


def wrap(model, device, compile):
    """-> (DDP module or the model, what the training step calls). DDP over the process group
    (under torchrun, one process too), then torch.compile (--compile; auto = on CUDA).
    broadcast_buffers=False: the only buffer (the tokenizer's codebook-usage log) is each rank's
    own."""
    ddp = model
    if dist.is_initialized():
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DDP(model, device_ids=device_ids, broadcast_buffers=False,
                  bucket_cap_mb=DDP_BUCKET_MB, gradient_as_bucket_view=True)
    if compile == "on" or (compile == "auto" and device.type == "cuda"):
        return ddp, torch.compile(ddp)
    return ddp, ddp


def warmup_then_cosine(step, lr, warmup_steps, steps):
    """The released tokenizer schedule (timm's, per step): linear warmup from 1e-5 to lr over
    warmup_steps, then a cosine down to 0.1 x lr at `steps`."""
    if step < warmup_steps:
        return 1e-5 + (lr - 1e-5) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 0.1 * lr + 0.9 * lr * cosine


def warmup_then_flat(step, lr, warmup_steps, steps):
    """SiT's schedule: a flat lr (the released recipe has no warmup, the default --warmup-steps
    0); with warmup steps, the tokenizer's linear warmup from 1e-5 first."""
    if step < warmup_steps:
        return warmup_then_cosine(step, lr, warmup_steps, steps)
    return lr


# Settings that do not change the trajectory of a run; every other flag must match the checkpoint's
# on --resume.
RESUME_FREE = {"out", "resume", "allow_changes", "overwrite", "log_every", "sample_every",
               "ckpt_every", "keep_every", "workers", "compile", "compile_frozen", "preflight",
               "timeout", "eval_every", "eval_images", "eval_ref", "inception"}


# The initial state a new run's preflight puts back (written and removed by rank 0)
PREFLIGHT_STATE = "preflight_state.pt"


def checkpoint_path(args):
    return os.path.join(args.out, "ckpt.pt")


def record_crash(args, error):
    """A rank of several failed: its crash record in --out (data.GracefulStop) and a log event."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or not os.path.isdir(args.out):
        return
    rank = int(os.environ.get("RANK", 0))
    message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    data.record_crash(args.out, rank, message)
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
        f.write(json.dumps({"event": "crash", "rank": rank, "error": message}) + "\n")


def load_resume(args):
    """The checkpoint to continue (with --resume), after checking it is a training checkpoint of
    this run's kind and preset, made with the same settings (or --allow-changes) but for the flags
    in RESUME_FREE; None for a new run, whose folder must not hold a checkpoint."""
    ckpt_path = checkpoint_path(args)
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
    # each setting under its first name on the command line
    flags = {a.dest: a.option_strings[0] for a in make_parser()._actions if a.option_strings}
    changed = [f"{flags.get(k, k)} {v!r} (checkpoint: {stored[k]!r})"
               for k, v in sorted(vars(args).items())
               if k not in RESUME_FREE and k in stored and stored[k] != v]
    if changed and not args.allow_changes:
        raise ValueError(f"--resume with other settings than {ckpt_path} was made with: "
                         f"{', '.join(changed)}; the run would not continue as it started. Use the "
                         "same flags, or add --allow-changes")
    return resume


def restore(resume, parts, ckpt_path):
    """Load (name, module or optimizer) pairs from the resume checkpoint (read from `ckpt_path`);
    one of another shape is a user error."""
    for name, obj in parts:
        try:
            if isinstance(obj, torch.nn.Module):
                check_state_dict(obj, resume[name])
            else:
                obj.load_state_dict(resume[name])
        except (KeyError, ValueError, RuntimeError) as e:
            reason = " ".join(str(e).split())[:200]
            raise ValueError(f"--resume: the {name} in {ckpt_path} does not fit this run "
                             f"({reason}); use another --out") from None


def keep_checkpoint(ckpt_path, step):
    """ckpt.pt, just written, kept as ckpt_STEP.pt beside it, never overwritten (DiT's numbered
    checkpoints): a hard link (the next save renames a new file over ckpt.pt and leaves this one
    be), or a copy where the filesystem has no links. A failure is one error, ckpt.pt being safe."""
    kept = os.path.join(os.path.dirname(ckpt_path), f"ckpt_{step:07d}.pt")
    if os.path.exists(kept):
        return
    try:
        try:
            os.link(ckpt_path, kept)
        except OSError:
            with open(ckpt_path, "rb") as source:
                data.atomic_write(kept, lambda f: shutil.copyfileobj(source, f))
    except OSError as e:
        message = (f"{ckpt_path} holds step {step}, but keeping it as {kept} failed "
                   f"({e.strerror}); make room or fix the folder, then --resume")
        raise OSError(e.errno, message) from None


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


def prepare_out(args, rank, names):
    """On rank 0: refuse an output folder (--out) that cannot be written, lock it (-> the lock
    file, held for the run's life; None on the other ranks), clean what killed writes of `names`
    left and an earlier run's crash records; --overwrite removes `names`."""
    if rank != 0:
        return None
    data.check_writable(args.out)
    lock = data.lock_folder(os.path.join(args.out, ".lock"))
    # an earlier run's crash records, and what a run killed in its preflight or while keeping a
    # checkpoint left; with --overwrite, the kept checkpoints of the run it replaces
    for name in os.listdir(args.out):
        left = re.fullmatch(r"crash_rank\d+\.txt|ckpt_\d+\.pt\.tmp\d+", name)
        kept = re.fullmatch(r"ckpt_\d+\.pt", name) and args.overwrite
        if left or kept or name == PREFLIGHT_STATE:
            os.remove(os.path.join(args.out, name))
    for name in names:
        path = os.path.join(args.out, name)
        data.remove_stale_temps(path)
        if args.overwrite and os.path.isfile(path):
            os.remove(path)
    return lock


def save_checkpoint(obj, path):
    """Atomic torch.save of plain dicts of tensors and numbers: they load with
    torch.load(weights_only=True)."""
    data.atomic_write(path, lambda f: torch.save(obj, f))


class Logger:
    """tqdm bar + JSON-lines log on rank 0. Values are accumulated as tensors and read once per
    `--log-every`."""

    def __init__(self, out, steps, desc, rank, start_step):
        self.rank = rank
        self.path = os.path.join(out, "log.jsonl")
        # running sums of the logged tensors since the last line, and how many steps they hold
        self.sums = {}
        self.count = 0
        # wall-clock time of the last logged line (None until the first step)
        self.t0 = None
        self.bar = tqdm(total=steps, initial=start_step, disable=rank != 0, dynamic_ncols=True,
                        desc=desc)

    def note(self, echo=True, **record):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
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
        # JSON has no NaN or infinity: a diverged value is logged as null (check_finite then
        # stops the run)
        means = {k: float(v) if math.isfinite(v) else None for k, v in vals.items()}
        rec = {"step": step, **means, **extra}
        # a count, not a mean: unreadable files replaced since the last line, all ranks
        if "skipped_images" in rec:
            rec["skipped_images"] = round(rec["skipped_images"] * self.count * world)
        if self.t0 is not None:
            rec["img_per_s"] = round(images_per_step * self.count / (now - self.t0), 1)
        self.sums = {}
        self.count = 0
        self.t0 = now
        self.note(echo=False, **rec)
        loss = rec.get("loss")
        self.bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}",
                             img_s=rec.get("img_per_s", "-"))


# The curves drawn beside log.jsonl at the end of a run: the training loss of each log line and
# the numbers of each `eval` event (--eval-every), one panel each, against the step.
PLOT_KEYS = ("loss", "rfid", "fid", "psnr", "ssim_official")
PLOT_COLOUR = (31, 119, 180)


def plot_log(log_path, png_path, width=640, height=160):
    """log.jsonl -> a PNG with one panel per curve of PLOT_KEYS that the log has (a resumed run's
    repeated steps keep their last value; a diverged value, logged as null, is left out). A picture
    never fails a run: a problem drawing it is a warning."""
    try:
        _draw_log(log_path, png_path, width, height)
    except (OSError, ValueError) as e:
        print(f"WARNING: {png_path} not drawn: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)


def _draw_log(log_path, png_path, width, height):
    curves = {}
    with open(log_path) as f:
        for line in f:
            # a line cut short by a kill or a full disk is left out
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "step" not in record or record.get("event") not in (None, "eval"):
                continue
            for key in PLOT_KEYS:
                if isinstance(record.get(key), (int, float)):
                    curves.setdefault(key, {})[record["step"]] = record[key]
    if not curves:
        return
    steps = [s for points in curves.values() for s in points]
    first = min(steps)
    last = max(max(steps), first + 1)
    # the plotting area of a panel, inside margins for the labels
    left = 64
    top = 16
    plot_w = width - left - 12
    plot_h = height - top - 24
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    for i, (key, points) in enumerate(curves.items()):
        y0 = i * height + top
        low = min(points.values())
        high = max(points.values())
        # a flat curve: a band around its value
        if high <= low:
            high = low + max(abs(low), 1.0) * 1e-6
        xy = [(left + (s - first) / (last - first) * plot_w,
               y0 + (high - v) / (high - low) * plot_h) for s, v in sorted(points.items())]
        draw.rectangle([left, y0, left + plot_w, y0 + plot_h], outline="grey")
        draw.text((left, y0 - 14), key, fill="black", font=font)
        draw.text((4, y0), f"{high:.4g}", fill="black", font=font)
        draw.text((4, y0 + plot_h - 10), f"{low:.4g}", fill="black", font=font)
        draw.text((left, y0 + plot_h + 4), f"step {first}", fill="black", font=font)
        draw.text((left + plot_w - 70, y0 + plot_h + 4), f"step {last}", fill="black", font=font)
        if len(xy) > 1:
            draw.line(xy, fill=PLOT_COLOUR, width=2)
        # the points too, where they are few enough to be told apart (the evaluations)
        if len(xy) < 50:
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=PLOT_COLOUR)
    data.atomic_write(png_path, lambda f: image.save(f, format="PNG"))


# --------------------------------------------------------------------------------------------------
# The command line.
def make_parser():
    p = data.ArgumentParser(description=__doc__.split("\n")[0])
    run = p.add_argument_group("every stage")
    run.add_argument("--stage", required=True, choices=["tokenizer", "cache", "generator"],
                     help="tokenizer: train SoftVQ-VAE; cache: encode --data-path once with "
                          "--tokenizer; generator: train SiT on the latents")
    run.add_argument("--data-path", "--data", dest="data",
                     help="ImageNet-layout folder (a sub-folder per class), or 'builtin' for the "
                          "procedural shapes (default: none; the generator can use --latents)")
    run.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, PNG grids")
    run.add_argument("--global-batch-size", "--batch-size", dest="batch_size", type=int,
                     default=256, help="images a step over all ranks")
    run.add_argument("--num-workers", "--workers", dest="workers", type=int, default=8,
                     help="data loader processes per rank")
    run.add_argument("--seed", "--global-seed", type=int, default=42,
                     help="a non-negative integer: weights, data order and every step's noise")
    run.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                     help="on CUDA: bf16 autocast (TF32 for the rest) or float32 throughout; a "
                          "CPU runs float32")
    run.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                     help="torch.compile the trained model: auto = on CUDA only; off to debug, on "
                          "to test it on CPU")
    run.add_argument("--overwrite", action="store_true",
                     help="replace what OUT holds (a finished run or latent cache)")
    run.add_argument("--timeout", type=float, default=1800,
                     help="seconds a rank waits for the others before the run ends with an error")
    steps = p.add_argument_group("training (tokenizer and generator)")
    presets = ", ".join([*PRESETS, *GENERATOR_PRESETS])
    steps.add_argument("--preset", help=f"model preset (default: none; one of {presets})")
    steps.add_argument("--image-size", type=int,
                       help="the tokenizer's image size, a multiple of its patch size (default: "
                            "the preset's)")
    steps.add_argument("--steps", type=int, default=250_000, help="training steps")
    steps.add_argument("--lr", type=float,
                       help="peak learning rate (default: tokenizer 1e-4 x batch / 256; "
                            "generator 1e-4)")
    steps.add_argument("--warmup-steps", type=int,
                       help="linear warmup from 1e-5 to --lr; then the tokenizer's cosine, the "
                            "generator's flat --lr (default: tokenizer 5004, one epoch of the "
                            "released recipe; generator 0, as SiT)")
    steps.add_argument("--weight-decay", type=float, default=0.0,
                       help="0 = Adam without decay, what the released tokenizers ran; > 0 = "
                            "AdamW on >= 2-D weights")
    steps.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the weights")
    steps.add_argument("--grad-clip", type=float, default=1.0,
                       help="max global gradient norm (> 0)")
    steps.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute activations in the backward: less memory, ~30%% more "
                            "compute")
    steps.add_argument("--grad-accum", type=int, default=1,
                       help="micro-batches per step: the batch splits over ranks x this (less "
                            "memory)")
    steps.add_argument("--log-every", type=int, default=100, help="steps per log.jsonl line")
    steps.add_argument("--sample-every", type=int, default=5000,
                       help="steps per PNG grid of reconstructions / samples")
    steps.add_argument("--ckpt-every", type=int, default=10_000,
                       help="steps per OUT/ckpt.pt (the latest, which --resume continues)")
    steps.add_argument("--keep-every", type=int, default=0,
                       help="steps per kept checkpoint OUT/ckpt_STEP.pt, never overwritten (0 = "
                            "none)")
    steps.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    steps.add_argument("--allow-changes", action="store_true",
                       help="with --resume: go on although the settings differ from the "
                            "checkpoint's")
    steps.add_argument("--preflight", choices=["on", "off"], default="on",
                       help="before the first step, one training step of each phase the run will "
                            "enter (e.g. the GAN phase from --disc-start), then every state put "
                            "back: a phase that fails ends the run now")
    add_objective_options(p.add_argument_group(
        "tokenizer: the objective and its pretrained networks"))
    gen = p.add_argument_group("cache and generator")
    gen.add_argument("--tokenizer", help="tokenizer checkpoint, ours or released (default: the "
                                         "latent cache's, for its sample grids)")
    gen.add_argument("--tokenizer-config",
                     help="config.json of a released tokenizer (default: beside the weights)")
    gen.add_argument("--latents", help="generator: a --stage cache folder (default: none, the "
                                       "images are encoded on the fly)")
    gen.add_argument("--time-dist", default="lognormal", choices=["lognormal", "uniform"],
                     help="flow-matching time sampling (released recipe: logit-normal)")
    ev = p.add_argument_group("evaluation during training")
    ev.add_argument("--eval-every", type=int, default=0,
                    help="every N steps and at the end (0 = off), an `eval` event in log.jsonl: "
                         "tokenizer rFID, PSNR, SSIM; generator FID against --eval-ref")
    ev.add_argument("--eval-images", type=int, default=1000,
                    help="images (tokenizer) or samples (generator) of each evaluation")
    ev.add_argument("--eval-ref", help="generator: FID reference statistics, from `fid.py "
                                       "--save-stats` (default: none)")
    ev.add_argument("--inception",
                    help="Inception weights for --eval-every (default: as fid.py)")
    return p


def add_objective_options(tok):
    """The tokenizer's objective (defaults: the released L-64 recipe, configs/softvq-l-64.yaml). A
    term whose weights file is missing is switched off with a WARNING at start and in the log; a
    weight of 0 switches it off quietly."""
    tok.add_argument("--entropy-weight", type=float, default=0.01,
                     help="weight of the entropy regulariser")
    tok.add_argument("--perceptual-weight", type=float, default=1.0,
                     help="LPIPS weight (needs --vgg and --lpips)")
    tok.add_argument("--perceptual-warmup", type=int, default=10_000,
                     help="steps of the LPIPS weight's linear ramp")
    tok.add_argument("--adversarial-weight", type=float, default=0.2,
                     help="GAN weight (needs --dino)")
    tok.add_argument("--disc-start", type=int, default=20_000,
                     help="step at which D and the GAN term start")
    tok.add_argument("--lecam-weight", type=float, default=0.001,
                     help="LeCam regularisation of D")
    tok.add_argument("--consistency-weight", type=float, default=4.0,
                     help="D consistency regularisation")
    tok.add_argument("--adaptive-disc-weight", action="store_true",
                     help="VQGAN gradient-norm balance of the GAN term")
    tok.add_argument("--repa-weight", type=float, default=0.1,
                     help="alignment to DINOv2 (needs --dinov2)")
    tok.add_argument("--repa-patch-size", type=int, default=16,
                     help="patch size of the DINOv2 teacher")
    tok.add_argument("--vgg", help="torchvision vgg16-397923af.pth, the LPIPS backbone (default: "
                                   "none, LPIPS off)")
    tok.add_argument("--lpips", help="LPIPS v0.1 vgg.pth, its linear heads (default: none, LPIPS "
                                     "off)")
    tok.add_argument("--dino", help="dino_deitsmall16_pretrain.pth, the discriminator's backbone "
                                    "(default: none, GAN off)")
    tok.add_argument("--dinov2", help="DINOv2 checkpoint of the REPA teacher, e.g. "
                                      "dinov2_vitl14_pretrain.pth (default: none, REPA off)")
    tok.add_argument("--init-encoder",
                     help="DINOv2 checkpoint of the encoder's size to initialise it from "
                          "(default: random weights)")
    tok.add_argument("--compile-frozen", choices=["on", "off"], default="off",
                     help="torch.compile the frozen networks too (LPIPS, D's backbone, the REPA "
                          "teacher; with --adaptive-disc-weight the teacher only)")
    tok.add_argument("--stats-images", type=int, default=50_000,
                     help="images for the latent mean and std, measured at the end")


def parse_args(argv=None):
    """The flags, checked at the start: a flag that makes no sense ends the run in one line."""
    p = make_parser()
    args = p.parse_args(argv)
    either = "--latents or --tokenizer with --data-path"
    needs = {"tokenizer": ["--preset", "--data-path"], "cache": ["--tokenizer", "--data-path"],
             "generator": ["--preset", either]}[args.stage]
    have = {"--preset": args.preset, "--data-path": args.data, "--tokenizer": args.tokenizer,
            either: args.latents or (args.tokenizer and args.data)}
    missing = [flag for flag in needs if not have[flag]]
    if missing:
        p.error(f"--stage {args.stage} needs {' and '.join(missing)}")
    if args.stage == "tokenizer" and args.preset not in PRESETS:
        p.error(f"unknown tokenizer preset {args.preset!r}; choose one of: "
                f"{', '.join(sorted(PRESETS))}")
    if args.warmup_steps is None:
        args.warmup_steps = 5004 if args.stage == "tokenizer" else 0
    counts = {"--steps": args.steps, "--global-batch-size": args.batch_size,
              "--log-every": args.log_every, "--sample-every": args.sample_every,
              "--ckpt-every": args.ckpt_every, "--grad-accum": args.grad_accum,
              "--stats-images": args.stats_images}
    too_small = [(value < 1, f"{flag} must be at least 1") for flag, value in counts.items()]
    for bad, msg in [*too_small,
                     (args.seed < 0, f"--seed {args.seed}: use a non-negative integer"),
                     (min(args.workers, args.warmup_steps, args.weight_decay) < 0,
                      "--num-workers, --warmup-steps and --weight-decay must be >= 0"),
                     (args.keep_every < 0, "--keep-every must be >= 0 (0 = keep none)"),
                     (not 0 <= args.ema_decay < 1, "--ema-decay must be in [0, 1)"),
                     (not (args.grad_clip > 0 and args.timeout > 0),
                      "--grad-clip and --timeout must be > 0"),
                     (args.resume and args.overwrite,
                      "--resume continues OUT and --overwrite replaces it: choose one"),
                     (args.lr is not None and not args.lr > 0,
                      f"--lr {args.lr}: the learning rate must be > 0"),
                     (args.stage == "cache" and (args.eval_every or args.eval_ref),
                      "--eval-every and --eval-ref are for --stage tokenizer and generator"),
                     (args.eval_every < 0, "--eval-every must be >= 0 (0 = no evaluation)"),
                     (args.eval_images < 2, "--eval-images must be at least 2 (a covariance)"),
                     (args.eval_every > 0 and args.stage == "generator" and not args.eval_ref,
                      "--eval-every on the generator needs --eval-ref STATS.npz (write it with "
                      "`python fid.py --save-stats IMAGES STATS.npz`)"),
                     (args.eval_ref and args.stage == "tokenizer",
                      "--eval-ref is the generator's FID reference; the tokenizer's rFID compares "
                      "its reconstructions with the real images"),
                     (args.eval_every == 0 and (args.eval_ref or args.inception),
                      "--eval-ref and --inception serve --eval-every: pass --eval-every N")]:
        if bad:
            p.error(msg)
    if args.lr is None:  # the released recipes: tokenizer 1e-4 per 256 images, SiT 1e-4
        args.lr = 1e-4 * args.batch_size / 256 if args.stage == "tokenizer" else 1e-4
    return args


def main(argv=None):
    args = parse_args(argv)
    with data.user_errors():
        try:
            train(args)
        except Exception as e:
            record_crash(args, e)
            raise


if __name__ == "__main__":
    main()
