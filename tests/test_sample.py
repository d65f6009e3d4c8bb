"""Sampling: shapes, seeds, true draws (not argmax), and the fast sampler against the naive reference."""

from __future__ import annotations

import pytest
import torch

from vpn import VPNConfig, VideoPixelNetwork
from vpn.sample import sample_video


def tiny(colours: int = 1, output: str = "categorical", seed: int = 0, **kw) -> VideoPixelNetwork:
    torch.manual_seed(seed)
    return VideoPixelNetwork(VPNConfig.preset("micro", filter_fraction=8 / 128, image_channels=colours, output=output, **kw)).eval()


def known_sequence(colours: int = 1, t: int = 4, size: int = 6) -> torch.Tensor:
    """A bright square moving right by one pixel a frame: uint8 (1, t, colours, size, size)."""
    seq = torch.zeros(1, t, colours, size, size, dtype=torch.uint8)
    for k in range(t):
        seq[0, k, :, 1:4, k : k + 3] = 255
    return seq


@pytest.mark.parametrize("colours,output", [(1, "categorical"), (1, "bernoulli"), (3, "categorical")])
def test_sample_shape_dtype_and_seed(colours, output):
    model = tiny(colours, output)
    context = known_sequence(colours).repeat(2, 1, 1, 1, 1)  # a batch of 2
    video = model.sample(context[:, :3], 2, generator=torch.Generator().manual_seed(7))
    assert video.shape == (2, 2, colours, 6, 6) and video.dtype == torch.uint8
    again = model.sample(context[:, :3], 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(video, again)
    other = model.sample(context[:, :3], 2, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(video, other)
    if output == "bernoulli":
        assert set(video.unique().tolist()) <= {0, 255}
    assert model.training is False


@pytest.mark.parametrize(
    "colours,output,dilation,block,decoder",
    [(1, "categorical", False, "rmb", "pixelcnn"), (3, "categorical", True, "rmb", "pixelcnn"),
     (1, "bernoulli", False, "rmb", "pixelcnn"), (1, "categorical", False, "relu", "pixelcnn"),
     (3, "categorical", True, "relu", "pixelcnn"), (3, "bernoulli", False, "relu", "pixelcnn"),
     (1, "categorical", False, "rmb", "stacks"), (3, "categorical", True, "rmb", "stacks"),
     (1, "bernoulli", False, "relu", "stacks"), (3, "categorical", False, "relu", "stacks")],
)  # fmt: skip
def test_cached_sampler_equals_naive_reference(colours, output, dilation, block, decoder):
    """Same context and seed: the same logits at every drawn position, so the same video."""
    model = tiny(colours, output, seed=3, dilation=dilation, block=block, decoder=decoder)
    context = torch.randint(0, 256, (2, 2, colours, 5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fast_logits, slow_logits = [], []
    fast = sample_video(model, context, 2, torch.Generator().manual_seed(1), method="cached", record_logits=fast_logits)
    slow = sample_video(model, context, 2, torch.Generator().manual_seed(1), method="naive", record_logits=slow_logits)
    assert len(fast_logits) == len(slow_logits) == 2 * colours * 5 * 6
    for a, b in zip(fast_logits, slow_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("decoder", ["pixelcnn", "stacks"])
def test_sampled_frame_is_scored_consistently(decoder):
    """The sampler's logits for a frame are the forward pass's logits on the sampled frame."""
    model = tiny(1, "categorical", seed=5, decoder=decoder)
    context = known_sequence()[:, :2]
    recorded: list[torch.Tensor] = []
    video = sample_video(model, context, 1, torch.Generator().manual_seed(2), record_logits=recorded)
    with torch.no_grad():
        logits = model(torch.cat([context, video], dim=1))[0, -1, 0]  # (256, H, W) for the new frame
    expected = logits.permute(1, 2, 0).reshape(-1, 256)  # raster order
    torch.testing.assert_close(torch.cat(recorded), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("colours,output", [(1, "bernoulli"), (3, "categorical")])
def test_baseline_draws_a_frame_from_one_pass(colours, output):
    """decoder="baseline": the sampler's logits are the forward pass's on any frame (the frame does
    not enter), the same for both methods, and the seed fixes the video."""
    model = tiny(colours, output, seed=6, decoder="baseline", block="relu")
    context = known_sequence(colours)[:, :2].repeat(2, 1, 1, 1, 1)
    recorded: list[torch.Tensor] = []
    video = sample_video(model, context, 2, torch.Generator().manual_seed(3), record_logits=recorded)
    naive = sample_video(model, context, 2, torch.Generator().manual_seed(3), method="naive")
    assert torch.equal(video, naive) and video.shape == (2, 2, colours, 6, 6)
    with torch.no_grad():
        logits = model(torch.cat([context, video], dim=1))  # (B, 3, C, K, H, W) or (B, 3, C, H, W)
    k = 256 if output == "categorical" else 1
    logits = logits.reshape(2, 3, colours, k, 6, 6)
    for f in range(2):  # frame f of the video is predicted by column 1 + f
        expected = logits[:, 1 + f].permute(3, 4, 1, 0, 2).reshape(-1, 2, k)  # (H*W*C, B, K) raster, colour
        got = torch.stack(recorded[f * 36 * colours : (f + 1) * 36 * colours])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_draws_follow_the_distribution_not_argmax():
    """The first pixel of a new frame depends only on the context: draw it 4000 times and compare
    the frequency of 255 with the model's own sigmoid probability (a 5-sigma binomial bound)."""
    model = tiny(1, "bernoulli", seed=11)
    with torch.no_grad():
        model.decoder.head_out.bias.fill_(0.4)  # p well inside (0, 1), so argmax would always pick one side
    n = 4000
    context = known_sequence(size=3)[:, :1].repeat(n, 1, 1, 1, 1)
    video = model.sample(context, 1, generator=torch.Generator().manual_seed(0))
    freq = (video[:, 0, 0, 0, 0] == 255).double().mean().item()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.cat([context[:1], context[:1]], dim=1))[0, 0, 0, 0, 0]).item()
    assert 0.05 < p < 0.95
    assert abs(freq - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_temperature_and_argument_errors():
    model = tiny()
    context = known_sequence()[:, :2]
    with pytest.raises(ValueError, match="temperature"):
        model.sample(context, 1, temperature=0.0)
    with pytest.raises(ValueError, match="n_frames"):
        model.sample(context, 0)
    with pytest.raises(ValueError, match="method"):
        model.sample(context, 1, method="argmax")
    with pytest.raises(ValueError, match="at least 1"):
        model.sample(context[:, :0], 1)
