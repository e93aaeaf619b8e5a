"""torch.compile, bf16 autocast and channels_last for CPU training, with N changing every step.

Training draws N (frames per burst) per batch, so a compiled model sees up to 8 input shapes. This
measures, for the `make train` network (the [model] table of configs/train/default.toml) at batch
8, crop 48, N cycling through 1..8: the warm-up (first pass over every N, compiles included), the
steady-state training steps per second afterwards, and how many graphs torch.compile built
(``unique_graphs``: 2 means one static graph for the first shape, then one dynamic graph for every
other N; one per N would be 8). ``eager-maxdim`` is the baseline: eager fp32 with the per-pixel max
over frames done as before the fold in ``trainer.model.frame_max``. Each configuration runs in a
fresh process, on ``--threads`` threads.

    python bench/bench_compile.py                      # every configuration, 2 threads
    python bench/bench_compile.py --threads 2 --configs eager-maxdim,eager,eager-bf16
    python bench/bench_compile.py --threads 1 --steps 48 --json runs/bench_compile.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = ROOT / "configs" / "train" / "default.toml"  # the `make train` network: its [model]
# name: (torch.compile, bf16 autocast, channels_last); "eager-maxdim" is "eager" with the per-pixel
# max over frames done as before (max(dim).values, which builds an index tensor): the baseline
CONFIGS = {"eager-maxdim": (False, False, False), "eager": (False, False, False),
           "eager-cl": (False, False, True), "eager-bf16": (False, True, False), "eager-bf16-cl": (False, True, True),
           "compile": (True, False, False), "compile-bf16": (True, True, False)}


def run_one(name: str, threads: int, steps: int, width: int) -> dict:
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(ROOT))
    import trainer.model
    from common.config import from_dict
    from trainer.model import ModelConfig, build_model, same_format

    torch.set_num_threads(threads)
    compiled, bf16, channels_last = CONFIGS[name]
    if name == "eager-maxdim":
        trainer.model.frame_max = lambda x, n: same_format(x.unflatten(0, (-1, n)).max(dim=1).values, x)
    cfg = from_dict(ModelConfig, tomllib.loads(TRAIN_CONFIG.read_text())["model"], "model")
    if width:
        cfg.width = width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    # dynamic=None (the default): static first, then one dynamic graph when a shape changes
    step_model = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)

    def step(n: int) -> None:
        burst, target = torch.rand(8, n, 3, 48, 48, generator=g), torch.rand(8, 3, 48, 48, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = step_model(burst)
        loss = (out.float() - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t0 = time.perf_counter()
    for n in range(1, 9):
        step(n)
    warmup = time.perf_counter() - t0
    lengths = [1 + (5 * i) % 8 for i in range(steps)]  # every N, in a scrambled order
    t0 = time.perf_counter()
    for n in lengths:
        step(n)
    seconds = time.perf_counter() - t0
    return {"config": name, "threads": threads, "warmup_s": warmup, "steps": steps,
            "samples_per_s": steps * 8 / seconds, "unique_graphs": int(counters["stats"]["unique_graphs"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=48, help="timed steps after the warm-up (default 48)")
    p.add_argument("--width", type=int, default=0, help="network width (default: the config's)")
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config here
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.threads, args.steps, args.width)))
        return 0
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        print(f"error: unknown config '{bad[0]}' (known: {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    rows = []
    for name in names:  # a fresh process each: no compile cache or thread state carries over
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--threads", str(args.threads),
                               "--steps", str(args.steps), "--width", str(args.width)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: {name} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["samples_per_s"]
    print(f"{'config':<13} {'warm-up s':>9} {'samples/s':>9} {'vs ' + rows[0]['config']:>10} {'graphs':>6}")
    for r in rows:
        print(f"{r['config']:<13} {r['warmup_s']:>9.1f} {r['samples_per_s']:>9.1f} "
              f"{r['samples_per_s'] / base:>9.2f}x {r['unique_graphs']:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
