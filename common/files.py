"""Atomic file writes: readers see the old file or the whole new one, never a part.

Every output of the project (shards' manifests and stats, checkpoints, run summaries, reports,
contact sheets, deblurred images) is written to a temporary sibling ``.<name>.tmp-<pid>`` and
renamed over its final name only when complete; on any failure (a full disk, Ctrl-C, an
encoder error) the temporary file is removed. ``pipeline.format.is_temporary`` recognizes the
temporary names, so a dataset folder is swept of any left by a killed process.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def temporary_sibling(path: str | Path) -> Path:
    """``.<name>.tmp-<pid>`` next to ``path``: same folder (so the rename is atomic), hidden."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """``with atomic_path(out) as tmp: write(tmp)``: ``tmp`` is renamed over ``out`` when the
    block ends normally (after an fsync of the file, unless ``fsync`` is False), and removed
    when it raises."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful replace


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
