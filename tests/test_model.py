"""Config validation, output shapes, and parameter / FLOP counts against a hand count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vpn import VideoPixelNetwork, VPNConfig
from vpn.metrics import bernoulli_cross_entropy, bernoulli_lower_bound, grey_targets


# -- the hand count -------------------------------------------------------------------------------
def conv(cin: int, cout: int, k: int | tuple[int, int], bias: bool = True) -> tuple[int, int]:
    """(parameters, multiply-adds per pixel) of a k x k (or kh x kw) convolution."""
    kh, kw = (k, k) if isinstance(k, int) else k
    return cin * cout * kh * kw + (cout if bias else 0), cin * cout * kh * kw


def hand_count(cfg: VPNConfig) -> tuple[int, int]:
    """Parameters and multiply-adds per pixel, from the paper's description, not from the code.

    RMB on 2c channels: 1x1 2c->c, MU(c) = one 3x3 conv c->4c, MU again, 1x1 c->2c.
    Encoder: 3x3 stem C->2c then k RMBs. ConvLSTM: 3x3 on [x, h] -> 4L (bias once).
    Decoder: mask-A 3x3 C->2c, 1x1 context L->2c for the input and each of the l blocks, l RMBs,
    head 1x1 2c->2c and 1x1 2c->C*K.
    ReLU block (block="relu"): 1x1 2c->c, one 3x3 c->c, 1x1 c->2c.
    Baseline (decoder="baseline"): the same decoder without its mask-A frame input.
    Stacks (decoder="stacks"): every 3x3 conv of a decoder block becomes a 2x3 conv in the vertical
    stack's copy of the block and a 1x2 conv in the horizontal stack's; the frame enters through a
    2x3 C->2c and a 1x2 C->2c; the context 1x1 gives both stacks their l+1 biases (L->2*2c*(l+1));
    each block adds a 1x1 link 2c->2c (no bias) from the vertical stack to the horizontal.
    """
    C, c, L, l = cfg.image_channels, cfg.mu_channels, cfg.lstm_channels, cfg.dec_blocks
    K = 256 if cfg.output == "categorical" else 1

    def block(k: int | tuple[int, int]) -> list[tuple[int, int]]:
        if cfg.block == "rmb":
            return [conv(2 * c, c, 1), conv(c, 4 * c, k), conv(c, 4 * c, k), conv(c, 2 * c, 1)]
        return [conv(2 * c, c, 1), conv(c, c, k), conv(c, 2 * c, 1)]

    layers = [conv(C, 2 * c, 3)] + block(3) * cfg.enc_blocks
    layers += [conv(2 * c, 4 * L, 3), conv(L, 4 * L, 3, bias=False)]
    if cfg.decoder == "stacks":
        layers += [conv(C, 2 * c, (2, 3)), conv(C, 2 * c, (1, 2)), conv(L, 2 * 2 * c * (l + 1), 1)]
        layers += (block((2, 3)) + block((1, 2)) + [conv(2 * c, 2 * c, 1, bias=False)]) * l
    else:
        layers += [conv(C, 2 * c, 3)] if cfg.decoder == "pixelcnn" else []
        layers += [conv(L, 2 * c * (l + 1), 1)] + block(3) * l
    layers += [conv(2 * c, 2 * c, 1), conv(2 * c, C * K, 1)]
    return sum(p for p, _ in layers), sum(m for _, m in layers)


@pytest.mark.parametrize("preset", ["full", "mini", "micro"])
@pytest.mark.parametrize("colours,output", [(1, "categorical"), (1, "bernoulli"), (3, "categorical")])
def test_parameter_count_matches_hand_count(preset, colours, output):
    cfg = VPNConfig.preset(preset, image_channels=colours, output=output)
    params, _ = hand_count(cfg)
    assert VideoPixelNetwork(cfg).num_parameters() == params


@pytest.mark.parametrize(
    "block,decoder",
    [("relu", "pixelcnn"), ("rmb", "baseline"), ("relu", "baseline"), ("rmb", "stacks"), ("relu", "stacks")],
)
@pytest.mark.parametrize("preset", ["full", "micro"])
@pytest.mark.parametrize("colours,output", [(1, "bernoulli"), (3, "categorical")])
def test_ablation_options_count_like_the_hand_count(preset, block, decoder, colours, output):
    """Parameters and FLOPs of the paper's ablation rows, against the hand count."""
    cfg = VPNConfig.preset(preset, block=block, decoder=decoder, image_channels=colours, output=output, dilation=True)
    params, macs = hand_count(cfg)
    model = VideoPixelNetwork(cfg)
    assert model.num_parameters() == params
    assert model.flops_per_frame(64, 64) == 2 * macs * 64 * 64


