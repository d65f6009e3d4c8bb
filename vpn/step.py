"""One optimizer update over a batch, in micro-batches (gradient accumulation): shared by
vpn.train.Trainer and vpn.memory, so the memory estimate runs the very step that trains.

The loss of a micro-batch of m of the batch's b sequences is weighted by m / b before its backward,
so the accumulated gradient is the whole batch's mean-loss gradient up to float rounding, whatever
the split. With one micro-batch the weight is exactly 1 and the numbers are today's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn


def micro_batches(batch_size: int, micro_batch_size: int | None) -> int:
    """How many micro-batches a worker's share of `batch_size` sequences splits into; names the field if it can't."""
    if micro_batch_size is None:
        return 1
    if batch_size % micro_batch_size:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} must divide each worker's share of the batch ({batch_size} sequences)"
        )
    return batch_size // micro_batch_size


def update(
    nats_fn: Callable[[Tensor], Tensor],
    model: nn.Module,
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    frames: Tensor,
    micro_batch_size: int | None,
    grad_clip: float,
) -> Tensor:
    """One update on uint8 frames (b, T, C, H, W); returns their mean nats/frame (detached, float32 scalar).

    nats_fn(frames of m sequences) -> their mean nats per frame (the forward pass and the loss).
    forward: the module nats_fn runs (a DistributedDataParallel wrapper averages the gradients over
    the ranks on the last micro-batch only: no_sync on the others).
    """
    b = frames.shape[0]
    n = micro_batches(b, micro_batch_size)
    dims = frames.shape[2] * frames.shape[3] * frames.shape[4]  # the loss per sub-pixel: clipping is size-free
    optimizer.zero_grad(set_to_none=True)  # before the forward, so last step's gradients are freed first
    total = None
    for i, chunk in enumerate(frames.chunk(n)):  # n x (b/n, T, C, H, W)
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not hasattr(forward, "no_sync") else forward.no_sync()
        with sync:
            nats = nats_fn(chunk)
            weighted = nats if n == 1 else nats * (chunk.shape[0] / b)
            (weighted / dims).backward()
        total = weighted.detach() if total is None else total + weighted.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total
