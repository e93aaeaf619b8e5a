"""The on-disk format of a dataset folder: one home for its names, its members and every check.

    shards/<name>/manifest.json          read_manifest -> Manifest (validate_manifest: structure,
                                         types, plain file names, the shard list the config implies)
                  <split>-NNNNNN.tar     shard_file / parse_shard_file; one sample = the members
                                         <key>.burst.npy, <key>.json, <key>.target.png (MEMBERS),
                                         key sample_key / parse_key ("<split>-NNNNNN-NNNNNN")
                  kernels.zarr/          every file's size and sha256 in the manifest (tree_checksums)
                  stats/<split>-NNNNNN.json   stats_file: a shard's stats, written last (the done mark)
                  <split>.wids.json      wids_file / wids_index: the shard list webdataset's wids reads

A dataset may also be read over a URL (``is_url``): http(s) through the standard library, any
other scheme through fsspec; ``read_manifest`` and ``iter_shard`` take one (``open_location``,
``join``), and iter_shard still checks a shard's sha256 before its first sample.

Writing: ``encode_sample`` gives a sample's members, byte for byte what every shard holds (the
encoders ``encode_npy``, ``encode_png``, ``encode_json``); ``atomic_write_bytes`` is the one
atomic writer. Reading: ``iter_shard`` streams one tar's samples (regular members only, keys of
this shard, members together, optional sha256 and sample count against the manifest) and
``decode_sample`` decodes one (exactly the members, shapes against the manifest before anything is
allocated). The writer (pipeline.shards, pipeline.run), ``pipeline.inspect`` (summary, contact
sheet, verify), ``trainer.data`` and through it training and evaluation all go through here.

The readers treat a dataset folder as untrusted input: a member whose header declares a shape, a
byte count or a pixel count other than the manifest implies is refused with one line naming the
shard and member, before any array is allocated, and nothing is unpickled. Problems are raised as
``DataError`` (a UserError, so a ValueError: the CLIs print it as one ``error:`` line).

No torch here: the pipeline imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import json
import math
import os
import re
import struct
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image

from common.errors import UserError, one_line
from common.files import atomic_write_bytes  # noqa: F401 - the format's writers use it; re-exported

FORMAT = "burst-shards/1"
MANIFEST = "manifest.json"
KERNELS = "kernels.zarr"
STATS_DIR = "stats"
PLAN = ".plan.json"  # written when a render starts, deleted when it finishes (pipeline.run)
LOCK = ".render.lock"  # the render lock of a dataset folder; never part of the dataset
MEMBERS = ("burst.npy", "json", "target.png")  # the suffixes of one sample's members, in tar order
MEMBER_TYPES = {"burst.npy": "uint8 (frames, size, size, 3) sRGB", "json": "sampled parameters",
                "target.png": "uint8 (size, size, 3) sRGB"}  # the manifest's "members"
KEY = re.compile(r"(?P<split>[a-z0-9_]+)-(?P<shard>\d{6})-(?P<index>\d{6})")
SHARD_FILE = re.compile(r"(?P<split>[a-z0-9_]+)-(?P<shard>\d{6})\.tar")
SPLIT = re.compile(r"[a-z0-9_]+")
SHA256 = re.compile(r"[0-9a-f]{64}")
TEMPORARY = re.compile(r"\..+\.tmp(-\d+)?")  # ".<name>.tmp-<pid>": an atomic write that did not finish
ZARR_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")  # a chunk zarr's LocalStore had not renamed yet
WIDS_SUFFIX = ".wids.json"  # <split>.wids.json: the shard list webdataset's wids reads (wids_index)
_NUMBERS = 10 ** 6  # shard numbers and sample indices are written with 6 digits


class DataError(UserError):
    """A problem with the dataset on disk; the message is one line naming the file (shard, member)."""


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message``: what a decoder's error says it met."""
    text = one_line(e)
    return text if text == type(e).__name__ else f"{type(e).__name__}: {text}"


# ----------------------------------------------------------------------------- names and keys


def _check_numbers(split: str, **numbers: int) -> None:
    if not SPLIT.fullmatch(split):
        raise ValueError(f"'{split}' is not a split name (lowercase letters, digits, '_')")
    for what, n in numbers.items():
        if type(n) is not int or not 0 <= n < _NUMBERS:
            raise ValueError(f"{what} {n!r} does not fit the format's 6 digits (0..{_NUMBERS - 1})")


