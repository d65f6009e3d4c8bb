"""Building blocks of a Video Pixel Network, named after the paper (Kalchbrenner et al. 2016, sec. 3-4).

- MaskedConv2d: a convolution that sees only earlier pixels and earlier colours (van den Oord et al. 2016).
- MultiplicativeUnit (MU): LSTM-like gates around a convolution.
- ResidualMultiplicativeBlock (RMB): 1x1 down to c, MU, MU, 1x1 back up to 2c, plus an additive skip.
- ResidualReLUBlock: PixelCNN's residual block at the RMB's widths, the paper's "ReLU" ablation.
- VerticalConv2d, HorizontalConv2d, shift_down: Gated PixelCNN's two stacks (van den Oord et al. 2016,
  "Conditional Image Generation with PixelCNN Decoders"), which remove the masked decoder's blind spot.
- ConvLSTM: a resolution-preserving convolutional LSTM (Shi et al. 2015).

Colour ordering. For RGB frames every decoder layer's channels are split into three contiguous groups
(R, G, B) and the masks let group j read group i at the same pixel only if i < j (mask A) or i <= j
(mask B). `colour_groups` fixes that split; every elementwise product inside an MU multiplies channels
of the same group, so the invariant carries through the gates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

ConvFactory = Callable[[int, int, int], nn.Module]
"""(in_channels, out_channels, kernel_size) -> a resolution-preserving conv module."""


# The model and the sampler both turn uint8 pixels into inputs; here, so neither imports the other for it.
def to_input(frames: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 intensities -> inputs in [-1, 1] of `dtype`, same shape."""
    return frames.to(dtype) * (2.0 / 255.0) - 1.0


def colour_groups(channels: int, colours: int) -> Tensor:
    """Colour group (0..colours-1) of each of `channels` channels, in contiguous runs: (channels,) long.

    channel k belongs to group floor(k * colours / channels), so any width >= colours works, not only
    multiples of 3 (the full model's c = 128 is not).
    """
    return torch.arange(channels) * colours // channels


def causal_mask(kernel_size: int, mask_type: str, in_groups: Tensor, out_groups: Tensor) -> Tensor:
    """The PixelCNN mask for a kernel_size x kernel_size kernel: (out, in, k, k) float of 0/1.

    For one colour (in and out groups all 0) and k = 3:

        mask A          mask B
        1 1 1           1 1 1
        1 0 0           1 1 0
        0 0 0           0 0 0

    Rows above the centre and pixels left of it are always visible; everything after the centre never
    is. At the centre, output group j sees input group i iff i < j (A) or i <= j (B), so a pixel's
    colour never sees itself through mask A and the stack of A then B's never sees it at all.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    if kernel_size % 2 != 1:
        raise ValueError(f"masked convolutions need an odd kernel, got {kernel_size}")
    c = kernel_size // 2
    mask = torch.zeros(len(out_groups), len(in_groups), kernel_size, kernel_size)
    mask[:, :, :c, :] = 1.0  # rows above
    mask[:, :, c, :c] = 1.0  # left of centre, same row
    o, i = out_groups[:, None], in_groups[None, :]
    mask[:, :, c, c] = (i < o).float() if mask_type == "A" else (i <= o).float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """Conv2d whose kernel is multiplied by a causal mask in every call (never edited in place).

    Pixel (i, j) colour g of the output depends only on pixels above, pixels left in the same row,
    and (B: same or, A: strictly) earlier colours of pixel (i, j); so information cannot flow from a
    pixel to itself or backwards in raster order.

    The kernel rows below the centre are masked for every mask type and colour split, so the call
    runs only the top k//2 + 1 rows (2x3 of a 3x3: a third fewer multiply-adds, in the backward pass
    too). The weight keeps its full k x k shape, so parameter counts and checkpoints don't change.

    Input (N, in_channels, H, W) -> output (N, out_channels, H, W), same dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: str,
        colours: int,
        in_groups: Tensor | None = None,
        out_groups: Tensor | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        in_groups = colour_groups(in_channels, colours) if in_groups is None else in_groups
        out_groups = colour_groups(out_channels, colours) if out_groups is None else out_groups
        self.mask_type = mask_type
        self.register_buffer("mask", causal_mask(kernel_size, mask_type, in_groups, out_groups))

    def forward(self, x: Tensor) -> Tensor:
        c = self.kernel_size[0] // 2
        if c == 0:
            return F.conv2d(x, self.weight * self.mask, self.bias)
        rows = slice(0, c + 1)  # the centre row and the c rows above it; the rest is always masked
        weight = self.weight[:, :, rows] * self.mask[:, :, rows]  # (out, in, c+1, k)
        # Zero padding of c rows above only (and c columns each side): output row r reads input
        # rows r-c..r, exactly what the full kernel's unmasked rows read. (Padding c rows below too
        # and dropping c output rows computes the same, but measured up to 1.25x slower on CPU.)
        return F.conv2d(F.pad(x, (c, c, c, 0)), weight, self.bias)  # (N, out, H, W)


