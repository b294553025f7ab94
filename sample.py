"""Images from checkpoints: samples from a SiT generator and its SoftVQ tokenizer
(a labelled PNG grid, or an ADM `.npz` for FID), or reconstructions of a folder of images by a
tokenizer with PSNR, SSIM and rFID.

  python sample.py --ckpt runs/sit/ckpt.pt --classes 207 360 387 --per-class 8 --out grid.png
  torchrun --nproc_per_node 8 sample.py --ckpt runs/sit/ckpt.pt --num-fid-samples 50000 \
      --out samples.npz --cfg-scale 1.75 --guidance-high 0.7       # SDE, 250 steps (defaults)
  torchrun --nproc_per_node 8 sample.py --ckpt softvq-l-64/model.safetensors \
      --images /imagenet/val --out eval_l64

The .npz run is resumable: fixed-size shards go to `<out>.parts/` (temp file + rename), and sample
k's noise, label and SDE noise come from its own generator seeded by (seed, k), so a killed and
restarted run, on any number of ranks, writes the same file as an uninterrupted one. Images -> uint8
as clamp(127.5 x + 128, 0, 255), truncated.
"""
import json
import math
import os
import shutil
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import data
import fid
from generator import (Sampling, generate_images, load_generator, load_tokenizer_for,
                       sample_inputs)
from model import bf16_autocast, cast_autocast_weights
from tokenizer import LPIPS, load_tokenizer

# Grid classes when none are given (ImageNet ids, as DiT's sample.py):
# retriever, otter, panda, geyser, macaw, ...
DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


