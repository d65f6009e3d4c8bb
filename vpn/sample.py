"""Sampling a video from a VPN, pixel by pixel and colour by colour.

Two decoders of one frame, with the same draws in the same order so that a seed gives the same video:

- `naive`: rerun the whole decoder on the partly filled frame for every pixel and colour, as the
  public implementations do (H * W * C full passes per frame). Kept as the reference.
- `cached`: the idea of Ramachandran et al. 2017 (fast PixelCNN++ generation) for 3x3 masked
  convolutions. A masked layer's output at pixel p reads its input only at p and at earlier raster
  positions, so once p's inputs are known the output at p never changes again. Each layer therefore
  keeps its input map as a cache, and a new pixel costs one position of every layer. Of a 3x3
  kernel only the row above and the left and centre taps are unmasked; the row above is final once
  the previous image row is done, so its contribution is computed for a whole row in one matmul
  per layer, and a pixel pays for its two centre-row taps only.

Stacks (decoder="stacks"): the vertical stack's row r reads rows <= r only and never the horizontal
stack, so once image row r is drawn it is computed for the whole row in one pass per layer (each 2x3
conv keeps its input's previous row), and its links feed every pixel of row r+1. The horizontal
stack costs one position per layer per pixel, its 1x2 convs reading a per-row cache of their input.

Blocks: an RMB's two MUs each keep a cache of their input; a ReLU block (block="relu") keeps one, the
input of its 3x3 conv. The baseline decoder (decoder="baseline") reads no pixel of the frame it draws,
so both methods draw its whole frame from one decoder pass.

Colours: at pixel p colour g the decoder's outputs of group g depend on colours < g of p only, so
recomputing p once per colour gives exact logits; after the last colour the caches at p are final,
because no output at p ever reads p's last colour (mask A excludes it, and B's only see groups <=).

Randomness: each frame's uniforms come from one torch.rand call of the frame's shape (B, C, H, W)
on the generator's device, moved to the model's device once (`uniforms`); sub-pixel (b, c, i, j)
is drawn with u[b, c, i, j]. So every method draws the same frame from the same seed, a CPU
generator gives the same frames on a CPU and a CUDA model, and a frame costs one copy to the
device, not one per pixel (a sync each, from pageable memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpn.layers import (
    HorizontalConv2d,
    MaskedConv2d,
    MultiplicativeUnit,
    ResidualMultiplicativeBlock,
    ResidualReLUBlock,
    VerticalConv2d,
    to_input,
)

if TYPE_CHECKING:  # annotations only: the model calls the sampler (VideoPixelNetwork.sample), not the reverse
    from vpn.model import StacksDecoder, VideoPixelNetwork

METHODS = ("cached", "naive")


def uniforms(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Uniforms in [0, 1) of `shape`, from one torch.rand call, on `device`.

    They are drawn on the generator's own device (torch's global generator of `device` when None)
    and moved once: a CPU generator driving a CUDA model gives the same numbers as on a CPU model,
    and a frame costs one host-to-device copy instead of one per pixel (each from pageable memory,
    so each a sync).
    """
    source = generator.device if generator is not None else device
    return torch.rand(*shape, generator=generator, device=source).to(device)


