"""What memory settings cost in time: checkpointing and micro-batches against the plain step, in the same run.

    python -m benchmarks.bench_memory --preset micro --size 32 --batch 8 --seq-len 4 --micro-batches 1 2 4 \
        --threads 1 --device cpu --out benchmarks/results/memory_cpu.json
    python -m benchmarks.bench_memory --quick   # the same at 16x16, 3 repeats: about a minute on 2 cores

Variants (each one `Trainer.train_step`, a full optimizer update on the same uint8 batch
(B, T, 1, S, S), categorical head, the Trainer's defaults for the device otherwise):

- plain: `activation_checkpointing: false`, `micro_batch_size: null` (the whole batch in one pass).
- ckpt: `activation_checkpointing: true` (every residual block recomputed in the backward pass).
- micro<m>: `micro_batch_size: m` (B/m passes, gradients accumulated), for each m of --micro-batches.
- ckpt+micro<m>: both, what `auto` chooses when checkpointing alone does not fit (--no-combined: none).

Each row gives the median step time, the median over repeats of the per-repeat ratio variant /
plain (how many times slower than the plain step, paired so that the shared machine's drift
cancels), and beside it the step's estimated peak memory (vpn.memory.train_memory: parameters,
RMSProp state, saved activations, backward transients, in the precision the Trainer runs) and its
ratio to the plain step's: the time each GiB saved costs. On CUDA the measured peak of one step
(torch.cuda.max_memory_allocated, less what was allocated before it) is given too.

Before timing, every variant's first update is checked against the plain one's: the same weights
and batch, so the losses agree to float rounding (1e-4 relative; bf16 on CUDA: 1e-2), since neither
setting changes the numbers, only memory and time.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import environment, interleaved, markdown_table, median, resolve_device, sync, write_json
from vpn import VPNConfig
from vpn.config import TrainConfig
from vpn.memory import GIB, train_memory
from vpn.train import Trainer

log = logging.getLogger("bench_memory")

QUICK = {"size": 16, "repeats": 3}


def variants(batch: int, micro: list[int], combined: bool) -> dict[str, dict[str, Any]]:
    """name -> (activation_checkpointing, micro_batch_size) overrides, plain first."""
    out: dict[str, dict[str, Any]] = {
        "plain": {"activation_checkpointing": False, "micro_batch_size": None},
        "ckpt": {"activation_checkpointing": True, "micro_batch_size": None},
    }
    for m in micro:
        if batch % m or m >= batch:
            raise ValueError(f"--micro-batches: {m} must be a divisor of --batch {batch} smaller than it")
        out[f"micro{m}"] = {"activation_checkpointing": False, "micro_batch_size": m}
    if combined:
        for m in micro:
            out[f"ckpt+micro{m}"] = {"activation_checkpointing": True, "micro_batch_size": m}
    return out


def measured_peak(trainer: Trainer, frames: torch.Tensor) -> int | None:
    """CUDA only: bytes one more step of `trainer` allocates at its peak, counted from zero (so its
    parameters, optimizer state and gradients are in it, as in the estimate); None on CPU."""
    if trainer.device.type != "cuda":
        return None
    sync(trainer.device)
    resident = torch.cuda.memory_allocated(trainer.device)
    own = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    own += sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values() if v.ndim)
    own += sum(p.grad.numel() * p.grad.element_size() for p in trainer.model.parameters() if p.grad is not None)
    torch.cuda.reset_peak_memory_stats(trainer.device)
    trainer.train_step(frames)
    sync(trainer.device)
    # What other trainers keep resident is not this step's: take it out, keep this trainer's own.
    return torch.cuda.max_memory_allocated(trainer.device) - (resident - own)


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build one Trainer per variant (same seed: same weights), check the first updates, time them."""
    model_cfg = VPNConfig.preset(args.preset)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(
        0, 256, (args.batch, args.seq_len, 1, args.size, args.size), generator=gen, dtype=torch.uint8
    )
    frames = frames.to(device)
    base = TrainConfig(batch_size=args.batch, device=str(device), context=1)
    settings = variants(args.batch, args.micro_batches, args.combined)
    trainers = {name: Trainer(model_cfg, base.replace(**s), frames[:1].cpu()) for name, s in settings.items()}
    precision = next(iter(trainers.values())).precision

    first = {name: float(t.train_step(frames)) for name, t in trainers.items()}  # untimed, a host sync
    tol = 1e-2 if precision == "bf16" else 1e-4
    for name, loss in first.items():
        if abs(loss - first["plain"]) > tol * abs(first["plain"]):
            raise AssertionError(f"{name}'s first loss {loss} differs from the plain step's {first['plain']}")
    peaks = {name: measured_peak(t, frames) for name, t in trainers.items()}

    steps = {name: (lambda t=t: t.train_step(frames)) for name, t in trainers.items()}
    log.info("%s: timing %s, %d repeats", args.preset, ", ".join(steps), args.repeats)
    times = interleaved(steps, device, args.repeats, warmup=max(0, args.warmup - 1))

    frames_shape = (args.seq_len, args.size, args.size)
    estimates = {
        name: train_memory(model_cfg, base.replace(**s), frames_shape, precision) for name, s in settings.items()
    }
    plain_t, plain_mem = times["plain"], estimates["plain"].total
    frames_per_step = args.batch * (args.seq_len - 1)
    rows = []
    for name, ts in times.items():
        est = estimates[name]
        row = {
            "variant": name,
            "activation_checkpointing": settings[name]["activation_checkpointing"],
            "micro_batch_size": settings[name]["micro_batch_size"],
            "step_s": median(ts),
            "frames_per_s": frames_per_step / median(ts),
            "time_vs_plain": median([v / p for v, p in zip(ts, plain_t)]),
            "est_memory_gib": est.total / GIB,
            "est_saved_activations_gib": est.saved_activations / GIB,
            "memory_vs_plain": est.total / plain_mem,
            "first_step_loss": first[name],
            "times_s": ts,
        }
        if peaks[name] is not None:
            row["measured_peak_gib"] = peaks[name] / GIB
        rows.append(row)
    return {
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "size": args.size,
        "precision": precision,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="micro")
    p.add_argument("--size", type=int, default=32, help="frame height and width")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=4, help="frames per sequence (T-1 are predicted)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4], help="micro_batch_size values")
    p.add_argument("--no-combined", dest="combined", action="store_false", help="no ckpt+micro<m> variants")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (>= 1)")
    p.add_argument("--quick", action="store_true", help=f"a smoke-sized run: {QUICK}")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/memory_<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.seq_len < 2:
        p.error("--seq-len must be >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out or f"benchmarks/results/memory_{device.type}.json")
    try:
        variants(args.batch, args.micro_batches, args.combined)
    except ValueError as e:
        p.error(str(e))
    result = run(args, device)
    results = {"benchmark": "memory", "environment": environment(device), "args": vars(args), **result}
    write_json(results, out)

    columns = ["variant", "step_s", "time_vs_plain", "est_memory_gib", "memory_vs_plain"]
    if any("measured_peak_gib" in r for r in result["rows"]):
        columns.append("measured_peak_gib")
    print(
        f"\n{results['environment']['device']}: {args.preset}, batch {args.batch}, {args.seq_len} frames, "
        f"{args.size}x{args.size}, {result['precision']}; median of {args.repeats} interleaved repeats; "
        "time_vs_plain: median per-repeat ratio (> 1: slower); memory: vpn.memory's estimate"
    )
    print(markdown_table(result["rows"], columns))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
