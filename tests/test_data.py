"""trainer/data.py on the tiny rendered dataset: batches, augmentation, readers, order, bad shards."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import data
from trainer.fba import fba_frames
from trainer.data import (DataError, TrainStream, augment, geometry_target, iter_samples, load_val_set, read_manifest,
                          shifted_crop)

CROP, MIN_FR, MAX_FR = 32, 1, 4


def stream(path, **kw) -> TrainStream:
    args = dict(steps=24, batch_size=3, seed=5, crop=CROP, min_frames=MIN_FR, max_frames=MAX_FR,
                shuffle_buffer=6, num_workers=0)
    args.update(kw)
    return TrainStream(path, "train", **args)


def batches(s: TrainStream, worker: int = 0) -> list[dict]:
    return list(s.iter_worker(worker))


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("kernels.zarr"))
    return dst


def set_manifest_bytes(root: Path, file: str) -> None:
    """Make the manifest list the current size and sha256 of ``file`` (after a test rewrote it),
    so that the reader's checks past the checksum are what the test exercises."""
    manifest = json.loads((root / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["file"] == file:
                shard["bytes"] = (root / file).stat().st_size
                shard["sha256"] = hashlib.sha256((root / file).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a tar, passing each (name, bytes) through ``change`` (None drops the member)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            out = change(name, payload)
            if out is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(out)
            tar.addfile(info, io.BytesIO(out))


# ----------------------------------------------------------------------------- samples in key order


def test_iter_samples_key_order_shapes_and_meta(tiny_shards):
    samples = list(iter_samples(tiny_shards, "val"))
    keys = [s["key"] for s in samples]
    assert keys == sorted(keys) and len(keys) == 8 and len(set(keys)) == 8
    assert keys[0] == "val-000000-000000" and keys[-1].startswith("val-000001-")
    for s in samples:
        assert s["burst"].dtype == np.uint8 and s["burst"].shape == (4, 48, 48, 3)
        assert s["target"].dtype == np.uint8 and s["target"].shape == (48, 48, 3)
        assert isinstance(s["meta"], dict) and s["meta"]
    # the photo-based test split reads the same way
    assert len(list(iter_samples(tiny_shards, "test"))) == 8


def test_validation_set_is_the_first_samples_in_key_order(tiny_shards):
    first = load_val_set(tiny_shards, "val", 5)
    again = load_val_set(tiny_shards, "val", 5)
    assert first["keys"] == [s["key"] for s in iter_samples(tiny_shards, "val")][:5]
    assert first["keys"] == again["keys"]
    assert np.array_equal(first["burst"], again["burst"]) and first["burst"].shape == (5, 4, 48, 48, 3)
    assert first["target"].shape == (5, 48, 48, 3)


def test_shards_are_read_with_the_formats_own_reader_not_webdataset():
    """trainer.data reads tars with pipeline.format.iter_shard: no webdataset module is imported
    (its private tar iterators can change under a version bump)."""
    code = "import sys, trainer.data; assert not [m for m in sys.modules if m.split('.')[0] == 'webdataset']"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_missing_folder_and_manifest_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found") as e:
        read_manifest(tmp_path / "nope")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        list(iter_samples(tmp_path, "train"))


# ----------------------------------------------------------------------------- training batches


def test_stream_batches_shapes_and_burst_length_per_batch(tiny_shards):
    out = batches(stream(tiny_shards))
    assert [b["step"] for b in out] == list(range(24))
    lengths = []
    for b in out:
        burst, target = b["burst"], b["target"]
        n = burst.shape[1]  # one burst length for the whole batch
        # frame 0 alone has no shift: the stored target; more frames (misaligned by default): the
        # target moved to their mean shift, float 0..255
        assert burst.dtype == torch.uint8 and target.dtype == (torch.uint8 if n == 1 else torch.float32)
        assert 0 <= float(target.min()) and float(target.max()) <= 255
        assert burst.shape == (3, n, CROP, CROP, 3) and target.shape == (3, CROP, CROP, 3)
        assert MIN_FR <= n <= MAX_FR
        assert all(k.startswith("train-") for k in b["keys"]) and len(b["keys"]) == 3
        lengths.append(n)
    assert len(set(lengths)) >= 3  # varies across batches


def test_augmentation_is_joint_on_burst_and_target():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    burst = np.repeat(image[None], 4, axis=0)
    outputs = set()
    for seed in range(24):
        b, t = augment(burst, image, 3, 32, np.random.default_rng(seed))
        assert b.shape == (3, 32, 32, 3) and t.shape == (32, 32, 3) and b.dtype == np.uint8
        for frame in b:
            assert np.array_equal(frame, t)
        outputs.add(t.tobytes())
    assert len(outputs) > 12  # crops, flips and rotations actually vary


def test_augmentation_cuts_the_fba_guide_like_the_burst():
    # The guide is the FBA of the chosen frames over the whole stored window, then cut, flipped
    # and rotated with the burst; the random draws do not change with it. With the crop the
    # whole window, it is the FBA of the returned frames (FBA commutes with the 8 symmetries).
    rng = np.random.default_rng(3)
    burst = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    target = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for seed in range(6):
        b, t, g = augment(burst, target, 3, 40, np.random.default_rng(seed), guide=True)
        b0, t0 = augment(burst, target, 3, 40, np.random.default_rng(seed))
        assert np.array_equal(b, b0) and np.array_equal(t, t0)
        assert g.dtype == np.float32 and g.shape == (40, 40, 3)
        np.testing.assert_allclose(g, fba_frames(b)[0].permute(1, 2, 0).numpy(), atol=1e-5)
    # a smaller crop is a window of the whole-window FBA, not the FBA of the crop
    b, _, g = augment(burst, target, 4, 16, np.random.default_rng(0), guide=True)
    assert g.shape == (16, 16, 3)
    assert np.abs(g - fba_frames(b)[0].permute(1, 2, 0).numpy()).max() > 1e-3


def test_augmentation_draws_a_random_subset_and_order_of_frames():
    burst = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30, 40)])
    target = np.zeros((8, 8, 3), np.uint8)
    orders = set()
    for seed in range(30):
        b, _ = augment(burst, target, 3, 8, np.random.default_rng(seed))
        values = tuple(int(f[0, 0, 0]) for f in b)
        assert len(set(values)) == 3 and set(values) <= {10, 20, 30, 40}
        assert values[0] == 10  # the reference (stored frame 0) always comes first
        orders.add(values)
    assert len(orders) == 6  # every subset and order of 2 of the other 3 frames