def draw(logits: Tensor, output: str, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One value per row from the model's distribution: logits (B, K) -> uint8 (B,); see draw_with."""
    return draw_with(logits, output, temperature, uniforms((len(logits),), generator, logits.device))


def draw_with(logits: Tensor, output: str, temperature: float, u: Tensor) -> Tensor:
    """One value per row given its uniform: logits (B, K), u (B,) in [0, 1) on logits' device -> uint8 (B,).

    categorical: K = 256, a softmax draw of the intensity by inverting its CDF with the row's uniform
    (torch.multinomial draws K exponentials per row: a quarter of the cached sampler's time at
    batch 64 on a CPU). bernoulli: K = 1, a coin with p = sigmoid(logit / T) choosing 0 or 255.
    """
    scaled = logits.float() / temperature
    u = u[:, None]  # (B, 1)
    if output == "categorical":
        cdf = F.softmax(scaled, dim=-1).cumsum(dim=-1)  # (B, K), non-decreasing, last ~ 1
        # The first k with cdf[k] > u * total: k is drawn with probability cdf[k] - cdf[k-1], and a
        # zero-probability k never is (its cdf equals the one before it).
        index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]  # (B,)
        return index.clamp_(max=cdf.shape[-1] - 1).to(torch.uint8)
    coin = u[:, 0] < torch.sigmoid(scaled[:, 0])  # (B,) True with probability p
    return coin.to(torch.uint8) * 255


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
            frame = decode_frame(model, context, generator, temperature, method, record_logits)  # (B, C, H, W)
            frames.append(frame)
            if index + 1 < n_frames:
                state = model.lstm.step(model.encode(frame[:, None])[:, 0], state)
        return torch.stack(frames, dim=1)
    finally:
        model.train(was_training)


