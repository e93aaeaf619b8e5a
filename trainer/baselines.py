"""Classical burst baselines the network is compared against.

Every function takes ``burst``: float (N, H, W, 3) linear-or-sRGB values in [0, 1] (the evaluation
passes sRGB uint8 / 255, as stored) and returns one float64 (H, W, 3) image in [0, 1].

- ``fba``: Fourier Burst Accumulation (Delbracio & Sapiro, "Burst Deblurring: Removing Camera
  Shake Through Fourier Burst Accumulation", CVPR 2015). Camera shake attenuates a different set
  of frequencies in every frame, so per frequency the frame with the largest Fourier magnitude is
  the least attenuated one there. FBA averages the frames' Fourier coefficients with weights
  w_i(f) = M_i(f)^p / sum_j M_j(f)^p, where M_i is the channel-averaged magnitude |F_i| smoothed by
  a Gaussian in frequency. p = 0 is the plain mean, p -> inf picks the per-frequency maximum.
- ``mean_frames``, ``first_frame``: trivial references.
- ``best_frame``: an oracle that looks at the target and picks the frame with the best PSNR (an
  upper bound for any "select the sharpest frame" method).
"""

from __future__ import annotations

import numpy as np
from scipy import fft
from scipy.ndimage import gaussian_filter

from trainer.metrics import psnr


def _check_burst(burst: np.ndarray) -> np.ndarray:
    burst = np.asarray(burst)
    if burst.ndim != 4 or burst.shape[-1] != 3 or burst.shape[0] < 1:
        raise ValueError(f"burst: expected (N, H, W, 3) with N >= 1, got shape {burst.shape}")
    if not np.issubdtype(burst.dtype, np.floating):
        raise ValueError(f"burst: expected float values in [0, 1], got dtype {burst.dtype} (divide uint8 by 255)")
    return burst.astype(np.float64, copy=False)


def fba(burst: np.ndarray, p: float = 11, sigma: float | None = None, sharpen: bool = False) -> np.ndarray:
    """Fourier Burst Accumulation of ``burst`` float (N, H, W, 3) in [0, 1] -> float64 (H, W, 3).

    p: weight exponent (11 in the paper). sigma: std of the Gaussian that smooths each frame's
    magnitude spectrum, in frequency bins; None -> min(H, W) / 50 as in the paper. The smoothing
    wraps around (the DFT spectrum is periodic), so the neighbourhood of DC is handled correctly.
    sharpen: apply a mild unsharp mask after accumulation (the paper's optional post-step); off
    by default so the comparison measures the accumulation alone. Output clipped to [0, 1].

    With N = 1, or N identical frames, the weights are constant and the output is the frame.
    """
    burst = _check_burst(burst)
    n, h, w, _ = burst.shape
    sigma = min(h, w) / 50 if sigma is None else float(sigma)
    spectra = fft.fft2(burst, axes=(1, 2))  # (N, H, W, 3) complex128
    magnitude = np.abs(spectra).mean(axis=-1)  # (N, H, W): one weight for all channels
    if sigma > 0:
        magnitude = gaussian_filter(magnitude, sigma=(0, sigma, sigma), mode="wrap")
    # M^p overflows/underflows quickly for p = 11; dividing by the per-frequency maximum first
    # keeps every ratio in [0, 1] and the largest at exactly 1, so the denominator is >= 1.
    peak = magnitude.max(axis=0, keepdims=True)
    ratio = np.divide(magnitude, peak, out=np.ones_like(magnitude), where=peak > 0)
    weights = ratio**p
    weights /= weights.sum(axis=0, keepdims=True)
    fused = (weights[..., None] * spectra).sum(axis=0)
    out = fft.ifft2(fused, axes=(0, 1)).real
    if sharpen:
        out = unsharp_mask(out)
    return np.clip(out, 0.0, 1.0)


def unsharp_mask(image: np.ndarray, sigma: float = 1.0, amount: float = 0.5) -> np.ndarray:
    """image + amount * (image - gaussian(image, sigma)), per channel; float (H, W, 3), not clipped."""
    blurred = gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect")
    return image + amount * (image - blurred)


def mean_frames(burst: np.ndarray) -> np.ndarray:
    """Per-pixel mean of the frames: float (N, H, W, 3) -> float64 (H, W, 3)."""
    return _check_burst(burst).mean(axis=0)


def first_frame(burst: np.ndarray) -> np.ndarray:
    """The first frame as given: float (N, H, W, 3) -> float64 (H, W, 3)."""
    return _check_burst(burst)[0].copy()


def best_frame_index(burst: np.ndarray, target: np.ndarray) -> int:
    """Index of the frame with the highest PSNR against ``target`` float (H, W, 3) in [0, 1]."""
    burst = _check_burst(burst)
    scores = [psnr(frame, target) for frame in burst]
    return int(np.argmax(scores))  # first of equals on ties; inf (identical frame) wins


def best_frame(burst: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Oracle: the frame closest to ``target`` in PSNR. float (N, H, W, 3) -> float64 (H, W, 3)."""
    burst = _check_burst(burst)
    return burst[best_frame_index(burst, target)].copy()
