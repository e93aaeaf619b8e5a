"""The degradation model as pure functions (Aittala & Durand 2018, section 4).

sRGB canvas -> linear light (random gamma) -> optional highlight boost -> per-frame blur (FFT,
linear light) -> shot + read noise (optionally spatially correlated) -> clip [0, 1] -> re-gamma ->
uint8. Every function takes its parameters explicitly; randomness enters only as a Generator
argument (``add_noise``) or through ``sample_params`` in pipeline/render.py.

Arrays: images are float32 (H, W, 3) or (F, H, W, 3), linear light unless a name says sRGB.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter
from scipy.special import ndtri

LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)  # Rec. 709, linear light


def linearize(srgb: np.ndarray, gamma: float) -> np.ndarray:
    """uint8 sRGB (..., 3) -> float32 linear in [0, 1] as (x / 255) ** gamma (a 256-entry table)."""
    table = (np.arange(256, dtype=np.float64) / 255.0) ** gamma
    return table.astype(np.float32)[srgb]


def delinearize(linear: np.ndarray, gamma: float) -> np.ndarray:
    """float linear (any shape) -> uint8: round(255 · clip(x, 0, 1) ** (1 / gamma))."""
    x = np.clip(linear, 0.0, 1.0, dtype=np.float32)
    np.power(x, np.float32(1.0 / gamma), out=x)
    x *= 255.0
    x += 0.5
    return x.astype(np.uint8)


def boost_highlights(linear: np.ndarray, threshold: float, gain: float) -> np.ndarray:
    """Push bright regions above 1 so that, once blurred and clipped, they streak like saturated
    lights. Pixels whose luminance exceeds ``threshold`` are scaled by up to ``gain`` (reached at
    luminance 1), smoothly from 1 at the threshold. Returns a new float32 array (values may be > 1).
    """
    if gain <= 1.0:
        return linear.copy()
    lum = linear @ LUMA
    excess = np.clip((lum - threshold) / (1.0 - threshold), 0.0, None)
    return linear * (1.0 + (gain - 1.0) * excess)[..., None]


def fft_size(n: int) -> int:
    return sfft.next_fast_len(n, real=True)


def support_radius(kernels: np.ndarray) -> int:
    """Smallest r such that every kernel (F, K, K) is zero outside its centre (2r+1)² window."""
    K = kernels.shape[-1]
    ys, xs = np.nonzero(kernels.any(axis=0))
    if ys.size == 0:
        return 0
    return int(max(np.abs(ys - K // 2).max(), np.abs(xs - K // 2).max()))


def blur(canvas: np.ndarray, kernels: np.ndarray, size: int) -> np.ndarray:
    """Blur one linear canvas with F kernels; return the valid centre crop of each frame.

    canvas: float32 (C, C, 3) with C = size + K - 1; kernels: float32 (F, K, K), centre at K // 2.
    Returns float32 (F, size, size, 3). The FFT is circular over a fast length L >= size + 2r,
    where r is the kernels' actual support radius (most shakes are far smaller than K), and the
    crop only reads canvas pixels within the kernels' reach: no wrap-around or border enters it.
    """
    C = canvas.shape[0]
    F, K, _ = kernels.shape
    m = K // 2
    r = support_radius(kernels)
    kernels = kernels[:, m - r:m + r + 1, m - r:m + r + 1]
    canvas = canvas[m - r:C - (m - r), m - r:C - (m - r)]
    C, k = canvas.shape[0], 2 * r + 1
    L = fft_size(C)
    # kernel centre to the origin of an L×L grid (negative offsets wrap to the far side)
    padded = np.zeros((F, L, L), np.float32)
    padded[:, :k, :k] = kernels
    padded = np.roll(padded, (-r, -r), axis=(1, 2))
    img = np.zeros((3, L, L), np.float32)
    img[:, :C, :C] = canvas.transpose(2, 0, 1)
    spec = sfft.rfft2(img)[None] * sfft.rfft2(padded)[:, None]  # (F, 3, L, L//2+1)
    out = sfft.irfft2(spec, s=(L, L), overwrite_x=True)
    return out[:, :, r:r + size, r:r + size].transpose(0, 2, 3, 1)


_NORMAL_TABLE = None


def _normal_table() -> np.ndarray:
    """65536 standard-normal quantiles, normalized to zero mean and unit variance.

    Drawing noise as table[uint16] is ~4× faster than Generator.standard_normal and exact in its
    first two moments; its tails stop at ±4.2σ, which no 8-bit image can tell apart.
    """
    global _NORMAL_TABLE
    if _NORMAL_TABLE is None:
        q = ndtri((np.arange(65536) + 0.5) / 65536.0)
        q = (q - q.mean()) / q.std()
        _NORMAL_TABLE = q.astype(np.float32)
    return _NORMAL_TABLE


def standard_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 noise of ``shape`` with zero mean and unit variance (see ``_normal_table``)."""
    n = int(np.prod(shape))
    idx = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
    return _normal_table()[idx].reshape(shape)


def correlate(noise: np.ndarray, sigma: float) -> np.ndarray:
    """Spatially correlate white noise (F, H, W, 3) with a Gaussian of ``sigma`` px per channel,
    rescaled to unit variance again (the filter's energy is sum of its squared taps)."""
    out = gaussian_filter(noise, sigma=(0, sigma, sigma, 0), mode="wrap")
    impulse = np.zeros((33, 33), np.float64)
    impulse[16, 16] = 1.0
    energy = (gaussian_filter(impulse, sigma, mode="constant") ** 2).sum()
    return out / np.float32(np.sqrt(energy))


def add_noise(linear: np.ndarray, shot: float, read: float, rng: np.random.Generator,
              correlated_sigma: float = 0.0) -> np.ndarray:
    """Signal-dependent noise: x + sqrt(shot² · max(x, 0) + read²) · n, n ~ N(0, 1) per pixel,
    independent per frame. With ``correlated_sigma`` > 0 the field n is spatially correlated.
    linear: float32 (F, H, W, 3). Returns a new float32 array (not clipped)."""
    n = standard_noise(rng, linear.shape)
    if correlated_sigma > 0:
        n = correlate(n, correlated_sigma)
    # in place, one temporary: std = sqrt(shot² · max(x, 0) + read²); out = x + std · n
    out = np.maximum(linear, np.float32(0.0))
    out *= np.float32(shot * shot)
    out += np.float32(read * read)
    np.sqrt(out, out=out)
    out *= n
    out += linear
    return out


def degrade(canvas_srgb: np.ndarray, kernels: np.ndarray, size: int, gamma: float,
            highlight_gain: float, highlight_threshold: float, shot: float, read: float,
            correlated_sigma: float, noise_rng: np.random.Generator) -> np.ndarray:
    """The whole model for one burst: uint8 sRGB canvas (C, C, 3) + kernels (F, K, K) ->
    uint8 sRGB burst (F, size, size, 3)."""
    linear = linearize(canvas_srgb, gamma)
    if highlight_gain > 1.0:
        linear = boost_highlights(linear, highlight_threshold, highlight_gain)
    frames = blur(linear, kernels, size)
    frames = add_noise(frames, shot, read, noise_rng, correlated_sigma)
    return delinearize(frames, gamma)