@torch.no_grad()
def decode_frame(
    model: VideoPixelNetwork,
    context: Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    method: str = "cached",
    record_logits: list[Tensor] | None = None,
    n_pixels: int | None = None,
) -> Tensor:
    """Sample one frame given its LSTM context (B, L, H, W) -> uint8 (B, C, H, W).

    n_pixels: stop after this many pixels in raster order, leaving the rest 0 (the benchmarks time
    a prefix of a frame, since the naive method needs minutes for a whole one); None: all H * W.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    b, _, h, w = context.shape
    n_pixels = h * w if n_pixels is None else min(n_pixels, h * w)
    if model.decoder.uses_frame and method == "cached" and model.cfg.decoder not in _CACHED:
        raise ValueError(f"the cached sampler has no rule for decoder={model.cfg.decoder!r}; use method='naive'")
    # Sub-pixel (b, c, i, j) is drawn with u[b, c, i, j], whatever the method and the order it draws
    # in; the whole frame's uniforms even for a prefix (n_pixels), so a prefix is the frame's prefix.
    u = uniforms((b, model.cfg.image_channels, h, w), generator, context.device)  # (B, C, H, W)
    if not model.decoder.uses_frame:
        return _decode_independent(model, context, u, temperature, record_logits, n_pixels)
    decode = _decode_naive if method == "naive" else _CACHED[model.cfg.decoder]
    return decode(model, context, u, temperature, record_logits, n_pixels)


def _decode_independent(model, context, u, temperature, record_logits, n_pixels) -> Tensor:
    """A decoder that does not read the frame (the baseline): one pass, every sub-pixel drawn at once.

    Draws are made in the sequential samplers' order (raster position, then colour) so that
    record_logits lines up with theirs; each sub-pixel with its own uniform of u (B, C, H, W), as there.
    """
    b, _, h, w = context.shape
    c = model.cfg.image_channels
    logits = model.decode(None, context)  # (B, C, K, H, W)
    k = logits.shape[2]
    per_position = logits.permute(3, 4, 1, 0, 2).reshape(h * w * c, b, k)[: n_pixels * c]  # (P*C, B, K)
    if record_logits is not None:
        record_logits.extend(x.float().cpu() for x in per_position)
    per_u = u.permute(2, 3, 1, 0).reshape(-1)[: n_pixels * c * b]  # (P*C*B,), the order of per_position
    values = draw_with(per_position.reshape(-1, k), model.cfg.output, temperature, per_u)  # (P*C*B,)
    canvas = torch.zeros(h * w * c, b, dtype=torch.uint8, device=context.device)
    canvas[: n_pixels * c] = values.view(-1, b)
    return canvas.view(h, w, c, b).permute(3, 2, 0, 1).contiguous()  # (B, C, H, W)


def _decode_naive(model, context, u, temperature, record_logits, n_pixels) -> Tensor:
    b, _, h, w = context.shape
    c = model.cfg.image_channels
    canvas = torch.zeros(b, c, h, w, dtype=torch.uint8, device=context.device)
    for p in range(n_pixels):
        i, j = divmod(p, w)
        for colour in range(c):
            logits = model.decode(canvas, context)[:, colour, :, i, j]  # (B, K)
            if record_logits is not None:
                record_logits.append(logits.float().cpu())
            canvas[:, colour, i, j] = draw_with(logits, model.cfg.output, temperature, u[:, colour, i, j])
    return canvas


class _CausalConv:
    """A 3x3 masked conv split by where its unmasked taps read, for one-position evaluation.

    top: (3*Cin, Cout), the kernel's row above the centre, for inputs ordered (cin, kw) as
      Tensor.unfold lays out a row's windows; left_centre: (2*Cin, Cout), the centre row's left and
      centre taps, for inputs ordered (kw, cin) as a position-major cache stores them; bias (Cout,).
    The centre row's right tap and the row below are always masked (checked).
    """

    def __init__(self, conv: MaskedConv2d) -> None:
        k = conv.weight * conv.mask  # (Cout, Cin, 3, 3)
        if k.shape[-1] != 3 or k[:, :, 2].abs().sum() != 0 or k[:, :, 1, 2].abs().sum() != 0:
            raise ValueError("expected a 3x3 causal kernel")
        cout = k.shape[0]
        self.top = k[:, :, 0, :].reshape(cout, -1).t().contiguous()  # (Cin*3, Cout)
        self.left_centre = k[:, :, 1, :2].permute(0, 2, 1).reshape(cout, -1).t().contiguous()  # (2*Cin, Cout)
        self.bias = conv.bias

    def row(self, cache: Tensor, i: int) -> Tensor:
        """Top-row contributions (plus bias) for every column of row i: cache (B, H+1, W+2, Cin) -> (B, W, Cout).

        Row i of the image is row i+1 of the cache (row 0 is the zero padding above the image), so
        the row above it is cache row i, final once row i-1 is done.
        """
        b, _, w2, cin = cache.shape
        windows = cache[:, i].unfold(1, 3, 1)  # (B, W, Cin, 3)
        out = torch.addmm(self.bias, windows.reshape(b * (w2 - 2), cin * 3), self.top)  # (B*W, Cout)
        return out.view(b, w2 - 2, -1)


def _point_weight(conv: MaskedConv2d) -> tuple[Tensor, Tensor]:
    """A 1x1 masked conv as a matmul: weight (Cin, Cout), bias (Cout,)."""
    return (conv.weight * conv.mask)[:, :, 0, 0].t().contiguous(), conv.bias


class _Linearised:
    """The decoder's weights rearranged for one-position evaluation.

    blocks: one (is_rmb, down, causal convs, up) per block; an RMB has two causal convs (its MUs'
    fused gates), a ReLU block one (its 3x3 conv).
    """

    def __init__(self, model: VideoPixelNetwork) -> None:
        dec = model.decoder
        self.frame_in = _CausalConv(dec.frame_in)
        self.blocks = []
        for block in dec.blocks:
            if isinstance(block, ResidualMultiplicativeBlock):
                assert isinstance(block.mu1, MultiplicativeUnit) and isinstance(block.mu2, MultiplicativeUnit)
                convs = (_CausalConv(block.mu1.gates), _CausalConv(block.mu2.gates))
            elif isinstance(block, ResidualReLUBlock):
                convs = (_CausalConv(block.spatial),)
            else:
                raise TypeError(f"the cached sampler has no rule for {type(block).__name__}")
            self.blocks.append((len(convs) == 2, _point_weight(block.down), convs, _point_weight(block.up)))
        self.head_hidden, self.head_out = _head_weights(model)


def _head_weights(model: VideoPixelNetwork) -> tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
    """The decoder's 1x1 head as matmuls: head_hidden (weight, bias), and head_out per colour."""
    dec = model.decoder
    # head_out's columns split by colour: pass g needs only colour g's K logits.
    w, bias = _point_weight(dec.head_out)
    k = model.cfg.out_channels_per_colour
    head_out = [
        (w[:, g * k : (g + 1) * k].contiguous(), bias[g * k : (g + 1) * k].contiguous())
        for g in range(model.cfg.image_channels)
    ]
    return _point_weight(dec.head_hidden), head_out