def make_parser():
    p = data.ArgumentParser(description=__doc__.split("\n")[0])
    model = p.add_argument_group("checkpoints")
    model.add_argument("--ckpt", required=True,
                       help="generator checkpoint (with --images: tokenizer), ours (any ckpt*.pt "
                            "of a run) or released")
    model.add_argument("--config", help="released config.json of --ckpt (default: config.json "
                                        "beside the weights)")
    model.add_argument("--tokenizer", help="tokenizer checkpoint (default: the path stored in "
                                           "the generator checkpoint)")
    model.add_argument("--tokenizer-config",
                       help="released tokenizer config.json (default: beside --tokenizer)")
    model.add_argument("--weights", choices=["ema", "model"], default="ema",
                       help="the generator's EMA or raw weights")
    how = p.add_argument_group("sampling")
    how.add_argument("--sampler", "--mode", choices=["sde", "ode", "heun"],
                     default=Sampling.solver,
                     help="Euler-Maruyama SDE, Euler ODE or Heun ODE (SiT's and the official "
                          "code's --mode)")
    how.add_argument("--num-sampling-steps", "--num-steps", type=int, default=Sampling.steps,
                     help="sampler steps (DiT and SiT: --num-sampling-steps; the official code: "
                          "--num-steps)")
    how.add_argument("--cfg-scale", "--cfg", type=float, default=Sampling.cfg_scale,
                     help="classifier-free guidance scale (>= 1; 1 = none)")
    how.add_argument("--guidance-low", type=float, default=Sampling.guidance_low,
                     help="guide only while t >= this")
    how.add_argument("--guidance-high", type=float, default=Sampling.guidance_high,
                     help="guide only while t <= this")
    how.add_argument("--path-type", choices=["linear", "cosine"], default=Sampling.path_type,
                     help="--sampler sde: the path whose score it takes from the velocity; "
                          "SiT trains on the linear one, the official generation command "
                          "samples with cosine")
    how.add_argument("--seed", "--global-seed", type=int, default=0,
                     help="sample k's noise, label and SDE noise come from (seed, k)")
    grid = p.add_argument_group("grid mode (the default): a labelled PNG")
    grid.add_argument("--classes", type=int, nargs="+",
                      help="one row per class (default: 8 ImageNet classes, as DiT)")
    grid.add_argument("--per-class", type=int, default=8, help="images per row")
    grid.add_argument("--class-names",
                      help="text file, one class name per line (default: the checkpoint's)")
    npz = p.add_argument_group(".npz mode, for FID: --num-fid-samples")
    npz.add_argument("--num-fid-samples", "--num-samples", type=int,
                     help="this many images in an ADM .npz (default: grid mode)")
    npz.add_argument("--labels", choices=["uniform", "equal"], default="uniform",
                     help="uniformly random labels, or the same count per class in an order "
                          "shuffled by --seed")
    npz.add_argument("--shard-size", type=int, default=256,
                     help="images per resumable shard in OUT.parts/")
    recon = p.add_argument_group("reconstruction mode: --images, for a tokenizer --ckpt")
    recon.add_argument("--images", help="a folder of images to reconstruct and score "
                                        "(default: sampling)")
    recon.add_argument("--inception", help="FID Inception weights for rFID (default: as "
                                           "fid.py; without them no rFID)")
    recon.add_argument("--vgg", help="torchvision vgg16-397923af.pth, for LPIPS with --lpips "
                                     "(default: no LPIPS)")
    recon.add_argument("--lpips", help="LPIPS v0.1 vgg.pth (linear heads), with --vgg "
                                       "(default: no LPIPS)")
    recon.add_argument("--num-workers", "--workers", type=int, default=4,
                       help="image decoding processes")
    run = p.add_argument_group("the run")
    run.add_argument("--out", help="the PNG, .npz or reconstruction folder (default: grid.png, "
                                   "samples.npz or recon)")
    run.add_argument("--per-proc-batch-size", type=int, default=64,
                     help="images each process samples (or reconstructs) at once")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cuda, cuda:N or cpu (under torchrun: each rank's GPU)")
    run.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                     help="on CUDA: bf16 autocast (TF32 for the rest) or float32 throughout; "
                          "a CPU runs float32")
    run.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                     help="the same as --precision fp32 (default: bf16)")
    run.add_argument("--overwrite", action="store_true", help="replace a finished --out")
    run.add_argument("--timeout", type=float, default=1800,
                     help="seconds a rank waits for the others in a collective")
    # names that mean another thing in train.py
    data.refuse_option(p, "--batch-size", "--per-proc-batch-size",
                       "train.py's --batch-size is the global batch")
    data.refuse_option(p, "--steps", "--num-sampling-steps",
                       "train.py's --steps are training steps")
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    npz = args.num_fid_samples is not None
    args.out = args.out or ("samples.npz" if npz else "grid.png" if not args.images else "recon")
    for bad, msg in [(args.seed < 0, "--seed must be a non-negative integer"),
                     (min(args.per_class, args.per_proc_batch_size, args.shard_size) < 1,
                      "sizes must be >= 1"),
                     (npz and args.classes is not None,
                      "--classes (grid) and --num-fid-samples (.npz) exclude each other"),
                     (npz and args.num_fid_samples < 1, "--num-fid-samples must be >= 1"),
                     (not npz and args.labels != "uniform",
                      "--labels applies to .npz mode (--num-fid-samples)"),
                     (npz and not args.out.endswith(".npz"),
                      "--out must end in .npz with --num-fid-samples"),
                     (args.class_names is not None and not os.path.isfile(args.class_names),
                      "no such --class-names file"),
                     ((args.vgg is None) != (args.lpips is None),
                      "--vgg and --lpips go together (LPIPS)")]:
        if bad:
            p.error(msg)
    try:
        args.sampling = Sampling(args.sampler, args.num_sampling_steps, args.cfg_scale,
                                 args.guidance_low, args.guidance_high, args.path_type)
    except ValueError as e:
        p.error(str(e))
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    finished = os.path.join(args.out, "metrics.json") if args.images else args.out
    if os.path.exists(finished) and not args.overwrite:
        p.error(f"{finished} exists; pass --overwrite to replace it or choose another --out")
    if not args.timeout > 0:
        p.error("--timeout must be > 0 seconds")
    return args


