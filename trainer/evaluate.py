"""Score a checkpoint on a split of rendered shards, against the classical baselines.

    python -m trainer evaluate --checkpoint runs/default/best.pt --data shards/default --split test --out runs/default/eval

For every sample of the split one order of its stored frames is drawn with numpy
Generator(SeedSequence([seed, sample index])), the reference frame 0 first; burst length N (default
1..min(8, stored frames)) takes the first N frames of that order. So the subsets are nested: going
from N to N + 1 adds one frame and changes nothing else, and a PSNR curve over N measures what
another frame brings (independent draws per N, as before 2026-12-02, moved every method's curve
by up to 0.2 dB from one N to the next). The result does not depend on batching or devices and
every method sees the same frames in the same order. Methods: ``model`` (the checkpoint, fp32 with TF32 off, output clipped to
[0, 1]), ``fba`` (Fourier Burst Accumulation), ``mean``, ``first`` (first frame of the subset),
``best`` (oracle: the subset's frame with the best PSNR against the target). Metrics: PSNR and
SSIM of trainer/metrics.py on sRGB in [0, 1] (uint8 / 255), whole image, no border crop. The
target has the geometry the model's output has (``trainer.data.geometry_target``): the stored
target for a "reference" model or registered frames; for a "mean" model and misaligned frames,
the stored target moved to the mean shift of the subset's frames (every method is scored against
that same target).

Outputs in --out (default: <checkpoint folder>/eval-<split>; without --checkpoint, for the bundled
model, runs/shipped/eval-<split> under the current directory: never inside the package):
- metrics.csv: one row per (sample, method, N): key, method, frames (N), subset (the stored frame
  indices used, in order), psnr, ssim.
- summary.json: per method and N the mean PSNR/SSIM with a 95% interval, normal approximation
  mean ± 1.96·s/sqrt(n) (s: sample standard deviation over the n samples); and the paired
  differences model - fba, model - mean and model - best, whose intervals say whether the gap is
  real; "examples": the keys examples.png shows and why each was chosen.
- psnr_vs_frames.png, ssim_vs_frames.png: mean PSNR / SSIM against N per method, the model's
  interval as a band, the baselines' as thin error bars.
- difference_vs_frames.png: the paired differences model - FBA / mean / best frame (PSNR and
  SSIM) against N with their intervals and a zero line.
- examples.png: --examples samples at the largest N, chosen to inform (``choose_examples``: the
  most blurred, the median blur, the largest loss to FBA; a second pass over the split renders
  them): input frames, mean, FBA, model, target, each with PSNR/SSIM; a zoom on the 64 px box
  where the model's error is largest; |image - target| maps on one scale per example.
- report.html: one self-contained page (images as data: URIs, no scripts, opens offline): header
  (checkpoint, dataset, split, samples, software versions), the PSNR/SSIM tables and the paired
  differences with their intervals, the three plots and the examples (``trainer.eval_report``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError
from common.files import atomic_path
from common.version import add_version
from pipeline.format import as_location
from trainer import baselines
from trainer import eval_report as report
from trainer.checkpoint import peek, software_versions
from trainer.data import frame_shifts, geometry_target, iter_samples, read_manifest, reference_subset, split_shards
from trainer.device import burst_to_input, resolve_device
from trainer.metrics import psnr, ssim

METHODS = ("model", "fba", "mean", "first", "best")
Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
EXAMPLE_FRAMES = 3  # input frames shown per example row


# where `evaluate` without --checkpoint and --out writes (relative to the current directory)
SHIPPED_OUT = Path("runs") / "shipped"


def frame_subset(seed: int, sample_index: int, n: int, stored: int) -> np.ndarray:
    """The N stored-frame indices (int64, in the order used) that every method sees for a sample:
    the first N of the sample's frame order, which starts with the reference frame 0 and goes on
    with the others in an order drawn once per (seed, sample) (``trainer.data.reference_subset``).
    Nested: the subset for N is the one for N - 1 plus one frame."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, sample_index])))
    return reference_subset(rng, stored, stored)[:n]


def interval(values) -> dict:
    """{"mean", "lo", "hi", "n"}: mean with a 95% normal-approximation interval (None if n < 2)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2 or not np.isfinite(x).all():
        return {"mean": mean if math.isfinite(mean) else None, "lo": None, "hi": None, "n": len(x)}
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(len(x))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(x)}


@contextmanager
def exact_fp32():
    """Turn off TF32 (on by default for cuDNN convs on Ampere+) so CUDA numbers are true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@torch.no_grad()
def run_model(model: torch.nn.Module, bursts: np.ndarray, device: torch.device) -> np.ndarray:
    """bursts uint8 (B, N, H, W, 3) sRGB -> float64 (B, H, W, 3) in [0, 1] (model output clipped)."""
    x = burst_to_input(torch.from_numpy(bursts), device)
    out = model(x).float().clamp_(0, 1)
    return out.permute(0, 2, 3, 1).double().cpu().numpy()


