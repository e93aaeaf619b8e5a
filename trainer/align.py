"""Align a burst of photos to a reference frame: global motion estimation and resampling.

Plain numpy / scipy / OpenCV on RGB uint8 frames; no torch, so the aligner can be used and tested
without the model (a test checks that importing this module does not import torch).

1. ``gray`` and ``pyramid``: Rec. 601 luma in [0, 1], a Gaussian pyramid from the alignment level
   (``alignment_level``: the first level whose long side is <= ``align_size``, 1024 px) down.
2. ``choose_reference``: by default the sharpest frame (gradient energy of a noise-suppressed,
   downscaled grey image). A content criterion, not a position in the list, so any reordering of
   the files gives the same reference and, the model being permutation invariant, the same output.
3. ``estimate_alignment`` per frame, against the reference: a global homography (or affine, or
   translation) mapping reference pixels to frame pixels, the background's where an object moves
   on its own. Coarse step (``coarse_estimate``): of ORB features matched and fitted with RANSAC
   (``feature_homography``), the phase-correlation shift on a Hann-windowed, downscaled grey image,
   and no motion, the one under which most pixels agree. Fine step: inverse compositional
   Lucas-Kanade (Baker & Matthews 2004) on the pyramid, from the coarsest level with >= 32 px down
   to the alignment level, in normalized coordinates for conditioning, reweighted with Tukey's
   biweight so that pixels that move on their own stop pulling the fit. A model that fails (a
   diverging or absurd warp, a ZNCC with the reference below 0.5, a band-pass ZNCC below 0.4)
   falls back to the next simpler one (homography, affine, translation); when all fail,
   ``AlignmentError``.
4. ``warp_frame`` resamples a frame onto the reference grid at full resolution (OpenCV
   ``warpPerspective``, bilinear); where the frame does not cover the reference, the reference's
   own pixels fill in. ``align_burst`` runs 1-4 on a whole burst, frames in parallel threads; a
   frame that fails is left out (``Rejected``, with the reason) while 2 usable frames remain, and
   ``report`` turns the result into the JSON that ``deblur`` writes beside its output.

Homography convention everywhere: ``h`` (3, 3) maps reference pixel (x, y, 1) to frame pixel
coordinates, pixel centres at integers (the pixel in row i, column j is at x = j, y = i).
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import cv2
import numpy as np
from scipy import fft
from scipy.ndimage import gaussian_filter, gaussian_laplace, map_coordinates

from common.errors import UserError


class AlignmentError(UserError):
    """A frame could not be aligned to the reference; the message is one line."""


# ----------------------------------------------------------------------------- grey pyramid


def gray(frame: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (H, W) luma in [0, 1] (Rec. 601 weights on sRGB values)."""
    out = np.zeros(frame.shape[:2], np.float32)
    for c, weight in enumerate((0.299, 0.587, 0.114)):  # one channel at a time: no float RGB copy
        out += frame[..., c] * np.float32(weight / 255)
    return out


def _halve(image: np.ndarray) -> np.ndarray:
    """Anti-aliased decimation by 2: coarse pixel (i, j) sits at fine pixel (2i, 2j)."""
    return gaussian_filter(image, 1.0, mode="nearest")[::2, ::2]


def alignment_level(shape: tuple[int, int], align_size: int) -> int:
    """The pyramid level (0 = full resolution) whose long side is first <= align_size."""
    level, long_side = 0, max(shape)
    while long_side > align_size:
        long_side = (long_side + 1) // 2
        level += 1
    return level


def pyramid(image: np.ndarray, finest: int, min_side: int = 32) -> dict[int, np.ndarray]:
    """Gaussian pyramid {level: float32 image} from level ``finest`` down while the short side
    stays >= ``min_side`` (level ``finest`` is always kept). Levels finer than ``finest`` are
    dropped as soon as they are built, so a 12 MP frame costs one full-size grey image."""
    for _ in range(finest):
        image = _halve(image)
    levels = {finest: image}
    level = finest
    while min(image.shape) // 2 >= min_side:
        image = _halve(image)
        level += 1
        levels[level] = image
    return levels


