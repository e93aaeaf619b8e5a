"""Imaging pieces: gamma round trip, blur = direct convolution, noise variance matches its levels,
the whole model against a plain float64 reference. (The sample encoders' tests live with them, in
tests/test_format.py.)"""

import numpy as np
import pytest
from scipy.signal import convolve2d

from pipeline import imaging


@pytest.mark.parametrize("gamma", [1.5, 2.2, 2.5])
@pytest.mark.parametrize("white", [1.0, "255^gamma"])
def test_gamma_round_trip_is_exact_on_every_level(gamma, white):
    white = 255.0 ** gamma if white == "255^gamma" else white
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    lin = imaging.linearize(levels, gamma, white)
    assert lin.dtype == np.float32 and lin.min() == 0 and lin.max() == np.float32(white)
    np.testing.assert_array_equal(imaging.delinearize(lin, gamma, white), levels)


def test_delinearize_clips_and_writes_into_out():
    out = imaging.delinearize(np.array([-0.5, 0.0, 1e-9, 1.0, 3.0], np.float32), 2.2)
    np.testing.assert_array_equal(out, [0, 0, 0, 255, 255])
    planes = np.random.default_rng(0).random((3, 4, 5), dtype=np.float32)
    expected = imaging.delinearize(planes, 2.2)
    hwc = np.zeros((4, 5, 3), np.uint8)
    scratch = planes.copy()
    imaging.delinearize(scratch, 2.2, out=hwc.transpose(2, 0, 1), overwrite_input=True)
    np.testing.assert_array_equal(hwc, expected.transpose(1, 2, 0))
    ref = np.floor(255 * planes.astype(np.float64) ** (1 / 2.2) + 0.5)
    assert np.abs(expected - ref).max() <= 1 and (expected == ref).mean() > 0.99


def direct_valid(canvas, kern):
    """Reference: per channel float64 'valid' convolution of planes (3, C, C) with (K, K)."""
    return np.stack([convolve2d(c.astype(np.float64), kern.astype(np.float64), mode="valid") for c in canvas])


def test_fft_blur_equals_direct_valid_convolution():
    rng = np.random.default_rng(0)
    size, K = 20, 7
    canvas = rng.random((3, size + K - 1, size + K - 1)).astype(np.float32)
    kern = rng.random((2, K, K)).astype(np.float32)
    kern /= kern.sum(axis=(1, 2), keepdims=True)
    out = imaging.blur(canvas, kern, size)
    assert out.shape == (2, 3, size, size) and out.dtype == np.float32
    for f in range(2):
        np.testing.assert_allclose(out[f], direct_valid(canvas, kern[f]), atol=2e-5)
    frames = list(imaging.blurred_frames(canvas, kern, size))
    assert len(frames) == 2 and all(fr.shape == (3, size, size) for fr in frames)


def test_delta_kernel_returns_the_crop():
    rng = np.random.default_rng(1)
    canvas = rng.random((3, 30, 30)).astype(np.float32)
    k = np.zeros((1, 11, 11), np.float32)
    k[0, 5, 5] = 1
    np.testing.assert_allclose(imaging.blur(canvas, k, 20)[0], canvas[:, 5:25, 5:25], atol=1e-5)


def test_blur_crops_the_fft_to_the_kernels_support():
    rng = np.random.default_rng(2)
    size, K = 24, 15
    canvas = rng.random((3, size + K - 1, size + K - 1)).astype(np.float32)
    kern = np.zeros((2, K, K), np.float32)
    kern[:, 5:10, 6:9] = rng.random((2, 5, 3))  # support radius 2 around the centre (7, 7)
    kern /= kern.sum(axis=(1, 2), keepdims=True)
    assert imaging.support_radius(kern) == 2
    out = imaging.blur(canvas, kern, size)
    for f in range(2):
        np.testing.assert_allclose(out[f], direct_valid(canvas, kern[f]), atol=2e-5)


