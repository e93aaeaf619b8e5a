"""The permutation-invariant U-Net and the training loss: shapes, invariances, checkpoints."""

import copy
import dataclasses
import math

import pytest
import torch

from pipeline.config import ConfigError, load_config
from trainer.losses import burst_loss
from trainer.fba import fba
from trainer.model import BurstDeblurNet, ModelConfig, SetConv, build_model, frame_max, load

SMALL = dict(width=8, mults=[1, 2, 3])  # 3 levels: pads to a multiple of 4


def make_model(seed=0, dtype=torch.float32, **kw):
    # module init draws from the global generator and takes no Generator argument: seed it inside
    # fork_rng so the state seen by other tests is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(ModelConfig(**{**SMALL, **kw})).to(dtype)


def rand_burst(shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def save_checkpoint(path, model, **extra):
    cfg = {"train": {"steps": 10, "batch_size": 2, "seed": 0}, "model": dataclasses.asdict(model.cfg)}
    torch.save({"model": model.state_dict(), "config": cfg, "step": 10, **extra}, path)


# ----------------------------------------------------------------------------- shapes and config


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("hw", [(37, 50), (32, 32), (5, 3)])
def test_output_shape_any_n_any_size(n, hw):
    model = make_model()
    burst = rand_burst((2, n, 3, *hw))
    with torch.no_grad():
        out = model(burst)
    assert out.shape == (2, 3, *hw)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_paper_size_channels():
    model = build_model(ModelConfig())
    assert [e.set_conv.conv.out_channels for e in model.encoders] == [64, 128, 256, 384]
    assert model.decoders[-1].set_conv.conv.out_channels == 96  # round(64 * 1.5)
    # the set convs see [frame ; max over frames]: twice the incoming channels
    assert model.encoders[1].set_conv.conv.in_channels == 2 * 64
    assert model.decoders[0].set_conv.conv.in_channels == 2 * (384 + 256)


def test_bad_burst_shape_raises():
    model = make_model()
    with pytest.raises(ValueError, match="B, N, 3, H, W"):
        model(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="B, N, 3, H, W"):
        model(torch.rand(1, 0, 3, 16, 16))
    with pytest.raises(ValueError, match="float in"):
        model(torch.zeros(1, 2, 3, 16, 16, dtype=torch.uint8))


def test_config_from_toml_and_validation(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text("width = 16\nmults = [1, 2]\nfused = false\n")
    cfg = load_config(ModelConfig, path)
    assert cfg == ModelConfig(width=16, mults=[1, 2], fused=False)
    with pytest.raises(ConfigError, match="model.mults"):
        load_config(ModelConfig, None, ["mults=[1]"])
    with pytest.raises(ConfigError, match="model.convs_per_block"):
        load_config(ModelConfig, None, ["convs_per_block=0"])
    with pytest.raises(ConfigError, match="unknown key 'depth'"):
        load_config(ModelConfig, None, ["depth=3"])


def test_no_batch_statistics_anywhere():
    model = build_model(ModelConfig())
    stats_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm,
                   torch.nn.LocalResponseNorm)
    assert not [m for m in model.modules() if isinstance(m, stats_types)]
    assert not list(model.buffers())  # running means/vars would be buffers
    # and train/eval mode do not change the output
    small = make_model()
    burst = rand_burst((2, 3, 3, 16, 16))
    with torch.no_grad():
        a = small.train()(burst)
        b = small.eval()(burst)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_permutation_invariance(dtype, atol):
    model = make_model(dtype=dtype)
    burst = rand_burst((2, 5, 3, 37, 50), dtype=dtype)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        a = model(burst)
        b = model(burst[:, perm])
    assert (a - b).abs().max().item() <= atol
    # and the frames do matter: dropping one changes the output
    with torch.no_grad():
        c = model(burst[:, :4])
    assert (a - c).abs().max().item() > 1e-3


def test_reference_geometry_is_invariant_to_the_order_of_the_other_frames():
    model = make_model(geometry="reference", dtype=torch.float64)
    with torch.no_grad():
        model.reference_embed.copy_(torch.linspace(-1, 1, model.reference_embed.numel()))
        burst = rand_burst((2, 5, 3, 24, 20), dtype=torch.float64)
        a = model(burst)
        b = model(burst[:, [0, 3, 1, 4, 2]])  # frame 0 stays the reference
        c = model(burst[:, [2, 0, 1, 3, 4]])  # another frame becomes the reference
    assert (a - b).abs().max().item() <= 1e-12
    assert (a - c).abs().max().item() > 1e-4


def test_fba_guided_model_is_invariant_and_sees_the_guide():
    model = make_model(guide="fba", dtype=torch.float64)
    assert model.stem.in_channels == 6  # each frame beside the burst's FBA
    burst = rand_burst((2, 5, 3, 37, 50), dtype=torch.float64)
    with torch.no_grad():
        a = model(burst)
        b = model(burst[:, [3, 0, 4, 2, 1]])
        # the FBA of a larger window, given, replaces the one computed from the burst
        given = model(burst, fba(burst))
        other = model(burst, fba(burst[:, :3]))
        # the head still corrects the mean of the frames: at a zero last conv the output is the mean
        model.head[-1].parametrizations.weight.original0.zero_()
        bare = model(burst)
    assert (a - b).abs().max().item() <= 1e-12
    assert torch.equal(given, a)
    assert (other - a).abs().max().item() > 1e-4
    torch.testing.assert_close(bare, burst.mean(dim=1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="guide must be"):
        model(burst, fba(burst)[..., :-1])


def test_checkpoints_without_a_guide_key_load_unguided(tmp_path):
    model = make_model()
    path = tmp_path / "old.pt"
    cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in ("guide", "base")}
    torch.save({"model": model.state_dict(), "config": {"model": cfg}, "step": 1}, path)
    assert load(path).cfg.guide == "none" and load(path).cfg.base == "mean"
    with pytest.raises(ConfigError, match="model.guide must be"):
        ModelConfig(guide="mean").validate()


def test_select_base_starts_as_the_mean_and_is_invariant():
    """model.base = "select": at init (zero logits) the output is the "mean" model's with the same
    weights; with other logits it moves away from it and stays invariant to the frame order; the
    head still adds a correction to the base (zero last conv and zero logits: the mean)."""
    mean_model = make_model(dtype=torch.float64)
    model = make_model(dtype=torch.float64, base="select")
    missing, unexpected = model.load_state_dict(mean_model.state_dict(), strict=False)
    assert set(missing) == {"select.weight", "select.bias"} and not unexpected
    burst = rand_burst((2, 5, 3, 37, 50), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(burst), mean_model(burst), rtol=0, atol=1e-12)
        model.select.weight.normal_(generator=torch.Generator().manual_seed(3))
        a, b = model(burst), model(burst[:, [3, 0, 4, 2, 1]])
        assert (a - b).abs().max().item() <= 1e-12
        assert (a - mean_model(burst)).abs().max().item() > 1e-3
        model.head[-1].parametrizations.weight.original0.zero_()
        model.select.weight.zero_()
        torch.testing.assert_close(model(burst), burst.mean(dim=1), rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="model.base must be"):
        ModelConfig(base="max").validate()


def test_select_fba_base_weighs_fba_as_one_more_candidate():
    """model.base = "select_fba": a "select" model's weights load into it (only the FBA logit's
    conv is new); its output is invariant to the frame order; with FBA's logit far above the
    frames' and no correction it is exactly the burst's FBA, far below them exactly the "select"
    model's output; with one frame FBA is the frame, so the candidate changes nothing."""
    select = make_model(dtype=torch.float64, base="select")
    model = make_model(dtype=torch.float64, base="select_fba")
    assert model.cfg.uses_fba and not select.cfg.uses_fba
    with torch.no_grad():
        select.select.weight.normal_(generator=torch.Generator().manual_seed(3))
    missing, unexpected = model.load_state_dict(select.state_dict(), strict=False)
    assert set(missing) == {"select_fba.weight", "select_fba.bias"} and not unexpected
    burst = rand_burst((2, 5, 3, 37, 50), dtype=torch.float64)
    with torch.no_grad():
        model.select_fba.weight.normal_(generator=torch.Generator().manual_seed(4))
        a, b = model(burst), model(burst[:, [3, 0, 4, 2, 1]])
        assert (a - b).abs().max().item() <= 1e-12
        assert (a - select(burst)).abs().max().item() > 1e-3
        torch.testing.assert_close(model(burst[:, :1]), select(burst[:, :1]), rtol=0, atol=1e-12)
        model.select_fba.weight.zero_()
        model.select_fba.bias.fill_(-1e3)  # FBA's weight exp(-1000): the "select" model
        torch.testing.assert_close(model(burst), select(burst), rtol=0, atol=1e-12)
        guide = rand_burst((2, 3, 37, 50), seed=5, dtype=torch.float64)  # a given guide is used as it is
        model.select_fba.bias.fill_(1e3)
        model.head[-1].parametrizations.weight.original0.zero_()
        torch.testing.assert_close(model(burst), fba(burst), rtol=0, atol=1e-12)
        torch.testing.assert_close(model(burst, guide), guide, rtol=0, atol=1e-12)
    assert model.stem.parametrizations.weight.original1.shape[1] == 3  # FBA is no input channel here


def test_fba_cue_grows_a_select_fba_model_and_moves_fba_s_weight_with_the_shift():
    """model.fba_cue: a "select_fba" model's weights load into it (only the cue's 1x1 conv is
    new, at zero: the same output); it stays invariant to the frame order; a given cue is used
    as it is; a negative weight on the cue lowers FBA's share where the frames are shifted."""
    plain = make_model(dtype=torch.float64, base="select_fba")
    model = make_model(dtype=torch.float64, base="select_fba", fba_cue=True)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"select_cue.weight", "select_cue.bias"} and not unexpected
    burst = rand_burst((2, 5, 3, 37, 50), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(burst), plain(burst), rtol=0, atol=1e-12)
        model.select_cue.weight.fill_(-1.0)
        a, b = model(burst), model(burst[:, [3, 0, 4, 2, 1]])
        assert (a - b).abs().max().item() <= 1e-10
        assert (a - plain(burst)).abs().max().item() > 1e-4
        model.select_fba.weight.zero_()
        model.head[-1].parametrizations.weight.original0.zero_()
        plain.head[-1].parametrizations.weight.original0.zero_()
        model.select.weight.zero_()
        plain.select.weight.zero_()
        plain.select_fba.weight.zero_()
        # a cue of log 1 px^2 adds 0 to FBA's logit, log 0.01 adds +4.6: FBA's share rises
        shifted, registered = torch.zeros(2, 1, 37, 50), torch.full((2, 1, 37, 50), math.log(0.01))
        torch.testing.assert_close(model(burst, cue=shifted.double()), plain(burst), rtol=0, atol=1e-12)
        fba_image = fba(burst)
        closer = (model(burst, cue=registered.double()) - fba_image).abs().mean()
        assert closer < (plain(burst) - fba_image).abs().mean() / 2
        with pytest.raises(ValueError, match="cue must be"):
            model(burst, cue=shifted[:, :, :10])
    with pytest.raises(ConfigError, match="model.fba_cue needs"):
        ModelConfig(base="select", fba_cue=True).validate()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fused_equals_plain_for_the_same_weights(dtype, atol):
    fused = make_model(dtype=dtype, fused=True)
    plain = make_model(seed=1, dtype=dtype, fused=False)
    plain.load_state_dict(fused.state_dict(), strict=True)  # one parameterization for both forms
    burst = rand_burst((2, 4, 3, 21, 30), dtype=dtype)
    with torch.no_grad():
        a, b = fused(burst), plain(burst)
    assert (a - b).abs().max().item() <= atol
    # gradients agree too
    grads = []
    for model in (fused, plain):
        model.zero_grad()
        model(burst).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4 if dtype == torch.float32 else 1e-10,
                               atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_conv_of_the_upsampling_equals_upsample_cat_conv(channels_last):
    """forward_phases (2x2 phase kernels on the low-res features) against what it replaces, values
    and gradients, at odd sizes where a phase's border taps matter most."""
    n, c, cskip = 3, 5, 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = SetConv(c + cskip, 6).double()
        with torch.no_grad():
            conv.conv.bias.normal_()
    low = rand_burst((2 * n, c, 5, 7), dtype=torch.float64)
    skip = rand_burst((2 * n, cskip, 10, 14), seed=1, dtype=torch.float64)
    if channels_last:
        low, skip = (t.contiguous(memory_format=torch.channels_last) for t in (low, skip))
    outs, grads = [], []
    for fast in (True, False):
        a, b = low.clone().requires_grad_(), skip.clone().requires_grad_()
        if fast:
            y = conv.forward_phases(a, b, n)
        else:
            y = conv(torch.cat([torch.nn.functional.interpolate(a, scale_factor=2, mode="nearest"), b], dim=1), n)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append((a.grad, b.grad, conv.conv.parametrizations.weight.original1.grad.clone()))
        conv.zero_grad()
    assert outs[0].shape == (2 * n, 6, 10, 14)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    for g_fast, g_ref in zip(*grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="does not match"):
        conv.forward_phases(low, skip[:, :, :9], n)


