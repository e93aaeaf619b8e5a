"""The train config: [train], [model], [data] tables of a TOML file, loaded into dataclasses.

Loaded with ``pipeline.config.load_config``: unknown keys are errors, ``--set section.key=value``
overrides, every rule that spans fields is checked in ``validate()`` before any work starts.
Rules that need the dataset (crop <= stored size, frames <= stored frames, enough validation
samples) are checked against the manifest by ``trainer.data.check_against_manifest``.

The resolved config is saved into the run folder as ``config.toml`` (loadable again with
``--config``) and, as a plain dict, inside every checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from common.config import SPLIT_NAME, ConfigError, check, load_config, to_dict, to_toml  # noqa: F401 - to_dict, to_toml re-exported
from trainer.model import ModelConfig



@dataclass
class TrainSection:
    """The [train] table: optimisation, batches, validation, logging, devices."""

    steps: int = 2000  # optimizer steps (iterations, not epochs)
    batch_size: int = 8  # samples per step on each rank (global batch = batch_size × ranks)
    seed: int = 0  # model init, and every batch: batch s of rank r is a function of (seed, r, s)
    # weights to start from instead of the seed's random init (a checkpoint or an exported model
    # whose [model] equals this one; a fine-tune: fresh optimizer, schedule from step 0); "" = none
    init: str = ""
    # names (or name prefixes, e.g. "select_fba" or "head") of the parameters the optimizer updates;
    # [] = all. The others keep their initial values: a fine-tune that trains only a new head on
    # top of a trained network (train.init) cannot move what the network learned
    trainable: list[str] = field(default_factory=list)
    lr: float = 3e-3
    optimizer: str = "adam"  # "adam" (paper) | "radam" (the public re-implementation)
    lr_schedule: str = "exp"  # "exp": lr · lr_decay^step (paper) | "cosine": lr → lr_floor · lr over train.steps
    lr_decay: float = 0.999997  # lr(step) = lr · lr_decay^step after warmup (paper: per step)
    lr_floor: float = 0.02  # cosine only: the last step's lr as a fraction of lr
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    # an exponential moving average of the weights is what is validated, chosen as best.pt and
    # saved as the checkpoints' "model" (the weights users get); its decay at update k is
    # min(ema, (1 + k) / (10 + k)). 0 = off (the weights of the last step, as the paper)
    ema: float = 0.0
    crop: int = 128  # training crop side, px (<= the stored size)
    min_frames: int = 1  # burst length of each batch is uniform in min_frames..max_frames
    max_frames: int = 8
    val_every: int = 250  # validate every this many steps (and at the last step)
    val_samples: int = 64  # the first val_samples of the val split, in key order
    val_frames: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # fixed burst lengths
    log_every: int = 25  # progress line and TensorBoard scalars every this many steps
    ckpt_every: int = 500  # last.pt every this many steps (and at the last step)
    image_every: int = 4  # image grids every this many validations; 0 = never
    image_samples: int = 4  # rows of the image grid (first validation samples)
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the main process)
    shuffle_buffer: int = 64  # samples held by each reader's shuffle buffer
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N" (trainer/device.py)
    threads: int = 0  # PyTorch CPU threads of this process; 0 = PyTorch's default (one per core)
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "off"
    channels_last: str = "auto"  # "auto" (on with CUDA) | "on" | "off"
    compile: bool = False  # torch.compile the model for training
    on_bad_shard: str = "error"  # "error" | "skip" (skip unreadable shards/samples, counted)

    def validate(self) -> None:
        positive = ("steps", "batch_size", "crop", "min_frames", "max_frames", "val_every",
                    "val_samples", "log_every", "ckpt_every", "shuffle_buffer")
        for name in positive:
            value = getattr(self, name)
            check(value >= 1, f"train.{name} must be >= 1, got {value}")
        check(0 <= self.seed < 2**63, f"train.seed must be in [0, 2^63), got {self.seed}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        check(self.optimizer in ("adam", "radam"), f"train.optimizer must be 'adam' or 'radam', got '{self.optimizer}'")
        check(0 < self.lr_decay <= 1, f"train.lr_decay must be in (0, 1], got {self.lr_decay}")
        check(self.lr_schedule in ("exp", "cosine"), f"train.lr_schedule must be 'exp' or 'cosine', got '{self.lr_schedule}'")
        check(0 <= self.lr_floor <= 1, f"train.lr_floor must be in [0, 1], got {self.lr_floor}")
        check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 <= self.ema < 1, f"train.ema must be in [0, 1) (0 = off), got {self.ema}")
        check(all(isinstance(p, str) and p for p in self.trainable),
              f"train.trainable must list parameter names or prefixes ([] = all), got {self.trainable}")
        check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        check(self.min_frames <= self.max_frames,
              f"train.min_frames ({self.min_frames}) must be <= train.max_frames ({self.max_frames})")
        check(len(self.val_frames) >= 1, "train.val_frames must list at least one burst length")
        check(all(n >= 1 for n in self.val_frames), f"train.val_frames must all be >= 1, got {self.val_frames}")
        check(len(set(self.val_frames)) == len(self.val_frames), f"train.val_frames has duplicates: {self.val_frames}")
        check(self.image_every >= 0, f"train.image_every must be >= 0 (0 = never), got {self.image_every}")
        check(self.image_samples >= 1, f"train.image_samples must be >= 1, got {self.image_samples}")
        check(self.threads >= 0, f"train.threads must be >= 0 (0 = PyTorch's default), got {self.threads}")
        check(self.num_workers >= 0, f"train.num_workers must be >= 0, got {self.num_workers}")
        check(self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
              f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got '{self.device}'")
        check(self.amp in ("auto", "bf16", "off"), f"train.amp must be 'auto', 'bf16' or 'off', got '{self.amp}'")
        check(self.channels_last in ("auto", "on", "off"),
              f"train.channels_last must be 'auto', 'on' or 'off', got '{self.channels_last}'")
        check(self.on_bad_shard in ("error", "skip"), f"train.on_bad_shard must be 'error' or 'skip', got '{self.on_bad_shard}'")


@dataclass
class DataSection:
    """The [data] table: which dataset folder and which of its splits."""

    dir: str = "shards/default"  # the folder `python -m pipeline render` wrote (--data overrides)
    train: str = "train"
    val: str = "val"

    def validate(self) -> None:
        check(self.dir != "", "data.dir must not be empty")
        for name in ("train", "val"):
            value = getattr(self, name)
            check(SPLIT_NAME.fullmatch(value) is not None,
                  f"data.{name} '{value}' is not a split name (lowercase letters, digits, '_')")


@dataclass
class TrainConfig:
    train: TrainSection = field(default_factory=TrainSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)

    def validate(self) -> None:
        pass  # every rule lives in one section; the dataset rules are checked against the manifest


def load_train_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Load ``path`` (TOML) or ``base`` (a plain dict, e.g. from a checkpoint), apply ``--set`` overrides."""
    return load_config(TrainConfig, path, list(overrides), base=base)
