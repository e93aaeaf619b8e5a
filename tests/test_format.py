"""pipeline/format.py: a dataset folder is untrusted input. Each fault is one clear line, no crash,
no big allocation: bad manifests, huge .npy headers, decompression-bomb PNGs, link members,
badly laid out tars, lost or changed kernels.zarr chunks, stray files. Also: the checksums travel
reproducibly; names and keys parse back; the encoders write what the stock readers read (Pillow,
np.load, webdataset) and what the format's own reader gives back."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
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

from common.errors import UserError
from pipeline import format as fmt
from pipeline.format import (MEMBERS, DataError, Manifest, decode_npy, decode_png, decode_sample, encode_npy,
                             encode_png, encode_sample, iter_shard, read_manifest, tree_checksums, validate_manifest)
from pipeline.inspect import check_dataset, read_sample, verify
from pipeline.render import render_sample
from pipeline.run import render_dataset
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

    # the trainer reads through the same iterator: the same line, naming the shard
    with pytest.raises(DataError, match=rf"^shard \S+val-000001\.tar: {name} is {text.split(' (')[0]}"):
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
    for split in json.loads(a)["splits"]:  # the shard lists for wids beside it: the same bytes too
        name = fmt.wids_file(split)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    man = json.loads(a)
    assert man["kernel_files"] == tree_checksums(tmp_path / "a" / "kernels.zarr")
    assert {"train/c/0/0/0/0", "train/c/2/0/0/0", "test/c/1/0/0/0"} <= {e["file"] for e in man["kernel_files"]}
    assert verify(tmp_path / "a") is None


def test_format_module_needs_no_torch():
    code = "import sys, pipeline.format, pipeline.inspect; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    assert fmt.FORMAT == "burst-shards/1"


# ----------------------------------------------------------------------------- member encoders (from test_imaging)


@pytest.mark.parametrize("shape", [(160, 160, 3), (1, 1, 3), (7, 13, 3), (300, 301, 3)])
@pytest.mark.parametrize("level", [0, 1])
def test_png_is_read_back_exactly_by_pillow(shape, level):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(img, level)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(im), img)
    assert encode_png(img.copy(), level) == data


def test_stored_zlib_stream_round_trips_at_block_edges():
    for n in (0, 1, 65535, 65536, 3 * 65535 + 7):
        data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
        assert zlib.decompress(fmt._zlib_stored(memoryview(data))) == data


def test_png_rejects_what_is_not_rgb8():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("arr", [
    np.arange(8 * 5 * 6 * 3, dtype=np.uint8).reshape(8, 5, 6, 3),
    np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::2],  # not contiguous
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.zeros((0, 3), np.int16), np.float64(2.5), np.arange(5, dtype=">i4"),
])
def test_npy_is_what_np_save_writes(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = encode_npy(arr)
    assert data == buf.getvalue()
    np.testing.assert_array_equal(np.load(io.BytesIO(data), allow_pickle=False), arr)


def golden_sample() -> dict:
    """A small sample built without randomness: the same on any machine and numpy version."""
    n = 3 * 9 * 11 * 3
    return {"key": "train-000001-000007",
            "burst": (np.arange(n) * 37 % 256).astype(np.uint8).reshape(3, 9, 11, 3),
            "target": (np.arange(9 * 11 * 3) * 11 % 256).astype(np.uint8).reshape(9, 11, 3),
            "params": {"key": "train-000001-000007", "gamma": 2.2, "shift": [[0.0, 0.0], [0.5, -1.25], [1e-3, 2.0]],
                       "source": {"source": "deadleaves", "crop": [1, 2, 3]}, "mixed": False, "é": "ü"}}


def members_digest(members: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in members:
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()


# What pipeline.shards.sample_members wrote before the encoders moved to pipeline.format (and what
# encode_sample writes now). Regenerate only for a deliberate format change, which changes every
# shard's bytes: python -c "from tests.test_format import *; print(members_digest(encode_sample(golden_sample())))"
GOLDEN_MEMBERS = "fe04d748b2cfaac1e42af4a5c138c41d68728d70e88d7382904b770c67d20e5b"


def test_encode_sample_writes_the_members_in_tar_order_with_pinned_bytes():
    members = encode_sample(golden_sample())
    assert [name for name, _ in members] == [f"train-000001-000007.{m}" for m in MEMBERS]
    assert [name for name, _ in members] == sorted(name for name, _ in members)  # tar order is sorted order
    assert sorted(MEMBERS) == list(MEMBERS) == sorted(fmt.MEMBER_TYPES)
    assert members_digest(members) == GOLDEN_MEMBERS, "the member bytes changed: every shard would differ"
    for bad in ("train-1-7", "train-000001-000007.x", None):
        with pytest.raises(ValueError, match="bad sample key"):
            encode_sample({**golden_sample(), "key": bad})


def write_tar(path: Path, members) -> Path:
    """A tar of (name, bytes) members in the order given (regular files, as tarfile defaults them)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_encoded_samples_come_back_through_iter_shard_and_decode_sample(tmp_path):
    samples = [render_sample(tiny_config(), "val", i) for i in (4, 5)]
    path = write_tar(tmp_path / "val-000001.tar", [m for s in samples for m in encode_sample(s)])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    raws = list(iter_shard(path, sha256=digest, samples=2, first=4))
    assert [r["__key__"] for r in raws] == ["val-000001-000004", "val-000001-000005"]
    for raw, sample in zip(raws, samples):
        out = decode_sample(raw, "w", 4, 48)
        assert out["key"] == sample["key"] and out["params"] == json.loads(json.dumps(sample["params"]))
        np.testing.assert_array_equal(out["burst"], sample["burst"])
        np.testing.assert_array_equal(out["target"], sample["target"])
        assert encode_sample(out) == [(f"{out['key']}.{m}", raw[m]) for m in MEMBERS]  # and back to the same bytes