def test_inference_and_training_forwards_agree():
    """Under no_grad the decoders take forward_phases, with autograd the plain upsample-and-cat:
    the same network either way, at a size whose levels are odd after padding."""
    model = make_model(dtype=torch.float64, width=4, mults=[1, 2, 3, 4])
    burst = rand_burst((2, 3, 3, 37, 50), dtype=torch.float64)
    with torch.no_grad():
        fast = model(burst)
    plain = model(burst)
    assert plain.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, plain.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_frame_max_equals_max_dim_values_and_gradients(dtype, channels_last):
    n = 5
    x = rand_burst((3 * n, 4, 7, 6), dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = rand_burst((3, 4, 7, 6), seed=1, dtype=dtype)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = frame_max(ours, n)
    expected = ref.unflatten(0, (-1, n)).max(dim=1).values
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours.grad, ref.grad)  # random values: no ties, so the same arg-max frames
    with torch.no_grad():
        assert torch.equal(frame_max(x, n), expected)


def test_frame_max_sends_a_tied_pixel_gradient_to_one_frame():
    x = rand_burst((2, 3, 1, 4, 4))
    x[:, 2] = x[:, 0]  # frames 0 and 2 of each burst tie everywhere; frame 1 wins where larger
    x = x.flatten(0, 1).requires_grad_()
    grad = rand_burst((2, 1, 4, 4), seed=1)
    frame_max(x, 3).backward(grad)
    g = x.grad.unflatten(0, (-1, 3))
    torch.testing.assert_close(g.sum(dim=1), grad, rtol=0, atol=0)  # each pixel's gradient once
    assert torch.all(g[:, 2] == 0)  # ties go to the first frame
    assert torch.all((g != 0).sum(dim=1) == 1)


