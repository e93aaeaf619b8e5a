"""Fourier Burst Accumulation in torch: the classical estimate the network can start from.

The same estimate as ``trainer.baselines.fba`` (Delbracio & Sapiro, CVPR 2015; numpy, float64,
the reference the evaluation scores), written for batches of bursts on any device and for
full-resolution frames: large frames are transformed one at a time (twice, and only the half
spectrum of a real image), so a 12 MP × 8 burst needs the N smoothed magnitude spectra plus two
half spectra of one frame (about 1 GB), not the N spectra.

Per frequency f, the frames' Fourier coefficients are averaged with weights
w_i(f) = M_i(f)^p / sum_j M_j(f)^p, M_i the channel-averaged magnitude of frame i smoothed by a
Gaussian (std min(H, W) / 50 bins, wrapping around as the spectrum does). It is symmetric in the
frames, so a network fed with it stays invariant to their order; with one frame it is the frame.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from trainer.device import image_to_target

P = 11  # the paper's weight exponent
KEEP_SPECTRA = 1 << 24  # frame pixels (B·N·3·H·W; 64 MB of half spectra in complex64) below which all are kept


def _gaussian_taps(sigma: float, device, dtype) -> Tensor | None:
    """scipy.ndimage.gaussian_filter's 1-D kernel (truncate 4), or None when it is the identity."""
    radius = int(4.0 * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return None
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _smooth_wrap(m: Tensor, taps: Tensor | None) -> Tensor:
    """Separable Gaussian of (B, N, H, W) over H and W with periodic boundaries, as a product in
    the Fourier domain (a circular convolution; cheaper than the direct one for wide kernels)."""
    if taps is None:
        return m
    h, w = m.shape[-2:]
    r = (len(taps) - 1) // 2

    def wrapped(length: int) -> Tensor:  # the taps folded onto a periodic axis of ``length``
        k = torch.zeros(length, device=m.device, dtype=m.dtype)
        return k.index_add_(0, torch.arange(-r, r + 1, device=m.device) % length, taps)

    gain = torch.fft.fft(wrapped(h)).real[:, None] * torch.fft.rfft(wrapped(w)).real[None, :]
    return torch.fft.irfft2(torch.fft.rfft2(m) * gain, s=(h, w))


def _full_from_half(half: Tensor, w: int) -> Tensor:
    """The full (..., H, W) magnitude spectrum of a real image from its rfft2 half (..., H, W//2+1):
    M(k1, k2) = M(-k1, -k2), so the missing columns are the kept ones, mirrored in both axes."""
    h = half.shape[-2]
    rows = (-torch.arange(h, device=half.device)) % h
    cols = w - torch.arange(w // 2 + 1, w, device=half.device)
    return torch.cat([half, half[..., rows, :][..., cols]], dim=-1)


def accumulate(frame: Callable[[int], Tensor], n: int, p: float = P, sigma: float | None = None) -> Tensor:
    """FBA of ``n`` frames, frame(i) -> float (B, 3, H, W) in [0, 1]; returns (B, 3, H, W), clipped
    to [0, 1], in frame(0)'s dtype. Large bursts ask for each frame twice (magnitudes, then
    accumulation). The frames are real, so only half of each spectrum is computed (rfft2); the
    weights are symmetric in frequency like the magnitudes they come from."""
    first = frame(0)
    if n == 1:
        return first.clamp(0, 1)
    b, _, h, w = first.shape
    sigma = min(h, w) / 50 if sigma is None else float(sigma)
    real = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
    magnitude = torch.empty(b, n, h, w, device=first.device, dtype=real)
    keep = b * n * 3 * h * w <= KEEP_SPECTRA  # small bursts (training crops): transform each frame once
    spectra = []
    for i in range(n):
        spectrum = torch.fft.rfft2((first if i == 0 else frame(i)).to(real))
        magnitude[:, i] = _full_from_half(spectrum.abs().mean(dim=1), w)
        if keep:
            spectra.append(spectrum)
    magnitude = _smooth_wrap(magnitude, _gaussian_taps(sigma, first.device, real))
    # M^p under/overflows for p = 11: divide by the per-frequency maximum first (ratios in [0, 1],
    # the largest exactly 1, so the denominator is >= 1)
    peak = magnitude.amax(dim=1, keepdim=True)
    ratio = torch.where(peak > 0, magnitude / peak.clamp_min(torch.finfo(real).tiny), torch.ones_like(magnitude))
    weights = ratio.pow_(p)
    weights = weights[..., : w // 2 + 1] / weights.sum(dim=1, keepdim=True)[..., : w // 2 + 1]
    fused = None
    for i in range(n):
        spectrum = (spectra[i] if keep else torch.fft.rfft2(frame(i).to(real))).mul_(weights[:, i, None])
        fused = spectrum if fused is None else fused.add_(spectrum)
    return torch.fft.irfft2(fused, s=(h, w)).clamp_(0, 1).to(first.dtype)


def fba(burst: Tensor, p: float = P, sigma: float | None = None) -> Tensor:
    """FBA of a batch of bursts: float (B, N, 3, H, W) in [0, 1] -> (B, 3, H, W), without gradient,
    in full precision also under autocast."""
    with torch.no_grad(), torch.autocast(burst.device.type, enabled=False):
        return accumulate(lambda i: burst[:, i], burst.shape[1], p, sigma)


def fba_frames(frames, device: str | torch.device = "cpu") -> Tensor:
    """FBA of one burst given as N uint8 (H, W, 3) arrays (e.g. a full-resolution aligned burst):
    float32 (1, 3, H, W) on ``device``; each frame is converted when it is needed."""
    def frame(i: int) -> Tensor:
        return image_to_target(torch.from_numpy(frames[i])[None], device)

    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        return accumulate(frame, len(frames))

