"""Sampling a video from a VPN, pixel by pixel and colour by colour.

Two decoders of one frame, with the same draws in the same order so that a seed gives the same video:

- `naive`: rerun the whole decoder on the partly filled frame for every pixel and colour, as the
  public implementations do (H * W * C full passes per frame). Kept as the reference.
- `cached`: the idea of Ramachandran et al. 2017 (fast PixelCNN++ generation) for 3x3 masked
  convolutions. A masked layer's output at pixel p reads its input only at p and at earlier raster
  positions, so once p's inputs are known the output at p never changes again. Each layer therefore
  keeps its input map as a cache, and a new pixel costs one position of every layer: a 2x3 patch
  of each 3x3 conv's input (the third kernel row is always masked) times the masked kernel.

Colours: at pixel p colour g the decoder's outputs of group g depend on colours < g of p only, so
recomputing p once per colour gives exact logits; after the last colour the caches at p are final,
because no output at p ever reads p's last colour (mask A excludes it, and B's only see groups <=).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vpn.layers import MaskedConv2d, MultiplicativeUnit, ResidualMultiplicativeBlock
from vpn.model import VideoPixelNetwork, to_input

METHODS = ("cached", "naive")


def draw(logits: Tensor, output: str, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One value per row from the model's distribution: logits (B, K) -> uint8 (B,).

    categorical: K = 256, a softmax draw of the intensity. bernoulli: K = 1, a coin with
    p = sigmoid(logit / T) choosing 0 or 255.
    """
    scaled = logits.float() / temperature
    if output == "categorical":
        return torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=generator)[:, 0].to(torch.uint8)
    coin = torch.bernoulli(torch.sigmoid(scaled[:, 0]), generator=generator)
    return (coin * 255).to(torch.uint8)


@torch.no_grad()
def sample_video(
    model: VideoPixelNetwork,
    context_frames: Tensor,
    n_frames: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    method: str = "cached",
    record_logits: list[Tensor] | None = None,
) -> Tensor:
    """context_frames uint8 (B, Tc, C, H, W), Tc >= 1 -> sampled uint8 (B, n_frames, C, H, W).

    record_logits, if a list, receives each drawn position's logits (B, K) in drawing order, so two
    methods can be compared value by value.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    model._check_frames(context_frames, min_frames=1)
    was_training = model.training
    model.eval()
    try:
        state = None
        features = model.encode(context_frames)  # (B, Tc, 2c, H, W)
        for t in range(features.shape[1]):
            state = model.lstm.step(features[:, t], state)
        frames = []
        for index in range(n_frames):
            context = state[0]  # (B, L, H, W): the LSTM state after every earlier frame
            decode = _decode_cached if method == "cached" else _decode_naive
            frame = decode(model, context, generator, temperature, record_logits)  # (B, C, H, W)
            frames.append(frame)
            if index + 1 < n_frames:
                state = model.lstm.step(model.encode(frame[:, None])[:, 0], state)
        return torch.stack(frames, dim=1)
    finally:
        model.train(was_training)


def _decode_naive(model, context, generator, temperature, record_logits) -> Tensor:
    b, _, h, w = context.shape
    c = model.cfg.image_channels
    canvas = torch.zeros(b, c, h, w, dtype=torch.uint8, device=context.device)
    for i in range(h):
        for j in range(w):
            for colour in range(c):
                logits = model.decode(canvas, context)[:, colour, :, i, j]  # (B, K)
                if record_logits is not None:
                    record_logits.append(logits.float().cpu())
                canvas[:, colour, i, j] = draw(logits, model.cfg.output, temperature, generator)
    return canvas


def _patch_weight(conv: MaskedConv2d) -> tuple[Tensor, Tensor]:
    """A 3x3 masked conv as a matmul on its input's 2x3 patch: weight (Cin*6, Cout), bias (Cout,).

    Only the kernel's top two rows can be non-zero (the row below the centre is always masked).
    """
    k = conv.weight * conv.mask  # (Cout, Cin, 3, 3)
    if k.shape[-1] != 3 or k[:, :, 2].abs().sum() != 0:
        raise ValueError("expected a 3x3 causal kernel")
    return k[:, :, :2, :].flatten(1).t().contiguous(), conv.bias


def _point_weight(conv: MaskedConv2d) -> tuple[Tensor, Tensor]:
    """A 1x1 masked conv as a matmul: weight (Cin, Cout), bias (Cout,)."""
    return (conv.weight * conv.mask)[:, :, 0, 0].t().contiguous(), conv.bias


class _Linearised:
    """The decoder's weights rearranged for one-position evaluation."""

    def __init__(self, model: VideoPixelNetwork) -> None:
        dec = model.decoder
        self.frame_in = _patch_weight(dec.frame_in)
        self.blocks = []
        for block in dec.blocks:
            assert isinstance(block, ResidualMultiplicativeBlock)
            mus = []
            for mu in (block.mu1, block.mu2):
                assert isinstance(mu, MultiplicativeUnit)
                mus.append(_patch_weight(mu.gates))
            self.blocks.append((_point_weight(block.down), mus[0], mus[1], _point_weight(block.up)))
        self.head_hidden = _point_weight(dec.head_hidden)
        self.head_out = _point_weight(dec.head_out)


