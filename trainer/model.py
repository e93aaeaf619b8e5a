"""The permutation-invariant U-Net of Aittala & Durand (ECCV 2018).

A burst goes in as float (B, N, 3, H, W) in [0, 1]; one image (B, 3, H, W) comes out. Every frame
runs through the same U-Net track (frames are folded into the batch dimension). Each block starts
with a *set conv*: the per-pixel max over the N frames of the incoming features is concatenated to
each frame's own features, so every track sees what the others see. The max is symmetric, so the
output does not depend on the order of the frames, and any N >= 1 works. After the decoder a last
max over frames leaves one feature map per burst, from which a small head predicts a correction
that is added to the mean of the frames. With ``guide = "fba"`` the Fourier Burst Accumulation of
the frames (also symmetric in them) is fed to every track beside its frame.

    burst (B,N,3,H,W) ── fold (B*N,3,H,W) ─► stem ─► enc0 ──► enc1 ──► enc2 ──► enc3
                                                      │skip     │skip     │skip     │
                                                     dec0 ◄─── dec1 ◄─── dec2 ◄────┘
                                                      │
                          mean over frames ──► + ◄── head ◄── max over frames
                                               │
                                               ▼
                                        image (B,3,H,W)

ELU activations, weight normalization on every conv, no batch statistics: BatchNorm would couple
the frames and the samples of a batch and behave differently in train and eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import weight_norm

from common.bundled import bundled
from common.config import ConfigError, check, from_dict
from trainer.checkpoint import INFERENCE_KEYS, CheckpointError, load_checkpoint
from trainer.cue import misalignment_cue
from trainer.fba import fba


BASES = ("mean", "select", "select_fba")
# the FBA candidate's starting logit: beside N frames at zero logits its weight is
# e^-2 / (N + e^-2): 6% of the base at N = 2, 2% at N = 8
FBA_LOGIT_INIT = -2.0


@dataclass
class ModelConfig:
    """The [model] section of a train config."""

    width: int = 64  # channels of the first level
    mults: list[int] = field(default_factory=lambda: [1, 2, 4, 6])  # per level: 64-128-256-384
    out_mult: float = 1.5  # the decoder ends at round(width * out_mult) channels (96)
    convs_per_block: int = 2  # one set conv + (convs_per_block - 1) plain convs per block
    # compute the max half of every set conv once per burst instead of once per frame (same
    # weights, same numerics up to float rounding); false = the plain concatenation, for benchmarks
    fused: bool = True
    # Where the output image sits when the frames are not perfectly registered:
    # "mean": at the mean position of the given frames; the network is fully permutation
    #   invariant (the paper's). Checkpoints whose config lacks the key load as "mean".
    # "reference": at frame 0's position (the frame the others were registered to); its track gets
    #   a learned offset after the stem so the net can tell it apart; the output is invariant to
    #   the order of frames 1..N-1 only.
    geometry: str = "mean"
    # What the network starts from:
    # "none": the mean of the frames (the paper's); the head's output is a correction to it.
    # "fba": also give the net Fourier Burst Accumulation of the frames (trainer/fba.py), a
    #   classical deblurred estimate that is symmetric in the frames: every frame's track sees it
    #   beside the frame (6 input channels); the head still corrects the mean. forward computes it
    #   from the burst it is given unless the caller passes the FBA of a larger window (training
    #   crops and deblur tiles pass the FBA of the whole image). Old checkpoints load as "none".
    guide: str = "none"
    # The image the head's correction is added to:
    # "mean": the mean of the frames (the paper's).
    # "select": a per-pixel weighted mean of the frames, the weights a softmax over the frames of
    #   logits that every frame's track predicts from its last features (so the net can take a
    #   sharp frame's pixels as they are instead of rebuilding them from the mean); still
    #   invariant to the order of the frames. The logits start at zero: at init "select" is "mean",
    #   and a "mean" checkpoint loads into it unchanged (train.init). Old checkpoints load as "mean".
    # "select_fba": "select" with one more candidate in the softmax, the burst's Fourier Burst
    #   Accumulation (computed as for the guide; its logit from the max over the frames' last
    #   features), so that where FBA is right (registered frames, one of them nearly sharp) the net
    #   can take it as it is. Its logit starts at FBA_LOGIT_INIT: a "select" or "mean" checkpoint
    #   grows into it (train.init) computing nearly what it did (with one frame FBA is that frame).
    base: str = "mean"
    # For "select_fba": also give FBA's logit a misalignment cue (trainer/cue.py: the frames'
    # local shifts against their mean, estimated from the low-passed frames), so the net can
    # trust FBA where the frames are registered and not where they are shifted, which FBA cannot
    # handle. Its conv starts at zero: a "select_fba" checkpoint grows into it unchanged
    # (train.init). Old checkpoints load as false.
    fba_cue: bool = False

    def validate(self) -> None:
        check(1 <= self.width <= 4096, f"model.width must be in 1..4096, got {self.width}")
        check(2 <= len(self.mults) <= 8, f"model.mults must have 2..8 levels, got {len(self.mults)}")
        check(all(m >= 1 for m in self.mults), f"model.mults must all be >= 1, got {self.mults}")
        check(round(self.width * self.out_mult) >= 1,
              f"model.out_mult gives {round(self.width * self.out_mult)} output channels; must be >= 1")
        check(1 <= self.convs_per_block <= 16,
              f"model.convs_per_block must be in 1..16, got {self.convs_per_block}")
        check(self.geometry in ("mean", "reference"),
              f"model.geometry must be 'mean' or 'reference', got '{self.geometry}'")
        check(self.guide in ("none", "fba"), f"model.guide must be 'none' or 'fba', got '{self.guide}'")
        check(self.base in BASES, f"model.base must be one of {', '.join(BASES)}, got '{self.base}'")
        check(not self.fba_cue or self.base == "select_fba",
              f"model.fba_cue needs model.base = 'select_fba', got '{self.base}'")

    @property
    def uses_fba(self) -> bool:
        """True when forward needs the FBA of the burst (the guide input or the FBA candidate)."""
        return self.guide == "fba" or self.base == "select_fba"

    @property
    def multiple(self) -> int:
        """H and W are padded to a multiple of this inside forward (one halving per level)."""
        return 2 ** (len(self.mults) - 1)


# ----------------------------------------------------------------------------- building blocks


# Weight norm makes every output channel's weight g·v/|v|; g is that channel's gain. PyTorch's
# default init amounts to g ≈ 0.58, which shrinks the features ~2x per block through ELU (measured
# at init: RMS 0.07 after the first block, 0.02 at the bottom); 1.2 keeps it at 0.4-0.6 throughout.
INIT_GAIN = 1.2


def conv3x3(cin: int, cout: int, stride: int = 1, gain: float = INIT_GAIN) -> nn.Module:
    """A weight-normalized 3×3 conv (zero padding; stride 2 halves even H, W)."""
    conv = weight_norm(nn.Conv2d(cin, cout, 3, stride=stride, padding=1))
    with torch.no_grad():
        conv.parametrizations.weight.original0.fill_(gain)
    return conv


def is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def same_format(x: Tensor, like: Tensor) -> Tensor:
    """``x`` in the memory format of ``like``: reductions, expands and cats drop channels_last."""
    return x.contiguous(memory_format=torch.channels_last) if is_channels_last(like) else x


def frame_max(x: Tensor, n: int) -> Tensor:
    """Per-pixel max over the frames of each burst: (B*N, C, H, W) -> (B, C, H, W).

    Eager, a fold of elementwise maxima over the N frames, with a backward that sends each
    pixel's gradient to its first arg-max frame (what ``max(dim)`` does, and a valid subgradient
    on exact ties). The same values and, without ties, the same gradients as ``max(dim).values``,
    which builds an index tensor: measured 16-20x slower forward at deblur tiles and 1.3-2.3x
    slower forward+backward at training shapes on this CPU (docs/benchmarks.md). Compiled,
    ``max(dim)``: inductor fuses it, and a Python loop over a symbolic N would specialize the
    graph to each burst length.
    """
    u = x.unflatten(0, (-1, n))
    if torch.compiler.is_compiling():
        m = u.max(dim=1).values
    elif torch.is_grad_enabled() and x.requires_grad:
        m = _FrameMax.apply(u)
    else:
        m = _fold_max(u)
    return same_format(m, x)


def _fold_max(u: Tensor) -> Tensor:
    """(B, N, ...) -> (B, ...): the max over dim 1 as N - 1 elementwise maxima, in place."""
    m = u[:, 0].clone()
    for i in range(1, u.shape[1]):
        torch.maximum(m, u[:, i], out=m)
    return m


class _FrameMax(torch.autograd.Function):
    """``_fold_max`` with the gradient of each output pixel routed to its first arg-max frame."""

    @staticmethod
    def forward(ctx, u: Tensor) -> Tensor:
        m = _fold_max(u)
        ctx.save_for_backward(u, m)  # u is the set conv's input, which autograd keeps anyway
        return m

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        u, m = ctx.saved_tensors
        out = torch.empty_like(u)
        free = torch.ones_like(m, dtype=torch.bool)  # no earlier frame took this pixel yet
        for i in range(u.shape[1]):
            hit = (u[:, i] == m) & free
            free &= ~hit
            torch.mul(grad, hit, out=out[:, i])
        return out


class SetConv(nn.Module):
    """A conv over [x_i ; max_j x_j] for every frame i of a burst: (B*N, cin, H, W) -> (B*N, cout, H', W').

    It holds ONE weight-normalized conv over the 2*cin concatenated channels. Because a conv is
    linear, W·[x_i ; m] = W_a·x_i + W_b·m, and W_b·m is the same for all N frames of a burst.
    The fused form slices the weight into W_a and W_b at forward time and computes W_b·m once per
    burst, then broadcasts it: the max half costs 1/N of the plain form and the (B*N, 2*cin, H, W)
    concatenation is never built. The plain form builds that concatenation, as the paper's
    reference does. Same parameters in both forms, so state dicts are interchangeable.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, fused: bool = True):
        super().__init__()
        self.cin = cin
        self.fused = fused
        self.conv = conv3x3(2 * cin, cout, stride)

    def forward(self, x: Tensor, n: int) -> Tensor:
        m = frame_max(x, n)
        w, b = self.conv.weight, self.conv.bias  # weight: recomputed from (g, v) by weight_norm
        stride, padding = self.conv.stride, self.conv.padding
        if self.fused:
            y = F.conv2d(x, w[:, : self.cin], b, stride, padding)  # (B*N, cout, H', W')
            ym = F.conv2d(m, w[:, self.cin :], None, stride, padding)  # (B, cout, H', W')
            # in place: y is a fresh conv output that autograd does not keep (saves a copy)
            return y.unflatten(0, (-1, n)).add_(ym.unsqueeze(1)).flatten(0, 1)
        m = m.unsqueeze(1).expand(-1, n, -1, -1, -1).flatten(0, 1)  # (B*N, cin, H, W)
        return F.conv2d(same_format(torch.cat([x, m], dim=1), x), w, b, stride, padding)

    def forward_up(self, low: Tensor, skip: Tensor, n: int) -> Tensor:
        """``forward(cat([upsample(low), skip]), n)``, a decoder's first conv: (B*N, c, h, w) and
        (B*N, cin - c, 2h, 2w) -> (B*N, cout, 2h, 2w).

        Without autograd (deblurring, evaluation) by ``forward_phases``, the cheaper equal form;
        training keeps the plain upsample-and-concatenate, so a training run's floats, and with
        them the shipped model's reproduction, stay what they were."""
        if torch.is_grad_enabled() or not self.fused or self.conv.stride != (1, 1):
            return self.forward(torch.cat([F.interpolate(low, scale_factor=2, mode="nearest"), skip], dim=1), n)
        return self.forward_phases(low, skip, n)

    def forward_phases(self, low: Tensor, skip: Tensor, n: int) -> Tensor:
        """``forward_up`` of a fused, stride-1 set conv without building the upsampled tensor or
        the concatenation.

        A 3x3 conv of a nearest-upsampled image is, at each of the four output phases (even/odd
        row, even/odd column), a 2x2 conv of the low-resolution image whose taps are sums of the
        3x3 taps (``phase_kernels``): 16 multiply-adds per low-res pixel where the upsampled
        conv spends 36, and neither the upsampled tensor nor the concatenation is written. The
        max over frames commutes with the upsampling, so the max half gets the same treatment.
        Same values as the plain composition up to float rounding (a test).
        """
        c, h, w_ = low.shape[1], low.shape[2], low.shape[3]
        if skip.shape[2:] != (2 * h, 2 * w_) or skip.shape[1] != self.cin - c:
            raise ValueError(f"skip {tuple(skip.shape)} does not match upsampled {tuple(low.shape)} for {self.cin} channels")
        w, b = self.conv.weight, self.conv.bias
        y = F.conv2d(skip, w[:, c : self.cin], b, 1, 1)  # (B*N, cout, 2h, 2w): the skip's own part
        ym = F.conv2d(frame_max(skip, n), w[:, self.cin + c :], None, 1, 1)  # (B, cout, 2h, 2w)
        _add_upsampled_conv(y, low, w[:, :c])
        _add_upsampled_conv(ym, frame_max(low, n), w[:, self.cin : self.cin + c])
        return y.unflatten(0, (-1, n)).add_(ym.unsqueeze(1)).flatten(0, 1)


