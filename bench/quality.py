"""Quality benchmark: checkpoints against FBA, the mean and the best single frame, on real photos.

Every variant is the default dataset's test split (bundled photographs never seen in training or
validation: pipeline/sources.py SAMPLE_SETS["test"]) rendered again with one change of the
degradation model, so all variants hold the same crops of the same photographs:

    aligned     perfectly registered frames, no outliers, no JPEG: the paper's setting, and the
                one the figures in issue 7 were measured on
    default     the default imaging model (residual misalignment against frame 0, outlier frames,
                some JPEG bursts): what `make eval` scores
    misaligned  1-2 px residual misalignment (std 1.0 px per axis, clipped at 3 px), no outliers
    unseen      a degradation family no training set had: Gaussian-like defocus (tiny shake, up to
                3 px defocus) with per-frame shifts, strongly correlated noise, every burst JPEG

    python bench/quality.py --checkpoint shipped=models/burst-deblur.pt --checkpoint make-all=runs/default/best.pt
    python bench/quality.py --checkpoint ... --variants aligned,misaligned --json runs/quality/report.json

With ``--lengths 1,2,4`` it also trains the `make all` default for 1x, 2x and 4x its steps
(with the paper's schedule one run, resumed, so the 1x and 2x checkpoints are those a shorter
run would end with; with the default cosine decay a run per length) and scores each, the
"quality vs training length" table. With ``--recipe NAME=KEY=V,KEY=V`` (repeatable) it trains
the `make all` default with those overrides, each in a fresh process whose CPU time is measured,
and scores each: the "quality per CPU-minute" table of recipes. With two or more checkpoints it
also prints the first one minus each other one, paired over the same bursts. Datasets are rendered once into
--data-root with the local engine and reused (same config, same bytes). Prints Markdown tables
and writes a JSON report.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import ShardConfig, load_config  # noqa: E402

VARIANTS = {
    "aligned": ["imaging.misalign_px=0.0", "imaging.outlier_prob=0.0", "imaging.jpeg_prob=0.0"],
    "default": [],
    "misaligned": ["imaging.misalign_px=1.0", "imaging.misalign_max_px=3.0", "imaging.outlier_prob=0.0",
                   "imaging.jpeg_prob=0.0"],
    "unseen": ["kernels.scale_min=0.05", "kernels.scale_max=0.15", "kernels.defocus_max=3.0",
               "kernels.jitter_points=16", "imaging.misalign_px=0.7", "imaging.outlier_prob=0.0",
               "imaging.correlated_prob=1.0", "imaging.correlated_sigma=1.2", "imaging.jpeg_prob=1.0",
               "imaging.jpeg_quality_min=60", "imaging.jpeg_quality_max=80"],
}
BASELINES = ("fba", "mean", "best")


def variant_config(name: str, samples: int, shard_config: str) -> ShardConfig:
    """The default config's test split alone, with the variant's overrides."""
    import tomllib

    data = tomllib.loads((ROOT / shard_config).read_text())
    test = dict(data["splits"]["test"], samples=samples, samples_per_shard=samples)
    data["splits"] = {"test": test}
    data["dataset"]["name"] = f"quality-{name}"
    return load_config(ShardConfig, None, VARIANTS[name], base=data)


def render_variant(name: str, samples: int, root: Path, shard_config: str, workers: int) -> Path:
    from pipeline.run import render_dataset

    from pipeline.config import config_hash
    from pipeline.run import code_version

    cfg = variant_config(name, samples, shard_config)
    out = root / f"quality-{name}"
    manifest = out / "manifest.json"
    same = (manifest.is_file() and json.loads(manifest.read_text()).get("config_hash") == config_hash(cfg)
            and json.loads(manifest.read_text()).get("code_version") == code_version())
    if not same:  # an identical dataset is reused; anything else is rendered again (seconds)
        render_dataset(cfg, out, workers=workers, engine="local", overwrite=True, progress=False)
    return out


def score(checkpoint: Path, data: Path, out: Path, frames: list[int] | None) -> dict:
    from trainer.evaluate import evaluate

    return evaluate(checkpoint, data, "test", out, frames=frames, device="cpu", progress=False, examples=4)


def row_means(summary: dict) -> dict:
    """{n: {"model", "fba", "mean", "best", "model-fba": (mean, lo, hi), ...}} in dB."""
    out = {}
    for n in map(str, summary["frames"]):
        m = {k: summary["methods"][k][n]["psnr"]["mean"] for k in ("model",) + BASELINES}
        for b in BASELINES:
            d = summary["differences"][f"model-{b}"][n]["psnr"]
            m[f"model-{b}"] = (d["mean"], d["lo"], d["hi"])
        out[int(n)] = m
    return out


def model_psnr(metrics_csv: Path) -> dict[tuple[str, int, str], float]:
    """{(key, N, subset): PSNR} of the model's rows in an evaluation's metrics.csv."""
    with open(metrics_csv, newline="") as f:
        return {(r["key"], int(r["frames"]), r["subset"]): float(r["psnr"])
                for r in csv.DictReader(f) if r["method"] == "model"}


def paired_versus(first: Path, other: Path) -> dict[int, tuple]:
    """{N: (mean, lo, hi)}: the paired PSNR difference first - other over the same bursts (the
    metrics.csv of two evaluations of one dataset), with evaluate's 95% interval."""
    from trainer.evaluate import interval

    a, b = model_psnr(first), model_psnr(other)
    if a.keys() != b.keys():
        raise ValueError(f"{first} and {other} do not score the same bursts")
    out = {}
    for n in sorted({k[1] for k in a}):
        d = interval([a[k] - b[k] for k in sorted(a) if k[1] == n])
        out[n] = (d["mean"], d["lo"], d["hi"])
    return out


