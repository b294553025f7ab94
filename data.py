"""Part 1, data: image folders, the built-in shapes, the SoftVQ training crops, a resumable sharded
sampler, streaming moments (`Moments`), image grids, and the latent cache (a dataset of tokenizer
latents) with the latent statistics. Part 2, the run plumbing the entry points share: distributed
setup, the seed recipe, atomic writes, one-line user errors, graceful stops and the output lock.

Every random choice of an item (crop, flip) comes from a generator seeded by (seed, epoch, index),
and the sampler's order from (seed, epoch); so the stream of batches is a pure function of the step:
a resumed run sees exactly the batches it would have seen, whatever the number of loader workers.
"""
import argparse
import contextlib
import copy
import fcntl
import glob
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def list_images(root, labelled=True):
    """Sorted image paths under `root` (recursive) and integer labels: one sub-folder per class
    gives labels in sorted folder order; images directly in `root` (a flat folder) get label 0. A
    folder that cannot be listed, or (when `labelled`) images beside class folders, are refused:
    either would silently shift labels."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such data folder")

    def unreadable(e):
        raise PermissionError(f"{e.filename}: cannot list this folder ({e.strerror}); fix its "
                              f"permissions or move it out of {root}")
    walk = os.walk(root, onerror=unreadable, followlinks=True)
    paths = sorted(os.path.join(d, f) for d, _, files in walk
                   for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    parts = [os.path.relpath(p, root).split(os.sep) for p in paths]  # [class, ..., file] or [file]
    classes = sorted({r[0] for r in parts if len(r) > 1})
    loose = [os.path.join(root, r[0]) for r in parts if len(r) == 1]
    if labelled and classes and loose:
        raise ValueError(f"{root} has class folders and also {len(loose)} images beside them (e.g. "
                         f"{loose[0]}); move those into a class folder")
    index = {c: i for i, c in enumerate(classes)}
    return paths, [index[r[0]] if len(r) > 1 else 0 for r in parts], classes


def read_rgb(path):
    """Any image file -> PIL RGB, 8 bits per channel. 16-bit and 32-bit grayscale ("I;16", "I", "F")
    are scaled to 0..255 (PIL's convert would clip them, so most come out white); palette, CMYK,
    grayscale and LA/RGBA images go through PIL's convert("RGB"). Alpha is dropped, not composited:
    a transparent pixel shows the colour stored under it, as ADM's and torchvision's loaders do."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
            gray = np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8)
            return Image.fromarray(gray).convert("RGB")
        return img.convert("RGB")


def check_readable(paths, n=16):
    """Refuse at the start a folder whose images cannot be decoded (tried: the first and last n)."""
    tried = paths[:n] + paths[-n:]
    for p in tried:
        try:
            read_rgb(p)
            return
        except Exception:
            continue
    raise ValueError(f"none of {len(set(tried))} images tried in {os.path.dirname(paths[0])} can "
                     f"be decoded (e.g. {paths[0]}); check the data folder")


def _resize_short_side(img, size):
    # ADM: halve with BOX filtering while the short side is >= 2x the target, so BICUBIC never
    # aliases badly; then BICUBIC to a short side of exactly `size`.
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    return img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)


def center_crop(img, size):
    """ADM centre crop (guided-diffusion `center_crop_arr`): short side to `size`, then the central
    square."""
    img = _resize_short_side(img, size)
    x = (img.size[0] - size) // 2
    y = (img.size[1] - size) // 2
    return img.crop((x, y, x + size, y + size))


def random_crop(img, size, rng, min_frac=0.8):
    """The tokenizer's training crop (ADM `random_crop_arr`): short side to a random size in [size,
    size / 0.8], i.e. a crop of 0.8-1.0 of the short side, then a random `size` square."""
    short = int(rng.integers(size, math.ceil(size / min_frac) + 1))
    img = _resize_short_side(img, short)
    x = int(rng.integers(0, img.size[0] - size + 1))
    y = int(rng.integers(0, img.size[1] - size + 1))
    return img.crop((x, y, x + size, y + size))


def to_tensor(img):
    """PIL RGB -> uint8 (3, H, W): images travel from the loader workers as bytes, 4x less than
    floats."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_model_range(x):
    """uint8 images -> float in [-1, 1] (on their device); float batches (built-in images, latents)
    pass through."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


