"""One GPU session in one command: render shards, benchmark training, time deblurring, train, report.

    python bench/gpu_session.py --out $OUT                    # on the GPU machine, 10-minute budget
    python bench/gpu_session.py --tiny --device cpu --out /tmp/s   # the whole thing on a CPU, ~1 min

Stages, in order, inside one time budget (``--budget-s``, default 600 s):

    render       ``python -m pipeline render --engine local --workers <all cores>`` of
                 configs/shards/pretrained.toml into ``--data`` (default: <work>/shards)
    bench_train  bench/bench_train.py at the paper size (batch 8, 8 frames, 160², width 64):
                 plain vs fused set conv (fp32), fused fp32 vs bf16 (+channels_last), eager vs
                 torch.compile, synthetic batches vs streamed from the rendered shards; samples/s,
                 peak memory (torch.cuda.max_memory_allocated), MFU against the bf16 matmul rate
                 bench_train measures. One subprocess per group (eager; compiled ours; compiled
                 streamed), so a compile that runs long loses only its own rows
    deblur       a 12 MP × 8-frame synthetic burst (bench/bench_deblur.py's): alignment, then the
                 tiled model with the shipped model (models/burst-deblur.pt) and a paper-size
                 random-init model, bf16 and fp32; one row per (model, precision), written as it is done
    train        configs/train/gpu.toml on the rendered shards with the time left: a short
                 calibration run measures steps/s, then ``--resume`` to as many steps as fit
                 (exact resume: the same batches and updates as one straight run); best.pt exported

Every stage is guarded: an exception, a non-zero exit or a timeout is recorded in the JSON under
``stages.<name>`` (status "failed", the error line, the output's tail) and the session goes on; a
stage that the budget cannot fit, or whose input failed, is "skipped" with the reason. The JSON is
rewritten after every stage, so a session killed from outside leaves the stages it finished.

Output folder ``--out`` (flat, at most 8 files of at most 16 MiB each: what the device machine's
$OUT returns): gpu_session.json (the report), gpu_session.log (every stage's output),
run.tar.gz (the training run without checkpoints: config.toml, summary.json, tb/, the trainer's
logs), burst-deblur-gpu.pt (best.pt exported: weights + config; split into .part-NN files of
15 MiB when larger: ``cat burst-deblur-gpu.pt.part-* > burst-deblur-gpu.pt``). The full run
(last.pt with the optimizer, best.pt) stays in ``--work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from common.errors import one_line  # noqa: E402
from common.files import atomic_write_bytes  # noqa: E402

STAGES = ("render", "bench_train", "deblur", "train")
PART_BYTES = 15 * 2**20  # the device machine returns files of at most 16 MiB


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass
class Sizes:
    """What each stage runs: the paper size on a GPU, or a tiny one that a CPU runs in seconds."""

    shards_config: str = "configs/shards/pretrained.toml"
    shards_sets: tuple[str, ...] = ()
    batch: int = 8  # training benchmark: batch × frames × size², model width
    frames: int = 8
    size: int = 160
    width: int = 64
    bench_steps: int = 20
    bench_warmup: int = 3
    bench_workers: int = 8  # DataLoader workers of the streamed configuration
    bench_threads: int = 0
    eager_configs: tuple[str, ...] = ("plain", "fused", "ours", "streamed")
    compile_configs: tuple[str, ...] = ("ours", "streamed")
    megapixels: float = 12.0  # deblur burst
    deblur_frames: int = 8
    deblur_tile: int = 512
    deblur_width: int = 64
    precisions: tuple[str, ...] = ("bf16", "fp32")
    train_config: str = "configs/train/gpu.toml"
    train_sets: tuple[str, ...] = ()
    calibration_steps: int = 100
    max_train_steps: int | None = None  # None: as many as the budget fits


TINY = Sizes(
    shards_config="configs/shards/default.toml",
    shards_sets=("dataset.frames=4", "dataset.size=48", "dataset.kernel_size=15", "kernels.scale_max=2.5",
                 "splits.train.samples=8", "splits.train.samples_per_shard=4",
                 "splits.val.samples=4", "splits.val.samples_per_shard=4",
                 "splits.test.samples=2", "splits.test.samples_per_shard=2"),
    batch=2, frames=4, size=32, width=4, bench_steps=1, bench_warmup=1, bench_workers=1, bench_threads=1,
    # on the CPU "ours" is "fused" (no bf16, no channels_last there): not timed twice
    eager_configs=("streamed",), compile_configs=("ours",),
    megapixels=0.03, deblur_frames=3, deblur_tile=128, deblur_width=4, precisions=("fp32",),
    train_sets=("train.batch_size=2", "train.crop=32", "train.max_frames=4", "train.val_samples=2",
                "train.val_frames=[1, 4]", "train.num_workers=0", "train.shuffle_buffer=4", "train.threads=1",
                "train.image_samples=2", "model.width=4", "model.mults=[1, 2]"),
    calibration_steps=2, max_train_steps=4,
)


# ----------------------------------------------------------------------------- budget and stages


class Budget:
    """Seconds left of the session; each stage gets a share of the total, never more than is left
    after what the stages behind it are promised."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.t0 = time.monotonic()

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.t0)

    def allot(self, share: float, reserve_s: float = 0.0) -> float:
        """min(share × total, time left − reserve_s): the timeout of the next stage or step."""
        return max(0.0, min(share * self.total_s, self.left() - reserve_s))


