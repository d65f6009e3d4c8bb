"""A plain training loop for any VPNConfig: RMSProp, teacher forcing, validation, exact resume.

- The batch of step s is a pure function of (seed, s) (vpn.batches), so a resumed run sees the same
  batches as an uninterrupted one without any sampler state to save, and a sweep trial restarted
  from a checkpoint continues its own curve.
- Scoring (`Trainer.score`, and validation through it) is vpn.evaluate.score: `model.nll`, the
  paper's metric, beside the floor of exactly the frames scored.
- Checkpoints (vpn.checkpoint) rebuild the architecture from their own config.
- The loss that is optimised is nats per sub-pixel (nats/frame divided by C*H*W), so the gradient
  clipping threshold means the same at every frame size; everything reported is nats per frame.
- Host syncs happen only every `log_every` steps: losses stay on the device in between. A non-finite
  loss is detected there and raises NonFiniteLossError.
- Speed (measured in benchmarks/, see benchmarks/RESULTS.md): bf16 autocast, channels_last and
  cuDNN's autotuner (`autotune_convolutions`: a trial's shapes are static) on CUDA by default;
  torch.compile of the forward pass and loss on request (`compile`); bf16 autocast on CPU on
  request (`cpu_amp`, where the CPU has native bf16). None of them changes the parameters or the
  checkpoint format.
- Logging and checkpointing hang off two hooks of `fit`, so the same loop serves the CLI and the
  Ray Tune trainable.
- Data parallel: when torch.distributed is initialised (N ranks; the caller starts the process group,
  e.g. Ray Train), rank r trains on items [r*B/N, (r+1)*B/N) of each step's batch and DDP averages
  the gradients, so an update is the single-process one up to float rounding and the batches stay a
  pure function of (seed, step). `self.model` stays the plain module (same checkpoints); the logged
  loss and the scores are all-reduced, so every rank sees the same numbers.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vpn.batches import StepBatches, as_dataset, is_stream
from vpn.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, mismatch, save_checkpoint
from vpn.config import DEVICE_RE, TrainConfig, VPNConfig
from vpn.evaluate import Score, prepare, score
from vpn.model import VideoPixelNetwork
from vpn.step import micro_batches, update

log = logging.getLogger(__name__)


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
    """The torch device of a device name (TrainConfig.device's, or `--device`): auto is CUDA where torch
    sees it, else the CPU. ValueError in one sentence for a name that is none, or a CUDA device torch
    does not see here (a CPU-only build, no driver, fewer GPUs), instead of an error at the first tensor."""
    if not isinstance(name, str) or not DEVICE_RE.match(name):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            sees = f"torch {torch.__version__} ({build}) sees {count} CUDA device(s) here"
            raise ValueError(f"device {name!r}, but {sees}")
    return device


def autotune_convolutions(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest.

    A trial's shapes are static (one batch size, clip length and frame size; validation and the
    sampler add a few more), so each is timed once and every later step reuses the choice. On CPU
    nothing changes. cuDNN may then pick a different (equally exact) algorithm than on another run.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def gpu_memory_gib(device: torch.device) -> float:
    """The memory this process may allocate on a CUDA device, in GiB: the device's memory times the
    caching allocator's cap (torch.cuda.set_per_process_memory_fraction; 1 unless a fractional-GPU
    trial set one), so that "auto" memory settings plan for the share this trial was given."""
    total = torch.cuda.get_device_properties(device).total_memory
    return total * torch.cuda.get_per_process_memory_fraction(device) / 2**30


def restore_cuda_rng(states: list[Tensor]) -> None:
    """The checkpoint's CUDA generator states, for the GPUs this process sees.

    A checkpoint holds one state per GPU visible when it was written (a Ray Train worker sees the
    whole node); a resume may see fewer (a restart placed elsewhere, `vpn train --resume` on a
    one-GPU box): device i gets state i, and states beyond the visible GPUs are dropped.
    """
    if not states or not torch.cuda.is_available():
        return
    for i, s in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(s, i)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


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
        autotune_convolutions(self.device)
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
        self.activation_checkpointing, self.micro_batch_size = self._memory_settings()
        self.model.set_activation_checkpointing(self.activation_checkpointing)
        self.step = 0
        self.best_val = math.inf

    # -- one update -----------------------------------------------------------------------------
    def _memory_settings(self) -> tuple[bool, int | None]:
        """(activation_checkpointing, micro_batch_size) this trainer runs with: "auto" resolved.

        On CPU "auto" keeps the plain step (no checkpointing, the whole share at once). On CUDA it
        takes the cheapest settings whose estimated step (vpn.memory) fits the device's memory.
        """
        ckpt, micro = self.cfg.activation_checkpointing, self.cfg.micro_batch_size
        share = self.cfg.batch_size // self.world_size  # sequences per step on this worker
        if "auto" in (ckpt, micro) and self.device.type == "cuda":
            from vpn.memory import budget_bytes, choose_settings

            t, _, h, w = self.train_data[0].shape  # (T, C, H, W) before seq_len and downsample
            frames = (self.cfg.seq_len or t, h // self.cfg.downsample, w // self.cfg.downsample)
            total = gpu_memory_gib(self.device)
            chosen = choose_settings(self.model_cfg, self.cfg, frames, self.precision, budget_bytes(total), share)
            if chosen is None:
                raise ValueError(
                    f"no activation_checkpointing / micro_batch_size fits a step of {share} sequences of "
                    f"{frames} frames in the {total:.1f} GiB this process may use of its GPU"
                )
            ckpt, micro = chosen[0], chosen[1]
        ckpt = False if ckpt == "auto" else ckpt
        micro = None if micro in ("auto", share) else micro
        micro_batches(share, micro)  # names the field if it does not divide the worker's share
        return ckpt, micro

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
        nats = update(
            self._train_nats,
            self.model,
            self._forward,
            self.optimizer,
            frames,
            self.micro_batch_size,
            self.cfg.grad_clip,
        )
        self.step += 1
        return nats

    def evaluate(self, data: Dataset | None = None, batches: int | None = None) -> float:
        """Mean nats/frame over frames context..T-1 of the first `batches` batches of `data` (val)."""
        data = self.val_data if data is None else as_dataset(data)
        if data is None:
            raise ValueError("no validation data")
        batches = self.cfg.val_batches if batches is None else batches
        return self.score(data, batches * self.cfg.batch_size).nats_per_frame

    def score(self, data: Dataset | Tensor, sequences: int | None = None) -> Score:
        """The paper's score of the first `sequences` sequences of `data` (None: all): see `score`."""
        # fp32 without TF32 (vpn.evaluate.full_precision), not the training autocast: the score of a
        # checkpoint must not depend on where it was computed (`vpn eval` scores in fp32 too).
        return score(self.model, data, self.cfg, sequences, rank=self.rank, world_size=self.world_size)

    # -- the loop -------------------------------------------------------------------------------
    def loader(self, until: int) -> DataLoader:
        n = None if is_stream(self.train_data) else len(self.train_data)
        sampler = StepBatches(n, self.cfg.batch_size, self.cfg.seed, self.step, until, self.rank, self.world_size)
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
        restore_cuda_rng(state["rng"]["cuda"])

    def save(self, path: str | Path) -> Path:
        """Write a self-describing checkpoint atomically (temp file, then rename)."""
        return save_checkpoint(self.state_dict(), path)

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
        missing = [k for k in ("optimizer", "step", "best_val", "rng") if k not in state]
        if missing:
            raise ValueError(f"checkpoint {path} has no {', '.join(missing)}: it cannot resume training")
        train_cfg = TrainConfig.from_dict(state["train_config"]).replace(**train_overrides)
        trainer = cls(VPNConfig.from_dict(state["model_config"]), train_cfg, train_data, val_data)
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise mismatch(path, e) from None
        return trainer
