"""How much memory a training step needs, measured from the model itself, and the settings that fit.

`train_memory` runs the Trainer's own update (vpn.step.update: forward, loss, backward, clipping,
RMSProp) on the meta device, where tensors have shapes and sizes but no data, and follows every
storage an operation creates until Python frees it (a TorchDispatchMode, each storage counted once,
however many views share it). Its peak is the step's: the activations saved for the backward pass,
the backward's transient buffers, the gradients and the optimizer's temporaries, with the
parameters and RMSProp's state (one fp32 tensor per parameter) on top. Nothing is kept by hand: a
new layer, decoder or setting is counted the moment it runs.

What it does not see: the allocator's rounding and fragmentation, cuDNN's or oneDNN's workspaces
and the CUDA context. `fits` keeps a margin for those (HEADROOM, CONTEXT_GIB), and
tests/test_memory.py compares the estimate with a real CPU step's peak at two sizes.

bf16: autocast ignores meta tensors, so a bf16 step is simulated: every parameter is read through a
cast to bf16 at each use (a parametrization, so that a checkpointed block's recomputation casts
again, as autocast does) and the buffers are bf16. That is what autocast does for a network of
convolutions and elementwise ops; the loss casts the logits to fp32 as under autocast. Parameters,
gradients and optimizer state stay fp32, as in training. tests/test_memory.py compares the saved
bytes with those of a real bf16 autocast forward on CPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vpn.config import TrainConfig, VPNConfig
from vpn.model import VideoPixelNetwork
from vpn.step import micro_batches, update

GIB = 2**30
PRECISIONS = ("fp32", "bf16")
# Planning margins for what the meta run cannot see: plan for HEADROOM of the GPU's memory, less
# the CUDA context and cuDNN workspaces (CONTEXT_GIB, about what a CUDA 12 context takes).
HEADROOM = 0.9
CONTEXT_GIB = 1.0


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by operations under this mode and still alive; and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the StorageImpl: views and in-place results share it
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


class _ToBF16(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.to(torch.bfloat16)


def _read_in_bf16(model: torch.nn.Module) -> None:
    """Autocast's casts by hand: each parameter read as a fresh bf16 copy of its fp32 self; buffers bf16."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        for name, _ in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, _ToBF16(), unsafe=True)
        for name, buf in list(module.named_buffers(recurse=False)):
            setattr(module, name, buf.to(torch.bfloat16))


@dataclass(frozen=True)
class MemoryEstimate:
    """A training step's memory on one device, in bytes (see train_memory).

    parameters, optimizer_state: fp32, alive all the time. saved_activations: what the forward of
    one micro-batch keeps for its backward (with the loss). step_peak: the peak of everything the
    step creates (saved activations, backward transients, gradients, optimizer temporaries).
    """

    parameters: int
    optimizer_state: int
    saved_activations: int
    step_peak: int

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.step_peak

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def train_memory(
    model_cfg: VPNConfig,
    train_cfg: TrainConfig,
    frames: tuple[int, int, int],
    precision: str = "fp32",
    batch_size: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one training step on one device, measured on the meta device.

    frames: (T, H, W) of the prepared sequences (after seq_len and downsample). batch_size: the
    sequences this device trains on per step (a worker's share; default train_cfg.batch_size).
    train_cfg.activation_checkpointing and micro_batch_size must be resolved (not "auto").
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    ckpt, micro = train_cfg.activation_checkpointing, train_cfg.micro_batch_size
    if ckpt == "auto" or micro == "auto":
        raise ValueError("train_memory needs activation_checkpointing and micro_batch_size resolved, not 'auto'")
    b = train_cfg.batch_size if batch_size is None else batch_size
    micro_batches(b, micro)  # names the field if micro_batch_size does not divide the batch
    t, h, w = frames
    with torch.device("meta"):
        model = VideoPixelNetwork(model_cfg)
        optimizer = torch.optim.RMSprop(model.parameters(), lr=train_cfg.lr, alpha=train_cfg.rmsprop_alpha)
        batch = torch.zeros(b, t, model_cfg.image_channels, h, w, dtype=torch.uint8)
    if precision == "bf16":
        _read_in_bf16(model)
    model.set_activation_checkpointing(ckpt)
    tracker = _LiveBytes()
    after_forward: list[int] = []

    def nats(chunk: Tensor) -> Tensor:
        out = model.frame_nll(model(chunk), chunk).mean()
        after_forward.append(tracker.live)
        return out

    # RMSProp's state as after a first step, without running one (half the cost of the estimate):
    # a step on stand-in gradients, which the tracked update's zero_grad then frees, as it frees
    # the previous step's gradients in training.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    with tracker:  # the steady state: gradients and optimizer state exist, as in every later step
        update(nats, model, model, optimizer, batch, micro, train_cfg.grad_clip)
    n_params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.ndim)
    return MemoryEstimate(n_params, state, after_forward[-1], tracker.peak)


def budget_bytes(gpu_memory_gib: float) -> int:
    """What a step may use on a device of gpu_memory_gib: HEADROOM of it, less CONTEXT_GIB."""
    return int((gpu_memory_gib * HEADROOM - CONTEXT_GIB) * GIB)


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_settings(
    model_cfg: VPNConfig,
    train_cfg: TrainConfig,
    frames: tuple[int, int, int],
    precision: str,
    budget: int,
    batch_size: int | None = None,
    measure: Callable[..., MemoryEstimate] | None = None,
) -> tuple[bool, int | None, MemoryEstimate] | None:
    """The cheapest (activation_checkpointing, micro_batch_size) whose step fits in `budget` bytes.

    Cheapest first: the plain step; then checkpointing (a third more compute, no fewer sequences per
    pass); then checkpointing with ever smaller micro-batches (divisors of the worker's share).
    A field the config fixes (not "auto") stays fixed. None when nothing fits. The estimate returned
    is that of the chosen settings. measure: train_memory's stand-in with its signature (a cache of it,
    pipeline.sweep.plan's), default train_memory itself.
    """
    measure = train_memory if measure is None else measure
    b = train_cfg.batch_size if batch_size is None else batch_size
    ckpts = [False, True] if train_cfg.activation_checkpointing == "auto" else [train_cfg.activation_checkpointing]
    fixed = train_cfg.micro_batch_size
    micros = [None, *_divisors_descending(b)[1:]] if fixed == "auto" else [fixed]
    candidates = [(c, m) for m in micros for c in ckpts]  # whole batch (plain, checkpointed), then smaller
    for ckpt, micro in candidates:
        cfg = train_cfg.replace(activation_checkpointing=ckpt, micro_batch_size=micro)
        estimate = measure(model_cfg, cfg, frames, precision, b)
        if estimate.total <= budget:
            return ckpt, micro, estimate
    return None
