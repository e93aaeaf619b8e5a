"""Reading the shards: manifest, samples in key order, and the training stream of batches.

A dataset folder (written by ``python -m pipeline render``) holds ``manifest.json`` and tars
``<split>-NNNNNN.tar``; one sample is the tar members ``<key>.burst.npy`` (uint8 (N, H, W, 3)
sRGB), ``<key>.target.png`` (uint8 (H, W, 3) sRGB) and ``<key>.json`` (the sampled parameters).
The format is pipeline.format's: the manifest is read by its ``read_manifest``, tars by its
``iter_shard`` (streamed with tarfile, regular members of the shard's own keys only) and samples
decoded by its ``decode_sample`` (shapes and sizes against the manifest before anything is
allocated, Pillow's decompression-bomb limit kept): nothing is ever unpickled. Every read of a
shard (training, validation, evaluation) first checks its size and sha256 against the manifest
(``split_shards``, ``read_shard``), so a flipped byte inside a burst is a bad shard, not silent
noise. (webdataset's public ``WebDataset`` reads the same tars; the trainer does not need it.)
The dataset may be a folder or a URL (http(s) with the standard library, s3://, gs://, ... through
fsspec): the same reader fetches each shard whole, checks its sha256, then reads it.

The training stream is a pure function of (seed, rank, step), so a resumed run sees exactly the
batches it would have seen, and every DDP rank runs the same number of steps:

    step s of rank r ──► reader slot j = r·W + (s mod W), its k = s div W -th batch
    reader slot j    ──► rounds of R batches; round m draws shards (with replacement) from the
                         slot's own shards with rng(seed, j, m), decodes their samples into a
                         shuffle buffer and emits exactly R·batch_size samples
    batch s          ──► burst length n from rng(seed, s) (the same on every rank), crop, flip,
                         rotation and frame subset/order of each sample from rng(seed, r, s)

W is the number of DataLoader workers per rank; the DataLoader asks its workers round-robin, so
worker w of a loader started at step s0 serves steps s0+w, s0+w+W, ..., all of one slot. Slots
read disjoint shards (shards[j::ranks·W]); with more slots than shards every slot reads every
shard but keeps only the samples whose index in the split is j mod ranks·W.

Why rounds: a shuffle buffer's content depends on everything read before it, so a stream with one
endless buffer could only be restored by replaying it from step 0. A round starts from an empty
buffer, so resuming replays at most one round (R·batch_size samples, >= 512 and >= 8 buffers'
worth) per worker; the samples left in the buffer at a round's end (<= 1/8 of those read) are
dropped.

Every subset starts with stored frame 0, the burst's reference. For a model of geometry "mean"
(the default) the target is cut at the mean residual shift of the frames drawn (``augment``,
``shifted_crop``), so the output geometry follows from the frames alone. For a model with
``guide = "fba"`` or ``base = "select_fba"`` every batch also carries "guide": the FBA of each sample's chosen frames over
the whole stored window (as evaluation and deblur compute it over the whole image), float32
(B, crop, crop, 3), cut and flipped like the burst.

Bursts stay uint8 (B, n, crop, crop, 3) on the way to the device (targets are uint8, or float32
0..255 when moved by a sub-pixel shift); the train loop converts them to float there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from common.config import ConfigError
from pipeline import format as fmt
from pipeline.format import DataError, Manifest, read_manifest
from trainer.fba import fba_frames

ROUND_MIN_SAMPLES = 512  # a round emits at least this many samples and 8 shuffle buffers' worth

# tags that keep the seed sequences of the different random streams apart
_TAG_ROUND, _TAG_LENGTH, _TAG_AUGMENT = 0x5EED01, 0x5EED02, 0x5EED03


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Shard:
    """One tar of a split, as the manifest lists it."""

    path: Path | str  # a URL string for a dataset read over a URL (pipeline.format.is_url)
    samples: int
    bytes: int
    first: int  # index in the split (key order) of the shard's first sample
    sha256: str | None = None  # hex digest the manifest lists (None: not checked)

    @property
    def name(self) -> str:
        return fmt.location_name(self.path)


def stored_shape(manifest: Manifest) -> tuple[int, int]:
    """(frames, size) stored per sample: bursts are uint8 (frames, size, size, 3)."""
    return manifest.frames, manifest.size


def split_shards(data_dir: str | Path, manifest: Manifest, split: str, on_bad_shard: str = "error") -> list[Shard]:
    """The shards of ``split`` in key order, each checked to exist with the size the manifest lists.

    An unknown split raises DataError. A missing or wrong-size file raises DataError naming it,
    or with ``on_bad_shard="skip"`` is left out with a warning (the caller sees fewer shards).

    ``data_dir`` may be a dataset URL (``pipeline.format.is_url``: http(s), or any fsspec URL): its
    shards are then listed without asking the server for each; a missing, truncated or changed one
    is found when it is read (``read_shard``: fetched whole and hashed before its first sample),
    an error or, with "skip", a skipped shard counted by the reader.
    """
    data_dir = fmt.as_location(data_dir)
    shards = []
    for entry in manifest.shards(split):
        shard = Shard(fmt.join(data_dir, entry.file), entry.samples, entry.bytes, entry.first, entry.sha256)
        if fmt.is_url(data_dir):  # no request per shard up front: reading it checks its sha256 first
            shards.append(shard)
            continue
        if not shard.path.is_file():
            problem = f"shard {shard.path}: file missing"
        elif (size := shard.path.stat().st_size) != shard.bytes:
            problem = f"shard {shard.path}: {size} bytes, the manifest lists {shard.bytes} (truncated or replaced)"
        else:
            shards.append(shard)
            continue
        if on_bad_shard != "skip":
            raise DataError(problem)
        _warn(f"skipping {problem}")
    if not shards:
        raise DataError(f"{data_dir}: split '{split}' has no readable shards")
    return shards


def check_against_manifest(cfg, manifest: Manifest) -> None:
    """Rules of a TrainConfig that need the dataset; ConfigError naming the key, before any work."""
    t = cfg.train
    for key in ("train", "val"):
        split = getattr(cfg.data, key)
        if split not in manifest.splits:
            raise ConfigError(f"data.{key}: the dataset has no split '{split}' (has: {', '.join(sorted(manifest.splits))})")
    frames, size = stored_shape(manifest)
    if t.crop > size:
        raise ConfigError(f"train.crop ({t.crop}) is larger than the stored size ({size} px)")
    if t.max_frames > frames:
        raise ConfigError(f"train.max_frames ({t.max_frames}) is more than the stored frames ({frames})")
    if max(t.val_frames) > frames:
        raise ConfigError(f"train.val_frames {t.val_frames} asks for more than the stored frames ({frames})")
    val_count = manifest.split(cfg.data.val).samples
    if t.val_samples > val_count:
        raise ConfigError(f"train.val_samples ({t.val_samples}) is more than split '{cfg.data.val}' holds ({val_count})")


# ----------------------------------------------------------------------------- samples


def read_shard(shard: Shard) -> Iterator[dict]:
    """Raw samples of one tar in stored order: {"__key__": str, "burst.npy": bytes, ...}
    (``pipeline.format.iter_shard``; messages start with ``shard <path>``).

    Raises DataError naming the shard, before yielding anything, when its sha256 differs from the
    manifest's; and, mid-shard, when the tar is unreadable, holds a member that is not a regular
    file or not a member of this shard's samples, or holds a number of samples other than the
    manifest lists (tarfile ends silently at a corrupt header mid-file).
    """
    # The whole file is hashed before its first sample is yielded: a sample already handed to the
    # training loop cannot be recalled, so a shard found corrupt only at its end (hashing the bytes
    # as the tar is read) would have trained on its bad samples, and skip mode would count as
    # skipped a shard that was used. Measured on a 100 MB shard in the page cache (busy 2-core CPU,
    # bench/bench_shard_hash.py, pipeline.format.iter_shard reading with tarfile "r:"): sha256
    # ~75 ms (1.3 ms per sample), reading its tar ~25 ms, reading + decoding ~65 ms; hashing first
    # (one more pass, from the page cache) ~100 ms against ~80 ms hashing while reading, 20 ms per
    # shard for the guarantee. It runs in the DataLoader workers, off the training loop's thread.
    return fmt.iter_shard(shard.path, label=f"shard {shard.path}", sha256=shard.sha256, samples=shard.samples,
                          first=shard.first)


def decode_sample(raw: dict, shard: Shard, frames: int | None = None, size: int | None = None) -> dict:
    """Decode one raw sample -> {"key", "burst": uint8 (N,H,W,3) sRGB, "target": uint8 (H,W,3) sRGB, "meta": dict}.

    ``pipeline.format.decode_sample``: exactly the members, dtypes and shapes (N == frames and
    H == W == size when given) checked before allocating; raises DataError naming the shard and
    key. Never unpickles. "meta" holds the sampled parameters (the json member).
    """
    sample = fmt.decode_sample(raw, f"shard {shard.path}", frames, size)
    sample["meta"] = sample.pop("params")
    return sample


def iter_samples(data_dir: str | Path, split: str) -> Iterator[dict]:
    """Every sample of ``split`` in key order: dict(key=str, burst=uint8 (N,H,W,3) sRGB,
    target=uint8 (H,W,3) sRGB, meta=dict of the sampled parameters).

    Raises FileNotFoundError / DataError (one line naming the shard) on missing or bad data.
    """
    manifest = read_manifest(data_dir)
    frames, size = stored_shape(manifest)
    for shard in split_shards(data_dir, manifest, split):
        # tars are written in key order; sorting one shard's keys makes the order independent of that
        raws = sorted(read_shard(shard), key=lambda r: r["__key__"])
        for raw in raws:
            yield decode_sample(raw, shard, frames, size)


def load_val_set(data_dir: str | Path, split: str, count: int) -> dict:
    """The first ``count`` samples of ``split`` in key order, stacked, for validation.

    Returns {"keys": list[str], "burst": uint8 (count, N, H, W, 3), "target": uint8 (count, H, W, 3),
    "shift": float64 (count, N, 2) the frames' residual shifts}.
    """
    keys, bursts, targets, shifts = [], [], [], []
    for sample in iter_samples(data_dir, split):
        keys.append(sample["key"])
        bursts.append(sample["burst"])
        targets.append(sample["target"])
        shifts.append(frame_shifts(sample["meta"], sample["burst"].shape[0]))
        if len(keys) == count:  # before asking for more: the next shard is not read (nor checked)
            break
    if len(keys) < count:
        raise DataError(f"{data_dir}: split '{split}' has {len(keys)} samples, {count} wanted for validation")
    return {"keys": keys, "burst": np.stack(bursts), "target": np.stack(targets), "shift": np.stack(shifts)}


# ----------------------------------------------------------------------------- augmentation


LANCZOS = 3  # taps on each side of the Lanczos kernel that moves targets by a sub-pixel amount


def lanczos_weights(t: float) -> np.ndarray:
    """Weights of samples k = -2..3 (float64 (6,), sum 1) interpolating a signal at k = t, t in [0, 1)."""
    x = t - np.arange(1 - LANCZOS, LANCZOS + 1)
    w = np.sinc(x) * np.sinc(x / LANCZOS)
    return w / w.sum()


def shifted_crop(image: np.ndarray, y0: int, x0: int, crop: int, shift: tuple[float, float]) -> np.ndarray:
    """The crop×crop window at (y0, x0) of ``image`` moved by ``shift`` = (dx, dy) px: float32
    out[y, x] = image(y0 + y - dy, x0 + x - dx), Lanczos-3 interpolated (exact for integer
    shifts). image: uint8 or float (H, W, 3); the window, grown by |shift| + 3 px, must lie inside.

    A burst's frame f shows the scene moved by its residual shift s_f (its kernel's centroid);
    the target of a fully permutation-invariant model is the scene at the mean shift of the frames
    it is given, so that the output geometry follows from the frames alone.
    """
    out = image
    for axis, (start, d) in ((0, (y0, shift[1])), (1, (x0, shift[0]))):
        q = start - d  # the source coordinate of the window's first row/column
        i = int(np.floor(q))
        t = q - i
        lo = i - (LANCZOS - 1)
        if lo < 0 or i + crop + LANCZOS > image.shape[axis]:
            raise ValueError(f"shifted crop at {start} (shift {d:+.2f}) leaves the {image.shape[axis]} px image")
        if t == 0.0:
            out = np.take(out, np.arange(i, i + crop), axis=axis).astype(np.float32)
            continue
        w = lanczos_weights(t).astype(np.float32)
        acc = np.zeros(out.shape[:axis] + (crop,) + out.shape[axis + 1:], np.float32)
        for k, wk in enumerate(w):
            acc += wk * np.take(out, np.arange(lo + k, lo + k + crop), axis=axis)
        out = acc
    if np.issubdtype(image.dtype, np.integer):  # Lanczos rings a little past the range at edges
        np.clip(out, 0.0, float(np.iinfo(image.dtype).max), out=out)
    return out


def frame_shifts(meta: dict, frames: int) -> np.ndarray:
    """float64 (frames, 2): each stored frame's residual shift (dx, dy) px from a sample's json
    (zeros for datasets rendered without misalignment)."""
    shift = np.asarray(meta.get("shift", np.zeros((frames, 2))), dtype=np.float64)
    if shift.shape != (frames, 2) or not np.isfinite(shift).all():
        raise DataError(f"sample {meta.get('key', '?')}: json 'shift' is not {frames} finite (dx, dy) pairs")
    return shift


def geometry_target(target: np.ndarray, shifts: np.ndarray, geometry: str) -> np.ndarray:
    """The image an output of a model with ``geometry`` is scored against, for frames whose
    residual shifts are ``shifts`` (n, 2): the stored target itself for "reference" (frame 0, the
    reference, has the target's geometry) or when the frames are registered; for "mean", the
    target moved to the frames' mean shift (float32, 0..255; the borders, which the shift would
    bring in from outside the stored crop, are mirrored)."""
    m = shifts.mean(axis=0)
    if geometry != "mean" or not m.any():
        return target
    pad = int(np.ceil(np.abs(m).max())) + LANCZOS
    padded = np.pad(target, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return shifted_crop(padded, pad, pad, target.shape[0], (float(m[0]), float(m[1])))


def reference_subset(rng: np.random.Generator, stored: int, n: int) -> np.ndarray:
    """n stored-frame indices: 0 (the reference: the frame the others were registered to, with
    the target's geometry), then n - 1 of frames 1..stored-1 in random order. int64 (n,)."""
    return np.concatenate([[0], 1 + rng.permutation(stored - 1)[:n - 1]]).astype(np.int64)


def augment(burst: np.ndarray, target: np.ndarray, n: int, crop: int, rng: np.random.Generator,
            shifts: np.ndarray | None = None, guide: bool = False) -> tuple[np.ndarray, ...]:
    """One random crop/flip/rotation applied jointly to burst and target, and n of the frames.

    burst: uint8 (N, H, W, 3), target: uint8 (H, W, 3) -> burst uint8 (n, crop, crop, 3) made of
    stored frame 0 (the burst's reference, whose geometry the target has) followed by a random
    subset of n - 1 of the other frames in random order (``reference_subset``), target uint8
    (crop, crop, 3). A horizontal flip and k·90° rotations give all 8 symmetries of the square
    with equal probability.

    ``shifts`` (N, 2), the frames' residual shifts, given for a model of geometry "mean": the
    target is then cut at the mean shift of the chosen frames (``shifted_crop``, float32 0..255),
    and the crop keeps |mean shift| + 3 px away from the borders so that it stays exact.

    ``guide`` (for a model that uses FBA, ``ModelConfig.uses_fba``): also return, third, the Fourier Burst
    Accumulation of the n chosen frames over the whole stored window (as ``evaluate`` and
    ``deblur`` compute it over the whole image), cut and flipped like the burst: float32
    (crop, crop, 3) in [0, 1]. The random draws are the same with and without it.
    """
    frames, h, w, _ = burst.shape
    order = reference_subset(rng, frames, n)
    m = shifts[order].mean(axis=0) if shifts is not None else np.zeros(2)
    margin = int(np.ceil(np.abs(m).max())) + LANCZOS if m.any() else 0
    y = margin + int(rng.integers(h - crop + 1 - 2 * margin))
    x = margin + int(rng.integers(w - crop + 1 - 2 * margin))
    flip, k = bool(rng.integers(2)), int(rng.integers(4))
    b = burst[order, y:y + crop, x:x + crop]
    t = shifted_crop(target, y, x, crop, (float(m[0]), float(m[1]))) if m.any() else target[y:y + crop, x:x + crop]
    out = [b, t]
    if guide:
        out.append(fba_frames(burst[order])[0].permute(1, 2, 0).numpy()[y:y + crop, x:x + crop])
    if flip:
        out = [b[:, :, ::-1]] + [a[:, ::-1] for a in out[1:]]
    out = [np.rot90(out[0], k, axes=(1, 2))] + [np.rot90(a, k, axes=(0, 1)) for a in out[1:]]
    return tuple(np.ascontiguousarray(a) for a in out)


def burst_length(seed: int, step: int, lo: int, hi: int) -> int:
    """Frames in every burst of batch ``step``: uniform in lo..hi, the same on every rank."""
    return int(np.random.default_rng([seed, _TAG_LENGTH, step]).integers(lo, hi + 1))


# ----------------------------------------------------------------------------- training stream


class TrainStream(torch.utils.data.IterableDataset):
    """Batches for steps start_step..steps-1 of one rank; see the module docstring.

    Each item is a dict: "burst" uint8 tensor (B, n, crop, crop, 3) sRGB, "target" uint8 tensor
    (B, crop, crop, 3) sRGB, "step" int, "keys" list[str], "shards" list[str] (file of each
    sample), "reader" int (slot), "skipped_shards"/"skipped_samples" int (counted so far by
    that reader with on_bad_shard="skip").
    """

    def __init__(self, data_dir: str | Path, split: str, *, steps: int, batch_size: int, seed: int,
                 crop: int, min_frames: int, max_frames: int, shuffle_buffer: int,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 on_bad_shard: str = "error", geometry: str = "mean", guide: bool = False):
        manifest = read_manifest(data_dir)
        self.frames, self.size = stored_shape(manifest)
        if crop > self.size or max_frames > self.frames:
            raise ConfigError(f"crop {crop} / max_frames {max_frames} exceed the stored {self.size} px / {self.frames} frames")
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self.crop, self.min_frames, self.max_frames = crop, min_frames, max_frames
        self.shuffle_buffer, self.on_bad_shard = shuffle_buffer, on_bad_shard
        self.geometry = geometry  # the model's output geometry (model.geometry): where targets are cut
        self.guide = guide  # model.uses_fba: every batch also carries "guide", the FBA of each burst
        self.num_workers = num_workers  # DataLoader processes; 0 reads in the main process
        self.workers = max(1, num_workers)  # readers per rank
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        samples_per_round = max(ROUND_MIN_SAMPLES, 8 * shuffle_buffer)
        self.round_batches = -(-samples_per_round // batch_size)

        shards = split_shards(data_dir, manifest, split, on_bad_shard)
        readers = world_size * self.workers
        if len(shards) >= readers:
            self.mode = "shards"
            self.slot_shards = {j: shards[j::readers] for j in range(readers)}
            self.note = f"{readers} readers ({world_size} rank(s) × {self.workers}) read disjoint shards of {len(shards)}"
        else:
            self.mode = "samples"
            self.slot_shards = {j: shards for j in range(readers)}
            owned = np.zeros(readers, int)  # samples each slot keeps (shards left out in skip mode hold none)
            for shard in shards:
                np.add.at(owned, np.arange(shard.first, shard.first + shard.samples) % readers, 1)
            if not owned.all():
                raise DataError(f"{data_dir}: split '{split}' leaves reader {int(np.argmin(owned))} of {readers} "
                                f"({world_size} rank(s) × {self.workers} worker(s)) without samples; "
                                "use fewer workers or ranks")
            self.note = (f"{readers} readers ({world_size} rank(s) × {self.workers}) but only {len(shards)} shards: "
                         f"every reader reads every shard and keeps the samples with index ≡ its slot mod {readers}")
        self.readers = readers

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def slot(self, step: int) -> int:
        """The reader slot that serves ``step`` on this rank."""
        return self.rank * self.workers + step % self.workers

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"TrainStream built for {self.workers} workers is read by {workers}")
        return self.iter_worker(worker)

    def iter_worker(self, worker: int) -> Iterator[dict]:
        """The batches worker ``worker`` of this rank serves: steps start+worker, start+worker+W, ..."""
        first = self.start_step + worker
        if first >= self.steps:
            return
        slot = self.slot(first)
        state = _ReaderState()
        samples = self._slot_samples(slot, first // self.workers, state)
        for step in range(first, self.steps, self.workers):
            batch = [next(samples) for _ in range(self.batch_size)]
            yield self._collate(batch, step, slot, state)

    def _collate(self, samples: list[dict], step: int, slot: int, state: _ReaderState) -> dict:
        n = burst_length(self.seed, step, self.min_frames, self.max_frames)
        rng = np.random.default_rng([self.seed, _TAG_AUGMENT, self.rank, step])
        mean = self.geometry == "mean"
        items = [augment(s["burst"], s["target"], n, self.crop, rng, s["shift"] if mean else None, self.guide)
                 for s in samples]
        batch = {
            "burst": torch.from_numpy(np.stack([item[0] for item in items])),
            "target": torch.from_numpy(np.stack([item[1] for item in items])),
            "step": step,
            "keys": [s["key"] for s in samples],
            "shards": [s["shard"] for s in samples],
            "reader": slot,
            "skipped_shards": state.skipped_shards,
            "skipped_samples": state.skipped_samples,
        }
        if self.guide:
            batch["guide"] = torch.from_numpy(np.stack([item[2] for item in items]))
        return batch

    def _slot_samples(self, slot: int, batch_index: int, state: _ReaderState) -> Iterator[dict]:
        """Decoded samples of one slot from its ``batch_index``-th batch on, forever."""
        per_round = self.round_batches * self.batch_size
        m = batch_index // self.round_batches
        skip = (batch_index - m * self.round_batches) * self.batch_size
        while True:
            round_samples = self._round(slot, m, per_round, state)
            for _ in range(skip):  # resuming mid-round: replay the round up to the position
                next(round_samples)
            skip = 0
            yield from round_samples
            m += 1

    def _round(self, slot: int, m: int, count: int, state: _ReaderState) -> Iterator[dict]:
        """Exactly ``count`` shuffled samples: shards drawn with rng(seed, slot, m) into a buffer."""
        rng = np.random.default_rng([self.seed, _TAG_ROUND, slot, m])
        shards = self.slot_shards[slot]
        buffer: list[dict] = []
        emitted = 0
        while True:
            shard = shards[int(rng.integers(len(shards)))]
            got, errors = 0, state.skipped_shards + state.skipped_samples
            for sample in self._shard_samples(shard, slot, state):
                got += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                i = int(rng.integers(len(buffer)))
                out, buffer[i] = buffer[i], sample
                yield out
                emitted += 1
                if emitted == count:
                    return
            if not got and state.skipped_shards + state.skipped_samples > errors:  # skip mode only
                state.dead.add(shard.name)
                if len(state.dead) == len(shards):
                    raise DataError(f"reader {slot}: none of its {len(shards)} shard(s) has a readable sample "
                                    f"(first: {shards[0].path})")

    def _shard_samples(self, shard: Shard, slot: int, state: _ReaderState) -> Iterator[dict]:
        """Decoded samples of one shard that belong to ``slot``; bad ones raise, or are counted and skipped."""
        skip = self.on_bad_shard == "skip"
        raws = read_shard(shard)
        index = shard.first  # index in the split of the next sample
        while True:
            try:
                raw = next(raws)
            except StopIteration:
                return
            except DataError as e:
                if not skip:
                    raise
                state.skipped_shards += 1
                state.warn_once(shard.name, f"skipping {'the rest of ' if index > shard.first else ''}{e}")
                return
            index += 1
            if self.mode == "samples" and (index - 1) % self.readers != slot:
                continue
            try:
                sample = decode_sample(raw, shard, self.frames, self.size)
            except DataError as e:
                if not skip:
                    raise
                state.skipped_samples += 1
                state.warn_once(raw.get("__key__"), f"skipping {e}")
                continue
            sample["shard"] = shard.name
            try:
                sample["shift"] = frame_shifts(sample.pop("meta"), self.frames)  # the rest is unused in training
            except DataError as e:
                if not skip:
                    raise DataError(f"shard {shard.path}: {e}") from None
                state.skipped_samples += 1
                state.warn_once(raw.get("__key__"), f"skipping {e}")
                continue
            yield sample


@dataclass
class _ReaderState:
    """What one reader counts with on_bad_shard="skip" (reported in every batch)."""

    skipped_shards: int = 0  # shard reads cut short by a bad tar
    skipped_samples: int = 0  # samples with missing/unreadable members
    warned: set = field(default_factory=set)  # each problem is printed once, not on every re-read
    dead: set = field(default_factory=set)  # shards that gave this reader nothing but errors

    def warn_once(self, what, message: str) -> None:
        if what not in self.warned:
            self.warned.add(what)
            _warn(message)


def train_loader(stream: TrainStream, pin_memory: bool = False) -> Iterator[dict]:
    """The batches of ``stream`` in step order, read by its number of DataLoader workers.

    A DataError raised in a worker process comes back with its own one-line message (the
    DataLoader wraps it in a multi-line "Caught DataError in DataLoader worker" text).
    """
    workers = stream.num_workers
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if workers else None)
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            if len(lines) > 1 and lines[0].startswith("Caught "):
                raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
            raise
        yield batch