def evaluate(checkpoint: str | Path, data_dir: str | Path, split: str = "test", out_dir: str | Path | None = None,
             frames: list[int] | None = None, seed: int = 0, device: str = "auto", batch: int = 8,
             examples: int = 4, progress: bool = True) -> dict:
    """Evaluate; write metrics.csv, summary.json, the plots, examples.png, report.html; return the summary.

    Raises FileNotFoundError / ValueError (one line) for a missing or bad checkpoint, data folder,
    split, or a burst length the data does not hold, before any work is done.
    """
    from trainer.model import load

    checkpoint, data_dir = Path(checkpoint), as_location(data_dir)  # a folder or a dataset URL
    manifest = read_manifest(data_dir)
    split_shards(data_dir, manifest, split)  # missing split / shards: fail now, not mid-run
    stored, size = manifest.frames, manifest.size
    lengths = list(range(1, min(8, stored) + 1)) if frames is None else sorted(set(frames))
    bad = [n for n in lengths if not 1 <= n <= stored]
    if bad:
        raise UserError(f"--frames {bad[0]}: the dataset stores {stored} frames per sample (use 1..{stored})")
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent / f"eval-{split}"
    dev = resolve_device(device)
    model = load(checkpoint, dev)
    geometry = model.cfg.geometry  # where its output sits for misaligned frames: the targets follow
    out_dir.mkdir(parents=True, exist_ok=True)
    total = manifest.split(split).samples
    dataset = manifest.name

    rows: list[dict] = []  # key, method, frames, subset, psnr, ssim, order
    at_largest: list[dict] = []  # per sample at the largest N: what choose_examples ranks
    bar = tqdm(total=total, desc=f"evaluate {split}", unit="sample", disable=not progress)
    chunk: list[tuple[int, dict]] = []

    def flush() -> None:
        for n in lengths:
            subsets = [frame_subset(seed, index, n, stored) for index, _ in chunk]
            bursts = np.stack([s["burst"][subset] for (_, s), subset in zip(chunk, subsets)])
            with exact_fp32():
                outputs = run_model(model, bursts, dev)
            for (index, sample), subset, burst, output in zip(chunk, subsets, bursts, outputs):
                images, target, _ = method_images(sample, subset, burst, output, stored, geometry)
                text = " ".join(str(int(i)) for i in subset)
                scores = {}
                for order, method in enumerate(METHODS):
                    scores[method] = (psnr(images[method], target), ssim(images[method], target))
                    rows.append({"key": sample["key"], "method": method, "frames": n, "subset": text,
                                 "psnr": scores[method][0], "ssim": scores[method][1], "order": (index, n, order)})
                if n == lengths[-1]:
                    at_largest.append({"index": index, "key": sample["key"], "scores": scores,
                                       "blur": subset_blur(sample["meta"], subset)})
        bar.update(len(chunk))
        chunk.clear()

    for index, sample in enumerate(iter_samples(data_dir, split)):
        chunk.append((index, sample))
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    bar.close()
    if not rows:
        raise UserError(f"{data_dir}: split '{split}' has no samples")
    rows.sort(key=lambda r: r["order"])  # sample, N, method: the same file for any --batch

    summary = summarize(rows, lengths)
    picks = choose_examples(at_largest, examples)
    summary.update({"checkpoint": str(checkpoint), "data": str(data_dir), "dataset": dataset, "split": split,
                    "seed": seed, "device": str(dev), "stored_frames": stored, "size": size,
                    "config_hash": manifest.config_hash,
                    "examples": [{"key": p["key"], "reason": p["reason"]} for p in picks]})
    write_csv(rows, out_dir / "metrics.csv")
    _write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    title = f"{dataset}/{split} ({summary['samples']} samples), checkpoint {checkpoint.parent.name}/{checkpoint.name}"
    figures = {"PSNR vs burst length": out_dir / "psnr_vs_frames.png",
               "SSIM vs burst length": out_dir / "ssim_vs_frames.png",
               "Paired differences vs burst length": out_dir / "difference_vs_frames.png"}
    report.plot_metric(summary, "psnr", figures["PSNR vs burst length"], title)
    report.plot_metric(summary, "ssim", figures["SSIM vs burst length"], title)
    report.plot_differences(summary, figures["Paired differences vs burst length"], title)
    if picks:  # a second pass over the split renders only the chosen samples
        shown = render_examples(model, dev, data_dir, split, picks, lengths[-1], seed, stored, geometry)
        report.plot_examples(shown, out_dir / "examples.png", title)
        figures["Examples"] = out_dir / "examples.png"
    versions = {"checkpoint": peek(checkpoint).get("versions"), "evaluate": software_versions()}
    report.write_html(summary, out_dir / "report.html", figures, versions)
    return summary