class VerticalConv2d(nn.Conv2d):
    """The vertical stack's convolution: a (k//2 + 1) x k kernel over the rows above and the own row.

    For k = 3 the kernel is the full 2 x 3 window ending at the output's row, unmasked:

        1 1 1     row i-1
        1 1 1     row i      (the output is at the centre of this row)

    Output (i, j) reads rows i-k//2..i and columns j-k//2..j+k//2, so a stack of them at row i sees
    every row <= i and nothing below. It does see its own pixel and those right of it in row i: the
    vertical stack therefore reaches the horizontal stack only through shift_down, one row lower,
    where all of row i is in the past. Colours need no mask for the same reason.

    Input (N, in_channels, H, W) -> output (N, out_channels, H, W), same dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"a vertical stack needs an odd kernel, got {kernel_size}")
        super().__init__(in_channels, out_channels, (kernel_size // 2 + 1, kernel_size), bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        c = self.kernel_size[1] // 2
        # k//2 zero rows above only, k//2 columns each side: output row r reads input rows r-c..r.
        return F.conv2d(F.pad(x, (c, c, c, 0)), self.weight, self.bias)  # (N, out, H, W)


class HorizontalConv2d(nn.Conv2d):
    """The horizontal stack's convolution: 1 x (k//2 + 1) over the own row, the centre masked by colour.

    For one colour and k = 3 (the centre row of MaskedConv2d's masks A and B):

        mask A      mask B
        1 0         1 1       (columns j-1, j of row i)

    At the centre, output group g sees input group g' iff g' < g (A) or g' <= g (B), exactly as
    causal_mask; pixels left of the centre are always visible, nothing right of it or in another row
    ever is. The mask is a buffer, applied in every call.

    Input (N, in_channels, H, W) -> output (N, out_channels, H, W), same dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: str,
        colours: int,
        in_groups: Tensor | None = None,
        out_groups: Tensor | None = None,
        bias: bool = True,
    ) -> None:
        c = kernel_size // 2
        super().__init__(in_channels, out_channels, (1, c + 1), bias=bias)
        in_groups = colour_groups(in_channels, colours) if in_groups is None else in_groups
        out_groups = colour_groups(out_channels, colours) if out_groups is None else out_groups
        self.mask_type = mask_type
        full = causal_mask(kernel_size, mask_type, in_groups, out_groups)  # (out, in, k, k)
        self.register_buffer("mask", full[:, :, c : c + 1, : c + 1].contiguous())  # (out, in, 1, c+1)

    def forward(self, x: Tensor) -> Tensor:
        c = self.kernel_size[1] - 1
        # c zero columns on the left only: output column j reads input columns j-c..j of its row.
        return F.conv2d(F.pad(x, (c, 0, 0, 0)), self.weight * self.mask, self.bias)  # (N, out, H, W)