class StageFailed(Exception):
    """A stage's command failed: the message is one line; ``tail`` is the end of its output."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


class Session:
    """The report, the log, and the guard every stage runs under."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.budget = Budget(args.budget_s)
        self.out: Path = args.out
        self.work: Path = args.work
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu_session.log"
        self.log_file = open(self.log_path, "a", buffering=1)
        self.report: dict = {
            "script": "bench/gpu_session.py", "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "budget_s": args.budget_s, "tiny": args.tiny, "device": args.device,
            "host": host_info(), "work": str(self.work), "sizes": dataclasses.asdict(sizes),
            "stages": {name: {"status": "pending"} for name in STAGES}, "outputs": {},
        }
        self.save()

    def say(self, text: str) -> None:
        line = f"[gpu_session {time.monotonic() - self.budget.t0:7.1f}s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.budget.t0, 1)
        atomic_write_bytes(self.out / "gpu_session.json",
                           (json.dumps(self.report, indent=1, default=str) + "\n").encode())

    def stage(self, name: str, fn, need_s: float, blocked: str | None = None) -> dict | None:
        """Run ``fn()`` (returns the stage's result dict) under the guard; record and return it.

        Skipped (with the reason) when not chosen by --stages, when ``blocked`` names a missing
        input, or when less than ``need_s`` seconds are left. Any exception is recorded as a failure."""
        entry = self.report["stages"][name]
        if name not in self.args.stages:
            entry.update(status="skipped", reason="not in --stages")
        elif blocked:
            entry.update(status="skipped", reason=blocked)
        elif self.budget.left() < need_s:
            entry.update(status="skipped", reason=f"budget: {self.budget.left():.0f} s left, the stage needs "
                                                  f">= {need_s:.0f} s")
        else:
            self.say(f"stage {name}: start ({self.budget.left():.0f} s left)")
            entry.update(status="running")
            t0 = time.monotonic()
            try:
                entry["result"] = fn()
                entry["status"] = "ok"
            except Exception as e:  # noqa: BLE001 -- the guard: record and go on
                entry.update(status="failed", error=f"{type(e).__name__}: {one_line(e)}",
                             tail=getattr(e, "tail", "") or traceback.format_exc()[-3000:])
            entry["seconds"] = round(time.monotonic() - t0, 1)
            self.say(f"stage {name}: {entry['status']} in {entry['seconds']} s"
                     + (f" ({entry['error']})" if "error" in entry else ""))
        if entry["status"] == "skipped":
            self.say(f"stage {name}: skipped ({entry['reason']})")
        self.save()
        return entry.get("result")

    def command(self, cmd: list[str], timeout_s: float, what: str, log: Path | None = None) -> dict:
        """Run ``cmd`` (from the repo root, in its own process group), its output to the session
        log (and ``log``) and stdout. At ``timeout_s``: SIGINT to the group (the trainer keeps its
        last checkpoint), SIGKILL 20 s later. Returns {rc, seconds, timed_out, tail}."""
        self.say(f"{what}: {' '.join(cmd)} (timeout {timeout_s:.0f} s)")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        extra = open(log, "a", buffering=1) if log else None
        tail: list[str] = []
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                sys.stdout.write(line)
                self.log_file.write(line)
                if extra:
                    extra.write(line)
                tail.append(line)
                del tail[:-60]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(f"{what}: timeout after {timeout_s:.0f} s: SIGINT")
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=5)
        if extra:
            extra.close()
        return {"rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1), "timed_out": timed_out,
                "tail": "".join(tail)[-3000:]}

    def check(self, run: dict, what: str) -> dict:
        """``run`` (from ``command``) if it exited 0, else StageFailed with its tail."""
        if run["timed_out"]:
            raise StageFailed(f"{what}: stopped at its time limit after {run['seconds']} s", run["tail"])
        if run["rc"] != 0:
            last = [line for line in run["tail"].splitlines() if line.strip()][-1:] or [""]
            raise StageFailed(f"{what}: exit status {run['rc']}: {last[0][:300]}", run["tail"])
        return run


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this session started for proc (start_new_session)
    except ProcessLookupError:
        pass