def method_images(sample: dict, subset: np.ndarray, burst: np.ndarray, output: np.ndarray, stored: int,
                  geometry: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """({method: float64 (H, W, 3) in [0, 1]}, target float64 (H, W, 3), burst float64 (N, H, W, 3))
    for one sample: ``burst`` uint8 (N, H, W, 3) sRGB holds its ``subset`` frames, ``output`` is the
    model's; the target sits in the model's output geometry."""
    shifts = frame_shifts(sample["meta"], stored)[subset]
    target = geometry_target(sample["target"], shifts, geometry).astype(np.float64) / 255
    burst = burst.astype(np.float64) / 255
    images = {"model": output, "fba": baselines.fba(burst), "mean": baselines.mean_frames(burst),
              "first": baselines.first_frame(burst), "best": baselines.best_frame(burst, target)}
    return images, target, burst


def subset_blur(meta: dict, subset: np.ndarray) -> float | None:
    """Mean RMS kernel radius (px) of the subset's frames, from the sample's parameters
    ("kernel_radius_px", one per stored frame); None for data that does not record it."""
    radius = meta.get("kernel_radius_px")
    if not isinstance(radius, list) or len(radius) <= int(np.max(subset)):
        return None
    return float(np.mean([radius[int(i)] for i in subset]))


def _finite(x: float, default: float) -> float:
    return x if math.isfinite(x) else default


def choose_examples(samples: list[dict], count: int) -> list[dict]:
    """The ``count`` samples examples.png shows, each once, with why: the most blurred (largest
    mean kernel radius of the frames used, or, without radii, the lowest mean-of-frames PSNR), the
    one where the model loses most to FBA (lowest model - FBA PSNR), one of median blur, then more
    of the most blurred. ``samples``: {"index", "key", "scores": {method: (psnr, ssim)}, "blur"} at
    the largest N. Ties go to the lower sample index, so the choice is deterministic. Returns
    {"index", "key", "reason"} in display order (blurred, median, loss)."""
    if count <= 0 or not samples:
        return []
    if all(s["blur"] is not None for s in samples):
        blur_key = lambda s: -s["blur"]  # noqa: E731
        blur_text = lambda s: f"kernel RMS radius {s['blur']:.2f} px (mean over its frames)"  # noqa: E731
    else:
        blur_key = lambda s: _finite(s["scores"]["mean"][0], math.inf)  # noqa: E731
        blur_text = lambda s: f"mean of frames {s['scores']['mean'][0]:.2f} dB"  # noqa: E731
    by_blur = sorted(samples, key=lambda s: (blur_key(s), s["index"]))
    rank = {s["index"]: r for r, s in enumerate(by_blur)}
    middle = (len(by_blur) - 1) // 2
    loss = lambda s: _finite(s["scores"]["model"][0] - s["scores"]["fba"][0], math.inf)  # noqa: E731
    orders = {"blurred": by_blur,
              "loss": sorted(samples, key=lambda s: (loss(s), s["index"])),
              "median": sorted(samples, key=lambda s: (abs(rank[s["index"]] - middle), s["index"]))}
    reasons = {"blurred": lambda s: f"most blurred ({rank[s['index']] + 1} of {len(samples)}): {blur_text(s)}",
               "median": lambda s: f"median blur ({rank[s['index']] + 1} of {len(samples)}): {blur_text(s)}",
               "loss": lambda s: f"largest loss to FBA: model − FBA = {loss(s):+.2f} dB"}
    plan = (["blurred", "loss", "median"] + ["blurred"] * count)[:min(count, len(samples))]
    chosen: dict[int, tuple[str, dict]] = {}
    for why in plan:
        s = next(s for s in orders[why] if s["index"] not in chosen)
        chosen[s["index"]] = (why, s)
    display = {"blurred": 0, "median": 1, "loss": 2}
    picks = sorted(chosen.values(), key=lambda p: (display[p[0]], rank[p[1]["index"]]))
    return [{"index": s["index"], "key": s["key"], "reason": reasons[why](s), "scores": s["scores"]}
            for why, s in picks]


def render_examples(model, dev, data_dir, split: str, picks: list[dict], n: int, seed: int, stored: int,
                    geometry: str) -> list[dict]:
    """The images of the chosen samples at burst length ``n`` (the frames every method saw), as
    ``trainer.eval_report.plot_examples`` takes them; scores from the first pass (metrics.csv's)."""
    wanted = {p["index"]: p for p in picks}
    found = {}
    for index, sample in enumerate(iter_samples(data_dir, split)):
        if index in wanted:
            subset = frame_subset(seed, index, n, stored)
            burst = sample["burst"][subset]
            with exact_fp32():
                output = run_model(model, burst[None], dev)[0]
            images, target, frames = method_images(sample, subset, burst, output, stored, geometry)
            shown = frames[:EXAMPLE_FRAMES]
            found[index] = {"key": sample["key"], "reason": wanted[index]["reason"], "subset": subset,
                            "frames": shown, "frame_scores": [(psnr(f, target), ssim(f, target)) for f in shown],
                            "images": {m: images[m] for m in ("mean", "fba", "model")}, "target": target,
                            "scores": wanted[index]["scores"]}
            if len(found) == len(wanted):
                break
    return [found[p["index"]] for p in picks]


def summarize(rows: list[dict], lengths: list[int]) -> dict:
    """Per method and N: PSNR and SSIM intervals; paired model - baseline PSNR differences."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["frames"]), []).append(r)
    methods = {m: {str(n): {"psnr": interval([r["psnr"] for r in by[m, n]]),
                            "ssim": interval([r["ssim"] for r in by[m, n]])}
                   for n in lengths} for m in METHODS}
    differences = {}
    for other in ("fba", "mean", "best"):
        differences[f"model-{other}"] = {
            str(n): {"psnr": interval([a["psnr"] - b["psnr"] for a, b in zip(by["model", n], by[other, n])]),
                     "ssim": interval([a["ssim"] - b["ssim"] for a, b in zip(by["model", n], by[other, n])])}
            for n in lengths}
    return {"samples": len(by[METHODS[0], lengths[0]]), "frames": lengths,
            "interval": "95%, normal approximation: mean ± 1.96·s/sqrt(n), s = sample std over the n samples",
            "methods": methods, "differences": differences}


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "method", "frames", "subset", "psnr", "ssim"])
        for r in rows:
            writer.writerow([r["key"], r["method"], r["frames"], r["subset"], f"{r['psnr']:.4f}", f"{r['ssim']:.5f}"])


def format_table(summary: dict) -> str:
    """Method x N table of mean PSNR (dB) and, below, mean SSIM."""
    lengths = summary["frames"]
    lines = []
    for metric, fmt in (("psnr", "{:8.2f}"), ("ssim", "{:8.4f}")):
        lines.append(f"{metric.upper():<8}" + "".join(f"{'N=' + str(n):>8}" for n in lengths))
        for method in METHODS:
            cells = []
            for n in lengths:
                mean = summary["methods"][method][str(n)][metric]["mean"]
                cells.append(f"{'-':>8}" if mean is None else fmt.format(mean))
            lines.append(f"{method:<8}" + "".join(cells))
        lines.append("")
    return "\n".join(lines).rstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer evaluate",
        description="Score a checkpoint on a split of rendered shards against FBA, mean, first and "
                    "best (oracle) frame, for every burst length: PSNR/SSIM table, CSV, JSON, plots.")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint written by `python -m trainer train` (default: the shipped model, "
                        "models/burst-deblur.pt)")
    p.add_argument("--data", required=True, help="a dataset folder written by `python -m pipeline render`, or its URL "
                                                 "(http(s)://, or s3://, gs://, ... with fsspec)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval-<split>; "
                   "runs/shipped/eval-<split> under the current directory for the bundled model)")
    p.add_argument("--frames", default=None,
                   help="comma-separated burst lengths, e.g. 1,2,4,8 (default: 1..min(8, stored frames))")
    p.add_argument("--seed", type=int, default=0, help="seed of the frame subsets (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--batch", type=int, default=8, help="samples per model forward pass (default: 8)")
    p.add_argument("--examples", type=int, default=4,
                   help="samples shown in examples.png: the most blurred, the median blur, the largest loss to FBA "
                        "(default: 4; 0: no examples.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    frames = None
    if args.frames is not None:
        try:
            frames = [int(x) for x in args.frames.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--frames must be comma-separated integers, got '{args.frames}'") from None
        if not frames:
            raise UserError("--frames is empty")
    from trainer.model import default_checkpoint

    if args.checkpoint is None and args.out is None:  # not beside the bundled model (git's models/, site-packages)
        args.out = str(SHIPPED_OUT / f"eval-{args.split}")
    args.checkpoint = default_checkpoint(args.checkpoint)
    summary = evaluate(args.checkpoint, args.data, args.split, args.out, frames, args.seed, args.device,
                       args.batch, args.examples, progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{args.split}"
    print(f"{summary['dataset']}/{summary['split']}: {summary['samples']} samples, {summary['interval']}")
    print(format_table(summary))
    print(f"wrote {out}/report.html, metrics.csv, summary.json, psnr_vs_frames.png, ssim_vs_frames.png, "
          "difference_vs_frames.png, examples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