def test_readers_read_disjoint_shards(tiny_shards):
    """2 ranks × 2 workers = 4 readers over 4 shards: one shard each."""
    seen = {}
    for rank in range(2):
        s = stream(tiny_shards, world_size=2, rank=rank, num_workers=2, steps=12)
        assert s.mode == "shards"
        for worker in range(2):
            got = batches(s, worker)
            assert {b["reader"] for b in got} == {rank * 2 + worker}
            seen[(rank, worker)] = {name for b in got for name in b["shards"]}
    assert all(len(v) == 1 for v in seen.values())
    assert set.union(*seen.values()) == {f"train-{i:06d}.tar" for i in range(4)}


def test_more_readers_than_shards_split_samples(tiny_shards):
    """2 ranks × 3 workers = 6 readers > 4 shards: every reader keeps samples with index ≡ slot (mod 6)."""
    keys = {}
    for rank in range(2):
        s = stream(tiny_shards, world_size=2, rank=rank, num_workers=3, steps=18)
        assert s.mode == "samples" and "only 4 shards" in s.note
        for worker in range(3):
            got = batches(s, worker)
            slot = rank * 3 + worker
            keys[slot] = {k for b in got for k in b["keys"]}
            assert all(int(k.split("-")[2]) % 6 == slot for k in keys[slot])
    assert all(keys.values())
    assert sum(len(v) for v in keys.values()) == len(set.union(*keys.values()))


def test_batches_are_a_function_of_the_step(tiny_shards, monkeypatch):
    """Starting at any step (mid-round, across rounds) reproduces the batches of a full run."""
    monkeypatch.setattr(data, "ROUND_MIN_SAMPLES", 8)  # rounds of 4 batches of 2
    kw = dict(batch_size=2, shuffle_buffer=1, num_workers=2, steps=22)
    full = {b["step"]: b for w in range(2) for b in batches(stream(tiny_shards, **kw), w)}
    assert sorted(full) == list(range(22))
    for start in (5, 9, 16):
        later = stream(tiny_shards, start_step=start, **kw)
        got = {b["step"]: b for w in range(2) for b in batches(later, w)}
        assert sorted(got) == list(range(start, 22))
        for step, b in got.items():
            assert b["keys"] == full[step]["keys"]
            assert torch.equal(b["burst"], full[step]["burst"]) and torch.equal(b["target"], full[step]["target"])
    # another seed gives other batches
    other = batches(stream(tiny_shards, seed=6, **kw), 0)
    def signature(b):
        return b["keys"], b["burst"].numpy().tobytes()

    assert all(signature(b) != signature(full[b["step"]]) for b in other)


