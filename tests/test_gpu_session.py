"""bench/gpu_session.py: the whole GPU session at --tiny size on the CPU, a session whose budget runs
out, and the pure helpers (benchmark rows and ratios, file splitting)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.py"
STAGES = ("render", "bench_train", "deblur", "train")

spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
gpu_session = importlib.util.module_from_spec(spec)
sys.modules["gpu_session"] = gpu_session  # dataclasses look their module up there
spec.loader.exec_module(gpu_session)


def run_session(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out),
                           "--work", str(tmp_path / "work"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_session.json").read_text())


def check_recorded(report: dict) -> None:
    """Every stage ran to a result, or says why not."""
    assert set(report["stages"]) == set(STAGES)
    for name, stage in report["stages"].items():
        assert stage["status"] in ("ok", "failed", "skipped"), (name, stage)
        if stage["status"] == "ok":
            assert stage["result"], name
        elif stage["status"] == "failed":
            assert stage["error"], name
        else:
            assert stage["reason"], name


def test_tiny_session_runs_every_stage(tmp_path):
    report = run_session(tmp_path, "--tiny")
    check_recorded(report)
    stages = report["stages"]
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(STAGES, "ok"), \
        {name: s.get("error") for name, s in stages.items()}

    assert stages["render"]["result"]["splits"]["train"]["samples"] == 8
    bench = stages["bench_train"]["result"]
    assert [r["config"] for r in bench["rows"]] == ["streamed"]
    row = bench["rows"][0]
    assert row["samples_per_s"] > 0 and row["peak_mem_gib"] > 0 and 0 < row["mfu"]
    assert any("compile" in note for note in bench["notes"])  # --tiny leaves compile out, and says so
    deblur = stages["deblur"]["result"]
    assert {(r["model"], r["precision"]) for r in deblur["rows"]} == {("shipped", "fp32"), ("paper-random-init", "fp32")}
    assert all(r["finite"] and r["model_s"] > 0 for r in deblur["rows"])
    train = stages["train"]["result"]
    assert train["resume"]["status"] == "ok"  # calibration, then --resume to the steps that fit
    assert train["summary"]["step"] == train["resume"]["steps"] == 4

    # --out is what the device machine returns: flat, <= 8 files of <= 16 MiB, plain names
    files = sorted((tmp_path / "out").iterdir())
    assert {f.name for f in files} == {"gpu_session.json", "gpu_session.log", "run.tar.gz", "burst-deblur-gpu.pt"}
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 * 2**20 for f in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)
    from trainer.model import load

    model = load(tmp_path / "out" / "burst-deblur-gpu.pt")  # the exported best.pt loads for inference
    assert model.cfg.width == 4


def test_budget_short_records_why(tmp_path):
    # a budget that the render cannot fit: every later stage still gets a recorded reason
    report = run_session(tmp_path, "--tiny", "--budget-s", "2")
    check_recorded(report)
    assert report["stages"]["train"]["status"] == "skipped"


def test_bench_rows_and_ratios():
    def result(config, fused, dtype, compiled, samples_per_s):
        return {"config": config, "fused": fused, "dtype": dtype, "channels_last": dtype == "bf16",
                "compile": compiled, "ms_per_step": 8e3 / samples_per_s, "samples_per_s": samples_per_s,
                "peak_mem_bytes": 2**30, "flops_per_sample": 1e12, "loss": 0.1}

    report = {"matmul_peak_flops": 800e12, "results": [
        result("plain", False, "fp32", False, 100.0), result("fused", True, "fp32", False, 150.0),
        result("ours", True, "bf16", False, 400.0), result("streamed", True, "bf16", False, 380.0),
        result("ours", True, "bf16", True, 600.0)]}
    rows = gpu_session.bench_rows(report)
    assert rows[0]["mfu"] == pytest.approx(100 * 1e12 / 800e12)
    assert rows[0]["peak_mem_gib"] == 1.0 and rows[3]["input"] == "streamed"
    ratios = gpu_session.bench_ratios(rows)
    assert ratios["fused_over_plain_fp32"] == 1.5
    assert ratios["streamed_over_synthetic_eager"] == 0.95
    assert ratios["ours_compile_over_eager"] == 1.5
    assert "streamed_over_synthetic_compile" not in ratios  # no compiled streamed row


def test_split_file(tmp_path):
    small = tmp_path / "small.pt"
    small.write_bytes(b"x" * 10)
    assert gpu_session.split_file(small, part_bytes=10) == {"small.pt": 10}
    big = tmp_path / "big.pt"
    data = bytes(range(256)) * 10
    big.write_bytes(data)
    parts = gpu_session.split_file(big, part_bytes=1000)
    assert parts == {"big.pt.part-00": 1000, "big.pt.part-01": 1000, "big.pt.part-02": 560}
    assert not big.exists()
    assert b"".join((tmp_path / name).read_bytes() for name in sorted(parts)) == data
