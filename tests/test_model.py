"""Config validation, output shapes, and parameter / FLOP counts against a hand count."""

from __future__ import annotations

import pytest
import torch

from vpn import VPNConfig, VideoPixelNetwork
from vpn.metrics import bernoulli_cross_entropy, bernoulli_lower_bound, grey_targets


# -- the hand count -------------------------------------------------------------------------------
def conv(cin: int, cout: int, k: int, bias: bool = True) -> tuple[int, int]:
    """(parameters, multiply-adds per pixel) of a k x k convolution."""
    return cin * cout * k * k + (cout if bias else 0), cin * cout * k * k


def hand_count(cfg: VPNConfig) -> tuple[int, int]:
    """Parameters and multiply-adds per pixel, from the paper's description, not from the code.

    RMB on 2c channels: 1x1 2c->c, MU(c) = one 3x3 conv c->4c, MU again, 1x1 c->2c.
    Encoder: 3x3 stem C->2c then k RMBs. ConvLSTM: 3x3 on [x, h] -> 4L (bias once).
    Decoder: mask-A 3x3 C->2c, 1x1 context L->2c for the input and each of the l blocks, l RMBs,
    head 1x1 2c->2c and 1x1 2c->C*K.
    """
    C, c, L = cfg.image_channels, cfg.mu_channels, cfg.lstm_channels
    K = 256 if cfg.output == "categorical" else 1
    rmb = [conv(2 * c, c, 1), conv(c, 4 * c, 3), conv(c, 4 * c, 3), conv(c, 2 * c, 1)]
    layers = [conv(C, 2 * c, 3)] + rmb * cfg.enc_blocks
    layers += [conv(2 * c, 4 * L, 3), conv(L, 4 * L, 3, bias=False)]
    layers += [conv(C, 2 * c, 3), conv(L, 2 * c * (cfg.dec_blocks + 1), 1)] + rmb * cfg.dec_blocks
    layers += [conv(2 * c, 2 * c, 1), conv(2 * c, C * K, 1)]
    return sum(p for p, _ in layers), sum(m for _, m in layers)


@pytest.mark.parametrize("preset", ["full", "mini", "micro"])
@pytest.mark.parametrize("colours,output", [(1, "categorical"), (1, "bernoulli"), (3, "categorical")])
def test_parameter_count_matches_hand_count(preset, colours, output):
    cfg = VPNConfig.preset(preset, image_channels=colours, output=output)
    params, _ = hand_count(cfg)
    assert VideoPixelNetwork(cfg).num_parameters() == params


def test_preset_widths_follow_the_blog_post():
    full, mini, micro = (VPNConfig.preset(n) for n in ("full", "mini", "micro"))
    assert (full.enc_blocks, full.dec_blocks, full.mu_channels, full.residual_channels, full.lstm_channels) == (8, 12, 128, 256, 256)
    assert (mini.enc_blocks, mini.dec_blocks, mini.mu_channels, mini.lstm_channels) == (4, 6, 32, 64)
    assert (micro.enc_blocks, micro.dec_blocks, micro.mu_channels, micro.lstm_channels) == (2, 3, 32, 64)
    assert full.matching_preset() == "full" and VPNConfig(enc_blocks=5).matching_preset() is None


@pytest.mark.parametrize("preset", ["full", "micro"])
def test_flops_per_frame_matches_hand_count(preset):
    cfg = VPNConfig.preset(preset)
    _, macs = hand_count(cfg)
    assert VideoPixelNetwork(cfg).flops_per_frame(64, 64) == 2 * macs * 64 * 64
    assert VideoPixelNetwork(cfg).flops_per_frame(32, 16) == 2 * macs * 32 * 16


def test_full_model_costs_about_200_gflop_per_frame():
    """The issue's order of magnitude for the full model at 64x64 (forward)."""
    flops = VideoPixelNetwork(VPNConfig.preset("full")).flops_per_frame(64, 64)
    assert 150e9 < flops < 300e9


