"""The two configurations, one frozen dataclass each: VPNConfig (the architecture) and TrainConfig (how to train).

VPNConfig holds every hyperparameter of a Video Pixel Network.

The presets follow the seed blog post (o-tawab/Video-Pixel-Networks), relative to the paper's model:

| preset | encoder blocks | decoder blocks | filters vs full | MU width c | residual 2c | ConvLSTM |
|--------|----------------|----------------|-----------------|------------|-------------|----------|
| full   | 8              | 12             | 1               | 128        | 256         | 256      |
| mini   | 4              | 6              | 1/4             | 32         | 64          | 64       |
| micro  | 2              | 3              | 1/4             | 32         | 64          | 64       |

Any other point of (enc_blocks, dec_blocks, filter_fraction) is a valid model too: the sweeps explore
that space, so every point that passes validation must build.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

# Widths of the paper's (and the TF code's "full") model, that filter_fraction scales.
FULL_MU_CHANNELS = 128
FULL_LSTM_CHANNELS = 256

PRESETS: dict[str, dict[str, Any]] = {
    "full": {"enc_blocks": 8, "dec_blocks": 12, "filter_fraction": 1.0},
    "mini": {"enc_blocks": 4, "dec_blocks": 6, "filter_fraction": 0.25},
    "micro": {"enc_blocks": 2, "dec_blocks": 3, "filter_fraction": 0.25},
}

OUTPUTS = ("categorical", "bernoulli")
# Residual blocks (the paper's ablation, Table 2): "rmb", the residual multiplicative block, or "relu",
# PixelCNN's residual block at the same widths (vpn.layers.ResidualReLUBlock).
BLOCKS = ("rmb", "relu")
# Decoders: "pixelcnn", the paper's masked decoder over the current frame; "baseline", the paper's
# baseline, in which pixels of a frame depend only on earlier frames (vpn.model.BaselineDecoder);
# "stacks", Gated PixelCNN's vertical and horizontal stacks of the same blocks, without the masked
# decoder's blind spot (vpn.model.StacksDecoder).
DECODERS = ("pixelcnn", "baseline", "stacks")

# Dilation rates of the paper's dilated encoder, repeated over the blocks (block i gets RATES[i % 4]).
DILATION_RATES = (1, 2, 4, 8)


# Integers go into int64 columns (the results tables), torch and numpy; Python's own are unbounded.
INT64_MAX = 2**63 - 1
# Seeds: numpy's legacy generators (the searchers') take [0, 2**32), and vpn.batches seeds torch with
# seed * 1_000_003 + step, which must stay below torch's 2**64.
SEED_LIMIT = 2**32
# A device torch can name: auto, cpu, cuda or cuda:N. Nothing else: the device ends up in trial names,
# hence in folder names, and torch.device("cuda/../x") fails only where the trial runs.
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,3})?)$")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def type_problem(value: Any, allowed: tuple[type, ...]) -> str | None:
    """Why `value` is not one of the simple types `allowed` (bool, int, float, str, NoneType), or None.

    Stricter than isinstance where YAML and Python are lax: a bool is not a number (`lr: true` is not
    1), a float is finite (.nan and .inf are YAML floats), an int fits an int64, and an int is a
    float's value but a float is no int's. numpy's scalars count as the Python types they stand for.
    """
    kinds = " or ".join(_KIND_WORDS[t] for t in allowed)
    if isinstance(value, bool):
        return None if bool in allowed else f"must be {kinds}, got {value!r}"
    if isinstance(value, numbers.Integral):
        if int not in allowed and float not in allowed:
            return f"must be {kinds}, got {value!r}"
        if abs(int(value)) > INT64_MAX:
            return f"must be {kinds} of at most 2**63 - 1 in size, got {value!r}"
        return None
    if isinstance(value, numbers.Real):
        if float not in allowed:
            return f"must be {kinds}, got {value!r}"
        return None if math.isfinite(value) else f"must be a finite number, got {value!r}"
    if value is None:
        return None if type(None) in allowed else f"must be {kinds}, got null"
    if isinstance(value, str):
        return None if str in allowed else f"must be {kinds}, got {value!r}"
    return f"must be {kinds}, got {value!r} (a {type(value).__name__})"


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Each field of the dataclass `cls` with the simple types its annotation admits."""
    simple = (bool, int, float, str, type(None))
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if all(a in simple for a in args):
            out[name] = tuple(args)
    return out