def _mu_gate(g: Tensor, h: Tensor) -> Tensor:
    """MU output from its gate pre-activations g (B, 4c) = g1 | g2 | g3 | u and its input h (B, c)."""
    c = h.shape[1]
    s = torch.sigmoid(g[:, : 3 * c])  # g1 | g2 | g3 in one call
    inner = torch.addcmul(s[:, c : 2 * c] * h, s[:, 2 * c :], torch.tanh(g[:, 3 * c :]))
    return s[:, :c] * torch.tanh(inner)


def _decode_cached(model, context, u, temperature, record_logits, n_pixels) -> Tensor:
    cfg = model.cfg
    b, _, h, w = context.shape
    colours, mu = cfg.image_channels, cfg.mu_channels
    lin = _Linearised(model)
    dec = model.decoder
    # Context biases of the input layer and of each block, position-major views: (B, H, W, 2c) each.
    cond = dec.context_in(context).permute(0, 2, 3, 1).chunk(cfg.dec_blocks + 1, dim=-1)
    # Each block's residual input is the previous block's output plus its own context bias; the
    # previous block's `up` bias is folded into that bias, so a pixel pays one add for both.
    up_biases = [0.0] + [up[1] for *_, up in lin.blocks]
    canvas = torch.zeros(b, colours, h, w, dtype=torch.uint8, device=context.device)
    # Position-major input caches of every 3x3 conv, (B, H+1, W+2, Cin): one zero row above the
    # image and one zero column each side are the convs' own zero padding (the row below never
    # matters: it is masked). A pixel's 2 readable centre-row taps (left, centre) are then 2*Cin
    # contiguous numbers, and a finished row feeds the next row's top taps in one matmul.
    pixels = context.new_zeros(b, h + 1, w + 2, colours)
    # Every block's 3x3 convs read c channels (an RMB's two MUs, a ReLU block's middle conv).
    caches = [tuple(context.new_zeros(b, h + 1, w + 2, mu) for _ in convs) for _, _, convs, _ in lin.blocks]
    for p in range(n_pixels):
        i, j = divmod(p, w)
        if j == 0:  # row i-1 is final: the top taps of all of row i at once
            top_in = lin.frame_in.row(pixels, i) + cond[0][:, i]  # (B, W, 2c)
            tops = [
                tuple(conv.row(c, i) for conv, c in zip(convs, cs)) for (_, _, convs, _), cs in zip(lin.blocks, caches)
            ]
            row_shifts = [cond[n + 1][:, i] + up_biases[n] for n in range(cfg.dec_blocks)]  # (B, W, 2c) each
        for colour in range(colours):
            x = torch.addmm(
                top_in[:, j], pixels[:, i + 1, j : j + 2].reshape(b, -1), lin.frame_in.left_centre
            )  # (B, 2c)
            for (is_rmb, down, convs, up), cs, top, shift in zip(lin.blocks, caches, tops, row_shifts):
                x = x + shift[:, j]
                if is_rmb:
                    d = torch.addmm(down[1], x, down[0])  # (B, c)
                    cs[0][:, i + 1, j + 1] = d
                    m = _mu_gate(
                        torch.addmm(top[0][:, j], cs[0][:, i + 1, j : j + 2].reshape(b, -1), convs[0].left_centre), d
                    )
                    cs[1][:, i + 1, j + 1] = m
                    m = _mu_gate(
                        torch.addmm(top[1][:, j], cs[1][:, i + 1, j : j + 2].reshape(b, -1), convs[1].left_centre), m
                    )
                else:  # ReLU block: relu, 1x1 down, relu (cached: the 3x3's input), 3x3, relu
                    cs[0][:, i + 1, j + 1] = F.relu(torch.addmm(down[1], F.relu(x), down[0]))
                    m = F.relu(
                        torch.addmm(top[0][:, j], cs[0][:, i + 1, j : j + 2].reshape(b, -1), convs[0].left_centre)
                    )
                x = torch.addmm(x, m, up[0])  # up's bias is in the next shift (the last one: below)
            x = F.relu(x + up_biases[-1])
            logits = torch.addmm(
                lin.head_out[colour][1],
                F.relu(torch.addmm(lin.head_hidden[1], x, lin.head_hidden[0])),
                lin.head_out[colour][0],
            )  # (B, K)
            if record_logits is not None:
                record_logits.append(logits.float().cpu())
            value = draw_with(logits, cfg.output, temperature, u[:, colour, i, j])
            canvas[:, colour, i, j] = value
            pixels[:, i + 1, j + 1, colour] = to_input(value, pixels.dtype)
    return canvas


