"""The evaluation command on the tiny real dataset: outputs, consistency, determinism, bad inputs,
the self-contained report.html (parsed with the standard library: no headless browser here)."""

import base64
import csv
import dataclasses
import io
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import evaluate
from trainer.eval_report import worst_box
from trainer.evaluate import METHODS, choose_examples, format_table, frame_subset, interval
from trainer.model import ModelConfig, build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # module init draws from the global generator: seed it inside fork_rng to leave it untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ModelConfig(width=8))
    path = tmp_path_factory.mktemp("run") / "best.pt"
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.cfg)},
                "versions": {"torch": "9.9-test", "code": "0.0+abc"}}, path)
    return path


@pytest.fixture(scope="module")
def evaluated(tiny_shards, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    args = ["--checkpoint", str(checkpoint), "--data", str(tiny_shards), "--split", "test", "--out", str(out),
            "--frames", "1,2,4", "--device", "cpu", "--batch", "3", "--examples", "2", "--quiet"]
    assert evaluate.main(args) == 0
    return out


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_and_their_consistency(evaluated):
    rows = read_rows(evaluated / "metrics.csv")
    assert list(rows[0]) == ["key", "method", "frames", "subset", "psnr", "ssim"]
    keys = sorted({r["key"] for r in rows})
    assert len(keys) == 8 and all(k.startswith("test-") for k in keys)
    assert len(rows) == 8 * len(METHODS) * 3
    by = {(r["key"], r["method"], int(r["frames"])): r for r in rows}
    assert len(by) == len(rows)  # one row per (sample, method, N)
    for key in keys:
        for n in (1, 2, 4):
            cells = [by[key, m, n] for m in METHODS]
            assert len({c["subset"] for c in cells}) == 1  # every method saw the same frames
            subset = [int(i) for i in cells[0]["subset"].split()]
            assert len(subset) == n == len(set(subset)) and all(0 <= i < 4 for i in subset)
            psnrs = {m: float(by[key, m, n]["psnr"]) for m in METHODS}
            assert psnrs["best"] >= psnrs["first"] - 1e-3  # the oracle can't lose to a fixed pick
            if n == 1:  # one frame: mean, first, best and FBA are that frame
                assert psnrs["mean"] == psnrs["first"] == psnrs["best"]
                assert psnrs["fba"] == pytest.approx(psnrs["first"], abs=1e-3)
            for m in METHODS:
                assert 5 < psnrs[m] < 60 and -1 <= float(by[key, m, n]["ssim"]) <= 1

    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["samples"] == 8 and summary["frames"] == [1, 2, 4] and summary["split"] == "test"
    for m in METHODS:
        for n in (1, 2, 4):
            values = [float(by[k, m, n]["psnr"]) for k in keys]
            stats = summary["methods"][m][str(n)]["psnr"]
            assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-3)  # CSV keeps 4 decimals
            assert stats["lo"] < stats["mean"] < stats["hi"]
    diff = summary["differences"]["model-fba"]["4"]["psnr"]["mean"]
    assert diff == pytest.approx(summary["methods"]["model"]["4"]["psnr"]["mean"]
                                 - summary["methods"]["fba"]["4"]["psnr"]["mean"], abs=1e-9)

    for name in ("psnr_vs_frames.png", "ssim_vs_frames.png", "difference_vs_frames.png", "examples.png"):
        with Image.open(evaluated / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_rerun_is_identical_and_seed_changes_subsets(evaluated, tiny_shards, checkpoint, tmp_path):
    base = ["--checkpoint", str(checkpoint), "--data", str(tiny_shards), "--frames", "1,2,4",
            "--device", "cpu", "--examples", "0", "--quiet"]
    assert evaluate.main([*base, "--out", str(tmp_path / "a"), "--batch", "8"]) == 0  # other batching
    assert (tmp_path / "a" / "metrics.csv").read_text() == (evaluated / "metrics.csv").read_text()
    assert (tmp_path / "a" / "report.html").is_file() and not (tmp_path / "a" / "examples.png").exists()
    assert evaluate.main([*base, "--out", str(tmp_path / "b"), "--seed", "1", "--frames", "2"]) == 0
    subsets_b = {r["key"]: r["subset"] for r in read_rows(tmp_path / "b" / "metrics.csv")}
    subsets_a = {r["key"]: r["subset"] for r in read_rows(evaluated / "metrics.csv") if r["frames"] == "2"}
    assert subsets_a != subsets_b


def test_the_bundled_model_writes_under_the_current_directory(tiny_shards, checkpoint, tmp_path, monkeypatch):
    """Without --checkpoint (the bundled model) and --out, the report goes to runs/shipped/eval-<split>
    under the current directory, never beside the model (git's models/, or the installed package)."""
    import trainer.model as model_mod

    monkeypatch.setattr(model_mod, "SHIPPED", checkpoint)
    monkeypatch.chdir(tmp_path)
    beside = sorted(checkpoint.parent.iterdir())
    assert evaluate.main(["--data", str(tiny_shards), "--split", "test", "--frames", "1", "--quiet"]) == 0
    assert (tmp_path / "runs" / "shipped" / "eval-test" / "summary.json").is_file()
    assert sorted(checkpoint.parent.iterdir()) == beside


def test_printed_table(evaluated):
    summary = json.loads((evaluated / "summary.json").read_text())
    table = format_table(summary).splitlines()
    assert table[0].split() == ["PSNR", "N=1", "N=2", "N=4"]
    assert [line.split()[0] for line in table[1:6]] == list(METHODS)
    model_row = [float(x) for x in table[1].split()[1:]]
    expected = [summary["methods"]["model"][n]["psnr"]["mean"] for n in ("1", "2", "4")]
    assert model_row == pytest.approx(expected, abs=0.006)


def test_frame_subset_is_a_fixed_function_of_seed_sample_n():
    a = frame_subset(0, 3, 4, 8)
    np.testing.assert_array_equal(a, frame_subset(0, 3, 4, 8))
    assert len(set(a.tolist())) == 4 and a.min() >= 0 and a.max() < 8
    assert sorted(frame_subset(0, 3, 8, 8).tolist()) == list(range(8))
    draws = {tuple(frame_subset(s, i, 3, 8)) for s in range(3) for i in range(5)}
    assert len(draws) > 10  # seeds and samples give different subsets
    for i in range(5):  # nested: N + 1 frames are the N frames and one more, the reference first
        subsets = [frame_subset(0, i, n, 8).tolist() for n in range(1, 9)]
        assert all(b[:-1] == a for a, b in zip(subsets, subsets[1:])) and subsets[0] == [0]


def test_interval():
    stats = interval([1.0, 2.0, 3.0, 4.0])
    half = 1.959963984540054 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert stats["mean"] == 2.5 and stats["n"] == 4
    assert stats["lo"] == pytest.approx(2.5 - half) and stats["hi"] == pytest.approx(2.5 + half)
    assert interval([5.0])["lo"] is None and interval([5.0])["mean"] == 5.0
    assert interval([1.0, math.inf])["mean"] is None


def test_bad_inputs(tiny_shards, checkpoint, tmp_path):
    ok = ["--checkpoint", str(checkpoint), "--data", str(tiny_shards), "--out", str(tmp_path / "e"), "--quiet"]
    with pytest.raises(ValueError, match="not a burst-deblur checkpoint"):
        evaluate.main(["--checkpoint", str(tmp_path / "missing.pt"), *ok[2:]])
    torch.save({"state": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a burst-deblur checkpoint"):
        evaluate.main(["--checkpoint", str(tmp_path / "other.pt"), *ok[2:]])
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        evaluate.main([*ok[:2], "--data", str(tmp_path / "nodata"), *ok[4:]])
    with pytest.raises(ValueError, match="no split 'nope'"):
        evaluate.main([*ok, "--split", "nope"])
    with pytest.raises(ValueError, match="stores 4 frames"):
        evaluate.main([*ok, "--frames", "1,5"])
    with pytest.raises(ValueError, match="comma-separated integers"):
        evaluate.main([*ok, "--frames", "1,x"])
    assert not (tmp_path / "e").exists()  # nothing written before the inputs were checked


class ReportParser(HTMLParser):
    """Tables (id -> {row data-key: [cell texts]}), <img> srcs, every attribute value, tag names."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.attrs, self.tags, self.text = {}, [], [], [], []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs.items()]
        if tag == "table":
            self._table = self.tables.setdefault(attrs["id"], {})
        elif tag == "th" and "data-key" in attrs:
            self._row = self._table.setdefault(attrs["data-key"], [])
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def cell_text(stats, digits):
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.{digits}f} [{stats['lo']:.{digits}f}, {stats['hi']:.{digits}f}]"


def test_report_html_is_self_contained_and_matches_summary(evaluated):
    summary = json.loads((evaluated / "summary.json").read_text())
    page = (evaluated / "report.html").read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(page)
    parser.close()
    frames = [str(n) for n in summary["frames"]]
    for metric, digits in (("psnr", 2), ("ssim", 4)):
        assert parser.tables[metric] == {m: [cell_text(summary["methods"][m][n][metric], digits) for n in frames]
                                         for m in METHODS}
        assert parser.tables[f"diff-{metric}"] == {
            d: [cell_text(per_n[n][metric], digits) for n in frames] for d, per_n in summary["differences"].items()}
    assert set(summary["differences"]) == {"model-fba", "model-mean", "model-best"}

    # every image an embedded PNG that decodes; nothing fetched from anywhere
    assert len(parser.images) == 4  # PSNR, SSIM, differences, examples
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            im.load()
            assert im.format == "PNG" and im.width > 300
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    for tag, key, value in parser.attrs:
        assert key not in ("href", "src") or value.startswith("data:"), (tag, key)
    assert not re.search(r"https?:|url\(|@import|file:", page.replace(summary["data"], ""))

    text = " ".join(" ".join(parser.text).split())
    for expected in (summary["checkpoint"], f"dataset {summary['dataset']}", f"split {summary['split']}",
                     f"samples {summary['samples']}", "torch 9.9-test", "code 0.0+abc"):
        assert expected in text
    for example in summary["examples"]:
        assert example["key"] in text and example["reason"] in text


def test_examples_are_chosen_to_inform(evaluated):
    summary = json.loads((evaluated / "summary.json").read_text())
    rows = read_rows(evaluated / "metrics.csv")
    picks = summary["examples"]  # --examples 2: the most blurred, then the largest loss to FBA
    assert len(picks) == 2 and len({p["key"] for p in picks}) == 2
    assert picks[0]["reason"].startswith("most blurred (1 of 8): kernel RMS radius")
    gap = {}
    for r in rows:
        if r["frames"] == "4" and r["method"] in ("model", "fba"):
            gap[r["key"]] = gap.get(r["key"], 0.0) + float(r["psnr"]) * (1 if r["method"] == "model" else -1)
    assert picks[1]["key"] == min(gap, key=gap.get) and picks[1]["reason"].startswith("largest loss to FBA")


def test_choose_examples():
    def sample(i, blur, model, fba):
        return {"index": i, "key": f"k{i}", "blur": blur,
                "scores": {"model": (model, 0.5), "fba": (fba, 0.5), "mean": (20.0 + i, 0.5)}}

    samples = [sample(0, 0.5, 30, 29), sample(1, 3.0, 25, 24), sample(2, 1.0, 20, 23),
               sample(3, 2.0, 28, 27), sample(4, 3.0, 26, 26)]
    picks = choose_examples(samples, 4)
    # blur ranks: 1 and 4 (3.0 px, tie -> lower index), 3, 2, 0; median rank 2 -> sample 3
    assert [p["key"] for p in picks] == ["k1", "k4", "k3", "k2"]
    assert [p["reason"].split(" (")[0].split(":")[0] for p in picks] == [
        "most blurred", "most blurred", "median blur", "largest loss to FBA"]
    assert "model − FBA = -3.00 dB" in picks[3]["reason"]
    assert choose_examples(list(reversed(samples)), 4) == picks  # input order does not matter
    assert [p["key"] for p in choose_examples(samples, 10)] == ["k1", "k4", "k0", "k3", "k2"]  # each once
    assert choose_examples(samples, 0) == [] and choose_examples([], 3) == []
    no_radius = [dict(s, blur=None) for s in samples]  # lowest mean-of-frames PSNR counts as most blurred
    first = choose_examples(no_radius, 1)[0]
    assert first["key"] == "k0" and "mean of frames 20.00 dB" in first["reason"]


def test_worst_box():
    error = np.zeros((40, 50))
    error[30:34, 7:9] = 1.0
    y, x = worst_box(error, 8)
    assert y <= 30 and y + 8 >= 34 and x <= 7 and x + 8 >= 9
    assert worst_box(np.zeros((16, 16)), 8) == (0, 0)  # ties: the first window
