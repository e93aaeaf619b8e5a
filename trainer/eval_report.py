"""What `evaluate` shows a person: the plots, the examples figure and the self-contained report.html.

Everything here reads the summary dict of ``trainer.evaluate.summarize`` (methods in its order,
"frames", "differences", "interval") and the example dicts ``trainer.evaluate`` renders; nothing
here computes a metric that summary.json or metrics.csv does not hold, except the PSNR/SSIM of the
input frames and the error maps drawn in examples.png. Every file is written atomically.

report.html opens offline: no scripts, no external style sheet, every image a ``data:image/png``
URI of the PNG written next to it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from common.files import atomic_path

STYLE = {"model": ("C3", "o"), "fba": ("C0", "s"), "mean": ("C2", "^"), "first": ("C7", "v"), "best": ("C1", "D")}
LABELS = {"model": "model", "fba": "FBA (p=11)", "mean": "mean of frames", "first": "first frame",
          "best": "best frame (oracle)"}
METRIC_AXIS = {"psnr": "PSNR (dB), higher is better", "ssim": "SSIM, higher is better"}
DIGITS = {"psnr": 2, "ssim": 4}  # decimals in report.html's tables
ZOOM = 64  # side (px) of the zoomed box, at most half the image side


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _series(stats: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean, lo, hi arrays (NaN where the summary holds None: an inf PSNR, or n < 2)."""
    def col(k):
        return np.array([np.nan if s[k] is None else s[k] for s in stats], dtype=np.float64)
    return col("mean"), col("lo"), col("hi")


def _errorbar(ax, x, mean, lo, hi, **kw) -> None:
    yerr = np.nan_to_num(np.stack([mean - lo, hi - mean]), nan=0.0)
    ax.errorbar(x, mean, yerr=yerr, elinewidth=0.8, capsize=2.5, **kw)


