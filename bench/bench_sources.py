"""Micro benchmark of pipeline/sources.py: dead leaves, photo canvases, folder scans.

    .venv/bin/python bench/bench_sources.py [--calls 200] [--canvas 210] [--files 2000]

Prints a table of per-call times on one core: wall time (time.perf_counter, best and median of
10 rounds) and this process's CPU time (time.process_time, best round), which stays close to the
idle-machine figure when other jobs share the cores. The budget it checks against: the whole pipeline must
render >= 90 bursts/s per core (~11 ms per burst), so a dead-leaves canvas should take <= ~2-3 ms.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import sources  # noqa: E402
from pipeline.config import SourceConfig  # noqa: E402


def per_call(fn, calls: int, rounds: int = 10) -> tuple[float, float, float]:
    """(best wall, median wall, best cpu) ms per call: ``calls`` calls in ``rounds`` rounds."""
    fn(0)
    per_round = max(1, calls // rounds)
    wall, cpu = [], []
    for k in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        for i in range(per_round):
            fn(k * per_round + i)
        wall.append((time.perf_counter() - t) / per_round * 1e3)
        cpu.append((time.process_time() - c) / per_round * 1e3)
    return min(wall), statistics.median(wall), min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--canvas", type=int, default=210)
    ap.add_argument("--files", type=int, default=2000, help="files in the scanned test folder")
    args = ap.parse_args()
    cfg = SourceConfig()
    rows = []

    def dl(i):
        return sources.deadleaves(np.random.default_rng(i), args.canvas, cfg)

    rows.append((f"deadleaves canvas={args.canvas}", *per_call(dl, args.calls)))
    rows.append((f"  first_cover only (4000 disks)",
                 *per_call(lambda i: _cover(np.random.default_rng(i), args.canvas, cfg), args.calls)))

    samples = sources.list_source("samples", args.canvas)
    for scale in (1.0, 0.5):
        c = SourceConfig(photo_scale_min=scale, photo_scale_max=scale)
        rows.append((f"photo canvas, samples, scale={scale} (cached)",
                     *per_call(lambda i: sources.draw_canvas(np.random.default_rng(i), samples, args.canvas, c),
                               args.calls)))
    rows.append(("load_photo astronaut.png (full decode)",
                 *per_call(lambda i: sources.load_photo(samples.paths[0]), 20)))

    with tempfile.TemporaryDirectory() as tmp:
        big = os.path.join(tmp, "big.jpg")  # a 12 MP camera-sized JPEG
        y, x = np.mgrid[0:3000, 0:4000]
        Image.fromarray(np.stack([(x * 7 + y) % 251, (x * y) % 253, (x + y * 5) % 255], -1)
                        .astype(np.uint8)).save(big, quality=90)
        rows.append(("load_photo 4000x3000 JPEG (full decode)", *per_call(lambda i: sources.load_photo(big), 3, 3)))

    with tempfile.TemporaryDirectory() as tmp:
        small = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
        for i in range(args.files):
            sub = os.path.join(tmp, f"d{i % 10}")
            os.makedirs(sub, exist_ok=True)
            small.save(os.path.join(sub, f"{i:06d}.{'png' if i % 2 else 'jpg'}"))
        t, c = time.perf_counter(), time.process_time()
        listed = sources.list_source(f"dir:{tmp}", args.canvas)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        assert len(listed.paths) == args.files
        per = dt / args.files * 1e3
        rows.append((f"list_source, {args.files} files (per file)", per, per, dc / args.files * 1e3))

    print(f"{'what':48s} {'best ms':>9s} {'median ms':>10s} {'cpu ms':>8s}")
    for name, best, med, cpu in rows:
        print(f"{name:48s} {best:9.3f} {med:10.3f} {cpu:8.3f}")


def _cover(rng, canvas, cfg):
    n = cfg.deadleaves_max_disks
    a = 1.0 - cfg.deadleaves_alpha
    rmax = cfg.deadleaves_rmax_frac * canvas
    u = rng.random((3, n))
    r = (cfg.deadleaves_rmin ** a + u[0] * (rmax ** a - cfg.deadleaves_rmin ** a)) ** (1.0 / a)
    return sources.first_cover(u[1] * (canvas - 1 + 2 * r) - r, u[2] * (canvas - 1 + 2 * r) - r, r, canvas, canvas)


if __name__ == "__main__":
    main()