def prepare_out(args, rank):
    """Rank 0: refuse at the start an --out that cannot be written (its folder is created) or that
    another sample.py writes (-> the lock, held until the end: `<out>.lock`, or `.lock` inside the
    --images folder; None on other ranks); then clean what killed writes left. The lock comes first:
    the temps of a live run are not stale."""
    if rank != 0:
        return None
    folder = args.out if args.images else os.path.dirname(os.path.abspath(args.out))
    data.check_writable(folder)
    lock = data.lock_folder(os.path.join(args.out, ".lock") if args.images else args.out + ".lock")
    data.remove_stale_temps(args.out)
    parts = args.out + ".parts"
    for name in os.listdir(parts) if os.path.isdir(parts) else []:
        data.remove_stale_temps(os.path.join(parts, name.split(".tmp")[0]))
    return lock


def equal_labels(seed, n, num_classes):
    """--labels equal: n / num_classes samples of every class, in an order shuffled by the seed
    alone (the same on any resume or number of ranks) -> (n,) int64."""
    rng = np.random.default_rng(data.seed_for(seed, n, num_classes))
    return rng.permutation(np.repeat(np.arange(num_classes), n // num_classes))


def save_npz(path, chunks, shape, labels=None):
    """ADM .npz: arr_0 uint8 NHWC streamed from `chunks` in order, and arr_1 int64 class labels when
    given (as guided-diffusion's scripts/image_sample.py writes class-conditional batches); written
    atomically, with fixed zip timestamps, so the bytes depend on the images and labels only
    (np.savez stamps the current time)."""
    def entry(zf, name):
        return zf.open(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), "w",
                       force_zip64=True)

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with entry(zf, "arr_0.npy") as arr:
                np.lib.format.write_array_header_1_0(arr, {"descr": "|u1", "fortran_order": False,
                                                           "shape": tuple(shape)})
                for c in chunks:
                    arr.write(np.ascontiguousarray(c, dtype=np.uint8).tobytes())
            if labels is not None:
                with entry(zf, "arr_1.npy") as arr:
                    np.lib.format.write_array(arr, np.asarray(labels, dtype=np.int64))
    data.atomic_write(path, write)


def write_samples(args, model, tok, tokenizer_file, device, rank, world):
    """Generate args.num_fid_samples images (labels: --labels) into the ADM .npz args.out (arr_0
    images, arr_1 labels), resumably (see top), with its record beside it
    (data.sampling_record_path)."""
    parts = args.out + ".parts"
    n = args.num_fid_samples
    size = args.shard_size
    s = args.sampling

    def shard(i):
        return os.path.join(parts, f"shard_{i:06d}.npy")

    n_shards = math.ceil(n / size)
    meta = dict(ckpt=os.path.abspath(args.ckpt), weights=args.weights, tokenizer=args.tokenizer,
                num_samples=n, shard_size=size, seed=args.seed, sampler=s.solver, steps=s.steps,
                cfg=s.cfg_scale, guidance_low=s.guidance_low, guidance_high=s.guidance_high,
                path_type=s.path_type, labels=args.labels)
    fixed = None
    if args.labels == "equal":
        fixed = equal_labels(args.seed, n, model.config.num_classes)
    barrier = dist.barrier if world > 1 else (lambda: None)
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
        if not os.path.exists(os.path.join(parts, "meta.json")):
            data.atomic_write(os.path.join(parts, "meta.json"),
                              lambda f: f.write(json.dumps(meta, allow_nan=False).encode()))
    barrier()
    if json.load(open(os.path.join(parts, "meta.json"))) != json.loads(json.dumps(meta)):
        raise ValueError(f"{parts} was started with other settings; delete it or use the same ones")
    # same list on every rank
    missing = [i for i in range(n_shards) if not os.path.exists(shard(i))]
    barrier()
    count = 0
    start = time.time()
    # a signal ends each rank after the shard it is in; the finished shards stay for the rerun
    with data.GracefulStop(device) as stop:
        for i in tqdm(missing[rank::world], desc="shards", disable=rank != 0):
            idx = range(i * size, min(n, (i + 1) * size))
            out = []
            for b in range(0, len(idx), args.per_proc_batch_size):
                noise, labels, rngs = sample_inputs(
                    args.seed, idx[b:b + args.per_proc_batch_size], model.config.num_tokens,
                    model.config.token_dim, model.config.num_classes, device, fixed)
                images = generate_images(model, tok, noise, labels, s, rngs,
                                         amp=args.precision == "bf16")
                out.append(data.to_uint8(images))
            data.atomic_write(shard(i), lambda f: np.save(f, np.concatenate(out)))
            count += len(idx)
            if stop.signum:
                break
    # (images generated, ranks stopped by a signal, seconds)
    stats = torch.tensor([count, float(stop.signum != 0), time.time() - start], dtype=torch.float64,
                         device=device)
    if world > 1:
        dist.all_reduce(stats[:2])
        dist.all_reduce(stats[2:], op=dist.ReduceOp.MAX)
    if stats[1]:
        if rank == 0:
            done = sum(os.path.exists(shard(i)) for i in range(n_shards))
            print(f"stopped by a signal: {done} of {n_shards} shards are kept in {parts}; the same "
                  f"command continues", file=sys.stderr, flush=True)
        sys.exit(data.STOPPED)
    barrier()
    if rank == 0:
        first = np.load(shard(0), mmap_mode="r")
        # the labels again from (seed, k): the same on any resume
        cfg = model.config
        inputs = (sample_inputs(args.seed, range(i, min(n, i + 4096)), cfg.num_tokens,
                                cfg.token_dim, cfg.num_classes, torch.device("cpu"))
                  for i in range(0, n, 4096))
        labels = np.concatenate([y.numpy() for _, y, _ in inputs]) if fixed is None else fixed
        record = dict(generator=meta["ckpt"], tokenizer=tokenizer_file, weights=args.weights,
                      sampler=s.solver, steps=s.steps, cfg_scale=s.cfg_scale,
                      guidance_interval=[s.guidance_low, s.guidance_high],
                      path_type=s.path_type, seed=args.seed,
                      labels=args.labels, num_samples=n, num_classes=cfg.num_classes)
        # the record first: a kill between the two writes leaves the parts, and the rerun both
        data.atomic_write(data.sampling_record_path(args.out),
                          lambda f: f.write(json.dumps(record, indent=1, allow_nan=False).encode()))
        save_npz(args.out, (np.load(shard(i)) for i in range(n_shards)),
                 (n,) + first.shape[1:], labels)
        shutil.rmtree(parts)
        print(f"wrote {args.out}: {n} images; {stats[0]:.0f} generated in {stats[2]:.1f}s = "
              f"{stats[0] / max(stats[2].item(), 1e-9):.2f} images/s "
              "(sampling + decoding, all ranks)")


def write_grid(args, model, tok, class_names, device):
    """A PNG with one row of args.per_class samples per class; sample k's inputs are seeded by
    (seed, k)."""
    C = model.config.num_classes
    classes = args.classes or [c for c in DEMO_CLASSES if c < C] or list(range(min(C, 8)))
    if any(not 0 <= c < C for c in classes):
        raise ValueError(f"class ids must be in [0, {C}) for this generator")
    if args.class_names:
        class_names = open(args.class_names).read().splitlines()
        if len(class_names) < C:
            raise ValueError(f"--class-names {args.class_names} has {len(class_names)} lines "
                             f"for {C} classes; give one name per class")
    labels = [c for c in classes for _ in range(args.per_class)]
    start = time.time()
    out = []
    for b in range(0, len(labels), args.per_proc_batch_size):
        idx = range(b, min(len(labels), b + args.per_proc_batch_size))
        noise, _, rngs = sample_inputs(args.seed, idx, model.config.num_tokens,
                                       model.config.token_dim, C, device)
        y = torch.tensor(labels[b:b + len(idx)], device=device)
        images = generate_images(model, tok, noise, y, args.sampling, rngs,
                                 amp=args.precision == "bf16")
        out.append(data.to_uint8(images))
    secs = time.time() - start
    data.labelled_grid(np.concatenate(out), labels, class_names).save(args.out)
    print(f"wrote {args.out}: {len(labels)} images in {secs:.1f}s = "
          f"{len(labels) / secs:.2f} images/s (sampling + decoding)")


def reconstruct(args, device, rank, world):
    """Tokenizer evaluation: the ADM centre crops of every image under args.images, reconstructed
    -> OUT/recon/NNNNNN.png, OUT/recon.npz (ADM arr_0, arr_1 folder labels), OUT/per_image.csv
    (psnr capped at fid.PSNR_CAP, ssim_gaussian, ssim_official and with --vgg/--lpips lpips, per
    image) and OUT/metrics.json (their means, and rFID when the Inception weights are there).
    Rank r takes images r, r + world, ..., batch by batch (memory does not grow with the images);
    the Inception statistics are all-reduced, rank 0 merges the per-image parts."""
    tok = load_tokenizer(args.ckpt, args.config).to(device)
    ds = data.ImageFolderDataset(args.images, tok.config.image_size, crop="center")
    mine, loader = data.rank_loader(ds, rank, world, args.per_proc_batch_size, args.num_workers,
                                    device.type == "cuda")
    # VGG16 + the LPIPS v0.1 heads
    lpips = LPIPS(args.vgg, args.lpips).to(device) if args.vgg else None
    weights = (args.inception or os.environ.get("SOFTVQ_INCEPTION")
               or os.path.expanduser(fid.DEFAULT_INCEPTION))
    net = fid.load_inception(weights, device) if len(ds) >= 2 and os.path.isfile(weights) else None
    # Inception features of the real crops, of the reconstructions
    stats = [data.Moments(), data.Moments()]
    os.makedirs(os.path.join(args.out, "recon"), exist_ok=True)
    # per image, float64
    table = {"psnr": [], "ssim_gaussian": [], "ssim_official": [],
             **({"lpips": []} if lpips else {})}
    skipped = 0
    done = 0
    start = time.time()
    for images, _, bad in tqdm(loader, desc="reconstruct", disable=rank != 0):
        x = data.to_model_range(images.to(device, non_blocking=True))  # (B, 3, H, W) in [-1, 1]
        with bf16_autocast(device, args.precision == "bf16"):
            out = tok(x)[0].float().clamp(-1, 1)
        recon = data.to_uint8(out)  # (B, H, W, 3) numpy
        # the crops and their reconstructions, uint8 (B, 3, H, W)
        a = images.to(device)
        b = torch.from_numpy(recon).to(device).permute(0, 3, 1, 2)
        for name, values in fid.pair_scores(a, b).items():
            table[name].append(values.cpu())
        if lpips:
            lp = lpips(a.float() / 127.5 - 1, b.float() / 127.5 - 1)
            table["lpips"].append(lp.double().cpu())
        if net is not None:
            for rs, u8 in zip(stats, (a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1))):
                rs.update(fid.inception_features(u8, net, batch_size=args.per_proc_batch_size))
        skipped += int(bad)
        for k, img in zip(mine[done:done + len(out)], recon):
            Image.fromarray(img).save(os.path.join(args.out, "recon", f"{k:06d}.png"))
        done += len(out)
    part = {"index": np.array(mine, np.int64), "seconds": time.time() - start, "skipped": skipped,
            **{k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in table.items()}}
    np.savez(os.path.join(args.out, f"part{rank}.npz"), **part)
    if net is not None:
        # the ranks' feature moments merged into those of the whole set
        for moments in stats:
            moments.all_reduce(device)
    if world > 1:
        dist.barrier()
    if rank == 0:
        rfid = None
        if net is not None:
            rfid = fid.frechet_distance(*stats[0].compute(), *stats[1].compute())
        score_reconstructions(args, ds, world, rfid)


