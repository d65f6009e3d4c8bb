"""Stage `generate`: Moving MNIST train/val/test from data/mnist/mnist.npz, as Srivastava et al. make it.

The procedure (Srivastava et al. 2015, Unsupervised Learning of Video Representations using LSTMs) is
vpn.moving_mnist's, the same code that streams fresh training sequences (`train.data: stream`).

Training sequences draw from MNIST's training images except the last `val_digits`, validation from
those last `val_digits` (held out: train never sees them), test from MNIST's test set. Each split has
its own random stream (SeedSequence(seed).spawn), so e.g. changing n_train leaves val and test as
they were, and colour=true draws the same digits and trajectories as colour=false.

Outputs in data/moving_mnist/: <split>.npy uint8 (N, T, C, H, W); <split>_meta.parquet, one row per
(sequence, digit slot); train_digits.npy, the training digit pool uint8 (P, 28, 28) that the stream
draws from (never a val or test digit); stats.json with shapes, pixel statistics and the entropy lower bound of the
val and test splits in nats/frame (frames context..T-1 given the first `context`, computed by
vpn.metrics.bernoulli_lower_bound, the function the models' NLL uses). All arrays are
byte-for-byte reproducible from the params on any machine (see `directions` for the one place where
floating-point libraries could otherwise differ).

The standard test file. With `test_file` set to Srivastava et al.'s mnist_test_seq.npy (uint8, frames
first: (20, 10000, 64, 64)), the test split is that file, transposed to (10000, 20, 1, 64, 64), so test
NLLs compare exactly with published ones; its sha256 goes into stats.json, and its lower bound should
come out at the paper's 86.3 nats/frame.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.params import ParamsError, load_section, stage_argparser
from vpn.data import SPLITS, STATS_FILE, meta_path, split_path
from vpn.files import atomic_path, sha256_file
from vpn.metrics import bernoulli_lower_bound
from vpn.moving_mnist import (  # noqa: F401  (the protocol; re-exported: the stage's tests use these names)
    TRAIN_DIGITS_FILE,
    SequenceSpec,
    SplitPlan,
    bounce,
    digit_images,
    directions,
    plan_split,
    render,
    resize_digits,
)

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
class SplitParams:
    """The fields of params.yaml's `generate:` that come before the sequence's (see GenerateConfig).

    seed: root of the random streams (one spawned per split).
    n_train, n_val, n_test: sequences per split (10,000 is the standard test-set size).
    val_digits: how many images at the end of MNIST's training set are held out for validation.
    """

    seed: int = 0
    n_train: int = 10000
    n_val: int = 1000
    n_test: int = 10000
    val_digits: int = 5000


# The bases give the field order, which is params.yaml's, dvc.yaml's params list's and stats.json's:
# dataclass fields come base by base from the last base in the MRO (SplitParams, then SequenceSpec),
# then the class's own. So each field of the protocol is declared once, in vpn.moving_mnist.
@dataclass(frozen=True)
class GenerateConfig(SequenceSpec, SplitParams):
    """params.yaml section `generate`; the defaults are the standard Moving MNIST.

    Fields, in order: SplitParams's (seed, n_train, n_val, n_test, val_digits), SequenceSpec's
    (seq_len, frame_size, digit_size, digits, step, colour), then its own:
    context: frames given before the ones the lower bound scores (10 of 20 in the paper).
    test_file: Srivastava et al.'s mnist_test_seq.npy (uint8 (seq_len, n_test, frame_size,
        frame_size), frames first), relative to the params file; it then is the test split. null:
        the test split is generated from MNIST's test digits.
    """

    context: int = 10
    test_file: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # SequenceSpec's: every field's type (no bool for a number, no NaN)
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
        if self.test_file is not None and self.colour:
            raise ValueError("test_file is the grey standard test set; it cannot be used with colour: true")

    @property
    def sequence(self) -> SequenceSpec:
        """The protocol's parameters alone (vpn.moving_mnist), as the training stream has them."""
        return SequenceSpec(**{f.name: getattr(self, f.name) for f in fields(SequenceSpec)})

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


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

    Returns the split's statistics (see write_split).
    """
    n = len(plan.digit_index)
    shape = (n, cfg.seq_len, cfg.channels, cfg.frame_size, cfg.frame_size)
    chunks = (
        render(
            digit_images(pool, plan, slice(lo, min(lo + CHUNK, n)), cfg.sequence),
            plan.offset[lo : lo + CHUNK],
            cfg.frame_size,
        )
        for lo in range(0, n, CHUNK)
    )
    return write_split(path, shape, chunks, cfg.context, lower_bound, desc)


def write_split(
    path: Path, shape: tuple[int, ...], chunks: Iterable[np.ndarray], context: int, lower_bound: bool, desc: str = ""
) -> dict[str, Any]:
    """Write the chunks (uint8 (B, T, C, H, W), in order, adding up to `shape`) as the .npy `path`.

    The file is np.save's format, byte for byte, written sequentially (a memmap's page faults on a
    fresh file made writing as slow as rendering). Returns the split's statistics (pixel mean,
    fraction of non-zero pixels and, if `lower_bound`, the lower bound's mean and std over
    sequences), accumulated chunk by chunk so that memory stays at one chunk.
    """
    n = shape[0]
    size = math.prod(shape)
    pixel_sum = nonzero = written = 0
    lb_sum = lb_sq = 0.0
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for frames in tqdm(chunks, total=math.ceil(n / CHUNK), desc=desc, unit="chunk", disable=None):
            frames = np.ascontiguousarray(frames)
            f.write(frames.data)  # C-contiguous (B, T, C, H, W): the next rows of the array
            written += len(frames)
            pixel_sum += int(frames.sum(dtype=np.int64))
            nonzero += int(np.count_nonzero(frames))
            if lower_bound:
                s, sq = lower_bound_sum(frames, context)
                lb_sum += s
                lb_sq += sq
    if written != n:
        raise AssertionError(f"{path}: wrote {written} of {n} sequences")
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


def open_test_file(path: Path, cfg: GenerateConfig) -> np.ndarray:
    """Srivastava et al.'s mnist_test_seq.npy, memory-mapped and checked: uint8 (T, N, H, W), frames
    first, with T = seq_len, N = n_test and H = W = frame_size. Errors name the file and the field."""
    where = f"generate.test_file: {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{where}: not a readable .npy array: {e}") from e
    if array.dtype != np.uint8 or array.ndim != 4:
        raise DataError(
            f"{where}: expected uint8 (frames, sequences, height, width) like mnist_test_seq.npy's "
            f"(20, 10000, 64, 64), got {array.dtype} with shape {array.shape}"
        )
    t, n, h, w = array.shape
    for field, want, got in (("seq_len", cfg.seq_len, t), ("n_test", cfg.n_test, n), ("frame_size", cfg.frame_size, h)):
        if want != got:
            raise DataError(f"{where}: the file has shape {array.shape} (frames first), but generate.{field}={want}")
    if h != w:
        raise DataError(f"{where}: frames must be square, got {h}x{w}")
    return array


def test_file_table(n: int, path: Path) -> pa.Table:
    """test_meta.parquet for a test split read from a file: sequence i is the file's sequence i."""
    return pa.table(
        {
            "sequence": np.arange(n, dtype=np.int32),
            "source": pa.array([path.name] * n, type=pa.dictionary(pa.int8(), pa.string())),
        }
    )


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


