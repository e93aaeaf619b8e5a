"""The full-resolution warp of `deblur`'s alignment: OpenCV warpPerspective against the scipy band warp it replaced.

    .venv/bin/python bench/bench_warp.py                    # a 12 MP (4000x3000) RGB uint8 frame, 3 runs each

One synthetic frame (a photograph upscaled to the requested size, with noise of 2 DN, so it has
fine detail everywhere) is resampled onto a reference grid under a handheld-like homography
(0.3 degree rotation, 0.2 % zoom, a few px of shift, slight perspective) by:

- ``scipy``: the previous ``trainer.align.warp_frame``, kept here as the reference: scipy
  ``map_coordinates`` (bilinear, float32 coordinates) in bands of 256 rows, one thread;
- ``trainer.align.warp_frame`` (OpenCV ``warpPerspective``, bilinear, plus a coverage warp that
  decides where the reference fills in), with OpenCV's default thread count and with one thread.

Both fill pixels the frame does not cover from the reference. Prints, per method, the best and the
median wall-clock seconds of ``--repeat`` runs (time.perf_counter), the speed-up over scipy (best
against best), and the difference to the scipy output in DN (max, mean, pixels off by more than 1)
over the whole image, the border included. On a shared machine the figures are upper bounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from scipy.ndimage import map_coordinates

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.align import warp_frame  # noqa: E402


def scipy_warp_frame(frame: np.ndarray, h: np.ndarray, fill: np.ndarray, band: int = 256) -> np.ndarray:
    """The scipy band warp (the production code before OpenCV): out(x) = frame(h(x)), bilinear,
    ``fill`` where h(x) falls outside the frame. RGB uint8 in and out."""
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


def synthetic_pair(width: int, height: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame, reference, h): two RGB uint8 (height, width, 3) crops of one upscaled, noisy photo,
    and a handheld-like homography from reference pixels to frame pixels."""
    rng = np.random.default_rng(seed)
    margin = 32
    scene = cv2.resize(skimage.data.astronaut(), (width + 2 * margin, height + 2 * margin),
                       interpolation=cv2.INTER_CUBIC).astype(np.float32)
    scene = np.clip(np.rint(scene + rng.normal(0, 2.0, scene.shape).astype(np.float32)), 0, 255).astype(np.uint8)
    reference = scene[margin : margin + height, margin : margin + width]
    frame = scene[margin - 5 : margin - 5 + height, margin + 3 : margin + 3 + width]
    angle, zoom = np.deg2rad(0.3), 1.002
    c, s = zoom * np.cos(angle), zoom * np.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    centre = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1.0]])
    rotate = np.array([[c, -s, 0], [s, c, 0], [2e-7, -1e-7, 1.0]])
    shift = np.array([[1, 0, -3.0 + 0.37], [0, 1, 5.0 - 0.81], [0, 0, 1.0]])  # undo the crop offset, sub-pixel rest
    h = shift @ centre @ rotate @ np.linalg.inv(centre)
    return np.ascontiguousarray(frame), np.ascontiguousarray(reference), h


def timed(fn, repeat: int) -> tuple[list[float], np.ndarray]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=3, help="runs per method (default: 3)")
    args = p.parse_args(argv)

    frame, reference, h = synthetic_pair(args.width, args.height)
    mp = args.width * args.height / 1e6
    default_threads = cv2.getNumThreads()
    print(f"frame: {args.width}x{args.height} RGB uint8 ({mp:.1f} MP); OpenCV {cv2.__version__}, "
          f"{default_threads} threads by default; {args.repeat} runs each")
    methods = [("scipy map_coordinates, 1 thread", None, lambda: scipy_warp_frame(frame, h, reference)),
               (f"OpenCV warpPerspective, {default_threads} threads", default_threads,
                lambda: warp_frame(frame, h, reference)),
               ("OpenCV warpPerspective, 1 thread", 1, lambda: warp_frame(frame, h, reference))]
    print(f"{'method':<36} {'best s':>7} {'median s':>8} {'speed-up':>8} {'max DN':>6} {'mean DN':>8} {'>1 DN px':>8}")
    baseline = base_best = None
    for name, threads, fn in methods:
        if threads is not None:
            cv2.setNumThreads(threads)
        times, out = timed(fn, args.repeat)
        cv2.setNumThreads(default_threads)
        best = min(times)
        if baseline is None:
            baseline, base_best = out, best
        diff = np.abs(out.astype(np.int16) - baseline.astype(np.int16))
        print(f"{name:<36} {best:>7.3f} {statistics.median(times):>8.3f} {base_best / best:>7.1f}x "
              f"{int(diff.max()):>6} {float(diff.mean()):>8.5f} {int((diff > 1).sum()):>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