def score_reconstructions(args, ds, world, rfid):
    """Rank 0: merge the parts into per_image.csv, metrics.json and recon.npz (streamed from the
    PNGs)."""
    parts = [dict(np.load(os.path.join(args.out, f"part{r}.npz"))) for r in range(world)]
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    table = {k: np.concatenate([p[k] for p in parts])[order]
             for k in ("psnr", "ssim_gaussian", "ssim_official", "lpips") if k in parts[0]}
    n = len(order)
    metrics = {"images": n, "skipped_unreadable": int(sum(p["skipped"] for p in parts)),
               **{k: float(v.mean()) for k, v in table.items()},
               "images_per_s": round(n / max(float(p["seconds"]) for p in parts), 2)}
    if rfid is not None:
        metrics["rfid"] = rfid
    else:
        print("rFID skipped: no Inception weights or fewer than 2 images "
              "(see `python fid.py --help`)")
    # strict JSON, checked before anything is written or removed: a non-finite value (NaN, inf)
    # fails here instead of writing `NaN`/`Infinity`, which JSON (RFC 8259) does not allow
    metrics_json = json.dumps(metrics, indent=1, allow_nan=False)
    pngs = [os.path.join(args.out, "recon", f"{k:06d}.png") for k in range(n)]
    first = np.asarray(Image.open(pngs[0]))
    batch = args.per_proc_batch_size
    chunks = (np.stack([np.asarray(Image.open(p)) for p in pngs[i:i + batch]])
              for i in range(0, n, batch))
    save_npz(os.path.join(args.out, "recon.npz"), chunks, (n,) + first.shape, np.array(ds.labels))

    # a path as a CSV (RFC 4180) field: relative to --images, quoted
    def quote(p):
        return '"' + os.path.relpath(p, args.images).replace('"', '""') + '"'

    rows = ["index,path," + ",".join(table)]
    rows += [f"{i},{quote(ds.paths[i])}," + ",".join(f"{v[i]:.6f}" for v in table.values())
             for i in range(n)]
    data.atomic_write(os.path.join(args.out, "per_image.csv"),
                      lambda f: f.write("\n".join(rows).encode() + b"\n"))
    if "lpips" not in table:
        print("LPIPS skipped: pass --vgg vgg16-397923af.pth --lpips vgg.pth")
    for r in range(world):
        os.remove(os.path.join(args.out, f"part{r}.npz"))
    data.atomic_write(os.path.join(args.out, "metrics.json"),
                      lambda f: f.write(metrics_json.encode()))
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in metrics.items()))


