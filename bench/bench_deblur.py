"""Speed of `python -m trainer deblur`: alignment and tiled inference, seconds per megapixel per frame.

    .venv/bin/python bench/bench_deblur.py                           # CPU: 1 MP x 4 frames, width 16 and 64
    .venv/bin/python bench/bench_deblur.py --device cuda --megapixels 12 --frames 8 --widths 64 \
        [--precision bf16] [--batch 2]                               # the 12 MP x 8 target (< 10 s on an H100)
    .venv/bin/python bench/bench_deblur.py --megapixels 12 --frames 8 --command --widths shipped --fba
                                                                     # the user's command end to end, then its stages

A synthetic burst (a photograph upscaled to the requested size, each frame shifted by a few
pixels, blurred differently and noisy, uint8) goes through the same functions the command uses:
``align_burst`` (pyramid phase correlation + Lucas-Kanade homography, full-resolution OpenCV
warp; bench/bench_warp.py times the warp alone) and ``run_tiled`` (the model on overlapping tiles,
automatic overlap). The model has random weights: speed does not depend on them. Warm-up
(receptive-field probe, first forward pass, cuDNN autotuning) is excluded. Prints one row per
model width: seconds for each stage, s/MP/frame, tiles, peak GPU memory. Wall clock
(time.perf_counter); on a shared machine, the CPU figures are upper bounds.

``--command`` first writes the burst as JPEG files (quality 95) and times the command a user runs,
``python -m trainer deblur FRAMES --out OUT.png`` with its defaults (the shipped model), in a child
process: decoding, alignment, tiles and writing the PNG, start-up included, and the child's peak
resident memory.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trainer.align  # noqa: E402
from trainer.align import align_burst  # noqa: E402
from trainer.device import resolve_device  # noqa: E402
from trainer.tiling import auto_overlap, run_tiled, tile_starts  # noqa: E402
from trainer.model import SHIPPED, ModelConfig, build_model, load  # noqa: E402


def synthetic_burst(megapixels: float, frames: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """``frames`` RGB uint8 views (4:3) of one scene: sub-pixel shifts, per-frame blur, noise.

    Returns (frames, shifts float (frames, 2) as (dx, dy)): frame i shows scene(x + shift_i)."""
    rng = np.random.default_rng(seed)
    width = int(round(np.sqrt(megapixels * 1e6 * 4 / 3) / 8)) * 8
    height = int(round(width * 3 / 4 / 8)) * 8
    photo = skimage.data.astronaut().astype(np.float32)
    scale = max(height, width) / 480 + 0.05
    base = zoom(photo, (scale, scale, 1), order=1)  # a margin for the shifts
    out, shifts = [], []
    for _ in range(frames):
        dy, dx = rng.uniform(-6, 6, size=2) + 8
        shifts.append((dx, dy))
        ys = np.arange(height, dtype=np.float32)[:, None] + dy
        xs = np.arange(width, dtype=np.float32)[None, :] + dx
        yy, xx = np.broadcast_arrays(ys, xs)
        frame = np.empty((height, width, 3), np.float32)
        for c in range(3):
            sampled = map_coordinates(base[..., c], [yy, xx], order=1)
            frame[..., c] = gaussian_filter(sampled, rng.uniform(0.3, 2.0))
        frame += rng.normal(0, 2.0, frame.shape).astype(np.float32)
        out.append(np.clip(np.rint(frame), 0, 255).astype(np.uint8))
    return out, np.array(shifts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_command(burst: list[np.ndarray], extra: list[str]) -> None:
    """Write ``burst`` as JPEGs and time ``python -m trainer deblur`` on them in a child process."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench-deblur-") as tmp:
        paths = []
        for i, frame in enumerate(burst):
            paths.append(str(Path(tmp) / f"frame{i}.jpg"))
            Image.fromarray(frame).save(paths[-1], quality=95)
        cmd = [sys.executable, "-m", "trainer", "deblur", *paths, "--out", str(Path(tmp) / "out.png"), "--quiet", *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
        wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"command: python -m trainer deblur {len(burst)} JPEG frames --out out.png {' '.join(extra)}".rstrip()
          + f": {wall:.1f} s wall (start-up, decoding, alignment, tiles, PNG), peak memory {peak:.2f} GB", flush=True)