def test_webdataset_public_api_reads_the_same_samples_as_iter_shard(tiny_shards):
    import webdataset as wds

    man = read_manifest(tiny_shards)
    for entry in man.shards("val") + man.shards("test"):
        url = str(tiny_shards / entry.file)
        ours = list(iter_shard(url, sha256=entry.sha256, samples=entry.samples, first=entry.first))
        theirs = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
        assert [s["__key__"] for s in theirs] == [s["__key__"] for s in ours] and len(ours) == entry.samples
        for a, b in zip(theirs, ours):
            assert {k for k in a if not k.startswith("__")} == set(MEMBERS)
            assert {k: a[k] for k in MEMBERS} == {k: b[k] for k in MEMBERS}


# ----------------------------------------------------------------------------- names, keys, the Manifest


def test_names_and_keys_parse_back():
    assert fmt.sample_key("train", 3, 1234) == "train-000003-001234"
    assert fmt.parse_key("train-000003-001234") == ("train", 3, 1234)
    key = fmt.parse_key("val_2-000000-000007")
    assert (key.split, key.shard, key.index) == ("val_2", 0, 7)
    assert fmt.shard_file("test", 12) == "test-000012.tar" and fmt.parse_shard_file("test-000012.tar") == ("test", 12)
    assert fmt.stats_file("test", 12) == "stats/test-000012.json"
    for bad in ("train-3-1234", "train-000003-001234.json", "Train-000003-001234", "train-000003", "", None):
        with pytest.raises(DataError, match="^bad sample key"):
            fmt.parse_key(bad)
    with pytest.raises(DataError, match="not a shard file name"):
        fmt.parse_shard_file("train-000003.tar.gz")
    for args in (("train", 10 ** 6, 0), ("train", 0, -1), ("Train", 0, 0), ("a-b", 0, 0), ("train", 0, 1.0)):
        with pytest.raises(ValueError):
            fmt.sample_key(*args)
    assert issubclass(DataError, UserError)  # the CLIs print it as one line