class ImageFolderDataset(torch.utils.data.Dataset):
    """Items are (image uint8 (3, S, S), label, number of unreadable files skipped to produce it);
    to_model_range maps a batch to [-1, 1]. crop: 'random' (tokenizer training, as
    continuous_tokenizer's train/train_tokenizer.py) or 'center' (ADM centre crop: generator and
    evaluation). A corrupt or unreadable file is replaced by the next readable one and counted,
    never a crash mid-epoch."""

    def __init__(self, root, image_size, crop="center", flip=False, seed=0):
        self.paths, self.labels, self.classes = list_images(root)
        check_readable(self.paths)
        self.image_size = image_size
        self.crop = crop
        self.flip = flip
        self.seed = seed
        # set by the sampler through set_epoch: the crops and flips differ per epoch
        self.epoch = 0

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        for skipped in range(min(len(self.paths), 50)):
            j = (i + skipped) % len(self.paths)
            try:
                img = read_rgb(self.paths[j])
            except Exception:  # truncated, not an image, permission denied, ...
                continue
            rng = np.random.default_rng((self.seed, self.epoch, j))
            if self.crop == "random":
                img = random_crop(img, self.image_size, rng)
            else:
                img = center_crop(img, self.image_size)
            if self.flip and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            return to_tensor(img), self.labels[j], skipped
        raise ValueError(f"50 consecutive unreadable images around {self.paths[i]}; check the data "
                         "folder")


class BuiltinShapes(torch.utils.data.Dataset):
    """8 procedural classes (disk, square, triangle, ring, cross, h- and v-stripes, checkerboard): a
    random-coloured shape 16-29 px across (stripes 3-5 px, checker cells 6-10 px: large against the
    tokenizer's 8x8 patches, see BENCHMARKS.md "The built-in shapes"), its size and position random,
    on a random-coloured background. Item i is a pure function of (seed, i); the held-out split has
    a seed of its own."""

    classes = ["disk", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes", "checker"]

    def __init__(self, image_size=32, size=4096, heldout=False, flip=False, seed=0):
        self.image_size = image_size
        self.size = size
        # the held-out split: another seed, so other images
        self.seed = seed + (10 ** 6 if heldout else 0)
        self.epoch = 0
        self.flip = flip
        # (2, S, S) pixel coordinates in [0, 1)
        self.grid = np.mgrid[:image_size, :image_size].astype(np.float32) / image_size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, i))
        label = i % len(self.classes)
        yy, xx = self.grid  # coordinates in [0, 1)
        cx, cy = rng.uniform(0.43, 0.57, size=2)
        r = rng.uniform(0.32, 0.45)
        dx = xx - cx
        dy = yy - cy
        period = rng.uniform(0.2, 0.32)
        mask = [lambda: np.hypot(dx, dy) < r,  # only the label's mask is drawn
                lambda: np.maximum(abs(dx), abs(dy)) < r * 0.85,
                lambda: (dy < r * 0.8) & (dy > -r * 0.8 + 2 * abs(dx)),
                lambda: (np.hypot(dx, dy) < r) & (np.hypot(dx, dy) > r * 0.55),
                lambda: (((abs(dx) < r * 0.35) | (abs(dy) < r * 0.35))
                         & (np.maximum(abs(dx), abs(dy)) < r)),
                # horizontal, vertical stripes
                lambda: (yy / period) % 1 < 0.5, lambda: (xx / period) % 1 < 0.5,
                lambda: ((xx / period).astype(int) + (yy / period).astype(int)) % 2 == 0][label]()
        fg = rng.uniform(-1, 1, size=3)
        bg = rng.uniform(-1, 1, size=3)
        while np.abs(fg - bg).sum() < 1.5:  # keep the shape visible
            fg = rng.uniform(-1, 1, size=3)
        img = np.where(mask[None], fg[:, None, None], bg[:, None, None]).astype(np.float32)
        if self.flip and np.random.default_rng((self.seed, self.epoch, i)).random() < 0.5:
            img = img[:, :, ::-1]
        return torch.from_numpy(img.copy()), label, 0


def make_dataset(path, image_size, crop="center", flip=False, seed=0):
    """`path` is a folder or 'builtin' (the built-in shapes' training split)."""
    if path == "builtin":
        return BuiltinShapes(image_size, flip=flip, seed=seed)
    return ImageFolderDataset(path, image_size, crop=crop, flip=flip, seed=seed)


def heldout_split(dataset):
    """The held-out images beside a training set: the built-in shapes' own split; a folder has
    none, so its images stand in, centre-cropped and unflipped, from the same listing."""
    if isinstance(dataset, BuiltinShapes):
        return BuiltinShapes(dataset.image_size, dataset.size, heldout=True, seed=dataset.seed)
    view = copy.copy(dataset)
    view.crop = "center"
    view.flip = False
    return view


