"""Shared fixtures: a tiny real dataset rendered by the pipeline (CPU, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ShardConfig, apply_overrides, from_dict, validate

TINY = {
    "dataset": {"name": "tiny", "seed": 7, "frames": 4, "size": 48, "kernel_size": 15},
    "kernels": {"scale_max": 2.5},
    "splits": {
        "train": {"samples": 16, "samples_per_shard": 4, "source": "deadleaves"},
        "val": {"samples": 8, "samples_per_shard": 4, "source": "deadleaves"},
        "test": {"samples": 8, "samples_per_shard": 4, "source": "samples"},
    },
}


def tiny_config(*overrides: str, base: dict | None = None) -> ShardConfig:
    """The tiny config with ``section.key=value`` overrides, validated."""
    cfg = from_dict(ShardConfig, apply_overrides(base or TINY, list(overrides)))
    validate(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Path of a tiny dataset: train 16 (4 shards), val 8 (2), test 8 from real photos (2);
    4 frames of 48×48, 15×15 kernels. Read-only for the tests that use it."""
    from pipeline.run import render_dataset

    out = tmp_path_factory.mktemp("tiny") / "tiny"
    render_dataset(tiny_config(), out, workers=1, engine="local", progress=False)
    return out
