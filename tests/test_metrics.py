"""PSNR/SSIM against scikit-image (an independent reference) and their edge cases."""

import math

import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from trainer.metrics import psnr, psnr_batch, ssim


def sk_ssim(a, b, data_range=1.0):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 channel_axis=-1 if a.ndim == 3 else None, data_range=data_range)


def real_pairs():
    """(clean, noisy) float64 RGB crops of bundled photographs with synthetic noise and blur."""
    rng = np.random.default_rng(1)
    pairs = []
    for image, (y, x) in ((skimage.data.astronaut(), (40, 150)), (skimage.data.coffee(), (100, 200))):
        clean = image[y : y + 96, x : x + 128].astype(np.float64) / 255
        noisy = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1)
        shifted = np.roll(clean, 1, axis=1) * 0.9 + 0.05  # structure and luminance change, no noise
        pairs += [(clean, noisy), (clean, shifted)]
    return pairs


def random_pairs():
    rng = np.random.default_rng(0)
    out = []
    for shape in ((32, 40, 3), (11, 11, 3), (25, 17)):
        a = rng.random(shape)
        b = np.clip(a + rng.normal(0, 0.1, shape), 0, 1)
        out += [(a, b), (a, rng.random(shape))]
    return out


@pytest.mark.parametrize("pair", real_pairs() + random_pairs())
def test_psnr_and_ssim_match_skimage(pair):
    a, b = pair
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
    assert ssim(a, b) == pytest.approx(sk_ssim(a, b), abs=1e-4)


def test_uint8_scale_with_data_range():
    image = skimage.data.astronaut()[:64, :64]
    rng = np.random.default_rng(2)
    noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    assert psnr(image, noisy, data_range=255) == pytest.approx(psnr(image / 255, noisy / 255), abs=1e-9)
    assert ssim(image, noisy, data_range=255) == pytest.approx(ssim(image / 255, noisy / 255), abs=1e-9)
    assert ssim(image, noisy, data_range=255) == pytest.approx(
        sk_ssim(image.astype(np.float64), noisy.astype(np.float64), data_range=255), abs=1e-4)


def test_identical_images():
    a = np.random.default_rng(3).random((20, 20, 3))
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_known_psnr_value():
    a = np.zeros((8, 8, 3))
    b = np.full((8, 8, 3), 0.1)  # mse 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-9)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="different shapes"):
        psnr(np.zeros((16, 16, 3)), np.zeros((16, 17, 3)))
    with pytest.raises(ValueError, match="different shapes"):
        ssim(np.zeros((16, 16, 3)), np.zeros((16, 16)))


def test_bad_inputs_raise():
    a = np.zeros((16, 16, 3))
    b = a.copy()
    b[3, 3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        psnr(a, b)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(np.zeros((10, 30, 3)), np.zeros((10, 30, 3)))
    with pytest.raises(ValueError, match="expected an"):
        psnr(np.zeros(5), np.zeros(5))


def test_torch_inputs_and_batch_psnr():
    rng = np.random.default_rng(4)
    a = rng.random((2, 3, 24, 24)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    batch = psnr_batch(torch.from_numpy(a), torch.from_numpy(b))
    assert batch.dtype == torch.float64 and batch.shape == (2,)
    for i in range(2):
        hwc_a, hwc_b = a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0)
        assert batch[i].item() == pytest.approx(psnr(hwc_a, hwc_b), abs=1e-6)
        assert psnr(torch.from_numpy(hwc_a), torch.from_numpy(hwc_b)) == pytest.approx(psnr(hwc_a, hwc_b))
    assert psnr_batch(torch.from_numpy(a), torch.from_numpy(a)).isinf().all()
