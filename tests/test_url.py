"""Reading a dataset over a URL: a real local HTTP server (python -m http.server) serving the tiny
dataset, and fsspec's in-memory filesystem. The same batches, the same exact resume, the same
checksum check as from the local folder."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from pipeline import format as fmt
from pipeline import inspect as insp
from pipeline.format import DataError, read_manifest
import trainer.train as train_mod
from trainer import data
from trainer.data import TrainStream, iter_samples, load_val_set

from .test_train import run_cli, tiny_sets, weights

SERVER_DEADLINE_S = 60.0  # a busy 2-core machine can be slow to start a Python process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(proc: subprocess.Popen, port: int, deadline_s: float) -> None:
    """Return once something accepts connections on ``port``; fail if the server exits or the deadline passes."""
    end = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"http.server exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > end:
                raise RuntimeError(f"http.server did not listen on port {port} within {deadline_s} s") from None
            time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tiny_shards, tmp_path_factory):
    """(base URL, root folder): ``python -m http.server`` on a free port serving a folder with
    good/ (a copy of the tiny dataset) and bad/ (the same with one byte of train-000001.tar's
    burst data flipped, the manifest unchanged). Stopped after the module's tests."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(tiny_shards, root / "good")
    shutil.copytree(tiny_shards, root / "bad")
    tar = root / "bad" / "train-000001.tar"
    raw = bytearray(tar.read_bytes())
    raw[5000] ^= 0x01  # inside the first sample's burst.npy
    tar.write_bytes(bytes(raw))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(proc, port, SERVER_DEADLINE_S)
        yield f"http://127.0.0.1:{port}", root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def stream(where, **kw) -> TrainStream:
    args = dict(steps=12, batch_size=3, seed=5, crop=32, min_frames=1, max_frames=4, shuffle_buffer=6, num_workers=0)
    args.update(kw)
    return TrainStream(where, "train", **args)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["step"] == y["step"] and x["keys"] == y["keys"] and x["shards"] == y["shards"]
        and torch.equal(x["burst"], y["burst"]) and torch.equal(x["target"], y["target"]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- http(s)


def test_manifest_and_samples_over_http_are_the_local_ones(served, tiny_shards):
    base, _ = served
    url = f"{base}/good/"  # a trailing '/' is allowed
    man, local = read_manifest(url), read_manifest(tiny_shards)
    assert man.data == local.data and man.folder == f"{base}/good" and man.path == f"{base}/good/manifest.json"
    ours, theirs = list(iter_samples(url, "val")), list(iter_samples(tiny_shards, "val"))
    assert [s["key"] for s in ours] == [s["key"] for s in theirs]
    assert all(np.array_equal(a["burst"], b["burst"]) and np.array_equal(a["target"], b["target"])
               and a["meta"] == b["meta"] for a, b in zip(ours, theirs))
    val = load_val_set(url, "val", 3)
    assert val["keys"] == [s["key"] for s in theirs[:3]]


def test_train_stream_over_http_gives_the_local_batches_and_resumes_exactly(served, tiny_shards):
    base, _ = served
    url = f"{base}/good"
    straight = list(stream(url).iter_worker(0))
    assert same_batches(straight, list(stream(tiny_shards).iter_worker(0)))
    resumed = list(stream(url, start_step=7).iter_worker(0))  # mid-round: the round is replayed from the URL
    assert same_batches(resumed, straight[7:])
    two = stream(url, num_workers=2)  # two readers, each its own shards
    assert same_batches(list(two.iter_worker(1)), list(stream(tiny_shards, num_workers=2).iter_worker(1)))


def test_train_over_http_straight_equals_half_resume_half_and_the_local_run(served, tiny_shards, tmp_path):
    base, _ = served
    url = f"{base}/good"
    straight, split, local = tmp_path / "straight", tmp_path / "split", tmp_path / "local"
    assert run_cli(["--out", str(straight)] + tiny_sets(url, steps=4, num_workers=1)) == 0
    assert run_cli(["--out", str(split)] + tiny_sets(url, steps=2, num_workers=1)) == 0
    assert train_mod.main(["--out", str(split), "--resume", "--set", "train.steps=4"]) == 0  # the checkpoint's config
    assert run_cli(["--out", str(local)] + tiny_sets(tiny_shards, steps=4, num_workers=1)) == 0
    a, b, c = weights(straight / "last.pt"), weights(split / "last.pt"), weights(local / "last.pt")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_flipped_byte_over_http_is_refused_before_any_sample(served, tiny_shards):
    base, _ = served
    url = f"{base}/bad"
    entry = read_manifest(url).shards("train")[1]
    got = []
    with pytest.raises(DataError, match=r"train-000001\.tar: sha256 differs from the manifest"):
        for raw in fmt.iter_shard(fmt.join(url, entry.file), sha256=entry.sha256, samples=entry.samples):
            got.append(raw)
    assert got == []  # nothing of the bad shard was handed out
    # the training stream: an error naming the shard, or in skip mode a counted skipped shard
    with pytest.raises(DataError, match=r"shard http://127\.0\.0\.1:\d+/bad/train-000001\.tar: sha256 differs"):
        list(stream(url, steps=40).iter_worker(0))
    batches = list(stream(url, steps=40, on_bad_shard="skip").iter_worker(0))
    assert batches[-1]["skipped_shards"] >= 1
    assert not any(k.startswith("train-000001-") for b in batches for k in b["keys"])


def test_missing_shard_or_manifest_over_http_is_one_line(served, tmp_path):
    base, root = served
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json at http://127\.0\.0\.1:\d+/nothing-here"):
        read_manifest(f"{base}/nothing-here")
    with pytest.raises(DataError, match=r"gone-000000\.tar: unreadable \(FileNotFoundError: .*HTTP 404\)"):
        list(fmt.iter_shard(f"{base}/good/gone-000000.tar"))


def test_inspect_over_http_and_verify_refuses_a_url(served, tiny_shards, tmp_path, monkeypatch):
    base, _ = served
    url = f"{base}/good"
    assert insp.summary(url) == insp.summary(tiny_shards)
    sample = insp.read_sample(url, "val-000001-000005")
    assert np.array_equal(sample["burst"], insp.read_sample(tiny_shards, "val-000001-000005")["burst"])
    ours = insp.contact_sheet(url, split="val", index=5, out=tmp_path / "url.png")
    theirs = insp.contact_sheet(tiny_shards, split="val", index=5, out=tmp_path / "local.png")
    assert ours.read_bytes() == theirs.read_bytes()  # the kernel row came over HTTP too
    monkeypatch.chdir(tmp_path)  # without --out, a URL's contact sheet goes to the current folder
    assert insp.contact_sheet(url, key="val-000000-000002") == Path("val-000000-000002.png")
    with pytest.raises(UserError, match="verify reads a local dataset folder, not a URL"):
        insp.check_dataset(url)
    r = subprocess.run([sys.executable, "-m", "pipeline", "verify", url], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0 and r.stderr.startswith("error: verify reads a local dataset folder")
    assert len(r.stderr.strip().splitlines()) == 1


def test_evaluate_over_http_writes_the_local_metrics(served, tiny_shards, tmp_path):
    from trainer import evaluate
    from trainer.model import ModelConfig, build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ModelConfig(width=4, mults=[1, 2]))
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.cfg)}}, ckpt)
    base, _ = served
    args = ["--checkpoint", str(ckpt), "--split", "val", "--frames", "1,3", "--device", "cpu", "--examples", "0",
            "--quiet"]
    assert evaluate.main([*args, "--data", f"{base}/good", "--out", str(tmp_path / "url")]) == 0
    assert evaluate.main([*args, "--data", str(tiny_shards), "--out", str(tmp_path / "local")]) == 0
    assert (tmp_path / "url" / "metrics.csv").read_text() == (tmp_path / "local" / "metrics.csv").read_text()


