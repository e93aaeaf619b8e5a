"""trainer/train.py, config.py and the CLI on the tiny dataset: checkpoints, exact resume, NaN
stop, DDP on two CPU processes, config errors."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.model
import trainer.train as train_mod
from pipeline.config import ConfigError
from trainer.__main__ import main as cli_main
from trainer.config import TrainConfig, load_train_config, to_dict
from trainer.data import check_against_manifest, read_manifest

REPO = Path(__file__).resolve().parents[1]


def tiny_sets(data: Path, steps: int = 6, **train) -> list[str]:
    """--set overrides for a run of a few seconds on the tiny dataset."""
    # the paper's schedule: a run resumed with more steps continues it exactly (a cosine one
    # rescales the rest of its decay to the new length; see the cosine resume test)
    values = dict(steps=steps, batch_size=2, crop=24, max_frames=4, val_every=3, val_samples=2,
                  val_frames="[1, 3]", log_every=2, ckpt_every=3, image_every=1, image_samples=2,
                  num_workers=0, shuffle_buffer=4, lr_schedule="exp")
    values.update(train)
    sets = [f"train.{k}={v}" for k, v in values.items()]
    sets += ["model.width=4", "model.mults=[1, 2]", f"data.dir={json.dumps(str(data))}"]
    return [x for s in sets for x in ("--set", s)]


def run_cli(argv: list[str]) -> int:
    return train_mod.main(["--config", str(REPO / "configs/train/default.toml")] + argv)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ----------------------------------------------------------------------------- config


def test_lr_is_a_pure_function_of_the_step():
    t = TrainConfig().train
    t.warmup_steps, t.lr, t.lr_decay = 4, 1e-3, 0.5
    assert train_mod.lr_at(0, t) == pytest.approx(1e-3 * 0.25)
    assert train_mod.lr_at(3, t) == pytest.approx(1e-3 * 0.5**3)
    assert [train_mod.lr_at(s, t) for s in range(6)] == [train_mod.lr_at(s, t) for s in range(6)]


def test_cosine_schedule_falls_from_lr_to_the_floor():
    t = TrainConfig().train
    t.lr_schedule, t.lr, t.steps, t.lr_floor = "cosine", 2e-3, 101, 0.05
    lrs = [train_mod.lr_at(s, t) for s in range(t.steps)]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-3 * 0.05)
    assert lrs[50] == pytest.approx(2e-3 * (0.05 + 0.95 * 0.5))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_config_rules_and_dataset_checks_before_work(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        load_train_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.min_frames"):
        load_train_config(None, ["train.min_frames=5", "train.max_frames=4"])
    manifest = read_manifest(tiny_shards)
    for sets, message in ((["train.crop=64"], r"train.crop \(64\) is larger than the stored size \(48"),
                          (["train.crop=32", "train.max_frames=8"], r"stored frames \(4\)"),
                          (["train.crop=32", "train.max_frames=4", "train.val_frames=[1, 8]"], "val_frames"),
                          (["train.crop=32", "train.max_frames=4", "train.val_frames=[1]"], r"val_samples \(64\)")):
        cfg = load_train_config(None, sets)
        with pytest.raises(ConfigError, match=message):
            check_against_manifest(cfg, manifest)
    # the CLI says so in one line, exit 2, and writes nothing
    out = tmp_path / "run"
    assert run_cli(["--out", str(out)] + tiny_sets(tiny_shards, crop=64)) == 2
    assert not out.exists()


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_train_config(REPO / "configs/train/gpu.toml", ["train.lr=1e-05", 'data.dir="a b/c"'])
    path = tmp_path / "config.toml"
    path.write_text(train_mod.to_toml(to_dict(cfg)))
    assert load_train_config(path) == cfg
    assert load_train_config(REPO / "configs/train/default.toml").model.width > 0


# ----------------------------------------------------------------------------- training runs


def test_checkpoints_logs_and_exact_resume(tiny_shards, tmp_path):
    """6 steps straight == 3 steps, then --resume to 6 (2 loader workers, split mid-stream)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(["--out", str(straight)] + tiny_sets(tiny_shards, num_workers=2)) == 0
    assert run_cli(["--out", str(split)] + tiny_sets(tiny_shards, steps=3, num_workers=2)) == 0
    assert torch.load(split / "last.pt", weights_only=True)["step"] == 3
    # resuming without --config takes the checkpoint's config; --set extends the run
    assert train_mod.main(["--out", str(split), "--resume", "--set", "train.steps=6"]) == 0

    a, b = weights(straight / "last.pt"), weights(split / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    ckpt = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["model"]["width"] == 4
    assert set(ckpt) >= {"model", "config", "optimizer", "step", "best_val_psnr", "rng", "versions"}
    # the software beside the config: plain strings (weights_only read them above)
    from pipeline.run import code_version
    assert ckpt["versions"]["code"] == code_version() and ckpt["versions"]["torch"] == str(torch.__version__)
    assert set(ckpt["versions"]) == {"torch", "numpy", "python", "code"}
    assert all(isinstance(v, str) for v in ckpt["versions"].values())
    assert math.isfinite(ckpt["best_val_psnr"])
    # the run folder: resolved config, summary, TensorBoard scalars and image grids
    assert load_train_config(straight / "config.toml").train.steps == 6
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["step"] == 6 and set(summary["val"]) == {"1", "3"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(straight / "tb")).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/psnr_1fr", "val/psnr_3fr",
            "val/loss_3fr", "val/psnr_mean_of_frames_1fr"} <= set(tags["scalars"])
    assert {"val_images/1fr", "val_images/3fr"} <= set(tags["images"])
    check_tensorboard_extras(straight / "tb", steps=6)
    check_tensorboard_extras(split / "tb", steps=6)  # the resume purged the first end's hparams

    # trainer.model.load rebuilds the network from best.pt; it runs on any burst length
    model = trainer.model.load(straight / "best.pt")
    out = model(torch.rand(1, 5, 3, 20, 28))
    assert out.shape == (1, 3, 20, 28) and not model.training


