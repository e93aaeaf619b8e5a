"""Training-step benchmark of the burst-deblurring U-Net on in-memory synthetic batches.

One step = forward + burst_loss + backward + Adam step on a fixed (burst, target) batch that
already lies on the device, so the figures are the model's alone (no data loading). Configurations:

    plain   fp32, plain concatenation in every set conv, no channels_last, no compile: the form
            of the public re-implementation, the reference
    fused   the same in fp32 with the fused set conv (W_b·max computed once per burst)  [CUDA]
    ours    fused; on CUDA also bf16 autocast + channels_last (+ torch.compile with --compile);
            on CPU it is the fused form in fp32 (CPU bf16 is slower than fp32 on most CPUs)

Each configuration runs in its own spawned process so that its peak memory (CUDA: max allocated;
CPU: peak RSS of the process, which includes ~0.3-0.5 GB of Python and torch) and allocator or
compile caches do not leak into the next one.

FLOPs per sample are counted by torch.utils.flop_counter.FlopCounterMode for forward + backward
on the meta device (no compute). MFU = counted FLOP/s over the rate of a large matmul measured in
this process (bf16 on CUDA; fp32 on CPU, where the steps run in fp32). Each configuration's own
count is used, so the plain form's redundant max-half convs count as useful work: compare
samples/s to compare configurations. "fp32" on CUDA means PyTorch's defaults, under which cuDNN
convolutions may use TF32 (torch.backends.cudnn.allow_tf32 is True).

    python bench/bench_train.py --device cpu --batch 2 --size 64 --width 16 --steps 3
    python bench/bench_train.py --device cuda --compile --data shards/default --json bench/train_h100.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import platform
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from trainer.losses import burst_loss  # noqa: E402
from trainer.data import TrainStream, train_loader  # noqa: E402
from trainer.model import ModelConfig, build_model  # noqa: E402
from trainer.train import to_device  # noqa: E402


def is_channels_last_model(model: torch.nn.Module) -> bool:
    p = next(model.parameters())
    return p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()

CONFIGS = {
    # name: (fused, bf16 autocast, channels_last, compile) -- compile only with --compile
    "plain": dict(fused=False, bf16=False, channels_last=False, compile=False),
    "fused": dict(fused=True, bf16=False, channels_last=False, compile=False),
    "ours": dict(fused=True, bf16=True, channels_last=True, compile=True),
    # ours, fed by trainer.data.TrainStream from real shards (--data): loading, decoding,
    # augmentation, the uint8 transfer and the float conversion on the device all count
    "streamed": dict(fused=True, bf16=True, channels_last=True, compile=True),
}


# ----------------------------------------------------------------------------- reusable timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset; CPU: peak RSS of this process (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_step(model, optimizer, burst, target, autocast_dtype=None) -> torch.Tensor:
    """forward + loss + backward + optimizer step; returns the loss (not synchronized)."""
    device_type = burst.device.type
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with amp:
        pred = model(burst)
    loss = burst_loss(pred, target)  # float32, outside autocast
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def time_steps(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
               optimizer: torch.optim.Optimizer, steps: int, warmup: int, device: torch.device,
               autocast_dtype: torch.dtype | None = None) -> dict:
    """Time ``steps`` training steps after ``warmup`` untimed ones (compilation, cudnn autotune).

    batches yields (burst float (B, N, 3, H, W) in [0, 1], target float (B, 3, H, W)) on any
    device; each is moved to ``device`` inside the timed region, so a streamed iterator's
    loading and transfer count (pass tensors already on the device to time the model alone).
    Returns seconds, ms per step, samples/s, the last loss and the peak memory of the timed steps
    (CUDA: max allocated, reset after warmup; CPU: peak RSS of the process, not resettable).
    """
    it: Iterator = iter(batches)

    def step() -> tuple[torch.Tensor, int]:
        item = next(it)
        if isinstance(item, dict):  # a TrainStream batch: uint8 crosses, float conversion on the device
            burst, target = to_device(item, device, is_channels_last_model(model))
        else:
            burst, target = item
            burst = burst.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
        return train_step(model, optimizer, burst, target, autocast_dtype), burst.shape[0]

    model.train()
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = 0
    start = time.perf_counter()
    for _ in range(steps):
        loss, b = step()
        samples += b
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "ms_per_step": 1e3 * seconds / steps,
        "samples_per_s": samples / seconds,
        "loss": float(loss.detach()),
        "peak_mem_bytes": peak_memory_bytes(device),
    }


# ----------------------------------------------------------------------------- measurements


def count_flops(cfg: ModelConfig, batch: int, frames: int, size: int) -> int:
    """FLOPs of forward + loss + backward for one batch, counted on the meta device (no compute)."""
    with torch.device("meta"):
        model = build_model(cfg)
        burst = torch.empty(batch, frames, 3, size, size)
        target = torch.empty(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        burst_loss(model(burst), target).backward()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an n×n @ n×n matmul in ``dtype`` (best of 3 timings): the reference peak for MFU."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def synthetic_batch(batch: int, frames: int, size: int, seed: int = 0):
    """A fixed random (burst (B, N, 3, S, S), target (B, 3, S, S)) pair in [0, 1], float32, CPU."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, size, size, generator=g)
    burst = (target.unsqueeze(1) + 0.1 * torch.randn(batch, frames, 3, size, size, generator=g)).clamp(0, 1)
    return burst, target


