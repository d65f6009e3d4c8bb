"""Moving MNIST, the procedure of Srivastava et al. 2015, shared by the data stage and the stream.

One implementation of the protocol serves both ways of making sequences, so they cannot drift apart:

- pipeline/data/generate.py (DVC stage `generate`) renders the fixed train/val/test files, drawing every
  random choice of a split from one generator (`plan_split`);
- `MovingMNISTStream` draws fresh training sequences without end, as the paper trains (its models saw
  19.2M sequences), each from its own generator seeded by (seed, sequence id), so that the batch of
  step s is a pure function of (seed, s) and a resumed run sees what an uninterrupted one saw.

The procedure, following their generator code (vectorised over sequences):

- each of `digits` MNIST digits gets a trajectory in unit coordinates of the free range
  [0, frame_size - digit_size]: start uniform in [0, 1)^2, direction theta uniform in [0, 2 pi),
  velocity (sin theta, cos theta) for (y, x);
- every frame first moves by `step` * velocity, then bounces: a coordinate that reached <= 0 or >= 1
  is clamped to the edge and that velocity component alone is negated; then it is drawn;
- the top-left offset of the digit is int(free * position) (truncation, as their astype(int32));
- digits are combined by pixel-wise max (per channel in the coloured variant).

This module is numpy and torch only: no DVC, Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vpn.config import check_field_types
from vpn.files import read_json_object

# The stream's digit pool, written by the data stage beside the splits: MNIST's training images
# minus the ones held out for validation, uint8 (P, 28, 28).
TRAIN_DIGITS_FILE = "train_digits.npy"
# Mixed into every stream generator's seed, so that no stream sequence shares its generator with a
# split of the data stage (which seeds SeedSequence(seed).spawn(3)).
STREAM_KEY = 0x5EED_57EA


@dataclass(frozen=True)
class SequenceSpec:
    """What one sequence looks like (the protocol's parameters; the data stage's params hold them).

    seq_len: frames (T); frame_size: canvas side (H = W); digit_size: digit side (28 is MNIST's own;
    another size resamples the digits nearest-neighbour, for tiny tests); digits: digits per sequence;
    step: distance per frame as a fraction of the free range; colour: RGB variant, each digit tinted
    with a random colour (C = 3), else grey (C = 1). The defaults are the standard Moving MNIST.

    The field order is that of params.yaml's `generate:` section, whose config (GenerateConfig in
    pipeline/data/generate.py) takes these fields from here: keep the two in step.
    """

    seq_len: int = 20
    frame_size: int = 64
    digit_size: int = 28
    digits: int = 2
    step: float = 0.1
    colour: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)  # each message starts with the field's name
        for name in ("seq_len", "frame_size", "digit_size", "digits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def channels(self) -> int:
        return 3 if self.colour else 1

    @property
    def free(self) -> int:
        """Pixels a digit's top-left corner can range over: frame_size - digit_size."""
        return self.frame_size - self.digit_size


@dataclass(frozen=True)
class SplitPlan:
    """Every random choice of a set of sequences, drawn before any pixel is drawn.

    digit_index: (N, D) int64 index into the digit pool; label: (N, D) uint8 (None: not known).
    start: (N, D, 2) float64 unit position (y, x) before the first step; theta: (N, D) radians.
    position: (N, D, T, 2) float64 unit position of each drawn frame; velocity: (N, D, T, 2) float64
        unit velocity after that frame's bounce; offset: (N, D, T, 2) int64 top-left pixel (y, x).
    colour: (N, D, 3) uint8 tint, or None for grey.
    """

    digit_index: np.ndarray
    label: np.ndarray | None
    start: np.ndarray
    theta: np.ndarray
    position: np.ndarray
    velocity: np.ndarray
    offset: np.ndarray
    colour: np.ndarray | None


def directions(theta: np.ndarray) -> np.ndarray:
    """Unit velocities (sin theta, cos theta) as (y, x): theta (...) -> (..., 2) float64.

    sin and cos are the one step whose last bit may differ between maths libraries (numpy may use
    SIMD versions on some CPUs). Python's math module (the platform's libm) is used, and the result
    is rounded to a multiple of 2^-30, so a last-bit difference could change the data only if a value
    fell within 1e-16 of a rounding midpoint (about 1e-7 per value), keeping the bytes machine-independent.
    """
    flat = theta.ravel().tolist()
    v = np.array([[math.sin(a), math.cos(a)] for a in flat], dtype=np.float64).reshape(*theta.shape, 2)
    return np.round(v * 2.0**30) / 2.0**30