def shift_down(x: Tensor) -> Tensor:
    """Row i of the output is row i-1 of x, row 0 is zeros: (N, C, H, W) -> (N, C, H, W).

    The vertical stack's features at row i have seen all of row i; shifted, they reach the
    horizontal stack at row i+1, where all of row i is in the past.
    """
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]  # (N, C, H, W)


class MultiplicativeUnit(nn.Module):
    """MU(h) = g1 * tanh(g2 * h + g3 * u), with g1, g2, g3 = sigmoid(conv(h)) and u = tanh(conv(h)).

    The four 3x3 convolutions are one convolution with 4c outputs (chunked g1 | g2 | g3 | u), which
    is the same function with a quarter of the kernel launches. `g2 * h` multiplies h, the unit's own
    input, never the raw frame: the public implementations' leak was exactly that term on the raw frame.

    h: (N, c, H, W) -> (N, c, H, W).
    """

    def __init__(self, channels: int, make_conv: ConvFactory) -> None:
        super().__init__()
        self.channels = channels
        self.gates = make_conv(channels, 4 * channels, 3)

    def forward(self, h: Tensor) -> Tensor:
        g1, g2, g3, u = self.gates(h).chunk(4, dim=1)  # 4 x (N, c, H, W)
        return torch.sigmoid(g1) * torch.tanh(torch.sigmoid(g2) * h + torch.sigmoid(g3) * torch.tanh(u))


class ResidualMultiplicativeBlock(nn.Module):
    """RMB: x + W_up(MU(MU(W_down(x)))), with 1x1 convolutions halving then restoring the width.

    x: (N, 2c, H, W) -> (N, 2c, H, W).
    """

    def __init__(self, channels: int, make_conv: ConvFactory, make_mu_conv: ConvFactory) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"an RMB needs an even residual width, got {channels}")
        half = channels // 2
        self.down = make_conv(channels, half, 1)
        self.mu1 = MultiplicativeUnit(half, make_mu_conv)
        self.mu2 = MultiplicativeUnit(half, make_mu_conv)
        self.up = make_conv(half, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.mu2(self.mu1(self.down(x))))


class ResidualReLUBlock(nn.Module):
    """x + W_up(relu(W_3x3(relu(W_down(relu(x)))))): the paper's "ReLU" variant of the RMB.

    The paper (Table 2) says no more than "ReLU" for this ablation. This is the residual block of
    PixelCNN (van den Oord et al. 2016, fig. 5) at the RMB's widths: ReLU, 1x1 conv 2c -> c, ReLU,
    3x3 conv c -> c (masked in the decoder, dilated in a dilated encoder), ReLU, 1x1 conv c -> 2c,
    plus the skip. It has one 3x3 conv c -> c where the RMB has two MUs of one 3x3 conv c -> 4c each,
    so at the same widths it has about an eighth of the RMB's 3x3 weights. ReLU is elementwise, so a
    channel's colour group (vpn.layers.colour_groups) carries through it as through an MU's gates.

    x: (N, 2c, H, W) -> (N, 2c, H, W).
    """

    def __init__(self, channels: int, make_conv: ConvFactory, make_spatial_conv: ConvFactory) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"a residual block needs an even residual width, got {channels}")
        half = channels // 2
        self.down = make_conv(channels, half, 1)
        self.spatial = make_spatial_conv(half, half, 3)
        self.up = make_conv(half, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.relu(self.spatial(F.relu(self.down(F.relu(x))))))


def run_block(block: nn.Module, x: Tensor, checkpointed: bool) -> Tensor:
    """block(x), recomputed in the backward pass when `checkpointed` (activation checkpointing).

    Only the block's input is kept for the backward; everything inside it is recomputed there
    (torch.utils.checkpoint, non-reentrant). The blocks hold no dropout or other randomness, so the
    recomputation is exact (the RNG state is preserved all the same, checkpoint's default). Outside
    autograd (no_grad, sampling, scoring) it is a plain call.
    """
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


