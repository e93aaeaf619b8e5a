"""bench/quality.py's paired comparison of two checkpoints over the same bursts."""

import csv
import importlib.util

import pytest


def load_quality():
    spec = importlib.util.spec_from_file_location("quality", "bench/quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def write_metrics(path, rows):
    """rows: (key, N, model PSNR); an FBA row per burst too, which the comparison must ignore."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "method", "frames", "subset", "psnr", "ssim"])
        for key, n, psnr in rows:
            w.writerow([key, "model", n, 0, psnr, 0.5])
            w.writerow([key, "fba", n, 0, 10.0, 0.5])


def test_paired_versus_is_the_mean_difference_per_burst_length(tmp_path):
    quality = load_quality()
    write_metrics(tmp_path / "a.csv", [("s0", 1, 30.0), ("s1", 1, 31.0), ("s0", 8, 33.0), ("s1", 8, 35.0)])
    write_metrics(tmp_path / "b.csv", [("s0", 1, 30.0), ("s1", 1, 31.0), ("s0", 8, 32.0), ("s1", 8, 32.0)])
    d = quality.paired_versus(tmp_path / "a.csv", tmp_path / "b.csv")
    assert sorted(d) == [1, 8]
    assert d[1] == pytest.approx((0.0, 0.0, 0.0))
    mean, lo, hi = d[8]  # differences 1 and 3: mean 2, s = sqrt(2), half-width 1.96 * sqrt(2) / sqrt(2)
    assert mean == pytest.approx(2.0)
    assert (lo, hi) == pytest.approx((2.0 - 1.96, 2.0 + 1.96), abs=1e-3)
    text = quality.versus_table("t", ["a", "b"], {"b": d})
    assert "| 8 | +2.00 [+0.04, +3.96] |" in text


def test_paired_versus_refuses_different_bursts(tmp_path):
    quality = load_quality()
    write_metrics(tmp_path / "a.csv", [("s0", 1, 30.0), ("s1", 1, 31.0)])
    write_metrics(tmp_path / "b.csv", [("s0", 1, 30.0), ("s2", 1, 31.0)])
    with pytest.raises(ValueError, match="same bursts"):
        quality.paired_versus(tmp_path / "a.csv", tmp_path / "b.csv")
