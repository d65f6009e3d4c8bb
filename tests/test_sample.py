"""Sampling: shapes, seeds, true draws (not argmax) at every temperature, cold samples against the
teacher-forced argmax, the draw's inverse CDF, and the fast sampler against the naive reference."""

from __future__ import annotations

import pytest
import torch

from vpn import VideoPixelNetwork, VPNConfig
from vpn.sample import draw, sample_video


def tiny(colours: int = 1, output: str = "categorical", seed: int = 0, **kw) -> VideoPixelNetwork:
    torch.manual_seed(seed)
    return VideoPixelNetwork(
        VPNConfig.preset("micro", filter_fraction=8 / 128, image_channels=colours, output=output, **kw)
    ).eval()


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
    context = torch.randint(
        0, 256, (2, 2, colours, 5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
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
    context = torch.randint(
        0, 256, (2, 2, colours, 5, 4), generator=torch.Generator().manual_seed(6), dtype=torch.uint8
    )
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
        model.decoder.head_out.bias.copy_(
            torch.randn(model.decoder.head_out.bias.shape, generator=torch.Generator().manual_seed(3)) * 1.5
        )
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


# -- the draw and the caches, checked where the tests above can't see ---------------------------------
def test_draw_inverts_the_cdf_with_one_uniform_per_row():
    """draw uses the generator's uniforms in order, one per row: row r's value is the first k with
    cdf[k] > u_r * cdf[-1] (categorical; counted here instead of searched) or 255 iff u_r < p
    (bernoulli). The same seed therefore gives the same values whatever the caller, as the
    sampler's seed-reproducibility promises. Both return uint8 (B,)."""
    n = 2000
    logits = torch.randn(n, 256, generator=torch.Generator().manual_seed(0)) * 3
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(1))
    values = draw(logits, "categorical", 0.7, torch.Generator().manual_seed(1))
    cdf = torch.softmax(logits / 0.7, dim=-1).cumsum(dim=-1)
    assert values.dtype == torch.uint8 and values.shape == (n,)
    assert torch.equal(values.long(), (cdf <= u * cdf[:, -1:]).sum(dim=-1).clamp(max=255))

    coins = draw(logits[:, :1], "bernoulli", 0.7, torch.Generator().manual_seed(1))
    assert coins.dtype == torch.uint8 and coins.shape == (n,)
    assert torch.equal(coins, (u[:, 0] < torch.sigmoid(logits[:, 0] / 0.7)).to(torch.uint8) * 255)


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-24])  # the smallest and the largest uniform float32
def test_zero_probability_values_are_never_drawn_even_at_the_extreme_uniforms(u, monkeypatch):
    """torch.rand can return exactly 0 and 1 - 2^-24: even then a value of probability 0 is not
    drawn (the first and last values with mass are, and a sure coin comes up 255, an impossible one 0)."""
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None: torch.full(size, u, device=device))
    logits = torch.full((1, 256), -1e4)  # exp(-1e4) is 0 in float32: these values have probability 0
    logits[0, 2:10] = torch.linspace(0, 1, 8)
    assert draw(logits, "categorical", 1.0, None).tolist() == [2 if u == 0 else 9]
    coins = draw(torch.tensor([[-1e4], [1e4]]), "bernoulli", 1.0, None)
    assert coins.tolist() == [0, 255]


def test_sampling_without_a_generator_follows_the_global_seed():
    """generator=None draws from torch's global generator: the same global seed, the same video
    (either method), and the same values as a generator seeded alike."""
    model = tiny(1, "bernoulli")
    context = known_sequence()[:, :2]
    torch.manual_seed(3)
    first = model.sample(context, 2, method="cached")
    torch.manual_seed(3)
    assert torch.equal(model.sample(context, 2, method="naive"), first)
    logits = torch.randn(500, 256, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(4)
    values = draw(logits, "categorical", 1.0, None)
    assert torch.equal(values, draw(logits, "categorical", 1.0, torch.Generator().manual_seed(4)))


def test_float64_cached_sampler_equals_naive_to_rounding():
    """In float64 the cached sampler's logits are the naive reference's to 1e-10 (the float32 test
    above allows 1e-4): every cache, the pixel cache included, keeps the model's dtype."""
    model = tiny(3, "categorical", seed=3).double()
    context = torch.randint(0, 256, (2, 2, 3, 4, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fast_logits, slow_logits = [], []
    fast = sample_video(model, context, 2, torch.Generator().manual_seed(1), method="cached", record_logits=fast_logits)
    slow = sample_video(model, context, 2, torch.Generator().manual_seed(1), method="naive", record_logits=slow_logits)
    assert fast.dtype == slow.dtype == torch.uint8 and torch.equal(fast, slow)
    torch.testing.assert_close(torch.stack(fast_logits), torch.stack(slow_logits), rtol=0, atol=1e-10)


@pytest.mark.parametrize("tap", ["below", "right"])
def test_cached_decoder_refuses_a_kernel_that_is_not_causal(tap):
    """The cached decoder reads only the row above and the left and centre taps of a 3x3 kernel:
    a kernel whose mask lets the row below or the right tap through is refused, not run wrongly."""
    from vpn.layers import MaskedConv2d
    from vpn.sample import _CausalConv

    conv = MaskedConv2d(4, 4, 3, "B", 1)
    _CausalConv(conv)  # the real mask is accepted
    with torch.no_grad():
        if tap == "below":
            conv.mask[:, :, 2] = 1
        else:
            conv.mask[:, :, 1, 2] = 1
    with pytest.raises(ValueError, match="3x3 causal kernel"):
        _CausalConv(conv)
