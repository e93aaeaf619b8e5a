"""The degradation model as pure functions (Aittala & Durand 2018, section 4).

sRGB canvas -> linear light (random gamma) -> optional highlight boost -> per-frame blur (FFT,
linear light) -> shot + read noise (optionally spatially correlated) -> clip [0, 1] -> re-gamma ->
uint8. Every function takes its parameters explicitly; randomness enters only as a Generator
argument (``add_noise``) or through ``sample_params`` in pipeline/render.py.

Layout: float images are channel-first ("planar"), (3, H, W) or (F, 3, H, W), linear light unless a
name says sRGB. Contiguous planes are what the FFT and the noise filter want; only the uint8 burst
that ``degrade`` returns is (F, H, W, 3), written straight from the planes.

Units: linear light is in [0, white] with ``white`` = 1 by default. ``degrade`` works in units where
white = 255^gamma, which turns the re-gamma 255 · (x / white)^(1 / gamma) into a bare power, one
pass fewer over the burst (the noise is scaled to match, so the model is the same).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import scipy.fft as sfft
from scipy.special import ndtri

LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)  # Rec. 709, linear light


def linearize(srgb: np.ndarray, gamma: float, white: float = 1.0) -> np.ndarray:
    """uint8 sRGB (any shape) -> float32 white · (x / 255) ** gamma (a 256-entry table).

    The result is C-contiguous in ``srgb``'s logical shape, so a channel-first view of an
    (H, W, 3) image gives contiguous (3, H, W) planes.
    """
    table = white * (np.arange(256, dtype=np.float64) / 255.0) ** gamma
    return np.take(table.astype(np.float32), srgb)


def delinearize(linear: np.ndarray, gamma: float, white: float = 1.0,
                out: np.ndarray | None = None, overwrite_input: bool = False) -> np.ndarray:
    """float linear (any shape) -> uint8 round(255 · clip(x / white, 0, 1) ** (1 / gamma)).

    ``out``: optional uint8 array (or view) of ``linear``'s shape to write into.
    ``overwrite_input``: use a float32 ``linear`` as the scratch space (its values are lost).
    """
    # clip to [floor, white] rather than [0, white]: the floor maps to 0.25, so it still quantizes
    # to 0, and log2/exp2 keep to their vector paths (a 0 among the lanes, log2(0) = -inf, makes
    # them 5× slower)
    own = overwrite_input and linear.dtype == np.float32
    x = np.clip(linear, np.float32(white * (0.25 / 255.0) ** gamma), np.float32(white),
                out=linear if own else np.empty(linear.shape, np.float32))
    if white != 255.0 ** gamma:  # to units where white = 255^gamma: the power lands in [0, 255]
        x *= np.float32(255.0 ** gamma / white)
    # x ** (1 / gamma) as exp2(log2(x) / gamma): 4× faster than np.power in float32 here, and
    # well within the 0.5 margin of the rounding (every level round-trips exactly)
    np.log2(x, out=x)
    x *= np.float32(1.0 / gamma)
    np.exp2(x, out=x)
    if out is None:
        out = np.empty(x.shape, np.uint8)
    np.add(x, np.float32(0.5), out=out, casting="unsafe")  # round half up, then truncate
    return out


def boost_highlights(linear: np.ndarray, threshold: float, gain: float, white: float = 1.0) -> np.ndarray:
    """Push bright regions above white so that, once blurred and clipped, they streak like
    saturated lights. linear: float32 (3, ...) channel-first in [0, white]. Pixels whose luminance
    exceeds ``threshold`` · white are scaled by up to ``gain`` (reached at luminance white),
    smoothly from 1 at the threshold. Returns a new float32 array (values may exceed white).
    """
    if gain <= 1.0:
        return linear.copy()
    lum = LUMA[0] * linear[0] + LUMA[1] * linear[1] + LUMA[2] * linear[2]
    excess = (lum - np.float32(threshold * white)) / np.float32((1.0 - threshold) * white)
    np.maximum(excess, 0.0, out=excess)
    return linear * (1.0 + np.float32(gain - 1.0) * excess)


def fft_size(n: int) -> int:
    return sfft.next_fast_len(n, real=True)


def support_radius(kernels: np.ndarray) -> int:
    """Smallest r such that every kernel (F, K, K) is zero outside its centre (2r+1)² window."""
    K = kernels.shape[-1]
    ys, xs = np.nonzero(kernels.any(axis=0))
    if ys.size == 0:
        return 0
    return int(max(np.abs(ys - K // 2).max(), np.abs(xs - K // 2).max()))


def crop_to_support(canvas: np.ndarray, kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop what the blur never reads: kernels (F, K, K) -> (F, k, k) with k = 2r + 1 (r the
    support radius), canvas (..., C, C) -> (..., C - K + k, C - K + k), its centre (views)."""
    K = kernels.shape[-1]
    m, r = K // 2, support_radius(kernels)
    C = canvas.shape[-1]
    return canvas[..., m - r:C - (m - r), m - r:C - (m - r)], kernels[:, m - r:m + r + 1, m - r:m + r + 1]


