"""The paper's likelihood metrics, in nats per frame.

Kalchbrenner et al. 2016, section 5.1: on Moving MNIST the model is scored with the sigmoid
cross-entropy against grey-level targets z = x / 255,

    NLL(frame) = - sum over pixels [ z log y + (1 - z) log(1 - y) ],

averaged over the predicted frames (10 frames given 10 of context), in nats per frame. The lower bound
of that score is the same sum with y = z, the entropy of the targets (86.3 on the standard test set).
Both the model's Bernoulli NLL and the data stage's lower bound call `bernoulli_cross_entropy`, so the
two numbers are computed by one function and are directly comparable.

The general model (a 256-way softmax over raw intensities) is scored by `categorical_cross_entropy`,
also in nats per frame (sum over every colour channel of every pixel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grey_targets(frames: Tensor) -> Tensor:
    """uint8 intensities -> float grey levels z = x / 255 in [0, 1], same shape, float32."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    return frames.float() / 255.0


def bernoulli_cross_entropy(z: Tensor, *, logits: Tensor | None = None, probs: Tensor | None = None) -> Tensor:
    """Elementwise - [z log y + (1 - z) log(1 - y)] in nats, for y given as logits or as probs.

    z: float targets in [0, 1], any shape. Exactly one of `logits` or `probs` (same shape as z).
    With probs, 0 log 0 is taken as 0 (torch.xlogy), so probs=z gives the entropy of the targets
    exactly, also where z is 0 or 1. With logits the computation is the numerically stable one.
    Returns a float32 tensor of z's shape.
    """
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits= or probs=")
    z = z.float()
    if logits is not None:
        return F.binary_cross_entropy_with_logits(logits.float(), z, reduction="none")
    y = probs.float()
    return -(torch.xlogy(z, y) + torch.xlogy(1.0 - z, 1.0 - y))


def categorical_cross_entropy(logits: Tensor, frames: Tensor) -> Tensor:
    """Elementwise - log p(x) in nats under a 256-way softmax.

    logits: (..., 256, H, W) float, frames: (..., H, W) uint8 with the same leading dims.
    Returns float32 (..., H, W).
    """
    lead = frames.shape[:-2]
    flat_logits = logits.float().reshape(-1, 256, *logits.shape[-2:])  # (N, 256, H, W)
    flat_target = frames.long().reshape(-1, *frames.shape[-2:])  # (N, H, W)
    nll = F.cross_entropy(flat_logits, flat_target, reduction="none")  # (N, H, W)
    return nll.reshape(*lead, *frames.shape[-2:])


def per_frame(elementwise: Tensor) -> Tensor:
    """Sum an elementwise score over (C, H, W): (..., C, H, W) -> (...) nats per frame."""
    return elementwise.sum(dim=(-3, -2, -1))


def bernoulli_lower_bound(frames: Tensor, context: int = 10) -> Tensor:
    """Entropy of the grey-level targets, in nats per frame, over the frames after `context`.

    frames: uint8 (B, T, C, H, W). Returns float32 (B,): for each sequence, the mean over frames
    context..T-1 of the per-frame sum of H(z). This is the paper's lower bound on the Bernoulli NLL.
    """
    if not 0 <= context < frames.shape[1]:
        raise ValueError(f"context={context} must be in [0, T) for T={frames.shape[1]}")
    z = grey_targets(frames[:, context:])  # (B, T-context, C, H, W)
    return per_frame(bernoulli_cross_entropy(z, probs=z)).mean(dim=1)