def shard_file(split: str, shard: int) -> str:
    """``<split>-NNNNNN.tar``: the file name of shard number ``shard`` of ``split``."""
    _check_numbers(split, shard=shard)
    return f"{split}-{shard:06d}.tar"


def parse_shard_file(name: str) -> tuple[str, int]:
    """(split, shard number) of a shard file name; DataError if ``name`` is not one."""
    m = SHARD_FILE.fullmatch(name)
    if not m:
        raise DataError(f"{name}: not a shard file name (<split>-NNNNNN.tar)")
    return m["split"], int(m["shard"])


def stats_file(split: str, shard: int) -> str:
    """``stats/<split>-NNNNNN.json``: the stats file of a shard, relative to the dataset folder."""
    return f"{STATS_DIR}/{shard_file(split, shard)[:-len('.tar')]}.json"


class Key(NamedTuple):
    """A parsed sample key: ``index`` is the sample's index in its split, ``shard`` its tar's number."""

    split: str
    shard: int
    index: int


def sample_key(split: str, shard: int, index: int) -> str:
    """``<split>-NNNNNN-NNNNNN``: the key of sample ``index`` of ``split``, stored in shard ``shard``
    (no dots: the tar member names are ``<key>.<member>``). ValueError if it would not parse back."""
    _check_numbers(split, shard=shard, index=index)
    return f"{split}-{shard:06d}-{index:06d}"


def parse_key(key: str) -> Key:
    """(split, shard, index) of a sample key; DataError (one line) if ``key`` is not one."""
    m = KEY.fullmatch(key) if isinstance(key, str) else None
    if not m:
        raise DataError(f"bad sample key {key!r} (expected <split>-NNNNNN-NNNNNN)")
    return Key(m["split"], int(m["shard"]), int(m["index"]))


