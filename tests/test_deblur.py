"""The user path: loading frames, alignment, tiled inference, order invariance, bad inputs."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates

from trainer import deblur
from trainer.deblur import (AlignmentError, align_burst, alignment_level, auto_overlap, choose_reference,
                            estimate_alignment, gray, load_frames, pyramid, receptive_radius, run_tiled)
from trainer.model import ModelConfig, build_model, load


def make_model(seed=0, **kw):
    # module init draws from the global generator: seed it inside fork_rng to leave it untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(ModelConfig(**{"width": 8, **kw})).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.cfg)}}, path)
    return path


PHOTO = skimage.data.astronaut().astype(np.float64)  # 512x512 RGB


def render(h, shape, offset=(150, 120), blur=0.0, noise=0.0, rng=None):
    """A view of PHOTO: out(x) = PHOTO(offset + h(x)), bilinear; optional blur and noise. uint8."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    xw, yw, _ = deblur._apply(h, xs, ys)
    out = np.stack([map_coordinates(PHOTO[..., c], [yw + offset[0], xw + offset[1]], order=1)
                    for c in range(3)], axis=-1)
    if blur:
        out = gaussian_filter(out, (blur, blur * 0.3, 0))  # directional, camera-shake-like
    if noise:
        out = out + rng.normal(0, noise, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def translation(dx, dy):
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]])


def corner_error(h_est, h_true, shape):
    cx = np.array([0, shape[1] - 1, shape[1] - 1, 0], float)
    cy = np.array([0, 0, shape[0] - 1, shape[0] - 1], float)
    ax, ay, _ = deblur._apply(h_est, cx, cy)
    bx, by, _ = deblur._apply(h_true, cx, cy)
    return float(np.max(np.hypot(ax - bx, ay - by)))


def align_pair(ref, frame, motion):
    level = alignment_level(ref.shape[:2], 1024)
    return estimate_alignment(pyramid(gray(ref), level), pyramid(gray(frame), level), motion)


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("shift", [(2.3, -1.7), (0.37, 0.81), (-7.6, 4.25)])
def test_translation_recovers_subpixel_shift(shift):
    shape = (96, 128)
    ref = render(np.eye(3), shape)
    frame = render(translation(*shift), shape)  # frame(x) = photo(x + shift): ref(x) = frame(x - shift)
    a = align_pair(ref, frame, "translation")
    np.testing.assert_allclose(a.homography[:2, 2], [-shift[0], -shift[1]], atol=0.1)
    assert a.correlation > 0.99


def test_homography_recovered_on_a_noisy_frame():
    shape = (256, 320)  # at 192x224 the corners of this crop are too flat to pin down: 0.17 px
    h = np.array([[1.01, 0.02, 3.1], [-0.015, 0.995, -2.2], [2e-5, -3e-5, 1.0]])
    ref = render(np.eye(3), shape)
    frame = render(h, shape, noise=2.0, rng=np.random.default_rng(0))
    a = align_pair(ref, frame, "homography")
    assert corner_error(a.homography, np.linalg.inv(h), shape) < 0.1
    # a translation-only model cannot express the rotation: a much larger residual
    assert corner_error(align_pair(ref, frame, "translation").homography, np.linalg.inv(h), shape) > 1.0


def test_alignment_failure_names_the_frame():
    shape = (96, 128)
    ref = render(np.eye(3), shape)
    other = np.asarray(Image.fromarray(skimage.data.coffee()).resize((128, 96)))  # unrelated content
    with pytest.raises(AlignmentError, match="frame b.png: alignment to a.png failed"):
        align_burst([ref, other], reference=0, names=["a.png", "b.png"])


def test_aligned_frames_match_the_reference():
    shape = (96, 128)
    ref = render(np.eye(3), shape)
    frames = [render(translation(3.4, -2.2), shape), ref, render(translation(-1.5, 0.6), shape)]
    aligned, index, alignments = align_burst(frames, reference=1)
    assert index == 1 and alignments[1] is None and aligned[1] is frames[1]
    inner = (slice(8, -8), slice(8, -8))  # away from the fill-in border
    unaligned = np.abs(frames[0][inner].astype(int) - ref[inner].astype(int)).mean()  # ~23 levels
    for frame in (aligned[0], aligned[2]):
        # ~3.5 levels remain: the scene was resampled bilinearly twice (render, then warp)
        diff = np.abs(frame[inner].astype(int) - ref[inner].astype(int)).mean()
        assert diff < 4.5 and diff < 0.2 * unaligned, (diff, unaligned)


