"""Sampling: shapes, seeds, true draws (not argmax), and the fast sampler against the naive reference."""

from __future__ import annotations

import pytest
import torch

from vpn import VPNConfig, VideoPixelNetwork
from vpn.sample import draw, sample_video


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


@pytest.mark.parametrize("colours,output,dilation", [(1, "categorical", False), (3, "categorical", True), (1, "bernoulli", False)])
def test_cached_sampler_equals_naive_reference(colours, output, dilation):
    """Same context and seed: the same logits at every drawn position, so the same video."""
    model = tiny(colours, output, seed=3, dilation=dilation)
    context = torch.randint(0, 256, (2, 2, colours, 5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fast_logits, slow_logits = [], []
    fast = sample_video(model, context, 2, torch.Generator().manual_seed(1), method="cached", record_logits=fast_logits)
    slow = sample_video(model, context, 2, torch.Generator().manual_seed(1), method="naive", record_logits=slow_logits)
    assert len(fast_logits) == len(slow_logits) == 2 * colours * 5 * 6
    for a, b in zip(fast_logits, slow_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast, slow)


def test_sampled_frame_is_scored_consistently():
    """The sampler's logits for a frame are the forward pass's logits on the sampled frame."""
    model = tiny(1, "categorical", seed=5)
    context = known_sequence()[:, :2]
    recorded: list[torch.Tensor] = []
    video = sample_video(model, context, 1, torch.Generator().manual_seed(2), record_logits=recorded)
    with torch.no_grad():
        logits = model(torch.cat([context, video], dim=1))[0, -1, 0]  # (256, H, W) for the new frame
    expected = logits.permute(1, 2, 0).reshape(-1, 256)  # raster order
    torch.testing.assert_close(torch.cat(recorded), expected, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("colours,output", [(1, "categorical"), (3, "categorical"), (1, "bernoulli")])
def test_cold_samples_are_the_teacher_forced_argmax(colours, output):
    """At a near-zero temperature every draw is the most likely value, so each of 3 sampled frames
    is the argmax of the forward pass on cat[context, video]: the pass that feeds frame k back into
    the LSTM before frame k+1. float64 weights keep the sampler's and the forward pass's logits
    equal to ~1e-12, far below the gaps between the top two values (> 1e-4 here)."""
    model = tiny(colours, output, seed=4).double()
    with torch.no_grad():  # at init the argmax frame is nearly constant; x3 makes it follow the inputs
        for p in model.parameters():
            p.mul_(3)
    context = torch.randint(0, 256, (2, 2, colours, 5, 4), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    video = model.sample(context, 3, generator=torch.Generator().manual_seed(0), temperature=1e-6)
    with torch.no_grad():
        logits = model(torch.cat([context, video], dim=1))[:, -3:]  # the 3 sampled frames' logits
    if output == "categorical":
        expected = logits.argmax(dim=3).to(torch.uint8)  # (B, 3, C, H, W)
    else:
        expected = (logits > 0).to(torch.uint8) * 255
    assert torch.equal(video, expected)
    # the frames differ, so a sampler that fed back the wrong frame (or none) would be seen
    assert not torch.equal(video[:, 0], video[:, 1]) and not torch.equal(video[:, 1], video[:, 2])


def binomial_bound(p: torch.Tensor, n: int) -> torch.Tensor:
    """Tolerance of a frequency of n draws with probability p: 5 standard deviations, plus 5 counts
    for the rare values, where a count of a few is not yet normal (Poisson(1) reaches 6 w.p. 6e-4)."""
    return 5 * (p * (1 - p) / n).sqrt() + 5 / n


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_draw_follows_the_tempered_distribution(temperature):
    """draw at temperature T: frequencies of 100k draws are softmax(logits / T), or sigmoid(logit / T)
    for a coin, within 5 binomial standard deviations per value; the untempered distribution is not."""
    n = 100_000
    logits = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)) * 2
    values = draw(logits.expand(n, 256), "categorical", temperature, torch.Generator().manual_seed(1))
    freq = torch.bincount(values.long(), minlength=256).double() / n
    p = torch.softmax(logits[0].double() / temperature, dim=-1)
    assert ((freq - p).abs() <= binomial_bound(p, n)).all()
    untempered = torch.softmax(logits[0].double(), dim=-1)
    assert not ((freq - untempered).abs() <= binomial_bound(untempered, n)).all()

    logit = torch.tensor([[0.8]])
    coins = draw(logit.expand(n, 1), "bernoulli", temperature, torch.Generator().manual_seed(2))
    assert set(coins.unique().tolist()) == {0, 255}
    freq = (coins == 255).double().mean()
    p = torch.sigmoid(logit[0, 0].double() / temperature)
    assert abs(freq - p) <= binomial_bound(p, n)
    assert abs(freq - torch.sigmoid(logit[0, 0].double())) > binomial_bound(p, n)


@pytest.mark.parametrize("output", ["categorical", "bernoulli"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sample_passes_the_temperature_on(output, temperature):
    """model.sample at temperature T: the first pixel of a new frame (which depends on the context
    only) is drawn from softmax(logits / T) or sigmoid(logit / T) of the model's own logits, within
    5 binomial standard deviations per value over 4000 sequences of 1x1 frames."""
    model = tiny(1, output, seed=12)
    with torch.no_grad():  # logits of order 1, so that T visibly reshapes the distribution
        model.decoder.head_out.bias.copy_(torch.randn(model.decoder.head_out.bias.shape, generator=torch.Generator().manual_seed(3)) * 1.5)
    n = 4000
    context = known_sequence(size=1)[:, :2].repeat(n, 1, 1, 1, 1)  # (n, 2, 1, 1, 1)
    video = model.sample(context, 1, generator=torch.Generator().manual_seed(0), temperature=temperature)
    with torch.no_grad():
        logits = model(torch.cat([context[:1], video[:1]], dim=1))[0, -1, 0].double()  # (256, 1, 1) or (1, 1)
    if output == "categorical":
        p = torch.softmax(logits[:, 0, 0] / temperature, dim=0)
        untempered = torch.softmax(logits[:, 0, 0], dim=0)
        freq = torch.bincount(video[:, 0, 0, 0, 0].long(), minlength=256).double() / n
    else:
        p = torch.sigmoid(logits[0, 0] / temperature).reshape(1)
        untempered = torch.sigmoid(logits[0, 0]).reshape(1)
        freq = (video[:, 0, 0, 0, 0] == 255).double().mean().reshape(1)
    assert ((freq - p).abs() <= binomial_bound(p, n)).all()
    assert not ((freq - untempered).abs() <= binomial_bound(untempered, n)).all()


def test_sampling_restores_training_mode():
    model = tiny().train()
    context = known_sequence()[:, :2]
    model.sample(context, 1, generator=torch.Generator().manual_seed(0))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model.sample(context, 1, generator=torch.Generator().manual_seed(0))
    assert not any(m.training for m in model.modules())