def levers(args, aligned: list[np.ndarray], device: torch.device, batch: int, mp: float) -> int:
    """The shipped model on ``aligned`` under each lever, alternated, best of ``args.rounds``.

    A compiled lever's first run (compiling one graph per tile shape) is timed apart. The
    difference to eager fp32 at 512 px (the old default) is the max |diff| and the PSNR (dB, of
    float outputs in [0, 1]) over the image."""
    from trainer.metrics import psnr

    model = load(SHIPPED, device)
    tiles = [int(t) for t in args.lever_tiles.split(",")]
    cases = [("eager", "fp32", 512), ("eager", "bf16", 512)]
    cases += [(mode, prec, t) for t in tiles for mode, prec in (("compiled", "fp32"), ("compiled", "bf16"))]
    overlap = auto_overlap(model.cfg)
    run_tiled(model, [f[:64, :64] for f in aligned], 64, overlap, device, batch)  # warm-up (eager)
    best, first, outs = {}, {}, {}
    for r in range(args.rounds):
        for case in cases:
            mode, prec, t = case
            t0 = time.perf_counter()
            out = run_tiled(model, aligned, t, overlap, device, batch, prec, compile=mode == "compiled")
            s = time.perf_counter() - t0
            if mode == "compiled" and case not in first:
                first[case] = s  # includes compiling
                continue
            best[case] = min(best.get(case, float("inf")), s)
            outs[case] = out
        load_avg = " ".join(open("/proc/loadavg").read().split()[:3])
        print(f"round {r + 1} done, load average {load_avg}", flush=True)
    ref = outs[cases[0]]
    print(f"{'mode':>8} {'prec':>4} {'tile':>5} {'best s':>7} {'s/MP/fr':>8} {'x today':>7} {'1st run s':>9} "
          f"{'max|diff|':>9} {'PSNR dB':>8}")
    for case in cases:
        if case not in best:
            continue
        diff = float(np.abs(outs[case] - ref).max())
        score = psnr(outs[case].astype(np.float64), ref.astype(np.float64), 1.0) if diff > 0 else float("inf")
        print(f"{case[0]:>8} {case[1]:>4} {case[2]:>5} {best[case]:>7.2f} {best[case] / mp / len(aligned):>8.3f} "
              f"{best[cases[0]] / best[case]:>7.2f} {first.get(case, float('nan')):>9.1f} {diff:>9.2e} {score:>8.2f}")
    print(f"peak host memory {peak_rss_gb():.2f} GB")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    p.add_argument("--megapixels", type=float, default=1.0, help="image size, 4:3 (default: 1)")
    p.add_argument("--frames", type=int, default=4, help="frames in the burst (default: 4)")
    p.add_argument("--widths", default="16,64",
                   help="model widths (random weights; 64 = the paper-size model), 'shipped' or checkpoint paths "
                        "(*.pt); 'none' = alignment only (default: 16,64)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch", type=int, default=0, help="tiles per pass (default: 2 on CUDA, 1 on CPU)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time reported apart)")
    p.add_argument("--levers", action="store_true",
                   help="with --widths shipped: alternate eager/compiled x fp32/bf16 (and tile sizes, --lever-tiles) "
                        "on the aligned burst, best of --rounds, with the difference to eager fp32")
    p.add_argument("--lever-tiles", default="512,1024", help="tile sizes for --levers (default: 512,1024)")
    p.add_argument("--rounds", type=int, default=2, help="rounds for --levers (default: 2)")
    p.add_argument("--fba", action="store_true", help="also time Fourier Burst Accumulation (trainer/fba.py, a guided model's guide) on the aligned burst")
    p.add_argument("--no-align", action="store_true", help="time the model only")
    p.add_argument("--command", action="store_true",
                   help="first time `python -m trainer deblur` itself on the burst written as JPEGs (defaults, "
                        "shipped model; --precision bf16 passed on), in a child process")
    p.add_argument("--warp", choices=("opencv", "scipy"), default="opencv",
                   help="full-resolution warp: opencv (what deblur uses) or the scipy band warp it replaced, "
                        "from bench/bench_warp.py (default: opencv)")
    args = p.parse_args(argv)
    if args.warp == "scipy":
        from bench_warp import scipy_warp_frame

        trainer.align.warp_frame = scipy_warp_frame  # align_burst looks the warp up at call time

    device = resolve_device(args.device)
    batch = args.batch or (2 if device.type == "cuda" else 1)
    t0 = time.perf_counter()
    burst, shifts = synthetic_burst(args.megapixels, args.frames)
    h, w = burst[0].shape[:2]
    mp = h * w / 1e6
    print(f"burst: {args.frames} frames of {w}x{h} ({mp:.2f} MP), made in {time.perf_counter() - t0:.1f} s; "
          f"device {device}, {torch.get_num_threads()} CPU threads, tile {args.tile}, batch {batch}, {args.precision}")

    if args.command:
        time_command(burst, ["--precision", "bf16"] if args.precision == "bf16" else [])

    align_s = 0.0
    aligned = burst
    if not args.no_align:
        t0 = time.perf_counter()
        aligned, ref, alignments = align_burst(burst)
        align_s = time.perf_counter() - t0
        # frame i(x + s_ref - s_i) = frame ref(x): the true shift of the centre
        errors = [np.hypot(*(np.array(a.shift) - (shifts[ref] - shifts[i])))
                  for i, a in enumerate(alignments) if a is not None]
        print(f"alignment ({args.warp} warp, reference: frame {ref}): {align_s:.2f} s = "
              f"{align_s / mp / args.frames:.3f} s/MP/frame, "
              f"centre shift error max {max(errors, default=0):.3f} px")

    if args.fba:
        # trainer/fba.py: the evaluation's FBA (baselines.fba) in float32 torch, frame by frame;
        # also the guide a guide = "fba" model computes once per burst inside run_tiled
        from trainer.fba import fba_frames

        t0 = time.perf_counter()
        fba_frames(aligned, device)
        fba_s = time.perf_counter() - t0
        print(f"FBA on the aligned burst (trainer/fba.py): {fba_s:.2f} s = {fba_s / mp / args.frames:.3f} s/MP/frame, "
              f"peak host memory so far {peak_rss_gb():.2f} GB")
    if args.levers:
        return levers(args, aligned, device, batch, mp)

    header = (f"{'width':>5} {'params':>8} {'overlap':>7} {'tiles':>5} {'align s':>8} {'model s':>8} "
              f"{'total s':>8} {'model s/MP/fr':>13} {'total s/MP/fr':>13} {'peak GPU GB':>11} {'peak host GB':>12}")
    rows = []
    widths = [] if args.widths == "none" else args.widths.split(",")
    for width in widths:
        if width == "shipped" or width.endswith(".pt"):
            model = load(SHIPPED if width == "shipped" else width, device)
            cfg = model.cfg
        else:
            cfg = ModelConfig(width=int(width))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = build_model(cfg).to(device).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        overlap = auto_overlap(cfg)  # warm-up: the receptive-field probe is cached
        tiles = (len(tile_starts(h, args.tile, overlap, cfg.multiple))
                 * len(tile_starts(w, args.tile, overlap, cfg.multiple)))
        (y0, y1), (x0, x1) = tile_starts(h, args.tile, overlap, cfg.multiple)[0], tile_starts(w, args.tile, overlap, cfg.multiple)[0]
        warm = [f[y0:y1, x0:x1] for f in aligned]  # the first tile's shape: compiled once
        t0 = time.perf_counter()
        run_tiled(model, warm, args.tile, overlap, device, batch, args.precision, compile=args.compile)  # warm-up
        warm_s = time.perf_counter() - t0
        if args.compile:
            print(f"compile + first tile: {warm_s:.1f} s (a tile shape not seen yet compiles again in the run)")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        run_tiled(model, aligned, args.tile, overlap, device, batch, args.precision, compile=args.compile)
        sync(device)
        model_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        total = align_s + model_s
        label = Path(width).stem if width.endswith(".pt") else str(width)
        rows.append(f"{label:>5} {params:>7.2f}M {overlap:>7} {tiles:>5} {align_s:>8.2f} {model_s:>8.2f} {total:>8.2f} "
                    f"{model_s / mp / args.frames:>13.3f} {total / mp / args.frames:>13.3f} {peak:>11.2f} {peak_rss_gb():>12.2f}")
        print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
