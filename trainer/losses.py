"""The training loss of Aittala & Durand: 0.1·L1 of pixels + L1 of image gradients."""

from __future__ import annotations

import torch
from torch import Tensor


def burst_loss(pred: Tensor, target: Tensor) -> Tensor:
    """0.1·mean|pred − target| + mean|∂x pred − ∂x target| + mean|∂y pred − ∂y target|.

    pred: float (B, 3, H, W), the network output (unclamped, any float dtype, e.g. bf16 under
    autocast); target: float (B, 3, H, W) in [0, 1], same colour space as pred (sRGB-encoded in
    this project). H, W >= 2. ∂x, ∂y are forward differences between neighbouring pixels, each
    L1 term is a mean over its own elements. Computed in float32 whatever the input dtypes
    (bf16 differences of nearby pixel values lose most of their bits). Returns a float32 scalar.

    The gradient term is what makes the result sharp: a pixel L1 alone is content with a
    slightly blurred edge, while a blurred edge has much weaker gradients than the target's.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred and target must both be (B, C, H, W) of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[-2] < 2 or pred.shape[-1] < 2:
        raise ValueError(f"burst_loss needs H, W >= 2 for image gradients, got {tuple(pred.shape)}")
    diff = pred.float() - target.float()
    # the gradient of the difference is the difference of the gradients (forward differences are linear)
    dx = diff[..., :, 1:] - diff[..., :, :-1]
    dy = diff[..., 1:, :] - diff[..., :-1, :]
    return 0.1 * diff.abs().mean() + dx.abs().mean() + dy.abs().mean()
