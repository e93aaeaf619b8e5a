"""Config loading: unknown keys, wrong types, out-of-range values are one-line errors."""

import pytest

from pipeline.config import ConfigError, ShardConfig, config_hash, load_config, load_shard_config, parse_override
from tests.conftest import tiny_config


def test_default_and_paper_configs_load():
    for name in ("default", "paper"):
        cfg = load_shard_config(f"configs/shards/{name}.toml")
        assert cfg.dataset.kernel_size == 51 and cfg.dataset.frames == 8
    assert load_shard_config("configs/shards/paper.toml").dataset.size == 160


def test_overrides_change_values_and_the_hash():
    a = tiny_config()
    b = tiny_config("dataset.seed=8", "splits.train.samples=5")
    assert b.dataset.seed == 8 and b.splits["train"].samples == 5
    assert config_hash(a) != config_hash(b) and config_hash(a) == config_hash(tiny_config())


@pytest.mark.parametrize("override,needle", [
    ("dataset.colour=1", "unknown key 'dataset.colour'"),
    ("kernels.stepz=3", "unknown key 'kernels.stepz'"),
    ("dataset.frames='eight'", "dataset.frames: expected an integer"),
    ("dataset.frames=0", "dataset.frames must be in 1..64"),
    ("splits.train.samples=0", "samples must be >= 1"),
    ("dataset.kernel_size=50", "kernel_size must be odd"),
    ("dataset.kernel_size=3", "kernel_size must be >= 5"),
    ("dataset.size=8", "dataset.size must be in 16..4096"),
    ("splits.train.source='http://x'", "source must be"),
    ("imaging.gamma_min=3.0", "gamma_min/max"),
    ("kernels.scale_max=40.0", "does not fit"),
    ("dataset.snake=true", "unknown key"),
    ("imaging.misalign_max_px=6.0", "must be <= 5 px for kernel_size 15"),
    ("imaging.gamma_max=inf", "expected a finite number"),
    ("imaging.misalign_px=nan", "expected a finite number"),
    ("imaging.jpeg_quality_min=0", "jpeg_quality_min/max"),
    ("splits.test.source='samples:'", "source must be"),
])
def test_bad_values_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        tiny_config(override)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_size_smaller_than_kernel_margin_is_rejected():
    with pytest.raises(ConfigError, match="smaller than needed"):
        tiny_config("dataset.size=16", "dataset.kernel_size=41", "kernels.scale_max=2.0")


def test_bad_split_name_and_missing_sections(tmp_path):
    with pytest.raises(ConfigError, match="split name"):
        tiny_config("splits.Bad.samples=1", "splits.Bad.samples_per_shard=1",
                    "splits.Bad.source='deadleaves'")
    p = tmp_path / "c.toml"
    p.write_text("[dataset]\nname='x'\nseed=1\n")
    with pytest.raises(ConfigError, match="missing required key 'splits'"):
        load_config(ShardConfig, p)
    p.write_text("[dataset\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(ShardConfig, p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ShardConfig, tmp_path / "nope.toml")


def test_parse_override_reads_toml_values_or_strings():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a.s=dir:/x/y") == (["a", "s"], "dir:/x/y")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_quality_benchmark_variants_are_valid_configs():
    """bench/quality.py renders the default test split four ways; each must stay a valid config
    that differs from the default only where it says."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", "bench/quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    default = quality.variant_config("default", 8, "configs/shards/default.toml")
    assert list(default.splits) == ["test"] and default.splits["test"].source == "samples:test"
    for name in quality.VARIANTS:
        cfg = quality.variant_config(name, 8, "configs/shards/default.toml")
        assert cfg.splits["test"].samples == 8 and cfg.dataset.seed == default.dataset.seed
    assert quality.variant_config("aligned", 8, "configs/shards/default.toml").imaging.misalign_px == 0.0


# ----------------------------------------------------------------------------- memory estimate


@pytest.mark.parametrize("overrides,needle", [
    (["sources.deadleaves_max_disks=100000000"], "sources.deadleaves_max_disks"),
    (["kernels.steps=100000000"], "kernels.steps"),
    (["dataset.frames=64", "dataset.size=4096"], "dataset.size x dataset.frames"),
])
def test_absurd_memory_is_refused_before_any_work(tmp_path, overrides, needle):
    from pipeline.run import render_dataset

    cfg = tiny_config(*overrides)
    with pytest.raises(ConfigError) as e:
        render_dataset(cfg, tmp_path / "d", progress=False)
    message = str(e.value)
    assert "\n" not in message and needle in message and "--max-worker-gb" in message
    assert not (tmp_path / "d").exists()  # nothing was created


def test_memory_limit_is_configurable():
    from pipeline.config import check_worker_memory, worker_memory

    cfg = tiny_config("sources.deadleaves_max_disks=1000000")
    total = worker_memory(cfg)[0]
    check_worker_memory(cfg, max_gb=total / 2**30 * 1.01)
    check_worker_memory(cfg, max_gb=None)
    with pytest.raises(ConfigError):
        check_worker_memory(cfg, max_gb=total / 2**30 * 0.99)


def test_memory_estimate_bounds_a_measured_worker(tmp_path):
    """The estimate is above the peak RSS of a real render worker, and not absurdly far above."""
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.config import worker_memory

    sets = ["splits.train.samples=3", "splits.train.samples_per_shard=3", "splits.val.samples=1",
            "splits.test.samples=1", "splits.val.source='deadleaves'", "splits.test.source='deadleaves'",
            "sources.deadleaves_max_disks=400000"]
    code = ("import resource, sys; from pipeline.__main__ import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "render", "--config", "configs/shards/default.toml", "--engine", "local",
           "--workers", "1", "--quiet", "--out", str(tmp_path / "d")]
    for s in sets:
        cmd += ["--set", s]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = int(proc.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is KiB on Linux
    estimate = worker_memory(load_shard_config(root / "configs/shards/default.toml", sets))[0]
    assert measured < estimate < 4 * measured, (measured >> 20, estimate >> 20)
