"""The training loop: `python -m trainer train --config configs/train/default.toml --data DIR --out DIR`.

Reads top to bottom like nanoGPT's: set up (devices, DDP, data, model, optimizer, resume), then one
loop over steps — lr from a pure function of the step, forward, loss, backward, clip, optimizer
step, log, validate every val_every steps, checkpoint every ckpt_every steps — and stop at
train.steps. Losses stay on the device; the host waits for them (and checks for NaN/inf) only at
log, validation and checkpoint steps, so ordinary steps queue work without a sync. It counts steps,
not epochs: the stream of batches is endless and resampled.

The state is in small objects passed explicitly: ``Run`` (where and how this process trains,
fixed), ``Progress`` (step, best PSNR, latest validation: what checkpoints record),
``LossMonitor`` (the on-device losses and the NaN check), ``Throughput`` and ``Reads`` (what the
log lines and the summary report). Setup, logging, validation, checkpoints and the summary are
named functions of them (``build_training``, ``restore``, ``open_batches``, ``open_validation``,
``log_training``, ``validation_step``, ``save_checkpoint``, ``save_last``, ``finish``).

Exact resume: batch s of rank r is a pure function of (seed, r, s) (see trainer/data.py), the lr
a pure function of s, and nothing in the loop draws from a random state, so ``--resume`` from the
checkpoint of step s continues with the very batches and updates a straight run would make.

Run folder (only rank 0 writes). Its files describe the run's last good state:
- last.pt: every ckpt_every steps and at the end; never after a NaN/inf loss (TrainingDiverged).
- config.toml: the resolved config of last.pt (``--config`` reads it back), written right after
  each last.pt and only then, so settings that diverge before their first checkpoint (a
  ``--resume --set train.lr=...`` that blows up) never replace the config of the good one.
- best.pt: the best mean validation PSNR over val_frames; a resumed run must beat the PSNR stored
  in best.pt itself (not only the bar saved in last.pt) to replace it.
- tb/: TensorBoard; a resumed run purges the events logged after last.pt's step. tb/hparams: the
  hyperparameters with the final metrics, replaced by each end of the run.
- summary.json: at the end. Resuming a run that already reached train.steps says so and writes
  nothing (summary.json keeps its validation results).
Every file is written to a temporary file and renamed (trainer/checkpoint.py), so a crash never
leaves a half-written one. Checkpoints hold only what ``torch.load(weights_only=True)`` accepts
and are read back by ``trainer.checkpoint.load_checkpoint``: a damaged last.pt is one error line.

DDP: ``torchrun --nproc_per_node=K -m trainer train ...``; NCCL on CUDA, gloo on CPU, set up from
the environment torchrun provides. Each rank reads its own shards; batch_size is per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.bundled import find_config
from common.config import ConfigError
from common.errors import UserError, one_line, run_cli
from common.files import atomic_write_bytes
from common.version import add_version
from trainer import data as data_mod
from trainer.baselines import mean_frames
from trainer.checkpoint import (TRAINING_KEYS, CheckpointError, load_checkpoint, peek, read_config, save_atomic,
                                software_versions)
from trainer.config import TrainConfig, TrainSection, load_train_config, to_dict, to_toml
from trainer.device import burst_to_input, image_to_target, resolve_device
from trainer.losses import burst_loss
from trainer.metrics import psnr, psnr_batch
from trainer.model import build_model
from trainer.model import load as load_model

DEFAULT_CONFIG = "configs/train/default.toml"  # found from any directory (common.bundled.find_config)
DEFAULT_OUT = "runs/default"


class TrainingDiverged(UserError):
    """The loss (or a validation output) became NaN or inf; training stopped (exit 1)."""

    exit_code = 1


def lr_at(step: int, t: TrainSection) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then lr · lr_decay^step ("exp",
    the paper's), or a cosine from lr down to lr_floor · lr at the last step ("cosine": it depends
    on train.steps, so resuming with more steps changes the rest of the schedule)."""
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
    if t.lr_schedule == "cosine":
        progress = step / max(t.steps - 1, 1)
        return t.lr * warm * (t.lr_floor + (1.0 - t.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return t.lr * warm * t.lr_decay**step


# ----------------------------------------------------------------------------- helpers


def setup_distributed(device_kind: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the process group when torchrun started us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return rank, world, local_rank


class RunFolderNotShared(UserError):
    """A rank of a multi-node run does not see the run folder rank 0 writes."""


def check_shared_run_folder(out_dir: Path, rank: int, world: int) -> None:
    """Every rank of a DDP run must see the run folder that rank 0 writes: with torchrun's c10d
    rendezvous any node may hold global rank 0, and a rank that resumes, or a user who looks for
    the checkpoints, must find them in ``out_dir`` wherever it runs. Rank 0 writes a marker file
    with a fresh token, every rank reads it after a barrier; when any rank cannot, every rank
    raises RunFolderNotShared (one line naming the ranks and hosts that cannot)."""
    import secrets
    import socket

    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = out_dir / f".ranks-{token[0]}"
    if rank == 0:
        with contextlib.suppress(OSError):  # reported below: rank 0 does not see the marker either
            out_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(token[0])
    dist.barrier()
    try:
        sees = marker.read_text() == token[0]
    except OSError:
        sees = False
    everyone = [None] * world
    dist.all_gather_object(everyone, (rank, socket.gethostname(), sees))
    dist.barrier()  # every rank has read it
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, host, ok in everyone if not ok]
    if blind:
        raise RunFolderNotShared(
            f"{', '.join(blind)} cannot see the run folder {out_dir} that rank 0 on {everyone[0][1]} writes; "
            "on several nodes --out must be one path on a filesystem every node shares (an absolute path "
            "on NFS, say), so that checkpoints land in one place whichever node holds rank 0")


def to_device(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 burst (B, n, H, W, 3) and target (B, H, W, 3) -> float on ``device`` in [0, 1]:
    burst (B, n, 3, H, W), target (B, 3, H, W). The conversion runs on the device."""
    burst = burst_to_input(batch["burst"], device, non_blocking=True)
    # not in place: a float target (moved to the frames' mean geometry) may be the caller's array
    target = image_to_target(batch["target"], device, non_blocking=True)
    if not channels_last:  # the permuted views are channels-last in memory already
        burst, target = burst.contiguous(), target.contiguous()
    return burst, target


def finished_summary(out_dir: Path, step: int, steps: int) -> dict | None:
    """The summary.json of a run whose last.pt is at its final step, or None (not finished, or
    killed between its last checkpoint and its summary: then the summary is written again)."""
    if step != steps:
        return None
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("step") == step else None


def best_bar(out_dir: Path, ckpt: dict, log) -> float:
    """The validation PSNR a resumed run must beat to replace best.pt: the one stored in best.pt
    (written after last.pt when a run stopped between the two), else last.pt's record; -inf when
    best.pt is unreadable, so that the next validation replaces it."""
    bar = float(ckpt.get("best_val_psnr", -math.inf))
    path = out_dir / "best.pt"
    if not path.exists():
        return bar
    try:
        return max(bar, float(peek(path).get("best_val_psnr", -math.inf)))
    except (CheckpointError, TypeError, ValueError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            log(f"warning: {one_line(e)}; the next validation replaces it")
        return -math.inf


def params_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- validation


def baseline_psnr(val: dict, lengths: list[int]) -> dict[int, float]:
    """Mean PSNR of the mean of the first n frames, per n: the bar the network must clear."""
    out = {}
    for n in lengths:
        scores = [psnr(mean_frames(b[:n] / 255.0), t / 255.0) for b, t in zip(val["burst"], val["targets"][n])]
        out[n] = float(np.mean(scores))
    return out


@torch.no_grad()
def validate(model: torch.nn.Module, val: dict, lengths: list[int], batch_size: int, device: torch.device,
             autocast, channels_last: bool, keep: int = 0) -> tuple[dict[int, dict], dict[int, torch.Tensor]]:
    """Loss and PSNR of ``model`` on the fixed validation set, for each burst length n (first n frames).

    Returns ({n: {"loss": float, "psnr": float}}, {n: first ``keep`` outputs, float (k, 3, H, W) CPU}).
    PSNR is per image on the output clamped to [0, 1], then averaged. Raises TrainingDiverged when
    an output is not finite.
    """
    was_training = model.training
    model.eval()
    results, kept = {}, {}
    count = len(val["keys"])
    for n in lengths:
        loss_sum, scores, outputs = 0.0, [], []
        for i in range(0, count, batch_size):
            batch = {"burst": torch.from_numpy(val["burst"][i:i + batch_size, :n]),
                     "target": torch.from_numpy(val["targets"][n][i:i + batch_size])}
            burst, target = to_device(batch, device, channels_last)
            with autocast():
                pred = model(burst)
            pred = pred.float()
            if not torch.isfinite(pred).all():
                raise TrainingDiverged(f"validation output with {n} frames is not finite")
            loss_sum += burst_loss(pred, target).item() * len(target)
            scores.append(psnr_batch(pred.clamp(0, 1), target).cpu())
            if sum(len(o) for o in outputs) < keep:
                outputs.append(pred.clamp(0, 1).cpu())
        results[n] = {"loss": loss_sum / count, "psnr": torch.cat(scores).clamp(max=100.0).mean().item()}
        if keep:
            kept[n] = torch.cat(outputs)[:keep]
    model.train(was_training)
    return results, kept


GRID_GAP = 4  # px of white between the panels and the rows of an image grid


def image_grid(val: dict, outputs: torch.Tensor, n: int, title: str) -> np.ndarray:
    """Rows of [frame 1 .. frame n | mean of the frames | output | target] for the first samples,
    panels apart by GRID_GAP px of white, each labelled (mean and output with their PSNR against
    the target of n frames, as ``validate`` scores them), under a ``title`` line: uint8 (H', W', 3).

    outputs: float (k, 3, H, W) in [0, 1], the outputs of the first k validation samples."""
    from PIL import Image, ImageDraw

    from common.fonts import label_font, text_size

    font = label_font(12)
    rows = []
    for i, out in enumerate(outputs):
        target = np.asarray(val["targets"][n][i], np.float64) / 255
        frames = val["burst"][i, :n]
        mean = mean_frames(frames / 255.0)
        output = out.permute(1, 2, 0).double().numpy()
        panels = [(f"frame {j + 1}", f) for j, f in enumerate(frames)]
        panels += [(f"mean of frames\n{psnr(mean, target):.2f} dB", mean),
                   (f"output\n{psnr(output, target):.2f} dB", output), ("target\n", target)]
        rows.append([(label, np.asarray(img) if img.dtype == np.uint8 else
                      (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)) for label, img in panels])
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    H, W = rows[0][0][1].shape[:2]
    cell = max([W] + [text_size(probe, label, font)[0] + 2 for label, _ in rows[0]])
    label_h = max(text_size(probe, label, font)[1] for label, _ in rows[0]) + 4
    title_h = text_size(probe, title, font)[1] + 2 * GRID_GAP
    width = max(GRID_GAP + len(rows[0]) * (cell + GRID_GAP), text_size(probe, title, font)[0] + 2 * GRID_GAP)
    grid = Image.new("RGB", (width, title_h + len(rows) * (label_h + H + GRID_GAP)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((GRID_GAP, GRID_GAP), title, fill="black", font=font)
    for r, row in enumerate(rows):
        y = title_h + r * (label_h + H + GRID_GAP)
        for c, (label, img) in enumerate(row):
            x = GRID_GAP + c * (cell + GRID_GAP)
            draw.multiline_text((x, y), label, fill="black", font=font, spacing=2)
            grid.paste(Image.fromarray(img), (x, y + label_h))
    return np.asarray(grid)


def grid_title(run: "Run", n: int, step: int) -> str:
    """The head line of a validation image grid: split, what its source is, burst length, step."""
    split = run.cfg.data.val
    source = str(run.manifest["splits"][split].get("source", "?"))
    kind = "synthetic" if source == "deadleaves" else "photographs"
    return f"val split '{split}' ({kind}, source {source}), {n} frames, step {step}: frames | mean | output | target"


# ----------------------------------------------------------------------------- the run's state


@dataclasses.dataclass(frozen=True)
class Run:
    """Where and how this process trains: fixed once set up."""

    cfg: TrainConfig
    out_dir: Path
    manifest: Mapping  # the dataset's manifest (its config hash goes into every checkpoint)
    rank: int
    world: int
    device: torch.device
    bf16: bool  # bf16 autocast for forward passes
    channels_last: bool
    log: Callable[[str], None]

    @property
    def master(self) -> bool:
        """Rank 0: the only one that validates and writes the run folder."""
        return self.rank == 0

    def say(self, message: str) -> None:
        if self.master:
            self.log(message)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


@dataclasses.dataclass
class Progress:
    """What the loop advances and every checkpoint records."""

    step: int = 0  # updates done
    best_psnr: float = -math.inf  # best mean validation PSNR (the bar best.pt must beat)
    last_val: dict = dataclasses.field(default_factory=dict)  # {n: {"loss", "psnr"}} of the latest validation
    validations: int = 0  # validations of this process (image grids every image_every of them)


class WeightAverage:
    """An exponential moving average of a model's weights (``train.ema``), kept beside it.

    After update k its weights are w <- d·w + (1 - d)·weights with d = min(ema, (1 + k) / (10 + k)),
    so the random init is forgotten within the first steps. It holds every floating-point tensor
    of the model's state dict (weight norm's parts included), in the model's memory format.
    """

    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.updates = decay, updates

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ours = [v for v in self.module.state_dict().values() if v.is_floating_point()]
        theirs = [v for v in model.state_dict().values() if v.is_floating_point()]
        torch._foreach_lerp_(ours, theirs, 1.0 - d)


class LossMonitor:
    """Training losses kept on the device between checks, so ordinary steps need no host sync.

    ``add`` records a step's loss with device ops only (its sum, and the first step whose loss is
    not finite); ``check`` is the sync point; ``reset`` starts the next log interval."""

    def __init__(self, device: torch.device, steps: int, world: int):
        self.steps, self.world = steps, world
        self.total = torch.zeros((), device=device)  # sum of this rank's losses since the last reset
        self.first_bad = torch.full((), steps, device=device)  # first step with a NaN/inf loss (steps: none)
        self.bad_loss = torch.zeros((), device=device)  # that loss
        self.count = 0  # steps since the last reset

    def add(self, value: torch.Tensor, step: int) -> None:
        newly_bad = ~torch.isfinite(value) & (self.first_bad == self.steps)
        self.first_bad.masked_fill_(newly_bad, step)
        self.bad_loss.copy_(torch.where(newly_bad, value, self.bad_loss))
        self.total.add_(value)
        self.count += 1

    def check(self, last_pt: Path) -> float:
        """On every rank at the same steps: the mean loss over ranks of the steps since the last
        reset; raises TrainingDiverged naming the first step whose loss was not finite. Called
        before any validation or checkpoint, so a diverged model is never saved."""
        bad_step = self.first_bad.clone()
        if self.world > 1:
            dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)
        if bad_step.item() < self.steps:
            value = torch.where(self.first_bad == bad_step, self.bad_loss, torch.zeros_like(self.bad_loss))
            if self.world > 1:
                dist.all_reduce(value)
            where = f"the last good checkpoint is {last_pt}" if last_pt.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss is {value.item()} at step {bad_step.item()}; stopped ({where})")
        total = self.total.clone()
        if self.world > 1:
            dist.all_reduce(total)
        return total.item() / self.world / max(self.count, 1)

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


class Throughput:
    """Training samples per second since the last log line (time spent validating and saving
    excluded) and the time left."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.t_start = self.t_log = time.time()
        self.samples = 0  # over all ranks, since the last restart

    def count(self, samples: int) -> None:
        self.samples += samples

    def rate(self, now: float) -> float:
        return self.samples / max(now - self.t_log, 1e-9)

    def eta(self, now: float, step: int, steps: int) -> float:
        return (now - self.t_start) / (step - self.start_step) * (steps - step)

    def restart(self) -> None:
        """After a log line: count afresh."""
        self.samples = 0
        self.t_log = time.time()

    def exclude(self) -> None:
        """After a validation or a checkpoint: that time is not training throughput."""
        self.t_log = time.time()


class Reads:
    """The shards this rank read and the readers' (cumulative) skip counts."""

    def __init__(self):
        self.shards: set[str] = set()
        self.skipped: dict[int, tuple[int, int]] = {}  # reader -> (shards, samples) skipped so far

    def add(self, batch: dict) -> None:
        self.shards.update(batch["shards"])
        self.skipped[batch["reader"]] = (batch["skipped_shards"], batch["skipped_samples"])

    def skipped_totals(self) -> tuple[int, int]:
        return sum(s for s, _ in self.skipped.values()), sum(s for _, s in self.skipped.values())


# ----------------------------------------------------------------------------- setup


def make_run(cfg: TrainConfig, out_dir: Path, manifest: Mapping, device: torch.device, rank: int, world: int,
             local_rank: int, log) -> Run:
    """The Run of this process: on CUDA, rank r of a DDP run uses cuda:<local rank>."""
    t = cfg.train
    kind = device.type
    if kind == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
    return Run(cfg=cfg, out_dir=out_dir, manifest=manifest, rank=rank, world=world, device=device,
               bf16=t.amp == "bf16" or (t.amp == "auto" and kind == "cuda"),
               channels_last=t.channels_last == "on" or (t.channels_last == "auto" and kind == "cuda"),
               log=log)


# (base of the train.init file, base of the config) pairs a fine-tune may grow: the new heads are
# added at their init (trainer/model.py)
GROWS = {("mean", "select"), ("mean", "select_fba"), ("select", "select_fba")}


def initial_weights(cfg: TrainConfig) -> dict | None:
    """The state dict of ``train.init`` (None when it is empty), checked before any work: the file
    loads as a model (``trainer.model.load``: weights_only) and its [model] equals ``cfg.model``,
    but for a base that ``cfg.model`` grows (GROWS: the new heads at their init added)."""
    if not cfg.train.init:
        return None
    path = Path(cfg.train.init)
    if not path.is_file():
        raise FileNotFoundError(f"train.init: {path} does not exist")
    model = load_model(path)  # CheckpointError (one line) for a file that is not a model
    # the one change a fine-tune may make: a base grows a selecting head (zero logits: the grown
    # model computes exactly what the file's does) or the FBA candidate (nearly: FBA_LOGIT_INIT),
    # or a "select_fba" base grows the misalignment cue of FBA's logit (zero: exactly)
    grows = (model.cfg.base, cfg.model.base) in GROWS
    cue = cfg.model.fba_cue and not model.cfg.fba_cue
    grown = dataclasses.replace(model.cfg, base=cfg.model.base if grows else model.cfg.base,
                                fba_cue=model.cfg.fba_cue or cue)
    if grown != cfg.model:
        raise ConfigError(f"train.init: the [model] of {path} ({to_dict(model.cfg)}) differs from this "
                          f"config's ({to_dict(cfg.model)}); a fine-tune keeps the model it starts from "
                          "(or grows its base: 'mean' into 'select' or 'select_fba', 'select' into 'select_fba'; "
                          "or adds model.fba_cue)")
    state = model.state_dict()
    if grows or cue:
        with torch.random.fork_rng(devices=[]):
            state = {**build_model(cfg.model).state_dict(), **state}  # the new heads at their init
    return state


def build_training(run: Run, init: dict | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (the same init on every rank; DDP broadcasts rank 0's anyway), on the run's
    device, and its optimizer. ``init``: a state dict to start from instead of the seed's init."""
    t = run.cfg.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model = build_model(run.cfg.model)
    if init is not None:
        model.load_state_dict(init)
    model.to(run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer_cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[t.optimizer]
    trained = trainable_parameters(model, t.trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    return model, optimizer_cls([p for name, p in model.named_parameters() if name in trained], lr=t.lr)


def trainable_parameters(model: torch.nn.Module, prefixes: list[str]) -> set[str]:
    """Names of the parameters ``train.trainable`` selects: all for [], else those equal to one of
    ``prefixes`` or under it ("head" selects "head.0.bias", not "header.x"). ConfigError when a
    prefix selects nothing (a typo would silently train nothing)."""
    names = [name for name, _ in model.named_parameters()]
    if not prefixes:
        return set(names)
    chosen = set()
    for prefix in prefixes:
        hits = {name for name in names if name == prefix or name.startswith(prefix + ".")}
        if not hits:
            tops = sorted({name.split(".")[0] for name in names})
            raise ConfigError(f"train.trainable: '{prefix}' names no parameter of this model "
                              f"(its top-level modules: {', '.join(tops)})")
        chosen |= hits
    return chosen


def restore(run: Run, ckpt: dict | None, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[Progress, WeightAverage | None]:
    """Load a resumed run's state into ``model`` and ``optimizer``; its Progress (a fresh one
    without ``ckpt``) and its weight average (None when ``train.ema`` is 0). A checkpoint of a run
    with an average holds the average as "model" and the trained weights as "train_model"; a run
    resumed with ``train.ema`` newly set starts its average from the trained weights.
    CheckpointError when the state does not fit the model."""
    t = run.cfg.train
    if ckpt is None:
        return Progress(), (WeightAverage(model, t.ema) if t.ema > 0 else None)
    try:  # the model config was compared already: a state that does not fit is a damaged file
        model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
        average = None
        if t.ema > 0:
            average = WeightAverage(model, t.ema)
            if "train_model" in ckpt:
                average.module.load_state_dict(ckpt["model"])
                average.updates = int(ckpt.get("ema_updates", 0))
        optimizer.load_state_dict(ckpt["optimizer"])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["torch"])
        progress = Progress(step=int(ckpt["step"]), best_psnr=float(ckpt.get("best_val_psnr", -math.inf)),
                            last_val={int(n): r for n, r in ckpt.get("val", {}).items()})
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())  # load_state_dict lists the mismatches over many lines
        raise CheckpointError(run.out_dir / "last.pt", f"its state does not fit the model: {detail[:240]}") from None
    old = ckpt["data"] if isinstance(ckpt.get("data"), dict) else {}
    if (old.get("world_size"), old.get("readers_per_rank")) != (run.world, max(1, t.num_workers)):
        run.say(f"note: the checkpoint was trained with {old.get('world_size')} rank(s) × "
                f"{old.get('readers_per_rank')} reader(s), this run uses {run.world} × {max(1, t.num_workers)}: "
                "the batches from here on differ from an uninterrupted run")
    return progress, average


def wrap_model(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """What the training steps call: ``model`` under DDP (several ranks) and torch.compile (when
    set); checkpoints and validation use the bare ``model``."""
    wrapped = model
    if run.world > 1:
        wrapped = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return torch.compile(wrapped) if run.cfg.train.compile else wrapped


def open_batches(run: Run, start_step: int) -> tuple[data_mod.TrainStream, Iterator[dict]]:
    """This rank's endless stream of training batches, cut at train.steps, from ``start_step``
    on, and the generator of its batches."""
    cfg, t = run.cfg, run.cfg.train
    stream = data_mod.TrainStream(
        cfg.data.dir, cfg.data.train, steps=t.steps, batch_size=t.batch_size, seed=t.seed, crop=t.crop,
        min_frames=t.min_frames, max_frames=t.max_frames, shuffle_buffer=t.shuffle_buffer,
        num_workers=t.num_workers, rank=run.rank, world_size=run.world, start_step=start_step,
        on_bad_shard=t.on_bad_shard, geometry=cfg.model.geometry, guide=cfg.model.uses_fba)
    return stream, data_mod.train_loader(stream, pin_memory=run.device.type == "cuda")


def open_validation(run: Run, resumed: bool, step: int) -> tuple[dict | None, dict[int, float], object | None]:
    """Rank 0: the fixed validation set (with its targets per burst length), the mean-of-frames
    baseline PSNR per length, and the TensorBoard writer (a resumed run purges the events an
    interrupted run logged after last.pt's step). Other ranks: (None, {}, None)."""
    if not run.master:
        return None, {}, None
    cfg, t = run.cfg, run.cfg.train
    val = data_mod.load_val_set(cfg.data.dir, cfg.data.val, t.val_samples)
    val["targets"] = {n: np.stack([data_mod.geometry_target(tg, sh[:n], cfg.model.geometry)
                                   for tg, sh in zip(val["target"], val["shift"])]) for n in t.val_frames}
    baseline = baseline_psnr(val, t.val_frames)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import
    writer = SummaryWriter(log_dir=str(run.out_dir / "tb"), purge_step=step if resumed else None)
    log_setup(run, writer, step)
    return val, baseline, writer


# ----------------------------------------------------------------------------- logging, validation, checkpoints


def log_training(run: Run, writer, step: int, mean_loss: float, lr: float, grad_norm: torch.Tensor | None,
                 clock: Throughput, reads: Reads) -> None:
    """The progress line (rank 0) and the training scalars."""
    t = run.cfg.train
    now = time.time()
    rate, eta = clock.rate(now), clock.eta(now, step, t.steps)
    skip_shards, skip_samples = reads.skipped_totals()
    run.say(f"step {step}/{t.steps} | loss {mean_loss:.4f} | lr {lr:.2e} | "
            f"{rate:.1f} samples/s | eta {fmt_seconds(eta)}"
            + (f" | skipped {skip_shards} shard(s), {skip_samples} sample(s)" if skip_shards + skip_samples else ""))
    if writer:
        writer.add_scalar("train/loss", mean_loss, step)
        writer.add_scalar("train/lr", lr, step)
        writer.add_scalar("train/samples_per_s", rate, step)
        if grad_norm is not None:
            writer.add_scalar("train/grad_norm", grad_norm.item(), step)


def log_setup(run: Run, writer, step: int) -> None:
    """What TensorBoard shows beside the curves, logged at the (start or resume) step: the resolved
    config as text, and a layout that puts the model's PSNR and the mean of the frames' on one
    chart per burst length (Custom Scalars dashboard)."""
    toml = to_toml(to_dict(run.cfg))
    writer.add_text("config", "\n".join("    " + line for line in toml.splitlines()), step)  # markdown: verbatim
    writer.add_custom_scalars({"validation PSNR: model vs mean of frames": {
        f"{n} frames": ["Multiline", [f"val/psnr_{n}fr", f"val/psnr_mean_of_frames_{n}fr"]]
        for n in run.cfg.train.val_frames}})


def hparams(cfg: TrainConfig) -> dict:
    """The config flattened to {"section.key": int | float | str | bool} (lists and None as text),
    what TensorBoard's HParams dashboard takes."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            ok = isinstance(value, (bool, int, float, str))
            flat[f"{section}.{key}"] = value if ok else json.dumps(value)
    return flat


def log_hparams(run: Run, writer, progress: Progress, baseline: dict[int, float]) -> None:
    """At the end of the run: its hyperparameters with the final metrics, for the HParams
    dashboard, in the run tb/hparams (where ``add_hparams`` puts them, the metrics as scalars
    under hparams/). A resumed run that ends again replaces the folder: TensorBoard keeps the
    first session info of a run and a purge step does not drop it."""
    import shutil

    metrics = {f"hparams/val_psnr_{n}fr": r["psnr"] for n, r in progress.last_val.items()}
    metrics.update({f"hparams/val_psnr_mean_of_frames_{n}fr": p for n, p in baseline.items()})
    if math.isfinite(progress.best_psnr):
        metrics["hparams/best_val_psnr"] = progress.best_psnr
    shutil.rmtree(run.out_dir / "tb" / "hparams", ignore_errors=True)
    writer.add_hparams(hparams(run.cfg), metrics, run_name="hparams", global_step=progress.step)


def validation_step(run: Run, model: torch.nn.Module, val: dict, baseline: dict[int, float], writer,
                    progress: Progress) -> bool:
    """Rank 0: validate ``model``, record the results in ``progress`` (last_val, best_psnr), log
    them (line, scalars, image grids every image_every validations); True when the mean PSNR over
    val_frames beat the best so far."""
    t = run.cfg.train
    progress.validations += 1
    want_images = t.image_every > 0 and (progress.validations - 1) % t.image_every == 0
    keep = min(t.image_samples, t.val_samples) if want_images else 0
    results, outputs = validate(model, val, t.val_frames, t.batch_size, run.device, run.autocast,
                                run.channels_last, keep)
    mean_psnr = float(np.mean([r["psnr"] for r in results.values()]))
    improved = mean_psnr > progress.best_psnr
    progress.best_psnr = max(progress.best_psnr, mean_psnr)
    progress.last_val = results
    step = progress.step
    run.say(f"val step {step}: " + ", ".join(
        f"{n} fr {r['psnr']:.2f} dB (mean of frames {baseline[n]:.2f})" for n, r in results.items())
        + f" | mean {mean_psnr:.2f} dB{' (best)' if improved else ''}")
    for n, r in results.items():
        writer.add_scalar(f"val/loss_{n}fr", r["loss"], step)
        writer.add_scalar(f"val/psnr_{n}fr", r["psnr"], step)
        writer.add_scalar(f"val/psnr_mean_of_frames_{n}fr", baseline[n], step)
    writer.add_scalar("val/psnr_mean", mean_psnr, step)
    for n, images in outputs.items():
        writer.add_image(f"val_images/{n}fr", image_grid(val, images, n, grid_title(run, n, step)), step,
                         dataformats="HWC")
    writer.flush()
    return improved


def save_checkpoint(path: Path, run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    progress: Progress, average: WeightAverage | None = None) -> None:
    """Everything a run is rebuilt from (trainer/checkpoint.py writes it atomically). "model" is
    what inference loads: the weight average when the run keeps one (then the trained weights,
    which the optimizer's state belongs to, are "train_model")."""
    extra = {} if average is None else {"train_model": model.state_dict(), "ema_updates": average.updates}
    save_atomic({
        "model": (model if average is None else average.module).state_dict(),  # the bare module: no DDP/compile prefixes
        **extra,
        "config": to_dict(run.cfg),
        "versions": software_versions(),  # torch, numpy, python, code: str values (weights_only loads them)
        "optimizer": optimizer.state_dict(),
        "step": progress.step,
        "best_val_psnr": progress.best_psnr,
        "val": {str(n): r for n, r in progress.last_val.items()},
        # nothing in the loop draws from these (batches come from (seed, rank, step)); kept so
        # that code added later which does (dropout, say) resumes exactly too
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else []},
        "data": {"manifest_hash": str(run.manifest.get("config_hash", "")), "world_size": run.world,
                 "readers_per_rank": max(1, run.cfg.train.num_workers)},
    }, path)


def save_last(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
              average: WeightAverage | None = None) -> None:
    """last.pt, then config.toml (after it: last.pt is what --resume reads), so that new settings
    that diverge before their first checkpoint never replace the good ones."""
    save_checkpoint(run.out_dir / "last.pt", run, model, optimizer, progress, average)
    atomic_write_bytes(run.out_dir / "config.toml", to_toml(to_dict(run.cfg)).encode())


def finish(run: Run, model: torch.nn.Module, progress: Progress, start_step: int, reads: Reads,
           baseline: dict[int, float], readers: str, clock: Throughput) -> dict:
    """The summary: what each rank read and whether all ranks hold the same weights (gathered
    from every rank); rank 0 writes it to summary.json. RuntimeError when the weights differ."""
    skip_shards, skip_samples = reads.skipped_totals()
    mine = {"rank": run.rank, "shards": sorted(reads.shards), "digest": params_digest(model),
            "skipped_shards": skip_shards, "skipped_samples": skip_samples}
    everyone = [mine]
    if run.world > 1:
        everyone = [None] * run.world
        dist.all_gather_object(everyone, mine)
    best = progress.best_psnr
    summary = {
        "step": progress.step, "start_step": start_step, "world_size": run.world,
        "seconds": round(time.time() - clock.t_start, 1),
        "best_val_psnr": best if math.isfinite(best) else None,
        "val": {str(n): r for n, r in progress.last_val.items()},
        "val_mean_of_frames": {str(n): p for n, p in baseline.items()},
        "skipped": {"shards": sum(e["skipped_shards"] for e in everyone),
                    "samples": sum(e["skipped_samples"] for e in everyone)},
        "shards_read": {str(e["rank"]): e["shards"] for e in everyone},
        "weights_digest": {str(e["rank"]): e["digest"] for e in everyone},
        "readers": readers,
    }
    if run.master:
        atomic_write_bytes(run.out_dir / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
        run.say(f"done: step {progress.step}, best validation PSNR {best:.2f} dB, {fmt_seconds(summary['seconds'])}; "
                f"checkpoints in {run.out_dir}")
    if len(set(summary["weights_digest"].values())) > 1:
        raise RuntimeError(f"ranks ended with different weights: {summary['weights_digest']}")
    return summary


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, log=print) -> dict:
    """Train ``cfg`` into ``out_dir`` (resuming from its last.pt when ``resume``); return the summary.

    The summary (also written to out_dir/summary.json) holds the final step, best and last
    validation results, the mean-of-frames baseline, skip counts, the shards each rank read and
    a digest of each rank's final weights.
    """
    t = cfg.train
    out_dir = Path(out_dir)
    # ---- everything that can be wrong with the inputs is checked before any work
    manifest = data_mod.read_manifest(cfg.data.dir)
    data_mod.check_against_manifest(cfg, manifest)
    device = resolve_device(t.device, "train.device")
    ckpt = None
    if resume:
        if not (out_dir / "last.pt").is_file():
            raise FileNotFoundError(f"nothing to resume: {out_dir / 'last.pt'} does not exist")
        ckpt = load_checkpoint(out_dir / "last.pt", TRAINING_KEYS)
        if ckpt["config"]["model"] != to_dict(cfg)["model"]:
            raise ConfigError(f"[model] differs from the one in {out_dir / 'last.pt'}; a resumed run keeps its model")
        if ckpt["step"] > t.steps:
            raise ConfigError(f"train.steps ({t.steps}) is below the checkpoint's step ({ckpt['step']})")
        finished = finished_summary(out_dir, ckpt["step"], t.steps)
        if finished is not None:
            if int(os.environ.get("RANK", "0")) == 0:
                log(f"already finished at step {t.steps}: nothing to do ({out_dir / 'summary.json'} is kept; "
                    "--set train.steps=N to train further)")
            return finished
        ckpt["best_val_psnr"] = best_bar(out_dir, ckpt, log)
    elif (out_dir / "last.pt").exists():
        raise FileExistsError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it, or choose another --out")
    init = initial_weights(cfg) if ckpt is None else None  # a resumed run has its own weights
    with torch.random.fork_rng(devices=[]):  # a bad train.trainable fails here, before any work
        trainable_parameters(build_model(cfg.model), t.trainable)

    threads = torch.get_num_threads()
    if t.threads:
        torch.set_num_threads(t.threads)
    rank, world, local_rank = setup_distributed(device.type)
    try:
        if world > 1:
            check_shared_run_folder(out_dir, rank, world)
        return _train(make_run(cfg, out_dir, manifest, device, rank, world, local_rank, log), ckpt, init)
    finally:
        if world > 1:
            dist.destroy_process_group()
        torch.set_num_threads(threads)


def _train(run: Run, ckpt: dict | None, init: dict | None = None) -> dict:
    t = run.cfg.train
    # ---- setup: model, optimizer, resumed state, data, validation set, logs
    model, optimizer = build_training(run, init)
    progress, average = restore(run, ckpt, model, optimizer)
    start_step = progress.step
    train_model = wrap_model(run, model)
    stream, batches = open_batches(run, start_step)
    val, baseline, writer = open_validation(run, ckpt is not None, start_step)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.say(f"{'resuming at' if ckpt else 'training from'} step {start_step}/{t.steps} on {run.device.type}"
            f"{f' × {run.world} ranks' if run.world > 1 else ''}: {n_params / 1e6:.2f}M parameters"
            f"{f' ({n_trained} trained: train.trainable)' if n_trained < n_params else ''}, batch "
            f"{t.batch_size}{' per rank' if run.world > 1 else ''}, crop {t.crop}, {t.min_frames}..{t.max_frames} "
            f"frames, {'bf16' if run.bf16 else 'fp32'}; data {run.cfg.data.dir} ({stream.note}); run {run.out_dir}")
    run.say("validation PSNR of the mean of the frames: "
            + ", ".join(f"{n} fr {p:.2f} dB" for n, p in baseline.items()))

    # ---- the loop: losses stay on the device between checks (no host sync on ordinary steps)
    losses = LossMonitor(run.device, t.steps, run.world)
    clock, reads = Throughput(start_step), Reads()
    try:
        while progress.step < t.steps:
            batch = next(batches)
            if batch["step"] != progress.step:  # the data stream and the loop must agree for exact resume
                raise RuntimeError(f"data stream out of order: batch for step {batch['step']} at step {progress.step}")
            reads.add(batch)

            lr = lr_at(progress.step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            burst, target = to_device(batch, run.device, run.channels_last)
            guide = batch.get("guide")  # model.uses_fba: the FBA of each burst's whole stored window
            if guide is not None:
                guide = guide.to(run.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            with run.autocast():
                pred = train_model(burst, guide)
            loss = burst_loss(pred, target)
            losses.add(loss.detach(), progress.step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else None
            optimizer.step()
            if average is not None:
                average.update(model)
            progress.step += 1
            clock.count(len(target) * run.world)

            step = progress.step
            logging_step = step % t.log_every == 0 or step == t.steps
            if logging_step or step % t.val_every == 0 or step % t.ckpt_every == 0:
                mean_loss = losses.check(run.out_dir / "last.pt")  # (a NaN step's update is never saved)
            if logging_step:
                log_training(run, writer, step, mean_loss, lr, grad_norm, clock, reads)
                losses.reset()
                clock.restart()
            if run.master and (step % t.val_every == 0 or step == t.steps):
                validated = model if average is None else average.module
                if validation_step(run, validated, val, baseline, writer, progress):
                    save_checkpoint(run.out_dir / "best.pt", run, model, optimizer, progress, average)
                clock.exclude()
            if run.master and (step % t.ckpt_every == 0 or step == t.steps):
                save_last(run, model, optimizer, progress, average)
                clock.exclude()
        if writer:
            log_hparams(run, writer, progress, baseline)
    finally:
        batches.close()  # shuts the loader's workers down
        if writer:
            writer.close()
    return finish(run, model, progress, start_step, reads, baseline, stream.note, clock)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer train",
        description="Train the burst deblurring network on rendered shards. "
                    "Multi-GPU: torchrun --nproc_per_node=K -m trainer train ...")
    p.add_argument("--config", default=None,
                   help=f"train config TOML (default: {DEFAULT_CONFIG}; with --resume: the checkpoint's config); "
                        "a path that is not a file here names a bundled config (e.g. 'default', 'gpu')")
    p.add_argument("--data", default=None, help="dataset folder written by `python -m pipeline render` (sets data.dir)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run folder for checkpoints and logs (default: {DEFAULT_OUT}, under the current directory)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=500 (repeatable)")
    add_version(p)
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The config of this run: --config (or, resuming without --config, the checkpoint's) + --set + --data."""
    overrides = list(args.overrides) + ([f"data.dir={json.dumps(str(args.data))}"] if args.data else [])
    if args.resume and args.config is None:
        path = Path(args.out) / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist")
        base = read_config(path, TRAINING_KEYS)  # a last.pt that cannot be resumed fails here
        return load_train_config(None, overrides, base=base)
    return load_train_config(find_config(args.config or DEFAULT_CONFIG, "train"), overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        train(resolve_config(args), args.out, resume=args.resume)
        return 0

    return run_cli(run, interrupted=f"interrupted; the last checkpoint in {args.out} (if any) is intact")


if __name__ == "__main__":
    sys.exit(main())