# -- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(enc_blocks=0), "enc_blocks"),
        (dict(dec_blocks=0), "dec_blocks"),
        (dict(dec_blocks=2.5), "dec_blocks"),
        (dict(filter_fraction=0.0), "filter_fraction"),
        (dict(filter_fraction=1.5), "filter_fraction"),
        (dict(filter_fraction=float("nan")), "filter_fraction"),
        (dict(image_channels=2), "image_channels"),
        (dict(output="gaussian"), "output"),
        (dict(filter_fraction=0.001), "filter_fraction"),  # c = 0
        (dict(filter_fraction=2 / 128, image_channels=3), "filter_fraction"),  # c = 2 < 3 colours
    ],
)
def test_impossible_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        VPNConfig.preset("micro", **overrides)


def test_unknown_keys_and_presets_are_rejected():
    with pytest.raises(ValueError, match="dec_blokcs"):
        VPNConfig.from_dict({"dec_blokcs": 3})
    with pytest.raises(ValueError, match="nano"):
        VPNConfig.preset("nano")
    with pytest.raises(ValueError, match="n_resnet"):
        VPNConfig.preset("micro", n_resnet=3)


def test_config_is_frozen_and_round_trips():
    cfg = VPNConfig.preset("mini", output="bernoulli", dilation=True)
    with pytest.raises(Exception):
        cfg.enc_blocks = 3  # type: ignore[misc]
    assert VPNConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.encoder_dilations() == (1, 2, 4, 8)
    assert VPNConfig.preset("full", dilation=True).encoder_dilations() == (1, 2, 4, 8, 1, 2, 4, 8)


@pytest.mark.parametrize("enc,dec,frac", [(1, 1, 1 / 128), (3, 5, 0.3), (9, 2, 0.05), (8, 12, 1.0)])
def test_any_sweep_point_builds(enc, dec, frac):
    cfg = VPNConfig(enc_blocks=enc, dec_blocks=dec, filter_fraction=frac, image_channels=1)
    model = VideoPixelNetwork(cfg)
    assert model.num_parameters() == hand_count(cfg)[0]


# -- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("colours,output", [(1, "categorical"), (3, "categorical"), (1, "bernoulli"), (3, "bernoulli")])
def test_forward_and_nll_shapes(colours, output):
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, image_channels=colours, output=output)
    model = VideoPixelNetwork(cfg)
    frames = torch.randint(0, 256, (2, 4, colours, 5, 7), dtype=torch.uint8)
    logits = model(frames)
    expected = (2, 3, colours, 256, 5, 7) if output == "categorical" else (2, 3, colours, 5, 7)
    assert logits.shape == expected and logits.dtype == torch.float32
    nll = model.nll(frames, context=2)
    assert nll.shape == (2,) and torch.all(nll > 0)
    # nll is the mean over frames context..T-1 of the per-frame sums
    per = model.frame_nll(logits, frames)
    torch.testing.assert_close(nll, per[:, 1:].mean(dim=1))


def test_bad_frames_are_rejected():
    model = VideoPixelNetwork(VPNConfig.preset("micro", filter_fraction=8 / 128))
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="frames must be"):
        model(torch.zeros(1, 3, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="context"):
        model.nll(torch.zeros(1, 3, 1, 4, 4, dtype=torch.uint8), context=3)


# -- the metric ------------------------------------------------------------------------------------
def test_bernoulli_nll_is_the_papers_sum():
    """- sum [z log y + (1-z) log(1-y)] over pixels, z = x/255, y = sigmoid(logit), by hand."""
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, output="bernoulli")
    model = VideoPixelNetwork(cfg)
    frames = torch.randint(0, 256, (1, 3, 1, 4, 4), dtype=torch.uint8)
    logits = model(frames).double()
    z = frames[:, 1:].double() / 255
    y = torch.sigmoid(logits)
    by_hand = -(z * torch.log(y) + (1 - z) * torch.log(1 - y)).sum(dim=(2, 3, 4)).mean(dim=1)
    torch.testing.assert_close(model.nll(frames, context=1).double(), by_hand, rtol=1e-5, atol=1e-4)


