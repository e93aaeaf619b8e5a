"""Tiled inference (trainer.tiling): the receptive field sets the overlap, tiled equals untiled,
out-of-memory halves the batch, tiles cover the image on the model's stride grid."""

import numpy as np
import pytest
import torch

from common.errors import UserError
from tests.bursts import make_model
from trainer.model import ModelConfig
from trainer.tiling import auto_overlap, receptive_radius, run_tiled, tile_starts


def test_receptive_radius_sets_the_overlap():
    # 4 levels, 2 convs per block: 40 px; margins of overlap/2 - 8 >= 40 -> 96 (a multiple of 8)
    assert receptive_radius(ModelConfig()) == 40
    assert auto_overlap(ModelConfig()) == 96
    assert receptive_radius(ModelConfig(width=8, mults=[1, 2, 3])) < 40


def test_tiled_equals_untiled():
    # With the automatic overlap every output pixel comes from a tile holding its whole receptive
    # field, and tile origins sit on the model's stride grid: the same numbers as one pass, up to
    # float rounding (measured 2e-7). 150x170 in 128-px tiles: 2x3 tiles of two sizes per axis.
    model = make_model()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (150, 170, 3), dtype=np.uint8) for _ in range(3)]
    whole = run_tiled(model, frames, tile=512)
    tiled = run_tiled(model, frames, tile=128, batch=2)
    assert np.abs(tiled - whole).max() < 1e-5
    # the overlap is what makes this work: a thin one shows the tile seams (measured ~0.06)
    thin = run_tiled(model, frames, tile=128, overlap=16)
    assert np.abs(thin - whole).max() > 1e-3
    # and one untiled pass is the model itself
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255)[None]
    with torch.no_grad():
        direct = model(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(whole, direct, atol=1e-6)


def test_guided_model_tiled_equals_untiled():
    # An FBA-guided model gets the FBA of the whole burst, cut like the frames: tiles see what one
    # pass over the whole image sees, so the overlap rule holds as for the plain model.
    model = make_model(guide="fba")
    assert receptive_radius(model.cfg) == receptive_radius(ModelConfig(width=8))
    assert_tiled_equals_untiled(model, seed=2)


def assert_tiled_equals_untiled(model, seed):
    """128-px tiles of a 150x170 burst of 3 frames give one whole pass's output, which is the model's."""
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (150, 170, 3), dtype=np.uint8) for _ in range(3)]
    whole = run_tiled(model, frames, tile=512)
    tiled = run_tiled(model, frames, tile=128, batch=2)
    assert np.abs(tiled - whole).max() < 1e-5
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255)[None]
    with torch.no_grad():
        direct = model(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(whole, direct, atol=1e-6)


def test_select_base_model_tiled_equals_untiled():
    # model.base = "select": the frame weights come from the tracks' last features through one 3x3
    # conv, inside the field of the head's two (the probe measures it); trained-like, non-zero logits
    model = make_model(base="select")
    with torch.no_grad():
        model.select.weight.normal_(generator=torch.Generator().manual_seed(1))
    assert receptive_radius(model.cfg) == receptive_radius(ModelConfig(width=8))
    assert_tiled_equals_untiled(model, seed=3)


class OutOfMemoryAboveOne(torch.nn.Module):
    """Wraps a model; a batch of more than one tile 'runs out of GPU memory'."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls = model, model.cfg, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_halves_the_batch():
    model = make_model()
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (120, 150, 3), dtype=np.uint8) for _ in range(2)]
    wrapped = OutOfMemoryAboveOne(model)
    out = run_tiled(wrapped, frames, tile=112, batch=4)
    assert max(wrapped.calls) == 4 and wrapped.calls[-1] == 1
    np.testing.assert_array_equal(out, run_tiled(model, frames, tile=112, batch=1))


def test_tiles_cover_with_overlap_on_the_stride_grid():
    for length in (97, 150, 513, 1000, 1024, 3000, 4000):
        for tile, overlap in ((128, 96), (512, 96), (256, 32)):
            tiles = tile_starts(length, tile, overlap, 8)
            assert tiles[0][0] == 0 and tiles[-1][1] == length
            assert all(s % 8 == 0 and e - s <= max(tile + 7, length if len(tiles) == 1 else 0) for s, e in tiles)
            assert all(a_end - b_start >= overlap for (_, a_end), (b_start, _) in zip(tiles, tiles[1:]))
    assert tile_starts(200, 256, 96, 8) == [(0, 200)]
    # balanced: 4000 px in 512-px tiles computes 22% twice, not the 28% of a fixed stride
    assert sum(e - s for s, e in tile_starts(4000, 512, 96, 8)) <= 1.23 * 4000
    with pytest.raises(ValueError, match="must exceed"):
        tile_starts(1000, 100, 96, 8)


def test_out_of_memory_on_one_tile_is_a_user_error():
    class AlwaysOutOfMemory(OutOfMemoryAboveOne):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    frames = [np.zeros((120, 150, 3), np.uint8)] * 2
    with pytest.raises(UserError, match="out of GPU memory on a single .* tile of 2 frames; use a smaller --tile"):
        run_tiled(AlwaysOutOfMemory(make_model()), frames, tile=112, batch=2)


def test_bf16_on_cpu_stays_close_to_fp32():
    # bf16 autocast runs on the CPU too (AVX512-BF16/AMX make it faster there); it only rounds:
    # the shipped model's 1 MP x 8 burst moved by well under 1/255 (docs/benchmarks.md)
    model = make_model()
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (96, 112, 3), dtype=np.uint8) for _ in range(3)]
    fp32 = run_tiled(model, frames, tile=512)
    bf16 = run_tiled(model, frames, tile=512, precision="bf16")
    assert bf16.dtype == np.float32 and 0 < np.abs(bf16 - fp32).max() < 0.05


def test_select_fba_base_model_tiled_equals_untiled():
    # model.base = "select_fba": FBA is one more candidate of the per-pixel softmax; the tiles get
    # the FBA of the whole burst, so they blend what one pass blends (a weight that matters: bias 0)
    model = make_model(base="select_fba")
    with torch.no_grad():
        model.select.weight.normal_(generator=torch.Generator().manual_seed(1))
        model.select_fba.weight.normal_(generator=torch.Generator().manual_seed(2))
        model.select_fba.bias.zero_()
    assert receptive_radius(model.cfg) == receptive_radius(ModelConfig(width=8))
    assert_tiled_equals_untiled(model, seed=4)


def test_fba_cue_model_tiled_equals_untiled():
    # model.fba_cue: the cue is summed over cells, so a tile would read other cells than the whole
    # burst; the tiles get the cue of the whole burst, cut like the frames (a weight that matters)
    model = make_model(base="select_fba", fba_cue=True)
    with torch.no_grad():
        model.select.weight.normal_(generator=torch.Generator().manual_seed(1))
        model.select_fba.weight.normal_(generator=torch.Generator().manual_seed(2))
        model.select_fba.bias.zero_()
        model.select_cue.weight.fill_(-1.0)
    assert receptive_radius(model.cfg) == receptive_radius(ModelConfig(width=8))
    assert_tiled_equals_untiled(model, seed=5)