# -- the stacks (decoder="stacks") ------------------------------------------------------------------
class _HorizontalTaps:
    """A HorizontalConv2d at one position: weight (2*Cin, Cout) for its (left, centre) taps, inputs
    ordered (kw, cin) as a position-major row cache stores them; bias (Cout,)."""

    def __init__(self, conv: HorizontalConv2d) -> None:
        k = conv.weight * conv.mask  # (Cout, Cin, 1, 2)
        if k.shape[-2:] != (1, 2):
            raise ValueError(f"expected a 1x2 horizontal kernel, got {tuple(k.shape[-2:])}")
        self.weight = k[:, :, 0, :].permute(0, 2, 1).reshape(k.shape[0], -1).t().contiguous()  # (2*Cin, Cout)
        self.bias = conv.bias

    def __call__(self, cache: Tensor, j: int) -> Tensor:
        """cache (B, W+1, Cin), column 0 the zero padding, pixel j at column j+1 -> (B, Cout) at j."""
        return torch.addmm(self.bias, cache[:, j : j + 2].reshape(len(cache), -1), self.weight)


class _VerticalRows:
    """The vertical stack one image row at a time, and its links into the horizontal stack.

    Each VerticalConv2d keeps the last kh-1 rows of its input (zeros above the image: its own zero
    padding), so a new row costs one convolution of a (kh, W) window per conv. cond: the vertical
    stack's context biases, n+1 x (B, 2c, H, W).
    """

    def __init__(self, decoder: StacksDecoder, cond: tuple[Tensor, ...]) -> None:
        self.decoder, self.cond = decoder, cond
        self.history: dict[nn.Module, Tensor] = {}

    def conv(self, conv: VerticalConv2d, x: Tensor) -> Tensor:
        """x: conv's input at the new row (B, Cin, 1, W) -> its output there (B, Cout, 1, W)."""
        above = self.history.get(conv)
        if above is None:
            above = x.new_zeros(x.shape[0], x.shape[1], conv.kernel_size[0] - 1, x.shape[3])
        window = torch.cat([above, x], dim=2)  # (B, Cin, kh, W): rows r-kh+1..r
        self.history[conv] = window[:, :, 1:]
        c = conv.kernel_size[1] // 2
        return F.conv2d(F.pad(window, (c, c, 0, 0)), conv.weight, conv.bias)  # (B, Cout, 1, W)

    def row(self, r: int, frame_row: Tensor) -> list[Tensor]:
        """Image row r, drawn: frame_row (B, C, 1, W) in [-1, 1] -> each block's link at row r,
        (B, W, 2c) position-major: what the horizontal stack adds at row r+1."""
        dec = self.decoder
        v = self.conv(dec.frame_in_v, frame_row) + self.cond[0][:, :, r : r + 1]  # (B, 2c, 1, W)
        links = []
        for block, link, cond in zip(dec.v_blocks, dec.links, self.cond[1:]):
            x = v + cond[:, :, r : r + 1]
            if isinstance(block, ResidualMultiplicativeBlock):
                d = block.down(x)  # (B, c, 1, W); _mu_gate splits channels, dim 1 here too
                m = _mu_gate(self.conv(block.mu1.gates, d), d)
                m = _mu_gate(self.conv(block.mu2.gates, m), m)
            else:  # ReLU block
                m = F.relu(self.conv(block.spatial, F.relu(block.down(F.relu(x)))))
            v = x + block.up(m)
            links.append(link(v)[:, :, 0].transpose(1, 2))  # (B, W, 2c)
        return links


