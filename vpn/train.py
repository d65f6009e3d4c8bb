"""A plain training loop for any VPNConfig: RMSProp, teacher forcing, validation, exact resume.

- The batch of step s is a pure function of (seed, s). From a fixed set (`data: fixed`): sequences
  drawn with replacement by a generator seeded from both. From a stream (`data: stream`,
  vpn.moving_mnist.MovingMNISTStream): sequences (s-1)*B .. s*B-1 of the stream, each a function of
  (seed, its index), so no two steps share a sequence. A resumed run therefore sees the same batches
  as an uninterrupted one without any sampler state to save, and a sweep trial restarted from a
  checkpoint continues its own curve.
- Scoring (`Trainer.score`, and validation through it) is `model.nll`, the paper's metric, beside
  the floor of exactly the frames scored: the entropy of their grey levels by
  vpn.metrics.bernoulli_lower_bound, the function the data stage's lower bound uses.
- The loss that is optimised is nats per sub-pixel (nats/frame divided by C*H*W), so the gradient
  clipping threshold means the same at every frame size; everything reported is nats per frame.
- Host syncs happen only every `log_every` steps: losses stay on the device in between. A non-finite
  loss is detected there and raises NonFiniteLossError.
- Speed (measured in benchmarks/, see benchmarks/RESULTS.md): bf16 autocast and channels_last on
  CUDA by default; torch.compile of the forward pass and loss on request (`compile`); bf16 autocast
  on CPU on request (`cpu_amp`, where the CPU has native bf16). None of them changes the parameters
  or the checkpoint format.
- Logging and checkpointing hang off two hooks of `fit`, so the same loop serves the CLI and the
  Ray Tune trainable.
- Data parallel: when torch.distributed is initialised (N ranks; the caller starts the process group,
  e.g. Ray Train), rank r trains on items [r*B/N, (r+1)*B/N) of each step's batch and DDP averages
  the gradients, so an update is the single-process one up to float rounding and the batches stay a
  pure function of (seed, step). `self.model` stays the plain module (same checkpoints); the logged
  loss and the scores are all-reduced, so every rank sees the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import platform
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vpn.config import VPNConfig
from vpn.files import atomic_path
from vpn.metrics import bernoulli_lower_bound
from vpn.model import VideoPixelNetwork

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vpn-checkpoint/1"
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
DATA_SOURCES = ("fixed", "stream")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Every field can be set from the CLI (--set key=value) or a sweep spec.

    steps: optimizer updates in total.  batch_size: sequences per update.
    lr, rmsprop_alpha, rmsprop_eps: RMSProp (lr 3e-4 as in the TF code; alpha 0.9 is TF's decay).
    grad_clip: max global gradient norm of the per-sub-pixel loss (0 disables).
    seed: model initialisation and batch order.
    log_every: steps between host syncs / progress updates / logged metrics.
    val_every, val_batches: validation period in steps, and batches of the validation split per run.
    context: frames of context when scoring validation (the paper scores frames 10..19 given 0..9).
    ckpt_every: steps between checkpoints (0: only at the end).
    seq_len: use the first seq_len frames of each sequence (None: all).
    downsample: average-pool frames by this factor (1: full size), for quick CPU runs.
    device: "auto" (CUDA if present), "cpu" or "cuda[:N]".  amp: bf16 autocast on CUDA.
    cpu_amp: bf16 autocast on CPU too. Off by default: on a CPU with native bf16 (AVX512-BF16, AMX)
        it is faster, but it is no longer fp32 training, and the sweeps compare fp32 curves. On a
        CPU without native bf16 (cpu_has_native_bf16() is False) it is ignored with a warning and
        training runs in fp32: there bf16 is emulated, and a step measured about 30x slower.
    memory_format: "auto" (channels_last on CUDA, where cuDNN's bf16 convolutions run NHWC;
        contiguous on CPU, where channels_last measured slower), "channels_last" or "contiguous".
    compile: torch.compile the forward pass and loss (fuses the gates' elementwise ops). Off by
        default: compiling costs about a minute on a small CPU, more than short runs gain.
    num_workers: DataLoader worker processes.
    data: "fixed" (the data stage's train.npy, sampled with replacement) or "stream" (fresh sequences
        from the training digits at every step, as the paper trains: vpn.moving_mnist).
    test_sequences: how many sequences of the test split `Trainer.score` uses at the end of a sweep
        trial (the first ones; None: the whole split, the paper's 10,000).
    """

    steps: int = 2000
    batch_size: int = 8
    lr: float = 3e-4
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    val_every: int = 250
    val_batches: int = 4
    context: int = 10
    ckpt_every: int = 500
    seq_len: int | None = None
    downsample: int = 1
    device: str = "auto"
    amp: bool = True
    cpu_amp: bool = False
    memory_format: str = "auto"
    compile: bool = False
    num_workers: int = 0
    data: str = "fixed"
    test_sequences: int | None = None

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "log_every", "val_every", "val_batches", "context", "downsample")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("ckpt_every", "num_workers", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "rmsprop_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not 0 < self.rmsprop_alpha < 1:
            raise ValueError(f"rmsprop_alpha must be in (0, 1), got {self.rmsprop_alpha!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 2):
            raise ValueError(f"seq_len must be an integer >= 2 or null, got {self.seq_len!r}")
        if self.seq_len is not None and self.context >= self.seq_len:
            raise ValueError(f"context={self.context} must be < seq_len={self.seq_len}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("amp", "cpu_amp", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        t = self.test_sequences
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"test_sequences must be an integer >= 1 or null (the whole split), got {t!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return self.from_dict({**self.to_dict(), **changes})


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"training loss is {value} (non-finite) at step {step}; stopping")
        self.step, self.value = step, value

    def __reduce__(self):
        # Exceptions pickle as cls(*self.args), and args holds only the message; process pools and
        # Ray copy errors by pickling, so rebuild from (step, value).
        return type(self), (self.step, self.value)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: x86 AVX512-BF16 or AMX, or Arm's BF16 extension.

    Without it oneDNN emulates bf16: on an AVX2 CPU a micro training step with cpu_amp took 62.5 s
    against 2.09 s in fp32 (64x64, batch 2, 4 frames, one thread; benchmarks/RESULTS.md).
    """
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # Arm: oneDNN asks for the BF16 extension
    except (AttributeError, RuntimeError):  # a torch without these probes: assume not
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


class _StepBatches(torch.utils.data.Sampler):
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


@torch.no_grad()
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
    manager factory for the forward pass (the Trainer's bf16 autocast), or None for full precision.

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
            with autocast() if autocast is not None else contextlib.nullcontext():
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    """Owns a model, its optimizer and the step counter; knows nothing about where metrics go."""

    def __init__(
        self,
        model_cfg: VPNConfig,
        train_cfg: TrainConfig,
        train_data: Dataset | Tensor,
        val_data: Dataset | Tensor | None = None,
    ) -> None:
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.device = resolve_device(train_cfg.device)
        self.train_data = as_dataset(train_data)
        self.val_data = as_dataset(val_data) if val_data is not None else None
        if is_stream(self.train_data) != (train_cfg.data == "stream"):
            given = "a stream" if is_stream(self.train_data) else "a fixed set of sequences"
            raise ValueError(f"train.data is {train_cfg.data!r} but the training data given is {given}")
        if len(self.train_data) == 0:
            raise ValueError("training data is empty")
        # bf16 autocast on the CPU only where the CPU has bf16 in hardware (cpu_has_native_bf16).
        self.cpu_bf16 = train_cfg.cpu_amp and self.device.type == "cpu"
        if self.cpu_bf16 and not cpu_has_native_bf16():
            log.warning(
                "cpu_amp ignored, training in fp32: this CPU (%s) has no native bf16 (AVX512-BF16, AMX or "
                "Arm BF16), and emulated bf16 measured about 30x slower than fp32",
                torch.backends.cpu.get_cpu_capability(),
            )
            self.cpu_bf16 = False
        # Data parallel when the caller started a process group: this process is rank r of N.
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        if train_cfg.batch_size % self.world_size:
            raise ValueError(
                f"batch_size={train_cfg.batch_size} is the global batch: it must be a multiple of the "
                f"{self.world_size} data-parallel workers"
            )
        torch.manual_seed(train_cfg.seed)  # the model's initial weights, the same on every rank
        self.model = VideoPixelNetwork(model_cfg).to(self.device, memory_format=self._memory_format())
        # The training forward goes through DDP (gradients averaged over the ranks during backward);
        # self.model stays the plain module, so state_dict keys and checkpoints do not change.
        self._forward: torch.nn.Module = self.model
        if self.world_size > 1:
            self._forward = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index if self.device.index is not None else torch.cuda.current_device()]
                if self.device.type == "cuda"
                else None,
                forward_sync_buffers=False,  # the only buffers are the constant masks: no sync per forward
            )
        # Compile a function, not the module, so that state_dict keys stay those of the model.
        self._train_nats = torch.compile(self._nats) if train_cfg.compile else self._nats
        self.optimizer = torch.optim.RMSprop(
            self.model.parameters(), lr=train_cfg.lr, alpha=train_cfg.rmsprop_alpha, eps=train_cfg.rmsprop_eps
        )
        self.step = 0
        self.best_val = math.inf

    # -- one update -----------------------------------------------------------------------------
    def _memory_format(self) -> torch.memory_format:
        fmt = self.cfg.memory_format
        if fmt == "auto":
            fmt = "channels_last" if self.device.type == "cuda" else "contiguous"
        return torch.channels_last if fmt == "channels_last" else torch.contiguous_format

    @property
    def precision(self) -> str:
        """ "bf16" (autocast) or "fp32": what the forward pass actually runs in on this device."""
        return "bf16" if (self.cfg.amp if self.device.type == "cuda" else self.cpu_bf16) else "fp32"

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _nats(self, frames: Tensor) -> Tensor:
        """uint8 (B, T, C, H, W) -> mean nats per frame over the batch and frames 1..T-1 (float32 scalar)."""
        with self._autocast():
            logits = self._forward(frames)
        return self.model.frame_nll(logits, frames).mean()

    def train_step(self, batch: Tensor) -> Tensor:
        """One RMSProp update on uint8 (B, T, C, H, W); returns the batch's mean nats/frame (device, detached).

        Data parallel: `batch` is this rank's shard (B/N sequences) and the returned loss its mean;
        the gradients are averaged over the ranks before clipping, so every rank makes the same update.
        """
        frames = prepare(batch.to(self.device, non_blocking=True), self.cfg)
        self.model.train()
        nats = self._train_nats(frames)  # nats per frame, float32
        dims = frames.shape[2] * frames.shape[3] * frames.shape[4]
        self.optimizer.zero_grad(set_to_none=True)
        (nats / dims).backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return nats.detach()

    @torch.no_grad()
    def evaluate(self, data: Dataset | None = None, batches: int | None = None) -> float:
        """Mean nats/frame over frames context..T-1 of the first `batches` batches of `data` (val)."""
        data = self.val_data if data is None else as_dataset(data)
        if data is None:
            raise ValueError("no validation data")
        batches = self.cfg.val_batches if batches is None else batches
        return self.score(data, batches * self.cfg.batch_size).nats_per_frame

    @torch.no_grad()
    def score(self, data: Dataset | Tensor, sequences: int | None = None) -> Score:
        """The paper's score of the first `sequences` sequences of `data` (None: all): see `score`."""
        return score(
            self.model, data, self.cfg, sequences, autocast=self._autocast, rank=self.rank, world_size=self.world_size
        )

    # -- the loop -------------------------------------------------------------------------------
    def loader(self, until: int) -> DataLoader:
        n = None if is_stream(self.train_data) else len(self.train_data)
        sampler = _StepBatches(n, self.cfg.batch_size, self.cfg.seed, self.step, until, self.rank, self.world_size)
        return DataLoader(
            self.train_data,
            batch_sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def fit(
        self,
        until: int | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        progress: bool = True,
    ) -> dict[str, float]:
        """Train from self.step to `until` (default cfg.steps); returns the last logged metrics.

        on_log(step, metrics) runs every log_every steps with train_nats_per_frame (mean since the
        last log) and steps_per_second, plus val_nats_per_frame on validation steps.
        on_checkpoint(step) runs every ckpt_every steps and at the end.
        Data parallel: every rank runs the same steps; the logged loss is the mean over all ranks
        (one all-reduce per log) and a step is one update of the global batch, so steps_per_second
        counts the whole job.
        """
        from tqdm.auto import tqdm

        until = self.cfg.steps if until is None else until
        bar = tqdm(total=until, initial=self.step, disable=not progress, desc="train", dynamic_ncols=True)
        running, n_running = torch.zeros((), device=self.device), 0
        last: dict[str, float] = {}
        tick, tick_step = time.perf_counter(), self.step
        try:
            for batch in self.loader(until):
                running += self.train_step(batch)
                n_running += 1
                bar.update(1)
                step = self.step
                is_log = step % self.cfg.log_every == 0 or step == until
                is_val = self.val_data is not None and (step % self.cfg.val_every == 0 or step == until)
                if is_log or is_val:
                    if self.world_size > 1:  # every rank's shard mean -> the global batch's mean
                        dist.all_reduce(running)
                        running /= self.world_size
                    loss = float(running) / max(1, n_running)  # the only host sync
                    if not math.isfinite(loss):
                        raise NonFiniteLossError(step, loss)
                    now = time.perf_counter()
                    metrics = {
                        "train_nats_per_frame": loss,
                        "steps_per_second": (step - tick_step) / max(now - tick, 1e-9),
                    }
                    running, n_running = torch.zeros((), device=self.device), 0
                    if is_val:
                        val = self.evaluate()
                        self.best_val = min(self.best_val, val)
                        metrics["val_nats_per_frame"] = val
                    bar.set_postfix({k.split("_")[0]: f"{v:.2f}" for k, v in metrics.items() if "nats" in k})
                    last = metrics
                    if on_log is not None:
                        on_log(step, metrics)
                    tick, tick_step = time.perf_counter(), step
                if on_checkpoint is not None and (
                    step == until or (self.cfg.ckpt_every and step % self.cfg.ckpt_every == 0)
                ):
                    on_checkpoint(step)
        finally:
            bar.close()
        return last

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: only tensors, numbers, strings and containers (weights_only-safe)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_val": self.best_val,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                "python": repr(random.getstate()),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self, path: str | Path) -> Path:
        """Write a self-describing checkpoint atomically (temp file, then rename)."""
        path = Path(path)
        _atomic_torch_save(self.state_dict(), path)
        return path

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        train_data: Dataset | Tensor,
        val_data: Dataset | Tensor | None = None,
        **train_overrides: Any,
    ) -> Trainer:
        """Rebuild the architecture and trainer from a checkpoint's own configs, then load its state."""
        state = load_checkpoint(path)
        train_cfg = TrainConfig.from_dict(state["train_config"]).replace(**train_overrides)
        trainer = cls(VPNConfig.from_dict(state["model_config"]), train_cfg, train_data, val_data)
        trainer.load_state_dict(state)
        return trainer


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True: no code runs) and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, not a torch file, or objects beyond plain data
        # torch's message is a paragraph that ends by advising weights_only=False, which would run
        # the file's code: it goes to the debug log, the user gets one sentence.
        log.debug("torch.load(%s, weights_only=True) failed: %s", path, err)
        raise ValueError(_unreadable(path, str(err))) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file, so this project did not write it")
    return state


def _unreadable(path: Path, torch_error: str) -> str:
    """One sentence for a checkpoint torch.load refused: foreign objects, or bytes it cannot parse."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", torch_error)
    if found:
        return (
            f"checkpoint {path} is not a VPN checkpoint: it stores Python objects ({found.group(1)}), "
            "which are never loaded because loading them could run code"
        )
    return f"checkpoint {path} cannot be read: it is truncated, corrupt or not a PyTorch file"


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> VideoPixelNetwork:
    """The model of a checkpoint, rebuilt from its config, in eval mode."""
    state = load_checkpoint(path, map_location)
    model = VideoPixelNetwork(VPNConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(map_location).eval()


# -- the blog post's experiment -----------------------------------------------------------------
@dataclass(frozen=True)
class OverfitResult:
    """converged_step: first step whose loss was within tol of the floor (None: never).
    losses: train nats/frame at steps 1..len(losses). floor, tol: in nats/frame."""

    converged_step: int | None
    floor: float
    tol: float
    losses: list[float]


def sequence_floor(model_cfg: VPNConfig, sequence: Tensor) -> float:
    """The smallest NLL (nats/frame over frames 1..T-1) any model can reach on this sequence.

    bernoulli: the entropy of the grey-level targets (the paper's lower bound). categorical: 0, as
    each sub-pixel has one true value that a model can put all its mass on.
    """
    if model_cfg.output == "categorical":
        return 0.0
    return float(bernoulli_lower_bound(sequence[None], context=1)[0])


def overfit(
    model_cfg: VPNConfig,
    train_cfg: TrainConfig,
    sequence: Tensor,
    tol: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> OverfitResult:
    """Train on one sequence (uint8 (T, C, H, W)) until its NLL is within tol of its floor.

    tol defaults to 0.01 nats per sub-pixel (0.01 * C * H * W nats/frame after seq_len/downsample).
    Runs at most train_cfg.steps updates and reads the loss every step (this is a diagnostic, so a
    host sync per step is fine). Returns the step at which it converged, as the blog post reports.
    """
    from tqdm.auto import tqdm

    train_cfg = train_cfg.replace(batch_size=1)
    seq = prepare(sequence[None], train_cfg)[0]  # (T, C, H, W) after seq_len / downsample
    floor = sequence_floor(model_cfg, seq)
    tol = 0.01 * seq[0].numel() if tol is None else float(tol)
    trainer = Trainer(model_cfg, train_cfg.replace(seq_len=None, downsample=1, data="fixed"), seq[None])
    batch = seq[None]
    losses: list[float] = []
    converged = None
    with tqdm(total=train_cfg.steps, disable=not progress, desc="overfit", dynamic_ncols=True) as bar:
        for step in range(1, train_cfg.steps + 1):
            loss = float(trainer.train_step(batch))
            if not math.isfinite(loss):
                raise NonFiniteLossError(step, loss)
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
            bar.update(1)
            bar.set_postfix(nats=f"{loss:.2f}", floor=f"{floor:.2f}")
            if loss <= floor + tol:
                converged = step
                break
    return OverfitResult(converged, floor, tol, losses)