def host_info() -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if info["cuda_available"]:  # names without a CUDA context in this process (the stages run in children)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["gpus"] = smi.stdout.strip().splitlines()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["gpus"] = f"nvidia-smi: {one_line(e)}"
    return info


# ----------------------------------------------------------------------------- the stages


def stage_render(s: Session) -> dict:
    """Render (or resume) the dataset into s.args.data with the local engine on every core."""
    data, sz = s.args.data, s.sizes
    cmd = [sys.executable, "-m", "pipeline", "render", "--config", sz.shards_config, "--out", str(data),
           "--engine", "local", "--workers", str(os.cpu_count() or 1), "--quiet"]
    for item in sz.shards_sets + tuple(s.args.shards_set):
        cmd += ["--set", item]
    run = s.check(s.command(cmd, s.budget.allot(0.15, reserve_s=0.3 * s.budget.total_s), "render"), "render")
    manifest = json.loads((data / "manifest.json").read_text())
    splits = {name: {"samples": sp["samples"], "shards": len(sp["shards"])} for name, sp in manifest["splits"].items()}
    total = sum(sp["samples"] for sp in splits.values())
    size = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    return {"data": str(data), "config": sz.shards_config, "config_hash": manifest.get("config_hash"),
            "splits": splits, "seconds": run["seconds"], "samples_per_s": round(total / max(run["seconds"], 1e-9), 1),
            "workers": os.cpu_count(), "bytes": size,
            "note": "wall clock of the whole command (process start, pool start, resume check included)"}


def bench_rows(report: dict) -> list[dict]:
    """bench_train.py's rows with MFU (counted FLOP/s over its measured matmul rate) and GiB."""
    peak = report["matmul_peak_flops"]
    rows = []
    for r in report["results"]:
        achieved = r["flops_per_sample"] * r["samples_per_s"]
        rows.append({"config": r["config"], "set_conv": "fused" if r["fused"] else "plain", "dtype": r["dtype"],
                     "channels_last": r["channels_last"], "compile": r["compile"],
                     "input": "streamed" if r["config"] == "streamed" else "synthetic",
                     "ms_per_step": round(r["ms_per_step"], 2), "samples_per_s": round(r["samples_per_s"], 2),
                     "peak_mem_gib": round(r["peak_mem_bytes"] / 2**30, 3),
                     "gflop_per_sample": round(r["flops_per_sample"] / 1e9, 2),
                     "tflop_per_s": round(achieved / 1e12, 3), "mfu": round(achieved / peak, 4), "loss": r["loss"]})
    return rows


