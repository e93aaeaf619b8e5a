"""Burst baselines: FBA invariances and behaviour on a known burst, the oracle frame picker."""

import numpy as np
import pytest
import skimage.data
from scipy.ndimage import convolve

from trainer.baselines import best_frame, best_frame_index, fba, first_frame, mean_frames
from trainer.metrics import psnr


def photo(size=64):
    return skimage.data.astronaut()[100 : 100 + size, 180 : 180 + size].astype(np.float64) / 255


def motion_blur(image, length, angle_deg):
    """Blur by a line kernel of ``length`` px at ``angle_deg`` (camera-shake-like, directional)."""
    k = np.zeros((length, length))
    c = (length - 1) / 2
    t = np.deg2rad(angle_deg)
    for s in np.linspace(-c, c, 4 * length):
        k[int(round(c + s * np.sin(t))), int(round(c + s * np.cos(t)))] = 1
    k /= k.sum()
    return np.stack([convolve(image[..., ch], k, mode="wrap") for ch in range(3)], axis=-1)


def test_single_frame_is_returned():
    frame = np.random.default_rng(0).random((1, 20, 28, 3))
    np.testing.assert_allclose(fba(frame), frame[0], atol=1e-12)


def test_identical_frames_return_the_frame():
    frame = photo(40)
    burst = np.stack([frame] * 5)
    np.testing.assert_allclose(fba(burst), frame, atol=1e-12)


def test_fba_is_permutation_invariant():
    rng = np.random.default_rng(1)
    sharp = photo(48)
    burst = np.stack([motion_blur(sharp, 7, a) + rng.normal(0, 0.01, sharp.shape) for a in (0, 45, 90, 135)])
    burst = np.clip(burst, 0, 1)
    reference = fba(burst)
    for order in ([3, 1, 0, 2], [2, 3, 1, 0]):
        np.testing.assert_allclose(fba(burst[order]), reference, atol=1e-12)


def test_fba_beats_mean_when_one_frame_is_sharp():
    sharp = photo(64)
    blurred = [motion_blur(sharp, 11, a) for a in (0, 60, 120)]
    burst = np.stack([blurred[0], sharp, blurred[1], blurred[2]])
    fba_psnr = psnr(fba(burst), sharp)
    mean_psnr = psnr(mean_frames(burst), sharp)
    assert fba_psnr > mean_psnr + 3, (fba_psnr, mean_psnr)


def test_fba_combines_complementary_blurs():
    # No frame is sharp, but each direction of blur keeps the frequencies the others lose.
    sharp = photo(64)
    burst = np.stack([motion_blur(sharp, 9, a) for a in (0, 45, 90, 135)])
    best = max(psnr(frame, sharp) for frame in burst)
    assert psnr(fba(burst), sharp) > best
    assert psnr(fba(burst), sharp) > psnr(mean_frames(burst), sharp)


def test_fba_p_zero_is_the_mean_and_sharpen_changes_output():
    rng = np.random.default_rng(2)
    burst = rng.random((3, 16, 16, 3))
    np.testing.assert_allclose(fba(burst, p=0), np.clip(burst.mean(axis=0), 0, 1), atol=1e-12)
    assert not np.allclose(fba(burst, sharpen=True), fba(burst))
    out = fba(burst, sharpen=True)
    assert out.min() >= 0 and out.max() <= 1


def test_best_first_mean():
    sharp = photo(32)
    burst = np.stack([motion_blur(sharp, 9, 0), motion_blur(sharp, 3, 30), motion_blur(sharp, 7, 90)])
    assert best_frame_index(burst, sharp) == 1
    np.testing.assert_array_equal(best_frame(burst, sharp), burst[1])
    np.testing.assert_array_equal(first_frame(burst), burst[0])
    np.testing.assert_allclose(mean_frames(burst), burst.mean(axis=0))


def test_bad_bursts_raise():
    with pytest.raises(ValueError, match="dtype uint8"):
        fba(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="expected"):
        mean_frames(np.zeros((8, 8, 3)))
