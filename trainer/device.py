"""Devices and the one conversion of stored pixels into model input, shared by train, evaluate
and deblur.

Device names have one vocabulary everywhere (config key ``train.device``, ``--device`` flags):
``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
"""

from __future__ import annotations

import torch

from common.errors import UserError


class DeviceError(UserError):
    """An unknown or unavailable device; the message is one line."""


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """``name`` -> a torch.device; DeviceError naming ``what`` (the flag or config key) when the
    name is unknown or CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise DeviceError(f"{what} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got '{name}'")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{what} = '{name}' but no CUDA device is available")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{what} = '{name}' but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def burst_to_input(burst: torch.Tensor, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
    """uint8 bursts (B, N, H, W, 3) as stored (sRGB, channels last) -> the model's input: float32
    (B, N, 3, H, W) in [0, 1] on ``device``. The copy to the device moves uint8 (4x less than
    float); the conversion runs there. The result is a channels-last view in memory; call
    ``.contiguous()`` where a contiguous tensor is wanted."""
    return burst.to(device, non_blocking=non_blocking).permute(0, 1, 4, 2, 3).float().div_(255)


def image_to_target(image: torch.Tensor, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
    """Images (B, H, W, 3), uint8 or float on the 0..255 scale -> float32 (B, 3, H, W) in [0, 1]
    on ``device``. Not in place: a float input may be the caller's array."""
    return image.to(device, non_blocking=non_blocking).permute(0, 3, 1, 2).float() / 255