def stage_bench_train(s: Session, data_ok: bool) -> dict:
    """bench/bench_train.py in groups: eager (all configurations), then each compiled one alone."""
    sz, device = s.sizes, s.args.device
    groups: list[tuple[str, list[str], bool, float]] = [("eager", list(sz.eager_configs), False, 0.15)]
    if s.args.compile:
        groups += [(f"compile-{c}", [c], True, 0.15 if c == "ours" else 0.1) for c in sz.compile_configs]
    result: dict = {"device": None, "matmul": None, "groups": {}, "rows": [], "notes": []}
    if not s.args.compile:
        result["notes"].append("torch.compile not timed (--no-compile; --tiny implies it: inductor's CPU build "
                               "takes minutes)")
    if not data_ok:
        result["notes"].append("no rendered shards: the streamed configuration is left out")
    if device == "cpu":
        result["notes"].append("on the CPU bench_train runs 'ours' as the fused form in fp32 (no bf16, no "
                               "channels_last)")
    if s.args.tiny:
        result["notes"].append("--tiny: the streamed configuration only (a process per configuration costs "
                               "seconds on a CPU); sizes are not the paper's, the figures mean nothing")
    for name, configs, compiled, share in groups:
        if not data_ok:
            configs = [c for c in configs if c != "streamed"]
        group: dict = {"configs": configs}
        result["groups"][name] = group
        if not configs:
            group.update(status="skipped", reason="no configuration left")
            continue
        timeout = s.budget.allot(share, reserve_s=0.35 * s.budget.total_s)
        if timeout < 0.02 * s.budget.total_s:
            group.update(status="skipped", reason=f"budget: {s.budget.left():.0f} s left")
            continue
        out = s.work / f"bench_train-{name}.json"
        cmd = [sys.executable, "bench/bench_train.py", "--device", device, "--batch", str(sz.batch),
               "--frames", str(sz.frames), "--size", str(sz.size), "--width", str(sz.width),
               "--steps", str(sz.bench_steps), "--warmup", str(sz.bench_warmup), "--threads", str(sz.bench_threads),
               "--configs", ",".join(configs), "--json", str(out)]
        if "streamed" in configs:
            cmd += ["--data", str(s.args.data), "--workers", str(sz.bench_workers)]
        if compiled:
            cmd.append("--compile")
        try:
            run = s.check(s.command(cmd, timeout, f"bench_train {name}"), f"bench_train {name}")
            report = json.loads(out.read_text())
            rows = bench_rows(report)
            result["device"] = report["device"]
            result["matmul"] = result["matmul"] or {"flops": report["matmul_peak_flops"],
                                                    "label": report["matmul_peak_label"]}
            result["rows"] += rows
            group.update(status="ok", seconds=run["seconds"], matmul_peak_flops=report["matmul_peak_flops"])
        except Exception as e:  # noqa: BLE001 -- one group's failure keeps the others' rows
            group.update(status="failed", error=f"{type(e).__name__}: {one_line(e)}", tail=getattr(e, "tail", ""))
        s.save()
    result["ratios"] = bench_ratios(result["rows"])
    if not result["rows"]:
        raise StageFailed("no benchmark group produced a row: "
                          + "; ".join(f"{k}: {g.get('error') or g.get('reason')}" for k, g in result["groups"].items()))
    return result


def bench_ratios(rows: list[dict]) -> dict:
    """samples/s ratios that answer the questions: fused over plain, bf16 over fp32, compile over
    eager, streamed over synthetic (same compile setting)."""
    by = {(r["config"], r["compile"]): r["samples_per_s"] for r in rows}
    ratios = {}

    def put(name: str, a, b) -> None:
        if a in by and b in by:
            ratios[name] = round(by[a] / by[b], 3)

    put("fused_over_plain_fp32", ("fused", False), ("plain", False))
    put("ours_bf16_channels_last_over_fused_fp32", ("ours", False), ("fused", False))
    put("ours_compile_over_eager", ("ours", True), ("ours", False))
    put("streamed_over_synthetic_eager", ("streamed", False), ("ours", False))
    put("streamed_over_synthetic_compile", ("streamed", True), ("ours", True))
    put("ours_compile_over_plain", ("ours", True), ("plain", False))
    put("ours_eager_over_plain", ("ours", False), ("plain", False))
    return ratios


