"""The on-disk format of a dataset folder: its names, and the checks every reader goes through.

    shards/<name>/manifest.json          validate_manifest: structure, types, plain file names
                  <split>-NNNNNN.tar     members <key>.burst.npy / .json / .target.png, regular files
                                         (check_member), decoded by decode_npy / decode_png /
                                         decode_json, which refuse before allocating
                  kernels.zarr/          every file's size and sha256 in the manifest (tree_checksums)
                  stats/<split>-NNNNNN.json

The readers (``pipeline.inspect`` summary / contact sheet / verify, ``trainer.data`` and through
it training and evaluation) treat a dataset folder as untrusted input: a member whose header
declares a shape, a byte count or a pixel count other than the manifest implies is refused with
one line naming the shard and member, before any array is allocated, and nothing is unpickled.
Problems are raised as ``DataError`` (a ValueError: the CLIs print it as one ``error:`` line).

No torch here: the pipeline imports this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import one_line

FORMAT = "burst-shards/1"
MANIFEST = "manifest.json"
KERNELS = "kernels.zarr"
STATS_DIR = "stats"
MEMBERS = ("burst.npy", "json", "target.png")  # the suffixes of one sample's members, sorted
KEY = re.compile(r"(?P<split>[a-z0-9_]+)-(?P<shard>\d{6})-(?P<index>\d{6})")
SPLIT = re.compile(r"[a-z0-9_]+")
SHA256 = re.compile(r"[0-9a-f]{64}")
PLAN = ".plan.json"  # written when a render starts, deleted when it finishes (pipeline.run)
LOCK = ".render.lock"  # the render lock of a dataset folder; never part of the dataset
TEMPORARY = re.compile(r"\..+\.tmp(-\d+)?")  # ".<name>.tmp-<pid>": an atomic write that did not finish
ZARR_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")  # a chunk zarr's LocalStore had not renamed yet


class DataError(ValueError):
    """A problem with the dataset on disk; the message is one line naming the file (shard, member)."""


def shard_file(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def is_temporary(name: str) -> bool:
    """A file name of an unfinished write (ours or zarr's): never part of a finished dataset."""
    return bool(TEMPORARY.fullmatch(name) or ZARR_PARTIAL.fullmatch(name))


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message``: what a decoder's error says it met."""
    text = one_line(e)
    return text if text == type(e).__name__ else f"{type(e).__name__}: {text}"


# ----------------------------------------------------------------------------- manifest


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """Checks of one manifest, each failing with ``<path>: <field> <what it must be>, got <value>``."""

    def __init__(self, path):
        self.path = path

    def fail(self, field: str, must: str, value=None, got: bool = True):
        raise DataError(f"{self.path}: {field} {must}" + (f", got {_show(value)}" if got else ""))

    def get(self, obj: dict, key: str, field: str):
        if key not in obj:
            self.fail(field, "is missing", got=False)
        return obj[key]

    def integer(self, obj: dict, key: str, field: str, low: int = 0):
        value = self.get(obj, key, field)
        if type(value) is not int or value < low:  # bool is an int subclass: refused too
            self.fail(field, "must be a positive integer" if low == 1 else
                      "must be a non-negative integer" if low == 0 else f"must be an integer >= {low}", value)
        return value

    def string(self, obj: dict, key: str, field: str, pattern: re.Pattern | None = None, must: str = ""):
        value = self.get(obj, key, field)
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(field, must or "must be a non-empty string", value)
        return value

    def object(self, obj: dict, key: str, field: str) -> dict:
        value = self.get(obj, key, field)
        if not isinstance(value, dict):
            self.fail(field, "must be a JSON object", value)
        return value

    def array(self, obj: dict, key: str, field: str) -> list:
        value = self.get(obj, key, field)
        if not isinstance(value, list):
            self.fail(field, "must be a list", value)
        return value

    def entry(self, value, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, "must be a JSON object", value)
        return value

    def checksum(self, obj: dict, field: str) -> None:
        self.integer(obj, "bytes", f"{field}.bytes")
        self.string(obj, "sha256", f"{field}.sha256", SHA256, "must be a 64-digit hex string")


def is_plain_name(name: str) -> bool:
    """A file name without a folder: no separators, not '.', '..' or empty, no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def is_relative_path(path: str) -> bool:
    """A POSIX path inside a folder: plain names joined by '/', nothing absolute, no '..'."""
    return bool(path) and all(is_plain_name(part) for part in path.split("/"))


def validate_manifest(obj, path) -> dict:
    """Check a parsed ``manifest.json`` (``path`` names it in messages) and return it unchanged.

    Checks the structure the readers rely on: ``format`` is FORMAT; ``name``, ``config_hash``,
    ``code_version`` strings; ``seed`` an int; ``frames``, ``size``, ``kernel_size`` positive ints;
    ``kernels`` a plain folder name; ``members`` the three members; ``config`` an object whose
    ``splits.<split>.samples_per_shard`` is a positive int; ``splits`` a non-empty object of
    split -> {samples, source, source_files, skipped, shards}, each shard {file, samples, bytes,
    sha256}, listed in order as ``<split>-NNNNNN.tar`` with the sample counts the config implies;
    optional ``kernel_files``, a list of {file (relative path), bytes, sha256}.

    Raises DataError: one line naming the file and the first bad field, e.g.
    ``shards/x/manifest.json: splits.train.shards[3].sha256 must be a 64-digit hex string, got "ab"``.
    """
    f = _Fields(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a dataset manifest (a JSON {type(obj).__name__}, not an object)")
    if "format" not in obj and "splits" not in obj:
        raise DataError(f"{path}: not a dataset manifest (no 'format' and no 'splits')")
    fmt = f.get(obj, "format", "format")
    if fmt != FORMAT:
        f.fail("format", f"must be {json.dumps(FORMAT)} (the format this code reads)", fmt)
    for key in ("name", "config_hash", "code_version"):
        f.string(obj, key, key)
    f.integer(obj, "seed", "seed")
    for key in ("frames", "size", "kernel_size"):
        f.integer(obj, key, key, low=1)
    f.string(obj, "kernels", "kernels", must="must be a plain folder name")
    if not is_plain_name(obj["kernels"]):
        f.fail("kernels", "must be a plain folder name", obj["kernels"])
    members = f.object(obj, "members", "members")
    if sorted(members) != sorted(MEMBERS):
        f.fail("members", f"must name exactly {', '.join(MEMBERS)}", sorted(members), got=False)
    config = f.object(obj, "config", "config")
    config_splits = f.object(config, "splits", "config.splits")
    splits = f.object(obj, "splits", "splits")
    if not splits:
        f.fail("splits", "must hold at least one split", got=False)
    for split, s in splits.items():
        where = f"splits.{split}"
        if not SPLIT.fullmatch(split):
            f.fail(where, "is not a split name (lowercase letters, digits, '_')", got=False)
        s = f.entry(s, where)
        samples = f.integer(s, "samples", f"{where}.samples", low=1)
        f.string(s, "source", f"{where}.source")
        f.integer(s, "source_files", f"{where}.source_files")
        for reason, skip in f.object(s, "skipped", f"{where}.skipped").items():
            skip = f.entry(skip, f"{where}.skipped.{reason}")
            f.integer(skip, "count", f"{where}.skipped.{reason}.count")
            inputs = f.array(skip, "inputs", f"{where}.skipped.{reason}.inputs")
            if not all(isinstance(i, str) for i in inputs):
                f.fail(f"{where}.skipped.{reason}.inputs", "must be a list of strings", got=False)
        per_shard = f.integer(f.entry(f.get(config_splits, split, f"config.splits.{split}"), f"config.splits.{split}"),
                          "samples_per_shard", f"config.splits.{split}.samples_per_shard", low=1)
        shards = f.array(s, "shards", f"{where}.shards")
        expected = math.ceil(samples / per_shard)
        if len(shards) != expected:
            f.fail(f"{where}.shards", f"must list {expected} shards ({samples} samples, {per_shard} per shard)",
                   f"{len(shards)} shards", got=False)
        for i, entry in enumerate(shards):
            at = f"{where}.shards[{i}]"
            entry = f.entry(entry, at)
            file = f.string(entry, "file", f"{at}.file")
            if not is_plain_name(file):
                f.fail(f"{at}.file", "must be a plain file name (no folders, no '..')", file)
            if file != shard_file(split, i):
                f.fail(f"{at}.file", f"must be {json.dumps(shard_file(split, i))} (shards are listed in order)", file)
            n = f.integer(entry, "samples", f"{at}.samples", low=1)
            if n != min(per_shard, samples - i * per_shard):
                f.fail(f"{at}.samples", f"must be {min(per_shard, samples - i * per_shard)} "
                       f"({samples} samples, {per_shard} per shard)", n)
            f.checksum(entry, at)
    if "kernel_files" in obj:
        seen = set()
        for i, entry in enumerate(f.array(obj, "kernel_files", "kernel_files")):
            at = f"kernel_files[{i}]"
            entry = f.entry(entry, at)
            file = f.string(entry, "file", f"{at}.file")
            if not is_relative_path(file):
                f.fail(f"{at}.file", f"must be a relative path inside {obj['kernels']} (no '..')", file)
            if file in seen:
                f.fail(f"{at}.file", "is listed twice", file)
            seen.add(file)
            f.checksum(entry, at)
    return obj


def read_manifest_file(path: str | Path) -> dict:
    """Parse and validate one manifest file; DataError (one line) if it is not a valid manifest."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return validate_manifest(obj, path)


# ----------------------------------------------------------------------------- tar members


_KINDS = ((tarfile.TarInfo.issym, "a symbolic link"), (tarfile.TarInfo.islnk, "a hard link"),
          (tarfile.TarInfo.ischr, "a character device"), (tarfile.TarInfo.isblk, "a block device"),
          (tarfile.TarInfo.isdir, "a directory"), (tarfile.TarInfo.isfifo, "a FIFO"))


def check_member(info: tarfile.TarInfo, shard: str) -> None:
    """Refuse a tar member that is not a regular file (links would make tarfile read another
    member or a path outside the archive). DataError: ``<shard>: <member> is a symbolic link ...``."""
    if info.isreg():
        return
    kind = next((text for test, text in _KINDS if test(info)), f"a member of tar type {info.type!r}")
    target = f" (to {info.linkname!r})" if info.issym() or info.islnk() else ""
    raise DataError(f"{shard}: {info.name} is {kind}{target}, not a regular file")


# ----------------------------------------------------------------------------- member decoders


def _shape_text(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def decode_npy(raw: bytes, where: str, expect_shape: tuple | None = None, expect_dtype=None) -> np.ndarray:
    """Decode a .npy member (format 1.0 or 2.0) after checking its header; never unpickles.

    ``expect_shape`` (None entries match any length) and ``expect_dtype`` come from the manifest
    (a burst is uint8 (frames, size, size, 3)). The header is parsed first; a dtype or shape other
    than expected, an object dtype, or a declared data size other than the bytes that follow the
    header is refused before anything is allocated. Returns a writable array (C or Fortran order
    as stored). DataError messages start with ``where`` (the shard and member).
    """
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]} is not one the writer uses")
    except Exception as e:  # noqa: BLE001 - any header parse failure of untrusted bytes is one line
        raise DataError(f"{where} is not a readable .npy array ({_one_line(e)})") from None
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (dtype {dtype}): refused, shards never hold pickles")
    if expect_dtype is not None and dtype != np.dtype(expect_dtype):
        raise DataError(f"{where} is {dtype} {_shape_text(shape)}, the manifest says "
                        f"{np.dtype(expect_dtype)} {_shape_text(expect_shape or shape)}")
    if expect_shape is not None and (len(shape) != len(expect_shape)
                                     or any(e is not None and d != e for d, e in zip(shape, expect_shape))):
        raise DataError(f"{where} declares shape {_shape_text(shape)}, the manifest says {_shape_text(expect_shape)}")
    if any(d < 0 for d in shape) or dtype.itemsize == 0:
        raise DataError(f"{where} declares {dtype} {_shape_text(shape)}: a negative length or an empty dtype")
    count = math.prod(shape)
    declared, held = count * dtype.itemsize, len(raw) - f.tell()
    if declared != held:
        raise DataError(f"{where} declares {dtype} {_shape_text(shape)} = {declared} bytes of data, "
                        f"the member holds {held}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C").copy(order="A")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(raw: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None if ``raw`` does not
    start with a PNG signature and an IHDR chunk (Pillow then decides what it is)."""
    if len(raw) < 29 or raw[:8] != _PNG_SIGNATURE or raw[12:16] != b"IHDR":
        return None
    w, h, depth, colour = struct.unpack(">IIBB", raw[16:26])
    return w, h, depth, colour


def decode_png(raw: bytes, where: str, expect_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an 8-bit RGB PNG member -> uint8 (H, W, 3).

    ``expect_size`` (width, height) comes from the manifest. The declared size is checked against
    it, and against Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, kept as it is),
    before any pixel is decoded; a DecompressionBombError or -Warning, a mode other than RGB or any
    decode error becomes one DataError line starting with ``where`` (the shard and member).
    """
    header = png_header(raw)
    if header is not None:
        w, h, depth, colour = header
        if expect_size is not None and (w, h) != tuple(expect_size):
            raise DataError(f"{where} declares {w}x{h} px, the manifest says {expect_size[0]}x{expect_size[1]}")
        if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
            raise DataError(f"{where} declares {w}x{h} px, over Pillow's decompression-bomb limit "
                            f"({Image.MAX_IMAGE_PIXELS} px)")
        if (depth, colour) != (8, 2):
            raise DataError(f"{where} is a PNG of bit depth {depth}, colour type {colour}; expected 8-bit RGB (2)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
                if expect_size is not None and im.size != tuple(expect_size):
                    raise DataError(f"{where} declares {im.size[0]}x{im.size[1]} px, "
                                    f"the manifest says {expect_size[0]}x{expect_size[1]}")
                if im.mode != "RGB":
                    raise DataError(f"{where} is {im.mode} {im.size[0]}x{im.size[1]}, expected RGB")
                im.load()
                return np.array(im)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{where} is over Pillow's decompression-bomb limit ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise DataError(f"{where} is not a readable PNG ({_one_line(e)})") from None


def decode_json(raw: bytes, where: str) -> dict:
    """A sample's json member -> dict; DataError (one line starting with ``where``) otherwise."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{where} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} is a JSON {type(obj).__name__}, expected an object")
    return obj


# ----------------------------------------------------------------------------- file checksums


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tree_files(root: Path) -> list[str]:
    """Every file under ``root`` but temporary ones (``is_temporary``), as a sorted list of POSIX
    paths relative to it."""
    out = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        out += [(rel / name).as_posix() for name in files if not is_temporary(name)]
    return sorted(out)


def tree_checksums(root: str | Path) -> list[dict]:
    """[{"file": relative POSIX path, "bytes": int, "sha256": hex}] of every file under ``root``
    (the chunks and metadata of kernels.zarr), sorted by path: what the manifest records.
    Temporary files a killed worker left are not part of it (the driver deletes them)."""
    root = Path(root)
    return [{"file": rel, "bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
            for rel in tree_files(root)]


def check_tree(root: str | Path, recorded: list[dict], label: str) -> list[str]:
    """One line per file under ``root`` that is missing, changed or not in ``recorded`` (entries of
    ``tree_checksums``); ``label`` prefixes each path (e.g. "kernels.zarr"). Temporary files are
    left to the caller (verify reports them as stray files)."""
    root = Path(root)
    if not root.is_dir():
        return [f"{label}: missing"]
    listed = {e["file"]: e for e in recorded}
    present = set(tree_files(root))
    problems = []
    for rel in sorted(listed.keys() | present):
        if rel not in present:
            problems.append(f"{label}/{rel}: missing (a lost zarr chunk reads back as zeros)")
        elif rel not in listed:
            problems.append(f"{label}/{rel}: not in the manifest")
        elif (size := (root / rel).stat().st_size) != listed[rel]["bytes"]:
            problems.append(f"{label}/{rel}: {size} bytes, the manifest says {listed[rel]['bytes']}")
        elif sha256_file(root / rel) != listed[rel]["sha256"]:
            problems.append(f"{label}/{rel}: sha256 differs from the manifest")
    return problems


# ----------------------------------------------------------------------------- writing


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` (``.<name>.tmp-<pid>``, which
    is_temporary recognizes), fsync it and rename it over ``path``: readers see the old file or
    the whole new one, never a part. On any failure (a full disk, Ctrl-C) the temporary file is
    removed. The one atomic writer of the project: shards, manifests, run folders."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful replace