def run_config(name: str, args: argparse.Namespace) -> dict:
    """Build, time and measure one configuration (runs in a fresh process)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = CONFIGS[name]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = opts["bf16"] and cuda
    channels_last = opts["channels_last"] and cuda
    compiled = opts["compile"] and args.compile

    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    cfg = ModelConfig(width=args.width, fused=opts["fused"])
    flops = count_flops(cfg, args.batch, args.frames, args.size)
    torch.manual_seed(args.seed)  # module init draws from the global generator; fresh process
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    step_model = torch.compile(model) if compiled else model

    if name == "streamed":
        stream = TrainStream(args.data, "train", steps=args.warmup + args.steps, batch_size=args.batch,
                             seed=args.seed, crop=args.size, min_frames=args.frames, max_frames=args.frames,
                             shuffle_buffer=64, num_workers=args.workers)
        batches = train_loader(stream, pin_memory=cuda)
    else:
        burst, target = synthetic_batch(args.batch, args.frames, args.size, args.seed)
        batches = itertools.repeat((burst.to(device), target.to(device)))
    timing = time_steps(step_model, batches, optimizer=optimizer, steps=args.steps, warmup=args.warmup,
                        device=device, autocast_dtype=torch.bfloat16 if bf16 else None)
    return {
        "config": name, "fused": opts["fused"], "dtype": "bf16" if bf16 else "fp32",
        "channels_last": channels_last, "compile": compiled,
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_sample": flops / args.batch, **timing,
    }


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=160, help="square crop side, px")
    p.add_argument("--width", type=int, default=64, help="model.width (64 = paper size)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (compile, autotune); default 3 on CUDA, 1 on CPU")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the configurations (alternating) and keep each one's fastest round")
    p.add_argument("--compile", action="store_true", help="torch.compile the 'ours' configuration")
    p.add_argument("--configs", default=None,
                   help="comma-separated subset of plain,fused,ours (default: all that differ on this device)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None,
                   help="a shard folder: adds the 'streamed' configuration (ours fed from the shards)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the streamed configuration")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    for key in ("batch", "frames", "size", "width", "steps", "rounds"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.configs is None:
        # on CPU "fused" and "ours" are the same configuration
        args.configs = "plain,fused,ours" if args.device == "cuda" else "plain,ours"
        if args.data is not None:
            args.configs += ",streamed"
    args.configs = args.configs.split(",")
    if "streamed" in args.configs and args.data is None:
        p.error("the streamed configuration needs --data DIR (a rendered shard folder)")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown configuration '{unknown[0]}' (known: {', '.join(CONFIGS)})")
    return args


def print_table(rows: list[dict], peak_flops: float, peak_label: str) -> None:
    base = rows[0]["samples_per_s"]
    header = (f"{'config':<7} {'form':<6} {'dtype':<5} {'ch_last':<7} {'compile':<7} {'ms/step':>9} "
              f"{'samples/s':>10} {'speedup':>7} {'GFLOP/sample':>12} {'TFLOP/s':>8} {'MFU':>6} {'peak mem':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        achieved = r["flops_per_sample"] * r["samples_per_s"]
        print(f"{r['config']:<7} {'fused' if r['fused'] else 'plain':<6} {r['dtype']:<5} "
              f"{str(r['channels_last']):<7} {str(r['compile']):<7} {r['ms_per_step']:>9.1f} "
              f"{r['samples_per_s']:>10.2f} {r['samples_per_s'] / base:>6.2f}x "
              f"{r['flops_per_sample'] / 1e9:>12.1f} {achieved / 1e12:>8.3f} {achieved / peak_flops:>6.1%} "
              f"{r['peak_mem_bytes'] / 2**30:>7.2f}GB")
    print(f"MFU reference: {peak_label}. peak mem: "
          + ("torch.cuda.max_memory_allocated" if rows[0]["device"] == "cuda" else "peak RSS of the process"))


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        peak_dtype, n, reps = torch.bfloat16, 8192, 20
        device_name = torch.cuda.get_device_name(device)
    else:
        peak_dtype, n, reps = torch.float32, 2048, 3
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    peak = matmul_rate(device, peak_dtype, n, reps)
    peak_label = f"{str(peak_dtype).removeprefix('torch.')} {n}x{n} matmul, {peak / 1e12:.2f} TFLOP/s measured"
    print(f"device: {device_name} | torch {torch.__version__} | batch {args.batch} x {args.frames} frames x "
          f"{args.size}x{args.size}, width {args.width} | {args.warmup} warmup + {args.steps} timed steps, "
          f"fastest of {args.rounds} round(s)")

    # rounds alternate the configurations and keep each one's fastest round: load from other
    # processes only ever adds time, and alternating spreads it over all configurations
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    spawn = multiprocessing.get_context("spawn")
    for round_ in range(args.rounds):
        for name in args.configs:
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                row = pool.submit(run_config, name, args).result()
            print(f"  round {round_ + 1}/{args.rounds} {name}: {row['ms_per_step']:.1f} ms/step",
                  file=sys.stderr, flush=True)
            runs[name].append(row)
    rows = []
    for name, rounds in runs.items():
        fastest = min(rounds, key=lambda r: r["ms_per_step"])
        rows.append({**fastest, "device": device.type, "rounds_ms_per_step": [r["ms_per_step"] for r in rounds]})
    print_table(rows, peak, peak_label)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"device": device_name, "torch": torch.__version__, "args": {**vars(args), "json": str(args.json)},
                  "matmul_peak_flops": peak, "matmul_peak_label": peak_label, "results": rows}
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