def is_temporary(name: str) -> bool:
    """A file name of an unfinished write (ours or zarr's): never part of a finished dataset."""
    return bool(TEMPORARY.fullmatch(name) or ZARR_PARTIAL.fullmatch(name))


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
    split -> {samples (at most 10^6), source, source_files, skipped, shards}, each shard {file, samples, bytes,
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
        if samples > _NUMBERS:
            f.fail(f"{where}.samples", f"must be at most {_NUMBERS} (sample keys hold 6 digits)", samples)
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


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One tar of a split, as the manifest lists it."""

    split: str
    shard: int  # its number: the file is shard_file(split, shard)
    file: str
    first: int  # index in the split of its first sample (the samples are first .. first + samples - 1)
    samples: int
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class SplitEntry:
    """One split of a dataset, as the manifest lists it."""

    name: str
    samples: int
    samples_per_shard: int  # from the resolved config
    source: str
    source_files: int
    skipped: dict  # reason -> {"count": int, "inputs": [str]}: inputs the render left out
    shards: tuple[ShardEntry, ...]  # in order: shard i holds samples i·samples_per_shard ...

    def shard_of(self, index: int) -> ShardEntry:
        """The shard that holds sample ``index``; DataError if the split has no such sample."""
        if type(index) is not int or not 0 <= index < self.samples:
            raise DataError(f"index {index} out of range for split '{self.name}' ({self.samples} samples)")
        return self.shards[index // self.samples_per_shard]

    def key(self, index: int) -> str:
        """The key of sample ``index`` (``sample_key``); DataError if the split has no such sample."""
        return sample_key(self.name, self.shard_of(index).shard, index)


@dataclasses.dataclass(frozen=True, eq=False)
class Manifest(Mapping):
    """A dataset's ``manifest.json``, validated (``validate_manifest``), with typed fields.

    It is also a read-only Mapping of the JSON as read (``manifest["config"]["dataset"]``), for
    code that reads a manifest as the dict that ``pipeline.run.render_dataset`` returns.
    """

    path: Path | str  # the manifest file (a URL string for a dataset read over a URL); messages name it
    name: str
    config_hash: str
    code_version: str
    seed: int
    frames: int  # stored per sample: bursts are uint8 (frames, size, size, 3)
    size: int
    kernel_size: int
    kernels: str  # the kernels folder (KERNELS)
    config: dict = dataclasses.field(repr=False)  # the resolved shard config
    splits: dict[str, SplitEntry] = dataclasses.field(repr=False)
    kernel_files: tuple[dict, ...] | None = dataclasses.field(repr=False)  # None: an older manifest
    data: dict = dataclasses.field(repr=False)  # the JSON as read

    @classmethod
    def from_json(cls, obj, path: str | Path) -> Manifest:
        """Validate a parsed manifest (``validate_manifest``; DataError naming ``path``) and wrap it."""
        validate_manifest(obj, path)
        splits = {}
        for name, s in obj["splits"].items():
            per_shard = obj["config"]["splits"][name]["samples_per_shard"]
            shards = tuple(ShardEntry(name, i, e["file"], i * per_shard, e["samples"], e["bytes"], e["sha256"])
                           for i, e in enumerate(s["shards"]))
            splits[name] = SplitEntry(name, s["samples"], per_shard, s["source"], s["source_files"], s["skipped"],
                                      shards)
        files = obj.get("kernel_files")
        return cls(path if is_url(path) else Path(path), obj["name"], obj["config_hash"], obj["code_version"],
                   obj["seed"], obj["frames"], obj["size"], obj["kernel_size"], obj["kernels"], obj["config"],
                   splits, None if files is None else tuple(files), obj)

    @property
    def folder(self) -> Path | str:
        """The dataset folder (its URL, without a trailing '/', for a dataset read over a URL)."""
        return self.path.rsplit("/", 1)[0] if is_url(self.path) else self.path.parent

    def split(self, name: str) -> SplitEntry:
        """The split ``name``; DataError naming the folder and the splits it has otherwise."""
        if name not in self.splits:
            raise DataError(f"{self.folder}: no split '{name}' (has: {', '.join(sorted(self.splits))})")
        return self.splits[name]

    def shards(self, split: str) -> tuple[ShardEntry, ...]:
        """The shards of ``split`` in key order."""
        return self.split(split).shards

    def key(self, split: str, index: int) -> str:
        """The key of sample ``index`` of ``split``; DataError for an unknown split or index."""
        return self.split(split).key(index)

    def __getitem__(self, key: str):
        return self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def read_manifest(data_dir: str | Path) -> Manifest:
    """The validated ``manifest.json`` of a dataset folder, or of a dataset URL (``is_url``:
    http(s) with the standard library, any other scheme through fsspec): the one reader of the
    pipeline (inspect, verify) and the trainer (training, evaluation).

    Raises FileNotFoundError (folder or manifest missing), DataError (not JSON, not the structure
    of a manifest: ``validate_manifest``, or a URL that cannot be read) or UserError (a URL scheme
    whose fsspec package is not installed), each one line.
    """
    if is_url(data_dir):
        path = join(data_dir, MANIFEST)
        try:
            with open_location(path) as f:
                raw = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no manifest.json at {as_location(data_dir)}: not a rendered dataset, "
                                    "or its render did not finish") from None
        except (OSError, http.client.HTTPException) as e:
            raise DataError(f"{path}: unreadable ({_one_line(e)})") from None
    else:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data folder not found: {data_dir} (render it with `python -m pipeline render`)")
        path = data_dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no manifest.json in {data_dir}: not a rendered dataset, "
                                    "or its render did not finish")
        raw = path.read_bytes()
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return Manifest.from_json(obj, path)


# ----------------------------------------------------------------------------- locations: folders and URLs


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # "<scheme>://": a dataset read over a URL, not a folder
FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                   "abfss": "adlfs", "hf": "huggingface_hub", "sftp": "paramiko", "ssh": "paramiko"}
URL_TIMEOUT = 60.0  # seconds without an answer from an http(s) server before a read fails
SPOOL_BYTES = 128 * 2 ** 20  # a shard fetched from a URL is held in memory up to this size, then in a temp file
_FETCH_BLOCK = 2 ** 20


def is_url(location) -> bool:
    """``location`` is a URL string (``<scheme>://...``: http, https, s3, gs, memory, file, ...)
    rather than a local folder or file."""
    return isinstance(location, str) and bool(URL.match(location))


def as_location(location: str | Path) -> Path | str:
    """A dataset location as the readers keep it: a URL string without a trailing '/', or a Path."""
    return location.rstrip("/") if is_url(location) else Path(location)


def join(base: str | Path, name: str) -> Path | str:
    """``base/name`` for a folder (a Path) or a URL (a string; ``name`` is a relative POSIX path)."""
    return f"{base.rstrip('/')}/{name}" if is_url(base) else Path(base) / name


def location_name(location: str | Path) -> str:
    """The last component of a path or of a URL's path (a shard's file name)."""
    if is_url(location):
        return urllib.parse.urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1]
    return Path(location).name


def open_location(location: str | Path):
    """A binary file object reading ``location``: a local file; an http(s) URL (urllib, standard
    library; a 404 is FileNotFoundError, other HTTP or network failures OSError); any other URL
    through fsspec (``fsspec.open``), when fsspec and that scheme's package (s3fs for s3://, gcsfs
    for gs://, ...) are installed, else a one-line UserError saying which to install."""
    if not is_url(location):
        return open(location, "rb")
    scheme = location.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        try:
            return urllib.request.urlopen(location, timeout=URL_TIMEOUT)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{location}: not found (HTTP 404)") from None
            raise OSError(f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise OSError(f"cannot reach {location} ({e.reason})") from None
    package = FSSPEC_PACKAGES.get(scheme)
    try:
        import fsspec
    except ImportError:
        raise UserError(f"install fsspec{f' and {package}' if package else ''} to read {scheme}:// URLs") from None
    try:
        return fsspec.open(location, "rb").open()
    except ImportError as e:
        raise UserError(f"install {package or 'the fsspec filesystem package'} to read {scheme}:// URLs "
                        f"({_one_line(e)})") from None
    except ValueError as e:  # fsspec: "Protocol not known"
        raise UserError(f"{location}: fsspec cannot read {scheme}:// URLs ({_one_line(e)})") from None


def read_location(location: str | Path) -> bytes:
    """The whole content of a file or URL (``open_location``)."""
    with open_location(location) as f:
        return f.read()


def _fetch_checked(location: str, label: str, sha256: str | None):
    """Fetch a URL into a SpooledTemporaryFile (memory up to SPOOL_BYTES, then a temp file),
    hashing while fetching; DataError if the digest is not ``sha256``. Returns the file, at 0."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        digest = hashlib.sha256()
        with open_location(location) as src:
            while block := src.read(_FETCH_BLOCK):
                digest.update(block)
                spool.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DataError(f"{label}: sha256 differs from the manifest")
        spool.seek(0)
        return spool
    except DataError:
        spool.close()
        raise
    except (OSError, http.client.HTTPException) as e:  # FileNotFoundError (404) included
        spool.close()
        raise DataError(f"{label}: unreadable ({_one_line(e)})") from None
    except BaseException:
        spool.close()
        raise


# ----------------------------------------------------------------------------- shards


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


def iter_shard(path: str | Path, *, label: str | None = None, sha256: str | None = None,
               samples: int | None = None, first: int | None = None) -> Iterator[dict]:
    """The samples of one shard in stored order, as raw member bytes:
    {"__key__": "<split>-NNNNNN-NNNNNN", "burst.npy": bytes, "json": bytes, "target.png": bytes}
    (the webdataset layout; ``decode_sample`` decodes one). A generator: nothing is read before
    the first ``next``.

    The tar is read in one pass (tarfile mode "r:" over the open file: headers and data in order,
    members read straight from the file, ~2x faster than the "r|" stream mode; one sample in
    memory at a time). Refused with a DataError whose message starts with ``label`` (default: the path) and names
    the member: a member that is not a regular file (``check_member``), a name that is not
    ``<key>.<member>`` with a key of this shard (``<split>-NNNNNN`` from the file name) and one of
    MEMBERS, a member that appears twice or apart from the rest of its sample, an unreadable tar.

    ``sha256`` (the manifest's digest): the open file is hashed before its first sample is
    yielded, then read from its start, so nothing of a corrupt or replaced shard is ever yielded
    (a sample handed to a training loop cannot be recalled). ``samples`` (the manifest's count):
    a tar holding another number of samples is refused after its last one (tarfile ends silently
    at a corrupt header mid-file). ``first``, with ``samples``: the index in the split of the
    shard's first sample; a key outside first .. first + samples - 1 is refused.

    A sample missing a member is yielded as it is (``decode_sample`` refuses it): it is one bad
    sample, and a reader that skips bad samples reads on; what is refused here ends the shard.

    ``path`` may be a URL (``is_url``; ``open_location`` reads it): the shard is then fetched
    whole into memory (a temporary file past SPOOL_BYTES) and hashed on the way in, one pass over
    the network, then read from there like a local file. Streaming it through tarfile's "r|" mode
    would read it once too, but a digest known only at the end breaks the guarantee above.
    """
    url = is_url(path)
    path = path if url else Path(path)
    label = str(path) if label is None else label
    name = location_name(path)
    if not SHARD_FILE.fullmatch(name):
        raise DataError(f"{label}: not a shard file name (<split>-NNNNNN.tar)")
    if url:
        with _fetch_checked(path, label, sha256) as f:
            yield from _tar_samples(f, label, name[:-len(".tar")], samples, first)
        return
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{label}: unreadable ({_one_line(e)})") from None
    with f:
        if sha256 is not None:
            try:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                f.seek(0)
            except OSError as e:
                raise DataError(f"{label}: unreadable ({_one_line(e)})") from None
            if digest != sha256:
                raise DataError(f"{label}: sha256 differs from the manifest")
        yield from _tar_samples(f, label, path.name[:-len(".tar")], samples, first)


def _tar_samples(f, label: str, stem: str, samples: int | None, first: int | None) -> Iterator[dict]:
    """iter_shard's reading of one open tar: members grouped by key, checked as it says."""
    count, group, seen, done = 0, None, set(), set()
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                check_member(info, label)
                key, _, member = info.name.partition(".")
                m = KEY.fullmatch(key)
                if not m or f"{m['split']}-{m['shard']}" != stem:
                    raise DataError(f"{label}: {info.name} is not a member of this shard (keys {stem}-NNNNNN)")
                if member not in MEMBERS:
                    raise DataError(f"{label}: {info.name} is not a sample member ({', '.join(MEMBERS)})")
                if first is not None and samples is not None and not first <= int(m["index"]) < first + samples:
                    raise DataError(f"{label}: {info.name}: index outside this shard's samples "
                                    f"{first}..{first + samples - 1}")
                if info.name in seen:
                    raise DataError(f"{label}: {info.name} appears twice")
                seen.add(info.name)
                if group is None or group["__key__"] != key:
                    if key in done:
                        raise DataError(f"{label}: {info.name} is apart from the other members of sample {key}")
                    if group is not None:
                        done.add(group["__key__"])
                        count += 1
                        yield group
                    group = {"__key__": key}
                group[member] = tar.extractfile(info).read()
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{label}: unreadable tar after {count} samples ({_one_line(e)})") from None
    if group is not None:
        count += 1
        yield group
    if samples is not None and count != samples:
        raise DataError(f"{label}: holds {count} samples, the manifest lists {samples} (corrupt tar)")


# ----------------------------------------------------------------------------- member encoders


PNG_LEVEL = 0  # zlib level of target.png (see encode_png); 0 stores the pixels uncompressed
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_STORED_BLOCK = 65535  # the most bytes one deflate stored block holds


def encode_png(img: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """uint8 (H, W, 3) RGB -> a standard 8-bit RGB PNG: signature, IHDR, one IDAT, IEND.

    Written here rather than by Pillow, which tries five row filters per row (~1.8 ms for a 160²
    target). Rows use filter 0 ("None"). At ``level`` 0 the IDAT holds the pixels verbatim in
    deflate "stored" blocks, laid out here byte by byte: ~0.05 ms, and the bytes do not depend
    on the zlib build. Compressing (zlib level 1: ~1 ms, 25-35% smaller) would save 3-4% of a
    sample's bytes, since the uncompressed burst.npy is 8× the target. Levels 1-9 use zlib.
    No time or text chunks: the same pixels give the same bytes.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"encode_png wants uint8 (H, W, 3), got {img.dtype} {img.shape}")
    h, w, _ = img.shape
    rows = np.zeros((h, 1 + 3 * w), np.uint8)  # a leading 0 per row: filter type "None"
    rows[:, 1:] = img.reshape(h, 3 * w)
    stream = _zlib_stored(rows.data.cast("B")) if level == 0 else zlib.compress(rows, level)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, filter 0, no interlace
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", stream),
                     _png_chunk(b"IEND", b"")))


def _zlib_stored(data: memoryview) -> bytes:
    """A zlib stream (RFC 1950) of ``data`` in uncompressed deflate blocks (RFC 1951, BTYPE 00):
    header 78 01, per block [BFINAL byte, LEN, ~LEN (little-endian)] + the bytes, Adler-32."""
    parts = [b"\x78\x01"]  # deflate, 32 KiB window, "fastest"; (0x78 << 8 | 0x01) % 31 == 0
    n = len(data)
    for start in range(0, max(n, 1), _STORED_BLOCK):
        size = min(_STORED_BLOCK, n - start)
        final = start + _STORED_BLOCK >= n
        parts.append(struct.pack("<BHH", final, size, size ^ 0xFFFF))
        parts.append(data[start:start + size])
    parts.append(struct.pack(">I", zlib.adler32(data)))
    return b"".join(parts)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """length, type, data, CRC-32 of type + data (big-endian), as PNG chunks are laid out."""
    return b"".join((struct.pack(">I", len(data)), kind, data,
                     struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))))


def encode_npy(arr: np.ndarray) -> bytes:
    """The bytes ``np.save(f, arr, allow_pickle=False)`` writes, in one copy of the data
    (np.save into a BytesIO goes through a buffered iterator: ~2.5× slower for a burst)."""
    arr = np.asanyarray(arr)
    if arr.dtype.hasobject:
        raise ValueError("encode_npy does not write object arrays")
    header = io.BytesIO()
    d = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(header, d)
    except ValueError:  # a header over 64 KiB: np.save moves to format 2.0 too
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, d)
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.ascontiguousarray(arr)
    data = memoryview(arr.reshape(-1, order="A")).cast("B")  # memory order, as np.save does
    return b"".join((header.getvalue(), data))


def encode_json(obj: dict) -> bytes:
    """Sorted keys, no spaces, UTF-8: the same dict gives the same bytes (members, stats files)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode_sample(sample: dict) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in tar order (sorted by name): ``<key>.burst.npy``,
    ``<key>.json``, ``<key>.target.png``.

    ``sample``: {"key": a sample key, "burst": uint8 (N, H, W, 3) sRGB, "target": uint8 (H, W, 3)
    sRGB, "params": dict of JSON values} (what ``pipeline.render.render_sample`` returns;
    ``decode_sample`` gives it back). ValueError for a key readers would not accept.
    """
    key = sample["key"]
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ValueError(f"bad sample key {key!r} (expected <split>-NNNNNN-NNNNNN)")
    return [(f"{key}.burst.npy", encode_npy(sample["burst"])),
            (f"{key}.json", encode_json(sample["params"])),
            (f"{key}.target.png", encode_png(sample["target"]))]


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


def decode_sample(raw: dict, where: str, frames: int | None = None, size: int | None = None) -> dict:
    """Decode one raw sample of ``iter_shard`` -> {"key", "burst": uint8 (N, H, W, 3) sRGB,
    "target": uint8 (H, W, 3) sRGB, "params": dict of the sampled parameters} (what
    ``encode_sample`` was given).

    Checks that the sample has exactly MEMBERS, then decodes them in that order with the checked
    decoders: the burst against (frames, size, size, 3) uint8 (None: any length), the target
    against the burst's size; nothing is allocated before its header is checked and nothing is
    unpickled. DataError messages start with ``<where>: sample <key>`` (``where``: the shard).
    """
    at = f"{where}: sample {raw.get('__key__', '?')}"
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise DataError(f"{at}: missing member(s) {', '.join(missing)}")
    extra = sorted(set(raw) - set(MEMBERS) - {"__key__"})
    if extra:
        raise DataError(f"{at}: unexpected member(s) {', '.join(extra)}")
    burst = decode_npy(raw["burst.npy"], f"{at}: burst.npy", (frames, size, size, 3), np.uint8)
    params = decode_json(raw["json"], f"{at}: json")
    target = decode_png(raw["target.png"], f"{at}: target.png", (burst.shape[2], burst.shape[1]))
    return {"key": raw.get("__key__", "?"), "burst": burst, "target": target, "params": params}


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


def wids_file(split: str) -> str:
    """``<split>.wids.json``: the shard list of ``split`` for webdataset's ``wids``, beside the manifest."""
    _check_numbers(split)
    return f"{split}{WIDS_SUFFIX}"


def wids_index(manifest: Mapping, split: str) -> bytes:
    """The bytes of ``<split>.wids.json``: the dataset description ``wids.ShardListDataset`` reads
    (it refuses manifest.json: "No wids_version"): {"wids_version": 1, "name": "<dataset>-<split>",
    "shardlist": [{"url": shard file, relative to the list's folder (wids resolves it against the
    list's own path or URL), "nsamples"}, ...]} in shard order. Sorted keys, fixed indent: the same
    manifest gives the same bytes (a render writes it before the manifest). No sizes or digests:
    the manifest keeps those, and wids uses them only in a log line."""
    shards = manifest["splits"][split]["shards"]
    obj = {"wids_version": 1, "name": f"{manifest['name']}-{split}",
           "shardlist": [{"url": e["file"], "nsamples": e["samples"]} for e in shards]}
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
