"""Rendering speed: bursts/s per core for 160×160, 8 frames, 51×51 kernels, encoding and writing
included, with 1 and 2 workers, against a straightforward generator run in the same invocation.

    .venv/bin/python bench/bench_render.py [--samples 1024] [--rounds 3] [--source deadleaves] [--json out.json]

Tables 1-3 run with glibc's allocator tuned as a render worker tunes it
(``pipeline.shards.tune_allocator``), the straightforward generator included. Prints four
tables: (1) the stage profile of one core (where the time goes: the steps of
`imaging.degrade` timed one by one, encoding, and writing the members into a tar), with the minor
page faults per burst (fresh pages from the allocator cost ~1 us each on this VM), (2) the
straightforward baseline vs this pipeline's sample function on one core, (3) whole runs of
`render_dataset` (local engine, and ray) with 1 and 2 workers, wall clock including pool start
(which is ~1 s of a 1-worker local run: count it when comparing short runs), (4) the command
users run, `python -m pipeline render --workers 1` with each engine, timed from the shell's side
(interpreter start, imports, source scan, pool or Ray start, manifest: everything), and with Ray
once more as a cluster's users run it, joining a running cluster (`--address`; a one-node Ray
that this script starts before that command line and stops after it, its start not counted:
a cluster is started once, not per render), for a 1-burst
run (its fixed cost) and for ``--samples`` bursts, against the straightforward generator run by
itself in a fresh process before and after, once with the allocator as it comes (what a plain
script gets) and once tuned.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.signal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import imaging, kernels, render, shards, sources  # noqa: E402
from pipeline.format import encode_sample  # noqa: E402
from common.config import to_toml  # noqa: E402
from pipeline.config import ShardConfig, from_dict, validate  # noqa: E402
from pipeline.run import render_dataset, start_ray, stop_ray  # noqa: E402


def bench_tables(samples: int, source: str) -> dict[str, dict]:
    """The benchmark's config as nested tables (what its TOML file reads into)."""
    return {"dataset": {"name": "bench", "seed": 1, "frames": 8, "size": 160, "kernel_size": 51},
            "splits": {"train": {"samples": samples, "samples_per_shard": 64, "source": source}}}


def bench_config(samples: int, source: str) -> ShardConfig:
    cfg = from_dict(ShardConfig, bench_tables(samples, source))
    validate(cfg)
    return cfg


