"""Kernel properties: non-negative, sum 1, centroid at the centre, size follows the scale."""

import dataclasses

import numpy as np
import pytest

from pipeline.config import ImagingConfig, KernelConfig
from pipeline.kernels import build_kernels, kernel_radius, sample_kernel_params, splat, trajectories


def make(seed, cfg=KernelConfig(), frames=8, K=51, misalign=None):
    """misalign: None (registered frames) or an ImagingConfig."""
    params, draws = sample_kernel_params(np.random.default_rng(seed), cfg, frames, misalign)
    return params, build_kernels(params, draws, cfg, K)


@pytest.mark.parametrize("seed", range(5))
def test_kernels_are_normalized_nonnegative_and_centred(seed):
    _, (k, traj, fit) = make(seed)
    assert k.shape == (8, 51, 51) and k.dtype == np.float32
    assert traj.shape == (8, 128, 2)
    assert (k >= 0).all()
    np.testing.assert_allclose(k.sum(axis=(1, 2)), 1.0, atol=1e-5)
    y, x = np.mgrid[:51, :51]
    cx = (k * x).sum(axis=(1, 2))
    cy = (k * y).sum(axis=(1, 2))
    assert np.abs(cx - 25).max() < 0.5 and np.abs(cy - 25).max() < 0.5
    assert all(0 < f <= 1 for f in fit)


def test_trajectory_is_centred_and_standardized():
    rng = np.random.default_rng(0)
    t = trajectories(rng.standard_normal((3, 128, 2)), rng.standard_normal((3, 2)), 0.9)
    np.testing.assert_allclose(t.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt((t**2).sum(axis=2).mean(axis=1)), 1, rtol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 0.5, 0.9, 0.99])
def test_trajectory_integrates_the_damped_velocity_recurrence(damping):
    """v_t = d·v_{t-1} + a_t from the stationary v_{-1} = v0 / sqrt(1 - d²), summed, centred and
    standardized: the closed form in ``trajectories`` against the plain loop."""
    rng = np.random.default_rng(1)
    accel, v0 = rng.standard_normal((4, 64, 2)), rng.standard_normal((4, 2))
    v = v0 / np.sqrt(1.0 - damping**2)
    pos, p = [], np.zeros((4, 2))
    for t in range(64):
        v = damping * v + accel[:, t]
        p = p + v
        pos.append(p)
    pos = np.stack(pos, axis=1)
    pos -= pos.mean(axis=1, keepdims=True)
    pos /= np.sqrt((pos**2).sum(axis=2).mean(axis=1))[:, None, None]
    np.testing.assert_allclose(trajectories(accel, v0, damping), pos, atol=1e-12)


@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0])
def test_kernel_size_follows_the_configured_scale(scale):
    cfg = KernelConfig(scale_min=scale, scale_max=scale, mixed_prob=0.0, uniform_min=1.0,
                       uniform_max=1.0, defocus_max=0.0)
    params, (k, _, fit) = make(3, cfg, frames=6)
    assert params["blur_scale"] == pytest.approx(scale)
    assert min(fit) == 1.0
    r = kernel_radius(k)
    # bilinear splatting adds at most ~0.5 px of spread on top of the path's RMS radius
    np.testing.assert_allclose(r, scale, atol=0.5)


def test_mixed_bursts_mix_sharp_and_blurred_frames():
    cfg = KernelConfig(mixed_prob=1.0, mixed_min=0.1, mixed_max=2.0, scale_min=3, scale_max=3)
    params, (k, _, _) = make(1, cfg, frames=32)
    r = kernel_radius(k)
    assert params["mixed"] and r.max() / r.min() > 4


def test_oversized_paths_are_shrunk_to_fit():
    cfg = KernelConfig(scale_min=20, scale_max=20, mixed_prob=0, uniform_min=1, uniform_max=1)
    _, (k, _, fit) = make(2, cfg, K=21)
    assert max(fit) < 1
    assert k[:, 0, :].sum() == 0 and k[:, -1, :].sum() == 0 and k[:, :, 0].sum() == 0


def test_splat_conserves_mass_and_first_moment():
    pts = np.array([[[0.3, -1.7], [2.25, 0.5], [-3.0, 1.0]]])
    k = splat(pts, 11)
    y, x = np.mgrid[:11, :11]
    assert k.sum() == pytest.approx(1.0)
    assert (k * x).sum() == pytest.approx(5 + pts[0, :, 0].mean())
    assert (k * y).sum() == pytest.approx(5 + pts[0, :, 1].mean())


def test_misalignment_moves_the_centroid_by_the_drawn_shift():
    params, (k, _, _) = make(4, misalign=ImagingConfig(misalign_px=1.0, outlier_prob=0.0), frames=4)
    y, x = np.mgrid[:51, :51]
    shift = np.asarray(params["shift"])
    assert (shift[0] == 0).all() and (shift[1:] != 0).all()  # frame 0 is the reference
    np.testing.assert_allclose((k * x).sum(axis=(1, 2)) - 25, shift[:, 0], atol=1e-4)
    np.testing.assert_allclose((k * y).sum(axis=(1, 2)) - 25, shift[:, 1], atol=1e-4)


def test_outlier_frames_are_shifted_and_blurred_more_but_never_the_reference():
    im = ImagingConfig(misalign_px=0.3, misalign_max_px=20.0, outlier_prob=0.5, outlier_shift_px=5.0, outlier_blur=3.0)
    shifts, outliers = {True: [], False: []}, 0
    for seed in range(40):
        params, _ = make(seed, misalign=im, frames=8)
        plain, _ = sample_kernel_params(np.random.default_rng(seed), KernelConfig(), 8, None)
        assert params["outlier"][0] is False
        for f, is_out in enumerate(params["outlier"]):
            shifts[is_out].append(np.abs(params["shift"][f]).max())
            ratio = params["frame_factors"][f] / plain["frame_factors"][f]
            assert ratio == pytest.approx(3.0 if is_out else 1.0)
        outliers += sum(params["outlier"])
    assert 0.35 < outliers / (40 * 7) < 0.65
    assert np.median(shifts[True]) > 4 * np.median(shifts[False][40:])