def versus_table(title: str, names: list[str], diffs: dict[str, dict[int, tuple]]) -> str:
    """Markdown: the first checkpoint minus each other one, per N, paired over the same bursts."""
    others = list(diffs)
    lines = [f"**{title}** (PSNR dB; {names[0]} - other: paired mean [95% interval])", "",
             "| N | " + " | ".join(f"{names[0]} - {o}" for o in others) + " |",
             "|---" * (1 + len(others)) + "|"]
    for n in sorted(diffs[others[0]]):
        lines.append(f"| {n} | " + " | ".join("{:+.2f} [{:+.2f}, {:+.2f}]".format(*diffs[o][n]) for o in others) + " |")
    return "\n".join(lines)


def table(title: str, results: dict[str, dict]) -> str:
    """Markdown: one row per N; a PSNR column per checkpoint, then the baselines (which do not
    depend on the checkpoint) and each checkpoint's paired difference to FBA with its interval."""
    names = list(results)
    first = results[names[0]]
    lines = [f"**{title}** (PSNR dB, {first['samples']} samples; model - FBA: paired mean [95% interval])", "",
             "| N | " + " | ".join(names) + " | FBA | mean | best frame | " +
             " | ".join(f"{n} - FBA" for n in names) + " |",
             "|---" * (1 + 2 * len(names) + 3) + "|"]
    rows = {name: row_means(s) for name, s in results.items()}
    for n in sorted(rows[names[0]]):
        base = rows[names[0]][n]
        cells = [f"{rows[name][n]['model']:.2f}" for name in names]
        cells += [f"{base[b]:.2f}" for b in BASELINES]
        cells += ["{:+.2f} [{:+.2f}, {:+.2f}]".format(*rows[name][n]["model-fba"]) for name in names]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_lengths(factors: list[int], train_config: str, data: Path, run: Path, log) -> dict[str, Path]:
    """Train the given config for factor × its steps, keeping each length's checkpoint. With the
    paper's schedule ("exp": the rate does not depend on train.steps) it is one run, resumed, so
    each length's weights are those a shorter run ends with; with a cosine decay over train.steps
    each length is a run of its own (runs/<f>x), decaying over its whole length. Returns {"1x":
    path, ...}: each length's best.pt (chosen on validation)."""
    from trainer.config import load_train_config
    from trainer.train import train

    base = load_train_config(ROOT / train_config, [f"data.dir={json.dumps(str(data))}"])
    steps, separate = base.train.steps, base.train.lr_schedule == "cosine"
    out = {}
    for i, f in enumerate(sorted(factors)):
        cfg = load_train_config(ROOT / train_config, [f"data.dir={json.dumps(str(data))}",
                                                      f"train.steps={steps * f}"])
        folder = run / f"{f}x" if separate else run
        t0 = time.time()
        train(cfg, folder, resume=(folder / "last.pt").is_file() if separate else i > 0, log=lambda m: None)
        keep = run / f"best-{f}x.pt"
        shutil.copyfile(folder / "best.pt", keep)
        log(f"trained {f}x ({steps * f} steps) in {time.time() - t0:.0f} s -> {keep}")
        out[f"{f}x"] = keep
    return out


