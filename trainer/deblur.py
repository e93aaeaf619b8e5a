"""Deblur a user's burst of photos: load, align to a reference frame, run the model in tiles.

    python -m trainer deblur --checkpoint runs/default/best.pt IMG_1.jpg IMG_2.jpg ... --out sharp.png

Pipeline (every step a plain function that tests call):
1. ``load_frames``: PIL, EXIF orientation applied, RGB uint8 (H, W, 3) sRGB; all the same size.
2. ``choose_reference``: by default the sharpest frame (gradient energy of a noise-suppressed,
   downscaled grey image). A content criterion, not a position in the list, so any reordering of
   the files gives the same reference and, the model being permutation invariant, the same output.
3. ``estimate_alignment`` per frame, against the reference: a global homography (or translation)
   mapping reference pixels to frame pixels. Coarse step: phase correlation on a Hann-windowed,
   downscaled grey image (integer peak + parabolic sub-pixel refinement). Fine step: inverse
   compositional Lucas-Kanade (Baker & Matthews 2004) on a Gaussian pyramid, from the coarsest
   level with >= 32 px down to the level whose long side is <= ``align_size`` (1024 px), in
   normalized coordinates for conditioning. Failure (a diverging or absurd warp, or a normalized
   cross-correlation with the reference below 0.5 after alignment) raises ``AlignmentError``
   naming the frame. ``warp_frame`` resamples each frame onto the reference grid at full
   resolution (scipy map_coordinates, bilinear, in row bands, frames in parallel threads); where a
   frame does not cover the reference, the reference's own pixels fill in.
4. ``run_tiled``: the model on overlapping tiles, a batch of tiles at a time; the host holds the
   uint8 frames, the device only one batch of tiles. Each tile's output is weighted by a window
   that is zero in a margin along every edge shared with a neighbour, then rises with a raised
   cosine to 1; weights are accumulated and normalized. The margin is at least the model's
   receptive-field radius (``receptive_radius``; 40 px for the 4-level U-Net), so every output
   pixel comes from a tile that holds its whole receptive field, and tile origins are multiples of
   the model's padding multiple, so the strided convs see the same grid: tiled and untiled output
   agree to float rounding (tests/test_deblur.py).
5. The output is written atomically (temporary file + rename), 8-bit, format from the extension.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import fft
from scipy.ndimage import gaussian_filter, map_coordinates
from tqdm import tqdm


class AlignmentError(ValueError):
    """A frame could not be aligned to the reference; the message is one line."""


# ----------------------------------------------------------------------------- frames


# Frames smaller than this on their short side are refused: alignment and the network need room.
MIN_FRAME_SIDE = 32


def load_frames(paths: Sequence[str | Path], log=None) -> list[np.ndarray]:
    """Read photos as RGB uint8 (H, W, 3) sRGB with the project's one photo reader
    (pipeline.sources.load_photo: EXIF orientation applied, grey to RGB, alpha dropped, 16-bit
    reduced to 8 bits, Pillow's decompression-bomb limit kept); all must be one size.

    Raises FileNotFoundError for a missing file, ValueError for an unreadable one or frames of
    different sizes (each message names the file). ``log`` gets one note per high-bit-depth file.
    """
    from pipeline.sources import PhotoDecodeError, load_photo_depth

    if not paths:
        raise ValueError("no frames given")
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"frame not found: {path}")
        try:
            frame, bits = load_photo_depth(str(path))
        except PhotoDecodeError as e:
            raise ValueError(f"cannot read image {path}: {e.reason} ({e.detail})") from None
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
        if bits > 8 and log:
            log(f"note: {path.name} has {bits}-bit samples: reduced to 8 bits (the model works on 8-bit frames)")
        frames.append(frame)
        if frames[-1].shape != frames[0].shape:
            h0, w0 = frames[0].shape[:2]
            h, w = frames[-1].shape[:2]
            raise ValueError(f"{path} is {w}x{h} but {Path(paths[0])} is {w0}x{h0}; all frames must have the same size")
    return frames


def check_frame_size(shape: tuple[int, ...], path: str | Path, align: bool, align_size: int) -> None:
    """ValueError (one line naming the file) for frames too small to align and deblur: the short
    side under MIN_FRAME_SIDE, or, when aligning, under 16 px once the long side is brought
    down to ``align_size`` (a 16 x 20000 strip)."""
    h, w = shape[:2]
    if min(h, w) < MIN_FRAME_SIDE:
        raise ValueError(f"{path} is {w}x{h}: frames must be at least {MIN_FRAME_SIDE} px on each side")
    if align:
        short = min(h, w) / 2 ** alignment_level((h, w), align_size)
        if short < 16:
            raise ValueError(f"{path} is {w}x{h}: too elongated to align at --align-size {align_size} (the short "
                             f"side would be {short:.0f} px, needs 16); raise --align-size or use --no-align")


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


def _apply(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Homography h (3, 3) on pixel coordinates x, y -> (x', y', w')."""
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    return (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w, (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w, w


def warp_gray(image: np.ndarray, h: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sample grey ``image`` at h(reference pixel) for every pixel of a ``shape`` grid.

    Returns (warped float64 (H, W), valid bool (H, W): the sample lies inside the image)."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    xw, yw, w = _apply(h, xs, ys)
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


def _lk_level(reference: np.ndarray, frame: np.ndarray, h_level: np.ndarray, motion: str,
              max_iter: int = 50, tol: float = 1e-3) -> np.ndarray:
    """Inverse compositional Lucas-Kanade on one pyramid level; returns the refined homography.

    Parameters act in normalized coordinates (centre 0, long side from -1 to 1), where the eight
    homography parameters have comparable scales and the Hessian is well conditioned.
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
        hessian = sdm.T @ sdm
        try:
            step = np.linalg.solve(hessian, sdm.T @ err)
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
        du, dv, _ = _apply(dh, corners_u, corners_v)
        if np.max(np.hypot(du - corners_u, dv - corners_v)) * s < tol:
            break
    return norm_inv @ hn @ norm


@dataclasses.dataclass
class Alignment:
    """A frame's warp to the reference: ``homography`` maps full-resolution reference pixel (x, y, 1)
    to frame pixel coordinates. ``shift`` is where the reference centre lands, minus the centre, px;
    ``correlation`` the ZNCC with the reference after alignment at the alignment level."""

    homography: np.ndarray
    shift: tuple[float, float]
    correlation: float


def estimate_alignment(reference: dict[int, np.ndarray], frame: dict[int, np.ndarray], motion: str = "homography",
                       shape: tuple[int, int] | None = None, min_correlation: float = 0.5,
                       max_shift: float = 0.25) -> Alignment:
    """Align one frame to the reference; both are pyramids from ``pyramid()`` with the same levels.

    shape: (H, W) at full resolution (default: the finest level's size times its scale).
    motion: "homography" (8 parameters) or "translation" (2). Raises AlignmentError (one line)
    if the warp diverges, moves a corner by more than ``max_shift`` of the long side, folds the
    image, or leaves a ZNCC below ``min_correlation`` with the reference.
    """
    if motion not in ("homography", "translation"):
        raise ValueError(f"motion must be 'homography' or 'translation', got '{motion}'")
    finest, coarsest = min(reference), max(reference)
    full_shape = shape or (reference[finest].shape[0] * 2**finest, reference[finest].shape[1] * 2**finest)

    # Coarse translation: phase correlation on a level of at most 256 px (or the coarsest one).
    pc_level = next((lv for lv in sorted(reference) if max(reference[lv].shape) <= 256), coarsest)
    ref_pc, frame_pc = reference[pc_level], frame[pc_level]
    dx, dy, _ = phase_correlation(ref_pc, frame_pc)
    h = np.eye(3)
    shifted = np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]])
    # A periodic texture can fool the correlation peak: keep the shift only if it correlates better.
    if zncc(*_warp_pair(ref_pc, frame_pc, shifted)) > zncc(*_warp_pair(ref_pc, frame_pc, h)):
        h = shifted
    h = to_full(h, pc_level)

    for level in range(coarsest, finest - 1, -1):
        h = to_full(_lk_level(reference[level], frame[level], to_level(h, level), motion), level)

    long_side = max(full_shape)
    corners_x = np.array([0, full_shape[1] - 1, full_shape[1] - 1, 0], float)
    corners_y = np.array([0, 0, full_shape[0] - 1, full_shape[0] - 1], float)
    cx, cy, cw = _apply(h, corners_x, corners_y)
    moved = float(np.max(np.hypot(cx - corners_x, cy - corners_y)))
    if not (cw > 0).all() or np.linalg.det(h[:2, :2] / h[2, 2]) <= 0:
        raise AlignmentError("the estimated warp folds the image")
    if moved > max_shift * long_side:
        raise AlignmentError(f"the estimated warp moves a corner by {moved:.0f} px (> {max_shift:.0%} of the image)")
    corr = zncc(*_warp_pair(reference[finest], frame[finest], to_level(h, finest), blur=1.0))
    if corr < min_correlation:
        raise AlignmentError(f"correlation with the reference after alignment is {corr:.2f} (< {min_correlation})")
    mx, my, _ = _apply(h, np.array([(full_shape[1] - 1) / 2]), np.array([(full_shape[0] - 1) / 2]))
    return Alignment(h, (float(mx[0] - (full_shape[1] - 1) / 2), float(my[0] - (full_shape[0] - 1) / 2)), corr)


def _warp_pair(reference: np.ndarray, frame: np.ndarray, h: np.ndarray, blur: float = 0.0):
    if blur:
        reference = gaussian_filter(reference, blur, mode="nearest")
        frame = gaussian_filter(frame, blur, mode="nearest")
    warped, valid = warp_gray(frame, h, reference.shape)
    return reference, warped, valid


def warp_frame(frame: np.ndarray, h: np.ndarray, fill: np.ndarray, band: int = 256) -> np.ndarray:
    """Resample RGB uint8 ``frame`` onto the reference grid: out(x) = frame(h(x)), bilinear.

    fill: RGB uint8 (H, W, 3) used where h(x) falls outside the frame (the reference itself).
    Works in bands of ``band`` rows so the float temporaries stay small. Returns uint8 (H, W, 3).
    """
    rows, cols = fill.shape[:2]
    out = np.empty_like(fill)
    planes = [np.ascontiguousarray(frame[..., c]) for c in range(3)]  # map_coordinates copies strided input
    x = np.arange(cols, dtype=np.float64)[None, :]
    for r0 in range(0, rows, band):
        r1 = min(r0 + band, rows)
        y = np.arange(r0, r1, dtype=np.float64)[:, None]
        w = h[2, 0] * x + (h[2, 1] * y + h[2, 2])  # broadcast (rows, 1) with (1, cols)
        xw = (h[0, 0] * x + (h[0, 1] * y + h[0, 2])) / w
        yw = (h[1, 0] * x + (h[1, 1] * y + h[1, 2])) / w
        valid = (w > 0) & (xw >= 0) & (xw <= frame.shape[1] - 1) & (yw >= 0) & (yw <= frame.shape[0] - 1)
        coords = np.stack([yw, xw]).astype(np.float32)  # 4000 px in float32: 0.0005 px steps
        for c, plane in enumerate(planes):
            sampled = map_coordinates(plane, coords, order=1, mode="nearest", output=np.float32)
            out[r0:r1, :, c] = np.where(valid, np.clip(np.rint(sampled), 0, 255), fill[r0:r1, :, c])
    return out


def align_burst(frames: Sequence[np.ndarray], reference: int | str = "auto", motion: str = "homography",
                align_size: int = 1024, names: Sequence[str] | None = None, workers: int | None = None,
                log=None) -> tuple[list[np.ndarray], int, list[Alignment | None]]:
    """Align every frame to the reference frame.

    frames: RGB uint8 (H, W, 3), same size. reference: an index into ``frames`` or "auto" (the
    sharpest). Returns (aligned uint8 frames in the given order, reference index, per-frame
    Alignment, None for the reference). Raises AlignmentError naming the first frame that fails.
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(frames))]
    level = alignment_level(frames[0].shape[:2], align_size)
    workers = workers or min(len(frames), os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        pyramids = list(pool.map(lambda f: pyramid(gray(f), level), frames))
        if reference == "auto":
            ref = choose_reference([p[level] for p in pyramids])
        else:
            ref = int(reference)
            if not -len(frames) <= ref < len(frames):
                raise ValueError(f"--reference {ref} is out of range for {len(frames)} frames")
            ref %= len(frames)

        def one(i: int) -> Alignment | None:
            if i == ref:
                return None
            try:
                return estimate_alignment(pyramids[ref], pyramids[i], motion, frames[0].shape[:2])
            except AlignmentError as e:
                raise AlignmentError(f"frame {names[i]}: alignment to {names[ref]} failed: {e}") from None

        alignments = list(pool.map(one, range(len(frames))))
        del pyramids
        if log:
            for i, a in enumerate(alignments):
                what = ("reference" if a is None
                        else f"shift ({a.shift[0]:+.2f}, {a.shift[1]:+.2f}) px, ZNCC {a.correlation:.3f}")
                log(f"align {names[i]}: {what}")
        def warp(i: int) -> np.ndarray:
            a = alignments[i]
            return frames[i] if a is None else warp_frame(frames[i], a.homography, frames[ref])

        aligned = list(pool.map(warp, range(len(frames))))
    return aligned, ref, alignments


# ----------------------------------------------------------------------------- tiled inference

RAMP = 16  # px of raised-cosine cross-fade between neighbouring tiles
_RADIUS_CACHE: dict[str, int] = {}


def receptive_radius(model_cfg) -> int:
    """Receptive-field radius (px, worst case over the stride phases) of a model architecture.

    Measured, not derived: the gradient of a block of outputs with respect to the input is
    non-zero exactly inside the receptive field. A narrow float64 copy of the architecture with
    random weights from a fixed generator is enough (width does not change the field).
    """
    from trainer.model import build_model

    key = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True)
    if key not in _RADIUS_CACHE:
        _RADIUS_CACHE[key] = _measure_radius(model_cfg, build_model)
    return _RADIUS_CACHE[key]


def _measure_radius(model_cfg, build_model) -> int:
    probe_cfg = dataclasses.replace(model_cfg, width=4, out_mult=1.0)
    probe = build_model(probe_cfg).requires_grad_(False)  # only the input gradient is needed
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    m = probe_cfg.multiple
    size = 128
    while True:
        x = torch.rand(1, 2, 3, size, size, generator=gen, requires_grad=True)
        c = size // 2 - size // 2 % m
        with torch.enable_grad():  # callers may be under no_grad
            probe(x)[..., c : c + m, c : c + m].sum().backward()
        support = (x.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero()
        lo, hi = support.min(dim=0).values, support.max(dim=0).values
        if lo.min() > 0 and hi.max() < size - 1:
            return int(max((c - lo).max(), (hi - (c + m - 1)).max()))
        size *= 2
        if size > 4096:
            raise ValueError("receptive field larger than 2048 px; pass --overlap explicitly")


def auto_overlap(model_cfg) -> int:
    """Overlap whose zero margins (overlap/2 - RAMP/2 on each side) cover the receptive field."""
    m = model_cfg.multiple
    need = 2 * receptive_radius(model_cfg) + RAMP
    return -(-need // m) * m


def tile_starts(length: int, tile: int, overlap: int, multiple: int) -> list[tuple[int, int]]:
    """[(start, end)] tiles covering 0..length along one axis.

    As few tiles as fit ``tile`` px with neighbours overlapping by >= ``overlap``, then made as
    small as that count allows (equal sizes, so less is computed twice than with a fixed stride
    and a last tile squeezed against the end). Starts are multiples of ``multiple``, the model's
    stride grid; the last tile runs to the end and may be up to multiple-1 px longer.
    """
    if length <= tile:
        return [(0, length)]
    if tile - overlap < multiple:
        raise ValueError(f"--tile {tile} must exceed --overlap {overlap} by at least {multiple} px")
    count = -(-(length - overlap) // (tile - overlap))
    while True:
        size = -(-(length + (count - 1) * overlap) // count)
        size = -(-size // multiple) * multiple
        starts = [int(i * (length - size) / (count - 1)) // multiple * multiple for i in range(count)]
        tiles = [(s, s + size) for s in starts[:-1]] + [(starts[-1], length)]
        # rounding the starts down to the grid can shave a few px off an overlap: one tile more then
        if all(a_end - b_start >= overlap for (_, a_end), (b_start, _) in zip(tiles, tiles[1:])):
            return tiles
        count += 1


def _ramp_window(size: int, before: bool, after: bool, overlap: int) -> np.ndarray:
    """1-D weights: 0 for the margin, raised-cosine rise over RAMP px, 1 inside; on shared edges only."""
    w = np.ones(size, np.float32)
    ramp = min(RAMP, overlap)
    margin = max((overlap - ramp) // 2, 0)
    rise = (0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)).astype(np.float32)
    profile = np.concatenate([np.zeros(margin, np.float32), rise])[:size]
    if before:
        w[: len(profile)] = np.minimum(w[: len(profile)], profile)
    if after:
        w[size - len(profile):] = np.minimum(w[size - len(profile):], profile[::-1])
    return w


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; otherwise the named device (cuda must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda[:N]', got '{name}'")
    return torch.device(name)


@torch.no_grad()
def run_tiled(model: torch.nn.Module, frames: Sequence[np.ndarray], tile: int = 512, overlap: int | None = None,
              device: str | torch.device = "cpu", batch: int = 1, precision: str = "fp32",
              progress: bool = False) -> np.ndarray:
    """Run ``model`` on a burst too large for one pass, tile by tile.

    frames: N aligned RGB uint8 (H, W, 3) on the host. Tiles of ``tile`` px overlapping by
    ``overlap`` px (None: ``auto_overlap`` of the model, which makes the result equal to one
    untiled pass up to float rounding) go to ``device`` ``batch`` at a time as uint8 and are
    converted there. precision: "fp32" or "bf16" (autocast, CUDA). Returns float32 (H, W, 3) in [0, 1].
    """
    device = torch.device(device)
    cfg = getattr(model, "cfg", None)
    multiple = cfg.multiple if cfg is not None else 1
    if overlap is None:
        if cfg is None:
            raise ValueError("this model has no .cfg; pass overlap explicitly")
        overlap = auto_overlap(cfg)
    rows, cols = frames[0].shape[:2]
    ys = tile_starts(rows, tile, overlap, multiple)
    xs = tile_starts(cols, tile, overlap, multiple)
    acc = np.zeros((rows, cols, 3), np.float32)
    weight = np.zeros((rows, cols), np.float32)

    # Group tiles by shape (at most 4: interior, last row, last column, corner) so each batch stacks.
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for iy, (y0, y1) in enumerate(ys):
        for ix, (x0, x1) in enumerate(xs):
            groups.setdefault((y1 - y0, x1 - x0), []).append((y0, y1, x0, x1))
    jobs = [(shape, boxes[i : i + batch]) for shape, boxes in groups.items() for i in range(0, len(boxes), batch)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", disable=not progress, leave=False)
    while jobs:
        boxes = jobs.pop(0)[1]
        host = np.stack([np.stack([f[y0:y1, x0:x1] for f in frames]) for y0, y1, x0, x1 in boxes])  # (B,N,h,w,3)
        try:
            x = torch.from_numpy(host).to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255)
            with autocast:
                out = model(x)
            out = out.float().clamp_(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        except torch.OutOfMemoryError:
            # The memory a tile needs grows with frames and width; rather than guess, halve the batch.
            x = out = None
            torch.cuda.empty_cache()
            if len(boxes) == 1:
                y0, y1, x0, x1 = boxes[0]
                raise ValueError(f"out of GPU memory on a single {x1 - x0}x{y1 - y0} tile of {len(frames)} frames; "
                                 "use a smaller --tile") from None
            half = len(boxes) // 2
            jobs[:0] = [(None, boxes[:half]), (None, boxes[half:])]
            continue
        for (y0, y1, x0, x1), o in zip(boxes, out):
            wy = _ramp_window(y1 - y0, y0 > 0, y1 < rows, overlap)
            wx = _ramp_window(x1 - x0, x0 > 0, x1 < cols, overlap)
            w2 = np.outer(wy, wx)
            acc[y0:y1, x0:x1] += o * w2[..., None]
            weight[y0:y1, x0:x1] += w2
        bar.update(len(boxes))
    bar.close()
    return acc / weight[..., None]


def deblur_frames(model: torch.nn.Module, frames: Sequence[np.ndarray], reference: int | str = "auto",
                  align: bool = True, motion: str = "homography", align_size: int = 1024,
                  tile: int = 512, overlap: int | None = None,
                  device: str | torch.device = "cpu", batch: int = 1, precision: str = "fp32",
                  names: Sequence[str] | None = None, progress: bool = False, log=None) -> np.ndarray:
    """The whole user path on loaded frames: align (unless ``align`` is False), then run_tiled.

    frames: RGB uint8 (H, W, 3) sRGB, same size. Returns float32 (H, W, 3) sRGB in [0, 1].
    """
    if align and len(frames) > 1:
        frames, ref, _ = align_burst(frames, reference, motion, align_size, names=names, log=log)
    else:
        ref = 0 if reference == "auto" else int(reference) % len(frames)
    # the model takes the reference (the output's geometry) as frame 0; the others' order is free
    frames = [frames[ref]] + [f for i, f in enumerate(frames) if i != ref]
    return run_tiled(model, frames, tile, overlap, device, batch, precision, progress)


def check_output(out: Path, inputs: Sequence[str | Path]) -> None:
    """Before any work: ``out`` has a known image extension, is not a folder, lies in an existing
    writable folder and is none of the input frames (the output would overwrite it)."""
    if Image.registered_extensions().get(out.suffix.lower()) is None:
        raise ValueError(f"--out {out}: unknown image extension '{out.suffix}' (use .png, .jpg, .tif, ...)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give an image file name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: folder {folder} is not writable")
    target = out.resolve()
    for frame in map(Path, inputs):
        if frame.resolve() == target or (out.exists() and frame.exists() and os.path.samefile(frame, out)):
            raise ValueError(f"--out {out} is one of the input frames ({frame}); it would be overwritten")


def save_image(image: np.ndarray, path: str | Path) -> None:
    """Write float (H, W, 3) in [0, 1] as 8-bit, format from the extension, atomically."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"--out {path}: unknown image extension '{path.suffix}' (use .png, .jpg, .tif, ...)")
    if not path.parent.exists():
        raise FileNotFoundError(f"--out {path}: folder {path.parent} does not exist")
    pixels = np.clip(np.rint(np.asarray(image, np.float64) * 255), 0, 255).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        kwargs = {"quality": 95} if fmt == "JPEG" else {}
        Image.fromarray(pixels, "RGB").save(tmp, format=fmt, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer deblur",
        description="Deblur a burst of handheld photos with a trained checkpoint: align the frames "
                    "to a reference, run the model in overlapping tiles, write one sharp image.")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint written by `python -m trainer train` (default: the shipped model, "
                        "models/burst-deblur.pt)")
    p.add_argument("frames", nargs="+", metavar="FRAME", help="the burst's photos (any order, same size)")
    p.add_argument("--out", required=True, help="output image; the format follows the extension (.png: 8-bit)")
    p.add_argument("--reference", default="auto",
                   help="frame the others are aligned to: 'auto' = the sharpest (order independent), "
                        "or an index into the FRAME list (default: auto)")
    p.add_argument("--tile", type=int, default=512, help="tile side in px (default: 512)")
    p.add_argument("--overlap", default="auto",
                   help="tile overlap in px; 'auto' = enough to cover the model's receptive field, which "
                        "makes tiling invisible (96 px for the default model) (default: auto)")
    p.add_argument("--batch", type=int, default=0,
                   help="tiles per forward pass; halved automatically when the GPU runs out of memory "
                        "(default: 2 on CUDA, 1 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (faster on recent GPUs) (default: fp32)")
    p.add_argument("--motion", choices=("homography", "translation"), default="homography",
                   help="global motion model for alignment (default: homography)")
    p.add_argument("--align-size", type=int, default=1024,
                   help="alignment runs on a downscaled copy whose long side is at most this (default: 1024)")
    p.add_argument("--no-align", action="store_true", help="the frames are already aligned: skip alignment")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-frame report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.model import default_checkpoint, load

    if args.reference != "auto":
        try:
            args.reference = int(args.reference)
        except ValueError:
            raise ValueError(f"--reference must be 'auto' or a frame index, got '{args.reference}'") from None
    if args.tile < 16:
        raise ValueError(f"--tile must be >= 16, got {args.tile}")
    if args.align_size < 64:
        raise ValueError(f"--align-size must be >= 64, got {args.align_size}")
    overlap = None
    if args.overlap != "auto":
        try:
            overlap = int(args.overlap)
        except ValueError:
            raise ValueError(f"--overlap must be 'auto' or a number of px, got '{args.overlap}'") from None
        if overlap < 0:
            raise ValueError(f"--overlap must be >= 0, got {overlap}")
    out = Path(args.out)
    check_output(out, args.frames)  # before any work: never over an input, folder writable
    device = resolve_device(args.device)
    # one 512-px tile of 8 frames through the paper-size model takes ~6 GB in fp32 (measured on CPU)
    batch = args.batch or (2 if device.type == "cuda" else 1)

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    model = load(default_checkpoint(args.checkpoint), device)
    frames = load_frames(args.frames, log=log)
    check_frame_size(frames[0].shape, args.frames[0], not args.no_align and len(frames) > 1, args.align_size)
    if isinstance(args.reference, int) and not -len(frames) <= args.reference < len(frames):
        raise ValueError(f"--reference {args.reference} is out of range for {len(frames)} frames")
    names = [Path(f).name for f in args.frames]
    image = deblur_frames(model, frames, args.reference, not args.no_align, args.motion, args.align_size,
                          args.tile, overlap, device, batch, args.precision, names, progress=not args.quiet, log=log)
    save_image(image, out)
    h, w = image.shape[:2]
    print(f"wrote {out} ({w}x{h}, {len(frames)} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
