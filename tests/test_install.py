"""The project as an installed package: `pip install` of a copy of the source tree (offline: no
dependencies, no build isolation, setuptools from the venv), then commands run from a folder
outside the repository find the bundled configs and model; `--version` on every command; the
config lookup rule (common.bundled.find_config)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.bundled import bundled, find_config
from common.config import ConfigError
from common.version import version_text
from pipeline.run import code_version

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config lookup


def test_a_config_path_is_taken_as_given_then_looked_up_in_the_bundled_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository
    bundled_default = bundled("configs") / "train" / "default.toml"
    for name in ("configs/train/default.toml", "train/default.toml", "default", "default.toml"):
        assert find_config(name, "train") == bundled_default, name
    assert find_config("default", "shards") == bundled("configs") / "shards" / "default.toml"
    # a file that exists where it is named wins over the bundled one of the same name
    (tmp_path / "configs" / "train").mkdir(parents=True)
    (tmp_path / "configs" / "train" / "default.toml").write_text("[train]\n")
    assert find_config("configs/train/default.toml", "train") == Path("configs/train/default.toml")
    names = ", ".join(sorted(p.stem for p in (bundled("configs") / "train").glob("*.toml")))
    assert names.startswith("default, ")  # the message names every bundled train config
    with pytest.raises(ConfigError, match=r"config file not found: nope\.toml .*" + re.escape(names)):
        find_config("nope.toml", "train")
    with pytest.raises(ConfigError, match="config file not found"):
        find_config(tmp_path / "absent.toml", "train")  # an absolute path is never looked up


# ----------------------------------------------------------------------------- --version


def test_version_on_every_command(capsys):
    from pipeline.__main__ import main as pipeline_main
    from trainer.__main__ import main as trainer_main

    text = version_text()
    assert code_version() in text and text.startswith("burst-deblur ")
    for argv in (["--version"], ["render", "--version"], ["inspect", "--version"], ["verify", "--version"]):
        with pytest.raises(SystemExit) as e:
            pipeline_main(argv)
        assert e.value.code == 0 and capsys.readouterr().out.strip() == text, argv
    assert trainer_main(["--version"]) == 0 and capsys.readouterr().out.strip() == text
    for command in ("train", "evaluate", "deblur", "export"):
        with pytest.raises(SystemExit) as e:
            trainer_main([command, "--version"])
        assert e.value.code == 0 and capsys.readouterr().out.strip() == text, command


# ----------------------------------------------------------------------------- installed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """site-packages-like folder with the project installed (non-editable) from a copy of the
    tree (so the build's build/ and *.egg-info never land in the checkout)."""
    root = tmp_path_factory.mktemp("install")
    src, site = root / "src", root / "site"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "pipeline", "trainer", "common", "configs", "models"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return site


def run_outside(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_installed_package_carries_configs_and_model_and_runs_from_anywhere(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    py = sys.executable
    r = run_outside(installed, elsewhere, py, "-c",
                    "import pipeline, trainer.model as m, common.bundled as b; "
                    "print(pipeline.__file__); print(m.SHIPPED.is_file(), m.SHIPPED); "
                    "print(b.find_config('configs/train/default.toml', 'train'))")
    assert r.returncode == 0, r.stderr
    where, shipped, config = r.stdout.splitlines()
    assert where.startswith(str(installed)) and config.startswith(str(installed))
    assert shipped == f"True {installed / 'common' / 'models' / 'burst-deblur.pt'}"
    assert (installed / "common" / "models" / "README.md").is_file()
    assert not (installed / "tests").exists() and not (installed / "bench").exists()

    # the same code version as the checkout: manifests of either agree
    r = run_outside(installed, elsewhere, py, "-m", "trainer", "--version")
    assert r.returncode == 0 and r.stdout.strip() == version_text(), r.stderr
    r = run_outside(installed, elsewhere, py, "-m", "pipeline", "render", "--help")
    assert r.returncode == 0 and "--config" in r.stdout
    # console scripts (pip --target puts them in <target>/bin)
    r = run_outside(installed, elsewhere, str(installed / "bin" / "burst-pipeline"), "--version")
    assert r.returncode == 0 and r.stdout.strip() == version_text(), r.stderr
    # the default config is found from here: the run gets as far as the (missing) data
    r = run_outside(installed, elsewhere, str(installed / "bin" / "burst-trainer"), "train", "--data", "no-such-data")
    assert r.returncode == 2 and "config file not found" not in r.stderr and "no-such-data" in r.stderr, r.stderr
