"""The pipeline end to end: determinism, resume, faults, round trips through stock readers, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zarr
from PIL import Image

from pipeline.config import config_hash
from pipeline.format import encode_sample
from pipeline.inspect import contact_sheet, read_sample, summary, typical_index, verify
from pipeline.render import render_sample
from pipeline.run import RenderError, render_dataset
from pipeline.shards import HashingWriter, TarThread, add_member
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("splits.train.samples=6", "splits.train.samples_per_shard=2", "splits.val.samples=2",
         "splits.val.samples_per_shard=2", "splits.test.samples=3", "splits.test.samples_per_shard=2")


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every tar and every file of kernels.zarr (chunks and metadata)."""
    files = sorted(folder.glob("*.tar")) + sorted(p for p in (folder / "kernels.zarr").rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


# ----------------------------------------------------------------------------- contract + round trips


def test_render_sample_is_exactly_what_the_shard_holds(tiny_shards):
    cfg = tiny_config()
    for split, index in [("train", 0), ("train", 13), ("val", 5), ("test", 7)]:
        sample = render_sample(cfg, split, index)
        stored = read_sample(tiny_shards, sample["key"])
        np.testing.assert_array_equal(stored["burst"], sample["burst"])
        np.testing.assert_array_equal(stored["target"], sample["target"])
        assert stored["params"] == json.loads(json.dumps(sample["params"]))


def test_webdataset_reads_every_sample_in_order(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    urls = [str(tiny_shards / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert set(sample) >= {"__key__", "burst.npy", "target.png", "json"}
        burst = np.load(io.BytesIO(sample["burst.npy"]), allow_pickle=False)
        target = np.asarray(Image.open(io.BytesIO(sample["target.png"])))
        assert burst.dtype == np.uint8 and burst.shape == (4, 48, 48, 3)
        assert target.dtype == np.uint8 and target.shape == (48, 48, 3)
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and "gamma" in meta and "source" in meta
        keys.append(sample["__key__"])
    assert keys == [f"train-{i // 4:06d}-{i:06d}" for i in range(16)]


def test_tar_command_lists_deterministic_headers_and_extracts(tiny_shards, tmp_path):
    listing = subprocess.run(["tar", "--numeric-owner", "-tvf", str(tiny_shards / "val-000000.tar")],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(listing) == 4 * 3
    assert all(line.startswith("-rw-r--r-- 0/0") and "1970-01-01" in line for line in listing)
    names = [line.split()[-1] for line in listing]
    assert names == sorted(names)
    subprocess.run(["tar", "-xf", str(tiny_shards / "val-000000.tar"), "-C", str(tmp_path)], check=True)
    burst = np.load(tmp_path / "val-000000-000002.burst.npy", allow_pickle=False)
    np.testing.assert_array_equal(burst, read_sample(tiny_shards, "val-000000-000002")["burst"])



def test_a_shard_is_the_tar_of_its_samples_written_in_order(tiny_shards):
    """write_shard's tar (written on its own thread, shards.TarThread) is byte for byte the tar
    that one thread writes from the same samples, member after member, with add_member."""
    cfg, buf = tiny_config(), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(4, 8):  # train-000001.tar
            for name, data in encode_sample(render_sample(cfg, "train", index)):
                add_member(tar, name, data)
    assert (tiny_shards / "train-000001.tar").read_bytes() == buf.getvalue()


def test_the_tar_thread_syncs_as_it_goes_without_changing_the_bytes(tiny_shards, tmp_path, monkeypatch):
    """With sync_bytes=1 the thread syncs the file's data after every sample; the tar it writes
    is still the shard's, byte for byte, and is complete when finish() returns."""
    synced = []
    real = HashingWriter.sync_data
    monkeypatch.setattr(HashingWriter, "sync_data", lambda self: (synced.append(self.size), real(self)))
    cfg, path = tiny_config(), tmp_path / "t.tar"
    writer = TarThread(path, sync_bytes=1)
    for index in range(4, 8):
        writer.put(render_sample(cfg, "train", index))
    writer.finish()
    assert len(synced) == 4 and synced == sorted(synced) and synced[-1] <= path.stat().st_size
    assert path.read_bytes() == (tiny_shards / "train-000001.tar").read_bytes()


def test_kernels_zarr_rows_match_the_samples(tiny_shards):
    root = zarr.open_group(str(tiny_shards / "kernels.zarr"), mode="r")
    arr = root["train"]
    assert arr.shape == (16, 4, 15, 15) and arr.chunks == (4, 4, 15, 15) and arr.dtype == np.float32
    assert root["train_trajectories"].shape == (16, 4, 128, 2)
    assert root.attrs["config_hash"] == config_hash(tiny_config())
    sample = render_sample(tiny_config(), "train", 9)
    np.testing.assert_array_equal(arr[9], sample["kernels"])
    k = arr[:]
    assert (k >= 0).all()
    np.testing.assert_allclose(k.sum(axis=(2, 3)), 1, atol=1e-5)


def test_manifest_holds_the_contract(tiny_shards):
    m = json.loads((tiny_shards / "manifest.json").read_text())
    assert m["config_hash"] == config_hash(tiny_config()) and m["seed"] == 7 and m["code_version"]
    assert m["config"]["dataset"]["frames"] == 4
    for split, n in [("train", 4), ("val", 2), ("test", 2)]:
        shards = m["splits"][split]["shards"]
        assert [s["file"] for s in shards] == [f"{split}-{i:06d}.tar" for i in range(n)]
        for s in shards:
            data = (tiny_shards / s["file"]).read_bytes()
            assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        assert m["splits"][split]["skipped"] == {}
    assert not list(tiny_shards.glob(".*tmp*")) and not (tiny_shards / ".plan.json").exists()


def test_test_split_is_real_photographs(tiny_shards):
    meta = read_sample(tiny_shards, "test-000001-000005")["params"]
    assert meta["source"]["source"] == "photo"
    assert read_sample(tiny_shards, "train-000000-000000")["params"]["source"]["source"] == "deadleaves"


# ----------------------------------------------------------------------------- determinism


def test_same_bytes_across_workers_engines_and_resume(tmp_path, monkeypatch):
    # a RAY_ADDRESS in the environment (a cluster user's shell) must not make the local Ray
    # engine join that cluster: without --address it starts its own instance
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    cfg = tiny_config(*SMALL)
    runs = {"local1": dict(workers=1, engine="local"), "local2": dict(workers=2, engine="local"),
            "ray2": dict(workers=2, engine="ray")}
    digests = {}
    for name, kw in runs.items():
        render_dataset(cfg, tmp_path / name, progress=False, **kw)
        digests[name] = digest(tmp_path / name)
    assert len(digests["local1"]) > 5
    assert digests["local1"] == digests["local2"] == digests["ray2"]
    # resume: one shard missing, one truncated (as a crash could leave it), one stats file gone
    d = tmp_path / "local1"
    (d / "train-000001.tar").unlink()
    with open(d / "train-000002.tar", "r+b") as f:
        f.truncate(1000)
    (d / "stats" / "test-000000.json").unlink()
    render_dataset(cfg, d, workers=1, engine="local", progress=False)
    assert digest(d) == digests["local2"]
    assert verify(d) is None


def test_other_config_in_the_same_folder_is_refused_unless_overwrite(tmp_path):
    cfg = tiny_config(*SMALL)
    render_dataset(cfg, tmp_path / "d", progress=False)
    other = tiny_config(*SMALL, "dataset.seed=99")
    with pytest.raises(RenderError, match="another config"):
        render_dataset(other, tmp_path / "d", progress=False)
    render_dataset(other, tmp_path / "d", overwrite=True, progress=False)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["seed"] == 99


def test_worker_killed_mid_shard_is_retried_with_identical_bytes(tmp_path, monkeypatch):
    cfg = tiny_config(*SMALL)
    render_dataset(cfg, tmp_path / "ref", progress=False)
    marker = tmp_path / "killed"
    monkeypatch.setenv("PIPELINE_FAULT", f"train-000001.tar:{marker}")
    render_dataset(cfg, tmp_path / "a", workers=2, engine="local", progress=False)
    assert marker.exists()
    assert digest(tmp_path / "a") == digest(tmp_path / "ref")


def test_killed_run_leaves_nothing_that_looks_complete_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(*SMALL)
    render_dataset(cfg, tmp_path / "ref", progress=False)
    ref = digest(tmp_path / "ref")
    monkeypatch.setenv("PIPELINE_FAULT", f"train-000001.tar:{tmp_path / 'killed'}")
    with pytest.raises(RenderError, match="train-000001.tar failed"):
        render_dataset(cfg, tmp_path / "a", workers=1, engine="local", retries=0, progress=False)
    d = tmp_path / "a"
    assert not (d / "train-000001.tar").exists() and not (d / "manifest.json").exists()
    for tar in d.glob("*.tar"):  # whatever is there is complete and final
        assert ref[tar.name] == hashlib.sha256(tar.read_bytes()).hexdigest()
    monkeypatch.delenv("PIPELINE_FAULT")
    render_dataset(cfg, d, workers=1, engine="local", progress=False)
    assert digest(d) == ref


def test_ctrl_c_then_rerun_gives_the_same_bytes(tmp_path):
    args = ["render", "--config", "configs/shards/default.toml", "--engine", "local", "--workers", "1",
            "--quiet", "--set", "dataset.size=48", "--set", "dataset.kernel_size=15",
            "--set", "kernels.scale_max=2.5", "--set", "splits.train.samples=16",
            "--set", "splits.train.samples_per_shard=4", "--set", "splits.val.samples=2",
            "--set", "splits.test.samples=2"]
    # the worker holds at the start of train-000002.tar (PIPELINE_HOLD) until the interrupt comes,
    # so the run is interrupted with two shards done and the rest not, on any machine at any load
    out, held = tmp_path / "c", tmp_path / "held"
    # PYTHONFAULTHANDLER: should the run hang after the interrupt, SIGABRT makes every thread of the
    # driver and its worker print its stack, for the failure message
    env = dict(os.environ, PIPELINE_HOLD=f"train-000002.tar:{held}", PYTHONFAULTHANDLER="1")
    # A suite started as a background job of a non-interactive shell (`make test &`) inherits
    # SIGINT ignored, and so would the render: Python then keeps it ignored and Ctrl-C never
    # arrives. A handled signal is reset to its default by exec, so the child gets a real Ctrl-C.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--out", str(out)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 300  # only a broken run gets near this; the hold is reached in seconds
    while time.time() < deadline and not held.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert held.exists(), "the render never reached the held shard"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the render did not stop within 120 s of Ctrl-C; its threads:\n{err[-8000:]}")
    assert proc.returncode == 130, err
    assert not (out / "manifest.json").exists()
    # the shards finished before the hold are complete (tar + stats); the held one left nothing
    done = {p.stem for p in (out / "stats").glob("*.json")}
    tars = {p.stem for p in out.glob("*.tar")}
    assert {"train-000000", "train-000001"} <= done and tars == done
    assert "train-000002" not in done
    assert cli(*args, "--out", str(out)).returncode == 0
    assert cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    assert digest(out) == digest(tmp_path / "ref")


# ----------------------------------------------------------------------------- bad input


def test_dir_source_with_bad_files_is_counted_in_the_manifest(tmp_path):
    photos = tmp_path / "photos" / "nested"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(photos / f"ok{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(photos / "small.png")
    (photos / "notes.txt").write_text("not an image")
    cfg = tiny_config(*SMALL, f"splits.train.source='dir:{tmp_path / 'photos'}'")
    m = render_dataset(cfg, tmp_path / "d", progress=False)
    skipped = m["splits"]["train"]["skipped"]
    assert skipped["too small"]["count"] == 1 and skipped["not an image"]["count"] == 1
    assert m["splits"]["train"]["source_files"] == 2


@pytest.mark.parametrize("make", ["missing", "empty", "junk", "truncated"])
def test_unusable_source_folder_is_one_clear_error_before_work(tmp_path, make):
    folder = tmp_path / "photos"
    if make != "missing":
        folder.mkdir()
    if make == "junk":
        (folder / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    if make == "truncated":  # headers are fine (the probe passes them), the pixel data ends early
        rng = np.random.default_rng(0)
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
            (folder / f"p{i}.jpg").write_bytes(buf.getvalue()[:2000])
    r = cli("render", "--config", "configs/shards/default.toml", "--engine", "local", "--out",
            str(tmp_path / "d"), "--set", f"splits.test.source='dir:{folder}'")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: split 'test'") and str(folder) in lines[0]
    assert not (tmp_path / "d").exists()


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    r = cli("render", "--config", "configs/shards/default.toml", "--set", "dataset.kernel_size=50",
            "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and r.stderr.strip() == "error: dataset.kernel_size must be odd, got 50"
    r = cli("render", "--config", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "config file not found" in r.stderr


# ----------------------------------------------------------------------------- inspect / verify


def test_verify_names_the_first_bad_shard(tiny_shards, tmp_path):
    assert verify(tiny_shards) is None
    r = cli("verify", str(tiny_shards))
    assert r.returncode == 0
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    data = bytearray((copy / "val-000001.tar").read_bytes())
    data[700] ^= 0xFF
    (copy / "val-000001.tar").write_bytes(bytes(data))
    assert verify(copy) == "val-000001.tar: sha256 differs from the manifest"
    r = cli("verify", str(copy))
    assert r.returncode == 1 and "val-000001.tar" in r.stderr
    (copy / "train-000002.tar").unlink()
    assert verify(copy) == "train-000002.tar: missing"


def test_inspect_summary_and_contact_sheet(tiny_shards, tmp_path):
    text = summary(tiny_shards)
    for word in ("train", "val", "test", "blur RMS radius", "noise std", config_hash(tiny_config())):
        assert word in text
    out = contact_sheet(tiny_shards, split="test", index=0, out=tmp_path / "s.png")
    img = Image.open(out)
    assert img.size[0] >= 5 * 48 and img.size[1] > 2 * 48
    r = cli("inspect", str(tiny_shards), "--key", "val-000001-000004", "--out", str(tmp_path / "k.png"))
    assert r.returncode == 0 and (tmp_path / "k.png").exists()
    r = cli("inspect", str(tiny_shards), "--split", "test", "--index", "99")
    assert r.returncode == 2 and "out of range" in r.stderr


def test_contact_sheet_defaults_to_median_blur_and_labels_every_panel(tiny_shards, tmp_path):
    from pipeline.format import read_manifest

    # the default sample: median (lower middle) of the mean kernel radius over the first shard
    first = read_manifest(tiny_shards).shards("test")[0]
    blur = sorted((float(np.mean(read_sample(tiny_shards, f"test-000000-{i:06d}")["params"]["kernel_radius_px"])), i)
                  for i in range(first.first, first.first + first.samples))
    median = blur[(len(blur) - 1) // 2][1]
    assert typical_index(tiny_shards, "test") == median
    default = contact_sheet(tiny_shards, split="test", out=tmp_path / "default.png")
    chosen = contact_sheet(tiny_shards, split="test", index=median, out=tmp_path / "chosen.png")
    assert default.read_bytes() == chosen.read_bytes()
    r = cli("inspect", str(tiny_shards), "--sheet", "--split", "test", "--out", str(tmp_path / "cli.png"))
    assert r.returncode == 0 and (tmp_path / "cli.png").read_bytes() == chosen.read_bytes()

    # labels: the sheet is larger than its 5 panels of 48² (target + 4 frames) over 2 rows, and
    # the strip under each image panel holds text (dark pixels on the white background)
    img = np.asarray(Image.open(chosen).convert("L"))
    height, width = img.shape
    assert width > 5 * (48 + 6) and height > 2 * 48 + 4 * 20
    top = 6  # the sheet's margin above the first row of panels
    painted = (img[top:top + 48] != 255).any(axis=0)  # columns of the target and frame panels
    edges = np.flatnonzero(np.diff(np.concatenate([[0], painted.astype(int), [0]])))
    panels = list(zip(edges[::2], edges[1::2]))
    assert [b - a for a, b in panels] == [48] * 5
    strip = img[top + 48 + 2: top + 48 + 30]  # under the panels: their labels
    assert all((strip[:, a:b] < 128).any() for a, b in panels), "a panel without its label"
    assert (img[-20:] < 128).any(), "no caption"


@pytest.mark.parametrize("cmd", ["render", "inspect", "verify"])
def test_every_command_has_help(cmd):
    r = cli(cmd, "--help")
    assert r.returncode == 0 and "usage" in r.stdout
