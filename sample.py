"""Images from checkpoints: samples from a SiT generator and its SoftVQ tokenizer (a labelled PNG grid, or an ADM
`.npz` for FID), or reconstructions of a folder of images by a tokenizer with PSNR, SSIM and rFID.

  python sample.py --ckpt runs/sit/ckpt.pt --classes 207 360 387 --per-class 8 --out grid.png
  torchrun --nproc_per_node 8 sample.py --ckpt runs/sit/ckpt.pt --num-samples 50000 --out samples.npz \
      --sampler sde --steps 250 --cfg 1.75 --guidance-high 0.7          # the official SoftVQ README setting
  python sample.py --ckpt sit-xl_softvq-b-64/model.safetensors --config sit-xl_softvq-b-64/config.json \
      --tokenizer softvq-b-64/model.safetensors --tokenizer-config softvq-b-64/config.json --classes 88

  python sample.py --ckpt runs/tok/ckpt.pt --images /imagenet/val --out runs/tok/eval         # reconstructions
  torchrun --nproc_per_node 8 sample.py --ckpt softvq-l-64/model.safetensors --images /imagenet/val --out eval_l64

The .npz run is resumable: fixed-size shards go to `<out>.parts/` (temp file + rename), and sample k's noise, label
and SDE noise come from its own generator seeded by (seed, k), so a killed and restarted run, on any number of
ranks, writes the same file as an uninterrupted one. Images -> uint8 as clamp(127.5 x + 128, 0, 255), truncated.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
import zipfile
from datetime import timedelta

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from generator import GENERATOR_PRESETS, SiT, SiTConfig, sample
from model import check_state_dict, load_state_dict_file

_HEADS_BY_WIDTH = {p["width"]: p["num_heads"] for p in GENERATOR_PRESETS.values()}  # heads aren't in the shapes


def official_config(sd, config_json=None):
    """SiTConfig of an official-layout state dict: sizes from the tensor shapes; heads from the released config.json
    (HF SoftVQ SiT fields: hidden_size, depth, num_heads, input_size, in_channels, ...) or from the known presets."""
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
        raise ValueError(f"width {width} is no known preset: pass the model's config.json (num_heads) with --config")
    return SiTConfig(num_tokens=have["input_size"], token_dim=token_dim, width=width, depth=have["depth"],
                     num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
                     num_classes=have["num_classes"], class_dropout=hf.get("class_dropout_prob", 0.1))


def load_generator(path, config_json=None, weights="ema"):
    """-> (SiT in eval mode, tokenizer info dict or None). Accepts our checkpoint (a dict with "kind"), an official
    train_sit.py checkpoint (its "ema"), or an official state dict (.safetensors / torch.save) + config.json."""
    ckpt = load_state_dict_file(path)
    info = config = None
    if "kind" in ckpt:
        if ckpt["kind"] != "generator":
            raise ValueError(f"{path} is a {ckpt['kind']!r} checkpoint, not a generator (tokenizers go to --tokenizer)")
        if weights not in ckpt:
            raise ValueError(f"{path} holds no {weights!r} weights")
        sd, config = ckpt[weights], SiTConfig(**ckpt["config"])
        info = {**(ckpt.get("tokenizer") or {}), "classes": ckpt.get("classes") or None}  # class names for grids
    else:
        sd = ckpt["ema"] if isinstance(ckpt.get("ema"), dict) else ckpt
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}  # compiled / DDP saves
    if config is None:
        beside = os.path.join(os.path.dirname(path), "config.json")  # HF layout: config.json beside the weights
        config = official_config(sd, config_json or (beside if os.path.isfile(beside) else None))
    return check_state_dict(SiT(config), sd).eval(), info


def load_tokenizer_for(model, info=None, path=None, config_json=None):
    """-> (tokenizer, latent_mean, latent_std). `info` is the generator checkpoint's "tokenizer" entry; `path` and
    `config_json` override it. The latent statistics the generator was trained with win over the tokenizer's."""
    from tokenizer import load_tokenizer  # lazy: the helpers above don't need the tokenizer module
    info = info or {}
    if not path:  # the stored pair; an explicit --tokenizer comes with its own --tokenizer-config (or none)
        path, config_json = info.get("path"), config_json or info.get("config_json")
    if not path:
        raise ValueError("no tokenizer: pass --tokenizer (official SiT weights don't name one)")
    for p in (path, config_json):
        if p and not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such tokenizer file")
    tok = load_tokenizer(path) if config_json is None else load_tokenizer(path, config_json=config_json)
    tc, gc = tok.config, model.config
    if (tc.num_tokens, tc.token_dim) != (gc.num_tokens, gc.token_dim):
        raise ValueError(f"tokenizer makes {tc.num_tokens}x{tc.token_dim} tokens, the generator expects "
                         f"{gc.num_tokens}x{gc.token_dim}")
    mean, std = (info.get(k) if info.get(k) is not None else getattr(tc, k) for k in ("latent_mean", "latent_std"))
    if (mean, std) != (tc.latent_mean, tc.latent_std):
        print(f"note: using the generator's latent stats mean={mean:.6g} std={std:.6g} "
              f"(tokenizer config: {tc.latent_mean:.6g}, {tc.latent_std:.6g})")
    return tok, float(mean), float(std)