@torch.no_grad()  # scoped: callers that import sample keep their grad mode
def main(argv=None):
    args = parse_args(argv)
    with data.user_errors():
        rank, world, device = data.setup_distributed(args.device, args.timeout,
                                                     tf32=args.precision == "bf16")
        lock = None
        try:
            with data.refusals_once():
                lock = prepare_out(args, rank)
            if args.images:
                return reconstruct(args, device, rank, world)
            npz = args.num_fid_samples is not None
            if not npz and rank != 0:
                return  # a grid is one process's job
            model, info = load_generator(args.ckpt, args.config, args.weights)
            classes = model.config.num_classes
            if npz and args.labels == "equal":
                # every rank is here (a grid is rank 0's alone)
                with data.refusals_once():
                    if args.num_fid_samples % classes:
                        raise ValueError(f"--labels equal needs --num-fid-samples "
                                         f"{args.num_fid_samples} "
                                         f"to be a multiple of the model's {classes} classes")
            tok = load_tokenizer_for(model, info, args.tokenizer, args.tokenizer_config)
            tokenizer_file = args.tokenizer or (info or {}).get("path")
            if tokenizer_file is not None:
                tokenizer_file = os.path.abspath(tokenizer_file)
            model = model.to(device)
            tok = tok.to(device).eval()
            if device.type == "cuda" and args.precision == "bf16":
                # bf16 weights once, not a cast of every fp32 weight at every step: autocast
                # caches its casts only of weights that require grad. Under autocast the outputs
                # are the same.
                cast_autocast_weights(model, torch.bfloat16)
                cast_autocast_weights(tok, torch.bfloat16)
            # the compiled module passes attributes (.config) through
            net = torch.compile(model) if device.type == "cuda" else model
            if npz:
                write_samples(args, net, tok, tokenizer_file, device, rank, world)
            else:
                write_grid(args, net, tok, (info or {}).get("classes"), device)
        finally:
            data.unlock(lock)
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
