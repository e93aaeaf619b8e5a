"""Image quality metrics: PSNR and SSIM, with explicit arguments, computed in float64.

Conventions (BasicSR-like, everything explicit):
- Images are RGB (H, W, 3) or grey (H, W), values in [0, data_range]; numpy arrays or torch
  tensors (moved to the CPU and converted). No border is cropped and no colour conversion is done:
  both metrics see exactly the pixels they are given.
- Both images must have the same shape (ValueError otherwise) and finite values (ValueError: a
  NaN from a broken model must not be averaged away silently).

SSIM follows Wang et al. 2004 as scikit-image computes it with ``gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=...`` and ``channel_axis=-1``: local statistics
under an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma, 'reflect' boundary), the SSIM
map averaged over the pixels where the window fits inside the image (skimage drops the 5-pixel
strip along the border), then averaged over channels. tests/test_metrics.py checks agreement with
skimage to 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5 -> the classic 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _to_float64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in (2, 3):
        raise ValueError(f"{name}: expected an (H, W) or (H, W, C) image, got shape {x.shape}")
    return x


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _to_float64(a, "a"), _to_float64(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images have different shapes: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError(f"empty image, shape {a.shape}")
    for name, x in (("a", a), ("b", b)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return a, b


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between images ``a`` and ``b``.

    a, b: (H, W) or (H, W, C) arrays/tensors with values in [0, data_range] (e.g. RGB float in
    [0, 1] with data_range=1, or uint8 with data_range=255). Computed in float64 over all pixels
    and channels; identical images give ``inf``.
    """
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(a, b, data_range: float = 1.0) -> float:
    """Structural similarity (mean SSIM) between images ``a`` and ``b``, in [-1, 1].

    a, b: (H, W) or (H, W, C) with values in [0, data_range], both sides at least 11 px (the
    window). SSIM per channel with an 11x11 Gaussian window (sigma 1.5, population covariance),
    mean over the valid-window pixels, then mean over channels (see module docstring).
    """
    a, b = _pair(a, b)
    h, w = a.shape[:2]
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if min(h, w) < 2 * radius + 1:
        raise ValueError(f"image {h}x{w} is smaller than the {2 * radius + 1}x{2 * radius + 1} SSIM window")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]

    def blur(x: np.ndarray) -> np.ndarray:
        # Spatial axes only; channels stay independent.
        return gaussian_filter(x, sigma=(SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE, mode="reflect")

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    # Only where the window lies fully inside the image: the border pixels depend on the padding.
    inner = ssim_map[radius : h - radius, radius : w - radius]
    return float(inner.mean(axis=(0, 1)).mean())


def psnr_batch(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR per image of a batch, for validation on the training device.

    a, b: float tensors (B, C, H, W) (any layout with the batch first) in [0, data_range].
    Returns float64 (B,) in dB; ``inf`` where an image pair is identical. No gradient.
    """
    if a.shape != b.shape:
        raise ValueError(f"batches have different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    with torch.no_grad():
        diff = a.detach().double() - b.detach().double()
        mse = diff.flatten(1).pow(2).mean(dim=1)
        return 10.0 * torch.log10(data_range**2 / mse)
