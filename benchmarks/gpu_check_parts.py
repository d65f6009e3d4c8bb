"""The model-side parts of benchmarks.gpu_check: each takes the run's Scale and returns its checks and findings.

A check has a pass/fail and the tolerance it was judged by; a finding is a measurement of one of
issue 18's "possible" defects, with the threshold past which it counts as shown (a finding never
fails the run: it says what to fix). Every part runs on CUDA at full size, and with --dry-run on
the CPU at tiny size, where a comparison of CUDA against CPU becomes channels_last against
contiguous on the CPU: the same code, so that the script cannot rot.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import vpn.train
from benchmarks.bench_sample import lstm_context
from benchmarks.bench_train import exact_fp32
from benchmarks.common import interleaved, median
from vpn import VideoPixelNetwork, VPNConfig
from vpn.config import TrainConfig
from vpn.sample import decode_frame
from vpn.train import Trainer

# The training target: the full model at >= 40% of the dense bf16 peak.
MFU_TARGET = 0.40
Result = dict[str, Any]


@dataclass(frozen=True)
class Scale:
    """The sizes one run uses: full size on a GPU, tiny on the CPU for --dry-run.

    size: frame height and width. seq_len: frames of a training sequence. width: every preset's
    filter_fraction replaced by this (None: the presets' own). loss_steps, loss_batch: the bf16 against
    fp32 curve. big_batch, big_micro: the accumulated full-preset step (the paper's batch 16). memory_slack_gib:
    what the estimate may miss besides its relative tolerance (cuDNN and cuBLAS workspaces on CUDA).
    """

    dry_run: bool
    device: str
    size: int
    seq_len: int
    width: float | None
    loss_steps: int
    loss_batch: int
    big_batch: int
    big_micro: int
    repeats: int
    memory_slack_gib: float
    lstm_frames: int = 20  # the paper's sequence: the ConvLSTM steps 19 times
    sweep: dict[str, Any] = field(default_factory=dict)

    def preset(self, name: str, **overrides: Any) -> VPNConfig:
        if self.width is not None:
            overrides = {"filter_fraction": self.width, **overrides}
        return VPNConfig.preset(name, **overrides)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def check(name: str, what: str, passed: bool, tolerance: str, **measured: Any) -> Result:
    return {"kind": "check", "name": name, "what": what, "passed": bool(passed), "tolerance": tolerance, **measured}


def finding(name: str, what: str, shows: bool | None, threshold: str, **measured: Any) -> Result:
    """shows: whether the measurement shows the defect (None: not measurable in this run)."""
    return {"kind": "finding", "name": name, "what": what, "shows_defect": shows, "threshold": threshold, **measured}


def sparse_frames(n: int, t: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (n, t, 1, size, size): a fifth of the pixels 255, the rest 0 (Moving MNIST's sparsity)."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, t, 1, size, size, generator=g) < 0.2) * 255).to(torch.uint8)


def free_device(device: torch.device) -> None:
    """Drop what earlier parts left, so a memory measurement starts from an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def cpu_bf16_allowed(dry_run: bool) -> Iterator[None]:
    """On a dry run, let cpu_amp train in bf16 even on a CPU without native bf16 (emulated, slow,
    but tiny): otherwise the Trainer would train the "bf16" curve in fp32 and the check compare fp32
    with itself."""
    saved = vpn.train.cpu_has_native_bf16
    if dry_run:
        vpn.train.cpu_has_native_bf16 = lambda: True
    try:
        yield
    finally:
        vpn.train.cpu_has_native_bf16 = saved


# -- 1. logits -------------------------------------------------------------------------------------
def logits_vs_cpu(scale: Scale) -> list[Result]:
    """fp32 logits of the device's model (channels_last, as the Trainer runs it; TF32 off) against the
    same weights on the CPU (contiguous), for the masked decoder and the stacks."""
    out = []
    frames = sparse_frames(2, 4, scale.size, seed=1)
    for decoder in ("pixelcnn", "stacks"):
        torch.manual_seed(0)
        cpu = VideoPixelNetwork(scale.preset("mini", decoder=decoder)).eval()
        dev = copy.deepcopy(cpu).to(scale.torch_device, memory_format=torch.channels_last)
        with torch.no_grad(), exact_fp32():
            a = cpu(frames)
            b = dev(frames.to(scale.torch_device)).float().cpu()
        close = torch.isclose(b, a, rtol=1e-4, atol=1e-4)
        out.append(
            check(
                f"logits_{decoder}",
                f"mini ({decoder}) fp32 logits on {scale.device} (channels_last, TF32 off) against the CPU",
                bool(close.all()),
                "abs(a - b) <= 1e-4 + 1e-4 abs(a) at every logit",
                max_abs_diff=float((a - b).abs().max()),
                mismatched=int((~close).sum()),
            )
        )
    return out


# -- 2. bf16 against fp32 training -----------------------------------------------------------------
def _curve(model_cfg: VPNConfig, cfg: TrainConfig, steps: int, batch: int, size: int, seq_len: int) -> list[float]:
    trainer = Trainer(model_cfg, cfg, sparse_frames(1, seq_len, size, seed=0))
    losses = [float(trainer.train_step(sparse_frames(batch, seq_len, size, seed=100 + s))) for s in range(steps)]
    return losses


def bf16_vs_fp32_loss(scale: Scale) -> list[Result]:
    """The mini preset trained `loss_steps` steps in bf16 autocast and in fp32, same seed and batches."""
    model_cfg = scale.preset("mini")
    base = TrainConfig(
        batch_size=scale.loss_batch,
        device=scale.device,
        context=1,
        activation_checkpointing=False,
        micro_batch_size=None,
    )
    args = (scale.loss_steps, scale.loss_batch, scale.size, scale.seq_len)
    fp32 = _curve(model_cfg, base.replace(amp=False, cpu_amp=False), *args)
    with cpu_bf16_allowed(scale.dry_run):
        bf16 = _curve(model_cfg, base.replace(amp=True, cpu_amp=True), *args)
    rel = [abs(b - f) / abs(f) for b, f in zip(bf16, fp32)]
    finite = all(math.isfinite(v) for v in bf16 + fp32)
    return [
        check(
            "bf16_loss",
            f"mini: the training loss over {scale.loss_steps} steps in bf16 autocast against fp32 "
            f"(batch {scale.loss_batch}, {scale.seq_len} frames of {scale.size}x{scale.size})",
            finite and max(rel) <= 0.02,
            "finite, and abs(bf16 - fp32) <= 2% of fp32 at every step",
            max_rel_diff=max(rel),
            fp32_losses=fp32,
            bf16_losses=bf16,
        )
    ]


# -- 3. and 4. the sampler -------------------------------------------------------------------------
def _sampler_logits(model: VideoPixelNetwork, context: torch.Tensor, pixels: int) -> dict[str, list[torch.Tensor]]:
    logs: dict[str, list[torch.Tensor]] = {"naive": [], "cached": []}
    for method, record in logs.items():
        gen = torch.Generator(context.device).manual_seed(1)
        decode_frame(model, context, gen, method=method, record_logits=record, n_pixels=pixels)
    return logs


def _max_diff(logs: dict[str, list[torch.Tensor]]) -> tuple[float, bool]:
    pairs = list(zip(logs["cached"], logs["naive"]))
    close = all(bool(torch.isclose(a, b, rtol=1e-4, atol=1e-4).all()) for a, b in pairs)
    return max(float((a - b).abs().max()) for a, b in pairs), close


def cached_vs_naive(scale: Scale) -> list[Result]:
    """The cached sampler's logits against the naive per-pixel rerun on the device, two rows and two
    pixels (every per-row step runs once), TF32 off (the check) and at torch's defaults (a finding:
    bench_sample's own check runs at the defaults, where cuDNN convolutions may use TF32)."""
    out = []
    device = scale.torch_device
    pixels = 2 * scale.size + 2
    for decoder in ("pixelcnn", "stacks"):
        torch.manual_seed(0)
        model = VideoPixelNetwork(scale.preset("micro", decoder=decoder)).to(device).eval()
        context = lstm_context(model, 2, scale.size, device)
        with exact_fp32():
            diff, close = _max_diff(_sampler_logits(model, context, pixels))
        out.append(
            check(
                f"sampler_{decoder}",
                f"micro ({decoder}): cached sampler logits against the naive sampler's on {scale.device}, "
                f"first {pixels} pixels, TF32 off",
                close,
                "abs(cached - naive) <= 1e-4 + 1e-4 abs(naive) (bench_sample's)",
                max_abs_diff=diff,
            )
        )
        diff_default, close_default = _max_diff(_sampler_logits(model, context, pixels))
        out.append(
            finding(
                f"sampler_{decoder}_tf32_defaults",
                "the same at torch's TF32 defaults (bench_sample --device cuda's own check)",
                not close_default if device.type == "cuda" else None,
                "bench_sample's tolerance 1e-4 + 1e-4 abs(naive) exceeded (CUDA only: TF32 is a CUDA mode)",
                max_abs_diff=diff_default,
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            )
        )
    return out


def sampler_generator(scale: Scale) -> list[Result]:
    """Sampling on the device with a generator on the device: the same seed gives the same frame,
    another seed another; a CPU generator on the device's model against the CPU model (a finding:
    the same seed should draw the same frames on both), and the cost of the CPU generator there."""
    device = scale.torch_device
    torch.manual_seed(0)
    cpu_model = VideoPixelNetwork(scale.preset("micro")).eval()
    model = copy.deepcopy(cpu_model).to(device)
    context = lstm_context(model, 4, scale.size, device)
    pixels = 4 * scale.size  # four rows

    def draw(seed: int, on: torch.device, m: VideoPixelNetwork = model, ctx: torch.Tensor = context) -> torch.Tensor:
        return decode_frame(m, ctx, torch.Generator(on).manual_seed(seed), n_pixels=pixels).cpu()

    a, b, c = draw(7, device), draw(7, device), draw(8, device)
    drawn = a.flatten(1)[:, :pixels]
    out = [
        check(
            "sampler_device_generator",
            f"micro: {pixels} pixels drawn on {scale.device} with a torch.Generator on {scale.device}",
            torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.uint8,
            "seed 7 twice: identical frames; seed 8: a different frame",
            distinct_values_drawn=int(drawn.unique().numel()),
        )
    ]
    on_cpu = draw(7, torch.device("cpu"), cpu_model, context.cpu())
    agree = float((draw(7, torch.device("cpu")) == on_cpu).flatten(1)[:, :pixels].float().mean())
    out.append(
        finding(
            "sampler_same_seed_cpu_and_device",
            f"a CPU generator driving the {scale.device} model against the CPU model, same seed",
            agree < 0.99,
            "fewer than 99% of the drawn pixels equal (draws at a CDF boundary may differ by rounding)",
            pixels_equal_fraction=agree,
        )
    )
    gens = {"cpu_generator": torch.device("cpu"), "device_generator": device}
    fns = {k: (lambda on=on: draw(7, on)) for k, on in gens.items()}
    times = interleaved(fns, device, scale.repeats, warmup=1)
    ratio = median([c / d for c, d in zip(times["cpu_generator"], times["device_generator"])])
    out.append(
        finding(
            "sampler_cpu_generator_cost",
            f"time of {pixels} pixels with a CPU generator on the {scale.device} model against one on the device "
            "(one host-to-device copy per pixel)",
            ratio > 1.1 if device.type == "cuda" else None,
            "CPU generator more than 10% slower (CUDA only)",
            cpu_generator_over_device_generator=ratio,
            pixels_per_s={k: 4 * pixels / median(v) for k, v in times.items()},
        )
    )
    return out