def residual_block(
    kind: str, channels: int, make_conv: ConvFactory, make_spatial_conv: ConvFactory, make_gate_conv: ConvFactory
) -> nn.Module:
    """A residual block of `kind` ("rmb" or "relu") on `channels` (= 2c) channels.

    make_conv builds the 1x1 convs; the RMB's MUs take their fused 3x3 c -> 4c gate conv from
    make_gate_conv, the ReLU block its 3x3 c -> c conv from make_spatial_conv.
    """
    if kind == "rmb":
        return ResidualMultiplicativeBlock(channels, make_conv, make_gate_conv)
    if kind == "relu":
        return ResidualReLUBlock(channels, make_conv, make_spatial_conv)
    raise ValueError(f"block must be 'rmb' or 'relu', got {kind!r}")


class ConvLSTM(nn.Module):
    """Convolutional LSTM over time that keeps the spatial resolution (Shi et al. 2015).

    gates = conv_x(x_t) + conv_h(h_{t-1}); i, f, o = sigmoid, g = tanh;
    c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t).

    The input half of the gates is computed for all time steps in one batched convolution; only the
    recurrent half runs step by step. The first step starts from h = c = 0, where conv_h(h) = 0 and
    f * c = 0 exactly, so it skips both (the same numbers, one recurrent convolution fewer).

    Under bf16 autocast the gates come out of the convolutions in bf16, but the cell state c is kept
    and updated in fp32: it accumulates f * c + i * g over every frame (19 steps for 20 frames), and
    bf16's 8-bit mantissa would round it at each one. The gates' activations stay bf16 (what the
    backward pass saves of them), and h = o * tanh(c) is bf16 as before, as the convolutions that
    read it would cast it anyway: the backward pass keeps one fp32 tensor a step, c, where it kept
    bf16. In fp32 and fp64 nothing is cast and the formula is the plain one.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        pad = kernel_size // 2
        self.conv_x = nn.Conv2d(in_channels, 4 * hidden_channels, kernel_size, padding=pad)
        self.conv_h = nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel_size, padding=pad, bias=False)

    def initial_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Zero (h, c), each (N, hidden, H, W), matching x: (N, *, H, W)."""
        n, _, h, w = x.shape
        zeros = x.new_zeros(n, self.hidden_channels, h, w)
        return zeros, zeros

    def cell(self, gates_x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """One step from precomputed input gates (N, 4*hidden, H, W) -> new (h, c).

        state None is the zero state (h, c) = 0. c is at least fp32 (see the class docstring).
        """
        cell = torch.promote_types(gates_x.dtype, torch.float32)  # bf16 -> fp32; fp32, fp64 unchanged
        if state is None:
            i, _, o, g = gates_x.chunk(4, dim=1)  # 4 x (N, hidden, H, W); f multiplies c = 0
            c = torch.sigmoid(i).to(cell) * torch.tanh(g)
        else:
            h, c = state
            i, f, o, g = (gates_x + self.conv_h(h)).chunk(4, dim=1)  # 4 x (N, hidden, H, W)
            if c.dtype == i.dtype:
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            else:  # bf16 gates, fp32 c: both products in fp32 (type promotion), saving the gates in bf16
                c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        h = torch.sigmoid(o) * torch.tanh(c.to(o.dtype))
        return h, c

    def step(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x: (N, in, H, W) -> new (h, c), each (N, hidden, H, W). state None: start from zeros."""
        return self.cell(self.conv_x(x), state)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, in, H, W) -> hidden states h_0..h_{T-1}: (B, T, hidden, H, W)."""
        b, t = x.shape[:2]
        gates_x = self.conv_x(x.flatten(0, 1)).unflatten(0, (b, t))  # (B, T, 4*hidden, H, W)
        state = None
        hs = []
        # unbind, not gates_x[:, step]: the backward of T selects writes T zero-filled copies of all
        # of gates_x (O(T^2) memory traffic, 10% of a micro step at T = 20); unbind's is one stack.
        for gates_t in gates_x.unbind(dim=1):  # T x (B, 4*hidden, H, W)
            state = self.cell(gates_t, state)
            hs.append(state[0])
        return torch.stack(hs, dim=1)  # (B, T, hidden, H, W)