def test_read_manifest_gives_a_typed_manifest_that_is_also_the_json(tiny_shards):
    man = read_manifest(tiny_shards)
    raw = json.loads((tiny_shards / "manifest.json").read_text())
    assert isinstance(man, Manifest) and man == raw and man["config"] == raw["config"] and man.get("seed") == 7
    assert man.path == tiny_shards / "manifest.json" and man.folder == tiny_shards
    assert (man.name, man.seed, man.frames, man.size, man.kernel_size) == ("tiny", 7, 4, 48, 15)
    assert man.kernels == "kernels.zarr"
    assert man.config_hash == raw["config_hash"] and man.code_version == raw["code_version"]
    assert list(man.splits) == list(raw["splits"]) and man.kernel_files == tuple(raw["kernel_files"])
    train = man.split("train")
    assert (train.samples, train.samples_per_shard, train.source, train.skipped) == (16, 4, "deadleaves", {})
    assert [s.file for s in man.shards("train")] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [(s.split, s.shard, s.first, s.samples) for s in man.shards("val")] == [("val", 0, 0, 4), ("val", 1, 4, 4)]
    listed = raw["splits"]["test"]["shards"][1]
    assert (man.shards("test")[1].bytes, man.shards("test")[1].sha256) == (listed["bytes"], listed["sha256"])
    assert man.key("train", 13) == "train-000003-000013" and train.shard_of(13) is man.shards("train")[3]
    with pytest.raises(DataError, match=rf"^{re.escape(str(tiny_shards))}: no split 'nope' \(has: test, train, val\)$"):
        man.split("nope")
    for index in (16, -1):
        with pytest.raises(DataError, match=rf"^index {index} out of range for split 'train' \(16 samples\)$"):
            man.key("train", index)
    with pytest.raises(dataclasses.FrozenInstanceError):
        man.frames = 3
    with pytest.raises(TypeError):  # a read-only Mapping
        man["frames"] = 3


# ----------------------------------------------------------------------------- shard layout


def layout(*names: str) -> list[tuple[str, bytes]]:
    return [(name, b"x" * 10) for name in names]