def check_field_types(config: Any) -> None:
    """Raise ValueError naming the first field of the dataclass `config` whose value is not of its
    annotated type (type_problem: no bool for a number, no NaN, no int beyond int64)."""
    for f in dataclasses.fields(config):
        allowed = _field_types(type(config)).get(f.name)
        problem = allowed and type_problem(getattr(config, f.name), allowed)
        if problem:
            raise ValueError(f"{f.name} {problem}")


def refuse_unknown_keys(cls: type, d: Mapping[str, Any]) -> None:
    """Raise ValueError naming every key of `d` that is not a field of the dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys are {sorted(names)}")


class _Config:
    """from_dict / to_dict / replace, shared by the frozen config dataclasses below.

    from_dict rejects keys that are not fields (a typo must not pass silently: flax's `n_resent`
    did nothing), and replace goes through it, so every change is validated by __post_init__.
    """

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        refuse_unknown_keys(cls, d)
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        return self.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class VPNConfig(_Config):
    """Architecture of a Video Pixel Network.

    enc_blocks: residual multiplicative blocks in the per-frame encoder (paper: k = 8).
    dec_blocks: residual multiplicative blocks in the PixelCNN decoder (paper: l = 12).
    filter_fraction: widths as a fraction of the full model's (MU width c = 128, ConvLSTM 256).
    image_channels: 1 (greyscale) or 3 (RGB; R before G before B within a pixel).
    output: "categorical" (256-way softmax, the general model) or "bernoulli" (sigmoid
        cross-entropy against x/255, the paper's Moving MNIST metric).
    dilation: encoder blocks use dilation rates 1, 2, 4, 8 repeated over the blocks (the paper:
        constant inside a block, doubling from one block to the next).
    block: "rmb" (residual multiplicative blocks, the paper's VPN) or "relu" (PixelCNN's residual
        block, the paper's "ReLU" rows), in the encoder and the decoder alike.
    decoder: "pixelcnn" (masked convolutions over the current frame, the VPN), "baseline" (the
        paper's baseline: no dependency within a frame; the current frame never enters) or "stacks"
        (a vertical and a horizontal stack, Gated PixelCNN's fix of the masked decoder's blind spot).
    """

    enc_blocks: int = 8
    dec_blocks: int = 12
    filter_fraction: float = 1.0
    image_channels: int = 1
    output: str = "categorical"
    dilation: bool = False
    block: str = "rmb"
    decoder: str = "pixelcnn"

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("enc_blocks", "dec_blocks"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        f = self.filter_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
            raise ValueError(f"filter_fraction must be a number in (0, 1], got {f!r}")
        if not 0.0 < f <= 1.0:
            raise ValueError(f"filter_fraction must be in (0, 1], got {f!r}")
        object.__setattr__(self, "filter_fraction", float(f))
        if self.image_channels not in (1, 3) or not _is_int(self.image_channels):
            raise ValueError(f"image_channels must be 1 or 3, got {self.image_channels!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not isinstance(self.dilation, bool):
            raise ValueError(f"dilation must be true or false, got {self.dilation!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        # Masked convolutions split every decoder layer's channels into one group per colour
        # (R, G, B); a group with no channel would cut the path from earlier colours to later ones.
        if self.mu_channels < self.image_channels:
            raise ValueError(
                f"filter_fraction={f} gives MU width c={self.mu_channels}, which can't be split "
                f"into {self.image_channels} colour groups (need c >= {self.image_channels})"
            )

    # -- derived widths -------------------------------------------------------------------------
    @property
    def mu_channels(self) -> int:
        """c: channels inside each multiplicative unit (half the residual stream)."""
        return max(0, round(FULL_MU_CHANNELS * self.filter_fraction))

    @property
    def residual_channels(self) -> int:
        """2c: channels of the residual stream between blocks."""
        return 2 * self.mu_channels

    @property
    def lstm_channels(self) -> int:
        """Hidden channels of the ConvLSTM (256 in the full model)."""
        return max(1, round(FULL_LSTM_CHANNELS * self.filter_fraction))

    @property
    def out_channels_per_colour(self) -> int:
        return 256 if self.output == "categorical" else 1

    def encoder_dilations(self) -> tuple[int, ...]:
        """Dilation rate of each encoder block: 1, 2, 4, 8, 1, 2, ... or all 1."""
        if not self.dilation:
            return (1,) * self.enc_blocks
        return tuple(DILATION_RATES[i % len(DILATION_RATES)] for i in range(self.enc_blocks))

    def matching_preset(self) -> str | None:
        """Name of the preset with the same depth and width, or None."""
        for name, spec in PRESETS.items():
            if all(getattr(self, k) == v for k, v in spec.items()):
                return name
        return None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VPNConfig:
        """A preset ("full", "mini", "micro"), with keyword overrides of any field."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# How to train: the loop is vpn.train; these are its settings.
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
DATA_SOURCES = ("fixed", "stream")


@dataclass(frozen=True)
class TrainConfig(_Config):
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
    forecast_samples: k, the free-running samples drawn per test sequence at the end of a sweep trial
        (vpn.forecast: MSE, MAE, SSIM, PSNR of frames context..T-1 drawn given the frames before;
        the paper's and OpenSTL's 10 given 10 at seq_len 20, context 10); 0: no free-running scoring.
    forecast_temperature: the sampling temperature of those draws.
    forecast_sequences: how many test sequences (the first ones) are scored so; None: as many as
        test_sequences. Drawing samples every pixel in turn, so cheap profiles score fewer.
    activation_checkpointing: recompute each residual block in the backward pass (true), or not
        (false); "auto": off on CPU, and on CUDA on only if the step does not fit the GPU without it
        (vpn.memory.choose_settings). The numbers do not change, only memory and time.
    micro_batch_size: sequences per forward pass on each worker (gradient accumulation over the
        worker's share of the batch; it must divide it); None: the whole share at once; "auto": the
        whole share on CPU, and on CUDA the largest divisor that fits the GPU (vpn.memory). An update
        equals the whole-batch update up to float rounding.
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
    forecast_samples: int = 10
    forecast_temperature: float = 1.0
    forecast_sequences: int | None = None
    activation_checkpointing: bool | str = "auto"
    micro_batch_size: int | str | None = "auto"

    def __post_init__(self) -> None:
        check_field_types(self)
        positive = ("steps", "batch_size", "log_every", "val_every", "val_batches", "context", "downsample")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("ckpt_every", "num_workers", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.seed >= SEED_LIMIT:
            raise ValueError(f"seed must be below 2**32 = {SEED_LIMIT}, got {self.seed}")
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
        if not DEVICE_RE.match(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
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
        f = self.forecast_sequences
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 1):
            raise ValueError(f"forecast_sequences must be an integer >= 1 or null (as test_sequences), got {f!r}")
        k = self.forecast_samples
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"forecast_samples must be an integer >= 0 (0: no free-running scoring), got {k!r}")
        temp = self.forecast_temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (temp > 0 and math.isfinite(temp)):
            raise ValueError(f"forecast_temperature must be a positive number, got {temp!r}")
        if not (isinstance(self.activation_checkpointing, bool) or self.activation_checkpointing == "auto"):
            raise ValueError(
                f"activation_checkpointing must be true, false or 'auto', got {self.activation_checkpointing!r}"
            )
        m = self.micro_batch_size
        if not (m is None or m == "auto" or (_is_int(m) and m >= 1)):
            raise ValueError(f"micro_batch_size must be an integer >= 1, null (the whole batch) or 'auto', got {m!r}")
        if _is_int(m) and m > self.batch_size:
            raise ValueError(f"micro_batch_size={m} must be <= batch_size={self.batch_size}")
        if _is_int(m) and self.batch_size % m:
            # Accumulation runs batch_size / micro_batch_size equal passes (vpn.step.micro_batches).
            raise ValueError(f"micro_batch_size={m} must divide batch_size={self.batch_size}")
