"""One sample: ``sample_params(rng, cfg) -> (params, draws)`` and ``render(canvas, params, draws,
cfg, noise_rng) -> burst``.

Randomness: sample (split, i) uses ``Generator(SeedSequence([seed, split_id, i]))`` and nothing
else. Its three children feed, in order, the sharp canvas (source), the parameters and the noise,
so changing e.g. the noise model leaves the canvas and the kernels of every sample as they were.

``render_sample(cfg, split, index)`` returns exactly the sample that the shard holds;
``sample_stats(params)`` the per-sample figures its shard's stats file records.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from pipeline import imaging, kernels, sources
from pipeline.config import ConfigError, ShardConfig
from pipeline.distributions import loguniform
from pipeline.format import sample_key


def split_id(split: str) -> int:
    """Stable integer id of a split name (crc32), part of every sample's seed."""
    return zlib.crc32(split.encode())


def sample_streams(cfg: ShardConfig, split: str, index: int) -> tuple[np.random.Generator, ...]:
    """(source, params, noise) generators of sample ``index`` of ``split``."""
    ss = np.random.SeedSequence([cfg.dataset.seed, split_id(split), index])
    return tuple(np.random.Generator(np.random.PCG64(child)) for child in ss.spawn(3))


def sample_params(rng: np.random.Generator, cfg: ShardConfig) -> tuple[dict, kernels.ShakeDraws]:
    """Every random parameter of one burst except the canvas and the noise field.

    Returns (params, draws): params holds plain JSON values only (they go to the sample's json);
    draws the kernels' raw arrays (``kernels.ShakeDraws``), which are not stored.
    """
    im = cfg.imaging
    params, draws = kernels.sample_kernel_params(rng, cfg.kernels, cfg.dataset.frames, im)
    params["gamma"] = float(rng.uniform(im.gamma_min, im.gamma_max))
    boosted = bool(rng.random() < im.highlight_prob)
    params["highlight_gain"] = float(rng.uniform(1.0, im.highlight_gain_max)) if boosted else 1.0
    params["shot_noise"] = float(loguniform(rng, im.shot_min, im.shot_max))
    params["read_noise"] = float(loguniform(rng, im.read_min, im.read_max))
    correlated = bool(rng.random() < im.correlated_prob)
    params["noise_correlation_px"] = float(im.correlated_sigma) if correlated else 0.0
    compressed = bool(rng.random() < im.jpeg_prob)
    quality = int(rng.integers(im.jpeg_quality_min, im.jpeg_quality_max + 1))
    params["jpeg_quality"] = quality if compressed else 0  # 0: frames not JPEG-compressed
    return params, draws


def render(canvas: np.ndarray, params: dict, draws: kernels.ShakeDraws, cfg: ShardConfig,
           noise_rng: np.random.Generator) -> dict:
    """Degrade one sharp canvas (uint8 sRGB (C, C, 3), C = size + K - 1) with ``sample_params``'
    output (``params``, ``draws``); the noise field is drawn from ``noise_rng``.

    Returns burst uint8 (F, size, size, 3) sRGB, target uint8 (size, size, 3) sRGB (the untouched
    centre crop), kernels float32 (F, K, K), trajectories float32 (F, T, 2) px, and the fit factors.
    """
    K, size, m = cfg.dataset.kernel_size, cfg.dataset.size, cfg.margin
    kern, traj, fit = kernels.build_kernels(params, draws, cfg.kernels, K)
    burst = imaging.degrade(
        canvas, kern, size, gamma=params["gamma"], highlight_gain=params["highlight_gain"],
        highlight_threshold=cfg.imaging.highlight_threshold, shot=params["shot_noise"],
        read=params["read_noise"], correlated_sigma=params["noise_correlation_px"], noise_rng=noise_rng)
    if params.get("jpeg_quality", 0) > 0:
        burst = imaging.jpeg_frames(burst, params["jpeg_quality"])
    target = np.ascontiguousarray(canvas[m:m + size, m:m + size])
    return {"burst": burst, "target": target, "kernels": kern, "trajectories": traj, "fit": fit}


@functools.lru_cache(maxsize=16)
def _cached_source(spec: str, min_side: int) -> sources.SourceList:
    return sources.list_source(spec, min_side)


def split_source(cfg: ShardConfig, split: str) -> sources.SourceList:
    """The scanned source of a split (cached per process)."""
    return _cached_source(cfg.splits[split].source, cfg.canvas)


def render_sample(cfg: ShardConfig, split: str, index: int,
                  source: sources.SourceList | None = None) -> dict:
    """The exact sample ``index`` of ``split`` that the shards hold.

    Returns {"key", "burst" uint8 (F, S, S, 3), "target" uint8 (S, S, 3), "kernels" float32
    (F, K, K), "trajectories" float32 (F, T, 2), "params" (the sample's json, a plain dict)}.
    """
    if split not in cfg.splits:
        raise ConfigError(f"no split '{split}' in the config (splits: {', '.join(cfg.splits)})")
    n = cfg.splits[split].samples
    if not 0 <= index < n:
        raise IndexError(f"sample {index} out of range for split '{split}' ({n} samples)")
    source = source or split_source(cfg, split)
    src_rng, par_rng, noise_rng = sample_streams(cfg, split, index)
    canvas, source_info = sources.draw_canvas(src_rng, source, cfg.canvas, cfg.sources)
    params, draws = sample_params(par_rng, cfg)
    out = render(canvas, params, draws, cfg, noise_rng)
    shard = index // cfg.splits[split].samples_per_shard
    key = sample_key(split, shard, index)
    radius = kernels.kernel_radius(out["kernels"])
    meta = dict(params)
    meta.update({
        "key": key,
        "split": split,
        "index": index,
        "seed_path": [cfg.dataset.seed, split_id(split), index],
        "source": source_info,
        "kernel_row": index,  # row of kernels.zarr/<split>
        "kernel_fit": [round(f, 6) for f in out["fit"]],
        "kernel_radius_px": [round(float(r), 4) for r in radius],
        "frames": cfg.dataset.frames,
        "size": cfg.dataset.size,
    })
    return {"key": key, "burst": out["burst"], "target": out["target"], "kernels": out["kernels"],
            "trajectories": out["trajectories"], "params": meta}


def sample_stats(params: dict) -> dict:
    """The per-sample figures a shard's stats file records, from a sample's json ``params``:
    blur_px, the mean over frames of the kernels' RMS radius (px, 4 decimals), and
    noise_std_mid_grey, the noise std at linear mid grey (``imaging.MID_GREY``, 6 decimals)."""
    return {"blur_px": round(float(np.mean(params["kernel_radius_px"])), 4),
            "noise_std_mid_grey": round(imaging.noise_std(imaging.MID_GREY, params["shot_noise"],
                                                          params["read_noise"]), 6)}
