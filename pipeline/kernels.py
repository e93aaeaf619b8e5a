"""Camera shake: damped random-walk trajectories -> K×K blur kernels (PSFs).

The model follows Aittala & Durand (ECCV 2018): the camera's image-plane position is a 2-D random
walk whose velocity integrates N(0, 1) accelerations with damping. The path is centred at the
origin, standardized to unit RMS radius and scaled by a burst-level and a per-frame factor (some
bursts are uniformly blurred, others mix nearly sharp and very blurred frames). A little Gaussian
jitter of every point stands in for defocus. The points are splatted bilinearly into a K×K bitmap
that sums to 1. Bilinear splatting preserves the first moment, so after centring the point cloud the
kernel's centroid is exactly the centre pixel (unless a residual misalignment shifts it on purpose).

Two halves, as everywhere in the pipeline: ``sample_kernel_params(rng, cfg, frames, misalign)``
draws the random numbers and returns ``(params, draws)``: ``params`` the plain values that go to
the sample's json, ``draws`` (a ``ShakeDraws``) the raw standard-normal arrays, which are not stored
(the seed rebuilds them); ``build_kernels(params, draws, cfg, K)`` is a pure function of the two.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from pipeline.config import KernelConfig
from pipeline.distributions import loguniform


@dataclasses.dataclass(frozen=True, eq=False)
class ShakeDraws:
    """The raw draws behind one burst's kernels, all standard normal, float64 (F frames, T =
    kernels.steps, J = kernels.jitter_points). Kept apart from the json parameters: they are
    large and the sample's seed rebuilds them."""

    accel: np.ndarray  # (F, T, 2) accelerations of the random walk
    v0: np.ndarray  # (F, 2) initial velocities
    jitter: np.ndarray  # (F, T, J, 2) defocus jitter of every path point


def sample_kernel_params(rng: np.random.Generator, cfg: KernelConfig, frames: int,
                         misalign=None) -> tuple[dict, ShakeDraws]:
    """Draw every random number the kernels of one burst need.

    ``misalign``: the pipeline.config.ImagingConfig (its misalign_* and outlier_* fields), or None
    for perfectly registered frames. Frame 0 is the burst's reference: the frame the others were
    registered to, so it has no residual shift (the target has its geometry) and is never an
    outlier. Every other frame gets a residual shift N(0, misalign_px²) per axis, or with
    probability outlier_prob is an outlier: shift std outlier_shift_px and blur × outlier_blur.
    Shifts are clipped to ±misalign_max_px per axis (validated to fit the K×K kernel). With
    probability registered_prob the whole burst is perfectly registered instead (no shift, no
    outlier), as with ``misalign=None``.

    Returns (params, draws): params holds plain floats/bools/lists for the sample's json
    (blur_scale, mixed, frame_factors, defocus, shift, outlier); draws the raw arrays
    ``build_kernels`` needs besides them.
    """
    scale = float(loguniform(rng, cfg.scale_min, cfg.scale_max))
    mixed = bool(rng.random() < cfg.mixed_prob)
    lo, hi = (cfg.mixed_min, cfg.mixed_max) if mixed else (cfg.uniform_min, cfg.uniform_max)
    factors = np.atleast_1d(loguniform(rng, lo, hi, frames))
    defocus = rng.uniform(0.0, cfg.defocus_max, frames) if cfg.defocus_max > 0 else np.zeros(frames)
    # drawn whatever the settings, so that bursts that differ only in their misalignment settings
    # share every other parameter
    u, z = rng.random(frames), rng.standard_normal((frames, 2))
    shift, outlier = np.zeros((frames, 2)), np.zeros(frames, dtype=bool)
    # u[0] (the reference frame's, never an outlier) decides whether this burst is perfectly
    # registered, so that registered_prob changes no other draw
    if misalign is not None and not u[0] < misalign.registered_prob:
        outlier = u < misalign.outlier_prob
        outlier[0] = False
        std = np.where(outlier, misalign.outlier_shift_px, misalign.misalign_px)
        shift = np.clip(z * std[:, None], -misalign.misalign_max_px, misalign.misalign_max_px)
        shift[0] = 0.0
        factors = np.where(outlier, factors * misalign.outlier_blur, factors)
    params = {
        "blur_scale": scale,
        "mixed": mixed,
        "frame_factors": factors.tolist(),
        "defocus": defocus.tolist(),
        "shift": shift.tolist(),  # residual misalignment (dx, dy) per frame, px; frame 0: (0, 0)
        "outlier": outlier.tolist(),  # per frame: an outlier (shifted and blurred more)
    }
    # drawn last, in this order: the draws above come first in the stream
    draws = ShakeDraws(accel=rng.standard_normal((frames, cfg.steps, 2)),
                       v0=rng.standard_normal((frames, 2)),
                       jitter=rng.standard_normal((frames, cfg.steps, cfg.jitter_points, 2)))
    return params, draws


