"""The deblur command and deblur_frames: loading frames, order invariance, bad inputs, the shipped
model. Alignment and tiling have their own tests (test_align.py, test_tiling.py)."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from common.errors import UserError
from tests.bursts import make_model, render, translation
from trainer import deblur
from trainer.align import AlignmentError
from trainer.deblur import DeblurInputError, DeblurOptions, load_frames
from trainer.model import load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.cfg)}}, path)
    return path


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



def test_an_unalignable_frame_is_rejected_and_reported(tmp_path, capsys, checkpoint):
    """Issue 11: a frame that cannot be aligned is left out (one warning line naming it) while 2
    usable frames remain; <out>.align.json says what happened to every frame; --save-aligned
    writes the frames the model saw. (With only 1 usable frame left it stays an AlignmentError:
    test_bad_inputs_give_one_clear_error.)"""
    import json

    paths = write_burst(tmp_path)[:3]
    other = tmp_path / "other.png"
    Image.fromarray(np.asarray(Image.fromarray(skimage.data.coffee()).resize((112, 96)))).save(other)
    out, saved = tmp_path / "o.png", tmp_path / "aligned"
    base = ["--checkpoint", str(checkpoint), "--device", "cpu", "--quiet", "--reference", "0", "--tile", "104"]
    assert deblur.main([*base, "--out", str(out), "--save-aligned", str(saved), paths[0], str(other), *paths[1:]]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: frame other.png rejected: alignment to frame0.png failed")
    assert "3 frames, 1 rejected" in captured.out
    summary = json.loads((tmp_path / "o.png.align.json").read_text())
    assert (summary["reference"], summary["used"], summary["rejected"]) == ("frame0.png", 3, 1)
    ref, rejected, *used = summary["frames"]
    assert ref["reference"] and ref["status"] == "used" and ref["transform"] == np.eye(3).tolist()
    assert rejected["name"] == "other.png" and rejected["status"] == "rejected" and "failed" in rejected["reason"]
    for entry in used:
        assert entry["status"] == "used" and entry["model"] == "homography" and entry["zncc"] > 0.9
        assert set(entry) >= {"transform", "residual", "inliers", "fallbacks", "shift_px"}
        assert np.array(entry["transform"]).shape == (3, 3)
    assert sorted(p.name for p in saved.iterdir()) == [
        "00-frame0.aligned.png", "02-frame1.aligned.png", "03-frame2.aligned.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(saved / "00-frame0.aligned.png")), np.asarray(Image.open(paths[0])))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temporary files left

    # the same burst without the bad frame: the same image (the rejected frame had no say)
    alone = tmp_path / "alone.png"
    assert deblur.main([*base, "--out", str(alone), *paths]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(alone)), np.asarray(Image.open(out)))


def test_save_aligned_never_overwrites_an_input(tmp_path, checkpoint):
    paths = write_burst(tmp_path)
    renamed = tmp_path / "00-frame0.aligned.png"  # what --save-aligned would write for frame0.png
    Path(paths[1]).rename(renamed)
    with pytest.raises(DeblurInputError, match="--save-aligned .* is one of the input frames"):
        deblur.main(["--checkpoint", str(checkpoint), "--quiet", "--out", str(tmp_path / "o.png"),
                     "--save-aligned", str(tmp_path), paths[0], str(renamed)])


@pytest.mark.parametrize("argv, message", [
    (["--tile", "8"], "--tile must be >= 16, got 8"),
    (["--overlap", "wide"], "--overlap must be 'auto' or a number of px, got 'wide'"),
    (["--overlap", "-4"], "--overlap must be >= 0, got -4"),
    (["--batch", "-1"], "--batch must be >= 1 (or 0 for the default), got -1"),
    (["--align-size", "32"], "--align-size must be >= 64, got 32"),
    (["--reference", "sharpest"], "--reference must be 'auto' or a frame index, got 'sharpest'"),
    (["--device", "tpu"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
])
def test_bad_options_are_one_line_user_errors(tmp_path, capsys, checkpoint, argv, message):
    paths = write_burst(tmp_path)
    args = ["--checkpoint", str(checkpoint), "--device", "cpu", "--quiet", "--out", str(tmp_path / "o.png"), *argv]
    with pytest.raises(UserError, match=re.escape(message)):
        deblur.main([*args, *paths])
    assert _cli_error(capsys, ["deblur", *args, *paths]) == f"error: {message}"
    assert not (tmp_path / "o.png").exists()


def test_options_are_checked_for_api_callers_too(checkpoint):
    with pytest.raises(DeblurInputError, match="--tile must be >= 16"):
        DeblurOptions(tile=8)
    with pytest.raises(DeblurInputError, match="--motion must be"):
        DeblurOptions(motion="affine")
    frames = [np.zeros((40, 48, 3), np.uint8)] * 2
    for align in (True, False):
        with pytest.raises(DeblurInputError, match="--reference 2 is out of range for 2 frames"):
            deblur.deblur_frames(load(checkpoint), frames, DeblurOptions(reference=2, align=align))


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


def test_save_image_writes_the_quantized_pixels_exactly(tmp_path):
    """The fast PNG setting changes the file's compression, never its pixels."""
    from trainer.deblur import save_image

    image = np.random.default_rng(0).random((37, 53, 3)).astype(np.float32)
    save_image(image, tmp_path / "o.png")
    expected = np.clip(np.rint(image.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), expected)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]  # no temporary file left behind
