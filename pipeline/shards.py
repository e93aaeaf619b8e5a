"""Write one shard: its tar, its chunk of kernels.zarr, then its stats file — in that order.

A shard is the unit of work: ``write_shard(job)`` is a pure function of (config, split, shard id)
that is safe to rerun. The tar is written under a temporary name and renamed when complete; the
stats file, written last (also atomically), is what marks the shard done. A killed run therefore
leaves at worst a temporary file and an orphan zarr chunk, both rewritten by the next run.

Tars are deterministic: members sorted, mtime 0, uid/gid 0, empty owner names, mode 0644, USTAR.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import zarr

from pipeline import render, sources
from pipeline.config import ShardConfig
from pipeline.format import KERNELS, STATS_DIR, atomic_write_bytes, shard_file  # noqa: F401 - the format's names live there

PNG_LEVEL = 0  # zlib level of target.png (see encode_png); 0 stores the pixels uncompressed


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: jobs key the retry table
class ShardJob:
    """Everything a worker needs to write one shard (picklable)."""

    cfg: ShardConfig
    config_hash: str
    code_version: str
    out_dir: str
    split: str
    shard: int
    start: int  # first sample index (within the split)
    stop: int  # one past the last
    source: sources.SourceList

    @property
    def file(self) -> str:
        return shard_file(self.split, self.shard)


def stats_path(out_dir: str | Path, split: str, shard: int) -> Path:
    return Path(out_dir) / STATS_DIR / f"{split}-{shard:06d}.json"


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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_STORED_BLOCK = 65535  # the most bytes one deflate stored block holds


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
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sample_members(sample: dict) -> list[tuple[str, bytes]]:
    """The tar members of one sample, sorted by name (burst.npy, json, target.png)."""
    key = sample["key"]
    return [(f"{key}.burst.npy", encode_npy(sample["burst"])),
            (f"{key}.json", encode_json(sample["params"])),
            (f"{key}.target.png", encode_png(sample["target"]))]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class HashingWriter:
    """A binary file opened for writing that hashes (sha256) and counts what goes through it,
    so a shard's checksum costs no second read of the file."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _injected_fault(job: ShardJob) -> None:
    """Test hook: PIPELINE_FAULT="<shard file>:<marker path>" kills this worker (SIGKILL) halfway
    through that shard, once (the marker file records that it happened). Lets the tests prove that
    a worker killed mid-shard leaves nothing that looks complete and that the retry is exact."""
    spec = os.environ.get("PIPELINE_FAULT")
    if not spec:
        return
    file, marker = spec.split(":", 1)
    if file == job.file and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def _injected_hold(job: ShardJob) -> None:
    """Test hook: PIPELINE_HOLD="<shard file>:<marker path>" makes the worker that starts that
    shard create the marker and then wait (up to 10 minutes) instead of rendering it, so a test
    can interrupt a render at a known point without racing it: the run cannot finish before the
    signal arrives, however fast the machine."""
    spec = os.environ.get("PIPELINE_HOLD")
    if not spec:
        return
    file, marker = spec.split(":", 1)
    if file == job.file:
        Path(marker).touch()
        time.sleep(600)


def write_shard(job: ShardJob) -> dict:
    """Render samples [start, stop) of a split into one tar + its zarr rows; return its stats."""
    _injected_hold(job)
    t0 = time.perf_counter()
    out = Path(job.out_dir)
    final = out / job.file
    tmp = out / f".{job.file}.tmp-{os.getpid()}"
    n = job.stop - job.start
    K, F, T = job.cfg.dataset.kernel_size, job.cfg.dataset.frames, job.cfg.kernels.steps
    kern = np.zeros((n, F, K, K), np.float32)
    traj = np.zeros((n, F, T, 2), np.float32)
    blur_px, noise, failures = [], [], []
    out_file = HashingWriter(tmp)
    # copybufsize: tarfile copies members in 16 KiB pieces by default; a burst is ~0.6 MB
    try:
        with tarfile.open(fileobj=out_file, mode="w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 20) as tar:
            for row, index in enumerate(range(job.start, job.stop)):
                sample = render.render_sample(job.cfg, job.split, index, job.source)
                for name, data in sample_members(sample):
                    add_member(tar, name, data)
                kern[row], traj[row] = sample["kernels"], sample["trajectories"]
                if row == n // 2:
                    _injected_fault(job)
                p = sample["params"]
                blur_px.append(round(float(np.mean(p["kernel_radius_px"])), 4))
                noise.append(round(float(np.sqrt(p["shot_noise"] ** 2 * 0.18 + p["read_noise"] ** 2)), 6))
                failures += p["source"].get("decode_failures", [])
        out_file.close()
    except BaseException:  # a failed shard (a full disk, an error, Ctrl-C) frees its space now
        out_file.file.close()
        tmp.unlink(missing_ok=True)
        raise
    # kernels first, then the tar, then the stats: only the stats file says "done"
    root = zarr.open_group(str(out / KERNELS), mode="r+")
    root[job.split][job.start:job.stop] = kern
    root[f"{job.split}_trajectories"][job.start:job.stop] = traj
    os.replace(tmp, final)
    reasons: dict[str, int] = {}
    for _, reason in failures:
        reasons[reason] = reasons.get(reason, 0) + 1
    stats = {
        "file": job.file,
        "split": job.split,
        "shard": job.shard,
        "samples": n,
        "first": job.start,
        "bytes": out_file.size,
        "sha256": out_file.sha256.hexdigest(),
        "config_hash": job.config_hash,
        "code_version": job.code_version,
        "decode_failures": sorted({tuple(f) for f in failures}),
        "decode_failure_counts": reasons,
        "blur_px": blur_px,  # mean kernel RMS radius per sample
        "noise_std_mid_grey": noise,  # noise std at linear 0.18 per sample
        "seconds": round(time.perf_counter() - t0, 3),
    }
    path = stats_path(out, job.split, job.shard)
    atomic_write_bytes(path, encode_json({k: v for k, v in stats.items() if k != "seconds"}))
    return stats