def test_batch_independence():
    model = make_model()
    burst = rand_burst((3, 4, 3, 24, 20))
    with torch.no_grad():
        together = model(burst)
        alone = model(burst[1:2])
        other = burst.clone()
        other[0], other[2] = rand_burst((4, 3, 24, 20), seed=5), rand_burst((4, 3, 24, 20), seed=6)
        changed_neighbours = model(other)
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(changed_neighbours[1], together[1], rtol=0, atol=1e-5)


def test_padding_is_cropped_back_in_place():
    # 37×50 is padded to 40×52 (a multiple of 4 for 3 levels) at the bottom and right; the
    # output must be the top-left crop of the output for that padded burst, not a shifted one
    model = make_model()
    burst = rand_burst((1, 2, 3, 37, 50))
    padded = torch.nn.functional.pad(burst.flatten(0, 1), (0, 2, 0, 3), mode="replicate").unflatten(0, (1, 2))
    with torch.no_grad():
        out = model(burst)
        out_padded = model(padded)
    torch.testing.assert_close(out, out_padded[..., :37, :50], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training signal


def test_gradients_flow_to_every_parameter():
    model = make_model()
    burst = rand_burst((2, 3, 3, 16, 16))
    target = rand_burst((2, 3, 16, 16), seed=1)
    burst_loss(model(burst), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_a_few_adam_steps_reduce_the_loss():
    model = make_model()
    burst = rand_burst((2, 3, 3, 16, 16))
    target = burst[:, 0] ** 2  # a fixed, learnable map of the frames
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = burst_loss(model(burst), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_channels_last_gives_the_same_output():
    model = make_model()
    burst = rand_burst((2, 3, 3, 20, 24))
    with torch.no_grad():
        a = model(burst)
        converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
        b = converted(burst)
    assert converted.channels_last and not model.channels_last
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(tmp_path):
    model = make_model(fused=False)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer={"state": {}, "param_groups": []})
    loaded = load(path)
    assert isinstance(loaded, BurstDeblurNet)
    assert not loaded.training
    assert loaded.cfg == model.cfg
    burst = rand_burst((1, 3, 3, 19, 23))
    with torch.no_grad():
        torch.testing.assert_close(loaded(burst), model(burst), rtol=0, atol=0)


def test_export_keeps_weights_and_config_but_no_optimizer(tmp_path):
    from trainer.export import export

    model = make_model()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer={"state": {}, "param_groups": []}, best_val_psnr=30.5)
    out = tmp_path / "model.pt"
    info = export(path, out)
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert "optimizer" not in saved and saved["step"] == 10 and saved["best_val_psnr"] == 30.5
    assert set(saved["versions"]) >= {"torch", "numpy", "code"} and info["versions"] == saved["versions"]
    burst = rand_burst((1, 3, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(load(out)(burst), model(burst), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a burst-deblur checkpoint"):
        export(tmp_path / "missing.pt", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_default_checkpoint_is_the_shipped_model(tmp_path, monkeypatch):
    import trainer.model as model_mod

    assert model_mod.default_checkpoint(tmp_path / "given.pt") == tmp_path / "given.pt"
    monkeypatch.setattr(model_mod, "SHIPPED", tmp_path / "models" / "burst-deblur.pt")
    with pytest.raises(FileNotFoundError, match="no --checkpoint given and no shipped model at .*make pretrained"):
        model_mod.default_checkpoint(None)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "burst-deblur.pt").write_bytes(b"x")
    assert model_mod.default_checkpoint(None) == tmp_path / "models" / "burst-deblur.pt"


def test_load_strips_compile_and_ddp_prefixes(tmp_path):
    model = make_model()
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "config": {"model": dataclasses.asdict(model.cfg)}}, path)
    burst = rand_burst((1, 2, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(load(path)(burst), model(burst), rtol=0, atol=0)


def one_line_value_error(path):
    with pytest.raises(ValueError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not a burst-deblur checkpoint (")
    return message


def test_load_rejects_non_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    assert "torch.load failed" in one_line_value_error(text)

    assert "no such file" in one_line_value_error(tmp_path / "missing.pt")

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    assert "'model'" in one_line_value_error(tensor)

    no_config = tmp_path / "no_config.pt"
    torch.save({"model": make_model().state_dict()}, no_config)
    assert "'config'" in one_line_value_error(no_config)

    bad_config = tmp_path / "bad_config.pt"
    torch.save({"model": {}, "config": {"model": {"width": 8, "depth": 3}}}, bad_config)
    assert "unknown key 'model.depth'" in one_line_value_error(bad_config)

    # weights of another model size: a clear mismatch, not a multi-line RuntimeError
    model = make_model()
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"model": model.state_dict(), "config": {"model": {**dataclasses.asdict(model.cfg), "width": 16}}},
               mismatched)
    assert "shape" in one_line_value_error(mismatched)

    fewer_levels = tmp_path / "fewer_levels.pt"
    torch.save({"model": model.state_dict(), "config": {"model": {**dataclasses.asdict(model.cfg), "mults": [1, 2]}}},
               fewer_levels)
    assert "unexpected key" in one_line_value_error(fewer_levels)


# ----------------------------------------------------------------------------- loss


def test_burst_loss_zero_for_identical_images():
    x = rand_burst((2, 3, 8, 9))
    loss = burst_loss(x, x.clone())
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == 0.0


def test_burst_loss_by_hand():
    # one channel, 2×3: d = pred − target = [[1, 0, 2], [0, 0, -1]]
    target = torch.zeros(1, 1, 2, 3)
    pred = torch.tensor([[[[1.0, 0.0, 2.0], [0.0, 0.0, -1.0]]]])
    l1 = (1 + 0 + 2 + 0 + 0 + 1) / 6
    gx = (abs(0 - 1) + abs(2 - 0) + abs(0 - 0) + abs(-1 - 0)) / 4  # along W
    gy = (abs(0 - 1) + abs(0 - 0) + abs(-1 - 2)) / 3  # along H
    expected = 0.1 * l1 + gx + gy
    assert burst_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    # a constant offset is penalised by the pixel term only
    assert burst_loss(target + 0.25, target).item() == pytest.approx(0.025, rel=1e-6)


def test_burst_loss_float32_for_bf16_inputs_and_bad_shapes():
    x = rand_burst((1, 3, 6, 6))
    y = rand_burst((1, 3, 6, 6), seed=1)
    loss = burst_loss(x.bfloat16(), y)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(burst_loss(x.bfloat16().float(), y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        burst_loss(x, y[..., :5])
    with pytest.raises(ValueError, match="H, W >= 2"):
        burst_loss(x[..., :1], y[..., :1])
