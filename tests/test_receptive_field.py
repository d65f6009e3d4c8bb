"""Receptive fields of the decoders within a frame, computed from gradients.

The field of the prediction of pixel (i, j), colour g: the input sub-pixels of the same frame whose
gradient is non-zero, summed over a batch of random frames and contexts, in float64 (a gradient that
is zero by construction is exactly 0.0). Expected fields come from the kernels' footprints, not from
the code:

- the masked decoder ("pixelcnn"): n = 1 + l * b masked 3x3 convs in a chain (the mask-A input conv,
  then b per block: an RMB's two MUs, a ReLU block's one conv). A kernel reaches one row up and at
  most one column right per row, so row i-d (1 <= d <= n) is seen over columns j-n..j+d, a cone:
  the pixels right of it, (i-d, j+d+1..), are PixelCNN's blind spot.
- the stacks ("stacks"): the vertical stack after block l has had m = 1 + l * b convs of 2x3, each
  one row up and one column either side: rows i-1-m..i-1 (it reaches row i shifted down by one),
  columns up to j+m, the whole width of the window with no cone. The horizontal stack reaches
  further left: each of the (l - k + 1) * b 1x2 convs after block k's link, one column.
"""

from __future__ import annotations

import pytest
import torch

from vpn import VideoPixelNetwork, VPNConfig

CONVS_PER_BLOCK = {"rmb": 2, "relu": 1}


def decoder_field(model: VideoPixelNetwork, h: int, w: int, i: int, j: int, g: int, batch: int = 8) -> torch.Tensor:
    """Input sub-pixels the decoder's logits at (g, i, j) depend on: (C, H, W) bool, from gradients."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(i * 100 + j * 10 + g)
    frame = (torch.rand(batch, cfg.image_channels, h, w, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    context = torch.randn(batch, cfg.lstm_channels, h, w, generator=gen, dtype=torch.float64)
    logits = model.decoder(frame, context).unflatten(1, (cfg.image_channels, cfg.out_channels_per_colour))
    (logits[:, g, :, i, j] ** 2).sum().backward()  # squares: no cancellation between the K logits
    return frame.grad.abs().sum(dim=0) > 0  # (C, H, W)


def expected_field(
    decoder: str, block: str, blocks: int, colours: int, h: int, w: int, i: int, j: int, g: int
) -> torch.Tensor:
    """The field from the footprints (module docstring): (C, H, W) bool."""
    b = CONVS_PER_BLOCK[block]
    rows = torch.arange(h)[:, None]
    cols = torch.arange(w)[None, :]
    if decoder == "pixelcnn":
        n = 1 + blocks * b
        d = i - rows  # rows up
        above = (d >= 1) & (d <= n) & (cols >= j - n) & (cols <= j + d)
        left = (rows == i) & (cols >= j - n) & (cols < j)
    else:
        m = 1 + blocks * b  # vertical convs up to the last block's link
        reach_left = 1 + (blocks + 1) * b  # link k: 1 + k*b vertical, then (blocks - k + 1)*b horizontal
        above = (rows < i) & (rows >= i - 1 - m) & (cols >= j - reach_left) & (cols <= j + m)
        left = (rows == i) & (cols >= j - (1 + blocks * b)) & (cols < j)
    field = (above | left)[None].repeat(colours, 1, 1)  # (C, H, W): every colour of an earlier pixel
    field[:g, i, j] = True  # the earlier colours of the pixel itself
    return field


def build(decoder: str, block: str, blocks: int, colours: int, seed: int = 0) -> VideoPixelNetwork:
    torch.manual_seed(seed)
    cfg = VPNConfig(
        enc_blocks=1,
        dec_blocks=blocks,
        filter_fraction=8 / 128,
        image_channels=colours,
        output="categorical",
        block=block,
        decoder=decoder,
    )
    return VideoPixelNetwork(cfg).double().eval()


def blind_spot(h: int, w: int, i: int, j: int) -> torch.Tensor:
    """PixelCNN's blind spot for (i, j): the pixels of earlier rows right of the cone, (H, W) bool."""
    rows = torch.arange(h)[:, None]
    cols = torch.arange(w)[None, :]
    return (rows < i) & (cols > j + (i - rows))


H, W = 5, 6
TARGETS = [(4, 1), (3, 0), (2, 3), (4, 5)]


@pytest.mark.parametrize("block", ["rmb", "relu"])
@pytest.mark.parametrize("colours", [1, 3], ids=["grey", "rgb"])
def test_stacks_see_every_earlier_row_and_pixelcnn_misses_exactly_the_blind_spot(block, colours):
    """Decoders deep enough to reach the whole 5x6 frame: the stacks' prediction of (i, j) depends on
    every pixel of every earlier row, up and to the right included, and on the pixels left of it;
    the masked decoder's on all of those except exactly the blind spot."""
    blocks = {"rmb": 3, "relu": 5}[block]  # 1 + blocks * b >= 5: the whole frame from any pixel
    stacks = build("stacks", block, blocks, colours)
    plain = build("pixelcnn", block, blocks, colours)
    rows = torch.arange(H)[:, None]
    cols = torch.arange(W)[None, :]
    for i, j in TARGETS:
        for g in range(colours):
            past = ((rows < i) | ((rows == i) & (cols < j)))[None].repeat(colours, 1, 1)  # (C, H, W)
            past[:g, i, j] = True
            seen = decoder_field(stacks, H, W, i, j, g)
            assert torch.equal(seen, past), f"stacks at ({i}, {j}) colour {g}:\n{seen.int()}"
            missed = past & ~decoder_field(plain, H, W, i, j, g)
            assert torch.equal(missed, blind_spot(H, W, i, j)[None].expand_as(missed)), (
                f"pixelcnn at ({i}, {j}) colour {g} missed:\n{missed.int()}"
            )
    assert blind_spot(H, W, 4, 1).sum() == 6  # the test is not vacuous: (3, 3..5), (2, 4..5), (1, 5)


@pytest.mark.parametrize("decoder", ["pixelcnn", "stacks"])
@pytest.mark.parametrize("block,blocks", [("relu", 1), ("rmb", 1), ("relu", 2)])
def test_field_within_the_decoders_reach_matches_the_footprints(decoder, block, blocks):
    """Shallow decoders on a frame larger than their reach: the field is exactly the footprint's
    (module docstring); the stacks' covers the full width of each earlier row within reach, the
    masked decoder's stops at the cone."""
    h, w, i, j = 9, 13, 7, 6
    model = build(decoder, block, blocks, 1, seed=blocks)
    seen = decoder_field(model, h, w, i, j, 0)
    expected = expected_field(decoder, block, blocks, 1, h, w, i, j, 0)
    assert torch.equal(seen, expected), f"got\n{seen[0].int()}\nexpected\n{expected[0].int()}"
    m = 1 + blocks * CONVS_PER_BLOCK[block]
    assert i - 1 - m > 0 and j + m < w - 1  # the frame is larger than the reach: pixels out of reach exist
    if decoder == "stacks":  # up and to the right of the cone: (i-1, j+2..j+m) is seen
        assert seen[0, i - 1, j + 2 : j + m + 1].all()
    else:
        assert not seen[0, i - 1, j + 2 :].any()