def test_relu_block_is_pixelcnns_residual_block():
    """x + up(relu(conv3(relu(down(relu(x)))))), computed by hand from the block's own weights."""
    import torch.nn.functional as F

    from vpn.layers import ResidualReLUBlock

    torch.manual_seed(0)
    block = ResidualReLUBlock(
        8,
        lambda i, o, k: torch.nn.Conv2d(i, o, k, padding=k // 2),
        lambda i, o, k: torch.nn.Conv2d(i, o, k, padding=k // 2),
    )
    x = torch.randn(2, 8, 5, 5)
    h = F.conv2d(F.relu(x), block.down.weight, block.down.bias)
    h = F.conv2d(F.relu(h), block.spatial.weight, block.spatial.bias, padding=1)
    h = F.conv2d(F.relu(h), block.up.weight, block.up.bias)
    torch.testing.assert_close(block(x), x + h)
    assert block.spatial.weight.shape == (4, 4, 3, 3)  # c -> c at c = half of the 2c stream


def test_preset_widths_follow_the_blog_post():
    full, mini, micro = (VPNConfig.preset(n) for n in ("full", "mini", "micro"))
    assert (full.enc_blocks, full.dec_blocks, full.mu_channels, full.residual_channels, full.lstm_channels) == (
        8,
        12,
        128,
        256,
        256,
    )
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
        ({"enc_blocks": 0}, "enc_blocks"),
        ({"dec_blocks": 0}, "dec_blocks"),
        ({"dec_blocks": 2.5}, "dec_blocks"),
        ({"filter_fraction": 0.0}, "filter_fraction"),
        ({"filter_fraction": 1.5}, "filter_fraction"),
        ({"filter_fraction": float("nan")}, "filter_fraction"),
        ({"image_channels": 2}, "image_channels"),
        ({"output": "gaussian"}, "output"),
        ({"block": "gated"}, "block"),
        ({"decoder": "transformer"}, "decoder"),
        ({"filter_fraction": 0.001}, "filter_fraction"),  # c = 0
        ({"filter_fraction": 2 / 128, "image_channels": 3}, "filter_fraction"),  # c = 2 < 3 colours
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
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.enc_blocks = 3  # type: ignore[misc]
    assert VPNConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.encoder_dilations() == (1, 2, 4, 8)
    assert VPNConfig.preset("full", dilation=True).encoder_dilations() == (1, 2, 4, 8, 1, 2, 4, 8)


@pytest.mark.parametrize("decoder", ["pixelcnn", "stacks"])
@pytest.mark.parametrize("enc,dec,frac", [(1, 1, 1 / 128), (3, 5, 0.3), (9, 2, 0.05), (8, 12, 1.0)])
def test_any_sweep_point_builds(enc, dec, frac, decoder):
    cfg = VPNConfig(enc_blocks=enc, dec_blocks=dec, filter_fraction=frac, image_channels=1, decoder=decoder)
    model = VideoPixelNetwork(cfg)
    assert model.num_parameters() == hand_count(cfg)[0]


# -- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["pixelcnn", "stacks"])
@pytest.mark.parametrize("colours,output", [(1, "categorical"), (3, "categorical"), (1, "bernoulli"), (3, "bernoulli")])
def test_forward_and_nll_shapes(colours, output, decoder):
    cfg = VPNConfig.preset("micro", filter_fraction=8 / 128, image_channels=colours, output=output, decoder=decoder)
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


@pytest.mark.parametrize("preset", ["full", "mini", "micro"])
def test_stacks_cost_about_the_masked_decoders_parameters(preset):
    """The claim in StacksDecoder's docstring: with RMBs, at equal depth and width, the stacks hold
    5-7% more decoder parameters than the masked decoder, so the sweeps compare them at (nearly)
    matched size."""
    with torch.device("meta"):
        plain, stacks = (VideoPixelNetwork(VPNConfig.preset(preset, decoder=d)) for d in ("pixelcnn", "stacks"))
    ratio = sum(p.numel() for p in stacks.decoder.parameters()) / sum(p.numel() for p in plain.decoder.parameters())
    assert 1.04 < ratio < 1.08
    assert 1.0 < stacks.num_parameters() / plain.num_parameters() < 1.04


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
        torch.testing.assert_close(
            bernoulli_lower_bound(frames, context=context).double(),
            per_frame[:, context:].mean(dim=1),
            rtol=1e-5,
            atol=1e-5,
        )
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
