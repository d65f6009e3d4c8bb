"""The autoregressive property, tested directly (as karpathy/pytorch-made and pyro's MADE tests do).

Change one input pixel x[b, t, c, i, j] and recompute every logit. A logit that predicts pixel
(t', c', i', j') may change only if (t', i', j', c') comes strictly after (t, i, j, c) in the
factorisation's order (time, row, column, colour); some later logit must change; no other sequence
in the batch may change. The model runs in float64 so that "unchanged" means below 1e-10, far under
the real effects, whatever order the convolutions sum in.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from vpn import VideoPixelNetwork, VPNConfig
from vpn.layers import causal_mask, colour_groups

T, H, W = 3, 6, 6

# Shrunken versions of every preset: the preset's depths, a small width (c = 4).
SHRUNK = [
    ("full", {"enc_blocks": 8, "dec_blocks": 12}),
    ("mini", {"enc_blocks": 4, "dec_blocks": 6}),
    ("micro", {"enc_blocks": 2, "dec_blocks": 3}),
]


def order_key(c: int, h: int, w: int, t: int) -> torch.Tensor:
    """Position of every (t, c, i, j) in the factorisation order: (T, C, H, W) long."""
    tt = torch.arange(t)[:, None, None, None]
    cc = torch.arange(c)[None, :, None, None]
    ii = torch.arange(h)[None, None, :, None]
    jj = torch.arange(w)[None, None, None, :]
    return ((tt * h + ii) * w + jj) * c + cc


def peak(x: torch.Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0


def logit_change(model: VideoPixelNetwork, frames: torch.Tensor, b: int, t: int, c: int, i: int, j: int):
    """Max |change| of the logits for each predicted pixel: (B, T-1, C, H, W) float64."""
    with torch.no_grad():
        before = model(frames)
        changed = frames.clone()
        changed[b, t, c, i, j] = (int(frames[b, t, c, i, j]) + 97) % 256
        after = model(changed)
    diff = (after - before).abs()
    if model.cfg.output == "categorical":
        diff = diff.amax(dim=3)  # over the 256 values
    return diff


def build(
    name: str, overrides: dict, colours: int, output: str, dilation: bool, seed: int, width: int = 4, **options
) -> VideoPixelNetwork:
    torch.manual_seed(seed)
    cfg = VPNConfig.preset(
        name,
        filter_fraction=width / 128,
        image_channels=colours,
        output=output,
        dilation=dilation,
        **overrides,
        **options,
    )
    return VideoPixelNetwork(cfg).double().eval()


# Every architecture option beyond the presets' depths: each joins the causality tests.
OPTIONS = [
    ("rmb", {}),
    ("relu", {"block": "relu"}),
    ("baseline", {"decoder": "baseline"}),
    ("baseline-relu", {"decoder": "baseline", "block": "relu"}),
    ("stacks", {"decoder": "stacks"}),
    ("stacks-relu", {"decoder": "stacks", "block": "relu"}),
]


# The RMB at every preset's depth; the other options at mini's and micro's (full's depth adds only time).
ARCHITECTURES = [
    pytest.param(name, overrides, options, id=f"{name}-{option}")
    for option, options in OPTIONS
    for name, overrides in SHRUNK
    if option == "rmb" or name != "full"
]


@pytest.mark.parametrize("name,overrides,options", ARCHITECTURES)
@pytest.mark.parametrize("colours", [1, 3], ids=["grey", "rgb"])
@pytest.mark.parametrize("dilation", [False, True], ids=["plain", "dilated"])
def test_one_pixel_changes_only_later_logits(name, overrides, options, colours, dilation):
    option = "-".join(f"{k}={v}" for k, v in sorted(options.items()))
    output = "categorical" if colours == 3 else "bernoulli"
    seed = zlib.crc32(f"{name}-{colours}-{dilation}-{option}".encode())  # stable across runs, unlike hash()
    model = build(name, overrides, colours, output, dilation, seed, **options)
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (2, T, colours, H, W), generator=g, dtype=torch.uint8)
    key = order_key(colours, H, W, T)[1:]  # keys of the predicted frames 1..T-1: (T-1, C, H, W)

    positions = [tuple(int(torch.randint(n, (1,), generator=g)) for n in (2, T, colours, H, W)) for _ in range(4)]
    positions.append((1, T - 1, colours - 1, H - 1, W - 1))  # the very last sub-pixel: nothing after it
    positions.append((0, 0, 0, 0, 0))  # the very first: everything after it
    for b, t, c, i, j in positions:
        diff = logit_change(model, frames, b, t, c, i, j)
        k0 = order_key(colours, H, W, T)[t, c, i, j]
        past = key <= k0  # the perturbed pixel itself and everything before it
        if model.cfg.decoder == "baseline":  # no dependency within a frame: all of frame t is "past"
            past = past | (torch.arange(1, T)[:, None, None, None] <= t).expand_as(past)
        assert peak(diff[b][past]) < 1e-10, f"pixel (t={t}, c={c}, i={i}, j={j}) leaked into itself or the past"
        assert diff[1 - b].max() < 1e-10, "one sequence of the batch changed another"
        if (~past).any():
            assert diff[b][~past].max() > 1e-6, "a pixel changed no later prediction"


@pytest.mark.parametrize("decoder", ["pixelcnn", "stacks"])
@pytest.mark.parametrize("block", ["rmb", "relu"])
@pytest.mark.parametrize("colours", [1, 3])
def test_next_pixel_and_next_frame_see_the_change(colours, block, decoder):
    """Not just some later logit: the very next sub-pixel in raster order, and the next frame.

    Width c = 16: with c = 4 an RGB colour group has 3 channels, and the head's ReLUs can leave a
    group's logits constant at a pixel at initialisation (no path, rather than a blocked one)."""
    model = build("micro", {}, colours, "categorical", False, 0, width=16, block=block, decoder=decoder)
    frames = torch.randint(0, 256, (1, T, colours, H, W), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    t, c, i, j = 1, 0, 2, 3
    diff = logit_change(model, frames, 0, t, c, i, j)[0]  # (T-1, C, H, W); index t-1 predicts frame t
    if colours > 1:
        assert diff[t - 1, c + 1, i, j] > 1e-6  # the next colour of the same pixel
    assert diff[t - 1, 0, i, j + 1] > 1e-6  # the next pixel of the row
    assert diff[t - 1, 0, i + 1, j - 1] > 1e-6  # the row below
    assert diff[t].max() > 1e-6  # the next frame, through encoder and LSTM
    assert diff[t - 1, :, :i].max() < 1e-10  # rows above never


@pytest.mark.parametrize("block", ["rmb", "relu"])
@pytest.mark.parametrize("colours", [1, 3])
def test_baseline_frame_t_never_reaches_its_own_logits(colours, block):
    """The paper's baseline: pixels within a frame are independent given the past. Changing any
    pixel of frame t changes no logit of frame t (nor earlier), and does change frame t+1's."""
    model = build("micro", {}, colours, "categorical", False, 4, width=16, block=block, decoder="baseline")
    g = torch.Generator().manual_seed(5)
    frames = torch.randint(0, 256, (1, T, colours, H, W), generator=g, dtype=torch.uint8)
    for t, c, i, j in [(1, 0, 0, 0), (1, colours - 1, H - 1, W - 1), (1, 0, 2, 3), (0, 0, 3, 1)]:
        diff = logit_change(model, frames, 0, t, c, i, j)[0]  # (T-1, C, H, W): index k predicts frame k+1
        if t >= 1:
            assert peak(diff[:t]) < 1e-10, f"pixel (t={t}, c={c}, i={i}, j={j}) reached frame {t}'s logits"
        assert diff[t].max() > 1e-6, "a pixel of frame t did not reach frame t+1"


def test_raw_frame_never_reaches_a_gate_unmasked():
    """The public implementations' leak: g2 * h with h the raw frame. Pixel (i, j) of frame t
    must not affect its own logits even at the start of training, for any weight values."""
    check_no_self_leak(build("micro", {}, 1, "bernoulli", False, 3))


def test_relu_block_never_leaks_a_pixel_into_itself():
    """The same check with large weights for PixelCNN's ReLU blocks (block="relu")."""
    check_no_self_leak(build("micro", {}, 1, "bernoulli", False, 3, block="relu"))


@pytest.mark.parametrize("block", ["rmb", "relu"])
def test_stacks_never_leak_a_pixel_into_itself(block):
    """The same check with large weights for the vertical and horizontal stacks (decoder="stacks"):
    the vertical stack sees its own row, so a missing shift would show here."""
    check_no_self_leak(build("micro", {}, 1, "bernoulli", False, 3, block=block, decoder="stacks"))


def check_no_self_leak(model: VideoPixelNetwork) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0)  # large random weights: any leak would show
    frames = torch.randint(0, 256, (1, 2, 1, H, W), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    for i in range(H):
        for j in range(W):
            diff = logit_change(model, frames, 0, 1, 0, i, j)
            assert diff[0, 0, 0, i, j] < 1e-10


def test_mask_drawings():
    """The ASCII drawings of masks A and B in MaskedConv2d's docstring, for one colour."""
    one = colour_groups(1, 1)
    a = causal_mask(3, "A", one, one)[0, 0]
    b = causal_mask(3, "B", one, one)[0, 0]
    assert a.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert b.tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    # RGB at the centre: R sees nothing of its own pixel under A; B sees R and G under A, itself under B.
    rgb = torch.arange(3)
    assert causal_mask(1, "A", rgb, rgb)[:, :, 0, 0].tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert causal_mask(1, "B", rgb, rgb)[:, :, 0, 0].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
