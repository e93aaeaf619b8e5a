"""Write one shard: its tar, its chunk of kernels.zarr, then its stats file — in that order.

A shard is the unit of work: ``write_shard(job)`` is a pure function of (config, split, shard id)
that is safe to rerun. The tar is written under a temporary name and renamed when complete; the
stats file, written last (also atomically), is what marks the shard done. A killed run therefore
leaves at worst a temporary file and an orphan zarr chunk, both rewritten by the next run.

Tars are deterministic: members sorted, mtime 0, uid/gid 0, empty owner names, mode 0644, USTAR.
What a sample's members hold, byte for byte, and every name are pipeline.format's (``encode_sample``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import io
import os
import queue
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import zarr

from pipeline import faults, render, sources
from pipeline.config import ShardConfig
from pipeline.format import KERNELS, atomic_write_bytes, encode_json, encode_sample, shard_file, stats_file


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
    return Path(out_dir) / stats_file(split, shard)


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

    def sync_data(self) -> None:
        """Write what has been written so far to the disk (fdatasync; fsync where that is missing)."""
        self.file.flush()
        getattr(os, "fdatasync", os.fsync)(self.file.fileno())

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class TarThread:
    """A shard's tar written by a thread of its own: ``put(sample)`` queues a rendered sample and
    returns; the thread encodes its members, appends them to the tar, hashes and writes them.

    Encoding, sha256 and the copy into the page cache (~1 ms of a ~10-19 ms burst, measured in
    docs/benchmarks.md) release the GIL, so they overlap the next burst's rendering wherever a
    core is free (fewer workers than cores); with every core busy the work is the same, only on
    another thread. The file's bytes are those of a single thread: one FIFO queue, one writer.
    At most ``depth`` samples wait in the queue. An error on the thread (a full disk) is raised
    by the next ``put`` or by ``finish``; ``abort`` stops the thread and closes the file.

    Every ``sync_bytes`` written, the thread also syncs the file's data to the disk, while the
    next bursts render, so the fsync that ends the tar (and that ``finish`` waits for) has only
    the last piece left to write: measured 4% of a shard's time before (docs/benchmarks.md).
    """

    def __init__(self, path: Path, depth: int = 4, sync_bytes: int = 8 << 20):
        self.sync_bytes = sync_bytes
        self.out = HashingWriter(path)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.aborted = False
        self.thread = threading.Thread(target=self._run, name=f"tar {path.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ended = False  # the queue's end (None) taken
        try:
            # copybufsize: tarfile copies members in 16 KiB pieces by default; a burst is ~0.6 MB
            with tarfile.open(fileobj=self.out, mode="w", format=tarfile.USTAR_FORMAT,
                              copybufsize=1 << 20) as tar:
                synced = 0
                while (sample := self.queue.get()) is not None:
                    if not self.aborted:
                        for name, data in encode_sample(sample):
                            add_member(tar, name, data)
                        if self.out.size - synced >= self.sync_bytes:
                            self.out.sync_data()
                            synced = self.out.size
                ended = True
                if self.aborted:
                    return
            self.out.close()  # flush and fsync: the tar is on disk when finish() returns
        except BaseException as e:  # noqa: BLE001 - handed to the rendering thread
            self.error = e
            while not ended:  # keep taking samples up to the end: put() never blocks for ever
                ended = self.queue.get() is None

    def put(self, sample: dict) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(sample)

    def finish(self) -> None:
        """Wait for every queued sample to be written, the tar to be closed and fsynced."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop writing (what is queued is dropped), wait for the thread, close the file."""
        self.aborted = True
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.out.file.close()


@functools.cache
def tune_allocator() -> bool:
    """Keep freed memory in the heap for reuse (glibc; once per process; False elsewhere).

    A burst allocates and frees many arrays of 0.1-1 MB. glibc serves those with fresh mmap()s
    and gives them back at once (its dynamic threshold only moves up, then trimming undoes it),
    so every burst pays page faults for fresh zeroed pages: measured ~25% of a worker's time on
    this VM (bench/bench_render.py). Fixed thresholds (32 MiB mmap, 128 MiB trim) let the heap
    reuse its pages; a worker may keep up to ~128 MiB more than it uses.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 << 20))
    except (OSError, AttributeError):  # not glibc
        return False


def write_shard(job: ShardJob) -> dict:
    """Render samples [start, stop) of a split into one tar + its zarr rows; return its stats."""
    t0 = time.perf_counter()
    tune_allocator()
    out = Path(job.out_dir)
    final = out / job.file
    tmp = out / f".{job.file}.tmp-{os.getpid()}"
    n = job.stop - job.start
    K, F, T = job.cfg.dataset.kernel_size, job.cfg.dataset.frames, job.cfg.kernels.steps
    kern = np.zeros((n, F, K, K), np.float32)
    traj = np.zeros((n, F, T, 2), np.float32)
    per_sample, failures = [], []
    writer = TarThread(tmp)
    try:
        for row, index in enumerate(range(job.start, job.stop)):
            faults.before_sample(job.file, row, n)  # test hooks (env vars); nothing unless set
            sample = render.render_sample(job.cfg, job.split, index, job.source)
            writer.put(sample)
            kern[row], traj[row] = sample["kernels"], sample["trajectories"]
            per_sample.append(render.sample_stats(sample["params"]))
            failures += sample["params"]["source"].get("decode_failures", [])
        writer.finish()
    except BaseException:  # a failed shard (a full disk, an error, Ctrl-C) frees its space now
        writer.abort()
        tmp.unlink(missing_ok=True)
        raise
    out_file = writer.out
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
        "blur_px": [s["blur_px"] for s in per_sample],  # mean kernel RMS radius per sample
        "noise_std_mid_grey": [s["noise_std_mid_grey"] for s in per_sample],  # at linear 0.18
        "seconds": round(time.perf_counter() - t0, 3),
    }
    path = stats_path(out, job.split, job.shard)
    atomic_write_bytes(path, encode_json({k: v for k, v in stats.items() if k != "seconds"}))
    return stats
