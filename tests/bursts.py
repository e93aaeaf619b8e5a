"""Shared by the alignment, tiling and deblur tests: views of one photograph, and a tiny model."""

import numpy as np
import skimage.data
from scipy.ndimage import gaussian_filter, map_coordinates

from trainer.align import apply_homography

PHOTO = skimage.data.astronaut().astype(np.float64)  # 512x512 RGB


def render(h, shape, offset=(150, 120), blur=0.0, noise=0.0, rng=None):
    """A view of PHOTO: out(x) = PHOTO(offset + h(x)), bilinear; optional blur and noise. uint8."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    xw, yw, _ = apply_homography(h, xs, ys)
    out = np.stack([map_coordinates(PHOTO[..., c], [yw + offset[0], xw + offset[1]], order=1)
                    for c in range(3)], axis=-1)
    if blur:
        out = gaussian_filter(out, (blur, blur * 0.3, 0))  # directional, camera-shake-like
    if noise:
        out = out + rng.normal(0, noise, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def translation(dx, dy):
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]])


def make_model(seed=0, **kw):
    import torch

    from trainer.model import ModelConfig, build_model

    # module init draws from the global generator: seed it inside fork_rng to leave it untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(ModelConfig(**{"width": 8, **kw})).eval()


def rotation(degrees, shape, dx=0.0, dy=0.0):
    """A rotation by ``degrees`` about the centre of a ``shape`` grid, then a shift (dx, dy), as a
    homography on pixel coordinates."""
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    centre = translation(cx, cy)
    return translation(dx, dy) @ centre @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.linalg.inv(centre)


def with_object(frame, top, left, size=(120, 160), offset=(10, 10)):
    """``frame`` (uint8 (H, W, 3)) with an object pasted at (top, left): a ``size`` crop of another
    part of PHOTO (its own texture), as a car or a walker crossing a static scene. A copy."""
    obj = np.clip(np.rint(PHOTO[offset[0] : offset[0] + size[0], offset[1] : offset[1] + size[1]]), 0, 255)
    out = frame.copy()
    out[top : top + size[0], left : left + size[1]] = obj.astype(np.uint8)
    return out
