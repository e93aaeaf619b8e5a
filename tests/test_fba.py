"""Fourier Burst Accumulation in torch (trainer/fba.py): the numpy reference's numbers, frame by
frame for large bursts, full precision under autocast, symmetric in the frames."""

import numpy as np
import pytest
import torch

from trainer import fba as fba_mod
from trainer.baselines import fba as reference_fba
from trainer.fba import fba, fba_frames


def as_torch(burst: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) -> (1, N, 3, H, W)"""
    return torch.from_numpy(burst).permute(0, 3, 1, 2)[None]


@pytest.mark.parametrize("shape", [(5, 48, 48, 3), (3, 37, 50, 3), (3, 40, 33, 3), (2, 7, 300, 3), (2, 5, 3, 3)])
def test_equals_the_numpy_reference(shape):
    burst = np.random.default_rng(0).random(shape)
    ours = fba(as_torch(burst))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, reference_fba(burst), atol=1e-12)


def test_one_frame_is_the_frame_and_the_order_does_not_matter():
    burst = torch.rand(2, 6, 3, 40, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(fba(burst[:, :1]), burst[:, 0])
    torch.testing.assert_close(fba(burst[:, [4, 2, 0, 5, 1, 3]]), fba(burst), atol=1e-12, rtol=0)
    # a batch is its bursts one by one
    torch.testing.assert_close(fba(burst)[1:], fba(burst[1:]), atol=1e-12, rtol=0)


def test_frames_one_at_a_time_match_the_batch(monkeypatch):
    frames = [np.random.default_rng(i).integers(0, 256, (64, 80, 3), dtype=np.uint8) for i in range(4)]
    whole = fba(as_torch(np.stack(frames)).float() / 255)
    kept = fba_frames(frames)
    monkeypatch.setattr(fba_mod, "KEEP_SPECTRA", 0)  # a full-resolution burst: each frame transformed twice
    twice = fba_frames(frames)
    assert kept.dtype == torch.float32 and kept.shape == (1, 3, 64, 80)
    torch.testing.assert_close(kept, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(twice, kept, atol=1e-6, rtol=0)
    assert float((whole - torch.from_numpy(frames[0]).permute(2, 0, 1).float().div(255)).abs().max()) > 0.05


def test_full_precision_under_bf16_autocast():
    burst = torch.rand(1, 4, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    plain = fba(burst)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fba(burst)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, atol=1e-6, rtol=0)
