"""The shard config: ``ShardConfig`` and its sections describe one rendered dataset.

The generic TOML loader (``load_config``, ``from_dict``, ``ConfigError``, ...) lives in
common/config.py and is re-exported here for the pipeline's callers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from common.config import (  # noqa: F401 - re-exported: the pipeline's config API
    SPLIT_NAME, ConfigError, apply_overrides, check, config_hash, from_dict, load_config, one_line,
    parse_override, to_dict, validate)


# ----------------------------------------------------------------------------- shard config

@dataclass
class DatasetConfig:
    name: str
    seed: int
    frames: int = 8  # frames stored per sample
    size: int = 160  # square crop, px
    kernel_size: int = 51  # K, odd

    def validate(self) -> None:
        check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None,
              f"dataset.name '{self.name}' may use letters, digits, '_', '-', '.' only")
        check(0 <= self.seed < 2**63, f"dataset.seed must be in [0, 2^63), got {self.seed}")
        check(1 <= self.frames <= 64, f"dataset.frames must be in 1..64, got {self.frames}")
        check(self.kernel_size % 2 == 1, f"dataset.kernel_size must be odd, got {self.kernel_size}")
        check(self.kernel_size >= 5, f"dataset.kernel_size must be >= 5, got {self.kernel_size}")
        check(16 <= self.size <= 4096, f"dataset.size must be in 16..4096, got {self.size}")


@dataclass
class SplitConfig:
    samples: int
    samples_per_shard: int
    source: str  # "deadleaves" | "samples" | "samples:<set>" (bundled photos) | "dir:/path/to/photos" | "mix:W*SRC|W*SRC"

    def validate(self) -> None:
        check(self.samples >= 1, f"samples must be >= 1, got {self.samples}")
        check(self.samples_per_shard >= 1, f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        check(self.source in ("deadleaves", "samples")
              or (self.source.startswith(("dir:", "samples:", "mix:")) and len(self.source.split(":", 1)[1]) > 0),
              f"source must be 'deadleaves', 'samples[:set]', 'dir:/path' or 'mix:W*SOURCE|...', got '{self.source}'")


@dataclass
class SourceConfig:
    """How sharp canvases are drawn from the sources."""

    # photos: a box of canvas/scale px is cropped and resized to the canvas; scale < 1 zooms out,
    # which averages away JPEG artefacts and sensor noise of the source photo.
    photo_scale_min: float = 1.0
    photo_scale_max: float = 1.0
    photo_cache_mb: float = 512.0  # decoded photos kept per worker process, MB (a 12 MP photo is 36 MB)
    # dead leaves: occluding disks with power-law radii (density ~ r^-alpha) between r_min and r_max
    deadleaves_alpha: float = 3.0
    deadleaves_rmin: float = 2.0
    deadleaves_rmax_frac: float = 0.35  # r_max as a fraction of the canvas side
    deadleaves_max_disks: int = 4000
    deadleaves_texture_prob: float = 0.5  # share of disks with a sinusoidal texture
    deadleaves_smooth: float = 0.7  # px, Gaussian blur of the composed image (anti-aliasing)
    # What makes dead leaves transfer to photographs (see docs/benchmarks.md for the measurements):
    deadleaves_noise_texture: float = 0.5  # share of textured disks whose texture is 1/f noise
    deadleaves_noise_slope_min: float = 0.5  # that noise's amplitude spectrum ~ 1/f^slope,
    deadleaves_noise_slope_max: float = 1.5  # slope uniform per image (rough .. smooth)
    deadleaves_illumination: float = 0.2  # std of the log of a smooth illumination field (0 = off)
    deadleaves_dof_prob: float = 0.0  # share of images whose far disks are out of focus (measured: stalls training)
    deadleaves_dof_max_px: float = 4.0  # Gaussian defocus of those disks, px, uniform in [0.5, max]
    deadleaves_contrast_min: float = 1.0  # global contrast factor, log-uniform in [min, 1] (measured: stalls training)

    def validate(self) -> None:
        check(0 < self.photo_scale_min <= self.photo_scale_max <= 1.0,
              "sources.photo_scale_min/max must satisfy 0 < min <= max <= 1")
        check(self.photo_cache_mb >= 0, "sources.photo_cache_mb must be >= 0")
        check(self.deadleaves_alpha > 1, "sources.deadleaves_alpha must be > 1")
        check(self.deadleaves_rmin > 0, "sources.deadleaves_rmin must be > 0")
        check(0 < self.deadleaves_rmax_frac <= 1, "sources.deadleaves_rmax_frac must be in (0, 1]")
        check(self.deadleaves_max_disks >= 1, "sources.deadleaves_max_disks must be >= 1")
        check(0 <= self.deadleaves_texture_prob <= 1, "sources.deadleaves_texture_prob must be in [0, 1]")
        check(self.deadleaves_smooth >= 0, "sources.deadleaves_smooth must be >= 0")
        check(0 <= self.deadleaves_noise_texture <= 1, "sources.deadleaves_noise_texture must be in [0, 1]")
        check(0 <= self.deadleaves_noise_slope_min <= self.deadleaves_noise_slope_max <= 4,
              "sources.deadleaves_noise_slope_min/max must satisfy 0 <= min <= max <= 4")
        check(0 <= self.deadleaves_illumination <= 2, "sources.deadleaves_illumination must be in [0, 2]")
        check(0 <= self.deadleaves_dof_prob <= 1, "sources.deadleaves_dof_prob must be in [0, 1]")
        check(0.5 <= self.deadleaves_dof_max_px <= 32, "sources.deadleaves_dof_max_px must be in [0.5, 32]")
        check(0 < self.deadleaves_contrast_min <= 1, "sources.deadleaves_contrast_min must be in (0, 1]")


@dataclass
class KernelConfig:
    """Camera shake: damped random walk -> trajectory -> K×K PSF (see pipeline/kernels.py)."""

    steps: int = 128
    damping: float = 0.9  # velocity AR(1) coefficient per step
    # burst-level RMS radius of the trajectory in px, log-uniform in [min, max]
    scale_min: float = 0.3
    scale_max: float = 6.0
    # per frame: with prob `mixed_prob` the burst mixes sharp and very blurred frames (per-frame
    # factor log-uniform in [mixed_min, mixed_max]); otherwise factors are log-uniform in
    # [uniform_min, uniform_max] (nearly uniform blur across the burst)
    mixed_prob: float = 0.5
    mixed_min: float = 0.1
    mixed_max: float = 2.0
    uniform_min: float = 0.7
    uniform_max: float = 1.3
    defocus_max: float = 0.7  # px, std of the point jitter (defocus), uniform in [0, max] per frame
    jitter_points: int = 4  # jittered copies of each trajectory point

    def validate(self) -> None:
        check(self.steps >= 2, f"kernels.steps must be >= 2, got {self.steps}")
        check(0 <= self.damping < 1, f"kernels.damping must be in [0, 1), got {self.damping}")
        check(0 < self.scale_min <= self.scale_max, "kernels.scale_min/max must satisfy 0 < min <= max")
        check(0 <= self.mixed_prob <= 1, "kernels.mixed_prob must be in [0, 1]")
        check(0 < self.mixed_min <= self.mixed_max, "kernels.mixed_min/max must satisfy 0 < min <= max")
        check(0 < self.uniform_min <= self.uniform_max, "kernels.uniform_min/max must satisfy 0 < min <= max")
        check(self.defocus_max >= 0, "kernels.defocus_max must be >= 0")
        check(self.jitter_points >= 1, "kernels.jitter_points must be >= 1")


@dataclass
class ImagingConfig:
    """The degradation model (see pipeline/imaging.py). Noise levels are std devs in linear [0,1]."""

    gamma_min: float = 1.5
    gamma_max: float = 2.5
    highlight_prob: float = 0.3  # share of bursts with boosted highlights
    highlight_threshold: float = 0.8  # linear luminance above which pixels are boosted
    highlight_gain_max: float = 8.0  # boost factor of the excess, uniform in [1, max]
    # Residual misalignment of registered frames (the paper left it out; real bursts keep it):
    # frame 0 is the reference (the target's geometry, never shifted); every other frame gets a
    # translation N(0, misalign_px²) per axis, or with outlier_prob is an outlier frame (shift
    # std outlier_shift_px and blur × outlier_blur). Shifts are clipped to ±misalign_max_px.
    misalign_px: float = 0.5
    misalign_max_px: float = 3.0
    outlier_prob: float = 0.08
    outlier_shift_px: float = 2.0
    outlier_blur: float = 2.0
    # share of bursts whose frames are perfectly registered (no residual shift, no outlier frame),
    # as a burst that registration got exactly right; the other parameters of a burst do not change
    registered_prob: float = 0.0
    # JPEG: with jpeg_prob a burst's frames are JPEG-compressed, quality uniform in [min, max]
    jpeg_prob: float = 0.1
    jpeg_quality_min: int = 70
    jpeg_quality_max: int = 95
    shot_min: float = 0.002  # shot noise: var = shot^2 * x, log-uniform per burst
    shot_max: float = 0.05
    read_min: float = 0.001  # read noise: std, log-uniform per burst
    read_max: float = 0.03
    correlated_prob: float = 0.25  # share of bursts whose noise is spatially correlated
    correlated_sigma: float = 0.6  # px, Gaussian correlation length of that noise

    def validate(self) -> None:
        check(0 < self.gamma_min <= self.gamma_max, "imaging.gamma_min/max must satisfy 0 < min <= max")
        check(0 <= self.highlight_prob <= 1, "imaging.highlight_prob must be in [0, 1]")
        check(0 < self.highlight_threshold < 1, "imaging.highlight_threshold must be in (0, 1)")
        check(self.highlight_gain_max >= 1, "imaging.highlight_gain_max must be >= 1")
        check(self.misalign_px >= 0, "imaging.misalign_px must be >= 0")
        check(self.misalign_max_px >= 0, "imaging.misalign_max_px must be >= 0")
        check(0 <= self.outlier_prob <= 1, "imaging.outlier_prob must be in [0, 1]")
        check(self.outlier_shift_px >= 0, "imaging.outlier_shift_px must be >= 0")
        check(self.outlier_blur > 0, "imaging.outlier_blur must be > 0")
        check(0 <= self.registered_prob <= 1, "imaging.registered_prob must be in [0, 1]")
        check(0 <= self.jpeg_prob <= 1, "imaging.jpeg_prob must be in [0, 1]")
        check(1 <= self.jpeg_quality_min <= self.jpeg_quality_max <= 100,
              "imaging.jpeg_quality_min/max must satisfy 1 <= min <= max <= 100")
        check(0 <= self.shot_min <= self.shot_max, "imaging.shot_min/max must satisfy 0 <= min <= max")
        check(0 <= self.read_min <= self.read_max, "imaging.read_min/max must satisfy 0 <= min <= max")
        check(0 <= self.correlated_prob <= 1, "imaging.correlated_prob must be in [0, 1]")
        check(self.correlated_sigma > 0, "imaging.correlated_sigma must be > 0")


@dataclass
class ShardConfig:
    dataset: DatasetConfig
    splits: dict[str, SplitConfig]
    sources: SourceConfig = field(default_factory=SourceConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    imaging: ImagingConfig = field(default_factory=ImagingConfig)

    @property
    def margin(self) -> int:
        """Pixels of canvas on each side of the crop: blur never reads past the canvas."""
        return self.dataset.kernel_size // 2

    @property
    def canvas(self) -> int:
        """Side of the sharp canvas that is blurred; the crop is its centre."""
        return self.dataset.size + 2 * self.margin

    def validate(self) -> None:
        check(len(self.splits) >= 1, "at least one [splits.<name>] table is required")
        for name in self.splits:
            check(SPLIT_NAME.fullmatch(name) is not None,
                  f"split name '{name}' may use lowercase letters, digits and '_' only")
        check(self.dataset.size >= self.dataset.kernel_size // 2,
              f"dataset.size ({self.dataset.size}) is smaller than needed for kernel_size "
              f"{self.dataset.kernel_size}: size must be >= {self.dataset.kernel_size // 2}")
        K = self.dataset.kernel_size
        room = K // 2 - 2  # a shifted kernel keeps at least one pixel of blur room inside K×K
        im = self.imaging
        if im.misalign_px > 0 or im.outlier_prob > 0:
            check(im.misalign_max_px <= room,
                  f"imaging.misalign_max_px ({im.misalign_max_px:g}) pushes kernel mass out of the "
                  f"{K}×{K} kernel: it must be <= {room} px for kernel_size {K}")
        hi = self.kernels.scale_max * max(self.kernels.mixed_max, self.kernels.uniform_max)
        check(hi < self.dataset.kernel_size / 2,
              f"kernels.scale_max × frame factor ({hi:g} px RMS) does not fit a "
              f"{self.dataset.kernel_size}×{self.dataset.kernel_size} kernel")


# Working memory of one render worker, from tracemalloc peaks of render_sample (dead leaves,
# 3 samples) while one setting was varied at a time (dev box, numpy 2 / scipy 1.16), doubled for
# what tracemalloc does not see (FFT plans and buffers inside scipy, allocator slack):
#   per dead-leaves disk ~680 B, per kernel point (frame x step x jitter) ~80 B, per
#   trajectory step (frame x step) ~470 B, per canvas pixel ~70 B + ~7 B per frame.
# Plus the interpreter with numpy/scipy/zarr/Pillow loaded, the shard's kernel rows kept until
# the shard is written, and the photo cache. It is an estimate meant to stop absurd settings
# (10^8 disks, 10^8 kernel steps, 64 frames of 4096²) before any work, not a tight bound.
WORKER_BASE_BYTES = 200 * 2**20
MEMORY_SAFETY = 2.0
DEFAULT_MAX_WORKER_GB = 8.0


def worker_memory(cfg: "ShardConfig") -> tuple[int, dict[str, int]]:
    """Estimated peak bytes of one render worker for ``cfg``, and the part of each setting."""
    d, k, s = cfg.dataset, cfg.kernels, cfg.sources
    F, T, J, K = d.frames, k.steps, k.jitter_points, d.kernel_size
    shard = max(sc.samples_per_shard for sc in cfg.splits.values())
    photos = any(not sc.source.startswith("deadleaves") for sc in cfg.splits.values())
    parts = {
        "sources.deadleaves_max_disks": int(MEMORY_SAFETY * 680 * s.deadleaves_max_disks),
        "kernels.steps x jitter_points x dataset.frames": int(MEMORY_SAFETY * (80 * J + 470) * F * T),
        "dataset.size x dataset.frames": int(MEMORY_SAFETY * (70 + 7 * F) * cfg.canvas ** 2),
        "samples_per_shard (kernel rows of a shard)": 4 * shard * F * (K * K + 2 * T),
        "sources.photo_cache_mb": int(s.photo_cache_mb * 2**20) if photos else 0,
    }
    return WORKER_BASE_BYTES + sum(parts.values()), parts


def check_worker_memory(cfg: "ShardConfig", max_gb: float | None = DEFAULT_MAX_WORKER_GB) -> None:
    """ConfigError (one line) when one worker would need more than ``max_gb`` GiB (None: no limit)."""
    if max_gb is None:
        return
    total, parts = worker_memory(cfg)
    if total > max_gb * 2**30:
        name, part = max(parts.items(), key=lambda kv: kv[1])
        raise ConfigError(
            f"one render worker would need about {total / 2**30:.1f} GiB ({name}: {part / 2**30:.1f} GiB), "
            f"over the limit of {max_gb:g} GiB per worker: lower it, or raise the limit with --max-worker-gb")


def load_shard_config(path: str | Path | None, overrides: list[str] = ()) -> ShardConfig:
    return load_config(ShardConfig, path, overrides)