@functools.lru_cache(maxsize=8)
def _damping_weights(d: float, T: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 (T, T) d^(t-s) where s <= t, else 0; and (T,) d^(t+1). Read-only: cached."""
    lag = np.subtract.outer(np.arange(T), np.arange(T))
    matrix = np.where(lag >= 0, d ** np.maximum(lag, 0).astype(np.float64), 0.0)
    powers = d ** np.arange(1, T + 1, dtype=np.float64)
    matrix.flags.writeable = powers.flags.writeable = False
    return matrix, powers


def trajectories(accel: np.ndarray, v0: np.ndarray, damping: float) -> np.ndarray:
    """Damped random walk, centred, unit RMS radius.

    accel: float (F, T, 2) standard normal; v0: float (F, 2) standard normal, scaled here to the
    stationary distribution of v_t = d·v_{t-1} + a_t (variance 1 / (1 - d²)) so the walk has no
    start-up transient. Returns float64 (F, T, 2) positions (x, y) in units of the RMS radius.
    """
    v_init = v0 / np.sqrt(1.0 - damping**2)
    F, T = accel.shape[:2]
    # v_t = sum_{s <= t} d^(t-s) a_s + d^(t+1) v_init: one product with a (T, T) lower-triangular
    # matrix instead of a loop over t (scipy.signal.lfilter would do it too, but importing
    # scipy.signal costs 0.5-1 s in every worker process)
    matrix, powers = _damping_weights(float(damping), T)
    flat = np.ascontiguousarray(accel.transpose(1, 0, 2)).reshape(T, -1)  # (T, F * 2): one GEMM
    vel = (matrix @ flat).reshape(T, F, -1).transpose(1, 0, 2)
    vel += powers[:, None] * v_init[:, None, :]
    pos = np.cumsum(vel, axis=1)
    pos -= pos.mean(axis=1, keepdims=True)
    rms = np.sqrt((pos**2).sum(axis=2).mean(axis=1))
    return pos / np.maximum(rms, 1e-12)[:, None, None]


def splat(points: np.ndarray, K: int) -> np.ndarray:
    """Bilinear splat of points (F, P, 2) (x, y offsets from the kernel centre, px, all within
    (-(K//2), K//2)) into float64 (F, K, K) bitmaps normalized to sum 1. Row = y, column = x."""
    F, P, _ = points.shape
    c = K // 2
    x = points[..., 0] + c
    y = points[..., 1] + c
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    gx, gy = 1.0 - fx, 1.0 - fy
    i = (y0 * K + x0).astype(np.intp)  # flat index of the top-left neighbour
    i += (np.arange(F) * (K * K))[:, None]
    idx = np.concatenate([i, i + 1, i + K, i + (K + 1)], axis=1)
    w = np.concatenate([gx * gy, fx * gy, gx * fy, fx * fy], axis=1)
    out = np.bincount(idx.ravel(), weights=w.ravel(), minlength=F * K * K).reshape(F, K, K)
    out /= out.sum(axis=(1, 2), keepdims=True)
    return out


def build_kernels(params: dict, draws: ShakeDraws, cfg: KernelConfig,
                  K: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Pure function of ``sample_kernel_params``' output (params: its json values, draws: its
    raw arrays).

    Returns (kernels float32 (F, K, K) summing to 1, trajectories float32 (F, T, 2) in px,
    fit factors: per frame the factor (<= 1) by which the path was shrunk to fit in K×K).
    """
    traj = trajectories(draws.accel, draws.v0, cfg.damping)
    traj *= (params["blur_scale"] * np.asarray(params["frame_factors"]))[:, None, None]  # RMS radius, px
    jitter = draws.jitter
    F, T, J, _ = jitter.shape
    points = np.asarray(params["defocus"])[:, None, None, None] * jitter
    points += traj[:, :, None, :]
    points = points.reshape(F, T * J, 2)
    points -= points.mean(axis=1, keepdims=True)  # centroid exactly at the centre
    # shrink paths that would leave the bitmap (bilinear needs one pixel of room), keeping the
    # shape; a shift is bounded (config validation) so that at least one pixel of room is left,
    # and clipped here too, so that no kernel mass can ever leave (or wrap around) the K×K bitmap
    room = K // 2 - 1
    shift = np.clip(np.asarray(params["shift"], dtype=np.float64).reshape(F, 2), -(room - 1), room - 1)
    limit = room - np.abs(shift).max(axis=1)
    extent = np.abs(points).max(axis=(1, 2))
    fit = np.minimum(1.0, np.maximum(limit, 0.0) / np.maximum(extent, 1e-12))
    points *= fit[:, None, None]
    traj *= fit[:, None, None]
    points += shift[:, None, :]
    kernels = splat(points, K)
    return kernels.astype(np.float32), traj.astype(np.float32), fit.tolist()


def kernel_radius(kernels: np.ndarray) -> np.ndarray:
    """RMS radius (px) of each kernel around its centroid: float (F,) for kernels (F, K, K).

    Computed from the two marginals (the squared distance is dx² + dy²), not the K×K grid."""
    K = kernels.shape[-1]
    k = kernels.astype(np.float64)
    px, py = k.sum(axis=-2), k.sum(axis=-1)  # mass per column (x) and per row (y)
    s = px.sum(axis=-1)
    a = np.arange(K, dtype=np.float64)
    cx, cy = (px * a).sum(axis=-1) / s, (py * a).sum(axis=-1) / s
    var = (px * (a - cx[..., None]) ** 2).sum(axis=-1) + (py * (a - cy[..., None]) ** 2).sum(axis=-1)
    return np.sqrt(var / s)