def test_fba_guided_model_trains_resumes_exactly_and_loads(tiny_shards, tmp_path):
    """model.guide = "fba": batches carry the guide, resume is still exact, the loaded model runs."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    guided = ["--set", "model.guide=fba"]
    assert run_cli(["--out", str(straight)] + tiny_sets(tiny_shards) + guided) == 0
    assert run_cli(["--out", str(split)] + tiny_sets(tiny_shards, steps=3) + guided) == 0
    assert train_mod.main(["--out", str(split), "--resume", "--set", "train.steps=6"]) == 0
    a, b = weights(straight / "last.pt"), weights(split / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = trainer.model.load(straight / "best.pt")
    assert model.cfg.guide == "fba" and model.stem.in_channels == 6
    assert model(torch.rand(1, 3, 3, 20, 28)).shape == (1, 3, 20, 28)


def test_weight_average_is_what_is_validated_and_saved_and_resumes_exactly(tiny_shards, tmp_path):
    """train.ema: checkpoints' "model" is the average (what inference loads), "train_model" the
    trained weights; straight == split-and-resumed for both; the average is the recurrence
    w <- d·w + (1 - d)·weights of the trained weights, which it is not equal to."""
    straight, split, plain = tmp_path / "straight", tmp_path / "split", tmp_path / "plain"
    ema = ["--set", "train.ema=0.9"]
    assert run_cli(["--out", str(straight)] + tiny_sets(tiny_shards) + ema) == 0
    assert run_cli(["--out", str(split)] + tiny_sets(tiny_shards, steps=3) + ema) == 0
    assert train_mod.main(["--out", str(split), "--resume", "--set", "train.steps=6"]) == 0
    assert run_cli(["--out", str(plain)] + tiny_sets(tiny_shards)) == 0
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(split / "last.pt", map_location="cpu", weights_only=True)
    assert a["ema_updates"] == b["ema_updates"] == 6
    for key in ("model", "train_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    # the trained weights are those of a run without the average: it only watches
    p = weights(plain / "last.pt")
    assert all(torch.equal(a["train_model"][k], p[k]) for k in p)
    assert any(not torch.equal(a["model"][k], p[k]) for k in p if p[k].is_floating_point())
    # the recurrence, on a model whose weights are set by hand
    net = torch.nn.Linear(2, 1)
    average = train_mod.WeightAverage(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    average.update(net)  # d = min(0.5, 2 / 11)
    d = 2 / 11
    assert torch.allclose(average.module.weight, d * start + (1 - d) * (start + 1.0))
    assert not average.module.weight.requires_grad
    # inference loads the average
    model = trainer.model.load(straight / "last.pt")
    assert all(torch.equal(model.state_dict()[k], a["model"][k]) for k in a["model"])
    with pytest.raises(ConfigError, match="train.ema"):
        load_train_config(None, ["train.ema=1"])


def test_init_starts_from_given_weights_and_checks_them_before_work(tiny_shards, tmp_path, capsys):
    """train.init: step 0's weights are the file's (not the seed's init), the optimizer and the
    schedule start afresh; a missing file or another [model] is one error line before any work."""
    base = tmp_path / "base"
    assert run_cli(["--out", str(base)] + tiny_sets(tiny_shards, steps=3)) == 0
    start = weights(base / "last.pt")
    init = ["--set", f"train.init={json.dumps(str(base / 'last.pt'))}"]

    zero = tmp_path / "zero"  # lr ~ 0: the fine-tune's weights stay the init's
    assert run_cli(["--out", str(zero)] + tiny_sets(tiny_shards, steps=1, lr=1e-30) + init) == 0
    tuned = weights(zero / "last.pt")
    assert all(torch.allclose(tuned[k], start[k], atol=1e-6) for k in start)
    fresh = tmp_path / "fresh"
    assert run_cli(["--out", str(fresh)] + tiny_sets(tiny_shards, steps=1, lr=1e-30)) == 0
    assert not all(torch.allclose(weights(fresh / "last.pt")[k], start[k]) for k in start)
    assert torch.load(zero / "last.pt", weights_only=True)["step"] == 1  # a new run, from step 0

    # a "mean" model grows into a "select" one: its zero-logit head at first computes the same
    grown = tmp_path / "grown"
    assert run_cli(["--out", str(grown)] + tiny_sets(tiny_shards, steps=1, lr=1e-30) + init
                   + ["--set", "model.base=select"]) == 0
    burst = torch.rand(1, 3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.load(grown / "last.pt")(burst),
                                   trainer.model.load(base / "last.pt")(burst), rtol=0, atol=1e-5)
    # ... and a "select" one into "select_fba": the FBA candidate is added at its starting logit
    with_fba = tmp_path / "with_fba"
    init_select = ["--set", f"train.init={json.dumps(str(grown / 'last.pt'))}"]
    assert run_cli(["--out", str(with_fba)] + tiny_sets(tiny_shards, steps=1, lr=1e-30) + init_select
                   + ["--set", "model.base=select_fba"]) == 0
    state = weights(with_fba / "last.pt")
    assert state["select_fba.bias"].item() == pytest.approx(trainer.model.FBA_LOGIT_INIT, abs=1e-6)
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in weights(grown / "last.pt").items())
    assert run_cli(["--out", str(tmp_path / "c")] + tiny_sets(tiny_shards, steps=1) + ["--set",
                   f"train.init={json.dumps(str(with_fba / 'last.pt'))}", "--set", "model.base=select"]) == 2
    assert "differs" in capsys.readouterr().err
    # train.trainable: only the FBA logit's conv moves (a real rate), everything else stays the init's
    head_only = tmp_path / "head_only"
    assert run_cli(["--out", str(head_only)] + tiny_sets(tiny_shards, steps=2) + init_select
                   + ["--set", "model.base=select_fba", "--set", 'train.trainable=["select_fba"]']) == 0
    trained, start_fba = weights(head_only / "last.pt"), weights(with_fba / "last.pt")
    moved = {k for k in trained if not torch.equal(trained[k], start_fba[k])}
    assert moved and moved <= {"select_fba.weight", "select_fba.bias"}
    # ... and a "select_fba" one grows the misalignment cue of FBA's logit, at zero
    with_cue = tmp_path / "with_cue"
    assert run_cli(["--out", str(with_cue)] + tiny_sets(tiny_shards, steps=1, lr=1e-30) + ["--set",
                   f"train.init={json.dumps(str(with_fba / 'last.pt'))}", "--set", "model.base=select_fba",
                   "--set", "model.fba_cue=true"]) == 0
    state = weights(with_cue / "last.pt")
    assert state["select_cue.weight"].abs().max().item() < 1e-20
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in start_fba.items())
    capsys.readouterr()
    assert run_cli(["--out", str(tmp_path / "d")] + tiny_sets(tiny_shards, steps=1)
                   + ["--set", 'train.trainable=["head", "selekt"]']) == 2
    err = capsys.readouterr().err.strip()
    assert "train.trainable" in err and "'selekt'" in err and "\n" not in err
    assert not (tmp_path / "d").exists()

    capsys.readouterr()
    missing = ["--set", f"train.init={json.dumps(str(tmp_path / 'nope.pt'))}"]
    assert run_cli(["--out", str(tmp_path / "a")] + tiny_sets(tiny_shards) + missing) == 2
    err = capsys.readouterr().err.strip()
    assert "train.init" in err and "nope.pt" in err and "\n" not in err
    assert run_cli(["--out", str(tmp_path / "b")] + tiny_sets(tiny_shards) + init + ["--set", "model.width=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.init" in err and "differs" in err and "\n" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def check_tensorboard_extras(tb: Path, steps: int) -> None:
    """The run's TensorBoard beside the curves: the resolved config as text, the hyperparameters
    with the final metrics (once, at the last step), a layout charting the model's PSNR with the
    mean of the frames' per burst length, and labelled, gapped image grids."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(tb), size_guidance={"tensors": 0, "images": 0}).Reload()
    text = events.Tensors("config/text_summary")
    assert text and "steps = " in text[-1].tensor_proto.string_val[0].decode()
    assert "[model]" in text[-1].tensor_proto.string_val[0].decode()

    hp_events = EventAccumulator(str(tb / "hparams")).Reload()  # add_hparams's run
    hp = hp_events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hp["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["train.steps"].number_value == steps
    assert start.session_start_info.hparams["model.mults"].string_value == "[1, 2]"
    assert {"hparams/val_psnr_1fr", "hparams/val_psnr_3fr", "hparams/best_val_psnr"} <= set(hp_events.Tags()["scalars"])
    final = hp_events.Scalars("hparams/val_psnr_3fr")
    assert [e.step for e in final] == [steps]  # once: at the run's end
    assert final[0].value == pytest.approx(events.Scalars("val/psnr_3fr")[-1].value)

    scalars = set(events.Tags()["scalars"])

    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts == {f"{n} frames": [f"val/psnr_{n}fr", f"val/psnr_mean_of_frames_{n}fr"] for n in (1, 3)}
    assert set(sum(charts.values(), [])) <= scalars

    # 3 frames: panels frame 1..3 | mean | output | target of 48², apart by white gaps, labelled
    grid = np.asarray(Image.open(io.BytesIO(events.Images("val_images/3fr")[-1].encoded_image_string)).convert("L"))
    painted = (grid != 255).mean(axis=0) > 0.3  # columns crossed by the image panels (2 rows of them)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], painted.astype(int), [0]])))
    assert [b - a for a, b in zip(edges[::2], edges[1::2])] == [48] * 6
    assert grid.shape[0] > 2 * 48 + 2 * 12  # a title and a line of labels above each row
    assert (grid[:12] < 128).any()  # the title


def test_existing_run_needs_resume(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--out", str(out)] + tiny_sets(tiny_shards, steps=2)) == 0
    capsys.readouterr()
    assert run_cli(["--out", str(out)] + tiny_sets(tiny_shards, steps=2)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--resume" in err and "\n" not in err


def test_interrupted_cosine_run_resumes_exactly(tiny_shards, tmp_path, monkeypatch):
    """The `make train` schedule (cosine over train.steps): a run stopped by Ctrl-C after its
    step-3 checkpoint and resumed with the same steps ends with the weights of a straight run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    cosine = tiny_sets(tiny_shards, lr_schedule="cosine")
    assert run_cli(["--out", str(straight)] + cosine) == 0
    calls = []

    def interrupted(pred, target):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 5:  # step 4 (0-based), after last.pt of step 3
                raise KeyboardInterrupt
        return train_loss(pred, target)

    train_loss = train_mod.burst_loss
    monkeypatch.setattr(train_mod, "burst_loss", interrupted)
    assert run_cli(["--out", str(stopped)] + cosine) != 0
    assert torch.load(stopped / "last.pt", map_location="cpu", weights_only=True)["step"] == 3
    monkeypatch.setattr(train_mod, "burst_loss", train_loss)
    assert train_mod.main(["--out", str(stopped), "--resume"]) == 0
    a, b = weights(straight / "last.pt"), weights(stopped / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_quality_lengths_train_a_cosine_run_per_length_and_resume_an_exp_one(tiny_shards, tmp_path):
    """bench/quality.py --lengths: with a cosine decay each length is a run of its own, decaying
    over its whole length; with the paper's rate one run is resumed (its 1x best is a shorter
    run's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", REPO / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    sets = tiny_sets(tiny_shards, steps=3)
    for schedule in ("cosine", "exp"):
        config = tmp_path / f"{schedule}.toml"
        cfg = load_train_config(REPO / "configs/train/default.toml",
                                sets[1::2] + [f'train.lr_schedule="{schedule}"'])
        config.write_text(train_mod.to_toml(to_dict(cfg)))
        run = tmp_path / f"lengths-{schedule}"
        kept = quality.train_lengths([1, 2], str(config), tiny_shards, run, log=lambda m: None)
        assert set(kept) == {"1x", "2x"} and all(p.is_file() for p in kept.values())
        if schedule == "cosine":
            for f, steps in ((1, 3), (2, 6)):
                last = torch.load(run / f"{f}x" / "last.pt", map_location="cpu", weights_only=True)
                assert last["step"] == steps and last["config"]["train"]["steps"] == steps
            # the 2x run decays to its floor at step 6, not at step 3
            t = load_train_config(run / "2x" / "config.toml").train
            assert train_mod.lr_at(2, t) > train_mod.lr_at(5, t) == pytest.approx(t.lr * t.lr_floor)
        else:
            assert not (run / "1x").exists()
            assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["step"] == 6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path, monkeypatch, capsys):
    calls = []

    def poisoned(pred, target):
        loss = train_mod_loss(pred, target)
        if torch.is_grad_enabled():  # training steps only, not validation
            calls.append(1)
            if len(calls) == 5:  # step 4 (0-based)
                return loss * float("nan")
        return loss

    train_mod_loss = train_mod.burst_loss
    monkeypatch.setattr(train_mod, "burst_loss", poisoned)
    out = tmp_path / "run"
    assert run_cli(["--out", str(out)] + tiny_sets(tiny_shards, steps=8, ckpt_every=2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at step 4" in err[0] and "last.pt" in err[0]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def run_folder(out: Path) -> dict:
    """The bytes of every file a run folder holds (tb/ included)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_nan_stop_leaves_the_run_folder_at_its_last_good_state(tiny_shards, tmp_path, capsys):
    """Resumed with settings that diverge (a huge lr) before their first checkpoint: config.toml,
    last.pt, best.pt and summary.json stay as the good run left them; resuming with the good
    settings carries on from there."""
    out = tmp_path / "run"
    assert run_cli(["--out", str(out)] + tiny_sets(tiny_shards, steps=3)) == 0
    before = run_folder(out)
    good_lr = load_train_config(out / "config.toml").train.lr
    capsys.readouterr()
    assert train_mod.main(["--out", str(out), "--resume", "--set", "train.steps=9", "--set", "train.lr=1e10"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at step" in err[0] and "last.pt" in err[0]
    after = run_folder(out)
    for name in ("config.toml", "last.pt", "best.pt", "summary.json"):
        assert after[name] == before[name], name
    assert load_train_config(out / "config.toml").train.lr == good_lr
    assert train_mod.main(["--out", str(out), "--resume", "--set", "train.steps=6"]) == 0
    assert load_train_config(out / "config.toml").train.steps == 6  # written with the new last.pt
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 6


def test_resuming_a_finished_run_keeps_its_summary(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--out", str(out)] + tiny_sets(tiny_shards, steps=3)) == 0
    before = run_folder(out)
    val = json.loads((out / "summary.json").read_text())["val"]
    assert set(val) == {"1", "3"}
    capsys.readouterr()
    assert train_mod.main(["--out", str(out), "--resume"]) == 0
    assert "already finished at step 3" in capsys.readouterr().out
    assert run_folder(out) == before  # nothing written: no new summary, config or TensorBoard file
    # killed between its last checkpoint and its summary: the summary is written again, with the
    # validation results saved in last.pt
    (out / "summary.json").unlink()
    assert train_mod.main(["--out", str(out), "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["val"] == val


def test_resumed_run_must_beat_the_psnr_of_best_pt(tmp_path, capsys):
    """best.pt may be newer than last.pt (validated after it, then killed): its own PSNR is the
    bar; an unreadable best.pt is replaced at the next validation."""
    out = tmp_path
    ckpt = {"best_val_psnr": 20.0}
    assert train_mod.best_bar(out, ckpt, print) == 20.0  # no best.pt
    torch.save({"model": {}, "config": {"model": {}}, "best_val_psnr": 25.0}, out / "best.pt")
    assert train_mod.best_bar(out, ckpt, print) == 25.0
    (out / "best.pt").write_bytes(b"junk")
    assert train_mod.best_bar(out, ckpt, print) == -math.inf
    assert "best.pt: not a burst-deblur checkpoint" in capsys.readouterr().out


def test_loss_monitor_means_the_interval_and_names_the_first_bad_step(tmp_path):
    losses = train_mod.LossMonitor(torch.device("cpu"), steps=10, world=1)
    for step, value in enumerate([1.0, 2.0, 3.0]):
        losses.add(torch.tensor(value), step)
    assert losses.check(tmp_path / "last.pt") == 2.0
    losses.reset()
    for step, value in ((3, 4.0), (4, math.inf), (5, math.nan)):
        losses.add(torch.tensor(value), step)
    with pytest.raises(train_mod.TrainingDiverged,
                       match=r"loss is inf at step 4; stopped \(no checkpoint was written yet\)"):
        losses.check(tmp_path / "last.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_error_line_naming_train_device(tiny_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--out", str(out)] + tiny_sets(tiny_shards, device="cuda")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: train.device = 'cuda' but no CUDA device is available"]
    assert not out.exists()


def test_ddp_two_cpu_processes_read_disjoint_shards_and_agree(tiny_shards, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", "train", "--config", str(REPO / "configs/train/default.toml"), "--out", str(out),
           *tiny_sets(tiny_shards, steps=4, num_workers=1)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    read0, read1 = set(summary["shards_read"]["0"]), set(summary["shards_read"]["1"])
    assert read0 and read1 and not read0 & read1
    digests = summary["weights_digest"]
    assert digests["0"] == digests["1"]
    assert torch.load(out / "last.pt", weights_only=True)["data"]["world_size"] == 2


# ----------------------------------------------------------------------------- command line


def test_cli_help_for_every_command(capsys):
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(cmd in text for cmd in ("train", "evaluate", "deblur"))
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    assert "usage: python -m trainer train" in capsys.readouterr().out
    assert cli_main(["bogus"]) == 2


def test_bad_set_is_one_error_line_and_exit_2(tiny_shards, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--data", str(tiny_shards),
                           "--out", str(tmp_path / "r"), "--set", "train.steps=lots"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.steps")
    assert train_mod.main(["--set", "nodot"]) == 2


def test_validation_does_not_modify_float_targets():
    """Targets moved to a "mean" model's geometry are float arrays; validating must leave them
    as they were (a second validation gives the same PSNR)."""
    import contextlib

    from trainer.model import ModelConfig, build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ModelConfig(width=4, mults=[1, 2]))
    rng = np.random.default_rng(0)
    val = {"keys": ["a", "b"], "burst": rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8),
           "target": rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)}
    val["targets"] = {2: val["target"].astype(np.float32) + 0.25}
    before = val["targets"][2].copy()
    first, _ = train_mod.validate(model, val, [2], 2, torch.device("cpu"), contextlib.nullcontext, False)
    second, _ = train_mod.validate(model, val, [2], 2, torch.device("cpu"), contextlib.nullcontext, False)
    np.testing.assert_array_equal(val["targets"][2], before)
    assert first[2]["psnr"] == second[2]["psnr"]


def test_ddp_on_two_nodes_without_a_shared_run_folder_is_one_error_line(tiny_shards, tmp_path):
    """Two torchrun "nodes" on localhost (c10d rendezvous, one process each), each in its own
    folder with a relative --out: the run folders differ, as on two machines without a shared
    filesystem. Every rank stops at start-up with one line; no checkpoint is written anywhere.
    (A shared --out is the 2-process test above: the same check passes there.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = []
    for node in ("a", "b"):
        (tmp_path / node).mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=shared-out-test",
               "-m", "trainer", "train", "--config", str(REPO / "configs/train/default.toml"), "--out", "run",
               *tiny_sets(tiny_shards, steps=4)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path / node, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode != 0
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert lines and "cannot see the run folder run that rank 0 on" in lines[0], err[-2000:]
        assert "--out must be one path on a filesystem every node shares" in lines[0]
    for node in ("a", "b"):
        assert not list((tmp_path / node).rglob("*.pt"))