def test_auto_reference_is_the_sharpest_frame():
    shape = (96, 128)
    sharp = render(translation(1, 1), shape)
    blurred = [render(translation(0, 0), shape, blur=2.5), render(translation(2, -1), shape, blur=1.5)]
    level = alignment_level(shape, 1024)
    for order in ([sharp, *blurred], [blurred[0], sharp, blurred[1]], [*blurred, sharp]):
        index = choose_reference([pyramid(gray(f), level)[level] for f in order])
        assert order[index] is sharp


# ----------------------------------------------------------------------------- tiling


def test_receptive_radius_sets_the_overlap():
    # 4 levels, 2 convs per block: 40 px; margins of overlap/2 - 8 >= 40 -> 96 (a multiple of 8)
    assert receptive_radius(ModelConfig()) == 40
    assert auto_overlap(ModelConfig()) == 96
    assert receptive_radius(ModelConfig(width=8, mults=[1, 2, 3])) < 40


def test_tiled_equals_untiled():
    # With the automatic overlap every output pixel comes from a tile holding its whole receptive
    # field, and tile origins sit on the model's stride grid: the same numbers as one pass, up to
    # float rounding (measured 2e-7). 150x170 in 128-px tiles: 2x3 tiles of two sizes per axis.
    model = make_model()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (150, 170, 3), dtype=np.uint8) for _ in range(3)]
    whole = run_tiled(model, frames, tile=512)
    tiled = run_tiled(model, frames, tile=128, batch=2)
    assert np.abs(tiled - whole).max() < 1e-5
    # the overlap is what makes this work: a thin one shows the tile seams (measured ~0.06)
    thin = run_tiled(model, frames, tile=128, overlap=16)
    assert np.abs(thin - whole).max() > 1e-3
    # and one untiled pass is the model itself
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255)[None]
    with torch.no_grad():
        direct = model(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(whole, direct, atol=1e-6)


class OutOfMemoryAboveOne(torch.nn.Module):
    """Wraps a model; a batch of more than one tile 'runs out of GPU memory'."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_halves_the_batch():
    model = make_model()
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (120, 150, 3), dtype=np.uint8) for _ in range(2)]
    wrapped = OutOfMemoryAboveOne(model)
    out = run_tiled(wrapped, frames, tile=112, batch=4)
    assert max(wrapped.calls) == 4 and wrapped.calls[-1] == 1
    np.testing.assert_array_equal(out, run_tiled(model, frames, tile=112, batch=1))


def test_tiles_cover_with_overlap_on_the_stride_grid():
    for length in (97, 150, 513, 1000, 1024, 3000, 4000):
        for tile, overlap in ((128, 96), (512, 96), (256, 32)):
            tiles = deblur.tile_starts(length, tile, overlap, 8)
            assert tiles[0][0] == 0 and tiles[-1][1] == length
            assert all(s % 8 == 0 and e - s <= max(tile + 7, length if len(tiles) == 1 else 0) for s, e in tiles)
            assert all(a_end - b_start >= overlap for (_, a_end), (b_start, _) in zip(tiles, tiles[1:]))
    assert deblur.tile_starts(200, 256, 96, 8) == [(0, 200)]
    # balanced: 4000 px in 512-px tiles computes 22% twice, not the 28% of a fixed stride
    assert sum(e - s for s, e in deblur.tile_starts(4000, 512, 96, 8)) <= 1.23 * 4000
    with pytest.raises(ValueError, match="must exceed"):
        deblur.tile_starts(1000, 100, 96, 8)


# ----------------------------------------------------------------------------- the command


def write_burst(folder, shape=(96, 112)):
    """Four frames of one scene: shifted, differently blurred, noisy. Returns their paths."""
    rng = np.random.default_rng(3)
    views = [((0, 0), 0.0), ((2.6, -1.3), 1.5), ((-1.2, 2.1), 2.5), ((0.8, 3.3), 1.0)]
    paths = []
    for i, (shift, blur) in enumerate(views):
        path = folder / f"frame{i}.png"
        Image.fromarray(render(translation(*shift), shape, blur=blur, noise=2.0, rng=rng)).save(path)
        paths.append(str(path))
    return paths


def test_reordering_the_files_gives_the_same_output(tmp_path, checkpoint):
    paths = write_burst(tmp_path)
    outputs = []
    for i, order in enumerate(([0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0])):
        out = tmp_path / f"out{i}.png"
        args = ["--checkpoint", str(checkpoint), *[paths[j] for j in order], "--out", str(out),
                "--tile", "104", "--device", "cpu", "--quiet"]
        assert deblur.main(args) == 0
        outputs.append(np.asarray(Image.open(out)))
    assert outputs[0].shape == (96, 112, 3) and outputs[0].dtype == np.uint8
    for other in outputs[1:]:
        # float rounding of the frame mean may flip a pixel across a .5 boundary, no more
        assert np.abs(other.astype(int) - outputs[0].astype(int)).max() <= 1
        assert (other == outputs[0]).mean() > 0.999
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_float_output_is_order_invariant(checkpoint):
    model = load(checkpoint)
    rng = np.random.default_rng(5)
    frames = [render(translation(*s), (64, 80), blur=b, noise=2.0, rng=rng)
              for s, b in (((0, 0), 1.0), ((1.5, -0.7), 0.0), ((-2.2, 1.1), 2.0))]
    a = deblur.deblur_frames(model, frames)
    b = deblur.deblur_frames(model, [frames[2], frames[0], frames[1]])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed as 30 high, 20 wide
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    (frame,) = load_frames([tmp_path / "r.jpg"])
    assert frame.shape == (30, 20, 3) and frame.dtype == np.uint8


def test_bad_inputs_give_one_clear_error(tmp_path, checkpoint):
    paths = write_burst(tmp_path)
    base = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o.png"), "--device", "cpu", "--quiet"]

    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="small.png is 60x50 but .*frame0.png is 112x96"):
        deblur.main([*base, paths[0], str(tmp_path / "small.png")])

    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        deblur.main([*base, paths[0], str(tmp_path / "junk.png")])

    with pytest.raises(FileNotFoundError, match="frame not found: .*missing.png"):
        deblur.main([*base, paths[0], str(tmp_path / "missing.png")])

    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a burst-deblur checkpoint"):
        deblur.main(["--checkpoint", str(tmp_path / "other.pt"), *base[2:], *paths])

    other = tmp_path / "other.png"
    Image.fromarray(np.asarray(Image.fromarray(skimage.data.coffee()).resize((112, 96)))).save(other)
    with pytest.raises(AlignmentError, match="frame other.png: alignment to frame0.png failed"):
        deblur.main([*base, "--reference", "0", paths[0], str(other)])

    with pytest.raises(ValueError, match="unknown image extension"):
        deblur.main([*base[:2], "--out", str(tmp_path / "o.xyz"), *paths])
    with pytest.raises(ValueError, match="out of range"):
        deblur.main([*base, "--reference", "7", *paths])
    assert not (tmp_path / "o.png").exists()


def test_the_shipped_model_is_the_default_and_beats_the_mean_of_the_frames(tmp_path):
    """`deblur` without --checkpoint runs models/burst-deblur.pt (in git). On a motion-blurred,
    registered 8-frame burst of a real test photograph (rendered by the pipeline, never seen in
    training) its output is clearly closer to the sharp photo than the mean of the frames."""
    from pipeline.config import load_shard_config
    from pipeline.render import render_sample
    from trainer.metrics import psnr
    from trainer.model import SHIPPED, load

    assert SHIPPED.is_file() and SHIPPED.stat().st_size < 5_000_000
    assert load(SHIPPED).cfg.geometry == "mean"
    cfg = load_shard_config("configs/shards/default.toml",
                            ["imaging.misalign_px=0.0", "imaging.outlier_prob=0.0", "imaging.jpeg_prob=0.0"])
    sample = render_sample(cfg, "test", 2)  # a strongly shaken burst (kernel RMS radius 3-7 px)
    paths = []
    for i, frame in enumerate(sample["burst"]):
        paths.append(str(tmp_path / f"f{i}.png"))
        Image.fromarray(frame).save(paths[-1])
    out = tmp_path / "sharp.png"
    assert deblur.main([*paths, "--out", str(out), "--no-align", "--device", "cpu", "--quiet"]) == 0
    target = sample["target"] / 255.0
    output = np.asarray(Image.open(out)) / 255.0
    mean = sample["burst"].mean(axis=0) / 255.0
    assert psnr(output, target) > psnr(mean, target) + 2.0


# ----------------------------------------------------------------------------- hostile input


def _png(path, width, height, bit_depth=8, colour=2, rows=None):
    """A PNG written by hand: any declared size (a decompression bomb needs no pixel data) and
    16-bit colour, which Pillow cannot write."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"" if rows is None else b"".join(b"\0" + r for r in rows)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _cli_error(capsys, argv):
    from trainer.__main__ import main as cli_main

    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_out_is_checked_before_any_work_and_never_overwrites_an_input(tmp_path, capsys, checkpoint, monkeypatch):
    paths = write_burst(tmp_path)
    before = [open(p, "rb").read() for p in paths]
    monkeypatch.setattr(deblur, "deblur_frames", lambda *a, **k: pytest.fail("work started"))
    base = ["deblur", "--checkpoint", str(checkpoint), "--device", "cpu", "--quiet", *paths]
    monkeypatch.chdir(tmp_path)
    for out in (paths[1], f"./{Path(paths[1]).name}", str(tmp_path / "sub" / ".." / Path(paths[1]).name)):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert "is one of the input frames" in _cli_error(capsys, [*base, "--out", out])
    link = tmp_path / "link.png"
    link.symlink_to(paths[2])
    assert "is one of the input frames" in _cli_error(capsys, [*base, "--out", str(link)])
    assert "does not exist" in _cli_error(capsys, [*base, "--out", str(tmp_path / "nowhere" / "o.png")])
    (tmp_path / "sub.png").mkdir()
    assert "is a folder" in _cli_error(capsys, [*base, "--out", str(tmp_path / "sub.png")])
    assert [open(p, "rb").read() for p in paths] == before


def test_decompression_bomb_and_tiny_frames_are_one_line(tmp_path, capsys, checkpoint):
    base = ["deblur", "--checkpoint", str(checkpoint), "--device", "cpu", "--quiet", "--out", str(tmp_path / "o.png")]
    bomb = _png(tmp_path / "bomb.png", 20000, 20000)
    line = _cli_error(capsys, [*base, str(bomb), str(bomb)])
    assert "bomb.png" in line and "decompression bomb" in line and "exceeds limit" in line
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "dot.png")
    line = _cli_error(capsys, [*base, str(tmp_path / "dot.png"), str(tmp_path / "dot.png")])
    assert "dot.png is 1x1" in line and "at least 32 px" in line
    Image.fromarray(np.zeros((16, 20000, 3), np.uint8)).save(tmp_path / "strip.png")
    line = _cli_error(capsys, [*base, str(tmp_path / "strip.png"), str(tmp_path / "strip.png")])
    assert "strip.png is 20000x16" in line
    Image.fromarray(np.zeros((40, 20000, 3), np.uint8)).save(tmp_path / "band.png")
    line = _cli_error(capsys, [*base, str(tmp_path / "band.png"), str(tmp_path / "band.png")])
    assert "band.png is 20000x40" in line and "too elongated to align" in line and "--no-align" in line
    assert not (tmp_path / "o.png").exists()


def test_16_bit_grey_and_colour_follow_one_policy(tmp_path):
    """16-bit frames, grey or colour, load as their top 8 bits (as the pipeline's photo sources
    do: one reader), with a note saying so; never refused, never silently."""
    from pipeline.sources import load_photo

    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (40, 48, 3), dtype=np.uint16)
    colour = _png(tmp_path / "rgb16.png", 48, 40, bit_depth=16, colour=2, rows=[r.astype(">u2").tobytes() for r in rgb16])
    Image.fromarray(rgb16[..., 0]).save(tmp_path / "grey16.png")
    notes = []
    a, b = load_frames([colour, tmp_path / "grey16.png"], log=notes.append)
    np.testing.assert_array_equal(a, (rgb16 >> 8).astype(np.uint8))
    np.testing.assert_array_equal(b, np.repeat((rgb16[..., :1] >> 8).astype(np.uint8), 3, axis=2))
    assert len(notes) == 2 and all("16-bit samples: reduced to 8 bits" in n for n in notes)
    np.testing.assert_array_equal(load_photo(str(colour)), a)  # the pipeline reads it the same way
