"""Alignment of user bursts (trainer.align): sub-pixel shifts, homographies, failures, the
reference choice, and the full-resolution warp against a direct bilinear reference."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from scipy.ndimage import map_coordinates

from tests.bursts import render, rotation, translation, with_object
from trainer.align import (AlignmentError, align_burst, alignment_level, apply_homography, choose_reference,
                           estimate_alignment, gray, pyramid, warp_frame)


def corner_error(h_est, h_true, shape):
    cx = np.array([0, shape[1] - 1, shape[1] - 1, 0], float)
    cy = np.array([0, 0, shape[0] - 1, shape[0] - 1], float)
    ax, ay, _ = apply_homography(h_est, cx, cy)
    bx, by, _ = apply_homography(h_true, cx, cy)
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


def test_warp_frame_matches_bilinear_resampling():
    # OpenCV's warpPerspective against float64 scipy map_coordinates on uniform noise (the
    # hardest content for interpolation error) under a random homography that leaves part of the
    # reference grid uncovered: within 1 DN where the frame covers it, the fill elsewhere.
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    fill = rng.integers(0, 256, (80, 110, 3), dtype=np.uint8)
    h = np.array([[1 + rng.normal(0, 0.02), rng.normal(0, 0.02), rng.uniform(12, 16)],
                  [rng.normal(0, 0.02), 1 + rng.normal(0, 0.02), rng.uniform(-8, -4)],
                  [rng.normal(0, 2e-4), rng.normal(0, 2e-4), 1.0]])
    out = warp_frame(frame, h, fill)
    assert out.shape == fill.shape and out.dtype == np.uint8
    ys, xs = np.mgrid[0:80, 0:110].astype(np.float64)
    xw, yw, _ = apply_homography(h, xs, ys)
    expected = np.stack([map_coordinates(frame[..., c].astype(np.float64), [yw, xw], order=1)
                         for c in range(3)], axis=-1)
    inside = (xw >= 0.5) & (xw <= 119 - 0.5) & (yw >= 0.5) & (yw <= 89 - 0.5)
    outside = (xw < -0.5) | (xw > 119.5) | (yw < -0.5) | (yw > 89.5)
    assert inside.mean() > 0.5 and outside.mean() > 0.02  # both cases are exercised
    assert np.abs(out[inside].astype(int) - np.rint(expected[inside])).max() <= 1
    np.testing.assert_array_equal(out[outside], fill[outside])


def test_warp_frame_is_exact_for_an_integer_shift():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    fill = np.zeros_like(frame)
    out = warp_frame(frame, translation(3, -2), fill)  # out(x, y) = frame(x + 3, y - 2)
    np.testing.assert_array_equal(out[2:, :-3], frame[:-2, 3:])
    assert not out[:2].any() and not out[:, -3:].any()


def test_import_does_not_pull_in_torch():
    code = "import sys, trainer.align; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


# ----------------------------------------------------------------------------- real scenes
# A large object (25% of the frame) moves across the scene on its own: the warp must be the
# background's. A global least-squares fit follows the object; features + RANSAC and the robust
# (Tukey) Lucas-Kanade do not.

SCENE = (240, 320)


@pytest.mark.parametrize("background, moved", [
    (np.eye(3), (22, -30)),                    # static background, the object moves
    (translation(5.3, -3.1), (-18, 34)),        # the camera shakes too
])
def test_a_moving_object_does_not_pull_the_warp(background, moved):
    ref = with_object(render(np.eye(3), SCENE), 60, 80)
    frame = with_object(render(background, SCENE), 60 + moved[0], 80 + moved[1])
    a = align_pair(ref, frame, "homography")
    assert corner_error(a.homography, np.linalg.inv(background), SCENE) < 0.25, a  # non-robust LK: 0.3-1 px
    assert a.inliers < 0.9  # the object's pixels are seen as outliers


@pytest.mark.parametrize("h", [translation(-31.5, 22.25), rotation(4.0, SCENE, 6.0, -9.0)],
                         ids=["large-shift", "rotation"])
def test_large_and_rotational_hand_shake_is_recovered(h):
    ref = render(np.eye(3), SCENE)
    frame = render(h, SCENE, noise=2.0, rng=np.random.default_rng(0))
    a = align_pair(ref, frame, "homography")
    assert corner_error(a.homography, np.linalg.inv(h), SCENE) < 0.5, a