def sample_seed(seed, k):
    """32-bit seed of sample k (CPU generators keep only 32 bits); the odd multiplier keeps seeds' streams apart."""
    return (seed * 0x9E3779B1 + k) % 2 ** 32


def sample_inputs(seed, indices, num_tokens, token_dim, num_classes, device):
    """Noise (B, L, d), uniform labels (B,) and one SDE-noise generator per sample, all a function of (seed, k)."""
    noise, labels, gens = [], [], []
    for k in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, k))
        noise.append(torch.randn(num_tokens, token_dim, generator=g))
        labels.append(torch.randint(num_classes, (1,), generator=g))
        gens.append(g if device.type == "cpu" else torch.Generator(device).manual_seed(sample_seed(seed, k)))
    return torch.stack(noise).to(device), torch.cat(labels).to(device), gens


@torch.no_grad()
def generate_latents(model, noise, labels, sampler="sde", steps=250, cfg=1.0, guidance_low=0.0, guidance_high=1.0,
                     generator=None, amp=True):
    """Normalised latents (B, L, d) from noise (B, L, d); the model runs in eval mode, under bf16 autocast on CUDA."""
    use_amp = amp and noise.device.type == "cuda"

    def velocity(x, t, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            return model(x, t, y)

    was_training = model.training
    model.eval()
    try:
        return sample(velocity, noise, labels, sampler, steps, cfg, guidance_low, guidance_high, generator,
                      null_label=model.config.num_classes)
    finally:
        model.train(was_training)


def generate_images(model, tokenizer, noise, labels, latent_mean, latent_std, amp=True, **sampling):
    """Images (B, 3, H, W) in [-1, 1]: sample latents, un-normalise z = x * std + mean, decode."""
    z = generate_latents(model, noise, labels, amp=amp, **sampling) * latent_std + latent_mean
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and z.device.type == "cuda"):
        return tokenizer.decode(z).float().clamp(-1, 1)


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3): clamp(127.5 x + 128, 0, 255) truncated (ADM/SiT)."""
    return (127.5 * images.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def labelled_grid(images, labels, class_names=None):
    """One row per distinct label (in order of appearance), its images left to right, the label in a left margin."""
    rows = {}
    for img, y in zip(np.asarray(images), [int(y) for y in labels]):
        rows.setdefault(y, []).append(img)
    h, w = np.asarray(images).shape[1:3]
    font = ImageFont.load_default()
    names = {y: str(class_names[y]) if class_names else str(y) for y in rows}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = {y: measure.textbbox((0, 0), s, font=font) for y, s in names.items()}
    margin = max(b[2] for b in boxes.values()) + 8
    grid = Image.new("RGB", (margin + w * max(map(len, rows.values())), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (y, imgs) in enumerate(rows.items()):
        for j, img in enumerate(imgs):
            grid.paste(Image.fromarray(img), (margin + j * w, i * h))
        draw.text((4, i * h + (h - boxes[y][3]) // 2), names[y], fill="black", font=font)
    return grid


def save_npz(path, chunks, shape):
    """ADM .npz (arr_0 uint8 NHWC) streamed from `chunks` in order; temp file + rename; fixed zip timestamps, so the
    bytes depend on the images only (np.savez stamps the current time)."""
    tmp = path + ".tmp"
    info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
            zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def write_samples(args, model, tok, mean, std, sampling, device, rank, world):
    """Generate args.num_samples images with uniform labels into the ADM .npz args.out, resumably (see top)."""
    parts, n, size = args.out + ".parts", args.num_samples, args.shard_size
    shard = lambda s: os.path.join(parts, f"shard_{s:06d}.npy")
    n_shards = math.ceil(n / size)
    meta = dict(ckpt=os.path.abspath(args.ckpt), weights=args.weights, tokenizer=args.tokenizer, num_samples=n,
                shard_size=size, seed=args.seed, **sampling)
    barrier = (lambda: torch.distributed.barrier()) if world > 1 else (lambda: None)
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(os.path.join(parts, "meta.json")):
            with open(os.path.join(parts, "meta.tmp"), "w") as f:
                json.dump(meta, f)
            os.replace(os.path.join(parts, "meta.tmp"), os.path.join(parts, "meta.json"))
    barrier()
    if json.load(open(os.path.join(parts, "meta.json"))) != json.loads(json.dumps(meta)):
        raise SystemExit(f"sample.py: error: {parts} was started with other settings; delete it or use the same ones")
    missing = [s for s in range(n_shards) if not os.path.exists(shard(s))]  # same list on every rank
    barrier()
    count, start = 0, time.time()
    for s in tqdm(missing[rank::world], desc="shards", disable=rank != 0):
        idx = range(s * size, min(n, (s + 1) * size))
        out = []
        for b in range(0, len(idx), args.batch_size):
            noise, labels, gens = sample_inputs(args.seed, idx[b:b + args.batch_size], model.config.num_tokens,
                                                model.config.token_dim, model.config.num_classes, device)
            out.append(to_uint8(generate_images(model, tok, noise, labels, mean, std, amp=not args.fp32,
                                                generator=gens, **sampling)))
        with open(shard(s) + ".tmp", "wb") as f:
            np.save(f, np.concatenate(out))
        os.replace(shard(s) + ".tmp", shard(s))
        count += len(idx)
    stats = torch.tensor([count, time.time() - start], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(stats[:1])
        torch.distributed.all_reduce(stats[1:], op=torch.distributed.ReduceOp.MAX)
    barrier()
    if rank == 0:
        first = np.load(shard(0), mmap_mode="r")
        save_npz(args.out, (np.load(shard(s)) for s in range(n_shards)), (n,) + first.shape[1:])
        shutil.rmtree(parts)
        print(f"wrote {args.out}: {n} images; {stats[0]:.0f} generated in {stats[1]:.1f}s = "
              f"{stats[0] / max(stats[1].item(), 1e-9):.2f} images/s (sampling + decoding, all ranks)")


def reconstruct(args, device, rank, world):
    """Tokenizer evaluation (spec §6): ADM centre crops of every image under args.images, reconstructed; writes
    OUT/recon/NNNNNN.png, OUT/recon.npz (ADM arr_0), OUT/metrics.json with PSNR and SSIM (uint8 images, mean over
    the set) and rFID (fid.py, real crops vs reconstructions) when the Inception weights are there. Sharded over
    ranks: rank r takes images r, r + world, ...; rank 0 gathers the parts and scores."""
    import data
    import fid
    from tokenizer import load_tokenizer
    tok = load_tokenizer(args.ckpt, args.config).to(device)
    ds = data.ImageFolderDataset(args.images, tok.config.image_size, crop="center")
    mine = list(range(rank, len(ds), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, mine), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=data.collate)
    os.makedirs(os.path.join(args.out, "recon"), exist_ok=True)
    real, recon, skipped, start = [], [], 0, time.time()
    for images, _, bad in tqdm(loader, desc="reconstruct", disable=rank != 0):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and not args.fp32):
            out = tok(images.to(device))[0].float().clamp(-1, 1)
        real.append(to_uint8(images))
        recon.append(to_uint8(out))
        skipped += int(bad)
        for k, img in zip(mine[sum(map(len, recon)) - len(out):], recon[-1]):
            Image.fromarray(img).save(os.path.join(args.out, "recon", f"{k:06d}.png"))
    part = os.path.join(args.out, f"part{rank}.npz")
    np.savez(part, index=np.array(mine, np.int64), real=np.concatenate(real), recon=np.concatenate(recon),
             seconds=time.time() - start, skipped=skipped)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return
    parts = [np.load(os.path.join(args.out, f"part{r}.npz")) for r in range(world)]
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    real, recon = (np.concatenate([p[k] for p in parts])[order] for k in ("real", "recon"))
    save_npz(os.path.join(args.out, "recon.npz"), [recon], recon.shape)
    a, b = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (real, recon))
    metrics = {"images": len(real), "skipped_unreadable": int(sum(p["skipped"] for p in parts)),
               "psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean()),
               "images_per_s": round(len(real) / max(float(p["seconds"]) for p in parts), 2)}
    for r in range(world):
        os.remove(os.path.join(args.out, f"part{r}.npz"))
    weights = args.inception or os.environ.get("SOFTVQ_INCEPTION") or os.path.expanduser(fid.DEFAULT_INCEPTION)
    if len(real) < 2 or not os.path.isfile(weights):
        print(f"rFID skipped: {'fewer than 2 images' if len(real) < 2 else 'no Inception weights at ' + weights}"
              f" (see `python fid.py --help`)")
    else:
        net = fid.load_inception(weights, device)
        stats = [fid.feature_statistics(iter([x]), net, batch_size=args.batch_size) for x in (real, recon)]
        metrics["rfid"] = fid.frechet_distance(*stats[0], *stats[1])
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


# Reconstruction metrics (§6): per image, for (B, C, H, W) in [0, 1] (float) or 0..255 (uint8); float64 throughout.
def psnr(a, b):  # -> (B,) dB, 10·log10(range² / MSE) over all channels and pixels (scikit-image convention)
    r = 255.0 if a.dtype == torch.uint8 else 1.0
    return 10 * torch.log10(r * r / (a.double() - b.double()).pow(2).flatten(1).mean(1))


def ssim(a, b):
    """-> (B,) SSIM as scikit-image `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1 or 255)` per RGB channel, averaged over channels (the common paper
    convention). skimage filters with an 11-tap Gaussian (truncate 3.5) and then crops a 5-pixel border; computing
    the filter only where it fits ('valid') gives exactly the cropped map, so the padding mode never matters."""
    r, a, b, C = (255.0 if a.dtype == torch.uint8 else 1.0), a.double(), b.double(), a.shape[1]
    x = torch.arange(-5, 6, dtype=torch.float64, device=a.device)
    g = torch.exp(-0.5 * (x / 1.5) ** 2)
    g = g / g.sum()

    def blur(t):  # separable Gaussian, per channel
        t = F.conv2d(t, g.view(1, 1, 11, 1).expand(C, 1, 11, 1), groups=C)
        return F.conv2d(t, g.view(1, 1, 1, 11).expand(C, 1, 1, 11), groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean((1, 2, 3))  # equal-size channel maps: the mean of per-channel means


@torch.no_grad()  # scoped: callers that import sample keep their grad mode
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda msg: sys.exit(f"sample.py: error: {msg}")  # one line, no usage dump or traceback
    p.add_argument("--ckpt", required=True, help="generator (or, with --images, tokenizer) checkpoint: ours or official")
    p.add_argument("--config", help="official config.json of --ckpt (default: config.json beside the weights)")
    p.add_argument("--images", help="reconstruction mode: a folder of images for the tokenizer --ckpt")
    p.add_argument("--inception", help="FID Inception weights for rFID (default: as fid.py)")
    p.add_argument("--workers", type=int, default=4, help="image decoding workers (reconstruction mode)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint (default: the path stored in the generator checkpoint)")
    p.add_argument("--tokenizer-config", help="official tokenizer config.json")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--classes", type=int, nargs="+", help="grid mode: one row per class")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--class-names", help="text file, one class name per line")
    p.add_argument("--num-samples", type=int, help=".npz mode: this many images with uniformly random labels")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--out")
    p.add_argument("--sampler", choices=["sde", "ode", "heun"], default="sde")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    args = p.parse_args(argv)
    npz = args.num_samples is not None
    args.out = args.out or ("samples.npz" if npz else "grid.png" if not args.images else "recon")
    for bad, msg in [(args.steps < 1, "--steps must be >= 1"), (args.cfg < 1, "--cfg must be >= 1"),
                     (args.guidance_low > args.guidance_high, "--guidance-low must be <= --guidance-high"),
                     (min(args.per_class, args.batch_size, args.shard_size) < 1, "sizes must be >= 1"),
                     (npz and args.classes is not None, "--classes (grid) and --num-samples (.npz) exclude each other"),
                     (npz and args.num_samples < 1, "--num-samples must be >= 1"),
                     (npz and not args.out.endswith(".npz"), "--out must end in .npz with --num-samples"),
                     (args.class_names is not None and not os.path.isfile(args.class_names), "no such --class-names file")]:
        if bad:
            p.error(msg)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.images:
        if world > 1:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            reconstruct(args, device, rank, world)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        finally:
            if world > 1:
                torch.distributed.destroy_process_group()
        return
    if not npz and rank != 0:
        return  # a grid is one process's job
    try:
        model, info = load_generator(args.ckpt, args.config, args.weights)
        tok, mean, std = load_tokenizer_for(model, info, args.tokenizer, args.tokenizer_config)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        p.error(f"{type(e).__name__}: {e}" if isinstance(e, (KeyError, TypeError)) else str(e))
    C = model.config.num_classes
    classes = args.classes or [c for c in (207, 360, 387, 974, 88, 979, 417, 279) if c < C] or list(range(min(C, 8)))
    if any(not 0 <= c < C for c in classes):
        p.error(f"class ids must be in [0, {C}) for this generator")
    model, tok = model.to(device), tok.to(device).eval()
    net = torch.compile(model) if device.type == "cuda" else model  # attributes (.config) pass through
    sampling = dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg, guidance_low=args.guidance_low,
                    guidance_high=args.guidance_high)
    if npz:
        if world > 1:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=4))
        write_samples(args, net, tok, mean, std, sampling, device, rank, world)
        if world > 1:
            torch.distributed.destroy_process_group()
        return
    names = open(args.class_names).read().splitlines() if args.class_names else (info or {}).get("classes")
    labels = [c for c in classes for _ in range(args.per_class)]
    start, out = time.time(), []
    for b in range(0, len(labels), args.batch_size):
        idx = range(b, min(len(labels), b + args.batch_size))
        noise, _, gens = sample_inputs(args.seed, idx, model.config.num_tokens, model.config.token_dim, C, device)
        y = torch.tensor(labels[b:b + len(idx)], device=device)
        out.append(to_uint8(generate_images(net, tok, noise, y, mean, std, amp=not args.fp32, generator=gens,
                                            **sampling)))
    secs = time.time() - start
    labelled_grid(np.concatenate(out), labels, names).save(args.out)
    print(f"wrote {args.out}: {len(labels)} images in {secs:.1f}s = {len(labels) / secs:.2f} images/s "
          f"(sampling + decoding)")


if __name__ == "__main__":
    main()
