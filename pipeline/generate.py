"""Stage `generate`: Moving MNIST train/val/test from data/mnist/mnist.npz, as Srivastava et al. make it.

The procedure follows the generator code of Srivastava et al. 2015 (Unsupervised Learning of Video
Representations using LSTMs), vectorised over sequences:

- each of `digits` MNIST digits gets a trajectory in unit coordinates of the free range
  [0, frame_size - digit_size]: start uniform in [0, 1)^2, direction theta uniform in [0, 2 pi),
  velocity (sin theta, cos theta) for (y, x);
- every frame first moves by `step` * velocity, then bounces: a coordinate that reached <= 0 or >= 1
  is clamped to the edge and that velocity component alone is negated; then it is drawn;
- the top-left offset of the digit is int(free * position) (truncation, as their astype(int32));
- digits are combined by pixel-wise max (per channel in the coloured variant).

Training sequences draw from MNIST's training images except the last `val_digits`, validation from
those last `val_digits` (held out: train never sees them), test from MNIST's test set. Each split has
its own random stream (SeedSequence(seed).spawn), so e.g. changing n_train leaves val and test as
they were, and colour=true draws the same digits and trajectories as colour=false.

Outputs in data/moving_mnist/: <split>.npy uint8 (N, T, C, H, W); <split>_meta.parquet, one row per
(sequence, digit slot); stats.json with shapes, pixel statistics and the entropy lower bound of the
val and test splits in nats/frame (frames context..T-1 given the first `context`, computed by
vpn.metrics.bernoulli_lower_bound, the function the models' NLL uses). All arrays are
byte-for-byte reproducible from the params on any machine (see `directions` for the one place where
floating-point libraries could otherwise differ).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline import atomic_output
from pipeline.params import ParamsError, load_section, stage_argparser
from vpn.data import SPLITS, STATS_FILE, meta_path, split_path
from vpn.metrics import bernoulli_lower_bound

log = logging.getLogger(__name__)

SECTION = "generate"
DEFAULT_MNIST = Path("data/mnist/mnist.npz")
DEFAULT_OUT = Path("data/moving_mnist")
MNIST_DIGIT_SIZE = 28
# Sequences rendered at once: bounds memory (chunk x T x C x H x W bytes, ~42 MB at the defaults);
# the output does not depend on it (all random draws are made per split up front).
CHUNK = 512
# Splits whose lower bound stats.json records. Not train: no score is compared against it, and at the
# defaults it would cost as much as the test split's (a third of the stage's time on 2 cores).
LOWER_BOUND_SPLITS = ("val", "test")
LOWER_BOUND_CHUNK = 32


class DataError(RuntimeError):
    """An input file that generation cannot use. The message names the file."""


@dataclass(frozen=True)
class GenerateConfig:
    """params.yaml section `generate`; the defaults are the standard Moving MNIST.

    seed: root of the random streams (one spawned per split).
    n_train, n_val, n_test: sequences per split (10,000 is the standard test-set size).
    val_digits: how many images at the end of MNIST's training set are held out for validation.
    seq_len: frames per sequence (T); frame_size: canvas side (H = W); digit_size: digit side
        (28 is MNIST's own; another size resamples the digits nearest-neighbour, for tiny tests).
    digits: digits per sequence; step: distance per frame as a fraction of the free range.
    colour: RGB variant, each digit tinted with a random colour (C = 3); else grey (C = 1).
    context: frames given before the ones the lower bound scores (10 of 20 in the paper).
    """

    seed: int = 0
    n_train: int = 10000
    n_val: int = 1000
    n_test: int = 10000
    val_digits: int = 5000
    seq_len: int = 20
    frame_size: int = 64
    digit_size: int = 28
    digits: int = 2
    step: float = 0.1
    colour: bool = False
    context: int = 10

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("n_train", "n_val", "n_test", "val_digits", "seq_len", "frame_size", "digit_size", "digits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.digit_size > self.frame_size:
            raise ValueError(
                f"digit_size={self.digit_size} is bigger than frame_size={self.frame_size}: the digit cannot fit"
            )
        if not 0.0 < self.step <= 1.0:
            raise ValueError(f"step must be in (0, 1] (fraction of the free range per frame), got {self.step}")
        if not 0 <= self.context < self.seq_len:
            raise ValueError(f"context must be in [0, seq_len={self.seq_len}), got {self.context}")

    @property
    def channels(self) -> int:
        return 3 if self.colour else 1

    @property
    def free(self) -> int:
        """Pixels a digit's top-left corner can range over: frame_size - digit_size."""
        return self.frame_size - self.digit_size

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


@dataclass(frozen=True)
class SplitPlan:
    """Every random choice of one split, drawn before any pixel is drawn.

    digit_index: (N, D) int64 index into the split's digit pool (see `pools`); label: (N, D) uint8.
    start: (N, D, 2) float64 unit position (y, x) before the first step; theta: (N, D) radians.
    position: (N, D, T, 2) float64 unit position of each drawn frame; velocity: (N, D, T, 2) float64
        unit velocity after that frame's bounce; offset: (N, D, T, 2) int64 top-left pixel (y, x).
    colour: (N, D, 3) uint8 tint, or None for grey.
    """

    digit_index: np.ndarray
    label: np.ndarray
    start: np.ndarray
    theta: np.ndarray
    position: np.ndarray
    velocity: np.ndarray
    offset: np.ndarray
    colour: np.ndarray | None


def load_mnist(path: Path) -> dict[str, np.ndarray]:
    """Read the fetch stage's mnist.npz: uint8 x_* (N, 28, 28) and y_* (N,) for train and test."""
    if not path.is_file():
        raise DataError(f"{path}: MNIST file not found; run `dvc repro fetch` first")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz: {e}") from e
    for part in ("train", "test"):
        x, y = arrays.get(f"x_{part}"), arrays.get(f"y_{part}")
        if x is None or y is None:
            raise DataError(f"{path}: missing x_{part} or y_{part} (has {sorted(arrays)})")
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (MNIST_DIGIT_SIZE, MNIST_DIGIT_SIZE):
            raise DataError(f"{path}: x_{part} must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
        if y.dtype != np.uint8 or y.shape != x.shape[:1]:
            raise DataError(f"{path}: y_{part} must be uint8 ({x.shape[0]},), got {y.dtype} {y.shape}")
    return arrays


def pools(mnist: dict[str, np.ndarray], cfg: GenerateConfig) -> dict[str, tuple[str, int, int]]:
    """Which digits each split draws from: split -> (mnist array, first index, stop index)."""
    n = len(mnist["x_train"])
    if cfg.val_digits >= n:
        raise ParamsError(f"generate.val_digits={cfg.val_digits} must be smaller than the {n} MNIST training images")
    return {
        "train": ("x_train", 0, n - cfg.val_digits),
        "val": ("x_train", n - cfg.val_digits, n),
        "test": ("x_test", 0, len(mnist["x_test"])),
    }


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


def plan_split(rng: np.random.Generator, n: int, pool_size: int, labels: np.ndarray, cfg: GenerateConfig) -> SplitPlan:
    """Draw every random choice of a split of `n` sequences from `rng` (see SplitPlan).

    labels: uint8 (pool_size,) labels of the pool. The draw order is fixed (digits, starts,
    directions, then colours), so colour=true reuses the grey variant's digits and trajectories.
    """
    d = cfg.digits
    digit_index = rng.integers(0, pool_size, size=(n, d))
    start = rng.random((n, d, 2))
    theta = rng.random((n, d)) * (2.0 * np.pi)
    position, velocity = bounce(start.reshape(-1, 2), directions(theta).reshape(-1, 2), cfg.seq_len, cfg.step)
    position = position.reshape(n, d, cfg.seq_len, 2)
    velocity = velocity.reshape(n, d, cfg.seq_len, 2)
    offset = (cfg.free * position).astype(np.int64)  # truncation, as their astype(np.int32)
    colour = None
    if cfg.colour:
        colour = rng.integers(0, 256, size=(n, d, 3), dtype=np.int64)
        # One channel at full intensity so that no digit comes out (nearly) black and invisible.
        full = rng.integers(0, 3, size=(n, d))
        np.put_along_axis(colour, full[..., None], 255, axis=-1)
        colour = colour.astype(np.uint8)
    return SplitPlan(digit_index, labels[digit_index], start, theta, position, velocity, offset, colour)


def resize_digits(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resampling (..., 28, 28) -> (..., size, size) uint8 (identity at 28)."""
    src = images.shape[-1]
    if size == src:
        return images
    idx = ((2 * np.arange(size) + 1) * src) // (2 * size)  # centre of each target pixel
    return images[..., idx[:, None], idx[None, :]]


def digit_images(pool: np.ndarray, plan: SplitPlan, rows: slice, cfg: GenerateConfig) -> np.ndarray:
    """The (tinted) digits of sequences `rows`: uint8 (B, D, C, s, s)."""
    images = resize_digits(pool[plan.digit_index[rows]], cfg.digit_size)  # (B, D, s, s)
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


def meta_table(plan: SplitPlan, pool_name: str, pool_start: int, cfg: GenerateConfig) -> pa.Table:
    """Per-sequence metadata, one row per (sequence, digit slot).

    Columns: sequence, slot, mnist_array and mnist_index (the digit is mnist.npz[mnist_array][mnist_index]),
    label, theta (radians), start_y/start_x (pixels, before the first step), velocity_y/velocity_x
    (pixels per frame, before any bounce), top/left (T int16 offsets, one per frame) and, for colour,
    red/green/blue.
    """
    n, d = plan.digit_index.shape
    t = cfg.seq_len
    scale = float(cfg.free)
    v0 = directions(plan.theta) * (cfg.step * scale)  # (N, D, 2) pixels per frame

    def per_frame(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1).astype(np.int16)), t)

    columns: dict[str, Any] = {
        "sequence": np.repeat(np.arange(n, dtype=np.int32), d),
        "slot": np.tile(np.arange(d, dtype=np.int8), n),
        "mnist_array": pa.array([pool_name] * (n * d), type=pa.dictionary(pa.int8(), pa.string())),
        "mnist_index": (plan.digit_index + pool_start).reshape(-1).astype(np.int32),
        "label": plan.label.reshape(-1),
        "theta": plan.theta.reshape(-1),
        "start_y": plan.start[..., 0].reshape(-1) * scale,
        "start_x": plan.start[..., 1].reshape(-1) * scale,
        "velocity_y": v0[..., 0].reshape(-1),
        "velocity_x": v0[..., 1].reshape(-1),
        "top": per_frame(plan.offset[..., 0]),
        "left": per_frame(plan.offset[..., 1]),
    }
    if plan.colour is not None:
        for i, name in enumerate(("red", "green", "blue")):
            columns[name] = plan.colour[..., i].reshape(-1)
    return pa.table(columns)


def lower_bound_sum(frames: np.ndarray, context: int) -> tuple[float, float]:
    """Sum over sequences of the lower bound and of its square, nats/frame: uint8 (B, T, C, H, W).

    Uses vpn.metrics.bernoulli_lower_bound, the function the models' NLL is scored with, on
    LOWER_BOUND_CHUNK sequences at a time (its float temporaries then stay in cache: 2-3x faster).
    """
    total = square = 0.0
    for lo in range(0, len(frames), LOWER_BOUND_CHUNK):
        chunk = torch.from_numpy(frames[lo : lo + LOWER_BOUND_CHUNK])
        per_seq = bernoulli_lower_bound(chunk, context=context).double()  # (b,)
        total += float(per_seq.sum())
        square += float((per_seq**2).sum())
    return total, square


def generate_split(
    path: Path,
    pool: np.ndarray,
    plan: SplitPlan,
    cfg: GenerateConfig,
    lower_bound: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """Render every sequence of `plan` into the .npy file `path` (uint8 (N, T, C, H, W)), in chunks.

    The file is np.save's format, byte for byte, written sequentially (a memmap's page faults on a
    fresh file made writing as slow as rendering). Returns the split's statistics (pixel mean,
    fraction of non-zero pixels and, if `lower_bound`, the lower bound's mean and std over
    sequences), accumulated chunk by chunk so that memory stays at one chunk.
    """
    n = len(plan.digit_index)
    shape = (n, cfg.seq_len, cfg.channels, cfg.frame_size, cfg.frame_size)
    size = math.prod(shape)
    pixel_sum = nonzero = 0
    lb_sum = lb_sq = 0.0
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for lo in tqdm(range(0, n, CHUNK), desc=desc, unit="chunk", disable=None):
            rows = slice(lo, min(lo + CHUNK, n))
            frames = render(digit_images(pool, plan, rows, cfg), plan.offset[rows], cfg.frame_size)
            f.write(frames.data)  # C-contiguous (B, T, C, H, W): the next rows of the array
            pixel_sum += int(frames.sum(dtype=np.int64))
            nonzero += int(np.count_nonzero(frames))
            if lower_bound:
                s, sq = lower_bound_sum(frames, cfg.context)
                lb_sum += s
                lb_sq += sq
    stats: dict[str, Any] = {
        "shape": list(shape),
        "dtype": "uint8",
        "pixel_mean": pixel_sum / size,
        "nonzero_fraction": nonzero / size,
    }
    if lower_bound:
        mean = lb_sum / n
        stats["lower_bound_nats_per_frame"] = mean
        stats["lower_bound_std"] = math.sqrt(max(lb_sq / n - mean * mean, 0.0))
    return stats


def _rounded(value: Any, digits: int = 4) -> Any:
    # stats.json is a metrics file: round floats so that summation-order noise between machines
    # (torch's reductions) does not show up as a changed metric.
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


def stats_json(stats: dict[str, Any]) -> str:
    """JSON text of `stats`, indented, with lists of numbers (shapes) kept on one line."""
    text = json.dumps(stats, indent=2)
    return re.sub(r"\[\s+([-\d.,\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def generate(cfg: GenerateConfig, mnist_path: Path, out_dir: Path) -> dict[str, Any]:
    """Make every split's .npy and _meta.parquet and stats.json under `out_dir`; return the stats.

    Everything is validated before the first byte is written; all files are written to temporary
    names and moved into place only once every split is done, so a failure leaves `out_dir` as it was.
    """
    mnist = load_mnist(mnist_path)
    split_pools = pools(mnist, cfg)
    streams = np.random.SeedSequence(cfg.seed).spawn(len(SPLITS))
    stats: dict[str, Any] = {"params": asdict(cfg), "splits": {}}
    started = time.perf_counter()
    with contextlib.ExitStack() as pending:  # each file is moved into place when the stack closes
        for split, stream in zip(SPLITS, streams, strict=True):
            pool_name, first, stop = split_pools[split]
            pool = mnist[pool_name][first:stop]
            labels = mnist[f"y{pool_name[1:]}"][first:stop]
            n = cfg.split_size(split)
            plan = plan_split(np.random.default_rng(stream), n, len(pool), labels, cfg)
            tmp = pending.enter_context(atomic_output(split_path(out_dir, split)))
            split_stats = generate_split(tmp, pool, plan, cfg, split in LOWER_BOUND_SPLITS, desc=split)
            pq.write_table(
                meta_table(plan, pool_name, first, cfg),
                pending.enter_context(atomic_output(meta_path(out_dir, split))),
            )
            split_stats["digit_pool"] = f"{pool_name}[{first}:{stop}]"
            stats["splits"][split] = split_stats
            log.info("%s: %s done at %.1f s", split, tuple(split_stats["shape"]), time.perf_counter() - started)
        test = stats["splits"]["test"]
        stats["lower_bound_nats_per_frame"] = test["lower_bound_nats_per_frame"]
        stats["lower_bound_frames"] = f"{cfg.context}..{cfg.seq_len - 1} given 0..{cfg.context - 1}, test split"
        stats = _rounded(stats)
        pending.enter_context(atomic_output(out_dir / STATS_FILE)).write_text(stats_json(stats))
    log.info("generated %d sequences in %.1f s", cfg.n_train + cfg.n_val + cfg.n_test, time.perf_counter() - started)
    return stats


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.generate [--params PATH] [--mnist PATH] [--out DIR]`."""
    parser = stage_argparser("Generate Moving MNIST (DVC stage `generate`).")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="input .npz (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The lower bound is a chain of elementwise ops on small tensors: on the 2-core machine one
    # thread beat two by 2-3x (no fork-join per op). Only this process is affected.
    torch.set_num_threads(1)
    try:
        cfg = load_section(GenerateConfig, SECTION, args.params)
        stats = generate(cfg, args.mnist, args.out)
    except (ParamsError, DataError) as e:
        log.error("%s", e)
        return 1
    # The stage's report: one line per split and the headline lower bound.
    for split, s in stats["splits"].items():
        bound = s.get("lower_bound_nats_per_frame")
        tail = f", lower bound {bound:.4f} nats/frame" if bound is not None else ""
        print(f"generate: {split} {tuple(s['shape'])}{tail}")
    bound, frames = stats["lower_bound_nats_per_frame"], stats["lower_bound_frames"]
    print(f"generate: test lower bound {bound:.4f} nats/frame ({frames})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
