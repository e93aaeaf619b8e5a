"""trainer/checkpoint.py: one load policy for every checkpoint; a damaged last.pt is one error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer.train as train_mod
from trainer.checkpoint import (INFERENCE_KEYS, TRAINING_KEYS, CheckpointError, load_checkpoint, peek, read_config,
                                save_atomic)
from trainer.config import TrainConfig, load_train_config, to_dict
from trainer.model import ModelConfig, build_model, load

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ModelConfig(width=4, mults=[1, 2])


class NotPlainData:
    """An arbitrary class: weights_only=True must refuse to unpickle it."""

    def __init__(self):
        self.payload = [1, 2, 3]


def training_checkpoint() -> dict:
    """What train.py saves as last.pt, for the tiny model."""
    model = build_model(TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = TrainConfig(model=TINY_MODEL)
    return {"model": model.state_dict(), "config": to_dict(cfg), "optimizer": optimizer.state_dict(), "step": 3,
            "best_val_psnr": 20.0, "val": {}, "rng": {"torch": torch.get_rng_state(), "cuda": []}}


def write_damaged(path: Path, kind: str) -> None:
    """A last.pt damaged in one way."""
    ckpt = training_checkpoint()
    if kind == "truncated":
        torch.save(ckpt, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"these are not the weights you are looking for\n" * 20)
    elif kind == "pickled_object":
        torch.save({**ckpt, "model": NotPlainData()}, path)
    elif kind == "missing_optimizer":  # e.g. an exported model copied over last.pt
        torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, path)
    else:
        raise AssertionError(kind)


REASONS = {"truncated": "truncated or damaged torch file", "empty": "empty file",
           "garbage": "not a torch file", "pickled_object": "refused by torch.load(weights_only=True)",
           "missing_optimizer": "no 'optimizer' state dict"}


@pytest.mark.parametrize("kind", list(REASONS))
def test_damaged_last_pt_is_one_error_line_through_the_cli(tmp_path, kind):
    """`python -m trainer train --resume --out DIR` on a damaged DIR/last.pt: one `error:` line
    naming the file and what is wrong, exit 2, no traceback."""
    out = tmp_path / "run"
    out.mkdir()
    write_damaged(out / "last.pt", kind)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--resume", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {out / 'last.pt'}: not a burst-deblur checkpoint (")
    assert REASONS[kind] in lines[0]


def test_load_checkpoint_names_the_file_and_the_problem(tmp_path):
    def reason(path: Path, require=INFERENCE_KEYS) -> str:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, require)
        text = str(e.value)
        assert "\n" not in text and text.startswith(f"{path}: not a burst-deblur checkpoint (")
        return e.value.reason

    assert reason(tmp_path / "missing.pt") == "no such file"
    assert reason(tmp_path) == "not a file"
    for kind, why in REASONS.items():
        path = tmp_path / f"{kind}.pt"
        write_damaged(path, kind)
        assert why in reason(path, TRAINING_KEYS)
    assert "NotPlainData" in reason(tmp_path / "pickled_object.pt")  # names what it refused
    ckpt = training_checkpoint()
    for key, why in (("model", "no 'model' state dict"), ("step", "no 'step' count"),
                     ("config", "no 'config' dict with a 'model' table")):
        path = tmp_path / f"no_{key}.pt"
        torch.save({k: v for k, v in ckpt.items() if k != key}, path)
        assert reason(path, TRAINING_KEYS) == why
    path = tmp_path / "float_step.pt"
    torch.save({**ckpt, "step": 2.5}, path)
    assert "'step' is 2.5" in reason(path, TRAINING_KEYS)
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    assert "holds a list" in reason(path)
    # an exported model (no optimizer) is fine for inference, refused for resuming
    path = tmp_path / "exported.pt"
    write_damaged(path, "missing_optimizer")
    assert load_checkpoint(path)["step"] == 3
    assert "optimizer" in reason(path, TRAINING_KEYS)
    # trainer.model.load (evaluate, deblur, export) applies the same policy
    with pytest.raises(ValueError, match="refused by torch.load"):
        load(tmp_path / "pickled_object.pt")


def test_read_config_reads_the_config_alone_with_the_same_policy(tmp_path):
    """read_config / peek: the config (or the small entries) without reading the tensors, with the
    errors of load_checkpoint; legacy (non-zip) torch files are read too."""
    ckpt = training_checkpoint()
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    assert read_config(path) == ckpt["config"] == read_config(path, TRAINING_KEYS)
    assert peek(path, TRAINING_KEYS)["step"] == 3 and peek(path)["best_val_psnr"] == 20.0
    legacy = tmp_path / "legacy.pt"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    assert read_config(legacy) == ckpt["config"]
    for kind, why in REASONS.items():
        damaged = tmp_path / f"{kind}.pt"
        write_damaged(damaged, kind)
        with pytest.raises(CheckpointError) as e:
            read_config(damaged, TRAINING_KEYS)
        assert why in e.value.reason and "\n" not in str(e.value)
    torch.save({k: v for k, v in ckpt.items() if k != "config"}, tmp_path / "no_config.pt")
    with pytest.raises(CheckpointError, match="no 'config' dict"):
        read_config(tmp_path / "no_config.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        read_config(tmp_path / "missing.pt")


def test_save_atomic_round_trips_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic(training_checkpoint(), path)
    save_atomic(training_checkpoint(), path)  # replaces the complete file
    assert load_checkpoint(path, TRAINING_KEYS)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    with pytest.raises(Exception):
        save_atomic({"x": lambda: 0}, path)  # torch.save fails: the old file stays, no temporary left
    assert load_checkpoint(path, TRAINING_KEYS)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_resume_with_config_checks_last_pt_in_train_too(tiny_shards, tmp_path, capsys):
    """With --config, the config is not read from last.pt; train() still loads it with the one
    policy, and a state dict that does not fit the model is one line too (not load_state_dict's
    multi-line RuntimeError)."""
    from tests.test_train import run_cli, tiny_sets

    out = tmp_path / "run"
    out.mkdir()
    write_damaged(out / "last.pt", "garbage")
    assert run_cli(["--out", str(out), "--resume"] + tiny_sets(tiny_shards)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt: not a burst-deblur checkpoint (not a torch file" in err[0]

    cfg = load_train_config(REPO / "configs/train/default.toml", ["model.width=4", "model.mults=[1, 2]"])
    ckpt = training_checkpoint()
    ckpt["model"] = {k: v[..., :1] for k, v in build_model(cfg.model).state_dict().items()}  # wrong shapes
    ckpt["config"] = to_dict(cfg)  # the same [model] as the run's: only the weights are wrong
    torch.save(ckpt, out / "last.pt")
    assert run_cli(["--out", str(out), "--resume"] + tiny_sets(tiny_shards)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its state does not fit the model" in err[0] and "size mismatch" in err[0]
    assert not (out / "config.toml").exists() and not (out / "summary.json").exists()
    assert train_mod.save_atomic is save_atomic  # the old import path still works
