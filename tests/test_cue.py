"""The misalignment cue (trainer/cue.py): it reads the frames' shifts, not their blur."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.cue import FLOOR, cue_frames, misalignment_cue


def smooth_image(size=160, seed=0):
    """A band-limited random image in [0.1, 0.9], (3, size, size): edges at every position."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[0]
    return 0.1 + 0.8 * (x - x.min()) / (x.max() - x.min())


def interior(cue, margin=24):
    return cue[..., margin:-margin, margin:-margin]


def test_the_cue_reads_the_mean_squared_shift_of_the_frames():
    image = smooth_image()
    shifts = [(0, 0), (1, 0), (0, -1), (1, 1), (-1, 0)]  # (dy, dx) px
    burst = torch.stack([torch.roll(image, s, dims=(1, 2)) for s in shifts])[None]
    d = np.asarray(shifts, float)
    expected = ((d - d.mean(axis=0)) ** 2).sum(axis=1).mean()  # px^2 around the frames' mean position
    read = math.exp(interior(misalignment_cue(burst)).median().item()) - FLOOR
    assert read == pytest.approx(expected, rel=0.3)
    twice = torch.stack([torch.roll(image, (2 * a, 2 * b), dims=(1, 2)) for a, b in shifts])[None]
    assert interior(misalignment_cue(twice)).median() > interior(misalignment_cue(burst)).median() + 0.8  # ~4x


def test_registered_frames_read_as_registered_whatever_their_blur():
    """Different centred kernels (a horizontal, a vertical, a diagonal streak, a disk) and noise
    change the frames far more than a 1 px shift would, but not their first moment."""
    image = smooth_image(seed=1)
    g = torch.Generator().manual_seed(2)
    kernels = torch.zeros(4, 1, 9, 9)
    kernels[0, 0, 4, :] = 1
    kernels[1, 0, :, 4] = 1
    kernels[2, 0] = torch.eye(9)
    yy, xx = torch.meshgrid(torch.arange(9) - 4, torch.arange(9) - 4, indexing="ij")
    kernels[3, 0] = ((yy ** 2 + xx ** 2) <= 9).float()
    kernels /= kernels.sum(dim=(2, 3), keepdim=True)
    frames = [F.conv2d(F.pad(image[:, None], (4, 4, 4, 4), mode="replicate"), k[None]).squeeze(1) for k in kernels]
    burst = torch.stack([f + 0.01 * torch.randn(f.shape, generator=g) for f in frames])[None]
    registered = math.exp(interior(misalignment_cue(burst)).median().item())
    assert registered < 0.1  # px^2: a 1 px shift of one frame in four reads ~0.75
    blur_change = interior((burst[0, 0] - burst[0, 1]).abs()).mean()
    shift_change = interior((image - torch.roll(image, 1, dims=2)).abs()).mean()
    assert blur_change > shift_change


def test_the_cue_is_symmetric_in_the_frames_and_flat_for_one_frame():
    image = smooth_image(size=64, seed=3)
    burst = torch.stack([torch.roll(image, (i, -i), dims=(1, 2)) for i in range(4)])[None].expand(2, -1, -1, -1, -1)
    cue = misalignment_cue(burst)
    assert cue.shape == (2, 1, 64, 64) and cue.dtype == torch.float32
    torch.testing.assert_close(misalignment_cue(burst[:, [2, 0, 3, 1]]), cue, rtol=0, atol=1e-5)
    torch.testing.assert_close(misalignment_cue(burst[:, :1]), torch.full_like(cue, math.log(FLOOR)))


def test_cue_frames_of_uint8_frames_equals_the_cue_of_the_burst():
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(3)]
    burst = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255)[None]
    torch.testing.assert_close(cue_frames(frames), misalignment_cue(burst), rtol=0, atol=1e-4)  # log scale
