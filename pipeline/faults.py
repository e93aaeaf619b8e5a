"""Test hooks: fault injection by environment variable, no effect unless set.

The pipeline's fault tests need a worker to die, or to wait, at a known point of a known shard,
inside worker processes the test does not control (the local process pool, Ray). Environment
variables reach those processes; nothing else in the pipeline reads them. Both take
"<shard file>:<marker path>", e.g. ``PIPELINE_FAULT=train-000001.tar:/tmp/killed``:

- PIPELINE_FAULT: the worker writing that shard kills itself (SIGKILL) halfway through it, once:
  the marker file records that it happened, so the retry runs through. Proves that a worker killed
  mid-shard leaves nothing that looks complete and that the retry writes the same bytes.
- PIPELINE_HOLD: the worker that starts that shard creates the marker, then waits (up to 10
  minutes) instead of rendering it, so a test can interrupt a render at a known point without
  racing it: the run cannot finish before the signal arrives, however fast the machine.

``pipeline.shards.write_shard`` calls ``before_sample`` once per sample; with neither variable set
that is two dictionary look-ups.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT = "PIPELINE_FAULT"
HOLD = "PIPELINE_HOLD"
HOLD_SECONDS = 600


def _marker(variable: str, shard_file: str) -> Path | None:
    """The marker path of ``variable`` when it names ``shard_file``, else None."""
    spec = os.environ.get(variable)
    if not spec:
        return None
    file, marker = spec.split(":", 1)
    return Path(marker) if file == shard_file else None


def before_sample(shard_file: str, row: int, rows: int) -> None:
    """Called by the writer of ``shard_file`` before it renders sample ``row`` of its ``rows``:
    holds at row 0 (PIPELINE_HOLD), dies at row rows // 2 (PIPELINE_FAULT); else returns at once."""
    if row == 0:
        marker = _marker(HOLD, shard_file)
        if marker is not None:
            marker.touch()
            time.sleep(HOLD_SECONDS)
    if row == rows // 2:
        marker = _marker(FAULT, shard_file)
        if marker is not None and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