K0, K1 = "val-000000-000000", "val-000000-000001"
BAD_LAYOUTS = {
    "apart": (layout(f"{K0}.burst.npy", f"{K0}.json", f"{K1}.burst.npy", f"{K0}.target.png"),
              f"{K0}.target.png is apart from the other members of sample {K0}"),
    "twice": (layout(f"{K0}.burst.npy", f"{K0}.burst.npy"), f"{K0}.burst.npy appears twice"),
    "another shard's key": (layout("val-000001-000004.json"),
                            "val-000001-000004.json is not a member of this shard (keys val-000000-NNNNNN)"),
    "no key": (layout("README"), "README is not a member of this shard (keys val-000000-NNNNNN)"),
    "unknown member": (layout(f"{K0}.burst.npy", f"{K0}.depth.npy"),
                       f"{K0}.depth.npy is not a sample member (burst.npy, json, target.png)"),
    "index outside": (layout("val-000000-000009.json"),
                      "val-000000-000009.json: index outside this shard's samples 0..1"),
    "fewer samples": (layout(f"{K0}.burst.npy", f"{K0}.json", f"{K0}.target.png"),
                      "holds 1 samples, the manifest lists 2 (corrupt tar)"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_badly_laid_out_shard_is_one_line_naming_the_member(tmp_path, case):
    members, message = BAD_LAYOUTS[case]
    path = write_tar(tmp_path / "val-000000.tar", members)
    with pytest.raises(DataError) as e:
        list(iter_shard(path, label="val-000000.tar", samples=2, first=0))
    assert str(e.value) == f"val-000000.tar: {message}"


def test_shard_reader_checks_the_checksum_first_and_reads_only_shard_files(tmp_path):
    path = write_tar(tmp_path / "val-000000.tar", layout(f"{K0}.burst.npy", f"{K0}.json", f"{K0}.target.png"))
    assert len(list(iter_shard(path))) == 1 and len(list(iter_shard(path, samples=1, first=0))) == 1
    raws = iter_shard(path, sha256="0" * 64)  # nothing is read before the first next()
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: sha256 differs from the manifest$"):
        next(raws)
    with pytest.raises(DataError, match=r"^x: not a shard file name \(<split>-NNNNNN\.tar\)$"):
        next(iter_shard(tmp_path / "x.tar", label="x"))
    with pytest.raises(DataError, match=r"^s: unreadable \(FileNotFoundError: "):
        next(iter_shard(tmp_path / "val-000009.tar", label="s"))
    (tmp_path / "val-000001.tar").write_bytes(b"not a tar " * 100)
    with pytest.raises(DataError, match=r"^s: unreadable tar after 0 samples \(ReadError: "):
        next(iter_shard(tmp_path / "val-000001.tar", label="s"))


def test_sample_decoder_wants_exactly_the_members():
    good = dict(encode_sample(golden_sample()))
    raw = {"__key__": "train-000001-000007", **{name.split(".", 1)[1]: data for name, data in good.items()}}
    assert decode_sample(raw, "w", 3, None)["params"] == golden_sample()["params"]
    with pytest.raises(DataError, match=r"^w: sample train-000001-000007: missing member\(s\) json, target.png$"):
        decode_sample({k: v for k, v in raw.items() if k in ("__key__", "burst.npy")}, "w")
    with pytest.raises(DataError, match=r"^w: sample train-000001-000007: unexpected member\(s\) depth.npy$"):
        decode_sample({**raw, "depth.npy": b""}, "w")
    with pytest.raises(DataError, match=r"^w: sample train-000001-000007: target.png declares 9x9 px, "
                                        r"the manifest says 11x9$"):
        decode_sample({**raw, "target.png": encode_png(np.zeros((9, 9, 3), np.uint8))}, "w")


def test_unknown_member_through_verify_the_trainer_and_read_sample(ds):
    name = "val-000001-000006.target.png"

    def rename(info, b):
        if info.name == name:
            info.name = "val-000001-000006.depth.png"
        return info, b

    rewrite_shard(ds, "val-000001.tar", rename)
    line = "val-000001-000006.depth.png is not a sample member (burst.npy, json, target.png)"
    assert verify(ds) == f"val-000001.tar: {line}"
    from trainer import data

    with pytest.raises(DataError, match=rf"^shard \S+val-000001\.tar: {re.escape(line)}$"):
        list(data.iter_samples(ds, "val"))
    assert read_sample(ds, "val-000001-000005")["key"] == "val-000001-000005"  # read up to it: not reached
    with pytest.raises(DataError, match=re.escape(line)):
        read_sample(ds, "val-000001-000007")


def test_inspect_refuses_a_bad_key_split_or_index_in_one_line(ds):
    with pytest.raises(DataError, match=r"^sample val-000001-000099 is not in val-000001\.tar$"):
        read_sample(ds, "val-000001-000099")
    with pytest.raises(DataError, match="^bad sample key 'val-1-2'"):
        read_sample(ds, "val-1-2")
    with pytest.raises(FileNotFoundError, match=r"val-000007\.tar: no such shard"):
        read_sample(ds, "val-000007-000030")
    for args, text in ((("--key", "val-000001-000099"), "sample val-000001-000099 is not in val-000001.tar"),
                       (("--split", "nope", "--index", "0"), f"{ds}: no split 'nope'")):
        r = run("pipeline", "inspect", str(ds), *args, "--out", str(ds / "sheet.png"))
        assert r.returncode == 2 and one_error_line(r).startswith(f"error: {text}"), r.stderr
