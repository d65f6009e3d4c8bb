"""The Video Pixel Network: encoder -> ConvLSTM -> PixelCNN decoder (Kalchbrenner et al. 2016, fig. 1).

p(video) = prod_t prod_i prod_j prod_colour p(x[t, colour, i, j] | frames < t, pixels above and left
in frame t, earlier colours of pixel (i, j)).

- Every frame F_0..F_{T-2} goes through the same resolution-preserving encoder of `enc_blocks`
  residual blocks (RMBs, or PixelCNN's ReLU blocks with `block="relu"`).
- A ConvLSTM runs over the encoded frames; its state after frame t-1 is the context of frame t.
- The decoder for frame t is a PixelCNN of `dec_blocks` masked RMBs. The current frame enters only
  through a mask-A convolution, and every later layer is mask-B, so no pixel sees its own value. The
  context (which depends only on earlier frames) is added through unmasked 1x1 convolutions before
  the first block and before every block, so it reaches every position at every depth.
  (How the paper injects the context is not stated; the TF code concatenates it once at the input.)
- `decoder="baseline"` is the paper's baseline: the same encoder and ConvLSTM, and a decoder of the
  same depth that reads only the context, so the pixels of a frame are independent given the past.
- `decoder="stacks"` replaces the masked decoder by Gated PixelCNN's vertical and horizontal stacks
  (van den Oord et al. 2016), built of the same residual blocks, without PixelCNN's blind spot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpn.config import VPNConfig
from vpn.layers import (
    ConvLSTM,
    HorizontalConv2d,
    MaskedConv2d,
    VerticalConv2d,
    colour_groups,
    residual_block,
    run_block,
    shift_down,
    to_input,
)
from vpn.metrics import bernoulli_cross_entropy, categorical_cross_entropy, grey_targets, per_frame
from vpn.sample import sample_video


class Encoder(nn.Module):
    """Resolution-preserving CNN applied to each frame: (N, C, H, W) float -> (N, 2c, H, W)."""

    def __init__(self, cfg: VPNConfig) -> None:
        super().__init__()
        width = cfg.residual_channels
        self.stem = nn.Conv2d(cfg.image_channels, width, 3, padding=1)
        blocks = []
        for rate in cfg.encoder_dilations():
            # The block's 3x3 convs (an RMB's MU gates, a ReLU block's middle conv) share its rate.
            def spatial_conv(cin: int, cout: int, k: int, rate: int = rate) -> nn.Module:
                return nn.Conv2d(cin, cout, k, padding=rate * (k // 2), dilation=rate)

            blocks.append(residual_block(cfg.block, width, _plain_conv, spatial_conv, spatial_conv))
        self.blocks = nn.Sequential(*blocks)

    checkpointed = False  # activation checkpointing per block (VideoPixelNetwork.set_activation_checkpointing)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = run_block(block, h, self.checkpointed)
        return h


def _plain_conv(cin: int, cout: int, k: int) -> nn.Module:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class Decoder(nn.Module):
    """PixelCNN over the current frame, conditioned on the LSTM context.

    frame: (N, C, H, W) float in [-1, 1]; context: (N, L, H, W)
    -> logits (N, C * K, H, W), channels ordered (colour, K) with K = 256 or 1.
    """

    def __init__(self, cfg: VPNConfig) -> None:
        super().__init__()
        colours, width = cfg.image_channels, cfg.residual_channels
        self.colours, self.width, self.n_blocks = colours, width, cfg.dec_blocks

        def masked_b(cin: int, cout: int, k: int) -> nn.Module:
            return MaskedConv2d(cin, cout, k, "B", colours)

        def mu_gates(cin: int, cout: int, k: int) -> nn.Module:
            # The fused conv's output is g1 | g2 | g3 | u, each of width cin; channel j of each chunk
            # multiplies channel j of h, so each chunk repeats h's colour split.
            return MaskedConv2d(cin, cout, k, "B", colours, out_groups=colour_groups(cin, colours).repeat(4))

        # The raw current frame's only way in: a mask-A conv, so pixel (i, j) colour g sees only
        # pixels before it and colours before g.
        self.frame_in = MaskedConv2d(colours, width, 3, "A", colours)
        # Context of all earlier frames may reach every position and colour: unmasked, one 1x1
        # conv producing the bias of the input layer and of each block.
        self.context_in = nn.Conv2d(cfg.lstm_channels, width * (cfg.dec_blocks + 1), 1)
        self.blocks = nn.ModuleList(
            residual_block(cfg.block, width, masked_b, masked_b, mu_gates) for _ in range(cfg.dec_blocks)
        )
        k = cfg.out_channels_per_colour
        self.head_hidden = MaskedConv2d(width, width, 1, "B", colours)
        self.head_out = MaskedConv2d(
            width, colours * k, 1, "B", colours, out_groups=torch.arange(colours).repeat_interleave(k)
        )

    uses_frame = True
    checkpointed = False

    def forward(self, frame: Tensor, context: Tensor) -> Tensor:
        cond = self.context_in(context).chunk(self.n_blocks + 1, dim=1)  # (n_blocks+1) x (N, 2c, H, W)
        h = self.frame_in(frame) + cond[0]
        for block, bias in zip(self.blocks, cond[1:]):
            h = run_block(block, h + bias, self.checkpointed)
        return self.head_out(F.relu(self.head_hidden(F.relu(h))))


class BaselineDecoder(nn.Module):
    """The paper's baseline decoder: the PixelCNN decoder's depth and widths, without the frame.

    Kalchbrenner et al. 2016, sec. 5: the baseline has the VPN's encoders and ConvLSTM, but pixels
    within a frame (and colours within a pixel) are independent given the earlier frames. Here: the
    context enters as in Decoder (one 1x1 conv giving the input and each block's bias), then
    `dec_blocks` unmasked residual blocks and the same 1x1 head, unmasked. The current frame has no
    way in at all, so a whole frame is sampled in one pass.

    frame: ignored (None is fine); context: (N, L, H, W) -> logits (N, C * K, H, W).
    """

    uses_frame = False
    checkpointed = False

    def __init__(self, cfg: VPNConfig) -> None:
        super().__init__()
        colours, width = cfg.image_channels, cfg.residual_channels
        self.colours, self.width, self.n_blocks = colours, width, cfg.dec_blocks
        self.context_in = nn.Conv2d(cfg.lstm_channels, width * (cfg.dec_blocks + 1), 1)
        self.blocks = nn.ModuleList(
            residual_block(cfg.block, width, _plain_conv, _plain_conv, _plain_conv) for _ in range(cfg.dec_blocks)
        )
        self.head_hidden = nn.Conv2d(width, width, 1)
        self.head_out = nn.Conv2d(width, colours * cfg.out_channels_per_colour, 1)

    def forward(self, frame: Tensor | None, context: Tensor) -> Tensor:
        cond = self.context_in(context).chunk(self.n_blocks + 1, dim=1)  # (n_blocks+1) x (N, 2c, H, W)
        h = cond[0]
        for block, bias in zip(self.blocks, cond[1:]):
            h = run_block(block, h + bias, self.checkpointed)
        return self.head_out(F.relu(self.head_hidden(F.relu(h))))


class StacksDecoder(nn.Module):
    """The PixelCNN decoder without the blind spot: Gated PixelCNN's two stacks, of the VPN's blocks.

    The masked decoder (Decoder) is blind to the pixels above and right of a cone: a 3x3 mask-B
    kernel reaches one column further right per row up, so pixel (i, j) never sees (i-d, j+d+1..).
    van den Oord et al. 2016 ("Conditional Image Generation with PixelCNN Decoders", sec. 2.2) split
    the decoder into two stacks; here each stack is a chain of the VPN's residual blocks:

    - vertical stack v: every 3x3 conv of a block (an RMB's two MU gate convs, c -> 4c; a ReLU
      block's middle conv, c -> c) becomes a VerticalConv2d, a 2x3 kernel over the row above and
      the own row, unmasked; its 1x1 convs are plain. v at row i sees every row <= i, all columns
      within reach, including its own pixel: it never feeds the output directly.
    - horizontal stack h: every 3x3 conv becomes a HorizontalConv2d, a 1x2 kernel over the pixel to
      the left and the own pixel, the own pixel masked by colour; its 1x1 convs are mask B. h at (i, j)
      sees pixels left of j in row i only, and earlier colours of (i, j).
    - the link: before block n of h, a 1x1 conv of v after block n, shifted down one row
      (shift_down), is added to h's residual stream. h at row i thus gets v of rows <= i-1: every
      earlier row, right of j as well as left. v never reads h.

    An MU stays the paper's MU(h) = g1 * tanh(g2 * h + g3 * u) in both stacks (not gated tanh
    units): only its convolution changes. Inputs: the frame enters v through a VerticalConv2d and h
    through a mask-A HorizontalConv2d (C -> 2c each); the context, from earlier frames only, is
    added to both stacks before the input layer and before every block (one 1x1 conv, as
    Decoder.context_in). The head (1x1 mask B, as Decoder's) reads h.

    RGB: h's channels are split into R, G, B groups as in Decoder; at the own pixel group g reads
    groups < g (mask A, the frame) or <= g (mask B), and every other path into h (v through the link,
    the context) comes from earlier rows or earlier frames, so R before G before B holds at the
    centre tap. v needs no colour split.

    Cost: per block the stacks hold 6 + 2 = 8 taps where the masked decoder's 3x3 kernels hold 9
    (3 of them always masked), plus h's copies of the 1x1 convs (2c -> c, c -> 2c), the 2c x 2c link
    and a second context projection. At equal depth and width that is 5-7% more decoder parameters
    with RMBs (2-3% of the whole model), where the gate convs dominate, and about 60% more with ReLU
    blocks, where the 1x1 convs do. It also runs more multiply-adds than the masked decoder, which
    skips its always-masked kernel row: 8 taps against 6.

    frame: (N, C, H, W) float in [-1, 1]; context: (N, L, H, W)
    -> logits (N, C * K, H, W), channels ordered (colour, K) with K = 256 or 1.
    """

    uses_frame = True
    checkpointed = False

    def __init__(self, cfg: VPNConfig) -> None:
        super().__init__()
        colours, width = cfg.image_channels, cfg.residual_channels
        self.colours, self.width, self.n_blocks = colours, width, cfg.dec_blocks

        def masked_b(cin: int, cout: int, k: int) -> nn.Module:
            return MaskedConv2d(cin, cout, k, "B", colours)

        def horizontal(cin: int, cout: int, k: int) -> nn.Module:
            return HorizontalConv2d(cin, cout, k, "B", colours)

        def horizontal_gates(cin: int, cout: int, k: int) -> nn.Module:
            # g1 | g2 | g3 | u, each repeating h's colour split (see Decoder's mu_gates).
            return HorizontalConv2d(cin, cout, k, "B", colours, out_groups=colour_groups(cin, colours).repeat(4))

        self.frame_in_v = VerticalConv2d(colours, width, 3)
        self.frame_in_h = HorizontalConv2d(colours, width, 3, "A", colours)
        # Biases of both stacks' input layers and of each block: v's n+1 chunks, then h's n+1.
        self.context_in = nn.Conv2d(cfg.lstm_channels, 2 * width * (cfg.dec_blocks + 1), 1)
        self.v_blocks = nn.ModuleList(
            residual_block(cfg.block, width, _plain_conv, VerticalConv2d, VerticalConv2d) for _ in range(cfg.dec_blocks)
        )
        self.h_blocks = nn.ModuleList(
            residual_block(cfg.block, width, masked_b, horizontal, horizontal_gates) for _ in range(cfg.dec_blocks)
        )
        # No bias: the context conv already gives each block's input a bias.
        self.links = nn.ModuleList(nn.Conv2d(width, width, 1, bias=False) for _ in range(cfg.dec_blocks))
        k = cfg.out_channels_per_colour
        self.head_hidden = MaskedConv2d(width, width, 1, "B", colours)
        self.head_out = MaskedConv2d(
            width, colours * k, 1, "B", colours, out_groups=torch.arange(colours).repeat_interleave(k)
        )

    def forward(self, frame: Tensor, context: Tensor) -> Tensor:
        n = self.n_blocks
        cond = self.context_in(context).chunk(2 * (n + 1), dim=1)  # 2(n+1) x (N, 2c, H, W)
        cond_v, cond_h = cond[: n + 1], cond[n + 1 :]
        v = self.frame_in_v(frame) + cond_v[0]  # row i: rows <= i
        h = self.frame_in_h(frame) + cond_h[0]  # (i, j): pixels left of j in row i, earlier colours
        blocks = zip(self.v_blocks, self.h_blocks, self.links, cond_v[1:], cond_h[1:])
        for v_block, h_block, link, bias_v, bias_h in blocks:
            v = run_block(v_block, v + bias_v, self.checkpointed)
            h = run_block(
                h_block, h + bias_h + shift_down(link(v)), self.checkpointed
            )  # link(v) at row i-1: rows <= i-1
        return self.head_out(F.relu(self.head_hidden(F.relu(h))))


DECODER_CLASSES: dict[str, type[nn.Module]] = {
    "pixelcnn": Decoder,
    "baseline": BaselineDecoder,
    "stacks": StacksDecoder,
}


class VideoPixelNetwork(nn.Module):
    """A Video Pixel Network built from a VPNConfig.

    forward(frames uint8 (B, T, C, H, W)) -> logits predicting frames 1..T-1, each from everything
    before it: (B, T-1, C, 256, H, W) float for "categorical", (B, T-1, C, H, W) for "bernoulli".
    """

    def __init__(self, cfg: VPNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.lstm = ConvLSTM(cfg.residual_channels, cfg.lstm_channels)
        self.decoder = DECODER_CLASSES[cfg.decoder](cfg)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute every residual block of the encoder and decoder in the backward pass (on) or not.

        Per block, because the blocks hold nearly all of the saved activations: for the full model,
        one 64x64 sequence of 20 frames in fp32, 13.1 GiB are saved, of which the ConvLSTM keeps
        0.6 GiB; checkpointing the blocks leaves 2.5 GiB (docs/memory.md). A block then keeps only
        its input, 2c channels, at the price of running each block's forward twice. The numbers do
        not change (tests/test_memory.py, float64).
        """
        self.encoder.checkpointed = self.decoder.checkpointed = bool(on)

    # -- the three stages, reused by the sampler ------------------------------------------------
    def encode(self, frames: Tensor) -> Tensor:
        """uint8 (B, T, C, H, W) -> encoder features (B, T, 2c, H, W)."""
        b, t = frames.shape[:2]
        x = to_input(frames.flatten(0, 1), self._dtype)  # (B*T, C, H, W)
        return self.encoder(x).unflatten(0, (b, t))

    def decode(self, frame: Tensor | None, context: Tensor) -> Tensor:
        """frame uint8 (N, C, H, W), context (N, L, H, W) -> logits (N, C, K, H, W) (K = 256 or 1).

        A decoder that does not read the current frame (the baseline) takes frame None too.
        """
        x = to_input(frame, self._dtype) if self.decoder.uses_frame else None
        logits = self.decoder(x, context)  # (N, C*K, H, W)
        return logits.unflatten(1, (self.cfg.image_channels, self.cfg.out_channels_per_colour))

    def forward(self, frames: Tensor) -> Tensor:
        self._check_frames(frames, min_frames=2)
        b, t = frames.shape[:2]
        context = self.lstm(self.encode(frames[:, :-1]))  # (B, T-1, L, H, W): context[:, t] sees frames <= t
        logits = self.decode(frames[:, 1:].flatten(0, 1), context.flatten(0, 1))  # (B*(T-1), C, K, H, W)
        logits = logits.unflatten(0, (b, t - 1))  # (B, T-1, C, K, H, W)
        return logits if self.cfg.output == "categorical" else logits.squeeze(3)

    # -- likelihood -----------------------------------------------------------------------------
    def frame_nll(self, logits: Tensor, frames: Tensor) -> Tensor:
        """Nats per frame of each predicted frame.

        logits: forward's output for frames; frames uint8 (B, T, C, H, W) -> (B, T-1) float32.
        """
        target = frames[:, 1:]  # (B, T-1, C, H, W)
        if self.cfg.output == "categorical":
            return per_frame(_categorical_nll(logits, target))
        return per_frame(bernoulli_cross_entropy(grey_targets(target), logits=logits))

    def nll(self, frames: Tensor, context: int = 10) -> Tensor:
        """uint8 (B, T, C, H, W) -> (B,) nats per frame, averaged over frames context..T-1.

        Each frame is scored given every frame before it (teacher forcing), as the paper scores the
        10 frames after 10 of context.
        """
        if not 1 <= context < frames.shape[1]:
            raise ValueError(f"context={context} must be in [1, T) for T={frames.shape[1]}")
        per = self.frame_nll(self(frames), frames)  # (B, T-1): column k scores frame k+1
        return per[:, context - 1 :].mean(dim=1)

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        context_frames: Tensor,
        n_frames: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        method: str = "cached",
    ) -> Tensor:
        """Sample n_frames new frames after context_frames, pixel by pixel and colour by colour.

        context_frames: uint8 (B, Tc, C, H, W) with Tc >= 1 -> uint8 (B, n_frames, C, H, W).
        Each value is drawn from the model's distribution (not argmax) at `temperature`; the same
        generator state gives the same sample. method "cached" computes one position per layer per
        pixel; "naive" reruns the whole decoder for every pixel (the public implementations' way,
        kept as the reference).
        """
        return sample_video(self, context_frames, n_frames, generator, temperature, method)

    @property
    def _dtype(self) -> torch.dtype:
        # Inputs follow the weights' dtype (float64 in the causality tests); autocast handles bf16.
        return self.encoder.stem.weight.dtype

    # -- accounting -----------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_frame(self, height: int = 64, width: int = 64) -> int:
        """Forward FLOPs (2 x multiply-adds of every conv with its whole kernel, masked taps
        included) to encode one frame, step the LSTM once and decode one frame of height x width.

        This is the model's nominal cost, the figure throughput is quoted against. A forward pass
        executes somewhat less: masked convs skip their always-masked kernel rows, and the LSTM's
        first step skips its recurrent conv (see vpn/layers.py).
        """
        return count_flops_per_frame(self.cfg, height, width)

    def _check_frames(self, frames: Tensor, min_frames: int) -> None:
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8 intensities, got {frames.dtype}")
        if frames.ndim != 5 or frames.shape[2] != self.cfg.image_channels:
            raise ValueError(f"frames must be (B, T, {self.cfg.image_channels}, H, W), got {tuple(frames.shape)}")
        if frames.shape[1] < min_frames:
            raise ValueError(f"need at least {min_frames} frames, got T={frames.shape[1]}")


def _categorical_nll(logits: Tensor, target: Tensor) -> Tensor:
    """- log p(x) of each sub-pixel: logits (B, T', C, 256, H, W), target uint8 (B, T', C, H, W)
    -> float32 (B, T', C, H, W).

    Channels_last logits (the decoder's NHWC output on CUDA) hold a sub-pixel's 256 values side by
    side, so they are scored as rows: the log_softmax over dim 1 of (N, 256, H, W) in
    categorical_cross_entropy would first copy every logit into NCHW order (an extra logits-sized
    tensor at the loss's peak). Contiguous logits take categorical_cross_entropy as they are.
    """
    rows = logits.permute(0, 1, 4, 5, 2, 3)  # (B, T', H, W, C, 256): the memory order of channels_last
    if logits.is_contiguous() or not rows.is_contiguous():
        return categorical_cross_entropy(logits, target)
    k = rows.shape[-1]
    flat_target = target.permute(0, 1, 3, 4, 2).reshape(-1).long()  # (B*T'*H*W*C,), the rows' order
    nll = F.cross_entropy(rows.float().reshape(-1, k), flat_target, reduction="none")  # (B*T'*H*W*C,)
    return nll.view(rows.shape[:-1]).permute(0, 1, 4, 2, 3)  # (B, T', C, H, W)


def count_flops_per_frame(cfg: VPNConfig, height: int = 64, width: int = 64) -> int:
    """FLOPs of one frame's forward pass for cfg at height x width (see flops_per_frame).

    Every convolution of the model runs exactly once per frame (encoder, one LSTM step, decoder),
    stride 1 with "same" padding, so each costs 2 x (its weight's size) x height x width. Counted
    from the weights of a model built on the meta device: no memory, no compute.
    """
    with torch.device("meta"):
        model = VideoPixelNetwork(cfg)
    taps = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    return 2 * taps * height * width
