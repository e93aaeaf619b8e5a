"""Checkpoint files: one way to write them (atomically) and one way to read them (one policy).

Every checkpoint the trainer reads — ``--resume`` from last.pt, ``trainer.model.load`` for
evaluate / deblur / export — goes through ``load_checkpoint``: ``torch.load(path,
map_location="cpu", weights_only=True)``, so nothing but tensors and plain containers is ever
unpickled, and every way a file can be wrong (missing, empty, truncated, not a torch file, refused
by weights_only, without the keys its use needs) becomes one ``CheckpointError`` line naming the
file and what is wrong. The CLIs print it as ``error: ...`` and exit non-zero.

``read_config`` (the resolved config alone) and ``peek`` (the small entries: step, best PSNR)
apply the same policy through the same ``torch.load``, with ``mmap=True``: the file is mapped and
its tensors (weights, optimizer state) are never read, only the pickled structure is.

Writes go to a temporary file in the same folder and are renamed over the target, so a crash never
leaves a half-written checkpoint (or config, or summary) where the complete one was.
"""

from __future__ import annotations

import pickle
import platform
import warnings
from pathlib import Path
from typing import Iterable

import torch

from common.errors import UserError, one_line
from common.files import atomic_path

INFERENCE_KEYS = ("model", "config")  # what trainer.model.load needs
TRAINING_KEYS = ("model", "optimizer", "step", "config")  # what --resume needs

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive (torch >= 1.6)


class CheckpointError(UserError):
    """A file that cannot be used as a checkpoint; the message is one line naming it and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: not a burst-deblur checkpoint ({reason})")


# ----------------------------------------------------------------------------- writing


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save ``obj`` to a temporary file in the same folder, then rename it over ``path``.

    ``obj`` should hold only what ``torch.load(weights_only=True)`` accepts (tensors, dicts,
    lists, numbers, strings), or ``load_checkpoint`` will refuse it."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def software_versions() -> dict[str, str]:
    """What a checkpoint records as "versions": torch, numpy, python and the pipeline's code
    version (``pipeline.run.code_version``, as manifests record it). Strings only, so that
    ``torch.load(weights_only=True)`` reads them."""
    import numpy as np

    from pipeline.run import code_version

    return {"torch": str(torch.__version__), "numpy": str(np.__version__),
            "python": platform.python_version(), "code": code_version()}


# ----------------------------------------------------------------------------- reading


def _load_failure(path: Path, e: BaseException) -> str:
    """Why torch.load failed, in a few words (torch raises RuntimeError, EOFError, KeyError,
    UnpicklingError, ... with multi-line texts)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        # the useful part is the line after "WeightsUnpickler error:", e.g.
        # "Unsupported global: GLOBAL mymodule.MyClass was not an allowed global by default."
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = detail[0].split(" was not an allowed global")[0].rstrip(".") if detail else ""
        return ("refused by torch.load(weights_only=True): it holds objects other than tensors and plain data"
                + (f", {detail}" if detail else ""))
    with open(path, "rb") as f:
        head = f.read(4)
    size = path.stat().st_size
    detail = f"{type(e).__name__}: {one_line(e)[:120]}"
    if head == _ZIP_MAGIC:
        return f"truncated or damaged torch file, {size} bytes; torch.load failed with {detail}"
    return f"not a torch file, {size} bytes; torch.load failed with {detail}"


def _check_keys(path: Path, ckpt: dict, require: Iterable[str]) -> None:
    for key in require:
        value = ckpt.get(key)
        if key in ("model", "optimizer") and not isinstance(value, dict):
            raise CheckpointError(path, f"no '{key}' state dict")
        elif key == "step" and (type(value) is not int or value < 0):
            raise CheckpointError(path, "no 'step' count" if value is None else f"'step' is {value!r:.40}, not a count")
        elif key == "config" and (not isinstance(value, dict) or not isinstance(value.get("model"), dict)):
            raise CheckpointError(path, "no 'config' dict with a 'model' table")
        elif key not in ckpt:
            raise CheckpointError(path, f"no '{key}'")


def _load(path: str | Path, require: Iterable[str], lazy: bool) -> dict:
    """The one torch.load of a checkpoint, and every check of the file (see load_checkpoint).
    ``lazy``: memory-map the file, so that its tensors are not read (torch.load's mmap=True, which
    only zip files allow; a legacy file is read whole)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file, 0 bytes")
    if lazy:
        with open(path, "rb") as f:
            lazy = f.read(4) == _ZIP_MAGIC
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error line says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except Exception as e:  # torch raises many types here (zip, pickle, weights_only, EOF, KeyError)
        raise CheckpointError(path, _load_failure(path, e)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"holds a {type(ckpt).__name__}, not a dict with 'model' and 'config'")
    _check_keys(path, ckpt, require)
    return ckpt


def load_checkpoint(path: str | Path, require: Iterable[str] = INFERENCE_KEYS) -> dict:
    """The dict saved in checkpoint ``path``, on the CPU, loaded with ``weights_only=True``.

    ``require``: keys that must be there with the right type — INFERENCE_KEYS ("model" state
    dict, "config" dict with a "model" table) or TRAINING_KEYS (also "optimizer" state dict and
    an int "step"). Raises CheckpointError (a one-line ValueError naming the file) for a missing,
    empty, truncated or foreign file, one weights_only refuses, or one without those keys.
    Tensors stay on the CPU (optimizer state included) until the caller moves them.
    """
    return _load(path, require, lazy=False)


def peek(path: str | Path, require: Iterable[str] = INFERENCE_KEYS) -> dict:
    """The dict saved in checkpoint ``path`` with its tensors memory-mapped, not read: for the
    small entries ("step", "best_val_psnr", "config"). The same checks and errors as
    ``load_checkpoint`` (``require`` included); do not keep the tensors (they map the file)."""
    return _load(path, require, lazy=True)


def read_config(path: str | Path, require: Iterable[str] = INFERENCE_KEYS) -> dict:
    """The resolved config (a plain dict, as ``trainer.config.to_dict`` wrote it) saved in
    checkpoint ``path``, without reading its weights or optimizer state. ``require``: checked as
    ``load_checkpoint`` does, so that e.g. ``--resume`` (TRAINING_KEYS) refuses a last.pt it could
    not continue before anything else is done. Raises CheckpointError."""
    return peek(path, require)["config"]