def _decode_cached_stacks(model, context, u, temperature, record_logits, n_pixels) -> Tensor:
    cfg = model.cfg
    dec = model.decoder
    b, _, h, w = context.shape
    colours, n, width = cfg.image_channels, cfg.dec_blocks, cfg.residual_channels
    cond = dec.context_in(context).chunk(2 * (n + 1), dim=1)  # 2(n+1) x (B, 2c, H, W): v's, then h's
    vertical = _VerticalRows(dec, cond[: n + 1])
    cond_h = [c.permute(0, 2, 3, 1) for c in cond[n + 1 :]]  # position-major (B, H, W, 2c) each
    frame_in = _HorizontalTaps(dec.frame_in_h)
    blocks = []
    for block in dec.h_blocks:
        if isinstance(block, ResidualMultiplicativeBlock):
            convs = (_HorizontalTaps(block.mu1.gates), _HorizontalTaps(block.mu2.gates))
        elif isinstance(block, ResidualReLUBlock):
            convs = (_HorizontalTaps(block.spatial),)
        else:
            raise TypeError(f"the cached sampler has no rule for {type(block).__name__}")
        blocks.append((len(convs) == 2, _point_weight(block.down), convs, _point_weight(block.up)))
    head_hidden, head_out = _head_weights(model)
    canvas = torch.zeros(b, colours, h, w, dtype=torch.uint8, device=context.device)
    links = [context.new_zeros(b, w, width) for _ in range(n)]  # row 0: shift_down's zero row
    for p in range(n_pixels):
        i, j = divmod(p, w)
        if j == 0:
            if i > 0:  # row i-1 is drawn: the vertical stack's row i-1, the links of all of row i
                links = vertical.row(i - 1, to_input(canvas[:, :, i - 1 : i], context.dtype))
            # Row i's inputs of every 1x2 conv, (B, W+1, Cin): column 0 is the conv's zero padding.
            pixels = context.new_zeros(b, w + 1, colours)
            caches = [tuple(context.new_zeros(b, w + 1, cfg.mu_channels) for _ in convs) for _, _, convs, _ in blocks]
            shifts = [cond_h[k + 1][:, i] + links[k] for k in range(n)]  # (B, W, 2c) each
        for colour in range(colours):
            x = frame_in(pixels, j) + cond_h[0][:, i, j]  # (B, 2c)
            for (is_rmb, down, convs, up), cs, shift in zip(blocks, caches, shifts):
                x = x + shift[:, j]
                if is_rmb:
                    d = torch.addmm(down[1], x, down[0])  # (B, c)
                    cs[0][:, j + 1] = d
                    m = _mu_gate(convs[0](cs[0], j), d)
                    cs[1][:, j + 1] = m
                    m = _mu_gate(convs[1](cs[1], j), m)
                else:  # ReLU block: relu, 1x1 down, relu (cached: the 1x2's input), 1x2, relu
                    cs[0][:, j + 1] = F.relu(torch.addmm(down[1], F.relu(x), down[0]))
                    m = F.relu(convs[0](cs[0], j))
                x = torch.addmm(up[1], m, up[0]) + x
            hidden = F.relu(torch.addmm(head_hidden[1], F.relu(x), head_hidden[0]))
            logits = torch.addmm(head_out[colour][1], hidden, head_out[colour][0])  # (B, K)
            if record_logits is not None:
                record_logits.append(logits.float().cpu())
            value = draw_with(logits, cfg.output, temperature, u[:, colour, i, j])
            canvas[:, colour, i, j] = value
            pixels[:, j + 1, colour] = to_input(value, pixels.dtype)
    return canvas


# Cached samplers by decoder (the baseline needs none: it draws a frame from one pass).
_CACHED = {"pixelcnn": _decode_cached, "stacks": _decode_cached_stacks}
