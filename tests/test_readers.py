"""Other readers of the shards: webdataset's ``wids`` (random access through <split>.wids.json,
written beside the manifest) and webdataset's decoders (burst and target decoded the same way)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import format as fmt
from pipeline.format import MEMBERS, decode_sample, iter_shard, read_manifest
from pipeline.inspect import check_dataset


def raw_samples(root: Path, split: str) -> list[dict]:
    man = read_manifest(root)
    return [raw for e in man.shards(split) for raw in iter_shard(root / e.file, sha256=e.sha256)]


# ----------------------------------------------------------------------------- wids


def test_render_writes_a_wids_shard_list_per_split(tiny_shards):
    man = read_manifest(tiny_shards)
    for split, s in man.splits.items():
        path = tiny_shards / f"{split}.wids.json"
        assert path.read_bytes() == fmt.wids_index(man, split)
        desc = json.loads(path.read_text())
        assert desc["wids_version"] == 1 and desc["name"] == f"tiny-{split}"
        assert desc["shardlist"] == [{"url": e.file, "nsamples": e.samples} for e in s.shards]
    report = check_dataset(tiny_shards)  # part of the dataset: neither an error nor a warning
    assert report.errors == [] and report.warnings == []


def test_wids_shard_list_dataset_gives_random_access_to_the_samples(tiny_shards, tmp_path):
    wids = pytest.importorskip("wids")
    man = read_manifest(tiny_shards)
    ds = wids.ShardListDataset(str(tiny_shards / "train.wids.json"), cache_dir=str(tmp_path / "cache"),
                               transformations=[])
    ours = raw_samples(tiny_shards, "train")
    assert len(ds) == man.split("train").samples == len(ours)
    for i in np.random.default_rng(0).permutation(len(ds)):  # any order: an index is a sample
        sample = ds[int(i)]
        assert sample["__key__"] == man.key("train", int(i)) == ours[i]["__key__"]
        raw = {"__key__": sample["__key__"], **{m: sample[f".{m}"].getvalue() for m in MEMBERS}}
        assert {m: raw[m] for m in MEMBERS} == {m: ours[i][m] for m in MEMBERS}
        decoded = decode_sample(raw, "wids", man.frames, man.size)  # and it decodes with the checked decoders
        assert decoded["burst"].shape == (man.frames, man.size, man.size, 3)


def test_verify_checks_the_wids_shard_lists(tiny_shards, tmp_path):
    ds = Path(shutil.copytree(tiny_shards, tmp_path / "ds"))
    desc = json.loads((ds / "val.wids.json").read_text())
    desc["shardlist"][1]["nsamples"] = 5
    (ds / "val.wids.json").write_text(json.dumps(desc))
    (ds / "test.wids.json").unlink()
    report = check_dataset(ds)
    assert report.errors == ["val.wids.json: does not match the manifest's shards of split 'val'"]
    assert report.warnings == ["test.wids.json: missing (webdataset's wids reads it; render the dataset again "
                               "to write it)"]


# ----------------------------------------------------------------------------- webdataset decoders


def test_webdataset_decode_recipes_give_burst_and_target_the_same_way(tiny_shards):
    """The README's recipes. ``.decode("rgb")`` alone leaves the burst uint8 (N, H, W, 3) and makes
    the target float32 (H, W, 3) in [0, 1]; "rgb8" gives both uint8, and a handler for burst.npy
    before "rgb" gives both float32 in [0, 1]. Brace notation lists the shards."""
    import io

    import webdataset as wds

    urls = str(tiny_shards / "val-{000000..000001}.tar")
    ours = [decode_sample(raw, "ours") for raw in raw_samples(tiny_shards, "val")]

    mixed = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("rgb")))
    assert mixed["burst.npy"].dtype == np.uint8 and mixed["target.png"].dtype == np.float32  # the pitfall

    as_uint8 = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))

    def burst_float(key, data):
        if key.endswith("burst.npy"):
            return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32) / 255
        return None  # anything else: the next handler

    as_float = list(wds.WebDataset(urls, shardshuffle=False).decode(burst_float, "rgb"))
    assert len(as_uint8) == len(as_float) == len(ours) == 8
    for u, f, o in zip(as_uint8, as_float, ours):
        assert u["__key__"] == f["__key__"] == o["key"]
        b, t = u["burst.npy"], u["target.png"]
        assert b.dtype == t.dtype == np.uint8 and b.shape[1:] == t.shape and t.shape[-1] == 3
        assert np.array_equal(b, o["burst"]) and np.array_equal(t, o["target"])
        b, t = f["burst.npy"], f["target.png"]
        assert b.dtype == t.dtype == np.float32 and b.shape[1:] == t.shape
        assert np.allclose(b, o["burst"] / 255.0, atol=1e-6) and np.allclose(t, o["target"] / 255.0, atol=1e-6)
        assert u["json"] == f["json"] and isinstance(u["json"], dict)