def generate(cfg: GenerateConfig, mnist_path: Path, out_dir: Path, base_dir: Path | None = None) -> dict[str, Any]:
    """Make every split's .npy and _meta.parquet, train_digits.npy and stats.json under `out_dir`.

    Returns the stats. base_dir: where a relative test_file starts (the params file's folder;
    default the current one). Everything is validated before the first byte is written; all files
    are written to temporary names and moved into place only once every split is done, so a
    failure leaves `out_dir` as it was.
    """
    mnist = load_mnist(mnist_path)
    split_pools = pools(mnist, cfg)
    test_path = test_array = None
    if cfg.test_file is not None:
        test_path = Path(cfg.test_file).expanduser()
        test_path = test_path if test_path.is_absolute() else (base_dir or Path.cwd()) / test_path
        test_array = open_test_file(test_path, cfg)
    streams = np.random.SeedSequence(cfg.seed).spawn(len(SPLITS))
    stats: dict[str, Any] = {"params": asdict(cfg), "splits": {}}
    started = time.perf_counter()
    with contextlib.ExitStack() as pending:  # each file is moved into place when the stack closes
        for split, stream in zip(SPLITS, streams, strict=True):
            pool_name, first, stop = split_pools[split]
            pool = mnist[pool_name][first:stop]
            tmp = pending.enter_context(atomic_path(split_path(out_dir, split)))
            meta = pending.enter_context(atomic_path(meta_path(out_dir, split)))
            if split == "test" and test_array is not None:
                n = test_array.shape[1]
                shape = (n, cfg.seq_len, 1, cfg.frame_size, cfg.frame_size)
                # (T, N, H, W) frames first -> (N, T, 1, H, W), CHUNK sequences at a time.
                chunks = (test_array[:, lo : lo + CHUNK].transpose(1, 0, 2, 3)[:, :, None] for lo in range(0, n, CHUNK))
                split_stats = write_split(tmp, shape, chunks, cfg.context, True, desc=split)
                pq.write_table(test_file_table(n, test_path), meta)
                split_stats["source_file"] = str(test_path)
                split_stats["source_sha256"] = sha256_file(test_path)
            else:
                labels = mnist[f"y{pool_name[1:]}"][first:stop]
                plan = plan_split(np.random.default_rng(stream), cfg.split_size(split), len(pool), labels, cfg.sequence)
                split_stats = generate_split(tmp, pool, plan, cfg, split in LOWER_BOUND_SPLITS, desc=split)
                pq.write_table(meta_table(plan, pool_name, first, cfg), meta)
                split_stats["digit_pool"] = f"{pool_name}[{first}:{stop}]"
            stats["splits"][split] = split_stats
            log.info("%s: %s done at %.1f s", split, tuple(split_stats["shape"]), time.perf_counter() - started)
        # The streamed training source's digits: the train split's pool, and only it.
        pool_name, first, stop = split_pools["train"]
        with open(pending.enter_context(atomic_path(out_dir / TRAIN_DIGITS_FILE)), "wb") as f:
            np.save(f, np.ascontiguousarray(mnist[pool_name][first:stop]), allow_pickle=False)
        stats["stream_digit_pool"] = f"{pool_name}[{first}:{stop}]"
        test = stats["splits"]["test"]
        stats["lower_bound_nats_per_frame"] = test["lower_bound_nats_per_frame"]
        stats["lower_bound_frames"] = f"{cfg.context}..{cfg.seq_len - 1} given 0..{cfg.context - 1}, test split"
        stats = _rounded(stats)
        pending.enter_context(atomic_path(out_dir / STATS_FILE)).write_text(stats_json(stats))
    log.info("generated %d sequences in %.1f s", cfg.n_train + cfg.n_val + cfg.n_test, time.perf_counter() - started)
    return stats


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.data.generate [--params PATH] [--mnist PATH] [--out DIR]`."""
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
        stats = generate(cfg, args.mnist, args.out, base_dir=Path(args.params).resolve().parent)
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