def _affine(x: Tensor, wb: tuple[Tensor, Tensor]) -> Tensor:
    return torch.addmm(wb[1], x, wb[0])


def _mu_at(cache: Tensor, i: int, j: int, h: Tensor, wb: tuple[Tensor, Tensor]) -> Tensor:
    """MU output at (i, j) from its padded input cache (B, c, H+2, W+2) and its input there h: (B, c)."""
    patch = cache[:, :, i : i + 2, j : j + 3].reshape(h.shape[0], -1)  # (B, c*6)
    g1, g2, g3, u = _affine(patch, wb).chunk(4, dim=1)  # 4 x (B, c)
    return torch.sigmoid(g1) * torch.tanh(torch.sigmoid(g2) * h + torch.sigmoid(g3) * torch.tanh(u))


def _decode_cached(model, context, generator, temperature, record_logits) -> Tensor:
    cfg = model.cfg
    b, _, h, w = context.shape
    colours, k = cfg.image_channels, cfg.out_channels_per_colour
    lin = _Linearised(model)
    dec = model.decoder
    # Context biases for the input layer and each block, position-major for cheap gathers.
    cond = dec.context_in(context).permute(0, 2, 3, 1).contiguous()  # (B, H, W, 2c*(blocks+1))
    cond = cond.chunk(cfg.dec_blocks + 1, dim=-1)
    canvas = torch.zeros(b, colours, h, w, dtype=torch.uint8, device=context.device)
    # Padded input caches; the zero border is the convs' own zero padding.
    pixels = context.new_zeros(b, colours, h + 2, w + 2)
    mu_inputs = [
        (context.new_zeros(b, cfg.mu_channels, h + 2, w + 2), context.new_zeros(b, cfg.mu_channels, h + 2, w + 2))
        for _ in range(cfg.dec_blocks)
    ]
    for i in range(h):
        for j in range(w):
            for colour in range(colours):
                patch = pixels[:, :, i : i + 2, j : j + 3].reshape(b, -1)  # (B, C*6)
                x = _affine(patch, lin.frame_in) + cond[0][:, i, j]  # (B, 2c)
                for n, (down, mu1, mu2, up) in enumerate(lin.blocks):
                    x = x + cond[n + 1][:, i, j]
                    cache1, cache2 = mu_inputs[n]
                    d = _affine(x, down)  # (B, c)
                    cache1[:, :, i + 1, j + 1] = d
                    m = _mu_at(cache1, i, j, d, mu1)
                    cache2[:, :, i + 1, j + 1] = m
                    m = _mu_at(cache2, i, j, m, mu2)
                    x = x + _affine(m, up)
                out = _affine(F.relu(_affine(F.relu(x), lin.head_hidden)), lin.head_out)  # (B, C*K)
                logits = out.view(b, colours, k)[:, colour]  # (B, K)
                if record_logits is not None:
                    record_logits.append(logits.float().cpu())
                value = draw(logits, cfg.output, temperature, generator)
                canvas[:, colour, i, j] = value
                pixels[:, colour, i + 1, j + 1] = to_input(value, pixels.dtype)
    return canvas