def straightforward_burst(rng: np.random.Generator, canvas: np.ndarray, cfg: ShardConfig) -> np.ndarray:
    """The plain way: float64, per-frame random-walk kernel, scipy fftconvolve per frame, normal
    noise from the generator, np.power gamma. Stands in for the OpenCV filter2D generator."""
    K, size, m = cfg.dataset.kernel_size, cfg.dataset.size, cfg.margin
    lin = (canvas / 255.0) ** 2.2
    frames = []
    for _ in range(cfg.dataset.frames):
        v = np.zeros(2)
        pts = []
        p = np.zeros(2)
        for _ in range(128):
            v = 0.9 * v + rng.normal(size=2)
            p = p + v
            pts.append(p.copy())
        pts = np.array(pts)
        pts -= pts.mean(0)
        pts *= 3.0 / np.sqrt((pts**2).sum(1).mean())
        k = np.zeros((K, K))
        for x, y in np.clip(np.round(pts + K // 2).astype(int), 0, K - 1):
            k[y, x] += 1
        k /= k.sum()
        blurred = scipy.signal.fftconvolve(lin, k[..., None], mode="valid", axes=(0, 1))
        noisy = blurred + rng.normal(0, 0.02, blurred.shape)
        frames.append((np.clip(noisy, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8))
    assert frames[0].shape == (size, size, 3), frames[0].shape
    return np.stack(frames)


def config_toml(samples: int, source: str) -> str:
    """bench_config as a TOML file for the command line."""
    return to_toml(bench_tables(samples, source))


# table 4's rows: the engine of the command line, and whether it joins a running cluster
CLUSTER = "ray+cluster"  # --engine ray --address <a one-node cluster started once by this script>


def time_cli(samples: int, source: str, engine: str, tmp: Path, address: str | None = None) -> float:
    """Wall seconds of `python -m pipeline render --workers 1` for ``samples`` bursts (Ray without
    ``address``: its own start and shutdown included; with it, joining that running cluster)."""
    config = tmp / f"bench-{samples}.toml"
    config.write_text(config_toml(samples, source))
    out = tmp / f"d{samples}-{time.monotonic_ns()}"  # a fresh folder: a finished one is not re-rendered
    cmd = [sys.executable, "-m", "pipeline", "render", "--config", str(config), "--out", str(out),
           "--engine", engine, "--workers", "1", "--quiet"] + (["--address", address] if address else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    dt = time.perf_counter() - t0
    if not (out / "manifest.json").is_file():
        raise RuntimeError(f"{' '.join(cmd)} wrote no manifest")
    return dt


def plain_burst(i: int, cfg: ShardConfig, src: sources.SourceList) -> np.ndarray:
    """Burst ``i`` of the straightforward generator, on the same dead-leaves canvases."""
    rng = np.random.default_rng(i)
    canvas, _ = sources.draw_canvas(rng, src, cfg.canvas, cfg.sources)
    return straightforward_burst(rng, canvas, cfg)


def plain_alone(args, mode: str) -> float:
    """Bursts/s of the straightforward generator run by itself in a fresh process."""
    cmd = [sys.executable, __file__, "--plain-alone", mode, "--source", args.source]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def rate(fn, n: int) -> float:
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def stage_profile(cfg: ShardConfig, src: sources.SourceList, n: int) -> tuple[dict[str, float], float]:
    """Milliseconds per burst in each stage on one core, and minor page faults per burst.

    The degradation runs as ``imaging.degrade`` does (same calls, frame by frame after the
    forward FFTs), with a clock around each step; encoding and tar writing are those of a shard.
    """
    stages = ["canvas", "params+kernels", "linearize", "blur (FFT)", "noise", "re-gamma+quantize",
              "encode (npy+png+json)", "tar write"]
    t = dict.fromkeys(stages, 0.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    K, size, m = cfg.dataset.kernel_size, cfg.dataset.size, cfg.margin
    with tempfile.TemporaryFile() as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            s_rng, p_rng, n_rng = render.sample_streams(cfg, "train", i)
            clock = [time.perf_counter()]

            def lap(stage: str) -> None:
                clock.append(time.perf_counter())
                t[stage] += clock[-1] - clock[-2]

            canvas, info = sources.draw_canvas(s_rng, src, cfg.canvas, cfg.sources)
            lap("canvas")
            params, draws = render.sample_params(p_rng, cfg)
            kern, traj, fit = kernels.build_kernels(params, draws, cfg.kernels, K)
            lap("params+kernels")
            gamma, white = params["gamma"], 255.0 ** params["gamma"]
            planes, support = imaging.crop_to_support(canvas.transpose(2, 0, 1), kern)
            linear = imaging.linearize(planes, gamma, white)
            if params["highlight_gain"] > 1.0:
                linear = imaging.boost_highlights(linear, cfg.imaging.highlight_threshold,
                                                  params["highlight_gain"], white)
            lap("linearize")
            burst = np.empty((cfg.dataset.frames, size, size, 3), np.uint8)
            scratch = np.empty((3, size, size), np.float32)
            frames = imaging.blurred_frames(linear, support, size)
            for f_idx in range(cfg.dataset.frames):
                frame = next(frames)
                lap("blur (FFT)")
                noisy = imaging.add_noise(frame, params["shot_noise"], params["read_noise"], n_rng,
                                          params["noise_correlation_px"], white, out=scratch)
                lap("noise")
                imaging.delinearize(noisy, gamma, white, out=burst[f_idx].transpose(2, 0, 1),
                                    overwrite_input=True)
                lap("re-gamma+quantize")
            if i == 0:  # the clocked steps must stay what degrade does
                same = imaging.degrade(canvas, kern, size, gamma, params["highlight_gain"],
                                       cfg.imaging.highlight_threshold, params["shot_noise"],
                                       params["read_noise"], params["noise_correlation_px"],
                                       render.sample_streams(cfg, "train", i)[2])
                if not np.array_equal(same, burst):
                    raise RuntimeError("stage_profile no longer follows imaging.degrade: update it")
                clock[-1] = time.perf_counter()
            sample = {"key": f"train-000000-{i:06d}", "burst": burst,
                      "target": np.ascontiguousarray(canvas[m:m + size, m:m + size]),
                      "params": {"gamma": params["gamma"], "source": info}}
            members = encode_sample(sample)
            lap("encode (npy+png+json)")
            for name, data in members:
                shards.add_member(tar, name, data)
            lap("tar write")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {k: 1e3 * v / n for k, v in t.items()}, faults / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024, help="bursts per whole run (default 1024)")
    ap.add_argument("--source", default="deadleaves", help="deadleaves | samples | dir:/path")
    ap.add_argument("--engines", default="local,ray", help="engines of table 3 (default local,ray)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of table 4, generator and command lines (default 3)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--plain-alone", choices=("default", "tuned"), help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    cfg = bench_config(args.samples, args.source)
    src = sources.list_source(args.source, cfg.canvas)
    plain = functools.partial(plain_burst, cfg=cfg, src=src)
    if args.plain_alone:  # table 4's generator, a fresh process: its allocator as given, or tuned
        if args.plain_alone == "tuned":
            shards.tune_allocator()
        print(rate(plain, 60))
        return
    shards.tune_allocator()  # as a render worker runs: tables 1-3 with the allocator it ships
    results: dict = {"config": "160x160, 8 frames, 51x51 kernels", "source": args.source}

    stage_profile(cfg, src, 10)  # warm up: imports, FFT plans, the normal table
    prof, faults = stage_profile(cfg, src, 200)
    total = sum(prof.values())
    print(f"\n(1) where the time goes, one core, ms per burst ({args.source}, 200 bursts)")
    for k, v in prof.items():
        print(f"  {k:<24}{v:7.2f}  {100 * v / total:5.1f}%")
    print(f"  {'total':<24}{total:7.2f}  -> {1e3 / total:.0f} bursts/s   ({faults:.0f} minor page faults per burst)")
    results["profile_ms"] = prof
    results["page_faults_per_burst"] = faults

    big = bench_config(100_000, args.source)  # in-process rates need more indices than a run

    def ours(i):
        return render.render_sample(big, "train", i, src)

    r_plain, r_ours = rate(plain, 60), rate(ours, 200)
    print("\n(2) one core, sample function only (no encoding), bursts/s")
    print(f"  straightforward generator {r_plain:8.1f}")
    print(f"  this pipeline             {r_ours:8.1f}   ({r_ours / r_plain:.1f}x)")
    results["one_core"] = {"straightforward": r_plain, "ours": r_ours, "ratio": r_ours / r_plain}

    print(f"\n(3) whole runs: {args.samples} bursts rendered, encoded and written (wall clock; the local"
          " pool's start is included, Ray's own start is timed apart: a cluster is started once)")
    print(f"  {'engine':<8}{'workers':>8}{'bursts/s':>10}{'per core':>10}{'vs 1 worker':>13}{'ray start s':>13}")
    results["runs"] = []
    for engine in args.engines.split(","):
        base = None
        for workers in (1, 2):
            ray_start = None
            if engine == "ray":
                t0 = time.perf_counter()
                ray = start_ray(workers)
                ray_start = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                render_dataset(cfg, Path(tmp) / "d", workers=workers, engine=engine, progress=False)
                dt = time.perf_counter() - t0
            if engine == "ray":
                stop_ray(ray)
            r = args.samples / dt
            base = base or r
            started = f"{ray_start:13.1f}" if ray_start is not None else f"{'-':>13}"
            print(f"  {engine:<8}{workers:>8}{r:>10.1f}{r / workers:>10.1f}{r / base:>12.2f}x{started}")
            results["runs"].append({"engine": engine, "workers": workers, "bursts_per_s": r,
                                    "per_core": r / workers, "speedup": r / base, "ray_start_s": ray_start})

    print(f"\n(4) the command line, start-up included: python -m pipeline render --workers 1, against the"
          " straightforward generator run alone in a fresh process (before and after each round, averaged),"
          " with glibc's allocator as it comes and tuned as the render workers tune it;"
          f" {args.rounds} interleaved round(s), the ratios of each round against its own generator")
    engines = args.engines.split(",")
    rows = engines + ([CLUSTER] if "ray" in engines else [])
    rounds = []  # per round: {"straightforward": {mode: bursts/s}, "runs": {row: seconds}}
    cluster_starts: list[float] = []

    def cli(samples: int, row: str, tmp: Path) -> float:
        if row != CLUSTER:
            return time_cli(samples, args.source, row, tmp)
        # how a cluster's users run: the cluster is up before the render and stays up after it.
        # Started just before and stopped just after this one command line, so that its idle
        # processes run beside nothing else that is timed; its start is not counted.
        t0 = time.perf_counter()
        ray = start_ray(1)
        cluster_starts.append(time.perf_counter() - t0)
        try:
            return time_cli(samples, args.source, "ray", tmp, ray.get_runtime_context().gcs_address)
        finally:
            stop_ray(ray)

    with tempfile.TemporaryDirectory() as tmp:
        fixed = {row: min(cli(1, row, Path(tmp)) for _ in range(2)) for row in rows}
        gen_before = {mode: plain_alone(args, mode) for mode in ("default", "tuned")}
        for _ in range(args.rounds):
            whole = {row: cli(args.samples, row, Path(tmp)) for row in rows}
            gen_after = {mode: plain_alone(args, mode) for mode in ("default", "tuned")}
            rounds.append({"straightforward": {m: (gen_before[m] + gen_after[m]) / 2 for m in gen_before},
                           "runs": whole})
            gen_before = gen_after
    if cluster_starts:
        print(f"  ({CLUSTER}: --engine ray --address <a one-node Ray of 1 CPU that this script started before"
              f" each such command line, in {min(cluster_starts):.1f}-{max(cluster_starts):.1f} s, not counted>)")
        results["cluster_start_s"] = cluster_starts
    print(f"  {'round':<6}{'engine':<12}{'1 burst s':>10}{f'{args.samples} bursts s':>16}{'bursts/s':>10}"
          f"{'generator':>11}{'vs generator':>14}{'vs tuned one':>14}")
    results["cli"] = {"rounds": [], "fixed_s": fixed}
    for i, rnd in enumerate(rounds, start=1):
        gen = rnd["straightforward"]
        runs = []
        for engine, seconds in rnd["runs"].items():
            r = args.samples / seconds
            print(f"  {i:<6}{engine:<12}{fixed[engine]:>10.2f}{seconds:>16.2f}{r:>10.1f}{gen['default']:>11.1f}"
                  f"{r / gen['default']:>13.2f}x{r / gen['tuned']:>13.2f}x")
            runs.append({"engine": engine, "seconds": seconds, "bursts_per_s": r,
                         "vs_straightforward": r / gen["default"], "vs_tuned": r / gen["tuned"]})
        results["cli"]["rounds"].append({"straightforward": gen, "runs": runs})
    results["cli"]["median_vs_straightforward"] = {}
    for engine in rows:
        ratios = sorted(run["vs_straightforward"] for rnd in results["cli"]["rounds"] for run in rnd["runs"]
                        if run["engine"] == engine)
        median = float(np.median(ratios))
        results["cli"]["median_vs_straightforward"][engine] = median
        print(f"  {engine}: median {median:.2f}x the generator over {len(ratios)} round(s)"
              f" (range {ratios[0]:.2f}x-{ratios[-1]:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