# Which 3x3 taps fall on which of the two low-res rows (or columns) a 2x2 phase kernel covers,
# for output rows 2i (covers low rows i-1, i) and 2i+1 (covers i, i+1) of a nearest upsampling.
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def phase_kernels(w: Tensor) -> Tensor:
    """3x3 kernels (cout, c, 3, 3) -> the 2x2 kernels (4*cout, c, 2, 2) that give, on the low-res
    image padded by 1, the conv of its nearest 2x upsampling at phases (0,0), (0,1), (1,0), (1,1)."""
    r = torch.tensor(_PHASE_TAPS, dtype=w.dtype, device=w.device)  # (phase, 2 low taps, 3 taps)
    return torch.einsum("api,ocij,bqj->abocpq", r, w, r).flatten(0, 2)


def _add_upsampled_conv(out: Tensor, low: Tensor, w: Tensor) -> None:
    """out (M, cout, 2h, 2w) += conv3x3(nearest_upsample_2x(low), w), zero padding, in place."""
    cout, h, w_ = w.shape[0], low.shape[2], low.shape[3]
    z = F.conv2d(low, phase_kernels(w), None, 1, 1)  # (M, 4*cout, h+1, w+1); phase (a, b) at [a:a+h, b:b+w]
    grid = out.unflatten(3, (w_, 2)).unflatten(2, (h, 2))  # (M, cout, h, 2, w, 2), a view of out
    for a in range(2):
        for b in range(2):
            k = 2 * a + b
            grid[:, :, :, a, :, b].add_(z[:, k * cout : (k + 1) * cout, a : a + h, b : b + w_])


