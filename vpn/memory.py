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

Cost: on the meta device a step costs per operation, not per byte, and torch runs many meta kernels
as Python references. So each distinct meta op runs once per process (_MetaMemo), of n > 3
micro-batches three run (_measure), and each estimate_key is measured once (train_memory); each is
checked equal to the byte to the plain measurement in tests/test_memory.py.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

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
# A CPU trial's process holds its imports (torch, Ray, MLflow, the trainable) besides the step: 0.40 GiB
# of resident memory measured on the 2-core dev machine (/usr/bin/time -v python -c "import torch, ray,
# mlflow, pipeline.sweep.trials.trainable"), planned as PROCESS_GIB.
PROCESS_GIB = 0.5


# The outputs' metadata of functional meta ops, by the op and its inputs' metadata (_MetaMemo): torch
# runs many meta kernels as Python references (a meta `mul` costs about 1.5 ms), and a network of
# repeated blocks asks the same question thousands of times an estimate. Emptied past MEMO_LIMIT.
_MEMO: dict[tuple, tuple] = {}
MEMO_LIMIT = 200_000
_NO_KEY = object()
_SCALARS = (bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _meta_key(x: Any) -> Any:
    """What a meta kernel can read of an argument (its metadata, or a plain value); _NO_KEY if unknown."""
    kind = type(x)
    if kind is tuple or kind is list:
        keys = []
        for v in x:
            k = _meta_key(v)
            if k is _NO_KEY:
                return _NO_KEY
            keys.append(k)
        return kind, tuple(keys)
    if isinstance(x, Tensor):
        if x.device.type != "meta":  # a CPU tensor's values may matter (RMSProp's step count)
            return _NO_KEY
        return x.dtype, x.shape, x.stride(), x.storage_offset(), x.layout, x.is_conj(), x.is_neg()
    if x is None or isinstance(x, _SCALARS):
        return kind, x
    return _NO_KEY


def _dense_bytes(t: Tensor) -> int:
    """Bytes of the storage torch.empty_strided makes for t's size and stride."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _record(out: Any, args: Any) -> tuple | None:
    """(size, stride, dtype) of each output, None for a None; None if empty_strided could not remake them
    (a storage shared with an input or another output, an offset, spare bytes)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    shapes, storages = [], {t.untyped_storage()._cdata for t in tree_flatten(args)[0] if isinstance(t, Tensor)}
    for t in outs:
        if t is None:
            shapes.append(None)
            continue
        if not isinstance(t, Tensor) or t.device.type != "meta" or t.storage_offset() or t.layout != torch.strided:
            return None
        storage = t.untyped_storage()._cdata
        if storage in storages or t.untyped_storage().nbytes() != _dense_bytes(t):
            return None
        storages.add(storage)
        shapes.append((tuple(t.shape), t.stride(), t.dtype))
    return ("fresh", type(out) if isinstance(out, (tuple, list)) else None, tuple(shapes))


def _replay(recorded: tuple) -> Any:
    _, kind, shapes = recorded
    outs = [None if s is None else torch.empty_strided(s[0], s[1], dtype=s[2], device="meta") for s in shapes]
    return outs[0] if kind is None else kind(outs)


def _self_record(out: Any, args: Any) -> tuple | None:
    """An in-place op's record: that it returned its first argument with its metadata unchanged."""
    return ("self",) if out is args[0] else None


_KINDS: dict[Any, str | None] = {}


def _kind(func: Any) -> str | None:
    """ "fresh": the op writes no input and returns new tensors (no views); "self": it writes its first
    argument only, in place, and returns it (mul_, addcmul_). Either way, on the meta device its
    result is a function of its inputs' metadata, so it can be remade from a record. None: any other
    op (views, out= variants, several written inputs), always run."""
    if func not in _KINDS:
        schema, kind = func._schema, None
        returns, arguments = schema.returns, schema.arguments
        if not schema.is_mutable and all(
            r.alias_info is None and str(r.type) in ("Tensor", "Tensor[]", "Tensor?") for r in returns
        ):
            kind = "fresh"
        elif (
            len(returns) == 1
            and returns[0].alias_info is not None
            and returns[0].alias_info.is_write
            and arguments
            and arguments[0].alias_info is not None
            and arguments[0].alias_info.before_set == returns[0].alias_info.before_set
            and all(a.alias_info is None for a in arguments[1:])
        ):
            kind = "self"
        _KINDS[func] = kind
    return _KINDS[func]


class _MetaMemo(TorchDispatchMode):
    """Runs every op, answering a meta op asked before from its record (_kind): a functional one by an
    empty tensor of the same size, stride and dtype, which is all a meta kernel computes, an in-place
    one by its first argument. tests/test_memory.py: estimates are the same to the byte without it.
    memo False: every op runs (the test's reference)."""

    memo = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _kind(func) if self.memo else None
        key = _NO_KEY if kind is None else _meta_key((args, tuple(sorted(kwargs.items()))))
        if key is _NO_KEY:
            out = func(*args, **kwargs)
        else:
            key = (func, key)
            recorded = _MEMO.get(key)
            if recorded is None:
                before = kind == "self" and _meta_key(args[0])
                out = func(*args, **kwargs)
                if len(_MEMO) >= MEMO_LIMIT:
                    _MEMO.clear()
                if kind == "fresh":
                    _MEMO[key] = _record(out, (args, kwargs))
                elif before == _meta_key(args[0]):  # no resize_ or as_strided_ that moved it
                    _MEMO[key] = _self_record(out, args)
            elif recorded[0] == "self":
                out = args[0]
            else:
                out = _replay(recorded)
        self._created(out)
        return out

    def _created(self, out: Any) -> None:
        pass


def meta_memo() -> _MetaMemo:
    """A context in which work on the meta device (building a model there, counting its FLOPs, an
    estimate) runs each distinct meta op once (_MetaMemo); every result is unchanged. Ops on other
    devices run as always."""
    return _MetaMemo()


class _LiveBytes(_MetaMemo):
    """Bytes of the storages created by operations under this mode and still alive; and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def _created(self, out: Any) -> None:
        for t in (out,) if isinstance(out, Tensor) else tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the StorageImpl: views and in-place results share it
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())


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


# TrainConfig fields no byte of train_memory's result depends on: it never reads them (the frames, the
# precision and the worker's share come as arguments), or reads them only as values a meta step never
# looks at (lr, rmsprop_alpha). estimate_key sets them to their defaults, so that trials differing in them
# share one estimate; every other field (a new one too) keys the cache. tests/test_memory.py checks that
# changing an ignored field changes no estimate, and that every keyed field can change one. (memory_format
# and compile change a real GPU step's memory a little; the estimate models neither.)
IGNORED_TRAIN_FIELDS = (
    "steps", "lr", "rmsprop_alpha", "rmsprop_eps", "seed", "log_every", "val_every", "val_batches", "context",
    "ckpt_every", "seq_len", "downsample", "device", "amp", "cpu_amp", "memory_format", "compile", "num_workers",
    "data", "test_sequences", "forecast_samples", "forecast_temperature", "forecast_sequences",
)  # fmt: skip
_DEFAULTS = TrainConfig()


def estimate_key(
    model_cfg: VPNConfig,
    train_cfg: TrainConfig,
    frames: tuple[int, int, int],
    precision: str = "fp32",
    batch_size: int | None = None,
) -> tuple[VPNConfig, TrainConfig, tuple[int, int, int], str]:
    """What train_memory's result is a function of: (model, step config, frames, precision).

    The step config is train_cfg with the IGNORED_TRAIN_FIELDS at their defaults, batch_size the
    sequences this device trains on, grad_clip only on or off (1.0 or 0: its value scales gradients
    in place), and micro_batch_size equal to the share as None (one pass: update() runs both alike).
    """
    b = train_cfg.batch_size if batch_size is None else batch_size
    micro = train_cfg.micro_batch_size
    if micro_batches(b, micro) == 1:  # names the field if micro_batch_size does not divide the batch
        micro = None
    fixed = {f: getattr(_DEFAULTS, f) for f in IGNORED_TRAIN_FIELDS}
    clip = _DEFAULTS.grad_clip if train_cfg.grad_clip > 0 else 0.0
    cfg = train_cfg.replace(**fixed, batch_size=b, micro_batch_size=micro, grad_clip=clip)
    return model_cfg, cfg, tuple(frames), precision


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
    Measured once per process for each estimate_key (a second or so for a full-size model).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if "auto" in (train_cfg.activation_checkpointing, train_cfg.micro_batch_size):
        raise ValueError("train_memory needs activation_checkpointing and micro_batch_size resolved, not 'auto'")
    return _measured(*estimate_key(model_cfg, train_cfg, frames, precision, batch_size))


def _measure(
    model_cfg: VPNConfig,
    train_cfg: TrainConfig,
    frames: tuple[int, int, int],
    precision: str,
    batch_size: int,
    every_micro_batch: bool = False,
) -> MemoryEstimate:
    """train_memory's measurement itself, uncached.

    Of n > 3 micro-batches only the first three run (every_micro_batch False): the fourth and later
    ones repeat the third's allocations, each freed before the next begins (the second still differs:
    the running loss is the first's until it becomes a sum), while the whole batch stays on the device
    (the three run on a view of it). tests/test_memory.py: equal to the byte to running all n.
    """
    ckpt, micro = train_cfg.activation_checkpointing, train_cfg.micro_batch_size
    t, h, w = frames
    with torch.device("meta"), _MetaMemo():
        model = VideoPixelNetwork(model_cfg)
        optimizer = torch.optim.RMSprop(model.parameters(), lr=train_cfg.lr, alpha=train_cfg.rmsprop_alpha)
        batch = torch.zeros(batch_size, t, model_cfg.image_channels, h, w, dtype=torch.uint8)
        if precision == "bf16":
            _read_in_bf16(model)
        # RMSProp's state as after a first step, without running one (half the cost of the estimate):
        # a step on stand-in gradients, which the tracked update's zero_grad then frees, as it frees
        # the previous step's gradients in training.
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    model.set_activation_checkpointing(ckpt)
    tracker = _LiveBytes()
    after_forward: list[int] = []

    def nats(chunk: Tensor) -> Tensor:
        out = model.frame_nll(model(chunk), chunk).mean()
        after_forward.append(tracker.live)
        return out

    if micro is not None and not every_micro_batch:
        batch = batch[: 3 * micro]  # a view: the whole batch's storage is counted, as it is on the device
    with tracker:  # the steady state: gradients and optimizer state exist, as in every later step
        update(nats, model, model, optimizer, batch, micro, train_cfg.grad_clip)
    n_params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.ndim)
    return MemoryEstimate(n_params, state, after_forward[-1], tracker.peak)


@functools.lru_cache(maxsize=4096)
def _measured(
    model_cfg: VPNConfig, train_cfg: TrainConfig, frames: tuple[int, int, int], precision: str
) -> MemoryEstimate:
    return _measure(model_cfg, train_cfg, frames, precision, train_cfg.batch_size)


def budget_bytes(gpu_memory_gib: float) -> int:
    """What a step may use on a device of gpu_memory_gib: HEADROOM of it, less CONTEXT_GIB."""
    return int((gpu_memory_gib * HEADROOM - CONTEXT_GIB) * GIB)


def host_budget_bytes(memory_gib: float) -> int:
    """What a step may use in a CPU process allowed memory_gib of RAM: HEADROOM of it, less PROCESS_GIB."""
    return int((memory_gib * HEADROOM - PROCESS_GIB) * GIB)


def host_memory_bytes() -> int:
    """This machine's memory as this process may use it: the physical RAM, or a container's lower limit
    (cgroup v2 memory.max, v1 memory.limit_in_bytes)."""
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_settings(
    model_cfg: VPNConfig,
    train_cfg: TrainConfig,
    frames: tuple[int, int, int],
    precision: str,
    budget: int,
    batch_size: int | None = None,
) -> tuple[bool, int | None, MemoryEstimate] | None:
    """The cheapest (activation_checkpointing, micro_batch_size) whose step fits in `budget` bytes.

    Cheapest first: the plain step; then checkpointing (a third more compute, no fewer sequences per
    pass); then ever smaller micro-batches (divisors of the worker's share), each without and then
    with checkpointing.
    A field the config fixes (not "auto") stays fixed. None when nothing fits. The estimate returned
    is that of the chosen settings. It stops at the first that fits, and train_memory's cache
    measures no setting twice (a later call for the same trial measures nothing).
    """
    b = train_cfg.batch_size if batch_size is None else batch_size
    ckpts = [False, True] if train_cfg.activation_checkpointing == "auto" else [train_cfg.activation_checkpointing]
    fixed = train_cfg.micro_batch_size
    micros = [None, *_divisors_descending(b)[1:]] if fixed == "auto" else [fixed]
    candidates = [(c, m) for m in micros for c in ckpts]  # whole batch (plain, checkpointed), then smaller
    for ckpt, micro in candidates:
        cfg = train_cfg.replace(activation_checkpointing=ckpt, micro_batch_size=micro)
        estimate = train_memory(model_cfg, cfg, frames, precision, b)
        if estimate.total <= budget:
            return ckpt, micro, estimate
    return None
