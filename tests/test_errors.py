"""One base class for user-facing errors, caught in one place; anything else is a bug with its
traceback. And trainer.model stands alone: loading a model does not import the pipeline."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError, flat, one_line, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_user_errors_are_one_line_and_their_exit_code(capsys):
    def bad():
        raise UserError("split 'x': no such thing\nsecond line never printed")

    assert run_cli(bad) == 2
    assert capsys.readouterr().err == "error: split 'x': no such thing\n"

    class Diverged(UserError):
        exit_code = 1

    assert run_cli(lambda: (_ for _ in ()).throw(Diverged("loss is nan"))) == 1
    assert run_cli(lambda: (_ for _ in ()).throw(FileNotFoundError("no such file: a.png"))) == 2
    assert capsys.readouterr().err.splitlines() == ["error: loss is nan", "error: no such file: a.png"]


def test_a_bug_is_not_swallowed(capsys):
    for bug in (KeyError("x"), IndexError("list index out of range"), TypeError("bad operand"),
                ValueError("numpy said something"), RuntimeError("invariant broken")):
        with pytest.raises(type(bug)):
            run_cli(lambda: (_ for _ in ()).throw(bug))
    assert capsys.readouterr().err == ""


def test_every_project_error_is_a_user_error():
    from common.config import ConfigError
    from pipeline.format import DataError
    from pipeline.lock import LockHeld
    from pipeline.run import RenderError
    from pipeline.sources import PhotoDecodeError, SourceError
    from trainer.align import AlignmentError
    from trainer.checkpoint import CheckpointError
    from trainer.device import DeviceError
    from trainer.train import TrainingDiverged

    for cls in (ConfigError, DataError, LockHeld, RenderError, PhotoDecodeError, SourceError, AlignmentError,
                CheckpointError, DeviceError, TrainingDiverged):
        assert issubclass(cls, UserError), cls


def test_a_bug_in_a_command_shows_its_traceback(monkeypatch, tmp_path):
    """The pipeline CLI used to catch KeyError/IndexError/RuntimeError and print `error: 'x'`."""
    from pipeline import __main__ as cli
    from pipeline import inspect as insp

    def buggy(data_dir):
        return {}["missing"]

    monkeypatch.setattr(insp, "summary", buggy)
    with pytest.raises(KeyError):
        cli.main(["inspect", str(tmp_path)])


def test_message_helpers():
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(KeyError("k")) == "k" and one_line(RuntimeError()) == "RuntimeError"
    assert flat(ValueError("a\n   b\tc")) == "a b c" and flat(OSError()) == "OSError"


def test_loading_a_model_imports_no_pipeline_module():
    code = ("import sys, trainer.model; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline'); "
            "print(' '.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"trainer.model imported {proc.stdout.strip()} {proc.stderr[-500:]}"
