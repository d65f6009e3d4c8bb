"""Which sequences each update trains on: a pure function of (seed, step, rank), never sampler state.

From a fixed set (`data: fixed`): sequences drawn with replacement by a generator seeded from
(seed, step). From a stream (`data: stream`, vpn.moving_mnist.MovingMNISTStream): sequences
(s-1)*B .. s*B-1, each a function of (seed, its index), so no two steps share one. A resumed run
sees the batches an uninterrupted one would, and data-parallel rank r takes items
[r*B/N, (r+1)*B/N) of each.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


def as_dataset(data: Dataset | Tensor) -> Dataset:
    """A uint8 tensor (N, T, C, H, W) or any Dataset of uint8 (T, C, H, W) items -> Dataset."""
    if isinstance(data, Tensor):
        if data.dtype != torch.uint8 or data.ndim != 5:
            raise ValueError(f"sequence tensor must be uint8 (N, T, C, H, W), got {data.dtype} {tuple(data.shape)}")
        return _Sequences(data)
    return data


class _Sequences(Dataset):
    def __init__(self, data: Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Sequence indices of the batch for update `step` (1-based): a pure function of its arguments."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (batch_size,), generator=g).tolist()


def stream_indices(batch_size: int, step: int) -> list[int]:
    """Stream sequences of the batch for update `step` (1-based): (step-1)*B .. step*B-1, each drawn
    once in a run (the stream's own seed makes them differ between runs)."""
    return list(range((step - 1) * batch_size, step * batch_size))


def is_stream(data: Dataset) -> bool:
    """True for a source without end (vpn.moving_mnist.MovingMNISTStream), indexed by stream_indices."""
    return bool(getattr(data, "streamed", False))


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s part of a step's batch: items [r*B/N, (r+1)*B/N) (B must be a multiple of N)."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank : (rank + 1) * per_rank]


class StepBatches(torch.utils.data.Sampler):
    """Yields the batches of steps start+1 .. end (batch_indices or stream_indices), for a
    DataLoader's batch_sampler; with world_size N, only rank's shard of each (see `shard`)."""

    def __init__(
        self, n: int | None, batch_size: int, seed: int, start: int, end: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n, self.batch_size, self.seed, self.start, self.end = n, batch_size, seed, start, end
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self):
        for step in range(self.start + 1, self.end + 1):
            if self.n is None:
                indices = stream_indices(self.batch_size, step)
            else:
                indices = batch_indices(self.n, self.batch_size, self.seed, step)
            yield shard(indices, self.rank, self.world_size)
