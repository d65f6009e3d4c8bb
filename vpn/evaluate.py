"""The paper's score of a split (model.nll beside the floor of the same frames), and the frame preparation.

The floor is the entropy of exactly the frames scored (vpn.metrics.bernoulli_lower_bound, the
function the data stage's lower bound uses), so a test NLL and its floor always cover the same
pixels and the excess is never below 0 by more than rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from vpn.batches import as_dataset
from vpn.config import TrainConfig
from vpn.metrics import bernoulli_lower_bound
from vpn.model import VideoPixelNetwork


@dataclass(frozen=True)
class Score:
    """A split scored as the paper scores it (Trainer.score).

    nats_per_frame: mean over sequences of model.nll (frames context..T-1, teacher forcing).
    floor_nats_per_frame: the entropy of exactly those targets (vpn.metrics.bernoulli_lower_bound),
        the least any model can score; None for the categorical head (its floor is the data's unknown
        discrete entropy, not this one).
    sequences: how many sequences were scored.
    """

    nats_per_frame: float
    floor_nats_per_frame: float | None
    sequences: int

    @property
    def excess_nats_per_frame(self) -> float | None:
        """nats_per_frame - floor: how far from the best possible (the paper's 87.6 - 86.3 = 1.3)."""
        return None if self.floor_nats_per_frame is None else self.nats_per_frame - self.floor_nats_per_frame


def prepare(frames: Tensor, cfg: TrainConfig) -> Tensor:
    """Apply seq_len and downsample: uint8 (B, T, C, H, W) -> uint8 (B, T', C, H/d, W/d)."""
    if cfg.seq_len is not None:
        if frames.shape[1] < cfg.seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} but the data has only {frames.shape[1]} frames")
        frames = frames[:, : cfg.seq_len]
    if cfg.downsample > 1:
        b, t = frames.shape[:2]
        pooled = F.avg_pool2d(frames.flatten(0, 1).float(), cfg.downsample)  # (B*T, C, H/d, W/d)
        frames = pooled.round().to(torch.uint8).unflatten(0, (b, t))
    return frames


@contextlib.contextmanager
def full_precision(device_type: str):
    """fp32 as written: no autocast, and no TF32 in CUDA matmuls or cuDNN convolutions (cuDNN allows
    TF32 by default), so that a score is the same number wherever it is computed."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@torch.no_grad()  # no graph: kept alive by the running sum, every batch's would stay until the end
def score(
    model: VideoPixelNetwork,
    data: Dataset | Tensor,
    cfg: TrainConfig,
    sequences: int | None = None,
    *,
    context: int | None = None,
    batch_size: int | None = None,
    autocast: Callable[[], Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Score:
    """Score the first `sequences` sequences of `data` (None: all of them) as the paper does.

    Each sequence is prepared as in training (cfg's seq_len and downsample), scored by model.nll over
    frames context..T-1 given the frames before (context: cfg.context unless given), and its floor is
    computed on the same prepared targets by bernoulli_lower_bound. Batches of batch_size (default
    cfg.batch_size) on the model's device; the sums stay there until the end. autocast: a context
    manager factory for the forward pass, or None (the default, and what the Trainer and `vpn eval`
    use) for full_precision: fp32 without TF32, so a trial's test NLL equals `vpn eval`'s.

    world_size N > 1 (torch.distributed initialised, every rank calling): rank r scores sequences
    [r*n/N, (r+1)*n/N) in batches of batch_size/N and the sums are all-reduced, so every rank
    returns the same Score, equal to one process's up to the order of the float64 additions.
    """
    data = as_dataset(data)
    n = len(data) if sequences is None else min(len(data), sequences)
    if n < 1:
        raise ValueError("nothing to score: the data holds no sequence")
    context = cfg.context if context is None else context
    batch_size = max(1, (batch_size or cfg.batch_size) // world_size)
    first, last = rank * n // world_size, (rank + 1) * n // world_size  # this rank's sequences
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bernoulli = model.cfg.output == "bernoulli"
    total = torch.zeros((), dtype=torch.float64, device=device)
    floor = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for start in range(first, last, batch_size):
            batch = torch.stack([data[k] for k in range(start, min(last, start + batch_size))])
            frames = prepare(batch.to(device), cfg)
            with autocast() if autocast is not None else full_precision(device.type):
                total += model.nll(frames, context).sum()
            if bernoulli:
                floor += bernoulli_lower_bound(frames, context).sum()
    finally:
        model.train(was_training)
    if world_size > 1:
        sums = torch.stack([total, floor])  # one collective for both
        dist.all_reduce(sums)
        total, floor = sums[0], sums[1]
    return Score(float(total) / n, float(floor) / n if bernoulli else None, n)