def bounce(start: np.ndarray, velocity: np.ndarray, seq_len: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Trajectories in the unit square, as Srivastava et al.'s GetRandomTrajectory.

    start, velocity: (M, 2) float64 (y, x). Each frame: position += step * velocity; a component
    at <= 0 is clamped to 0 and its velocity negated, likewise at >= 1; then the frame is recorded.
    Returns position (M, T, 2) and velocity after each frame's bounce (M, T, 2), float64.
    """
    pos = start.astype(np.float64, copy=True)
    vel = velocity.astype(np.float64, copy=True)
    positions = np.empty((len(pos), seq_len, 2))
    velocities = np.empty((len(pos), seq_len, 2))
    for t in range(seq_len):
        pos += step * vel
        for hit, edge in ((pos <= 0.0, 0.0), (pos >= 1.0, 1.0)):
            pos[hit] = edge
            vel[hit] = -vel[hit]  # only the component that hit: the other keeps its sign
        positions[:, t] = pos
        velocities[:, t] = vel
    return positions, velocities


def draw_choices(rng: np.random.Generator, n: int, pool_size: int, spec: SequenceSpec) -> dict[str, Any]:
    """The random choices of n sequences, in a fixed order: digits, starts, directions, then colours.

    So colour=true reuses the grey variant's digits and trajectories. Returns digit_index (n, D),
    start (n, D, 2), theta (n, D) and colour (n, D, 3) uint8 or None.
    """
    d = spec.digits
    digit_index = rng.integers(0, pool_size, size=(n, d))
    start = rng.random((n, d, 2))
    theta = rng.random((n, d)) * (2.0 * np.pi)
    colour = None
    if spec.colour:
        colour = rng.integers(0, 256, size=(n, d, 3), dtype=np.int64)
        # One channel at full intensity so that no digit comes out (nearly) black and invisible.
        full = rng.integers(0, 3, size=(n, d))
        np.put_along_axis(colour, full[..., None], 255, axis=-1)
        colour = colour.astype(np.uint8)
    return {"digit_index": digit_index, "start": start, "theta": theta, "colour": colour}


def make_plan(choices: dict[str, Any], labels: np.ndarray | None, spec: SequenceSpec) -> SplitPlan:
    """Trajectories and offsets of the sequences whose random choices are `choices` (draw_choices)."""
    digit_index, start, theta = choices["digit_index"], choices["start"], choices["theta"]
    n, d = digit_index.shape
    position, velocity = bounce(start.reshape(-1, 2), directions(theta).reshape(-1, 2), spec.seq_len, spec.step)
    position = position.reshape(n, d, spec.seq_len, 2)
    velocity = velocity.reshape(n, d, spec.seq_len, 2)
    offset = (spec.free * position).astype(np.int64)  # truncation, as their astype(np.int32)
    label = labels[digit_index] if labels is not None else None
    return SplitPlan(digit_index, label, start, theta, position, velocity, offset, choices["colour"])


def plan_split(
    rng: np.random.Generator, n: int, pool_size: int, labels: np.ndarray | None, spec: SequenceSpec
) -> SplitPlan:
    """Draw every random choice of `n` sequences from one generator `rng` (see SplitPlan).

    labels: uint8 (pool_size,) labels of the pool, or None.
    """
    return make_plan(draw_choices(rng, n, pool_size, spec), labels, spec)


def resize_digits(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resampling (..., 28, 28) -> (..., size, size) uint8 (identity at 28)."""
    src = images.shape[-1]
    if size == src:
        return images
    idx = ((2 * np.arange(size) + 1) * src) // (2 * size)  # centre of each target pixel
    return images[..., idx[:, None], idx[None, :]]


def digit_images(pool: np.ndarray, plan: SplitPlan, rows: slice, spec: SequenceSpec) -> np.ndarray:
    """The (tinted) digits of sequences `rows`: uint8 (B, D, C, s, s)."""
    images = resize_digits(pool[plan.digit_index[rows]], spec.digit_size)  # (B, D, s, s)
    if plan.colour is None:
        return images[:, :, None]
    tint = plan.colour[rows].astype(np.uint16)[..., None, None]  # (B, D, 3, 1, 1)
    return ((images[:, :, None].astype(np.uint16) * tint + 127) // 255).astype(np.uint8)  # rounded x*c/255


def render(images: np.ndarray, offset: np.ndarray, frame_size: int) -> np.ndarray:
    """Draw digits at their offsets and combine them by max.

    images: uint8 (B, D, C, s, s); offset: int (B, D, T, 2) top-left (y, x), each in [0, frame_size - s].
    Returns uint8 (B, T, C, H, W) with H = W = frame_size.
    """
    b, d, c, s, _ = images.shape
    t = offset.shape[2]
    frames = np.zeros((b, t, c, frame_size, frame_size), dtype=np.uint8)
    # (B, T, C, F, F, s, s) with F = frame_size - s + 1: window [.., y, x] is the s x s block at (y, x).
    # Writing through it writes into `frames`; one (sequence, frame) gets one window per digit, so no
    # two elements of one assignment alias.
    windows = np.lib.stride_tricks.sliding_window_view(frames, (s, s), axis=(3, 4), writeable=True)
    seq = np.arange(b)[:, None]  # (B, 1)
    time_ = np.arange(t)[None, :]  # (1, T)
    for k in range(d):
        # Advanced indices (B, T) around the channel slice: the selection is (B, T, C, s, s).
        sel = (seq, time_, slice(None), offset[:, k, :, 0], offset[:, k, :, 1])
        windows[sel] = np.maximum(windows[sel], images[:, k, None])  # (B, 1, C, s, s) over T
    return frames


class MovingMNISTStream(Dataset):
    """Training sequences drawn afresh from a digit pool, without end: item i is sequence i.

    Sequence i is drawn by its own generator, seeded by (seed, i), with the protocol above, so it is
    a pure function of (pool, spec, seed, i), whatever the batch, the worker or the order it is drawn
    in. The training loop asks for sequences (s-1)*B .. s*B-1 at step s (vpn.train), so each step sees
    B sequences no step saw before. `__getitems__` draws a whole batch with one vectorised plan and
    one render (the DataLoader calls it), bit-identical to drawing them one by one.

    pool: uint8 (P, 28, 28) digits (the data stage's train_digits.npy: MNIST's training images minus
    the ones held out for validation, so no val or test digit can appear). Items are uint8 tensors
    (T, C, H, W).
    """

    streamed = True

    def __init__(self, pool: np.ndarray, spec: SequenceSpec, seed: int = 0) -> None:
        if pool.dtype != np.uint8 or pool.ndim != 3 or len(pool) == 0:
            raise ValueError(f"the digit pool must be uint8 (P, H, W) with P >= 1, got {pool.dtype} {pool.shape}")
        if spec.digit_size > spec.frame_size:
            raise ValueError(f"digit_size={spec.digit_size} does not fit frame_size={spec.frame_size}")
        self.pool, self.spec, self.seed = pool, spec, int(seed)

    @classmethod
    def from_folder(cls, root: str | Path, seed: int = 0) -> MovingMNISTStream:
        """The stream of a data stage's folder: its train_digits.npy and the protocol in stats.json."""
        root = Path(root)
        path = root / TRAIN_DIGITS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no digit pool for streamed training; run `dvc repro generate`")
        try:
            pool = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npy array: {e}") from e
        stats_path = root / "stats.json"
        if not stats_path.is_file():
            raise FileNotFoundError(f"{stats_path}: no stats file; run `dvc repro generate`")
        # The data stage's params hold the protocol's fields among others (seed, split sizes, ...).
        params = read_json_object(stats_path).get("params", {})
        if not isinstance(params, dict):
            raise ValueError(f"{stats_path}: params must be a JSON object, got {type(params).__name__}")
        fields = {f.name: params[f.name] for f in dataclasses.fields(SequenceSpec) if f.name in params}
        try:
            spec = SequenceSpec(**fields)
        except ValueError as e:
            raise ValueError(f"{stats_path}: params.{e}") from None
        return cls(pool, spec, seed)

    def __len__(self) -> int:
        # Without end; a length is still needed by code that asks (e.g. for an empty check).
        return 2**62

    def choices(self, index: int) -> dict[str, Any]:
        """The random choices of sequence `index` (its own generator)."""
        if index < 0:
            raise IndexError(f"sequence index must be >= 0, got {index}")
        rng = np.random.default_rng(np.random.SeedSequence([STREAM_KEY, self.seed, int(index)]))
        return draw_choices(rng, 1, len(self.pool), self.spec)

    def plan(self, indices: list[int]) -> SplitPlan:
        """The plan of sequences `indices`: their choices stacked, then one vectorised trajectory pass."""
        drawn = [self.choices(i) for i in indices]
        stacked = {k: None if drawn[0][k] is None else np.concatenate([c[k] for c in drawn]) for k in drawn[0]}
        return make_plan(stacked, None, self.spec)

    def render(self, indices: list[int]) -> np.ndarray:
        """uint8 (len(indices), T, C, H, W)."""
        plan = self.plan(indices)
        return render(digit_images(self.pool, plan, slice(None), self.spec), plan.offset, self.spec.frame_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.render([index])[0])

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        batch = torch.from_numpy(self.render(list(indices)))  # (B, T, C, H, W)
        return list(batch.unbind(0))

    def __repr__(self) -> str:
        return f"MovingMNISTStream(pool={tuple(self.pool.shape)}, spec={self.spec}, seed={self.seed})"
