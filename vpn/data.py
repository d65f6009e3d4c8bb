"""Moving MNIST as the models see it: memory-mapped uint8 videos (N, T, C, H, W).

The data stage (pipeline/data/generate.py) writes one .npy per split under a root folder
(data/moving_mnist by default): train.npy, val.npy, test.npy, each uint8 (N, T, C, H, W) with C = 1
(grey) or 3 (the coloured variant), plus <split>_meta.parquet and stats.json. Here the arrays are
opened with np.load(mmap_mode="r"), so a dataset of any size costs no RAM until a sequence is read,
and DataLoader workers share the page cache instead of each holding a copy.

This module knows nothing of DVC, Ray or MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vpn.files import read_json_object

SPLITS = ("train", "val", "test")
STATS_FILE = "stats.json"


def split_path(root: str | Path, split: str) -> Path:
    """Path of a split's video array: root/<split>.npy."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return Path(root) / f"{split}.npy"


def meta_path(root: str | Path, split: str) -> Path:
    """Path of a split's per-sequence metadata: root/<split>_meta.parquet."""
    return split_path(root, split).with_name(f"{split}_meta.parquet")


def load_split(root: str | Path, split: str) -> np.memmap:
    """Memory-map a split read-only: uint8 (N, T, C, H, W), nothing read into RAM yet.

    Raises FileNotFoundError naming the file (and what the folder does hold) when the split is
    missing, and ValueError naming the file when it is not a uint8 array with 5 dimensions.
    """
    path = split_path(root, split)
    if not path.is_file():
        root = Path(root)
        present = sorted(p.name for p in root.glob("*.npy")) if root.is_dir() else []
        held = f"it holds {', '.join(present)}" if present else "it holds no .npy files"
        raise FileNotFoundError(
            f"{path}: split '{split}' not found ({held}); run `dvc repro generate` to make the data"
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array: {e}") from e
    if array.dtype != np.uint8 or array.ndim != 5:
        raise ValueError(f"{path}: expected uint8 (N, T, C, H, W), got {array.dtype} with shape {array.shape}")
    if 0 in array.shape:  # nothing to train on, score or draw a frame of
        raise ValueError(f"{path}: holds no data (shape {array.shape}: N, T, C, H, W must all be >= 1)")
    return array


def read_stats(root: str | Path) -> dict[str, Any]:
    """The data stage's stats.json (shapes, lower bounds in nats/frame, generation params).

    Raises FileNotFoundError when it is missing and ValueError naming it when it is not a JSON object.
    """
    path = Path(root) / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stats file; run `dvc repro generate` to make the data")
    try:
        return read_json_object(path)
    except ValueError as e:
        raise ValueError(f"{e}; run `dvc repro generate` to make the data again") from None


class MovingMNIST(Dataset):
    """One split of Moving MNIST; item i is sequence i as a uint8 tensor (T, C, H, W).

    The array is memory-mapped (see load_split). The map is not pickled: a DataLoader worker started
    by spawn reopens the file rather than receiving a copy of the whole array.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        self.path = split_path(root, split)
        self._data: np.memmap | None = load_split(root, split)  # validates now, not in a worker
        self.shape: tuple[int, ...] = tuple(self._data.shape)  # (N, T, C, H, W)

    @property
    def data(self) -> np.memmap:
        """The memory-mapped uint8 array (N, T, C, H, W), reopened lazily after unpickling."""
        if self._data is None:
            self._data = load_split(self.root, self.split)
        return self._data

    @property
    def seq_len(self) -> int:
        return self.shape[1]

    @property
    def channels(self) -> int:
        return self.shape[2]

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.shape[3], self.shape[4]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        """uint8 tensor (T, C, H, W), a private copy (the map itself is read-only)."""
        return torch.from_numpy(np.array(self.data[index]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    def __repr__(self) -> str:
        return f"MovingMNIST(root={str(self.root)!r}, split={self.split!r}, shape={self.shape})"


def training_source(root: str | Path, data: str = "fixed", seed: int = 0) -> Dataset:
    """The training sequences of a data folder, as TrainConfig.data asks: "fixed" is train.npy,
    "stream" draws fresh sequences from its train_digits.npy without end (MovingMNISTStream)."""
    if data == "stream":
        from vpn.moving_mnist import MovingMNISTStream

        return MovingMNISTStream.from_folder(root, seed)
    if data != "fixed":
        raise ValueError(f"data must be 'fixed' or 'stream', got {data!r}")
    return MovingMNIST(root, "train")


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding uint8 batches (B, T, C, H, W).

    Shuffling draws from its own torch.Generator seeded with `seed`, so the order of batches is
    reproducible and independent of the global RNG the model's initialisation uses.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
