"""The training-step parts of benchmarks.gpu_check: peak memory against vpn.memory's estimate, the full
preset's step time and MFU, and the findings that need a training step (cudnn.benchmark, channels_last
logits, the ConvLSTM's cell state in bf16). See benchmarks/gpu_check_parts.py for Scale and the results.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.bench_memory import measured_peak
from benchmarks.bench_train import bf16_peak
from benchmarks.common import interleaved, median
from benchmarks.gpu_check_parts import MFU_TARGET, Result, Scale, check, finding, free_device, sparse_frames
from vpn import VideoPixelNetwork
from vpn.config import TrainConfig
from vpn.memory import GIB, _LiveBytes, train_memory
from vpn.train import Trainer


def _trainer(scale: Scale, preset: str, batch: int, **train: Any) -> tuple[Trainer, torch.Tensor]:
    cfg = TrainConfig(batch_size=batch, device=scale.device, context=1, **train)
    frames = sparse_frames(batch, scale.seq_len, scale.size, seed=3)
    return Trainer(scale.preset(preset), cfg, frames[:1]), frames.to(scale.device)


def _cpu_peak(trainer: Trainer, frames: torch.Tensor) -> int:
    """CPU: one more step's peak of live storages (vpn.memory's own counter, here on real tensors and
    real kernels rather than the meta device), plus the parameters and RMSProp's state, as the
    estimate counts them. Not an allocator's figure: the CPU has no peak statistics in torch."""
    own = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    own += sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values() if v.ndim)
    tracker = _LiveBytes()
    with tracker:
        trainer.train_step(frames)
    return own + tracker.peak


def peak_memory(scale: Scale) -> list[Result]:
    """micro, mini, full at 2 sequences of seq_len frames, plain and checkpointed, in the precision the
    Trainer runs on the device: the measured peak of a steady-state step against train_memory."""
    out = []
    rel, slack = 0.20, scale.memory_slack_gib
    for preset in ("micro", "mini", "full"):
        for ckpt in (False, True):
            free_device(scale.torch_device)
            trainer, frames = _trainer(scale, preset, 2, activation_checkpointing=ckpt, micro_batch_size=None)
            trainer.train_step(frames)  # RMSProp's state and the gradients exist from here on
            if scale.torch_device.type == "cuda":
                peak, method = measured_peak(trainer, frames), "torch.cuda.max_memory_allocated"
            else:
                peak, method = _cpu_peak(trainer, frames), "live storages of the real CPU step (no allocator stats)"
            shape = (scale.seq_len, scale.size, scale.size)
            est = train_memory(trainer.model_cfg, trainer.cfg, shape, trainer.precision).total
            out.append(
                check(
                    f"memory_{preset}{'_ckpt' if ckpt else ''}",
                    f"{preset}, 2 sequences of {scale.seq_len} frames of {scale.size}x{scale.size}, {trainer.precision}"
                    f"{', checkpointed' if ckpt else ''}: measured peak against vpn.memory's estimate",
                    abs(peak - est) <= rel * est + slack * GIB,
                    f"abs(measured - estimate) <= {rel:.0%} of the estimate + {slack:g} GiB",
                    measured_gib=peak / GIB,
                    estimate_gib=est / GIB,
                    measured_over_estimate=peak / est,
                    method=method,
                )
            )
            del trainer
    return out


def _rate(scale: Scale, trainer: Trainer, batch: int, seconds: float) -> dict[str, Any]:
    frames = batch * (scale.seq_len - 1)
    flops = 3 * trainer.model.flops_per_frame(scale.size, scale.size) * frames / seconds
    peak = bf16_peak(scale.torch_device)
    return {"step_s": seconds, "frames_per_s": frames / seconds, "model_tflop_per_s": flops / 1e12} | (
        {"mfu": flops / peak} if peak else {}
    )


def full_step_time(scale: Scale) -> list[Result]:
    """The full preset's step at batch 2 (plain) and at the paper's batch (big_batch: checkpointed, in
    micro-batches of big_micro), interleaved; batch 2 also with cudnn.benchmark on (a finding)."""
    free_device(scale.torch_device)
    small, f2 = _trainer(scale, "full", 2, activation_checkpointing=False, micro_batch_size=None)
    big, fb = _trainer(scale, "full", scale.big_batch, activation_checkpointing=True, micro_batch_size=scale.big_micro)
    losses: list[float] = []
    saved = torch.backends.cudnn.benchmark

    def step(trainer: Trainer, frames: torch.Tensor, benchmark: bool) -> None:
        torch.backends.cudnn.benchmark = benchmark  # read at each convolution: toggling between calls works
        losses.append(float(trainer.train_step(frames)))

    fns = {
        "batch2": lambda: step(small, f2, False),
        "batch2_cudnn_benchmark": lambda: step(small, f2, True),
        f"batch{scale.big_batch}": lambda: step(big, fb, False),
    }
    try:
        times = interleaved(fns, scale.torch_device, scale.repeats, warmup=1)
    finally:
        torch.backends.cudnn.benchmark = saved
    big_name = f"batch{scale.big_batch}"
    batches = {"batch2": (small, 2), "batch2_cudnn_benchmark": (small, 2), big_name: (big, scale.big_batch)}
    rates = {name: _rate(scale, *batches[name], median(ts)) for name, ts in times.items()}
    speedup = median([a / b for a, b in zip(times["batch2"], times["batch2_cudnn_benchmark"])])
    mfu = rates[big_name].get("mfu")
    return [
        check(
            "full_step_time",
            f"full preset, {scale.seq_len} frames of {scale.size}x{scale.size}, {small.precision}: batch 2 plain and "
            f"batch {scale.big_batch} checkpointed in micro-batches of {scale.big_micro}, median of {scale.repeats}",
            all(math.isfinite(v) for v in losses),
            "every step's loss finite (the MFU target is a finding)",
            rates=rates,
        ),
        finding(
            "full_mfu_target",
            f"MFU of the full preset at batch {scale.big_batch} against the issue's {MFU_TARGET:.0%} of the bf16 peak",
            None if mfu is None else mfu < MFU_TARGET,
            f"MFU below {MFU_TARGET:.0%} (a known CUDA device only)",
            mfu=mfu,
        ),
        finding(
            "cudnn_benchmark",
            "full preset at batch 2: step time with cudnn.benchmark off (today's) over on",
            speedup > 1.05 if scale.torch_device.type == "cuda" else None,
            "more than 5% faster with cudnn.benchmark on (CUDA only)",
            off_over_on=speedup,
        ),
    ]