def test_blur_rejects_a_canvas_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not match size"):
        imaging.blur(np.zeros((3, 30, 30), np.float32), np.ones((1, 5, 5), np.float32) / 25, 20)


@pytest.mark.parametrize("shot,read,level", [(0.02, 0.01, 0.25), (0.0, 0.03, 0.6), (0.05, 0.0, 0.1)])
@pytest.mark.parametrize("white", [1.0, 255.0 ** 2.2])
def test_noise_variance_matches_the_drawn_levels(shot, read, level, white):
    x = np.full((4, 3, 64, 64), level * white, np.float32)
    noisy = imaging.add_noise(x, shot, read, np.random.default_rng(5), white=white)
    expected = white**2 * (shot**2 * level + read**2)  # the levels are std devs at white = 1
    assert (noisy - x).mean() == pytest.approx(0, abs=4 * np.sqrt(expected / x.size))
    assert (noisy - x).var() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("shot,read", [(0.02, 0.01), (0.0, 0.03), (0.05, 0.0)])
def test_noise_std_is_the_std_add_noise_draws(shot, read):
    """imaging.noise_std (what the shard stats quote at mid grey) is add_noise's noise level."""
    x = np.full((4, 3, 64, 64), imaging.MID_GREY, np.float32)
    noisy = imaging.add_noise(x, shot, read, np.random.default_rng(2))
    assert (noisy - x).std() == pytest.approx(imaging.noise_std(imaging.MID_GREY, shot, read), rel=0.02)
    assert imaging.noise_std(0.5, 0.0, 0.0) == 0.0


def test_sample_stats_summarize_the_sample_json():
    """render.sample_stats, the per-sample lines of a shard's stats file, from the sample's json."""
    from pipeline import kernels, render
    from tests.conftest import tiny_config

    sample = render.render_sample(tiny_config(), "train", 3)
    p = sample["params"]
    stats = render.sample_stats(p)
    assert set(stats) == {"blur_px", "noise_std_mid_grey"}
    assert stats["blur_px"] == pytest.approx(kernels.kernel_radius(sample["kernels"]).mean(), abs=1e-4)
    assert stats["noise_std_mid_grey"] == pytest.approx(np.sqrt(p["shot_noise"] ** 2 * 0.18 + p["read_noise"] ** 2),
                                                        abs=1e-6)


def test_correlated_noise_keeps_variance_and_is_correlated_as_its_filter_says():
    x = np.full((2, 3, 96, 96), 0.5, np.float32)
    sigma = 0.8
    noisy = imaging.add_noise(x, 0.0, 0.02, np.random.default_rng(3), correlated_sigma=sigma)
    n = noisy - x
    assert n.var() == pytest.approx(0.02**2, rel=0.05)
    # lag-1 correlation of a field filtered by taps w (per axis): sum w_j w_j+1 / sum w_j^2
    w = imaging.correlation_taps(sigma)
    w = np.concatenate([w[:0:-1], w])
    rho = (w[1:] * w[:-1]).sum() / (w**2).sum()
    for axis in (-1, -2):
        a, b = np.moveaxis(n, axis, -1)[..., 1:], np.moveaxis(n, axis, -1)[..., :-1]
        assert (a * b).mean() / n.var() == pytest.approx(rho, abs=0.03)
    white = imaging.add_noise(x, 0.0, 0.02, np.random.default_rng(3)) - x
    assert abs((white[..., 1:] * white[..., :-1]).mean() / white.var()) < 0.03


def test_correlation_taps_follow_sigma():
    np.testing.assert_allclose(imaging.correlation_taps(0.6), [1, np.exp(-1 / 0.72)])
    assert len(imaging.correlation_taps(0.8)) == 3 and len(imaging.correlation_taps(0.3)) == 1