def sharpness(level_image: np.ndarray) -> float:
    """Gradient energy of a grey image after a light blur (so noise counts less than detail)."""
    smooth = gaussian_filter(level_image.astype(np.float64), 1.0, mode="nearest")
    gy, gx = np.gradient(smooth)
    return float(np.mean(gx * gx + gy * gy))


def choose_reference(level_images: Sequence[np.ndarray]) -> int:
    """Index of the sharpest frame (grey images at the alignment level). Independent of order
    except between frames of exactly equal sharpness, which only identical content gives."""
    scores = [sharpness(image) for image in level_images]
    return int(np.argmax(scores))


# ----------------------------------------------------------------------------- alignment


def _scale(level: int) -> np.ndarray:
    """Full-resolution pixel coordinates = S @ level pixel coordinates (homogeneous x, y)."""
    return np.diag([2.0**level, 2.0**level, 1.0])


def to_level(h_full: np.ndarray, level: int) -> np.ndarray:
    s = _scale(level)
    return np.linalg.inv(s) @ h_full @ s


def to_full(h_level: np.ndarray, level: int) -> np.ndarray:
    s = _scale(level)
    return s @ h_level @ np.linalg.inv(s)


def apply_homography(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Homography h (3, 3) on pixel coordinates x, y -> (x', y', w')."""
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    return (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w, (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w, w


def warp_gray(image: np.ndarray, h: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sample grey ``image`` at h(reference pixel) for every pixel of a ``shape`` grid.

    Returns (warped float64 (H, W), valid bool (H, W): the sample lies inside the image)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    xw, yw, w = apply_homography(h, xs, ys)
    valid = (w > 0) & (xw >= 0) & (xw <= image.shape[1] - 1) & (yw >= 0) & (yw <= image.shape[0] - 1)
    warped = map_coordinates(image.astype(np.float64, copy=False), [yw, xw], order=1, mode="nearest")
    return warped, valid


def zncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Zero-mean normalized cross-correlation of a and b over ``mask`` (1 = identical up to gain/bias)."""
    a, b = a[mask], b[mask]
    if a.size < 16:
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b)) / denom if denom > 0 else 0.0


def phase_correlation(reference: np.ndarray, frame: np.ndarray) -> tuple[float, float, float]:
    """Translation (dx, dy) with frame(x + d) ~= reference(x), and the correlation peak height.

    Both grey float (H, W), same shape. Hann window against the wrap-around edges; the
    cross-power spectrum is whitened (phase only) and low-passed a little so noise at high
    frequencies does not drown the peak. Sub-pixel: a parabola through the peak and its
    neighbours, per axis. Peak height is ~1 for a pure shift, ~0 for unrelated images.
    """
    h, w = reference.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    fa = fft.rfft2((reference - reference.mean()) * window)
    fb = fft.rfft2((frame - frame.mean()) * window)
    cross = fb * np.conj(fa)
    cross /= np.abs(cross) + 1e-12 * np.abs(cross).max() + 1e-30
    fy = fft.fftfreq(h)[:, None]
    fx = fft.rfftfreq(w)[None, :]
    cross *= np.exp(-(fx**2 + fy**2) / (2 * 0.25**2))
    surface = fft.irfft2(cross, s=(h, w))
    iy, ix = np.unravel_index(int(np.argmax(surface)), surface.shape)
    peak = float(surface[iy, ix])

    def refine(minus: float, centre: float, plus: float) -> float:
        denom = minus - 2 * centre + plus
        return 0.0 if denom >= 0 else float(np.clip(0.5 * (minus - plus) / denom, -0.5, 0.5))

    dy = iy + refine(surface[iy - 1, ix], peak, surface[(iy + 1) % h, ix])
    dx = ix + refine(surface[iy, ix - 1], peak, surface[iy, (ix + 1) % w])
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    # A pure shift gives a peak of mean(low-pass) over the full spectrum; report relative to it.
    full = np.exp(-(fft.fftfreq(w)[None, :] ** 2 + fy**2) / (2 * 0.25**2))
    return float(dx), float(dy), peak / float(full.mean())


# Tukey's biweight constant (95% efficiency on Gaussian residuals), in robust standard deviations.
TUKEY_C = 4.685


def tukey_weights(residual: np.ndarray, floor: float = 0.02) -> np.ndarray:
    """Tukey biweight of each residual, float64 in [0, 1]: 0 beyond TUKEY_C robust standard
    deviations (1.4826 * median |r|, at least ``floor``, in the residual's units) so a region
    that moves on its own (a walker, a car) stops pulling the global fit instead of bending it."""
    sigma = max(1.4826 * float(np.median(np.abs(residual))), floor)
    u = residual / (TUKEY_C * sigma)
    return np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)


def _lk_level(reference: np.ndarray, frame: np.ndarray, h_level: np.ndarray, motion: str,
              max_iter: int = 50, tol: float = 1e-3, robust: bool = True) -> np.ndarray:
    """Inverse compositional Lucas-Kanade on one pyramid level; returns the refined homography.

    Parameters act in normalized coordinates (centre 0, long side from -1 to 1), where the eight
    homography parameters have comparable scales and the Hessian is well conditioned. motion:
    "homography" (8 parameters), "affine" (6) or "translation" (2). robust: iteratively
    reweighted least squares with Tukey weights on the residual (standardized intensities).
    """
    rows, cols = reference.shape
    s = max(rows, cols) / 2
    norm = np.array([[1 / s, 0, -(cols - 1) / 2 / s], [0, 1 / s, -(rows - 1) / 2 / s], [0, 0, 1]])
    norm_inv = np.linalg.inv(norm)

    def standardize(x):
        x = x.astype(np.float64)
        return (x - x.mean()) / (x.std() + 1e-12)

    t = standardize(reference)
    img = standardize(frame)
    ty, tx = np.gradient(t)
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float64)
    u = (xs - (cols - 1) / 2) / s
    v = (ys - (rows - 1) / 2) / s
    tu, tv = tx * s, ty * s  # gradient with respect to normalized coordinates
    if motion == "translation":
        sd = np.stack([tu, tv], axis=-1)
        index = [2, 5]
    elif motion == "affine":
        sd = np.stack([tu * u, tu * v, tu, tv * u, tv * v, tv], -1)
        index = list(range(6))
    else:
        sd = np.stack([tu * u, tu * v, tu, tv * u, tv * v, tv, -tu * u * u - tv * u * v, -tu * u * v - tv * v * v], -1)
        index = list(range(8))
    sd = sd.reshape(-1, len(index))
    interior = np.zeros((rows, cols), bool)
    interior[1:-1, 1:-1] = True  # np.gradient is one-sided on the border
    corners_u = np.array([-1.0, 1.0, 1.0, -1.0]) * (cols - 1) / 2 / s
    corners_v = np.array([-1.0, -1.0, 1.0, 1.0]) * (rows - 1) / 2 / s

    hn = norm @ h_level @ norm_inv  # normalized reference -> normalized frame
    for _ in range(max_iter):
        warped, valid = warp_gray(img, norm_inv @ hn @ norm, (rows, cols))
        mask = (valid & interior).ravel()
        if mask.mean() < 0.25:
            raise AlignmentError("the frame drifted out of the reference during alignment")
        err = (warped.ravel() - t.ravel())[mask]
        sdm = sd[mask]
        weight = tukey_weights(err) if robust else np.ones_like(err)
        hessian = sdm.T @ (sdm * weight[:, None])
        try:
            step = np.linalg.solve(hessian, sdm.T @ (err * weight))
        except np.linalg.LinAlgError:
            raise AlignmentError("singular alignment system (a flat, textureless image?)") from None
        p = np.zeros(9)
        p[index] = step
        dh = np.eye(3) + p.reshape(3, 3)
        dh[2, 2] = 1.0
        hn = hn @ np.linalg.inv(dh)
        hn /= hn[2, 2]
        if not np.isfinite(hn).all():
            raise AlignmentError("alignment diverged")
        du, dv, _ = apply_homography(dh, corners_u, corners_v)
        if np.max(np.hypot(du - corners_u, dv - corners_v)) * s < tol:
            break
    return norm_inv @ hn @ norm


# The motion models, richest first: a frame that cannot be aligned with one falls back to the next.
MOTIONS = ("homography", "affine", "translation")


@dataclasses.dataclass
class Alignment:
    """A frame's warp to the reference: ``homography`` maps full-resolution reference pixel (x, y, 1)
    to frame pixel coordinates. ``shift`` is where the reference centre lands, minus the centre, px;
    ``correlation`` the ZNCC with the reference after alignment at the alignment level. ``model``:
    the motion model that was kept ("homography", "affine" or "translation"; a richer one that
    failed is named in ``fallbacks`` with its reason). ``coarse``: where the starting estimate came
    from ("features": ORB + RANSAC, "phase": phase correlation, "identity"). ``residual``: RMS grey
    difference after alignment over the pixels the frame covers, 8-bit levels; ``inliers``: the
    fraction of those within 3 robust standard deviations (what the background covers when an
    object moves on its own); ``structure``: the ZNCC of the band-pass (Laplacian of Gaussian)
    images, which unrelated content fails even where smooth shading correlates."""

    homography: np.ndarray
    shift: tuple[float, float]
    correlation: float
    model: str = "homography"
    coarse: str = "phase"
    residual: float = 0.0
    inliers: float = 1.0
    structure: float = 1.0
    fallbacks: tuple[str, ...] = ()


@dataclasses.dataclass
class Rejected:
    """A frame left out of the burst: ``reason`` is one line."""

    reason: str


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def feature_homography(reference: np.ndarray, frame: np.ndarray, min_inliers: int = 12) -> tuple[np.ndarray, str] | None:
    """Dominant motion from ORB features: (3, 3) reference -> frame pixels of this level, and the
    model RANSAC fitted ("homography" or, with too few inliers for one, "affine": similarity),
    or None where too few features match (small or flat images).

    reference, frame: grey float (H, W) in [0, 1], the same level. Matches are mutual nearest
    neighbours in Hamming distance; RANSAC (3 px) keeps the motion most of them agree on, which is
    the background's when an object moves across a static scene, where a global least-squares fit
    (or the phase-correlation peak, for a large object) may follow the object."""
    orb = cv2.ORB_create(nfeatures=2000, edgeThreshold=15, patchSize=15, fastThreshold=10)
    kr, dr = orb.detectAndCompute(_to_uint8(reference), None)
    kf, df = orb.detectAndCompute(_to_uint8(frame), None)
    if dr is None or df is None or len(kr) < min_inliers or len(kf) < min_inliers:
        return None
    matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(dr, df)
    if len(matches) < min_inliers:
        return None
    src = np.float32([kr[m.queryIdx].pt for m in matches]).reshape(-1, 1, 2)
    dst = np.float32([kf[m.trainIdx].pt for m in matches]).reshape(-1, 1, 2)
    h, mask = cv2.findHomography(src, dst, cv2.RANSAC, 3.0, maxIters=2000, confidence=0.999)
    if h is not None and mask is not None and int(mask.sum()) >= max(min_inliers, 0.2 * len(matches)):
        return h / h[2, 2], "homography"
    a, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0)
    if a is not None and mask is not None and int(mask.sum()) >= min_inliers:
        return np.vstack([a, [0, 0, 1.0]]), "affine"
    return None


def _restrict(h: np.ndarray, motion: str) -> np.ndarray:
    """The nearest warp of a simpler model: drop the perspective row (affine) or keep where the
    centre goes (translation), approximately; LK refines from there."""
    if motion == "homography":
        return h
    out = np.eye(3)
    if motion == "affine":
        out[:2] = h[:2] / h[2, 2]
    else:
        out[:2, 2] = h[:2, 2] / h[2, 2]
    return out


def coarse_estimate(reference: dict[int, np.ndarray], frame: dict[int, np.ndarray]) -> tuple[np.ndarray, str]:
    """A starting warp (full-resolution pixels) and where it came from, the candidate that
    correlates best with the reference on a level of at most 256 px: the ORB + RANSAC fit on the
    finest level (robust to an object moving on its own), the phase-correlation shift (for
    textures too fine or small for features), or no motion (a periodic texture can fool the
    correlation peak)."""
    finest, coarsest = min(reference), max(reference)
    pc_level = next((lv for lv in sorted(reference) if max(reference[lv].shape) <= 256), coarsest)
    ref_pc, frame_pc = reference[pc_level], frame[pc_level]
    dx, dy, _ = phase_correlation(ref_pc, frame_pc)
    candidates = [(np.eye(3), "identity"), (to_full(np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]]), pc_level), "phase")]
    found = feature_homography(reference[finest], frame[finest])
    if found is not None:
        candidates.append((to_full(found[0], finest), "features"))

    def score(h: np.ndarray) -> float:
        ref, warped, valid = _warp_pair(ref_pc, frame_pc, to_level(h, pc_level))
        if valid.mean() < 0.25 or not (apply_homography(to_level(h, pc_level), *_corners(ref_pc.shape))[2] > 0).all():
            return -1.0
        # robust: the share of pixels that agree (an object moving alone counts against no candidate)
        diff = (warped - ref)[valid]
        return float(np.mean(np.abs(diff) < 0.03)) + 1e-3 * zncc(ref, warped, valid)

    h, source = max(candidates, key=lambda c: score(c[0]))
    return h, source


def _corners(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([0, shape[1] - 1, shape[1] - 1, 0], float), np.array([0, 0, shape[0] - 1, shape[0] - 1], float))


def estimate_alignment(reference: dict[int, np.ndarray], frame: dict[int, np.ndarray], motion: str = "homography",
                       shape: tuple[int, int] | None = None, min_correlation: float = 0.5,
                       max_shift: float = 0.25) -> Alignment:
    """Align one frame to the reference; both are pyramids from ``pyramid()`` with the same levels.

    shape: (H, W) at full resolution (default: the finest level's size times its scale).
    motion: the richest model to try, "homography" (8 parameters), "affine" (6) or "translation"
    (2); when one fails the next simpler one is tried (homography, affine, translation), and
    ``Alignment.fallbacks`` says why. Raises AlignmentError (one line, every model's reason) if
    all fail: the warp diverges, moves a corner by more than ``max_shift`` of the long side, folds
    the image, leaves a ZNCC below ``min_correlation`` with the reference, or a band-pass ZNCC
    below 0.4 (unrelated content).
    """
    if motion not in MOTIONS:
        raise UserError(f"motion must be one of {', '.join(MOTIONS)}, got '{motion}'")
    finest = min(reference)
    full_shape = shape or (reference[finest].shape[0] * 2**finest, reference[finest].shape[1] * 2**finest)
    coarse, source = coarse_estimate(reference, frame)
    failures: list[str] = []
    for model in MOTIONS[MOTIONS.index(motion):]:
        try:
            a = _fit(reference, frame, _restrict(coarse, model), model, full_shape, min_correlation, max_shift)
        except AlignmentError as e:
            failures.append(f"{model}: {e}")
            continue
        return dataclasses.replace(a, coarse=source, fallbacks=tuple(failures))
    raise AlignmentError("; ".join(failures) if len(failures) > 1 else str(failures[0]).split(": ", 1)[1])


def _fit(reference, frame, h, motion, full_shape, min_correlation, max_shift, min_structure=0.4) -> Alignment:
    """Robust Lucas-Kanade from ``h`` (full resolution), coarsest level to finest, then the checks."""
    finest, coarsest = min(reference), max(reference)
    for level in range(coarsest, finest - 1, -1):
        h = to_full(_lk_level(reference[level], frame[level], to_level(h, level), motion), level)

    long_side = max(full_shape)
    corners_x, corners_y = _corners(full_shape)
    cx, cy, cw = apply_homography(h, corners_x, corners_y)
    moved = float(np.max(np.hypot(cx - corners_x, cy - corners_y)))
    if not (cw > 0).all() or np.linalg.det(h[:2, :2] / h[2, 2]) <= 0:
        raise AlignmentError("the estimated warp folds the image")
    if moved > max_shift * long_side:
        raise AlignmentError(f"the estimated warp moves a corner by {moved:.0f} px (> {max_shift:.0%} of the image)")
    ref, warped, valid = _warp_pair(reference[finest], frame[finest], to_level(h, finest), blur=1.0)
    corr = zncc(ref, warped, valid)
    if corr < min_correlation:
        raise AlignmentError(f"correlation with the reference after alignment is {corr:.2f} (< {min_correlation})")
    # Smooth unrelated images can still correlate at 0.7 in intensity over a small overlap; their
    # band-pass structure (Laplacian of Gaussian, 2 px) does not (~0.2; a blurred view: > 0.9).
    ref_raw, warped_raw, _ = _warp_pair(reference[finest], frame[finest], to_level(h, finest))
    structure = zncc(gaussian_laplace(ref_raw, 2.0), gaussian_laplace(warped_raw, 2.0), valid)
    if structure < min_structure:
        raise AlignmentError(f"the aligned frame's structure does not match the reference (band-pass ZNCC "
                             f"{structure:.2f} < {min_structure})")
    diff = (warped - ref)[valid]
    sigma = max(1.4826 * float(np.median(np.abs(diff))), 1 / 255)
    mx, my, _ = apply_homography(h, np.array([(full_shape[1] - 1) / 2]), np.array([(full_shape[0] - 1) / 2]))
    return Alignment(h, (float(mx[0] - (full_shape[1] - 1) / 2), float(my[0] - (full_shape[0] - 1) / 2)), corr,
                     model=motion, residual=float(np.sqrt(np.mean(diff**2))) * 255,
                     inliers=float(np.mean(np.abs(diff) < 3 * sigma)), structure=structure)


def _warp_pair(reference: np.ndarray, frame: np.ndarray, h: np.ndarray, blur: float = 0.0):
    if blur:
        reference = gaussian_filter(reference, blur, mode="nearest")
        frame = gaussian_filter(frame, blur, mode="nearest")
    warped, valid = warp_gray(frame, h, reference.shape)
    return reference, warped, valid


def warp_frame(frame: np.ndarray, h: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Resample RGB uint8 ``frame`` onto the reference grid: out(x) = frame(h(x)), bilinear.

    h: (3, 3) reference pixel -> frame pixel (the module's convention, which is OpenCV's too:
    pixel centres at integers), with positive depth over the grid (``estimate_alignment``
    guarantees it). fill: RGB uint8 (H, W, 3), the reference itself, used where h(x) falls outside
    the frame (x' < 0 or x' > width - 1, likewise y'). Returns uint8 (H, W, 3): bilinear samples
    rounded to the nearest level, within 1 DN of float64 bilinear interpolation even on noise
    (tests/test_align.py); bench/bench_warp.py times it against the scipy warp it replaced.
    """
    rows, cols = fill.shape[:2]
    corners = np.array([0.0, cols - 1]), np.array([0.0, rows - 1])
    if not (apply_homography(h, *np.meshgrid(*corners))[2] > 0).all():
        raise AlignmentError("the warp folds the image (a reference corner maps behind the camera)")
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # h maps destination (reference) to source (frame)
    out = cv2.warpPerspective(np.ascontiguousarray(frame), h, (cols, rows), flags=flags,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # Coverage: a full-scale uint16 image warped with zeros outside stays at full scale exactly
    # where no bilinear weight (down to 1/65535) falls outside the frame: the rule above. (uint8
    # would also pass samples that take up to 1/510 of their weight from outside.)
    top = np.iinfo(np.uint16).max
    coverage = cv2.warpPerspective(np.full(frame.shape[:2], top, np.uint16), h, (cols, rows), flags=flags,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.copyTo(np.ascontiguousarray(fill), cv2.compare(coverage, top, cv2.CMP_LT), out)


def align_burst(frames: Sequence[np.ndarray], reference: int | str = "auto", motion: str = "homography",
                align_size: int = 1024, names: Sequence[str] | None = None, workers: int | None = None,
                log=None, min_frames: int = 2) -> tuple[list[np.ndarray | None], int, list[Alignment | Rejected | None]]:
    """Align every frame to the reference frame, leaving out those that cannot be aligned.

    frames: RGB uint8 (H, W, 3), same size. reference: an index into ``frames`` or "auto" (the
    sharpest). Returns (aligned uint8 frames in the given order, None for a rejected frame;
    reference index; per frame its Alignment, None for the reference, Rejected for a frame left
    out). A frame that no motion model aligns is rejected (the caller reports it: Rejected has
    the reason) as long as ``min_frames`` usable frames (the reference included) remain; otherwise
    AlignmentError names the first frame that failed. log: called with a line before each step
    that can take seconds (pyramids, the reference, each frame's alignment as it is found, the
    warp).
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(frames))]
    level = alignment_level(frames[0].shape[:2], align_size)
    workers = workers or min(len(frames), os.cpu_count() or 1)
    say = log or (lambda message: None)
    rows, cols = frames[0].shape[:2]
    for _ in range(level):  # the size of pyramid level ``level`` (each halving keeps ceil(n / 2))
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
    with ThreadPoolExecutor(workers) as pool:
        say(f"aligning {len(frames)} frames ({motion}) on grey copies at {cols}x{rows} px ...")
        pyramids = list(pool.map(lambda f: pyramid(gray(f), level), frames))
        if reference == "auto":
            ref = choose_reference([p[level] for p in pyramids])
        else:
            ref = int(reference)
            if not -len(frames) <= ref < len(frames):
                raise UserError(f"--reference {ref} is out of range for {len(frames)} frames")
            ref %= len(frames)
        say(f"reference: {names[ref]} ({'the sharpest' if reference == 'auto' else '--reference'})")

        def one(i: int) -> Alignment | Rejected | None:
            if i == ref:
                return None
            try:
                return estimate_alignment(pyramids[ref], pyramids[i], motion, frames[0].shape[:2])
            except AlignmentError as e:
                return Rejected(f"alignment to {names[ref]} failed: {e}")

        alignments = []
        for i, a in enumerate(pool.map(one, range(len(frames)))):  # in order, each as soon as it is done
            alignments.append(a)
            if a is None:
                say(f"align {names[i]}: reference")
            elif isinstance(a, Alignment):
                fell = f", after {', '.join(f.split(':')[0] for f in a.fallbacks)} failed" if a.fallbacks else ""
                say(f"align {names[i]}: {a.model}{fell}, shift ({a.shift[0]:+.2f}, {a.shift[1]:+.2f}) px, "
                    f"ZNCC {a.correlation:.3f}, inliers {a.inliers:.0%}")
        del pyramids
        rejected = [i for i, a in enumerate(alignments) if isinstance(a, Rejected)]
        if rejected and len(frames) - len(rejected) < min_frames:
            first = rejected[0]
            more = f" (and {len(rejected) - 1} more)" if len(rejected) > 1 else ""
            raise AlignmentError(f"frame {names[first]}: {alignments[first].reason}{more}; fewer than "
                                 f"{min_frames} usable frames remain")
        say(f"warping {len(frames) - 1 - len(rejected)} frames onto {names[ref]} at "
            f"{frames[0].shape[1]}x{frames[0].shape[0]} px ...")

        def warp(i: int) -> np.ndarray | None:
            a = alignments[i]
            if isinstance(a, Rejected):
                return None
            return frames[i] if a is None else warp_frame(frames[i], a.homography, frames[ref])

        aligned = list(pool.map(warp, range(len(frames))))
    return aligned, ref, alignments


def report(names: Sequence[str], reference: int, alignments: Sequence[Alignment | Rejected | None]) -> dict:
    """The alignment as a JSON-ready dict, one entry per frame in the given order: its name,
    whether it is the reference, "used" or "rejected" with the reason, and for a used frame the
    3x3 transform (reference pixel -> frame pixel, pixel centres at integers), the motion model,
    where the coarse estimate came from, the models that failed first, the shift of the centre
    (px), the ZNCC with the reference, the RMS residual (8-bit grey levels) and the inlier share.
    ``alignments`` as ``align_burst`` returns them (all None when the frames were not aligned)."""
    frames = []
    for i, (name, a) in enumerate(zip(names, alignments)):
        entry = {"index": i, "name": name, "reference": i == reference}
        if isinstance(a, Rejected):
            entry.update(status="rejected", reason=a.reason)
        elif a is None:
            entry.update(status="used", transform=np.eye(3).tolist(), model="identity")
        else:
            entry.update(status="used", transform=(a.homography / a.homography[2, 2]).tolist(), model=a.model,
                         coarse=a.coarse, fallbacks=list(a.fallbacks), shift_px=list(a.shift),
                         zncc=a.correlation, structure=a.structure, residual=a.residual, inliers=a.inliers)
        frames.append(entry)
    used = sum(f["status"] == "used" for f in frames)
    return {"reference": names[reference], "used": used, "rejected": len(frames) - used, "frames": frames}