def _auto_step(scale: Scale) -> dict[str, Any]:
    """One step of the full preset at big_batch with both settings "auto"; what auto chose and its memory."""
    trainer, frames = _trainer(scale, "full", scale.big_batch)
    choice = {"activation_checkpointing": trainer.activation_checkpointing}
    choice["micro_batch_size"] = trainer.micro_batch_size
    shape = (scale.seq_len, scale.size, scale.size)
    estimate = train_memory(trainer.model_cfg, trainer.cfg.replace(**choice), shape, trainer.precision).total
    loss = float(trainer.train_step(frames))
    measured = measured_peak(trainer, frames)  # None on the CPU
    return {
        **choice,
        "loss": loss,
        "estimate_gib": estimate / GIB,
        "measured_peak_gib": None if measured is None else measured / GIB,
    }


def auto_at_big_batch(scale: Scale) -> list[Result]:
    """`auto` (the CUDA default) at the paper's batch on this device: its choice runs without OOM."""
    free_device(scale.torch_device)
    try:
        chosen, error = _auto_step(scale), None
    except torch.OutOfMemoryError as e:  # the Trainer and its tensors die with _auto_step's frame
        chosen, error = None, f"out of memory: {e}"[:300]
    free_device(scale.torch_device)
    return [
        check(
            "auto_full_batch",
            f"full preset at batch {scale.big_batch}, activation_checkpointing and micro_batch_size 'auto': "
            "the chosen step runs",
            error is None and math.isfinite(chosen["loss"]),
            "no out-of-memory error, a finite loss",
            chosen=chosen,
            error=error,
        )
    ]


def channels_last_logits(scale: Scale) -> list[Result]:
    """The categorical loss (forward and backward) on the logits as the channels_last model returns
    them, against the same logits made contiguous first."""
    free_device(scale.torch_device)
    trainer, frames = _trainer(scale, "mini", 2, activation_checkpointing=False, micro_batch_size=None)
    with torch.no_grad(), trainer._autocast():
        logits = trainer.model(frames)
    layouts = {"as_returned": logits.detach().clone(), "contiguous": logits.detach().contiguous()}

    def loss(x: torch.Tensor) -> None:
        x = x.detach().requires_grad_()
        trainer.model.frame_nll(x, frames).mean().backward()

    times = interleaved({k: (lambda x=x: loss(x)) for k, x in layouts.items()}, scale.torch_device, scale.repeats)
    ratio = median([a / b for a, b in zip(times["as_returned"], times["contiguous"])])
    return [
        finding(
            "channels_last_logits",
            f"mini, batch 2: the loss's forward and backward on the model's logits "
            f"({trainer._memory_format()}, contiguous: {logits.is_contiguous()}) over on contiguous logits",
            ratio > 1.1 if scale.torch_device.type == "cuda" else None,
            "more than 10% slower as returned (CUDA only: the CPU runs contiguous)",
            logits_contiguous=logits.is_contiguous(),
            as_returned_over_contiguous=ratio,
            loss_s={k: median(v) for k, v in times.items()},
        )
    ]


def lstm_cell_drift(scale: Scale) -> list[Result]:
    """The ConvLSTM's cell state under bf16 autocast against fp32 over lstm_frames - 1 steps (initial
    weights, the mini preset): does its relative error grow with the steps?"""
    device = scale.torch_device
    torch.manual_seed(0)
    model = VideoPixelNetwork(scale.preset("mini")).to(device).eval()
    frames = sparse_frames(2, scale.lstm_frames, scale.size, seed=5).to(device)
    errors = []
    with torch.no_grad():
        features = model.encode(frames[:, :-1])  # (B, T-1, 2c, H, W), fp32: the same input to both
        ref = low = None
        for t in range(features.shape[1]):
            ref = model.lstm.step(features[:, t], ref)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low = model.lstm.step(features[:, t], low)
            errors.append(float((low[1].float() - ref[1]).norm() / ref[1].norm()))
    return [
        finding(
            "lstm_cell_bf16_drift",
            f"mini at initial weights: relative error of the ConvLSTM cell state in bf16 autocast against fp32 "
            f"after each of {len(errors)} steps",
            errors[-1] > 3 * errors[0],
            "the last step's error more than 3x the first step's",
            cell_dtype_under_autocast=str(low[1].dtype),
            rel_error_first=errors[0],
            rel_error_last=errors[-1],
            rel_error_by_step=errors,
        )
    ]
