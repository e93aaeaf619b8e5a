"""Imaging pieces: gamma round trip, blur = direct convolution, noise variance matches its levels."""

import numpy as np
import pytest
from scipy.signal import convolve2d

from pipeline import imaging


@pytest.mark.parametrize("gamma", [1.5, 2.2, 2.5])
def test_gamma_round_trip_is_exact_on_every_level(gamma):
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    lin = imaging.linearize(levels, gamma)
    assert lin.dtype == np.float32 and lin.min() == 0 and lin.max() == 1
    np.testing.assert_array_equal(imaging.delinearize(lin, gamma), levels)


def test_delinearize_clips():
    out = imaging.delinearize(np.array([-0.5, 0.0, 1.0, 3.0], np.float32), 2.2)
    np.testing.assert_array_equal(out, [0, 0, 255, 255])


def test_fft_blur_equals_direct_valid_convolution():
    rng = np.random.default_rng(0)
    size, K = 20, 7
    canvas = rng.random((size + K - 1, size + K - 1, 3)).astype(np.float32)
    kern = rng.random((2, K, K)).astype(np.float32)
    kern /= kern.sum(axis=(1, 2), keepdims=True)
    out = imaging.blur(canvas, kern, size)
    assert out.shape == (2, size, size, 3)
    for f in range(2):
        for c in range(3):
            ref = convolve2d(canvas[..., c].astype(np.float64), kern[f].astype(np.float64), mode="valid")
            np.testing.assert_allclose(out[f, ..., c], ref, atol=2e-5)


def test_delta_kernel_returns_the_crop():
    rng = np.random.default_rng(1)
    canvas = rng.random((30, 30, 3)).astype(np.float32)
    k = np.zeros((1, 11, 11), np.float32)
    k[0, 5, 5] = 1
    np.testing.assert_allclose(imaging.blur(canvas, k, 20)[0], canvas[5:25, 5:25], atol=1e-5)


@pytest.mark.parametrize("shot,read,level", [(0.02, 0.01, 0.25), (0.0, 0.03, 0.6), (0.05, 0.0, 0.1)])
def test_noise_variance_matches_the_drawn_levels(shot, read, level):
    x = np.full((4, 64, 64, 3), level, np.float32)
    noisy = imaging.add_noise(x, shot, read, np.random.default_rng(5))
    expected = shot**2 * level + read**2
    assert (noisy - x).mean() == pytest.approx(0, abs=4 * np.sqrt(expected / x.size))
    assert (noisy - x).var() == pytest.approx(expected, rel=0.03)


def test_correlated_noise_keeps_variance_and_is_correlated():
    x = np.full((2, 96, 96, 3), 0.5, np.float32)
    noisy = imaging.add_noise(x, 0.0, 0.02, np.random.default_rng(3), correlated_sigma=0.8)
    n = noisy - x
    assert n.var() == pytest.approx(0.02**2, rel=0.05)
    lag1 = (n[:, :, 1:] * n[:, :, :-1]).mean() / n.var()
    assert lag1 > 0.3
    white = imaging.add_noise(x, 0.0, 0.02, np.random.default_rng(3)) - x
    assert abs((white[:, :, 1:] * white[:, :, :-1]).mean() / white.var()) < 0.03


def test_standard_noise_moments_and_determinism():
    a = imaging.standard_noise(np.random.default_rng(9), (200_000,))
    b = imaging.standard_noise(np.random.default_rng(9), (200_000,))
    assert a.tobytes() == b.tobytes()
    assert abs(a.mean()) < 0.01 and a.std() == pytest.approx(1, abs=0.01)
    assert abs(((a**4).mean()) - 3) < 0.1  # Gaussian kurtosis


def test_highlights_boost_only_bright_pixels():
    img = np.array([[[0.2, 0.2, 0.2], [0.95, 0.95, 0.95], [1.0, 1.0, 1.0]]], np.float32)
    out = imaging.boost_highlights(img, 0.8, 5.0)
    np.testing.assert_array_equal(out[0, 0], img[0, 0])
    assert 1.0 < out[0, 1, 0] < 5.0 and out[0, 2, 0] == pytest.approx(5.0)


def test_blur_crops_the_fft_to_the_kernels_support():
    rng = np.random.default_rng(2)
    size, K = 24, 15
    canvas = rng.random((size + K - 1, size + K - 1, 3)).astype(np.float32)
    kern = np.zeros((2, K, K), np.float32)
    kern[:, 5:10, 6:9] = rng.random((2, 5, 3))  # support radius 2 around the centre (7, 7)
    kern /= kern.sum(axis=(1, 2), keepdims=True)
    assert imaging.support_radius(kern) == 2
    out = imaging.blur(canvas, kern, size)
    for f in range(2):
        ref = convolve2d(canvas[..., 0].astype(np.float64), kern[f].astype(np.float64), mode="valid")
        np.testing.assert_allclose(out[f, ..., 0], ref, atol=2e-5)
