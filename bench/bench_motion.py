"""Ghosting from an object that moves on its own: PSNR inside and outside the moving region.

    .venv/bin/python bench/bench_motion.py                  # the shipped model, 6 frames of 240x320

A synthetic burst (tests/bursts.py: views of one photograph): the camera shakes (a few px, blur
and noise of 2 DN per frame) while an object, a 120x160 crop of another part of the photograph
(25% of the frame), moves by tens of px between frames. Every frame is aligned with ``deblur``'s
aligner (the background's warp) and the model runs on the aligned frames, the sharp reference
first. The target is the reference frame's content without blur or noise (the object where the
reference has it). Prints PSNR (dB, RGB in [0, 1]) inside the reference's object box and outside
it, for the model, the mean of the aligned frames and the reference frame alone, and each frame's
alignment (model, inliers, corner error against the true background warp, px).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bursts import render, translation, with_object  # noqa: E402
from trainer.align import align_burst, apply_homography  # noqa: E402
from trainer.deblur import DeblurOptions, deblur_aligned  # noqa: E402
from trainer.metrics import psnr  # noqa: E402

SHAPE, BOX, TOP_LEFT = (240, 320), (120, 160), (60, 80)


def burst(frames: int, seed: int):
    """(frames uint8 list, the reference's sharp target uint8, true background warps); frame 0 sharp."""
    rng = np.random.default_rng(seed)
    shakes = [translation(0, 0)] + [translation(*rng.uniform(-6, 6, 2)) for _ in range(frames - 1)]
    moves = [(0, 0)] + [tuple(int(v) for v in rng.integers(-30, 31, 2)) for _ in range(frames - 1)]
    out = []
    for i, (h, (dy, dx)) in enumerate(zip(shakes, moves)):
        blur = 0.0 if i == 0 else float(rng.uniform(1.0, 2.5))
        # the object is pasted sharp, then the whole frame is shaken (blur) and noisy
        view = with_object(render(h, SHAPE), TOP_LEFT[0] + dy, TOP_LEFT[1] + dx)
        view = gaussian_filter(view.astype(np.float64), (blur, blur * 0.3, 0)) if blur else view.astype(np.float64)
        out.append(np.clip(np.rint(view + rng.normal(0, 2.0, view.shape)), 0, 255).astype(np.uint8))
    target = with_object(render(np.eye(3), SHAPE), *TOP_LEFT)
    return out, target, shakes


def corner_error(a: np.ndarray, b: np.ndarray) -> float:
    cx = np.array([0, SHAPE[1] - 1, SHAPE[1] - 1, 0], float)
    cy = np.array([0, 0, SHAPE[0] - 1, SHAPE[0] - 1], float)
    (ax, ay, _), (bx, by, _) = apply_homography(a, cx, cy), apply_homography(b, cx, cy)
    return float(np.max(np.hypot(ax - bx, ay - by)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: the shipped models/burst-deblur.pt")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from trainer.model import default_checkpoint, load

    frames, target, shakes = burst(args.frames, args.seed)
    aligned, ref, alignments = align_burst(frames, reference=0)
    for i, a in enumerate(alignments):
        if a is not None and hasattr(a, "homography"):
            print(f"frame {i}: {a.model} (coarse: {a.coarse}), inliers {a.inliers:.0%}, "
                  f"background corner error {corner_error(a.homography, np.linalg.inv(shakes[i])):.2f} px")
        elif a is not None:
            print(f"frame {i}: rejected: {a.reason}")
    used = [aligned[ref]] + [f for i, f in enumerate(aligned) if i != ref and f is not None]
    model = load(default_checkpoint(args.checkpoint), "cpu")
    out = deblur_aligned(model, used, DeblurOptions(tile=256), "cpu")
    inside = np.zeros(SHAPE, bool)
    inside[TOP_LEFT[0] : TOP_LEFT[0] + BOX[0], TOP_LEFT[1] : TOP_LEFT[1] + BOX[1]] = True
    tgt = target / 255.0
    methods = {"model": out, "mean of aligned frames": np.mean(used, axis=0) / 255.0, "reference frame": used[0] / 255.0}
    print(f"{'method':<24} {'PSNR inside dB':>14} {'PSNR outside dB':>15}")
    for name, image in methods.items():
        print(f"{name:<24} {psnr(image[inside], tgt[inside]):>14.2f} {psnr(image[~inside], tgt[~inside]):>15.2f}")


if __name__ == "__main__":
    main()