def test_registered_bursts_have_no_shift_and_change_no_other_draw():
    """imaging.registered_prob: that share of bursts is perfectly registered (as misalign=None);
    every burst's other parameters and raw draws are those of registered_prob = 0."""
    im = ImagingConfig(outlier_prob=0.3)
    registered = 0
    for seed in range(60):
        base, base_draws = sample_kernel_params(np.random.default_rng(seed), KernelConfig(), 8, im)
        params, draws = sample_kernel_params(np.random.default_rng(seed), KernelConfig(), 8,
                                             dataclasses.replace(im, registered_prob=0.4))
        plain, _ = sample_kernel_params(np.random.default_rng(seed), KernelConfig(), 8, None)
        assert params["blur_scale"] == base["blur_scale"] and params["defocus"] == base["defocus"]
        assert np.array_equal(draws.accel, base_draws.accel) and np.array_equal(draws.jitter, base_draws.jitter)
        if params["shift"] == base["shift"]:  # not drawn as registered: the burst is unchanged
            assert params == base
        else:
            registered += 1
            assert params == plain  # no shift, no outlier, no outlier blur
    assert 0.25 < registered / 60 < 0.55
    assert make(0, misalign=dataclasses.replace(im, registered_prob=1.0), frames=8)[0]["shift"] == [[0.0, 0.0]] * 8


@pytest.mark.parametrize("K", [15, 51])
def test_large_shifts_never_push_mass_out_of_the_kernel(K):
    """A shift near or past the bitmap's room is clipped, not wrapped or lost: every kernel sums
    to 1, keeps its border empty, and has its centroid at the (clipped) shift."""
    cfg = KernelConfig(scale_max=2.0)
    y, x = np.mgrid[:K, :K]
    for seed in range(20):
        params, draws = sample_kernel_params(np.random.default_rng(seed), cfg, 6, None)
        params["shift"] = (np.random.default_rng(seed).normal(0, K / 3, (6, 2))).tolist()  # far too large
        k, _, fit = build_kernels(params, draws, cfg, K)
        assert np.isfinite(k).all() and (k >= 0).all()
        np.testing.assert_allclose(k.sum(axis=(1, 2)), 1.0, atol=1e-5)
        assert k[:, 0].sum() == 0 and k[:, -1].sum() == 0 and k[:, :, 0].sum() == 0 and k[:, :, -1].sum() == 0
        room = K // 2 - 2
        want = np.clip(np.asarray(params["shift"]), -room, room)
        np.testing.assert_allclose((k * x).sum(axis=(1, 2)) - K // 2, want[:, 0], atol=1e-3)
        np.testing.assert_allclose((k * y).sum(axis=(1, 2)) - K // 2, want[:, 1], atol=1e-3)


def test_params_hold_json_values_and_the_raw_draws_are_apart():
    """sample_kernel_params' params go to the sample's json as they are; the raw arrays, drawn
    last from the stream, come apart as ShakeDraws (standard normal, float64)."""
    import json

    from pipeline.kernels import ShakeDraws

    cfg = KernelConfig()
    rng = np.random.default_rng(6)
    params, draws = sample_kernel_params(rng, cfg, 5, ImagingConfig())
    assert json.loads(json.dumps(params)) == params
    assert isinstance(draws, ShakeDraws)
    assert draws.accel.shape == (5, cfg.steps, 2) and draws.v0.shape == (5, 2)
    assert draws.jitter.shape == (5, cfg.steps, cfg.jitter_points, 2)
    assert all(a.dtype == np.float64 for a in (draws.accel, draws.v0, draws.jitter))
    after = rng.standard_normal()  # the stream goes on after the draws
    rng = np.random.default_rng(6)
    again, redrawn = sample_kernel_params(rng, cfg, 5, ImagingConfig())
    assert again == params and np.array_equal(redrawn.jitter, draws.jitter) and rng.standard_normal() == after


def test_render_params_are_json_only():
    """render.sample_params: every value of params is plain JSON (the sample's json holds them
    all); nothing starting with "_" is left to filter out."""
    import json

    from pipeline import render
    from tests.conftest import tiny_config

    cfg = tiny_config()
    params, draws = render.sample_params(np.random.default_rng(1), cfg)
    assert json.loads(json.dumps(params)) == params and not any(k.startswith("_") for k in params)
    assert {"gamma", "shot_noise", "read_noise", "blur_scale", "shift"} <= set(params)
    assert draws.accel.shape[0] == cfg.dataset.frames


def test_same_generator_state_same_kernels():
    _, (a, _, _) = make(11)
    _, (b, _, _) = make(11)
    _, (c, _, _) = make(12)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_loguniform_is_log_uniform_and_uniform_from_zero():
    """pipeline.distributions.loguniform, shared by the kernel and the noise samplers."""
    from pipeline.distributions import loguniform

    x = loguniform(np.random.default_rng(0), 0.01, 1.0, 20000)
    assert x.min() >= 0.01 and x.max() <= 1.0
    assert np.mean(x < 0.1) == pytest.approx(0.5, abs=0.02)  # each decade holds half
    z = loguniform(np.random.default_rng(0), 0.0, 1.0, 20000)
    assert np.mean(z < 0.5) == pytest.approx(0.5, abs=0.02)
    assert isinstance(float(loguniform(np.random.default_rng(0), 0.1, 1.0)), float)