# ----------------------------------------------------------------------------- fsspec


@pytest.fixture
def memory_dataset(tiny_shards):
    """The tiny dataset (without kernels.zarr) copied into fsspec's in-memory filesystem."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = "/tiny-url-test"
    for path in sorted(tiny_shards.iterdir()):
        if path.is_file():
            fs.pipe(f"{root}/{path.name}", path.read_bytes())
    for path in sorted((tiny_shards / "stats").iterdir()):
        fs.pipe(f"{root}/stats/{path.name}", path.read_bytes())
    yield f"memory://{root}", fs, root
    fs.rm(root, recursive=True)


def test_fsspec_url_gives_the_local_batches_and_checks_the_checksum(memory_dataset, tiny_shards):
    url, fs, root = memory_dataset
    assert same_batches(list(stream(url).iter_worker(0)), list(stream(tiny_shards).iter_worker(0)))
    assert insp.summary(url) == insp.summary(tiny_shards)
    raw = bytearray(fs.cat(f"{root}/train-000002.tar"))
    raw[5000] ^= 0x01
    fs.pipe(f"{root}/train-000002.tar", bytes(raw))
    with pytest.raises(DataError, match=r"memory://.*train-000002\.tar: sha256 differs from the manifest"):
        list(stream(url, steps=40).iter_worker(0))


def test_fsspec_missing_is_one_line_naming_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec now raises ImportError
    with pytest.raises(UserError, match=r"^install fsspec and s3fs to read s3:// URLs$"):
        read_manifest("s3://bucket/shards/default")
    with pytest.raises(UserError, match=r"^install fsspec and gcsfs to read gs:// URLs$"):
        list(fmt.iter_shard("gs://bucket/shards/default/train-000000.tar"))


def test_fsspec_without_the_filesystem_package_is_one_line():
    fsspec = pytest.importorskip("fsspec")
    try:
        fsspec.get_filesystem_class("s3")
        pytest.skip("s3fs is installed here")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "pipeline", "inspect", "s3://bucket/shards/default"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0 and r.stderr.startswith("error: install s3fs to read s3:// URLs")
    assert len(r.stderr.strip().splitlines()) == 1


def test_url_helpers():
    assert fmt.is_url("http://h/x") and fmt.is_url("s3://b/k") and fmt.is_url("memory://x")
    assert not fmt.is_url("shards/default") and not fmt.is_url(Path("http:/x")) and not fmt.is_url("C:\\data")
    assert fmt.join("https://h/a/", "b.tar") == "https://h/a/b.tar"
    assert fmt.join(Path("shards/x"), "b.tar") == Path("shards/x/b.tar")
    assert fmt.location_name("https://h/a/train-000001.tar?sig=abc") == "train-000001.tar"
    assert data.Shard("http://h/a/train-000001.tar", 4, 10, 4).name == "train-000001.tar"


@pytest.mark.skipif(shutil.which("curl") is None, reason="wids downloads http(s) shards with curl")
def test_wids_reads_the_shard_list_over_http(served, tiny_shards, tmp_path):
    wids = pytest.importorskip("wids")
    base, _ = served
    ds = wids.ShardListDataset(f"{base}/good/val.wids.json", cache_dir=str(tmp_path / "cache"), transformations=[])
    man = read_manifest(tiny_shards)
    assert len(ds) == 8
    for i in (6, 1):
        sample = ds[i]
        assert sample["__key__"] == man.key("val", i)
        assert sample[".burst.npy"].getvalue() == insp_raw(tiny_shards, man.key("val", i))["burst.npy"]


def test_webdataset_brace_notation_over_http_reads_the_local_samples(served, tiny_shards):
    """webdataset's own brace list of shard URLs (the README's recipe with an http base) gives the
    samples of the local folder, byte for byte, in shard order."""
    import webdataset as wds

    base, _ = served
    over_http = list(wds.WebDataset(f"{base}/good/val-{{000000..000001}}.tar", shardshuffle=False))
    local = list(wds.WebDataset(str(tiny_shards / "val-{000000..000001}.tar"), shardshuffle=False))
    assert len(over_http) == len(local) == 8
    for a, b in zip(over_http, local):
        assert a["__key__"] == b["__key__"]
        assert {k: v for k, v in a.items() if not k.startswith("__")} == {k: v for k, v in b.items()
                                                                         if not k.startswith("__")}


def insp_raw(root: Path, key: str) -> dict:
    split, shard, _ = fmt.parse_key(key)
    return next(r for r in fmt.iter_shard(root / fmt.shard_file(split, shard)) if r["__key__"] == key)
