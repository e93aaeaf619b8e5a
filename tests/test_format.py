"""pipeline/format.py: a dataset folder is untrusted input. Each fault is one clear line, no crash,
no big allocation: bad manifests, huge .npy headers, decompression-bomb PNGs, link members,
lost or changed kernels.zarr chunks, stray files. Also: the checksums travel reproducibly."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import format as fmt
from pipeline.format import DataError, decode_npy, decode_png, tree_checksums, validate_manifest
from pipeline.inspect import check_dataset, read_manifest, read_sample, verify
from pipeline.run import render_dataset
from pipeline.shards import encode_npy, encode_png
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("splits.train.samples=6", "splits.train.samples_per_shard=2", "splits.val.samples=2",
         "splits.val.samples_per_shard=2", "splits.test.samples=3", "splits.test.samples_per_shard=2")
HUGE = (4, 100_000, 200_000, 3)  # 240 GB of uint8, as a header may declare it
MB = 1 << 20


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The CLI's stderr, asserted to be exactly one `error:` line."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture
def ds(tiny_shards, tmp_path) -> Path:
    """A writable copy of the tiny dataset (kernels.zarr included)."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "ds"))


def edit_manifest(root: Path, change) -> dict:
    man = json.loads((root / "manifest.json").read_text())
    change(man)
    (root / "manifest.json").write_text(json.dumps(man))
    return man


def rewrite_shard(root: Path, file: str, change) -> None:
    """Rewrite one tar, passing each member's (TarInfo, bytes) through ``change`` (returns the
    pair to write), then relist the shard's size and sha256 in the manifest: the dataset is
    consistent, only a member is hostile."""
    path = root / file
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            info, payload = change(info, payload)
            if info.isreg():
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    data = path.read_bytes()

    def relist(man):
        for s in man["splits"].values():
            for e in s["shards"]:
                if e["file"] == file:
                    e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    edit_manifest(root, relist)


def replace_member(name: str, payload: bytes):
    return lambda info, b: (info, payload) if info.name == name else (info, b)


def npy_header(shape, dtype="|u1") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG (a few dozen bytes) whose IHDR declares width x height 8-bit RGB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def peak_mb(call) -> tuple[float, BaseException | None]:
    """(peak MB traced while running ``call``, the exception it raised). numpy reports its array
    allocations to tracemalloc, so an attempt to allocate a declared 240 GB would show."""
    tracemalloc.start()
    err = None
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - returned for the caller to check
        err = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / MB, err


# ----------------------------------------------------------------------------- manifest


def test_rendered_manifest_is_valid_and_records_every_kernels_file(tiny_shards):
    man = json.loads((tiny_shards / "manifest.json").read_text())
    assert validate_manifest(man, "m.json") is man
    files = [e["file"] for e in man["kernel_files"]]
    assert "train/c/3/0/0/0" in files and "zarr.json" in files and "val_trajectories/c/1/0/0/0" in files
    assert man["kernel_files"] == tree_checksums(tiny_shards / "kernels.zarr")


