"""Score a checkpoint on a split of rendered shards, against the classical baselines.

    python -m trainer evaluate --checkpoint runs/default/best.pt --data shards/default --split test --out runs/default/eval

For every sample of the split and every burst length N (default 1..min(8, stored frames)) a
subset of N of the stored frames is drawn with numpy Generator(SeedSequence([seed, sample index,
N])), so the result does not depend on batching or devices and every method sees the same frames
in the same order. Methods: ``model`` (the checkpoint, fp32 with TF32 off, output clipped to
[0, 1]), ``fba`` (Fourier Burst Accumulation), ``mean``, ``first`` (first frame of the subset),
``best`` (oracle: the subset's frame with the best PSNR against the target). Metrics: PSNR and
SSIM of trainer/metrics.py on sRGB in [0, 1] (uint8 / 255), whole image, no border crop. The
target has the geometry the model's output has (``trainer.data.geometry_target``): the stored
target for a "reference" model or registered frames; for a "mean" model and misaligned frames,
the stored target moved to the mean shift of the subset's frames (every method is scored against
that same target).

Outputs in --out (default: <checkpoint folder>/eval-<split>):
- metrics.csv: one row per (sample, method, N): key, method, frames (N), subset (the stored frame
  indices used, in order), psnr, ssim.
- summary.json: per method and N the mean PSNR/SSIM with a 95% interval, normal approximation
  mean ± 1.96·s/sqrt(n) (s: sample standard deviation over the n samples); and the paired
  differences model - fba and model - mean, whose intervals say whether the gap is real.
- psnr_vs_frames.png: mean PSNR against N per method with the interval as a band.
- examples.png: the first few samples at the largest N: input frames, mean, FBA, model, target.
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
from trainer.data import frame_shifts, geometry_target, iter_samples, read_manifest, reference_subset, split_shards
from trainer.device import burst_to_input, resolve_device
from trainer.metrics import psnr, ssim

METHODS = ("model", "fba", "mean", "first", "best")
Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
EXAMPLE_FRAMES = 3  # input frames shown per example row


def frame_subset(seed: int, sample_index: int, n: int, stored: int) -> np.ndarray:
    """The N stored-frame indices (int64, in the order used) that every method sees for a sample:
    the reference frame 0 first, then N - 1 others (``trainer.data.reference_subset``)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, sample_index, n])))
    return reference_subset(rng, stored, n)


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
    """Evaluate; write metrics.csv, summary.json, psnr_vs_frames.png, examples.png; return the summary.

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
    shown: list[dict] = []  # example images, at the largest N
    bar = tqdm(total=total, desc=f"evaluate {split}", unit="sample", disable=not progress)
    chunk: list[tuple[int, dict]] = []

    def flush() -> None:
        for n in lengths:
            subsets = [frame_subset(seed, index, n, stored) for index, _ in chunk]
            bursts = np.stack([s["burst"][subset] for (_, s), subset in zip(chunk, subsets)])
            with exact_fp32():
                outputs = run_model(model, bursts, dev)
            for (index, sample), subset, burst, output in zip(chunk, subsets, bursts, outputs):
                shifts = frame_shifts(sample["meta"], stored)[subset]
                target = geometry_target(sample["target"], shifts, geometry).astype(np.float64) / 255
                burst = burst.astype(np.float64) / 255
                images = {"model": output, "fba": baselines.fba(burst), "mean": baselines.mean_frames(burst),
                          "first": baselines.first_frame(burst), "best": baselines.best_frame(burst, target)}
                text = " ".join(str(int(i)) for i in subset)
                scores = {}
                for order, method in enumerate(METHODS):
                    scores[method] = psnr(images[method], target)
                    rows.append({"key": sample["key"], "method": method, "frames": n, "subset": text,
                                 "psnr": scores[method], "ssim": ssim(images[method], target),
                                 "order": (index, n, order)})
                if n == lengths[-1] and index < examples:
                    shown.append({"key": sample["key"], "frames": burst[:EXAMPLE_FRAMES], "subset": subset,
                                  "images": {m: images[m] for m in ("mean", "fba", "model")}, "target": target,
                                  "psnr": scores})
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
    summary.update({"checkpoint": str(checkpoint), "data": str(data_dir), "dataset": dataset, "split": split,
                    "seed": seed, "device": str(dev), "stored_frames": stored, "size": size,
                    "config_hash": manifest.config_hash})
    write_csv(rows, out_dir / "metrics.csv")
    _write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    title = f"{dataset}/{split} ({summary['samples']} samples), checkpoint {checkpoint.parent.name}/{checkpoint.name}"
    plot_psnr(summary, out_dir / "psnr_vs_frames.png", title)
    plot_examples(shown, out_dir / "examples.png", title)
    return summary


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


STYLE = {"model": ("C3", "o"), "fba": ("C0", "s"), "mean": ("C2", "^"), "first": ("C7", "v"), "best": ("C1", "D")}
LABELS = {"model": "model", "fba": "FBA (p=11)", "mean": "mean of frames", "first": "first frame",
          "best": "best frame (oracle)"}


def plot_psnr(summary: dict, path: Path, title: str) -> None:
    """PSNR (dB) against burst length, one line per method, 95% interval as a band."""
    from matplotlib.figure import Figure

    lengths = summary["frames"]
    fig = Figure(figsize=(7.5, 5), dpi=120)
    ax = fig.add_subplot()
    for method in METHODS:
        stats = [summary["methods"][method][str(n)]["psnr"] for n in lengths]
        mean = np.array([s["mean"] if s["mean"] is not None else np.nan for s in stats])
        color, marker = STYLE[method]
        ax.plot(lengths, mean, color=color, marker=marker, label=LABELS[method], lw=2 if method == "model" else 1.3)
        if all(s["lo"] is not None for s in stats):
            ax.fill_between(lengths, [s["lo"] for s in stats], [s["hi"] for s in stats], color=color, alpha=0.15, lw=0)
    ax.set_xticks(lengths)
    ax.set_xlabel("burst length N (frames)")
    ax.set_ylabel("PSNR (dB), higher is better")
    ax.set_title(f"PSNR vs burst length\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.text(0.99, 0.01, f"bands: {summary['interval']}", ha="right", va="bottom", fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save_figure(fig, path)


def plot_examples(shown: list[dict], path: Path, title: str) -> None:
    """A grid: one row per example sample at the largest N; input frames, mean, FBA, model, target."""
    from matplotlib.figure import Figure

    if not shown:
        return
    n_frames = max(len(s["frames"]) for s in shown)
    cols = n_frames + 4
    fig = Figure(figsize=(1.9 * cols, 2.1 * len(shown) + 0.4), dpi=110)
    axes = fig.subplots(len(shown), cols, squeeze=False)
    for row, s in zip(axes, shown):
        panels = [(f"frame {int(i)}", f) for i, f in zip(s["subset"], s["frames"])]
        panels += [(None, None)] * (n_frames - len(s["frames"]))
        panels += [(f"mean {s['psnr']['mean']:.2f} dB", s["images"]["mean"]),
                   (f"FBA {s['psnr']['fba']:.2f} dB", s["images"]["fba"]),
                   (f"model {s['psnr']['model']:.2f} dB", s["images"]["model"]), ("target", s["target"])]
        for ax, (label, image) in zip(row, panels):
            ax.set_axis_off()
            if image is not None:
                ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
                ax.set_title(label, fontsize=7)
        row[0].text(-0.08, 0.5, s["key"], transform=row[0].transAxes, rotation=90, ha="right", va="center", fontsize=6)
    n = len(shown[0]["subset"])
    fig.suptitle(f"examples at N = {n} (first {EXAMPLE_FRAMES} frames shown)\n{title}", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


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
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval-<split>)")
    p.add_argument("--frames", default=None,
                   help="comma-separated burst lengths, e.g. 1,2,4,8 (default: 1..min(8, stored frames))")
    p.add_argument("--seed", type=int, default=0, help="seed of the frame subsets (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--batch", type=int, default=8, help="samples per model forward pass (default: 8)")
    p.add_argument("--examples", type=int, default=4, help="samples shown in examples.png (default: 4)")
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

    args.checkpoint = default_checkpoint(args.checkpoint)
    summary = evaluate(args.checkpoint, args.data, args.split, args.out, frames, args.seed, args.device,
                       args.batch, args.examples, progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{args.split}"
    print(f"{summary['dataset']}/{summary['split']}: {summary['samples']} samples, {summary['interval']}")
    print(format_table(summary))
    print(f"wrote {out}/metrics.csv, summary.json, psnr_vs_frames.png, examples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