class ShardedSampler(torch.utils.data.Sampler):
    """DistributedSampler that can start mid-epoch: epoch e is a permutation seeded by (seed, e),
    padded to a whole number of global batches; rank r takes every world-th index. `start` skips
    batches already consumed."""

    def __init__(self, n, batch_size, rank=0, world=1, seed=0):
        self.n = n
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.batches_per_epoch = max(1, n // (batch_size * world))

    def set_epoch(self, epoch, start_batch=0):
        self.epoch = epoch
        self.start = start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(seed_for(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)
        need = self.batches_per_epoch * self.batch_size * self.world
        # datasets smaller than one global batch repeat
        order = order.repeat(math.ceil(need / self.n))[:need]
        mine = order[self.rank::self.world]
        return iter(mine[self.start * self.batch_size:].tolist())

    def __len__(self):
        return (self.batches_per_epoch - self.start) * self.batch_size


def collate(items):
    images, labels, skipped = zip(*items)
    return torch.stack(images), torch.tensor(labels), torch.tensor(sum(skipped))


def rank_loader(dataset, rank, world, batch_size, workers, pin_memory=False, n=None, skip=0):
    """-> (indices, loader) of this rank's share of the first n items (all by default): items
    rank, rank + world, ... in order, for a pass over a set that every rank takes part in
    (statistics, the latent cache, reconstructions). The loader starts after the first `skip`."""
    indices = list(range(rank, len(dataset) if n is None else min(n, len(dataset)), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices[skip:]),
                                         batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate, pin_memory=pin_memory,
                                         worker_init_fn=ignore_stop_signals)
    return indices, loader


def make_loader(dataset, sampler, batch_size, workers, pin_memory):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, collate_fn=collate,
                                       pin_memory=pin_memory, drop_last=True,
                                       persistent_workers=False,
                                       prefetch_factor=4 if workers else None,
                                       worker_init_fn=ignore_stop_signals)


def batches(dataset, sampler, batch_size, workers, step, pin_memory=False):
    """Endless (images, labels, skipped) batches starting at global step `step`, epoch after
    epoch."""
    epoch, start = divmod(step, sampler.batches_per_epoch)
    while True:
        sampler.set_epoch(epoch, start)
        dataset.epoch = epoch
        yield from make_loader(dataset, sampler, batch_size, workers, pin_memory)
        epoch += 1
        start = 0


# --------------------------------------------------------------------------------------------------
# Moments: the one way the project takes a mean and a (co)variance over many batches and ranks
# (the latent statistics, the FID features, the linear probe's standardisation).
class Moments:
    """Streaming mean and covariance of rows x (N, D), or with full=False each column's variance,
    in float64 on x's device, without a host sync until all_reduce() or compute(). It keeps the
    count, the sum of x - shift and the sum of its outer products (or squares). The shift is
    `shift`, or else the first batch's mean: with a mean far from 0 the one-pass formula would
    otherwise lose its digits to cancellation. Variances divide by N - 1, as np.cov."""

    def __init__(self, full=True, shift=None):
        self.full = full
        # a given shift is the same on every rank, so the ranks' sums add as they are
        self.fixed_shift = shift is not None
        self.shift = shift
        self.n = 0
        # allocated at the first rows, on their device: (D,) and (D, D) or (D,)
        self.sum = None
        self.squares = None
        self.reduced = False

    def _allocate(self, dim, device):
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        shape = (dim, dim) if self.full else (dim,)
        self.squares = torch.zeros(shape, dtype=torch.float64, device=device)

    def update(self, x):  # x: (N, D)
        x = torch.as_tensor(x).double()
        # an empty first batch would make its mean, the shift, NaN
        if len(x) == 0:
            return
        if self.sum is None:
            self._allocate(x.shape[1], x.device)
        if self.shift is None:
            self.shift = x.mean(0)
        d = x - self.shift
        self.sum += d.sum(0)
        self.squares += d.T @ d if self.full else d.pow(2).sum(0)
        self.n += len(x)

    def all_reduce(self, device):
        """Every rank: merge the ranks' moments into those of the union, exactly, on `device` (the
        process group's). With each rank's own shift (its first batch's mean), each rank's sums
        first move to the union's mean c: for a rank with shift a, sum_i (x_i - c) = S + n δ and
        sum_i (x_i - c)(x_i - c)^T = Q + S δ^T + δ S^T + n δ δ^T, with δ = a - c."""
        if not dist.is_initialized():
            return
        # a second call would add the merged sums up again
        assert not self.reduced, "Moments.all_reduce: already merged"
        self.reduced = True
        # a rank that saw no rows learns the width from the others
        width = torch.tensor(0 if self.sum is None else len(self.sum), device=device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if self.sum is None:
            self._allocate(int(width), device)
        self.sum = self.sum.to(device)
        self.squares = self.squares.to(device)
        shift = torch.zeros_like(self.sum)
        if self.shift is not None:
            shift += torch.as_tensor(self.shift, dtype=torch.float64, device=device)
        count = torch.tensor([float(self.n)], dtype=torch.float64, device=device)
        if not self.fixed_shift:
            total = torch.cat([count, self.n * shift + self.sum])
            dist.all_reduce(total)
            center = total[1:] / total[0].clamp(min=1)
            delta = shift - center
            if self.full:
                outer = torch.outer(self.sum, delta)
                self.squares += outer + outer.T + self.n * torch.outer(delta, delta)
            else:
                self.squares += 2 * delta * self.sum + self.n * delta * delta
            self.sum += self.n * delta
            shift = center
        merged = torch.cat([count, self.sum, self.squares.flatten()])
        dist.all_reduce(merged)
        self.n = int(merged[0].item())
        self.shift = shift
        self.sum = merged[1:1 + len(shift)]
        self.squares = merged[1 + len(shift):].view_as(self.squares)

    def compute(self):
        """-> (mean (D,), covariance (D, D) or variances (D,)) as float64 numpy."""
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.n}")
        mean = self.sum / self.n
        if self.full:
            spread = self.squares / self.n - torch.outer(mean, mean)
            spread = (spread + spread.T) / 2
        else:
            spread = (self.squares / self.n - mean * mean).clamp(min=0)
        return (self.shift + mean).cpu().numpy(), (spread * self.n / (self.n - 1)).cpu().numpy()

    def state(self):
        """The sums as a flat list (a stopped job's JSON record): count, sum, squares. With a
        fixed shift only: the list does not hold a first batch's mean."""
        assert self.fixed_shift, "Moments.state needs a fixed shift"
        if self.sum is None:
            return [0.0]
        return [float(self.n), *self.sum.tolist(), *self.squares.flatten().tolist()]

    def load_state(self, values, dim, device):
        assert self.fixed_shift, "Moments.load_state needs a fixed shift"
        values = torch.tensor(values, dtype=torch.float64, device=device)
        self.n = int(values[0].item())
        if self.n:
            self._allocate(dim, device)
            self.sum += values[1:1 + dim]
            self.squares += values[1 + dim:].view_as(self.squares)


# --------------------------------------------------------------------------------------------------
# Images out: uint8 conversion and PNG grids.
def to_uint8_tensor(images):
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W) on their device: clamp(127.5 x + 128, 0, 255)
    truncated (ADM/SiT sample.py)."""
    return (127.5 * images.float() + 128).clamp(0, 255).to(torch.uint8)


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) numpy, as `to_uint8_tensor`."""
    return to_uint8_tensor(images).permute(0, 2, 3, 1).cpu().numpy()