def stage_deblur(s: Session) -> dict:
    """The deblur timing in a child process (its CUDA memory and any crash stay there)."""
    sz = s.sizes
    out = s.work / "deblur.json"
    out.unlink(missing_ok=True)
    spec = {"device": s.args.device, "megapixels": sz.megapixels, "frames": sz.deblur_frames, "tile": sz.deblur_tile,
            "width": sz.deblur_width, "precisions": list(sz.precisions), "shipped": str(REPO / "models/burst-deblur.pt"),
            "out": str(out)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--deblur-child", json.dumps(spec)]
    run = s.command(cmd, s.budget.allot(0.15, reserve_s=0.2 * s.budget.total_s), "deblur")
    result = json.loads(out.read_text()) if out.is_file() else {}
    if run["timed_out"] or run["rc"] != 0:
        if result.get("rows"):  # the rows done before the limit are kept
            result["incomplete"] = (f"stopped at its time limit after {run['seconds']} s" if run["timed_out"]
                                    else f"exit status {run['rc']}")
            result["tail"] = run["tail"]
            return result
        s.check(run, "deblur")
    return result


def deblur_child(spec: dict) -> None:
    """Time alignment and tiled inference of one synthetic burst; rewrite spec['out'] after each row."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from bench_deblur import sync, synthetic_burst
    from trainer.align import align_burst
    from trainer.device import resolve_device
    from trainer.model import ModelConfig, build_model, load
    from trainer.tiling import auto_overlap, run_tiled, tile_starts

    device = resolve_device(spec["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    out = Path(spec["out"])
    result: dict = {"rows": []}

    def save() -> None:
        atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())

    t0 = time.perf_counter()
    burst, shifts = synthetic_burst(spec["megapixels"], spec["frames"])
    h, w = burst[0].shape[:2]
    mp = h * w / 1e6
    result["burst"] = {"width": w, "height": h, "megapixels": round(mp, 3), "frames": spec["frames"],
                       "made_s": round(time.perf_counter() - t0, 2)}
    result["cpu_threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    aligned, ref, alignments = align_burst(burst)
    align_s = time.perf_counter() - t0
    errors = [float(np.hypot(*(np.array(a.shift) - (shifts[ref] - shifts[i]))))
              for i, a in enumerate(alignments) if a is not None]
    result["align"] = {"seconds": round(align_s, 3), "reference": int(ref),
                       "centre_shift_error_max_px": round(max(errors, default=0.0), 4),
                       "s_per_mp_frame": round(align_s / mp / spec["frames"], 4)}
    save()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        paper = build_model(ModelConfig(width=spec["width"]))
    models = {"paper-random-init": paper, "shipped": load(spec["shipped"])}
    precisions = spec["precisions"] if cuda else ["fp32"]  # bf16 autocast is the CUDA path of run_tiled
    batch = 2 if cuda else 1
    for precision in precisions:  # the target (bf16, paper size) first: a timeout keeps it
        for name, model in models.items():
            model = model.to(device).eval()
            cfg = model.cfg
            overlap = auto_overlap(cfg)
            tiles = len(tile_starts(h, spec["tile"], overlap, cfg.multiple)) * len(tile_starts(w, spec["tile"], overlap, cfg.multiple))
            warm = [f[: min(h, spec["tile"]), : min(w, spec["tile"])] for f in aligned]
            run_tiled(model, warm, spec["tile"], overlap, device, batch, precision)  # warm-up, cuDNN autotune
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            image = run_tiled(model, aligned, spec["tile"], overlap, device, batch, precision)
            sync(device)
            model_s = time.perf_counter() - t0
            result["rows"].append({
                "model": name, "width": cfg.width, "params": sum(p.numel() for p in model.parameters()),
                "precision": precision, "tile": spec["tile"], "overlap": overlap, "tiles": tiles, "batch": batch,
                "model_s": round(model_s, 3), "align_s": round(align_s, 3), "total_s": round(model_s + align_s, 3),
                "model_s_per_mp_frame": round(model_s / mp / spec["frames"], 4),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
                "finite": bool(np.isfinite(image).all())})
            print(f"deblur {name} {precision}: model {model_s:.2f} s + align {align_s:.2f} s", flush=True)
            save()
            model.cpu()
            if cuda:
                torch.cuda.empty_cache()


TRAIN_LINE = re.compile(r"^step (\d+)/(\d+) \| .*? \| ([\d.]+) samples/s")


def train_rates(log: Path, since_step: int) -> list[float]:
    """samples/s of the trainer's progress lines after ``since_step`` (the first line of a start
    holds its warm-up: dropped)."""
    rates = []
    for line in log.read_text(errors="replace").splitlines():
        m = TRAIN_LINE.match(line.strip())
        if m and int(m.group(1)) > since_step:
            rates.append(float(m.group(3)))
    return rates[1:] if len(rates) > 1 else rates


def stage_train(s: Session) -> dict:
    """Calibrate (a short run), then resume to the steps that fit the time left; export best.pt."""
    sz = s.sizes
    run_dir = s.work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each session (the trainer refuses an occupied folder)
    log = s.work / "train.log"
    log.unlink(missing_ok=True)
    base = [sys.executable, "-m", "trainer", "train", "--out", str(run_dir)]
    common = [f"train.device={json.dumps(s.args.device)}"] + list(sz.train_sets) + list(s.args.train_set)
    reserve = max(10.0, 0.03 * s.budget.total_s)  # packing the outputs
    deadline = time.monotonic() + s.budget.left() - reserve

    cal = sz.calibration_steps
    sets = common + [f"train.steps={cal}", f"train.val_every={cal}", f"train.ckpt_every={cal}",
                     f"train.log_every={max(1, cal // 5)}"]
    cmd = base + ["--config", sz.train_config, "--data", str(s.args.data)] + [x for v in sets for x in ("--set", v)]
    first = s.command(cmd, deadline - time.monotonic(), "train (calibration)", log=log)
    result: dict = {"config": sz.train_config, "overrides": common, "run": str(run_dir),
                    "calibration": {"steps": cal, "seconds": first["seconds"], "rc": first["rc"],
                                    "timed_out": first["timed_out"]}}
    s.check(first, "train (calibration)")
    batch = _train_batch(run_dir)
    rates = train_rates(log, 0)
    steps_per_s = (sorted(rates)[len(rates) // 2] / batch) if rates else cal / max(first["seconds"], 1e-9)
    overhead = max(0.0, first["seconds"] - cal / steps_per_s)  # start, validation, checkpoint
    result["calibration"].update(samples_per_s=rates, steps_per_s=round(steps_per_s, 3), overhead_s=round(overhead, 1))
    available = deadline - time.monotonic() - overhead - 0.05 * s.budget.total_s
    extra = int(0.9 * available * steps_per_s)
    if sz.max_train_steps is not None:
        extra = min(extra, sz.max_train_steps - cal)
    if extra < max(1, cal // 2):
        result["resume"] = {"status": "skipped", "reason": f"{available:.0f} s left after the calibration: "
                                                          f"{extra} more steps would not pay for a restart"}
    else:
        steps = cal + extra
        every = max(cal, -(-extra // 4))  # about 4 validations and checkpoints
        sets = [f"train.steps={steps}", f"train.val_every={every}", f"train.ckpt_every={every}",
                f"train.log_every={max(1, every // 10)}"]
        cmd = base + ["--resume"] + [x for v in sets for x in ("--set", v)]
        second = s.command(cmd, deadline - time.monotonic(), "train (resume)", log=log)
        result["resume"] = {"steps": steps, "val_every": every, "seconds": second["seconds"], "rc": second["rc"],
                            "timed_out": second["timed_out"]}
        if second["timed_out"] or second["rc"] != 0:
            result["resume"]["status"] = "failed"
            result["resume"]["tail"] = second["tail"]
            result["resume"]["note"] = "the run folder keeps the last checkpoint (train.ckpt_every) of this phase"
        else:
            result["resume"]["status"] = "ok"
    summary = run_dir / "summary.json"
    result["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
    if result["summary"]:
        result["summary"].pop("shards_read", None)  # long, in run.tar.gz
    return result


def _train_batch(run_dir: Path) -> int:
    import tomllib

    return int(tomllib.loads((run_dir / "config.toml").read_text())["train"]["batch_size"])


# ----------------------------------------------------------------------------- outputs


def pack_outputs(s: Session) -> dict:
    """run.tar.gz (the run without checkpoints, the trainer's log) and the exported best.pt into
    --out, each file at most 16 MiB (bigger ones split into .part-NN)."""
    outputs: dict = {}
    run_dir = s.work / "run"
    if run_dir.is_dir():
        tar_path = s.out / "run.tar.gz"
        with tarfile.open(tar_path, "w:gz") as tar:
            for f in sorted(run_dir.rglob("*")):
                if f.is_file() and f.suffix != ".pt":
                    tar.add(f, arcname=f"run/{f.relative_to(run_dir)}")
            for f in sorted(s.work.glob("*.json")) + [s.work / "train.log"]:
                if f.is_file():
                    tar.add(f, arcname=f"work/{f.name}")
            if (s.args.data / "manifest.json").is_file():
                tar.add(s.args.data / "manifest.json", arcname="shards/manifest.json")
        outputs["run.tar.gz"] = tar_path.stat().st_size
        best = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
        if best.is_file():
            from trainer.export import export

            model = s.out / "burst-deblur-gpu.pt"
            info = export(best, model)
            outputs["model"] = {"from": best.name, "step": info["step"], "best_val_psnr": info["best_val_psnr"],
                                "files": split_file(model)}
    return outputs


def split_file(path: Path, part_bytes: int = PART_BYTES) -> dict[str, int]:
    """Leave ``path`` whole if it fits ``part_bytes``, else replace it by path.part-00, -01, ...
    (``cat path.part-* > path`` rebuilds it). Returns {file name: bytes}."""
    size = path.stat().st_size
    if size <= part_bytes:
        return {path.name: size}
    parts = {}
    with open(path, "rb") as f:
        for i in range(-(-size // part_bytes)):
            part = path.with_name(f"{path.name}.part-{i:02d}")
            part.write_bytes(f.read(part_bytes))
            parts[part.name] = part.stat().st_size
    path.unlink()
    return parts


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_session"),
                   help="report folder (default: $OUT if set, else runs/gpu_session)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the shards, the run and the benchmark files (default: a new temporary folder)")
    p.add_argument("--data", type=Path, default=None, help="the shard folder (default: <work>/shards); rendered "
                                                            "or resumed there")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="time budget of the whole session from its start, s (default 600)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the whole session on a CPU in about a minute "
                                                       "(implies --no-compile)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile benchmark rows")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--shards-config", default=None, help="shard config (default: configs/shards/pretrained.toml)")
    p.add_argument("--shards-set", action="append", default=[], metavar="KEY=VALUE", help="render override (repeatable)")
    p.add_argument("--train-config", default=None, help="train config (default: configs/train/gpu.toml)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="train override (repeatable)")
    p.add_argument("--deblur-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.deblur_child is not None:
        return args
    args.stages = args.stages.split(",")
    unknown = [x for x in args.stages if x not in STAGES]
    if unknown:
        p.error(f"--stages: unknown stage '{unknown[0]}' (known: {', '.join(STAGES)})")
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be auto, cpu or cuda, got '{args.device}'")
    if args.tiny:
        args.compile = False
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu_session-"))
    args.data = args.data or args.work / "shards"
    args.out, args.work, args.data = args.out.resolve(), args.work.resolve(), args.data.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.deblur_child is not None:
        deblur_child(json.loads(args.deblur_child))
        return 0
    sizes = dataclasses.replace(TINY if args.tiny else Sizes())
    if args.shards_config:
        sizes.shards_config = args.shards_config
    if args.train_config:
        sizes.train_config = args.train_config
    s = Session(args, sizes)
    B = args.budget_s
    s.say(f"budget {B:.0f} s, device {args.device}, work {args.work}, out {args.out}")

    s.stage("render", lambda: stage_render(s), need_s=0.02 * B)
    data_ok = (args.data / "manifest.json").is_file()
    no_data = None if data_ok else f"no rendered shards in {args.data} (render: {s.report['stages']['render']['status']})"
    s.stage("bench_train", lambda: stage_bench_train(s, data_ok), need_s=0.05 * B)
    s.stage("deblur", lambda: stage_deblur(s), need_s=0.05 * B)
    s.stage("train", lambda: stage_train(s), need_s=0.1 * B, blocked=no_data)
    try:
        s.report["outputs"] = pack_outputs(s)
    except Exception as e:  # noqa: BLE001 -- the report is still written
        s.report["outputs"] = {"error": f"{type(e).__name__}: {one_line(e)}"}
    s.report["outputs"]["gpu_session.json"] = "this report"
    s.report["outputs"]["gpu_session.log"] = "every stage's output"
    statuses = {name: st["status"] for name, st in s.report["stages"].items()}
    s.say(f"done: {statuses}; report {args.out / 'gpu_session.json'}")
    s.save()
    s.log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