def blurred_frames(canvas: np.ndarray, kernels: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Blur one linear canvas with F kernels, yielding the valid centre crop of each frame in turn.

    canvas: float32 (3, C, C) planes with C = size + K - 1; kernels: float32 (F, K, K), centre at
    K // 2. Yields F float32 arrays (3, size, size) (views with a row stride of L: no copy made).

    The FFT is circular over a fast length L >= size + 2r, where r is the kernels' actual support
    radius (most shakes are far smaller than K). The kernel sits at the grid's origin, so output
    row y = sum_j k[j] · img[y - j]; rows 2r .. 2r + size - 1 only read image rows 0 .. C' - 1: no
    wrap-around or border reaches the crop. The 2-D transforms are taken one axis at a time: the
    forward ones skip the zero rows of the padding, the inverse one runs its last (real) pass on
    the ``size`` rows that are kept only: ~1.7× faster than scipy's rfft2/irfft2 here. A frame at
    a time keeps the working set small (in cache, and no fresh pages from the allocator).
    """
    canvas, kernels = crop_to_support(canvas, kernels)
    F, k, _ = kernels.shape
    C = canvas.shape[-1]
    if C != size + k - 1:
        raise ValueError(f"canvas side {canvas.shape[-1]} does not match size {size} + kernel - 1")
    L = fft_size(C)
    img = sfft.fft(sfft.rfft(canvas, n=L, axis=-1), n=L, axis=-2, overwrite_x=True)  # (3, L, L//2+1)
    ker = sfft.fft(sfft.rfft(kernels, n=L, axis=-1), n=L, axis=-2, overwrite_x=True)  # (F, L, L//2+1)
    for f in range(F):
        spec = sfft.ifft(np.multiply(img, ker[f]), axis=-2, overwrite_x=True)
        out = sfft.irfft(spec[:, k - 1:k - 1 + size], n=L, axis=-1)  # (3, size, L)
        yield out[..., k - 1:k - 1 + size]


def blur(canvas: np.ndarray, kernels: np.ndarray, size: int) -> np.ndarray:
    """All frames of ``blurred_frames`` as one float32 array (F, 3, size, size)."""
    return np.stack(list(blurred_frames(canvas, kernels, size)))


_NORMAL_TABLE = None


def _normal_table() -> np.ndarray:
    """65536 standard-normal quantiles, normalized to zero mean and unit variance.

    Drawing noise as table[uint16] is ~6× faster than Generator.standard_normal and exact in its
    first two moments; its tails stop at ±4.2σ, which no 8-bit image can tell apart.
    """
    global _NORMAL_TABLE
    if _NORMAL_TABLE is None:
        q = ndtri((np.arange(65536) + 0.5) / 65536.0)
        q = (q - q.mean()) / q.std()
        _NORMAL_TABLE = q.astype(np.float32)
    return _NORMAL_TABLE


def standard_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 noise of ``shape`` with zero mean and unit variance (see ``_normal_table``).

    The table indices are the generator's raw 64-bit outputs read as four little-endian uint16s
    each (uniform and independent): 6× faster than ``rng.bytes``, 1.7× faster than
    ``rng.integers``.
    """
    n = math.prod(shape)
    raw = rng.bit_generator.random_raw((n + 3) // 4)
    idx = raw.astype("<u8", copy=False).view("<u2")[:n]
    return np.take(_normal_table(), idx).reshape(shape)


def correlation_taps(sigma: float) -> np.ndarray:
    """Half of the correlation filter: float64 [w_0 = 1, w_1, ..., w_R], Gaussian w_j =
    exp(-j² / 2σ²), out to R = floor(3σ) px (the first tap left out weighs < 1.1% of w_0)."""
    R = int(math.floor(3.0 * sigma))
    return np.exp(-np.arange(R + 1) ** 2 / (2.0 * sigma * sigma))


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """float32 noise of ``shape`` (..., H, W), zero mean, unit variance, spatially correlated over
    the last two axes by a separable Gaussian of ``sigma`` px (``correlation_taps``).

    White noise is drawn R px larger on each side and filtered without padding ("valid"), so the
    field is stationary up to its edges (no wrap-around). The taps are not normalized in the
    loop; the sum of squares of the 2-D filter rescales the result to unit variance.
    """
    w = correlation_taps(sigma)
    R = len(w) - 1
    *lead, H, W = shape
    field = standard_noise(rng, (*lead, H + 2 * R, W + 2 * R))
    field = _smooth_last_axis(field, w)  # rows
    field = _smooth_last_axis(field.swapaxes(-1, -2), w).swapaxes(-1, -2)  # columns
    energy = float(1.0 + 2.0 * (w[1:] ** 2).sum()) ** 2  # sum of the 2-D filter's squared taps
    field *= np.float32(1.0 / math.sqrt(energy))
    return field


def _smooth_last_axis(field: np.ndarray, w: np.ndarray) -> np.ndarray:
    """"Valid" symmetric filtering along the last axis: out[i] = sum_j w_|j| · field[i + R + j],
    j in [-R, R]; the last axis shrinks by 2R. New float32 array in field's memory order."""
    R = len(w) - 1
    if R == 0:
        return field.copy(order="K")
    n = field.shape[-1] - 2 * R
    out = np.add(field[..., R - 1:R - 1 + n], field[..., R + 1:R + 1 + n])
    out *= np.float32(w[1])
    for j in range(2, R + 1):
        pair = np.add(field[..., R - j:R - j + n], field[..., R + j:R + j + n])
        pair *= np.float32(w[j])
        out += pair
    out += field[..., R:R + n]
    return out


MID_GREY = 0.18  # linear mid grey: where summaries quote the noise level


def noise_std(level: float, shot: float, read: float) -> float:
    """Std of ``add_noise``'s noise at linear ``level`` (white = 1): sqrt(shot² · level + read²)."""
    return float(np.sqrt(shot ** 2 * level + read ** 2))


def add_noise(linear: np.ndarray, shot: float, read: float, rng: np.random.Generator,
              correlated_sigma: float = 0.0, white: float = 1.0,
              out: np.ndarray | None = None) -> np.ndarray:
    """Signal-dependent noise: x + sqrt(shot² · max(x, 0) + read²) · n, n ~ N(0, 1) per pixel,
    independent per frame, with x in units of white (the levels are std devs at white = 1, so
    in other units std = white · sqrt(shot² · x / white + read²)). With ``correlated_sigma`` > 0
    the field n is spatially correlated over the last two axes (``correlated_noise``).

    linear: float32 (..., H, W) (a view is fine). Returns float32 (not clipped): a new array, or
    ``out`` (float32 of linear's shape, not overlapping it) when given.
    """
    if correlated_sigma > 0:
        n = correlated_noise(rng, linear.shape, correlated_sigma)
    else:
        n = standard_noise(rng, linear.shape)
    # std = sqrt(a · max(x, 0) + b); out = x + std · n, in place
    out = np.maximum(linear, np.float32(0.0), out=out)
    out *= np.float32(shot * shot * white)
    out += np.float32((read * white) ** 2)
    np.sqrt(out, out=out)
    out *= n
    out += linear
    return out


def jpeg_frames(burst: np.ndarray, quality: int) -> np.ndarray:
    """Every frame of a uint8 (F, H, W, 3) sRGB burst through a JPEG encode/decode at ``quality``
    (Pillow's libjpeg, 4:2:0 chroma subsampling as cameras write it). Deterministic: the encoder
    stamps no clock. Returns a new uint8 (F, H, W, 3) array."""
    from PIL import Image

    out = np.empty_like(burst)
    for f, frame in enumerate(burst):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=int(quality), subsampling=2)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            out[f] = np.asarray(im.convert("RGB"))
    return out


def degrade(canvas_srgb: np.ndarray, kernels: np.ndarray, size: int, gamma: float,
            highlight_gain: float, highlight_threshold: float, shot: float, read: float,
            correlated_sigma: float, noise_rng: np.random.Generator) -> np.ndarray:
    """The whole model for one burst: uint8 sRGB canvas (C, C, 3) + kernels (F, K, K) ->
    uint8 sRGB burst (F, size, size, 3), C-contiguous.

    Works in units where white = 255^gamma (see the module docstring), on the part of the canvas
    that the kernels reach, and frame by frame after the forward FFTs, so that each frame's float
    planes stay in cache through blur, noise, re-gamma and quantization. The noise of frame f is
    drawn from ``noise_rng`` after that of frame f - 1.
    """
    white = 255.0 ** gamma
    canvas_srgb, kernels = crop_to_support(canvas_srgb.transpose(2, 0, 1), kernels)
    linear = linearize(canvas_srgb, gamma, white)  # (3, C', C') contiguous
    if highlight_gain > 1.0:
        linear = boost_highlights(linear, highlight_threshold, highlight_gain, white)
    burst = np.empty((kernels.shape[0], size, size, 3), np.uint8)
    scratch = np.empty((3, size, size), np.float32)  # one frame's noisy planes, reused
    for f, frame in enumerate(blurred_frames(linear, kernels, size)):  # (3, size, size) each
        noisy = add_noise(frame, shot, read, noise_rng, correlated_sigma, white, out=scratch)
        delinearize(noisy, gamma, white, out=burst[f].transpose(2, 0, 1), overwrite_input=True)
    return burst
