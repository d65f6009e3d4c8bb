"""The plain reference the benchmarks measure against: the same VPN, written the way the public
implementations write it.

- Each MultiplicativeUnit runs its four 3x3 convolutions (g1, g2, g3, u) as four separate
  convolutions, as in the paper's equations and the TF code, instead of vpn's one fused 4c conv.
- Every masked convolution runs its full k x k kernel times the mask (`F.conv2d(x, w * mask)`),
  masked taps included.
- The ConvLSTM runs its recurrent convolution at every step, the first one (on h = 0) included.
- fp32, eager, contiguous NCHW: `reference_model` never compiles, casts or changes memory format.

`reference_model(model)` builds it from a VideoPixelNetwork by copying the model and splitting each
fused `gates` conv into four, so both compute the same function from the same weights
(tests/test_speed_equivalence.py checks the logits; benchmarks/bench_train.py checks them again on
the benchmark's own batch).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpn.layers import ConvLSTM, MaskedConv2d, MultiplicativeUnit
from vpn.model import VideoPixelNetwork


class PlainMaskedConv2d(nn.Conv2d):
    """A masked conv that always runs its whole kernel: F.conv2d(x, weight * mask).

    (N, in, H, W) -> (N, out, H, W), same dtype.
    """

    def __init__(self, conv: MaskedConv2d, rows: slice = slice(None)) -> None:
        weight = conv.weight[rows]
        super().__init__(
            weight.shape[1],
            weight.shape[0],
            conv.kernel_size,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias[rows])
        self.register_buffer("mask", conv.mask[rows].clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation)


def _split(conv: nn.Module, rows: slice) -> nn.Module:
    """Output channels `rows` of a (masked or plain) conv, as a conv of its own with those weights."""
    if isinstance(conv, MaskedConv2d):
        return PlainMaskedConv2d(conv, rows)
    # Exactly Conv2d: a subclass (the stacks' VerticalConv2d, HorizontalConv2d) pads or masks in its
    # forward, which a plain copy of its weights would drop.
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"expected a MaskedConv2d or a plain Conv2d, got {type(conv).__name__}")
    weight = conv.weight[rows]
    part = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        part.weight.copy_(weight)
        if conv.bias is not None:
            part.bias.copy_(conv.bias[rows])
    return part


class SeparateMultiplicativeUnit(nn.Module):
    """MU(h) = g1 * tanh(g2 * h + g3 * u) with its four convolutions kept separate.

    Built from a fused MultiplicativeUnit: conv k holds output channels [k*c, (k+1)*c) of `gates`.
    h: (N, c, H, W) -> (N, c, H, W).
    """

    def __init__(self, mu: MultiplicativeUnit) -> None:
        super().__init__()
        c = mu.channels
        self.conv_g1, self.conv_g2, self.conv_g3, self.conv_u = (
            _split(mu.gates, slice(k * c, (k + 1) * c)) for k in range(4)
        )

    def forward(self, h: Tensor) -> Tensor:
        g1 = torch.sigmoid(self.conv_g1(h))
        g2 = torch.sigmoid(self.conv_g2(h))
        g3 = torch.sigmoid(self.conv_g3(h))
        u = torch.tanh(self.conv_u(h))
        return g1 * torch.tanh(g2 * h + g3 * u)


class PlainConvLSTM(ConvLSTM):
    """The ConvLSTM as first written: every step, the first included, adds conv_h(h) to the gates.

    x: (B, T, in, H, W) -> (B, T, hidden, H, W).
    """

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        gates_x = self.conv_x(x.flatten(0, 1)).unflatten(0, (b, t))  # (B, T, 4*hidden, H, W)
        state = self.initial_state(gates_x[:, 0])  # explicit zeros, convolved like any state
        hs = []
        for step in range(t):
            state = self.cell(gates_x[:, step], state)
            hs.append(state[0])
        return torch.stack(hs, dim=1)  # (B, T, hidden, H, W)


def _plain_lstm(lstm: ConvLSTM) -> PlainConvLSTM:
    weight = lstm.conv_x.weight
    plain = PlainConvLSTM(lstm.conv_x.in_channels, lstm.hidden_channels, lstm.conv_x.kernel_size[0])
    plain.to(weight.device, weight.dtype).load_state_dict(lstm.state_dict())
    return plain


def reference_model(model: VideoPixelNetwork, dtype: torch.dtype = torch.float32) -> VideoPixelNetwork:
    """A copy of `model` (same weights, same config) with every MU split into four convolutions,
    every masked conv running its full kernel and the LSTM convolving its zero initial state. The
    copy is contiguous NCHW with parameters of `dtype` (fp32 for the benchmarks; the tests compare
    in float64); `model` is left as it is. The parameter count is unchanged (the four parts of each
    MU hold exactly the fused weights)."""
    ref = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.contiguous_format)
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MultiplicativeUnit):
                setattr(module, name, SeparateMultiplicativeUnit(child))
            elif isinstance(child, MaskedConv2d):
                setattr(module, name, PlainMaskedConv2d(child))
            elif isinstance(child, ConvLSTM):
                setattr(module, name, _plain_lstm(child))
    return ref