def labelled_grid(images, labels, class_names=None):
    """uint8 (N, H, W, 3) -> PIL grid: one row per distinct label (in order of appearance), its
    images left to right, the label (or class_names[label]) in a left margin. Images under 96 px are
    enlarged by a whole factor, nearest neighbour (the built-in 32 px images: 96 px cells)."""
    images = np.asarray(images)
    rows = {}
    for img, y in zip(images, [int(y) for y in labels]):
        rows.setdefault(y, []).append(img)
    scale = max(1, 96 // max(images.shape[1:3]))
    h, w = (n * scale for n in images.shape[1:3])
    font = ImageFont.load_default()
    names = {y: str(class_names[y]) if class_names else str(y) for y in rows}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = {y: measure.textbbox((0, 0), s, font=font) for y, s in names.items()}
    margin = max(b[2] for b in boxes.values()) + 8
    grid = Image.new("RGB", (margin + w * max(map(len, rows.values())), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (y, imgs) in enumerate(rows.items()):
        for j, img in enumerate(imgs):
            grid.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (margin + j * w, i * h))
        draw.text((4, i * h + (h - boxes[y][3]) // 2), names[y], fill="black", font=font)
    return grid


# --------------------------------------------------------------------------------------------------
# The latent cache: every image and its horizontal flip encoded once by a tokenizer (the SiT
# training of continuous_tokenizer uses both), a dataset of latents; and the latent statistics.
# The files of one rank's share: its items rank, rank + world, ... in order. A rank writes only
# its own files: on a shared filesystem, ranks of several nodes writing one file can overwrite each
# other's pages.
LATENT_SHARD = "latents_rank{}.npy"
LABEL_SHARD = "labels_rank{}.npy"


@torch.no_grad()
def write_latent_cache(tokenizer, dataset, out, rank, world, device, batch_size, workers, autocast,
                       extra_meta=None, stop=None, fresh=False):
    """Each rank encodes items rank, rank + world, ... into its own memory-mapped files: float16
    latents (n_r, 2, L, d) of each image and its horizontal flip, int64 labels (n_r,). -> the
    measured (mean, std); meta.json records them, the ranks and `extra_meta`. meta.json, removed
    first and written last, marks a complete cache. A signal (`stop`) ends a rank after its batch
    with its progress in progress_rank{r}.json (items done, their float64 sums) -> None; the same
    command continues from there (same ranks, batch and tokenizer; else, or with `fresh`, it starts
    over) to the cache and statistics of an unstopped run."""
    cfg = tokenizer.config
    n = len(dataset)
    settings = {"world": world, "count": n, "batch_size": batch_size, **(extra_meta or {})}
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(os.path.join(out, "meta.json")):
            os.remove(os.path.join(out, "meta.json"))
        if fresh or not _can_continue(out, world, (cfg.num_tokens, cfg.token_dim), settings):
            # an earlier cache's files, of any layout
            for name in os.listdir(out):
                if re.fullmatch(r"(latents|labels)(_rank\d+)?\.npy|progress_rank\d+\.json", name):
                    os.remove(os.path.join(out, name))
    if dist.is_initialized():
        dist.barrier()
    mine = range(rank, n, world)
    latents_path = os.path.join(out, LATENT_SHARD.format(rank))
    labels_path = os.path.join(out, LABEL_SHARD.format(rank))
    done = 0
    # the scalar mean and std of every stored value. A fixed shift of 0 keeps the sums additive over
    # a stop and its continuation (the progress record); the latents' mean is small beside their
    # spread, so nothing cancels
    stats = Moments(full=False, shift=0.0)
    if os.path.isfile(_progress(out, rank)):
        with open(_progress(out, rank)) as f:
            record = json.load(f)
        done = record["done"]
        stats.load_state(record["sums"], 1, device)
        latents = np.load(latents_path, mmap_mode="r+")
        labels = np.load(labels_path, mmap_mode="r+")
    else:
        shape = (len(mine), 2, cfg.num_tokens, cfg.token_dim)
        latents = np.lib.format.open_memmap(latents_path, "w+", np.float16, shape)
        labels = np.lib.format.open_memmap(labels_path, "w+", np.int64, (len(mine),))
    _, loader = rank_loader(dataset, rank, world, batch_size, workers, device.type == "cuda",
                            skip=done)
    for images, y, _ in loader:
        images = to_model_range(images.to(device, non_blocking=True))
        with autocast:
            # (B, 2, L, d): the image and its horizontal flip
            z = torch.stack([tokenizer.encode(images), tokenizer.encode(images.flip(-1))], 1)
            z = z.float()
        # statistics of what is stored, so that a cached generator sees exactly (z - mean) / std
        z16 = z.half()
        stats.update(z16.reshape(-1, 1))
        latents[done:done + len(images)] = z16.cpu().numpy()
        labels[done:done + len(images)] = y.numpy()
        done += len(images)
        if stop is not None and stop.signum and done < len(mine):
            break
    latents.flush()
    labels.flush()
    record = {**settings, "done": done, "sums": stats.state()}
    record_json = json.dumps(record, allow_nan=False).encode()
    atomic_write(_progress(out, rank), lambda f: f.write(record_json))
    # the ranks stopped before their end (a rank the signal missed finished its items)
    stopped = torch.tensor(float(done < len(mine)), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(stopped)
    if stopped:
        return None
    stats.all_reduce(device)
    mean, variance = (float(v[0]) for v in stats.compute())
    std = math.sqrt(variance)
    if rank == 0:
        classes = list(getattr(dataset, "classes", []))
        top = max(int(np.max(np.load(os.path.join(out, LABEL_SHARD.format(r)), mmap_mode="r")))
                  for r in range(min(world, n)))
        meta = {"count": n, "ranks": world, "num_tokens": cfg.num_tokens,
                "token_dim": cfg.token_dim, "num_classes": len(classes) or top + 1,
                "classes": classes, "measured_mean": mean, "measured_std": std,
                **(extra_meta or {})}
        meta_json = json.dumps(meta, indent=1, allow_nan=False).encode()
        atomic_write(os.path.join(out, "meta.json"), lambda f: f.write(meta_json))
        for r in range(world):
            os.remove(_progress(out, r))
    return mean, std


def _progress(out, rank):
    return os.path.join(out, f"progress_rank{rank}.json")


def _can_continue(out, world, token_shape, settings):
    """A stopped cache continues when every rank's progress file was written with the same settings
    and its latents file has its share's shape."""
    try:
        for r in range(world):
            with open(_progress(out, r)) as f:
                record = json.load(f)
            if {k: record.get(k) for k in settings} != settings:
                return False
            shape = np.load(os.path.join(out, LATENT_SHARD.format(r)), mmap_mode="r").shape
            if shape != (len(range(r, settings["count"], world)), 2, *token_shape):
                return False
    except (OSError, ValueError):
        return False
    return True


class LatentCache(torch.utils.data.Dataset):
    """Items are (latent (L, d) float32, label, 0) from a write_latent_cache folder (or its earlier
    one-file layout: latents.npy, labels.npy), the image or its flip chosen 50/50 by (seed, epoch,
    index) like the image augmentations. `labels`: (N,) of all items; `pairs`: latents by item."""

    def __init__(self, folder, seed=0):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{folder}: no complete latent cache (meta.json missing); "
                                    f"run --stage cache")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            m = self.meta
            n = m["count"]
            token_shape = (m["num_tokens"], m["token_dim"])
            # rank r's files hold items r, r + ranks, ...; the one-file layout is one such share
            self.ranks = m.get("ranks", 1)
            names = ([(LATENT_SHARD.format(r), LABEL_SHARD.format(r)) for r in range(self.ranks)]
                     if "ranks" in m else [("latents.npy", "labels.npy")])
            self.shards = [np.load(os.path.join(folder, a), mmap_mode="r") for a, _ in names]
            shard_labels = [np.load(os.path.join(folder, b)) for _, b in names]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{folder}: damaged latent cache ({type(e).__name__}: {e}); write it "
                             "again with --stage cache --overwrite") from None
        for r, (latents, labels) in enumerate(zip(self.shards, shard_labels)):
            share = len(range(r, n, self.ranks))
            if (latents.shape != (share, 2, *token_shape) or latents.dtype != np.float16
                    or labels.shape != (share,)):
                raise ValueError(f"{folder}: latents {latents.shape} {latents.dtype} / labels "
                                 f"{labels.shape} of rank {r} do not match meta.json ({n} items of "
                                 f"{token_shape}); write the cache again with --stage cache "
                                 "--overwrite")
        self.labels = np.zeros(n, np.int64)
        for r, labels in enumerate(shard_labels):
            self.labels[r::self.ranks] = labels
        self.classes = m.get("classes", [])
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.labels)

    def pairs(self, indices):
        """Items `indices` -> float16 (n, 2, L, d): each one's latents and its flip's."""
        indices = np.asarray(indices)
        out = np.empty((len(indices), *self.shards[0].shape[1:]), np.float16)
        for r, shard in enumerate(self.shards):
            here = indices % self.ranks == r
            out[here] = shard[indices[here] // self.ranks]
        return out

    def __getitem__(self, i):
        flip = int(np.random.default_rng((self.seed, self.epoch, i)).random() < 0.5)
        latent = self.shards[i % self.ranks][i // self.ranks, flip]
        return torch.from_numpy(latent.astype(np.float32)), int(self.labels[i]), 0


@torch.no_grad()
def latent_stats(model, dataset, device, autocast, rank=0, world=1, workers=0, n=50_000, batch=64):
    """Scalar mean and std of z over (up to n images of) the training set: x = (z - mean) / std for
    the generator. Rank r encodes images r, r + world, ... with the data loader's workers; the sums
    are all-reduced."""
    _, loader = rank_loader(dataset, rank, world, batch, workers, n=n)
    # read once at the end; a fixed shift, as the latent cache's statistics
    stats = Moments(full=False, shift=0.0)
    for images, _, _ in loader:
        with autocast:
            z = model.encode(to_model_range(images.to(device)))
        stats.update(z.reshape(-1, 1))
    stats.all_reduce(device)
    mean, variance = (float(v[0]) for v in stats.compute())
    return mean, math.sqrt(variance)


# ==================================================================================================
# Part 2: the run plumbing the entry points share (train.py, sample.py, fid.py): distributed
# setup, the seed recipe, atomic writes, one-line user errors, graceful stops on a signal and the
# output folder's lock.
def setup_distributed(device=None, timeout_s=1800, tf32=True):
    """-> (rank, world, device) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; without them one
    process, no process group (nanoGPT); under torchrun even one process joins one (as DiT). Rank r
    takes GPU LOCAL_RANK; NCCL on CUDA, gloo on CPU; a collective waiting over timeout_s ends the
    run. device: "cuda", "cpu", "cuda:1" (default CUDA). tf32: TF32 for float32 matmuls on CUDA."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_world > 1:
        # Inductor starts up to one compile worker per CPU core in every process: N ranks on a node
        # would start N times that. An explicit TORCHINDUCTOR_COMPILE_THREADS wins.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = str(max(1, cpus // local_world))
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if world > 1 or device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        # fixed shapes: let cuDNN pick the fastest convolutions once
        torch.backends.cudnn.benchmark = True
    if world > 1 or LAUNCHED_BY_TORCHRUN in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return rank, world, device


def sampling_record_path(npz_path):
    """The JSON record sample.py writes beside a sample .npz (how it was sampled):
    samples.npz -> samples.json."""
    return os.path.splitext(npz_path)[0] + ".json"


def seed_for(*ids):
    """The one seed recipe: numpy's SeedSequence hash of non-negative integers (run seed, step,
    rank, epoch, sample index) to 32 bits, as default_rng of a tuple seeds every item's crop and
    flip; nearby tuples are unrelated."""
    return int(np.random.SeedSequence(list(ids)).generate_state(1)[0])


def atomic_write(path, write):
    """write(f) into a temp file beside `path`, then rename it over `path`: a kill mid-write leaves
    the previous file intact, and a failed write leaves no temp file behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            try:
                write(f)
            # torch.save's zip writer hides a failed write (disk full) behind its own error
            except RuntimeError as e:
                if isinstance(e.__context__, OSError):
                    raise OSError(e.__context__.errno,
                                  f"cannot write {path}: {e.__context__.strerror}") from None
                raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(path):
    """Delete what killed atomic writes of `path` left behind (`path`.tmp<pid>); call it at the
    start of a run."""
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(name + ".tmp") and f[len(name) + 4:].isdigit():
                os.remove(os.path.join(folder, f))


def check_writable(folder):
    """Refuse at the start an output folder that cannot be created or written (rather than hours
    later)."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{folder}: cannot write there ({e.strerror}); "
                              f"choose another output path") from None


# What loaders and checks raise for bad input (a missing file, a bad flag, a full disk) or a
# diverged run.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def fail(message, quiet=False):
    """A user error: one line on stderr (none when `quiet`), exit status 2, no traceback."""
    if not quiet:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default; an option without one (None) says in its help text what
    happens without it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """The entry points' parser: defaults in --help, no abbreviated options (a prefix could name
    another option), and a bad command line is one `error:` line."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message):
        # argparse prints its usage and exits 2; ours prints the one line. Every rank parses the
        # same command line, so under torchrun rank 0 alone says it.
        fail(message, quiet=int(os.environ.get("RANK", 0)) != 0)


def refuse_option(parser, name, instead, why):
    """`name` (which another entry point gives another meaning) ends the command line with one line
    naming the option to use `instead`."""
    class Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{name} is no option here ({why}): use {instead}")
    parser.add_argument(name, nargs="?", action=Refuse, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


@contextlib.contextmanager
def refusals_once():
    """Around the start-of-run checks, on every rank, with no collective inside: a refusal on any
    rank ends every rank with exit status 2, and rank 0 alone prints it (the first rank's
    message), not one line per GPU."""
    message = None
    try:
        yield
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
    quiet = False
    if dist.is_initialized():
        # also the barrier after the checks: no rank goes on before rank 0 holds the folder
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m), None)
        quiet = dist.get_rank() != 0
        # every rank is here: a clean teardown (a live gloo group at exit can abort the process)
        if message is not None:
            dist.destroy_process_group()
    if message is not None:
        fail(message, quiet)


@contextlib.contextmanager
def user_errors():
    """Around an entry point's work: a user error (USER_ERRORS) becomes one `error: ...` line and
    exit status 2. A file-size limit (ulimit -f) then fails the write with an error instead of
    killing the process."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    except USER_ERRORS as e:
        fail(" ".join(str(e).split()) or type(e).__name__)
    # a second Ctrl-C (GracefulStop): stop at once, without a traceback through autograd
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    # a collective that outlived --timeout, or whose peer died (gloo and NCCL raise RuntimeErrors)
    except RuntimeError as e:
        text = str(e).lower()
        failed = isinstance(e, dist.DistError) or "timed out" in text or "closed by peer" in text
        if not (dist.is_initialized() and failed):
            raise
        fail("a collective between the ranks failed or timed out: another rank is stuck or died "
             f"(see its output). {' '.join(str(e).split())[:300]}")


# --------------------------------------------------------------------------------------------------
# Preemption and one writer per folder.

# Exit status of a run that stopped on a signal after saving its work (1: a crash, 2: a user
# error); `--resume` (train.py) or the same command (sample.py) continues it.
STOPPED = 3
# Ranks agree on a stop every STOP_EVERY steps, reading a flag reduced STOP_EVERY steps earlier: at
# most 2 x STOP_EVERY steps after the signal (one process: after the step it is in).
STOP_EVERY = 5
# SIGHUP: a closed terminal, or the launcher gone (GracefulStop)
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
# An environment variable torchrun sets for its workers
LAUNCHED_BY_TORCHRUN = "TORCHELASTIC_RUN_ID"
# The process that started this one (under torchrun, the launcher GracefulStop watches)
PARENT = os.getppid()


class GracefulStop:
    """While active (a `with` block), SIGTERM, SIGINT, SIGUSR1 and SIGHUP set a flag instead of
    killing the process; the work asks `should_stop` at its boundaries, keeps what is finished and
    exits with STOPPED. A second Ctrl-C stops at once. Under torchrun the launcher's death (kill -9)
    counts as a SIGHUP. With `folder`, another rank's crash record there makes torchrun's SIGTERM
    end this rank at once (status 1): without it, the ranks cannot agree on a last step."""

    def __init__(self, device=None, folder=None):
        self.device = device or torch.device("cpu")
        self.folder = folder
        # the first signal's number (0: none yet) and when it came
        self.signum = 0
        self.since = None
        # (CUDA event or None, host tensor) of the flag all-reduced at the last agreement
        self.pending = None
        self.previous = {}
        self.watching = None

    def __enter__(self):
        for name in STOP_SIGNALS:
            number = getattr(signal, name)
            # a hangup that nohup ignores stays ignored
            if name != "SIGHUP" or signal.getsignal(number) is not signal.SIG_IGN:
                self.previous[number] = signal.signal(number, self._handle)
        if LAUNCHED_BY_TORCHRUN in os.environ:
            self.watching = threading.Event()
            threading.Thread(target=_watch_launcher, args=(PARENT, self.watching),
                             daemon=True).start()
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        if self.watching is not None:
            self.watching.set()

    def _handle(self, signum, frame):
        crash = crash_of_another_rank(self.folder) if signum == signal.SIGTERM else None
        if crash:
            print(f"{crash}; this rank ends too (the last checkpoint is kept)", file=sys.stderr,
                  flush=True)
            os._exit(1)
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            self.since = time.time()
            print(f"{self.name}: stopping at the next boundary (a second Ctrl-C stops at once)",
                  file=sys.stderr, flush=True)

    @property
    def name(self):
        return signal.Signals(self.signum).name

    def should_stop(self, step):
        """Whether to stop now, after `step` steps: one process by its own flag, several ranks by
        the MAX of their flags, agreed every STOP_EVERY steps on a result finished STOP_EVERY steps
        ago (a pinned copy and an event on CUDA): no wait on the GPU's queue."""
        if not dist.is_initialized():
            return self.signum != 0
        if step % STOP_EVERY:
            return False
        agreed = 0
        if self.pending is not None:
            done, host = self.pending
            if done is not None:
                done.synchronize()
            agreed = int(host)
        # a fill on the device: torch.tensor(value, device=cuda) would be a blocking copy from the
        # host, which waits for the GPU's queue
        flag = torch.full((), self.signum, dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.is_cuda:
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.pending = (done, host)
        else:
            self.pending = (None, flag)
        # a rank the signal did not reach stops with the others, under their signal's name
        if agreed and not self.signum:
            self.signum = agreed
            self.since = time.time()
        return agreed != 0


def _watch_launcher(launcher, done):
    """Once a second until `done`: a SIGHUP to this process when its parent is not `launcher`."""
    while not done.wait(1.0):
        if os.getppid() != launcher:
            print(f"the launcher (pid {launcher}) is gone: stopping as on a signal",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGHUP)
            return


# A rank's crash record in the run folder: what its exception was, for the other ranks
CRASH_RECORD = "crash_rank{}.txt"


def record_crash(folder, rank, error):
    """Write this rank's crash record (`error`: one line, then the traceback) into `folder`."""
    text = f"rank {rank} crashed: {error}\n{traceback.format_exc()}".encode()
    atomic_write(os.path.join(folder, CRASH_RECORD.format(rank)), lambda f: f.write(text))


def crash_of_another_rank(folder):
    """The first line of a crash record in `folder` (None: no rank crashed, or no folder)."""
    records = sorted(glob.glob(os.path.join(folder, CRASH_RECORD.format("*")))) if folder else []
    if not records:
        return None
    with open(records[0]) as f:
        return f.readline().strip()


def ignore_stop_signals(worker_id=None):
    """In data loader workers: the main process handles the stop signals and ends its workers (a
    Ctrl-C or a SIGTERM to the process group would otherwise kill them mid-batch)."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def lock_folder(path):
    """An exclusive lock on `path` (a lock file, created if missing) for the life of the process:
    -> the open file (keep it; closing it releases the lock). The operating system drops the lock
    when the process dies (a SIGKILL; a lost node once its NFS lease ends), so a crash never blocks
    a restart; NFS passes flock on to the server, so it holds across nodes. A second process is
    refused in one line that names the holder. A filesystem that cannot lock gets one warning."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise FileExistsError(f"{path} is held by {holder}: another run writes there; wait "
                                  f"for it to end, or choose another output") from None
        except OSError as e:
            print(f"WARNING: {path}: this filesystem cannot lock files ({e.strerror}); make sure "
                  f"no other run writes to the same output", file=sys.stderr, flush=True)
            return f
        # a holder that finished may have removed the file (unlock) between our open and flock:
        # then we hold a lock on a file nobody else sees, and try again
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()
    f.seek(0)
    f.truncate()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n")
    f.flush()
    return f


def unlock(lock):
    """Release a lock_folder lock and remove its file (an output that is not a folder leaves no
    lock file beside it); None is a no-op."""
    if lock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock.name)
        lock.close()
