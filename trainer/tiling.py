"""Run a model on a burst too large for one pass: overlapping tiles, blended without seams.

The host holds the uint8 frames, the device only one batch of tiles. Each tile's output is
weighted by a window that is zero in a margin along every edge shared with a neighbour, then rises
with a raised cosine to 1; weights are accumulated and normalized. The margin is at least the
model's receptive-field radius (``receptive_radius``; 40 px for the 4-level U-Net), so every
output pixel comes from a tile that holds its whole receptive field, and tile origins are
multiples of the model's padding multiple, so the strided convs see the same grid: tiled and
untiled output agree to float rounding (tests/test_tiling.py).
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError
from trainer.device import burst_to_input
from trainer.cue import cue_frames
from trainer.fba import fba_frames


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
        # a guided model gets its guide given: computed inside, FBA would make the field global
        guide = x.detach().mean(dim=1) if probe_cfg.uses_fba else None
        cue = torch.zeros(1, 1, size, size) if probe_cfg.fba_cue else None  # given too: computed once per burst
        with torch.enable_grad():  # callers may be under no_grad
            probe(x, guide, cue)[..., c : c + m, c : c + m].sum().backward()
        support = (x.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero()
        lo, hi = support.min(dim=0).values, support.max(dim=0).values
        if lo.min() > 0 and hi.max() < size - 1:
            return int(max((c - lo).max(), (hi - (c + m - 1)).max()))
        size *= 2
        if size > 4096:
            raise UserError("receptive field larger than 2048 px; pass --overlap explicitly")


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
        raise UserError(f"--tile {tile} must exceed --overlap {overlap} by at least {multiple} px")
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


def run_tiled(model: torch.nn.Module, frames: Sequence[np.ndarray], tile: int = 512, overlap: int | None = None,
              device: str | torch.device = "cpu", batch: int = 1, precision: str = "fp32",
              progress: bool = False, compile: bool = False) -> np.ndarray:
    """Run ``model`` on a burst too large for one pass, tile by tile.

    frames: N aligned RGB uint8 (H, W, 3) on the host. Tiles of ``tile`` px overlapping by
    ``overlap`` px (None: ``auto_overlap`` of the model, which makes the result equal to one
    untiled pass up to float rounding) go to ``device`` ``batch`` at a time as uint8 and are
    converted there. precision: "fp32" or "bf16" (autocast; on CPUs with AVX512-BF16 or AMX too).
    compile: run ``torch.compile(model)`` (needs a C++ compiler on CPU; costs ~30 s once per tile
    shape on a 2-core CPU, saves half the model time or more there: docs/benchmarks.md; fp32
    output equal to the eager one up to float rounding). Runs under inference_mode.
    A model that uses FBA (``guide = "fba"`` or ``base = "select_fba"``) gets the FBA of the whole burst (computed once, frame by frame,
    on ``device``), cut like the frames, so tiles see the estimate an untiled pass would; an
    ``fba_cue`` model likewise the misalignment cue of the whole burst (trainer/cue.py).
    Returns float32 (H, W, 3) in [0, 1].
    """
    cfg = getattr(model, "cfg", None)
    if overlap is None:
        if cfg is None:
            raise ValueError("this model has no .cfg; pass overlap explicitly")  # API misuse, not user input
        overlap = auto_overlap(cfg)  # outside inference_mode: the receptive-field probe needs autograd
    forward = _compiled(model) if compile else model
    with torch.inference_mode():
        guide = cue = None
        if cfg is not None and getattr(cfg, "uses_fba", False):
            guide = fba_frames(frames, device)[0].permute(1, 2, 0).cpu().numpy()  # float32 (H, W, 3)
        if cfg is not None and getattr(cfg, "fba_cue", False):
            cue = cue_frames(frames, device)[0, 0].cpu().numpy()  # float32 (H, W)
        return _run_tiles(forward, frames, tile, overlap, torch.device(device), batch, precision, progress,
                          cfg.multiple if cfg is not None else 1, guide, cue)


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """One torch.compile wrapper per model, so later calls reuse its compiled graphs. Static
    shapes: one graph per tile shape (at most 4); inductor's dynamic-shape recompile fails on
    this model in torch 2.13 (TensorReferenceAnalysis has no python_mod)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


def _run_tiles(model, frames, tile: int, overlap: int, device: torch.device, batch: int, precision: str,
               progress: bool, multiple: int, guide: np.ndarray | None = None,
               cue: np.ndarray | None = None) -> np.ndarray:
    rows, cols = frames[0].shape[:2]
    ys = tile_starts(rows, tile, overlap, multiple)
    xs = tile_starts(cols, tile, overlap, multiple)
    acc = np.zeros((rows, cols, 3), np.float32)
    weight = np.zeros((rows, cols), np.float32)

    # Group tiles by shape (at most 4: interior, last row, last column, corner) so each batch stacks.
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for y0, y1 in ys:
        for x0, x1 in xs:
            groups.setdefault((y1 - y0, x1 - x0), []).append((y0, y1, x0, x1))
    jobs = [(shape, boxes[i : i + batch]) for shape, boxes in groups.items() for i in range(0, len(boxes), batch)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", disable=not progress, leave=False)
    while jobs:
        boxes = jobs.pop(0)[1]
        host = np.stack([np.stack([f[y0:y1, x0:x1] for f in frames]) for y0, y1, x0, x1 in boxes])  # (B,N,h,w,3)
        try:
            x = burst_to_input(torch.from_numpy(host), device, non_blocking=True)
            g = c = None
            if guide is not None:
                g = np.stack([guide[y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])  # (B, h, w, 3)
                g = torch.from_numpy(g).to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
            if cue is not None:
                c = np.stack([cue[y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])[:, None]  # (B, 1, h, w)
                c = torch.from_numpy(c).to(device, non_blocking=True)
            with autocast:
                out = model(x, g, c) if c is not None else model(x, g) if g is not None else model(x)
            out = out.float().clamp_(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        except torch.OutOfMemoryError:
            # The memory a tile needs grows with frames and width; rather than guess, halve the batch.
            x = g = c = out = None
            torch.cuda.empty_cache()
            if len(boxes) == 1:
                y0, y1, x0, x1 = boxes[0]
                raise UserError(f"out of GPU memory on a single {x1 - x0}x{y1 - y0} tile of {len(frames)} frames; "
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