def test_dataloader_workers_deliver_steps_in_order(tiny_shards):
    s = stream(tiny_shards, num_workers=2, steps=9, start_step=3)
    steps = [b["step"] for b in data.train_loader(s)]
    assert steps == list(range(3, 9))


# ----------------------------------------------------------------------------- bad data


def corrupt_header_mid_file(path: Path) -> None:
    """Overwrite the tar header of the 5th member with garbage (size unchanged)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[4].offset
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 512] = b"\xff" * 512
    path.write_bytes(bytes(raw))


def test_corrupt_shard_mid_stream_names_the_shard(tiny_shards, tmp_path):
    root = copy_dataset(tiny_shards, tmp_path / "ds")
    corrupt_header_mid_file(root / "train-000002.tar")
    set_manifest_bytes(root, "train-000002.tar")  # the tar reader's own check, not the checksum
    with pytest.raises(DataError, match="train-000002.tar") as e:
        batches(stream(root, steps=40))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="train-000002.tar"):
        list(iter_samples(root, "train"))
    # raised in a DataLoader worker process, it comes back as the same one line
    with pytest.raises(DataError, match=r"^shard \S+train-000002\.tar: ") as e:
        list(data.train_loader(stream(root, steps=40, num_workers=2)))
    assert "\n" not in str(e.value)


def test_truncated_or_missing_shard_is_caught_before_reading(tiny_shards, tmp_path):
    root = copy_dataset(tiny_shards, tmp_path / "ds")
    path = root / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"train-000001\.tar: 5000 bytes"):
        stream(root)
    path.unlink()
    with pytest.raises(DataError, match=r"train-000001\.tar: file missing"):
        stream(root)


def test_sample_missing_a_member_or_with_wrong_dtype(tiny_shards, tmp_path):
    root = copy_dataset(tiny_shards, tmp_path / "ds")
    rewrite_tar(root / "val-000000.tar", lambda name, b: None if name == "val-000000-000001.target.png" else b)
    set_manifest_bytes(root, "val-000000.tar")

    def as_float(name, b):
        if name == "val-000001-000005.burst.npy":
            out = io.BytesIO()
            np.save(out, np.load(io.BytesIO(b)).astype(np.float32))
            return out.getvalue()
        return b

    rewrite_tar(root / "val-000001.tar", as_float)
    set_manifest_bytes(root, "val-000001.tar")
    with pytest.raises(DataError, match=r"val-000000\.tar: sample val-000000-000001: missing member\(s\) target.png"):
        list(iter_samples(root, "val"))
    shard = data.split_shards(root, read_manifest(root), "val")[1]
    raw = next(r for r in data.read_shard(shard) if r["__key__"] == "val-000001-000005")
    with pytest.raises(DataError, match=r"val-000001\.tar: sample val-000001-000005: burst.npy is float32"):
        data.decode_sample(raw, shard, 4, 48)


def test_skip_mode_counts_bad_shards_and_samples(tiny_shards, tmp_path, capsys):
    root = copy_dataset(tiny_shards, tmp_path / "ds")
    corrupt_header_mid_file(root / "train-000002.tar")
    set_manifest_bytes(root, "train-000002.tar")
    rewrite_tar(root / "train-000000.tar", lambda name, b: None if name == "train-000000-000003.json" else b)
    set_manifest_bytes(root, "train-000000.tar")
    out = batches(stream(root, steps=40, on_bad_shard="skip"))
    assert len(out) == 40 and all(b["burst"].shape[0] == 3 for b in out)
    assert out[-1]["skipped_shards"] >= 1 and out[-1]["skipped_samples"] >= 1
    assert "train-000000-000003" not in {k for b in out for k in b["keys"]}
    err = capsys.readouterr().err
    # the shard is drawn again and again (resampled), but each problem is reported once
    assert err.count("skipping the rest of shard") == 1 and "train-000002.tar: holds" in err
    assert err.count("train-000000-000003: missing member(s) json") == 1


def flip_byte_in_burst(path: Path, nth: int = 0) -> str:
    """Invert one pixel byte in the middle of the ``nth`` burst.npy of a tar; return its key. The
    file keeps its size and the array its dtype and shape: only the checksum can tell."""
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".burst.npy")][nth]
    raw = bytearray(path.read_bytes())
    raw[member.offset_data + member.size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return member.name.split(".")[0]


def test_byte_flip_inside_a_burst_is_caught_by_the_checksum(tiny_shards, tmp_path, capsys):
    root = copy_dataset(tiny_shards, tmp_path / "ds")
    path = root / "train-000001.tar"
    size = path.stat().st_size
    flip_byte_in_burst(path, 2)
    assert path.stat().st_size == size
    shard = data.split_shards(root, read_manifest(root), "train")[1]  # the size check passes
    unchecked = dataclasses.replace(shard, sha256=None)
    assert len([data.decode_sample(r, unchecked, 4, 48) for r in data.read_shard(unchecked)]) == 4
    # default: the stream stops with one line naming the shard, before any of its samples is used
    with pytest.raises(DataError, match=r"^shard \S+train-000001\.tar: sha256 differs from the manifest") as e:
        batches(stream(root, steps=40))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="sha256 differs"):
        next(data.read_shard(shard))
    # skip: counted as a skipped shard, none of its samples in any batch, one warning
    out = batches(stream(root, steps=40, on_bad_shard="skip"))
    assert len(out) == 40 and out[-1]["skipped_shards"] >= 1 and out[-1]["skipped_samples"] == 0
    assert "train-000001.tar" not in {s for b in out for s in b["shards"]}
    err = capsys.readouterr().err
    assert err.count("skipping shard") == 1 and "train-000001.tar: sha256 differs from the manifest" in err
    # validation (and evaluation, through iter_samples) read shards the same way
    flip_byte_in_burst(root / "val-000001.tar")
    with pytest.raises(DataError, match=r"val-000001\.tar: sha256 differs"):
        load_val_set(root, "val", 8)
    assert len(load_val_set(root, "val", 4)["keys"]) == 4  # the good shard before it still reads


def _smooth(y, x):
    return 120 + 60 * np.sin(0.3 * x + 0.2 * y) + 50 * np.cos(0.25 * y - 0.1 * x)


def test_shifted_crop_moves_the_image_by_the_shift():
    y, x = np.mgrid[:64, :64].astype(np.float64)
    image = np.repeat(_smooth(y, x)[..., None], 3, axis=2)
    yy, xx = np.mgrid[:32, :32]
    for dx, dy in [(0.37, -1.6), (-2.5, 0.25), (0.0, 0.5)]:
        out = shifted_crop(image, 10, 12, 32, (dx, dy))
        want = _smooth(10 + yy - dy, 12 + xx - dx)  # out(p) = image(p - shift)
        assert np.abs(out[..., 1] - want).max() < 0.5  # of a 220-level signal: Lanczos-3
    exact = shifted_crop(image.astype(np.uint8), 10, 12, 32, (2.0, -1.0))  # integer: a plain crop
    np.testing.assert_array_equal(exact, image.astype(np.uint8)[11:43, 10:42])
    with pytest.raises(ValueError, match="leaves"):
        shifted_crop(image, 1, 12, 32, (0.0, 0.5))


def test_mean_geometry_targets_follow_the_chosen_frames():
    """A "mean" model is scored against the target at the mean shift of the frames it gets."""
    y, x = np.mgrid[:40, :40].astype(np.float64)
    target = np.repeat(_smooth(y, x)[..., None], 3, axis=2).astype(np.uint8)
    burst = np.stack([np.full((40, 40, 3), v, np.uint8) for v in range(4)])
    shifts = np.array([[0.0, 0.0], [1.0, -0.5], [-0.4, 2.0], [0.6, 0.3]])
    for seed in range(10):
        b, t = augment(burst, target, 2, 16, np.random.default_rng(seed), shifts)
        b0, t0 = augment(burst, target, 2, 16, np.random.default_rng(seed))
        chosen = [int(f[0, 0, 0]) for f in b]
        assert chosen[0] == 0 and t.dtype == np.float32
        assert not np.array_equal(t, t0.astype(np.float32))
    assert geometry_target(target, shifts[:1], "mean") is target  # registered: the stored target
    assert geometry_target(target, shifts, "reference") is target
    moved = geometry_target(target, shifts, "mean")
    m = shifts.mean(axis=0)
    np.testing.assert_allclose(moved[8:32, 8:32], shifted_crop(target, 8, 8, 24, tuple(m)), atol=1e-4)