class SetBlock(nn.Module):
    """One block of every frame's track: a set conv, then plain convs, ELU after each conv.

    (B*N, cin, H, W) -> (B*N, cout, H/stride, W/stride).
    """

    def __init__(self, cin: int, cout: int, convs: int, stride: int = 1, fused: bool = True):
        super().__init__()
        self.set_conv = SetConv(cin, cout, stride, fused)
        self.convs = nn.ModuleList(conv3x3(cout, cout) for _ in range(convs - 1))

    def forward(self, x: Tensor, n: int, skip: Tensor | None = None) -> Tensor:
        """skip: a decoder's skip at twice x's resolution; the block then sees cat([upsample(x), skip])
        (``SetConv.forward_up``)."""
        x = self.set_conv(x, n) if skip is None else self.set_conv.forward_up(x, skip, n)
        x = F.elu(x, inplace=True)
        for conv in self.convs:
            x = F.elu(conv(x), inplace=True)
        return x


# ----------------------------------------------------------------------------- the network


class BurstDeblurNet(nn.Module):
    """burst float (B, N, 3, H, W) in [0, 1], any N >= 1, any H, W -> image float (B, 3, H, W).

    The output is in the colour space of the input (sRGB-encoded frames give an sRGB image), is
    not clamped (the loss sees the raw values; clamp to [0, 1] for display), and is in float32
    when the input is, also under bf16 autocast (the mean of the frames is added in float32).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        levels = len(cfg.mults)
        enc = [cfg.width * m for m in cfg.mults]  # encoder channels per level
        dec = [round(cfg.width * cfg.out_mult)] + enc[1:-1]  # decoder channels, levels 0..L-2
        k, fused = cfg.convs_per_block, cfg.fused

        self.stem = conv3x3(6 if cfg.guide == "fba" else 3, enc[0])
        if cfg.geometry == "reference":
            self.reference_embed = nn.Parameter(torch.zeros(enc[0]))
        # level 0 keeps the resolution; every deeper level starts with a stride-2 set conv
        self.encoders = nn.ModuleList(
            SetBlock(enc[max(i - 1, 0)], enc[i], k, stride=1 if i == 0 else 2, fused=fused)
            for i in range(levels)
        )
        # decoders run deep to shallow; each sees [upsampled deeper features ; skip of its level]
        deeper = [enc[-1]] + dec[:0:-1]  # channels arriving from below, in decoder order
        self.decoders = nn.ModuleList(
            SetBlock(c_in + enc[i], dec[i], k, fused=fused)
            for c_in, i in zip(deeper, reversed(range(levels - 1)))
        )
        # a small gain on the last conv: training starts near "output = mean of the frames"
        # with a small correction, not with noise of the features' size
        self.head = nn.Sequential(conv3x3(dec[0], dec[0]), nn.ELU(inplace=True), conv3x3(dec[0], 3, gain=0.1))
        with torch.no_grad():
            self.head[-1].bias.zero_()
        if cfg.base in ("select", "select_fba"):  # per-frame logits of the base's weights; zero: the mean at init
            self.select = nn.Conv2d(dec[0], 1, 3, padding=1)
            with torch.no_grad():
                self.select.weight.zero_()
                self.select.bias.zero_()
        if cfg.base == "select_fba":  # FBA's logit, from the max over the frames' last features
            self.select_fba = nn.Conv2d(dec[0], 1, 3, padding=1)
            with torch.no_grad():
                self.select_fba.weight.zero_()
                self.select_fba.bias.fill_(FBA_LOGIT_INIT)
        if cfg.fba_cue:  # adds to FBA's logit; zero: "select_fba" exactly at init
            self.select_cue = nn.Conv2d(1, 1, 1)
            with torch.no_grad():
                self.select_cue.weight.zero_()
                self.select_cue.bias.zero_()

    @property
    def channels_last(self) -> bool:
        """True after ``model.to(memory_format=torch.channels_last)``.

        The stored weights carry the memory format, but weight_norm recomputes the conv weights
        as contiguous tensors, so the convs would not pick it up from them: forward converts the
        input instead, and every conv then follows its input.
        """
        return is_channels_last(self.stem.parametrizations.weight.original1)

    def forward(self, burst: Tensor, guide: Tensor | None = None, cue: Tensor | None = None) -> Tensor:
        """burst float (B, N, 3, H, W) -> (B, 3, H, W). guide: for models that use FBA, the FBA
        (B, 3, H, W) of the window this burst was cut from; None computes it from ``burst``.
        cue: for ``fba_cue`` models, likewise the misalignment cue (B, 1, H, W) of that window
        (trainer/cue.py). Each is ignored by models that do not use it."""
        if burst.dim() != 5 or burst.shape[2] != 3 or min(burst.shape) < 1:
            raise ValueError(f"burst must be (B, N, 3, H, W) with B, N, H, W >= 1, got {tuple(burst.shape)}")
        if not burst.is_floating_point():
            raise ValueError(f"burst must be float in [0, 1], got {burst.dtype} (divide uint8 by 255)")
        n, h, w = burst.shape[1], burst.shape[3], burst.shape[4]
        # predict a correction to the mean: the mean is already a denoised (if blurry) estimate
        # and is invariant to frame order, so the net starts from a sensible image and only has
        # to learn the deblurring; it also keeps the colours anchored for N = 1. The FBA guide is
        # an input, not the base: a net that corrected FBA started close to its target and, on
        # the shipped model's recipe, switched its correction off within 250 steps (output = FBA
        # for good; also with the head's gain frozen; docs/benchmarks.md).
        mean = burst.mean(dim=1)
        if self.cfg.uses_fba:
            if guide is None:
                guide = fba(burst)
            elif guide.shape != (burst.shape[0], 3, h, w):
                raise ValueError(f"guide must be (B, 3, H, W) = {(burst.shape[0], 3, h, w)}, got {tuple(guide.shape)}")
        if self.cfg.fba_cue:  # from the frames alone, before the guide may join them
            if cue is None:
                cue = misalignment_cue(burst)
            elif cue.shape != (burst.shape[0], 1, h, w):
                raise ValueError(f"cue must be (B, 1, H, W) = {(burst.shape[0], 1, h, w)}, got {tuple(cue.shape)}")
        if self.cfg.guide == "fba":
            burst = torch.cat([burst, guide.to(burst.dtype).unsqueeze(1).expand(-1, n, -1, -1, -1)], dim=2)  # (B, N, 6, H, W)

        # replicate (not reflect) padding also works for images smaller than the padding
        p = self.cfg.multiple
        x = burst.flatten(0, 1) - 0.5  # zero-centred inputs suit ELU
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p), mode="replicate")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        x = self.stem(x)
        if self.cfg.geometry == "reference":  # mark the reference frame's track: (B*N, C, H, W), frame 0 of each burst
            y = x.unflatten(0, (-1, n))
            y = torch.cat([y[:, :1] + self.reference_embed.view(1, 1, -1, 1, 1), y[:, 1:]], dim=1)
            x = same_format(y.flatten(0, 1), x)
        x = F.elu(x, inplace=True)
        skips = []
        for encoder in self.encoders:
            x = encoder(x, n)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1])):
            x = decoder(x, n, skip)  # on cat([upsample(x), skip])
        pooled = frame_max(x, n)
        if self.cfg.base in ("select", "select_fba"):  # softmax over the frames, in float32 also under autocast
            exact = torch.promote_types(mean.dtype, torch.float32)
            logits = self.select(x)[..., :h, :w].to(exact).unflatten(0, (-1, n))  # (B, N, 1, H, W)
            candidates = burst[:, :, :3].to(exact)
            if self.cfg.base == "select_fba":  # FBA is candidate N + 1
                fba_logit = self.select_fba(pooled)[..., :h, :w].to(exact)
                if self.cfg.fba_cue:
                    fba_logit = fba_logit + self.select_cue(cue.to(exact)).to(exact)
                logits = torch.cat([logits, fba_logit.unsqueeze(1)], dim=1)
                candidates = torch.cat([candidates, guide.to(exact).unsqueeze(1)], dim=1)
            base = (torch.softmax(logits, dim=1) * candidates).sum(dim=1).to(mean.dtype)
        else:
            base = mean
        x = self.head(pooled)
        return base + x[..., :h, :w]


def build_model(cfg: ModelConfig) -> BurstDeblurNet:
    return BurstDeblurNet(cfg)


# ----------------------------------------------------------------------------- checkpoints


# The pretrained model shipped in git (models/README.md is its card): what `deblur` and
# `evaluate` use when no --checkpoint is given. In the repository's models/, or in the installed
# package's copy (common.bundled), whatever the current directory.
SHIPPED = bundled("models") / "burst-deblur.pt"


def default_checkpoint(checkpoint: str | Path | None) -> Path:
    """``checkpoint``, or the shipped model when it is None (FileNotFoundError if that is missing)."""
    if checkpoint is not None:
        return Path(checkpoint)
    if not SHIPPED.is_file():
        raise FileNotFoundError(f"no --checkpoint given and no shipped model at {SHIPPED} (run `make pretrained`)")
    return SHIPPED


def _strip_prefixes(state: dict) -> dict:
    """Drop the key prefixes torch.compile ('_orig_mod.') and DDP ('module.') add."""
    out = {}
    for key, value in state.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def load(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a training checkpoint, in eval mode, on ``device``.

    The checkpoint is a dict saved by torch.save with at least ``model`` (a state dict) and
    ``config`` (the resolved train config as a plain dict whose ``model`` key is a ModelConfig
    dict), read by ``trainer.checkpoint.load_checkpoint`` (weights_only=True). Anything else
    raises a one-line CheckpointError (a ValueError) naming the file.
    """
    path = Path(checkpoint_path)

    def bad(reason: str) -> ValueError:
        return CheckpointError(path, reason)

    ckpt = load_checkpoint(path, INFERENCE_KEYS)  # the one load policy (trainer/checkpoint.py)
    try:
        cfg = from_dict(ModelConfig, ckpt["config"]["model"], "model")
        cfg.validate()
    except ConfigError as e:
        raise bad(f"bad model config: {e}") from None

    model = build_model(cfg)
    state = _strip_prefixes(ckpt["model"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise bad(f"state dict does not match the model config: {what} "
                  f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, value in expected.items():
        if not isinstance(state[key], Tensor) or state[key].shape != value.shape:
            got = tuple(state[key].shape) if isinstance(state[key], Tensor) else type(state[key]).__name__
            raise bad(f"{key} has shape {got}, the model config expects {tuple(value.shape)}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