def test_standard_noise_moments_and_determinism():
    a = imaging.standard_noise(np.random.default_rng(9), (200_001,))
    b = imaging.standard_noise(np.random.default_rng(9), (200_001,))
    assert a.tobytes() == b.tobytes() and a.dtype == np.float32
    assert abs(a.mean()) < 0.01 and a.std() == pytest.approx(1, abs=0.01)
    assert abs(((a**4).mean()) - 3) < 0.1  # Gaussian kurtosis


def test_highlights_boost_only_bright_pixels():
    img = np.array([[[0.2, 0.95, 1.0]]] * 3, np.float32)  # planes (3, 1, 3): three grey pixels
    out = imaging.boost_highlights(img, 0.8, 5.0)
    np.testing.assert_array_equal(out[:, 0, 0], img[:, 0, 0])
    assert 1.0 < out[0, 0, 1] < 5.0 and out[0, 0, 2] == pytest.approx(5.0)
    white = 255.0 ** 2.2
    np.testing.assert_allclose(imaging.boost_highlights(img * np.float32(white), 0.8, 5.0, white),
                               out * white, rtol=1e-6)


def plain_degrade(canvas, kernels, size, gamma):
    """Reference of the noise-free model: float64, (H, W, 3), per-frame 'valid' convolution."""
    lin = (canvas / 255.0) ** gamma
    frames = []
    for k in kernels.astype(np.float64):
        blurred = np.stack([convolve2d(lin[..., c], k, mode="valid") for c in range(3)], axis=-1)
        frames.append(np.floor(255 * np.clip(blurred, 0, 1) ** (1 / gamma) + 0.5))
    assert frames[0].shape == (size, size, 3)
    return np.stack(frames)


def test_degrade_without_noise_matches_a_plain_reference():
    rng = np.random.default_rng(4)
    size, K, gamma = 24, 9, 2.2
    canvas = rng.integers(0, 256, (size + K - 1, size + K - 1, 3), dtype=np.uint8)
    kern = np.zeros((3, K, K), np.float32)
    kern[0, 4, 4] = 1  # sharp
    kern[1, 3:6, 2:7] = rng.random((3, 5))
    kern[2] = rng.random((K, K))
    kern /= kern.sum(axis=(1, 2), keepdims=True)
    out = imaging.degrade(canvas, kern, size, gamma, 1.0, 0.8, 0.0, 0.0, 0.0, np.random.default_rng(0))
    assert out.shape == (3, size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    ref = plain_degrade(canvas, kern, size, gamma)
    np.testing.assert_array_equal(out[0], canvas[4:4 + size, 4:4 + size])
    assert np.abs(out - ref).max() <= 1 and (out == ref).mean() > 0.995


def test_degrade_noise_is_the_drawn_level_in_linear_light():
    size, K, gamma, shot, read = 32, 5, 2.2, 0.02, 0.01
    canvas = np.full((size + K - 1, size + K - 1, 3), 128, np.uint8)
    kern = np.ones((8, K, K), np.float32) / K**2
    out = imaging.degrade(canvas, kern, size, gamma, 1.0, 0.8, shot, read, 0.0, np.random.default_rng(1))
    lin = imaging.linearize(out, gamma).astype(np.float64)
    x = (128 / 255) ** gamma
    step = gamma * (128 / 255) ** (gamma - 1) / 255  # linear size of one 8-bit step at 128
    assert lin.mean() == pytest.approx(x, rel=0.01)
    assert lin.var() == pytest.approx(shot**2 * x + read**2 + step**2 / 12, rel=0.05)


def test_degrade_is_deterministic_per_generator():
    rng = np.random.default_rng(6)
    canvas = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    kern = rng.random((4, 11, 11)).astype(np.float32)
    kern /= kern.sum(axis=(1, 2), keepdims=True)
    args = (canvas, kern, 30, 2.0, 3.0, 0.8, 0.03, 0.01, 0.6)
    a = imaging.degrade(*args, np.random.default_rng(1))
    b = imaging.degrade(*args, np.random.default_rng(1))
    c = imaging.degrade(*args, np.random.default_rng(2))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()