def plot_metric(summary: dict, metric: str, path: Path, title: str) -> None:
    """Mean ``metric`` ("psnr" | "ssim") against burst length, one line per method: the model's
    95% interval as a band, the baselines' as thin error bars, nudged sideways so they do not
    overlap."""
    from matplotlib.figure import Figure

    lengths = np.asarray(summary["frames"], dtype=np.float64)
    methods = list(summary["methods"])
    baselines = [m for m in methods if m != "model"]
    nudge = {m: 0.06 * (i - (len(baselines) - 1) / 2) for i, m in enumerate(baselines)}
    fig = Figure(figsize=(7.5, 5), dpi=120)
    ax = fig.add_subplot()
    for method in methods:
        mean, lo, hi = _series([summary["methods"][method][str(int(n))][metric] for n in lengths])
        color, marker = STYLE.get(method, ("k", "x"))
        label = LABELS.get(method, method)
        if method == "model":
            ax.plot(lengths, mean, color=color, marker=marker, lw=2.2, label=label, zorder=3)
            ax.fill_between(lengths, lo, hi, color=color, alpha=0.2, lw=0, zorder=2)
        else:
            _errorbar(ax, lengths + nudge[method], mean, lo, hi, color=color, marker=marker, ms=4, lw=1.1,
                      label=label)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(int(n)) for n in lengths])
    ax.set_xlabel("burst length N (frames)")
    ax.set_ylabel(METRIC_AXIS[metric])
    ax.set_title(f"{metric.upper()} vs burst length\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.text(0.99, 0.01, f"model: band; baselines: error bars; {summary['interval']}", ha="right", va="bottom",
             fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save_figure(fig, path)


def plot_differences(summary: dict, path: Path, title: str) -> None:
    """Paired differences model - baseline (PSNR dB left, SSIM right) against burst length, with
    their 95% intervals as error bars and a zero line: above zero the model is better."""
    from matplotlib.figure import Figure

    lengths = np.asarray(summary["frames"], dtype=np.float64)
    names = list(summary["differences"])
    nudge = {d: 0.08 * (i - (len(names) - 1) / 2) for i, d in enumerate(names)}
    fig = Figure(figsize=(10, 4.5), dpi=120)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("psnr", "ssim")):
        ax.axhline(0.0, color="k", lw=0.9, zorder=1)
        for name in names:
            other = name.split("-", 1)[1]
            mean, lo, hi = _series([summary["differences"][name][str(int(n))][metric] for n in lengths])
            color, marker = STYLE.get(other, ("k", "x"))
            _errorbar(ax, lengths + nudge[name], mean, lo, hi, color=color, marker=marker, ms=4, lw=1.3,
                      label=f"model − {LABELS.get(other, other)}")
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(int(n)) for n in lengths])
        ax.set_xlabel("burst length N (frames)")
        ax.set_ylabel(f"model − baseline, {'PSNR (dB)' if metric == 'psnr' else 'SSIM'}")
        ax.set_title(f"paired {metric.upper()} difference (> 0: model better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.text(0.99, 0.01, f"error bars: {summary['interval']} (over the per-sample differences)", ha="right",
             va="bottom", fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save_figure(fig, path)


def error_map(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """|image - target| averaged over RGB: float64 (H, W) in [0, 1] for images (H, W, 3) in [0, 1]."""
    return np.abs(np.asarray(image, np.float64) - np.asarray(target, np.float64)).mean(axis=-1)


def worst_box(error: np.ndarray, side: int) -> tuple[int, int]:
    """(y, x) of the top-left corner of the ``side`` x ``side`` window with the largest summed
    ``error`` (H, W); the first such window in row-major order, so the choice is deterministic."""
    s = np.pad(np.cumsum(np.cumsum(error, axis=0), axis=1), ((1, 0), (1, 0)))
    sums = s[side:, side:] - s[:-side, side:] - s[side:, :-side] + s[:-side, :-side]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def plot_examples(shown: list[dict], path: Path, title: str) -> None:
    """Three lines per example sample (at the largest N), one column per image (input frames,
    mean, FBA, model, target): the whole image with the zoom box, the box enlarged, and
    |image - target| on one colour scale per example (its colour bar under the target).

    ``shown``: dicts with "key", "reason", "subset" (stored indices), "frames" float (k, H, W, 3)
    in [0, 1], "frame_scores" [(psnr, ssim)] per shown frame, "images" {"mean", "fba", "model"}
    float (H, W, 3), "target", "scores" {method: (psnr, ssim)}. The box (ZOOM px, at most half
    the image side) sits where the model's error is largest.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not shown:
        return
    n_frames = max(len(s["frames"]) for s in shown)
    cols = n_frames + 4
    width, height = 1.6 * cols + 0.6, 1.85 * 3 * len(shown) + 1.3  # inches; 0.6 left for the row labels
    fig = Figure(figsize=(width, height), dpi=100)
    axes = fig.subplots(3 * len(shown), cols, squeeze=False)
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.05 / width, bottom=0.05 / height, top=1 - 1.3 / height,
                        wspace=0.08, hspace=0.45)
    for e, s in enumerate(shown):
        full, zoom, err = axes[3 * e], axes[3 * e + 1], axes[3 * e + 2]
        target = s["target"]
        h, w = target.shape[:2]
        side = max(1, min(ZOOM, h // 2, w // 2))
        y, x = worst_box(error_map(s["images"]["model"], target), side)
        columns = [(f"frame {int(i)}", f, sc) for i, f, sc in zip(s["subset"], s["frames"], s["frame_scores"])]
        columns += [None] * (n_frames - len(s["frames"]))
        columns += [(LABELS[m], s["images"][m], s["scores"][m]) for m in ("mean", "fba", "model")]
        columns.append(("target", target, None))
        vmax = max(float(np.percentile(error_map(s["images"][m], target), 99.5)) for m in ("mean", "fba", "model"))
        vmax = max(vmax, 1e-3)
        for c, column in enumerate(columns):
            for ax in (full[c], zoom[c], err[c]):
                ax.set_axis_off()
            if column is None:
                continue
            label, image, score = column
            image = np.clip(image, 0, 1)
            scores = "" if score is None else f"\n{score[0]:.2f} dB, SSIM {score[1]:.3f}"
            full[c].imshow(image, interpolation="nearest")
            full[c].add_patch(Rectangle((x - 0.5, y - 0.5), side, side, fill=False, ec="cyan", lw=1))
            full[c].set_title(label + scores, fontsize=7)
            zoom[c].imshow(image[y:y + side, x:x + side], interpolation="nearest")
            zoom[c].set_title(f"{label}: zoom ×{h / side:.1f}", fontsize=6)
            if score is None:  # the target column: the colour bar of this example's error maps
                cax = err[c].inset_axes((0.35, 0.05, 0.12, 0.9))
                fig.colorbar(mappable, cax=cax)
                cax.tick_params(labelsize=6)
                cax.set_ylabel("|x − target|", fontsize=6)
            else:
                mappable = err[c].imshow(error_map(image, target), cmap="magma", vmin=0, vmax=vmax,
                                         interpolation="nearest")
                err[c].set_title(f"|{label} − target|", fontsize=6)
        reason = s["reason"].replace(": ", ":\n", 1)
        zoom[0].text(-0.08, 0.5, f"{s['key']}\n{reason}", transform=zoom[0].transAxes, rotation=90,
                     ha="right", va="center", fontsize=7, fontweight="bold")
    n = len(shown[0]["subset"])
    fig.suptitle(f"examples at N = {n}: whole image (cyan box: largest model error), box enlarged, "
                 f"|x − target| (RGB mean, [0, 1]; one scale per example, bar under the target)\n{title}", fontsize=8)
    _save_figure(fig, path)


# ----------------------------------------------------------------------------- report.html

CSS = """body{font-family:sans-serif;margin:1.5em auto;padding:0 1.5em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.sig{font-weight:bold}dl{display:grid;grid-template-columns:max-content auto;gap:.15em 1em}
dt{font-weight:bold}img{max-width:100%;border:1px solid #ddd}.note{color:#666;font-size:.9em}"""


def _cell(stats: dict, digits: int) -> tuple[str, bool]:
    """Text "mean [lo, hi]" ("–" for a missing value) and whether the interval excludes 0."""
    if stats["mean"] is None:
        return "–", False
    if stats["lo"] is None:
        return f"{stats['mean']:.{digits}f}", False
    return (f"{stats['mean']:.{digits}f} [{stats['lo']:.{digits}f}, {stats['hi']:.{digits}f}]",
            stats["lo"] > 0 or stats["hi"] < 0)


def _table(table_id: str, rows: dict, lengths: list[int], metric: str, label, mark: bool) -> str:
    head = "".join(f"<th>N = {n}</th>" for n in lengths)
    out = [f'<table id="{table_id}"><tr><th></th>{head}</tr>']
    for key, per_n in rows.items():
        cells = []
        for n in lengths:
            text, sig = _cell(per_n[str(n)][metric], DIGITS[metric])
            cells.append(f'<td{" class=sig" if mark and sig else ""}>{html.escape(text)}</td>')
        out.append(f'<tr><th data-key="{html.escape(key)}">{html.escape(label(key))}</th>{"".join(cells)}</tr>')
    out.append("</table>")
    return "\n".join(out)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def write_html(summary: dict, path: Path, figures: dict[str, Path], versions: dict | None) -> None:
    """report.html: header (checkpoint, dataset, split, samples, seed, device, software versions),
    the PSNR and SSIM tables (mean [95% interval] per method and N), the paired differences, and
    ``figures`` ({caption: PNG path}) embedded as data URIs. ``versions``: {"checkpoint": dict or
    None (what the checkpoint recorded), "evaluate": dict (this process)}."""
    lengths = summary["frames"]
    method = lambda m: LABELS.get(m, m)  # noqa: E731
    diff = lambda d: "model − " + LABELS.get(d.split("-", 1)[1], d)  # noqa: E731
    header = [("checkpoint", summary["checkpoint"]), ("dataset", summary["dataset"]), ("data", summary["data"]),
              ("split", summary["split"]), ("samples", str(summary["samples"])),
              ("burst lengths", ", ".join(map(str, lengths))), ("stored frames", str(summary["stored_frames"])),
              ("image size", str(summary["size"])), ("dataset config hash", str(summary["config_hash"])),
              ("frame-subset seed", str(summary["seed"])), ("device", summary["device"])]
    versions = versions or {}
    trained = versions.get("checkpoint")
    header.append(("checkpoint software", ", ".join(f"{k} {v}" for k, v in trained.items()) if trained
                   else "not recorded in the checkpoint"))
    if versions.get("evaluate"):
        header.append(("evaluated with", ", ".join(f"{k} {v}" for k, v in versions["evaluate"].items())))
    parts = [f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
             f"<title>evaluation: {html.escape(summary['dataset'])}/{html.escape(summary['split'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Evaluation of {html.escape(Path(summary['checkpoint']).name)} on "
             f"{html.escape(summary['dataset'])}/{html.escape(summary['split'])}</h1>",
             "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in header) + "</dl>",
             f"<p class=note>Cells: mean [95% interval]; {html.escape(summary['interval'])}. PSNR in dB and SSIM on "
             "sRGB in [0, 1], whole image. The best frame is an oracle (it knows the target).</p>"]
    for metric in ("psnr", "ssim"):
        parts.append(f"<h2>{metric.upper()} per burst length</h2>")
        parts.append(_table(metric, summary["methods"], lengths, metric, method, mark=False))
    parts.append("<h2>Paired differences, model − baseline</h2><p class=note>Per sample, the model's score minus "
                 "the baseline's on the same frames; the interval is over those differences. Bold: the interval "
                 "excludes 0 (the gap is real at 95%); above 0 the model is better.</p>")
    for metric in ("psnr", "ssim"):
        parts.append(f"<h3>{metric.upper()}{' (dB)' if metric == 'psnr' else ''}</h3>")
        parts.append(_table(f"diff-{metric}", summary["differences"], lengths, metric, diff, mark=True))
    examples = summary.get("examples") or []
    for caption, png in figures.items():
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        if caption == "Examples" and examples:
            parts.append("<ul>" + "".join(f"<li><b>{html.escape(e['key'])}</b>: {html.escape(e['reason'])}</li>"
                                          for e in examples) + "</ul>")
        parts.append(f'<img alt="{html.escape(caption)}" src="{_png_uri(png)}">')
    parts.append("</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
