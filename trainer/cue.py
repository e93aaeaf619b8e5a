"""A misalignment cue: how far the frames of a burst are shifted against each other, per pixel.

FBA (trainer/fba.py) is sharp on registered frames and ghosts on shifted ones; the network's
``fba_cue`` (trainer/model.py) adds this cue to FBA's logit so it can tell the two apart.

Each frame's shift against the mean of the frames is a Lucas-Kanade estimate: after a 2×2 average
(POOL) and a Gaussian low-pass (SIGMA), a frame shifted by d px differs from the mean by about
d · gradient; the normal equations are summed over cells of 8 px and smoothed over a few cells,
so the estimate is local (parallax, a rotation) but never per pixel. The blur kernels are
centred (first moment 0), so a kernel's shape adds only second-order differences, which this first-order fit mostly
ignores: on the validation photographs the cue reads the mean squared shift that rendered the
burst 5-50% high, and registered bursts mostly at the floor (docs/benchmarks.md). The cue is log(mean over frames of |d|^2 + FLOOR), px^2:
log FLOOR for registered frames or one frame. Symmetric in the frames. Each frame is read once
and kept pooled, so a 12 MP × 8 burst needs one full-resolution plane and 1/4 of the burst's
luminance (~0.1 GB; 3 s on 2 cores).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

POOL = 2  # the cue is computed on 2x2-averaged frames: it is smooth, and 6x cheaper there at 12 MP
SIGMA = 1.0  # pooled px: the low-pass (with the box, ~2 px of the frames) that removes the noise
             # and most of the kernels' shapes
CELL = 4  # pooled px (8 px of the frames): the normal equations are summed per cell, then
          # smoothed over ~3 cells
REG = 1e-5  # (intensity / pooled px)^2 per pixel: flat regions read as registered (FBA is harmless there)
FLOOR = 0.01  # px^2: shifts below 0.1 px all read the same


def gauss_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian (truncated at 3 sigma) of (B, C, H, W), replicate-padded: same size out."""
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).expand(x.shape[1], 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(-1, -2), groups=x.shape[1])


def accumulate(frame: Callable[[int], Tensor], n: int) -> Tensor:
    """The cue of n frames, ``frame(i)`` float (B, 1, H, W) luminance-like in [0, 1]: (B, 1, H, W)
    in float32, or float64 for float64 frames. Each frame is read once."""
    low, size = [], None
    for i in range(n):  # pooled and low-passed: the n frames at 1/4 of their pixels
        x = frame(i)
        size = x.shape[-2:]
        x = x if x.dtype == torch.float64 else x.float()
        low.append(gauss_blur(F.avg_pool2d(x, POOL, ceil_mode=True), SIGMA))

    def cells(t: Tensor) -> Tensor:
        return gauss_blur(F.avg_pool2d(t, CELL, ceil_mode=True), 1.5)

    mean = sum(low) / n
    padded = F.pad(mean, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    a11, a12, a22 = cells(gx * gx) + REG, cells(gx * gy), cells(gy * gy) + REG
    det = a11 * a22 - a12 * a12
    shift2 = torch.zeros_like(a11)  # pooled px^2, summed over the frames
    for x in low:
        diff = x - mean
        b1, b2 = cells(gx * diff), cells(gy * diff)
        shift2 += ((a22 * b1 - a12 * b2) / det).square() + ((a11 * b2 - a12 * b1) / det).square()
    cue = torch.log(shift2 * (POOL * POOL / n) + FLOOR)  # px^2 of the frames
    return F.interpolate(cue, size=tuple(size), mode="bilinear", align_corners=False)


def misalignment_cue(burst: Tensor) -> Tensor:
    """burst float (B, N, 3, H, W) in [0, 1] -> the cue (B, 1, H, W), float32 (float64 for a
    float64 burst), also under autocast."""
    with torch.autocast(burst.device.type, enabled=False):
        return accumulate(lambda i: burst[:, i].mean(dim=1, keepdim=True), burst.shape[1])


def cue_frames(frames, device: str | torch.device = "cpu") -> Tensor:
    """The cue of one burst given as N uint8 (H, W, 3) arrays (e.g. a full-resolution aligned
    burst): float32 (1, 1, H, W) on ``device``; each frame is converted when it is needed."""
    def frame(i: int) -> Tensor:
        return torch.from_numpy(frames[i]).to(device).float().mean(dim=-1)[None, None] / 255

    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        return accumulate(frame, len(frames))