def train_recipes(recipes: dict[str, list[str]], train_config: str, data: Path, run: Path, log) -> dict[str, dict]:
    """Train the config with each recipe's overrides in a child process (so its CPU time is its
    own: user + system seconds of the child, which load on the box changes far less than wall
    time). Returns {name: {"checkpoint", "cpu_s", "wall_s", "overrides"}}."""
    import resource
    import subprocess

    out = {}
    for name, overrides in recipes.items():
        folder = run / name
        if folder.exists():
            shutil.rmtree(folder)
        cmd = [sys.executable, "-m", "trainer", "train", "--config", str(ROOT / train_config),
               "--data", str(data), "--out", str(folder)]
        for o in overrides:
            cmd += ["--set", o]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        with open(run / f"{name}.log", "w") as logfile:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT)
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"recipe {name} failed (exit {proc.returncode}); see {run / f'{name}.log'}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        log(f"recipe {name} ({' '.join(overrides) or 'the default'}): {cpu / 60:.1f} CPU-min, {wall / 60:.1f} min wall")
        out[name] = {"checkpoint": folder / "best.pt", "cpu_s": cpu, "wall_s": wall, "overrides": overrides}
    return out


def recipe_table(recipes: dict[str, dict], results: dict[str, dict], variant: str) -> str:
    """Markdown: one row per recipe, its CPU-minutes, PSNR at each scored N and model - FBA at the largest."""
    rows = {name: row_means(results[name]) for name in recipes}
    ns = sorted(next(iter(rows.values())))
    top = ns[-1]
    lines = [f"**recipes on {variant}** (PSNR dB; CPU-minutes of training, user + system)", "",
             "| recipe | overrides | CPU-min | " + " | ".join(f"N={n}" for n in ns) +
             f" | model - FBA at N={top} | dB over the mean at N={top} per CPU-min |",
             "|---" * (4 + len(ns) + 1) + "|"]
    for name, r in recipes.items():
        m = rows[name]
        gain = (m[top]["model"] - m[top]["mean"]) / (r["cpu_s"] / 60)
        lines.append(f"| {name} | {' '.join(r['overrides']) or '(default)'} | {r['cpu_s'] / 60:.1f} | "
                     + " | ".join(f"{m[n]['model']:.2f}" for n in ns)
                     + " | {:+.2f} [{:+.2f}, {:+.2f}] | ".format(*m[top]["model-fba"]) + f"{gain:.3f} |")
    base = next(iter(rows.values()))
    lines.append("| FBA | | | " + " | ".join(f"{base[n]['fba']:.2f}" for n in ns) + " | | |")
    lines.append("| mean of frames | | | " + " | ".join(f"{base[n]['mean']:.2f}" for n in ns) + " | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a checkpoint to score (repeatable)")
    p.add_argument("--variants", default="aligned,default,misaligned,unseen")
    p.add_argument("--samples", type=int, default=48, help="test crops per variant (default: 48)")
    p.add_argument("--frames", default="", help="burst lengths to score, e.g. 1,2,4,8 (default: 1..8)")
    p.add_argument("--shard-config", default="configs/shards/default.toml")
    p.add_argument("--data-root", default=str(ROOT / "shards"), help="where the variant datasets are rendered")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lengths", default="", help="e.g. 1,2,4: also train the default for these multiples of its steps")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=KEY=V,KEY=V",
                   help="also train the default with these overrides and score it (repeatable; NAME= alone: no overrides)")
    p.add_argument("--train-config", default="configs/train/default.toml")
    p.add_argument("--train-data", default=str(ROOT / "shards/default"))
    p.add_argument("--out", default=str(ROOT / "runs/quality"))
    p.add_argument("--json", default=None, help="report path (default: <out>/report.json)")
    args = p.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant '{unknown[0]}' (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            print(f"error: --checkpoint {item}: expected NAME=PATH of an existing file", file=sys.stderr)
            return 2
        checkpoints[name] = Path(path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.lengths:
        factors = [int(x) for x in args.lengths.split(",")]
        checkpoints.update(train_lengths(factors, args.train_config, Path(args.train_data), out / "lengths", log))
    recipes = {}
    for item in args.recipe:
        name, sep, rest = item.partition("=")
        if not sep or not name or name in recipes:
            print(f"error: --recipe {item}: expected a new NAME=KEY=V,KEY=V (or NAME= for the default)", file=sys.stderr)
            return 2
        recipes[name] = [o for o in rest.split(",") if o]
    trained = {}
    if recipes:
        (out / "recipes").mkdir(exist_ok=True)
        trained = train_recipes(recipes, args.train_config, Path(args.train_data), out / "recipes", log)
        checkpoints.update({name: r["checkpoint"] for name, r in trained.items()})
    if not checkpoints:
        print("error: nothing to score: give --checkpoint NAME=PATH or --lengths", file=sys.stderr)
        return 2

    report = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "checkpoints": {k: str(v) for k, v in checkpoints.items()}, "variants": {}}
    for variant in variants:
        t0 = time.time()
        data = render_variant(variant, args.samples, Path(args.data_root), args.shard_config, args.workers)
        frames = [int(x) for x in args.frames.split(",")] if args.frames else None
        results = {name: score(path, data, out / name / variant, frames) for name, path in checkpoints.items()}
        report["variants"][variant] = {"overrides": VARIANTS[variant], "data": str(data),
                                       "results": {k: row_means(s) for k, s in results.items()},
                                       "ssim": {k: {n: s["methods"]["model"][n]["ssim"]["mean"] for n in s["methods"]["model"]}
                                                for k, s in results.items()}}
        text = table(f"{variant}: {' '.join(VARIANTS[variant]) or 'the default imaging model'}", results)
        print(text + "\n", flush=True)
        names = list(checkpoints)
        if len(names) > 1:
            diffs = {o: paired_versus(out / names[0] / variant / "metrics.csv", out / o / variant / "metrics.csv")
                     for o in names[1:]}
            report["variants"][variant]["versus"] = {o: {str(n): v for n, v in d.items()} for o, d in diffs.items()}
            print(versus_table(f"{variant}: {names[0]} against the others", names, diffs) + "\n", flush=True)
        if trained:
            print(recipe_table(trained, results, variant) + "\n", flush=True)
            report["recipes"] = {k: {"cpu_s": r["cpu_s"], "wall_s": r["wall_s"], "overrides": r["overrides"]}
                                 for k, r in trained.items()}
        log(f"{variant}: {time.time() - t0:.0f} s")
    path = Path(args.json) if args.json else out / "report.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