BAD_MANIFESTS = {
    "not an object": (lambda m: [m], "not a dataset manifest"),
    "frames missing": (lambda m: m.pop("frames"), "frames is missing"),
    "frames a string": (lambda m: m.update(frames="4"), 'frames must be a positive integer, got "4"'),
    "size a bool": (lambda m: m.update(size=True), "size must be a positive integer, got true"),
    "format from the future": (lambda m: m.update(format="burst-shards/9"), 'format must be "burst-shards/1"'),
    "splits a list": (lambda m: m.update(splits=[]), "splits must be a JSON object, got list"),
    "shard not an object": (lambda m: m["splits"]["val"]["shards"].__setitem__(1, "val-000001.tar"),
                            "splits.val.shards[1] must be a JSON object"),
    "short sha256": (lambda m: m["splits"]["train"]["shards"][3].update(sha256="ab12"),
                     'splits.train.shards[3].sha256 must be a 64-digit hex string, got "ab12"'),
    "path in a file name": (lambda m: m["splits"]["train"]["shards"][0].update(file="../../etc/x.tar"),
                            "splits.train.shards[0].file must be a plain file name"),
    "bytes missing": (lambda m: m["splits"]["test"]["shards"][0].pop("bytes"),
                      "splits.test.shards[0].bytes is missing"),
    "samples disagree": (lambda m: m["splits"]["train"]["shards"][2].update(samples=3),
                         "splits.train.shards[2].samples must be 4"),
    "absolute kernel file": (lambda m: m["kernel_files"][0].update(file="/etc/passwd"),
                             "kernel_files[0].file must be a relative path inside kernels.zarr"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_wrong_structure_manifest_is_one_line_naming_the_field(tiny_shards, tmp_path, case):
    change, message = BAD_MANIFESTS[case]
    root = tmp_path / "ds"
    root.mkdir()
    man = json.loads((tiny_shards / "manifest.json").read_text())
    out = change(man)
    (root / "manifest.json").write_text(json.dumps(out if out is not None and case == "not an object" else man))
    path = root / "manifest.json"
    from trainer.data import read_manifest as trainer_read_manifest

    for reader in (read_manifest, trainer_read_manifest):
        with pytest.raises(DataError) as e:
            reader(root)
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_wrong_structure_manifest_through_every_cli(ds):
    edit_manifest(ds, lambda m: m["splits"]["train"]["shards"][3].update(sha256="ab12"))
    want = f"error: {ds / 'manifest.json'}: splits.train.shards[3].sha256 must be a 64-digit hex string"
    for module, args in (("pipeline", ("verify", str(ds))), ("pipeline", ("inspect", str(ds))),
                         ("trainer", ("evaluate", "--checkpoint", str(ds / "none.pt"), "--data", str(ds)))):
        r = run(module, *args)
        assert r.returncode == 2 and one_error_line(r).startswith(want), (module, args, r.stderr)


# ----------------------------------------------------------------------------- burst.npy


def test_huge_npy_header_is_refused_before_allocating(ds):
    key = "train-000001-000005"
    rewrite_shard(ds, "train-000001.tar", replace_member(f"{key}.burst.npy", npy_header(HUGE) + b"\0" * 64))
    line = (f"train-000001.tar: sample {key}: burst.npy declares shape (4, 100000, 200000, 3), "
            "the manifest says (4, 48, 48, 3)")
    peak, err = peak_mb(lambda: verify(ds))
    assert err is None and peak < 64
    assert verify(ds) == line
    peak, err = peak_mb(lambda: read_sample(ds, key))
    assert isinstance(err, DataError) and str(err) == f"{ds / 'train-000001.tar'}: sample {line.split('sample ', 1)[1]}"
    assert peak < 64

    from trainer import data

    peak, err = peak_mb(lambda: list(data.iter_samples(ds, "train")))
    assert isinstance(err, DataError) and peak < 64
    assert str(err) == f"shard {ds / 'train-000001.tar'}: sample {line.split('sample ', 1)[1]}"

    r = run("pipeline", "verify", str(ds))
    assert r.returncode == 1 and one_error_line(r) == f"error: {line}"
    r = run("pipeline", "inspect", str(ds), "--key", key, "--out", str(ds / "sheet.png"))
    assert r.returncode == 2 and "burst.npy declares shape (4, 100000, 200000, 3)" in one_error_line(r)


def test_npy_decoder_refuses_what_the_header_does_not_back():
    ok = encode_npy(np.zeros((2, 8, 8, 3), np.uint8))
    assert decode_npy(ok, "b", (2, 8, 8, 3), np.uint8).shape == (2, 8, 8, 3)
    assert decode_npy(ok, "b", (None, 8, 8, 3), np.uint8).flags.writeable
    # no expectation (nothing known): the declared byte count must still be the bytes present
    peak, err = peak_mb(lambda: decode_npy(npy_header(HUGE) + b"\0" * 64, "x.tar: s: burst.npy"))
    assert peak < 16 and str(err) == ("x.tar: s: burst.npy declares uint8 (4, 100000, 200000, 3) = "
                                      "240000000000 bytes of data, the member holds 64")
    with pytest.raises(DataError, match=r"^b declares uint8 \(2, 8, 8, 3\) = 384 bytes of data, the member holds 383$"):
        decode_npy(ok[:-1], "b", (2, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match="^b holds Python objects"):
        decode_npy(npy_header((1,), "|O") + b"\0" * 8, "b")
    with pytest.raises(DataError, match=r"^b is float32 \(2, 8, 8, 3\), the manifest says uint8 \(2, 8, 8, 3\)$"):
        decode_npy(encode_npy(np.zeros((2, 8, 8, 3), np.float32)), "b", (2, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match=r"^b is not a readable \.npy array"):
        decode_npy(b"\x93NUMPY\x01\x00{{{{", "b")
    with pytest.raises(DataError, match=r"^b is not a readable \.npy array"):
        decode_npy(b"PK\x03\x04 a zip", "b")


# ----------------------------------------------------------------------------- target.png


def test_decompression_bomb_png_is_one_line(ds):
    key = "val-000000-000001"
    rewrite_shard(ds, "val-000000.tar", replace_member(f"{key}.target.png", png_declaring(50_000, 50_000)))
    line = f"val-000000.tar: sample {key}: target.png declares 50000x50000 px, the manifest says 48x48"
    peak, err = peak_mb(lambda: verify(ds))
    assert err is None and peak < 64 and verify(ds) == line
    with pytest.raises(DataError, match=f"sample {key}: target.png declares 50000x50000 px"):
        read_sample(ds, key)
    from trainer import data

    with pytest.raises(DataError, match=rf"^shard \S+val-000000\.tar: sample {key}: target.png declares 50000x50000"):
        list(data.iter_samples(ds, "val"))
    r = run("pipeline", "verify", str(ds))
    assert r.returncode == 1 and one_error_line(r) == f"error: {line}"
    r = run("pipeline", "inspect", str(ds), "--key", key, "--out", str(ds / "sheet.png"))
    assert r.returncode == 2 and "target.png declares 50000x50000 px" in one_error_line(r)


def test_png_decoder_keeps_the_bomb_limit_and_checks_size_before_decoding(monkeypatch):
    assert Image.MAX_IMAGE_PIXELS  # never disabled
    with pytest.raises(DataError, match=r"^t declares 50000x50000 px, over Pillow's decompression-bomb limit"):
        decode_png(png_declaring(50_000, 50_000), "t")  # no manifest size to compare: Pillow's limit holds
    real = encode_png(np.full((64, 64, 3), 7, np.uint8))  # a real PNG, larger than the manifest says
    with pytest.raises(DataError, match=r"^t declares 64x64 px, the manifest says 48x48$"):
        decode_png(real, "t", (48, 48))
    assert decode_png(real, "t", (64, 64)).shape == (64, 64, 3)
    grey = io.BytesIO()
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(grey, "PNG")
    with pytest.raises(DataError, match="^t is a PNG of bit depth 8, colour type 0"):
        decode_png(grey.getvalue(), "t", (48, 48))
    with pytest.raises(DataError, match=r"^t is not a readable PNG"):
        decode_png(real[:60], "t", (64, 64))  # header fine, pixels cut off
    with pytest.raises(DataError, match=r"^t is not a readable PNG"):
        decode_png(b"GIF89a not a png", "t")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64² = 4096: in Pillow's warning band
    with pytest.raises(DataError, match=r"^t declares 64x64 px, over Pillow's decompression-bomb limit \(3000 px\)$"):
        decode_png(real, "t", (64, 64))
    monkeypatch.setattr(fmt, "png_header", lambda raw: None)  # Pillow's own check, its warning an error
    with pytest.raises(DataError, match=r"^t is over Pillow's decompression-bomb limit \(DecompressionBombWarning"):
        decode_png(real, "t", (64, 64))


# ----------------------------------------------------------------------------- link members


@pytest.mark.parametrize("kind, text", [(tarfile.SYMTYPE, "a symbolic link (to '/etc/passwd')"),
                                        (tarfile.LNKTYPE, "a hard link (to 'val-000001-000005.target.png')"),
                                        (tarfile.CHRTYPE, "a character device")])
def test_link_or_device_member_is_refused(ds, kind, text):
    name = "val-000001-000004.target.png"

    def to_link(info, b):
        if info.name != name:
            return info, b
        link = tarfile.TarInfo(name)
        link.type = kind
        link.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "val-000001-000005.target.png"
        return link, b""

    rewrite_shard(ds, "val-000001.tar", to_link)
    assert verify(ds) == f"val-000001.tar: {name} is {text}, not a regular file"
    with pytest.raises(DataError, match=rf"val-000001\.tar: {name} is {text.split(' (')[0]}"):
        read_sample(ds, "val-000001-000004")
    from trainer import data

    # webdataset's tar iterator drops non-regular members: the trainer sees the member missing
    with pytest.raises(DataError, match=r"sample val-000001-000004: missing member\(s\) target.png"):
        list(data.iter_samples(ds, "val"))


# ----------------------------------------------------------------------------- kernels.zarr


def test_deleted_zarr_chunk_is_named(ds):
    (ds / "kernels.zarr" / "train" / "c" / "1" / "0" / "0" / "0").unlink()
    line = "kernels.zarr/train/c/1/0/0/0: missing (a lost zarr chunk reads back as zeros)"
    assert verify(ds) == line
    r = run("pipeline", "verify", str(ds))
    assert r.returncode == 1 and one_error_line(r) == f"error: {line}"


def test_changed_or_extra_zarr_chunk_is_named(ds):
    chunk = ds / "kernels.zarr" / "val" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    shutil.copy(chunk, chunk.with_name("9"))
    report = check_dataset(ds)
    assert report.errors == ["kernels.zarr/val/c/0/0/0/0: sha256 differs from the manifest",
                             "kernels.zarr/val/c/0/0/0/9: not in the manifest"]
    chunk.write_bytes(bytes(data[:-3]))
    assert verify(ds) == f"kernels.zarr/val/c/0/0/0/0: {len(data) - 3} bytes, the manifest says {len(data)}"


def test_old_manifest_without_kernel_checksums_says_kernels_are_not_checked(ds):
    edit_manifest(ds, lambda m: m.pop("kernel_files"))
    (ds / "kernels.zarr" / "train" / "c" / "1" / "0" / "0" / "0").unlink()  # not seen, and said so
    report = check_dataset(ds)
    assert report.errors == [] and not report.kernels_checked
    assert len(report.warnings) == 1 and report.warnings[0].startswith("kernels.zarr: not checked")
    r = run("pipeline", "verify", str(ds))
    assert r.returncode == 0 and "every shard matches the manifest" in r.stdout
    assert r.stderr.strip().startswith("warning: kernels.zarr: not checked") and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- stray files


def test_stray_files_are_reported_one_line_each(ds):
    r = run("pipeline", "verify", str(ds))
    assert r.returncode == 0 and r.stderr == "" and "every shard and every kernels.zarr file matches" in r.stdout
    (ds / ".train-000003.tar.tmp-1234").write_bytes(b"half a shard")
    (ds / "stats" / ".val-000000.json.tmp-99").write_bytes(b"{")
    (ds / "kernels.zarr" / "train" / "c" / "0" / "0" / "0" / f"0.{'ab' * 16}.partial").write_bytes(b"x")
    (ds / "train-000004.tar").write_bytes(b"")  # an unknown tar
    (ds / ".render.lock").write_text("1234")  # the render lock: never reported
    (ds / "notes.txt").write_text("mine")
    (ds / ".plan.json").write_text("{}")  # a render started here and has not finished
    report = check_dataset(ds)
    assert report.errors == [
        ".plan.json: a render of this folder has not finished (run it again)",
        ".train-000003.tar.tmp-1234: a temporary file of an unfinished write (a finished dataset holds none)",
        "train-000004.tar: a tar the manifest does not list",
        f"kernels.zarr/train/c/0/0/0/0.{'ab' * 16}.partial: a temporary file of an unfinished write "
        "(a finished dataset holds none)",
        "stats/.val-000000.json.tmp-99: a temporary file of an unfinished write (a finished dataset holds none)"]
    assert report.warnings == ["notes.txt: not part of the dataset (the manifest does not list it)"]
    r = run("pipeline", "verify", str(ds))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines == [f"error: {e}" for e in report.errors] + [f"warning: {w}" for w in report.warnings]
    for p in (".plan.json", ".train-000003.tar.tmp-1234", "stats/.val-000000.json.tmp-99", "train-000004.tar",
              f"kernels.zarr/train/c/0/0/0/0.{'ab' * 16}.partial"):
        (ds / p).unlink()
    assert verify(ds) is None  # the notes file alone is a warning: exit 0


# ----------------------------------------------------------------------------- reproducibility


def test_same_config_gives_byte_identical_manifest_with_checksums(tmp_path):
    cfg = tiny_config(*SMALL)
    for name, workers in (("a", 1), ("b", 2)):
        render_dataset(cfg, tmp_path / name, workers=workers, engine="local", progress=False)
    a, b = (tmp_path / "a" / "manifest.json").read_bytes(), (tmp_path / "b" / "manifest.json").read_bytes()
    assert a == b
    man = json.loads(a)
    assert man["kernel_files"] == tree_checksums(tmp_path / "a" / "kernels.zarr")
    assert {"train/c/0/0/0/0", "train/c/2/0/0/0", "test/c/1/0/0/0"} <= {e["file"] for e in man["kernel_files"]}
    assert verify(tmp_path / "a") is None


def test_format_module_needs_no_torch():
    code = "import sys, pipeline.format, pipeline.inspect; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    assert fmt.FORMAT == "burst-shards/1"