def test_lower_bound_is_the_nll_of_the_targets_themselves():
    frames = torch.randint(0, 256, (3, 5, 1, 4, 4), dtype=torch.uint8)
    frames[0, :, :, 0] = 0  # z = 0 and z = 1 exactly: 0 log 0 = 0
    frames[0, :, :, 1] = 255
    z = frames.double() / 255
    ent = -(torch.xlogy(z, z) + torch.xlogy(1 - z, 1 - z))[:, 2:].sum(dim=(2, 3, 4)).mean(dim=1)
    torch.testing.assert_close(bernoulli_lower_bound(frames, context=2).double(), ent, rtol=1e-5, atol=1e-5)
    # and no model does better than the bound: any logits score >= the entropy
    logits = torch.randn(3, 3, 1, 4, 4)
    nll = bernoulli_cross_entropy(z[:, 2:].float(), logits=logits).sum(dim=(2, 3, 4)).mean(dim=1)
    assert torch.all(nll >= bernoulli_lower_bound(frames, context=2) - 1e-4)


@pytest.mark.parametrize("colours", [1, 3])
def test_categorical_nll_is_minus_log_softmax_at_the_target(colours):
    """- sum over colours and pixels of log softmax(logits)[x], the mean over frames context..T-1, by hand.
    The frames use every intensity, so a target read at the wrong index (e.g. 255 - x) would show."""
    torch.manual_seed(0)
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, image_channels=colours, output="categorical")
    model = VideoPixelNetwork(cfg)
    frames = torch.randint(0, 256, (2, 4, colours, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(frames).double()  # (B, T-1, C, 256, H, W)
        nll = model.nll(frames, context=2).double()
    log_p = torch.log_softmax(logits, dim=3)
    target = frames[:, 1:].long().unsqueeze(3)  # (B, T-1, C, 1, H, W)
    per_frame = -log_p.gather(3, target).squeeze(3).sum(dim=(2, 3, 4))  # (B, T-1)
    by_hand = per_frame[:, 1:].mean(dim=1)  # frames 2..3, each given every frame before it
    torch.testing.assert_close(nll, by_hand, rtol=1e-5, atol=1e-4)


def test_lower_bound_context_range_and_default():
    """Any context in [0, T) is scored (0: every frame, as the data stage may ask), T or more is
    refused naming both numbers, and the default is the paper's 10 frames of context."""
    frames = torch.randint(0, 256, (2, 20, 1, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    z = frames.double() / 255
    per_frame = -(torch.xlogy(z, z) + torch.xlogy(1 - z, 1 - z)).sum(dim=(2, 3, 4))  # (B, T)
    for context in (0, 1, 10, 19):
        torch.testing.assert_close(bernoulli_lower_bound(frames, context=context).double(), per_frame[:, context:].mean(dim=1), rtol=1e-5, atol=1e-5)
    assert torch.equal(bernoulli_lower_bound(frames), bernoulli_lower_bound(frames, context=10))
    for context in (20, -1):
        with pytest.raises(ValueError, match=rf"context={context} must be in \[0, T\) for T=20"):
            bernoulli_lower_bound(frames, context=context)


def test_metric_arguments_are_checked():
    with pytest.raises(TypeError, match="frames must be uint8, got torch.float32"):
        grey_targets(torch.zeros(2, 2))
    z = torch.full((2, 2), 0.5)
    for kwargs in ({}, {"logits": z, "probs": z}):
        with pytest.raises(ValueError, match="give exactly one of logits= or probs="):
            bernoulli_cross_entropy(z, **kwargs)
