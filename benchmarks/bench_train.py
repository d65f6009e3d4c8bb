"""Training throughput: vpn's Trainer step against a plain reference step, in the same run.

    python -m benchmarks.bench_train --presets micro mini full --size 64 --batch 2 --seq-len 4 \
        --device auto --out benchmarks/results/train_cpu.json

Variants (each one full optimizer update on the same uint8 batch (B, T, 1, S, S), categorical head):

- reference: benchmarks.reference.reference_model (fp32, eager, contiguous NCHW, each MU's four
  convolutions separate, masked convs with their whole kernel, LSTM convolving its zero state),
  with the Trainer's update around it (RMSProp, gradient clipping).
- fast: `Trainer.train_step` with the Trainer's defaults for the device (fused MU convs, masked
  convs without their always-masked rows; on CUDA also bf16 autocast and channels_last).
- fast_compiled: the same with TrainConfig(compile=True); its first call (the compilation) is
  timed separately and reported as compile_s, with a cold inductor cache (a fresh temporary cache
  folder) unless --warm-compile-cache.
- fast_bf16, fast_bf16_compiled (CPU only): the same with TrainConfig(cpu_amp=True), bf16
  autocast on the CPU (opt-in in the Trainer; on CUDA, fast is already bf16). On a CPU without
  native bf16 the Trainer ignores cpu_amp (vpn.train.cpu_has_native_bf16), so these variants are
  skipped there unless --force-cpu-bf16, which times emulated bf16 (about 30x slower on AVX2).

Throughput is in predicted frames per second: a step on (B, T) frames encodes, steps the LSTM for
and decodes B*(T-1) frames. Achieved FLOP/s uses the model's counted forward FLOPs per frame
(VideoPixelNetwork.flops_per_frame: masked taps included) times 3 for forward + backward, the usual
convention (backward ~ 2x forward), whatever the variant actually executes. On CUDA it is also
given as a fraction of the device's dense bf16 peak.

Before timing, the reference's logits are checked against the fast model's fp32 logits on the
benchmark batch (same weights): the comparison is between two implementations of one function.
Every variant starts from the same weights, so the first update's losses are compared too (fp32
variants to 1e-4 relative, the compiled one included; bf16 ones are reported).
The data loader (Trainer.loader over a memory-mapped uint8 array of 20-frame sequences) is timed
separately, to show whether loading keeps up with the fast step.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vpn.train
from benchmarks.common import (
    environment,
    interleaved,
    markdown_table,
    median,
    paired_ratio,
    resolve_device,
    sync,
    write_json,
)
from benchmarks.reference import reference_model
from vpn import VPNConfig
from vpn.config import TrainConfig
from vpn.train import Trainer, cpu_has_native_bf16

log = logging.getLogger("bench_train")

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}

VARIANTS = ("reference", "fast", "fast_compiled", "fast_bf16", "fast_bf16_compiled")
OPTIONS = {
    "fast": {},
    "fast_compiled": {"compile": True},
    "fast_bf16": {"cpu_amp": True},
    "fast_bf16_compiled": {"cpu_amp": True, "compile": True},
}


def bf16_peak(device: torch.device) -> float | None:
    """Dense bf16 peak of a known CUDA device in FLOP/s, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if all(word in name for word in key.split()):
            return tflops * 1e12
    return None


def reference_step(model: torch.nn.Module, cfg: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """A plain update on `model`, the way the Trainer does it but without any of its speed options."""
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg.lr, alpha=cfg.rmsprop_alpha, eps=cfg.rmsprop_eps)

    def step(frames: torch.Tensor) -> torch.Tensor:
        model.train()
        nats = model.frame_nll(model(frames), frames).mean()
        optimizer.zero_grad(set_to_none=True)
        (nats / frames[0, 0].numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        return nats.detach()

    return step


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls on CUDA without TF32, for comparing two implementations."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_same_logits(reference: torch.nn.Module, fast: torch.nn.Module, frames: torch.Tensor) -> float:
    """Max |logit difference| of the two models (fp32, no autocast) on frames; raises if not close."""
    with torch.no_grad(), exact_fp32():
        a, b = reference(frames), fast(frames).float()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    return float((a - b).abs().max())


def loader_rate(batch: int, size: int, batches: int, num_workers: int) -> float:
    """Batches per second of Trainer.loader over a memory-mapped (256, 20, 1, size, size) uint8 array."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.npy"
        np.save(path, np.random.default_rng(0).integers(0, 256, (256, 20, 1, size, size), dtype=np.uint8))
        array = np.load(path, mmap_mode="r")

        class Mapped(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(array)

            def __getitem__(self, i: int) -> torch.Tensor:
                return torch.from_numpy(np.array(array[i]))  # (T, C, H, W), read from the map

        cfg = TrainConfig(steps=batches, batch_size=batch, num_workers=num_workers, device="cpu")
        trainer = Trainer(VPNConfig.preset("micro", filter_fraction=8 / 128), cfg, Mapped())
        start = time.perf_counter()
        n = sum(1 for _ in trainer.loader(batches))
        return n / (time.perf_counter() - start)


def bench_variants(preset: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    """The variants of args.variants that run on `device` (bf16 ones on a CPU only, and there only
    with native bf16 unless --force-cpu-bf16)."""
    variants = [v for v in args.variants if not ("bf16" in v and device.type != "cpu")]
    if device.type == "cpu" and not (cpu_has_native_bf16() or args.force_cpu_bf16):
        skipped = [v for v in variants if "bf16" in v]
        if skipped:
            log.info(
                "%s: skipping %s: this CPU has no native bf16 (--force-cpu-bf16 times it emulated)",
                preset,
                ", ".join(skipped),
            )
        variants = [v for v in variants if v not in skipped]
    return variants


def first_updates(
    preset: str, steps: dict[str, Callable[[], Any]], fast_names: list[str], device: torch.device
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Run each variant's first update, untimed (compiled ones: timed as their compilation).

    Returns the first losses, the compile seconds and each first loss's relative difference from
    the reference's (else the first fast variant's); raises if an fp32 variant's differs by > 1e-4.
    """
    first_loss, compile_s = {}, {}
    for name, step in steps.items():
        start = time.perf_counter()
        first_loss[name] = float(step())  # a host sync, outside the timed steps
        if OPTIONS.get(name, {}).get("compile"):
            compile_s[name] = time.perf_counter() - start
            log.info("%s: %s first step (compilation included) %.1f s", preset, name, compile_s[name])
    # fp32 variants must agree with the reference; bf16 ones (all fast ones on CUDA) are reported.
    anchor = first_loss.get("reference", first_loss[fast_names[0]])
    first_rel = {name: abs(loss - anchor) / abs(anchor) for name, loss in first_loss.items()}
    for name, rel in first_rel.items():
        fp32 = name == "reference" or (device.type == "cpu" and not OPTIONS[name].get("cpu_amp"))
        if fp32 and rel > 1e-4:
            raise AssertionError(f"{preset}: {name}'s first loss {first_loss[name]} differs from {anchor}")
    return first_loss, compile_s, first_rel


def bench_preset(preset: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time every variant of `preset` on one random uint8 batch (B, T, 1, S, S); one row per variant."""
    cfg = VPNConfig.preset(preset)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(
        0, 256, (args.batch, args.seq_len, 1, args.size, args.size), generator=gen, dtype=torch.uint8
    )
    frames = frames.to(device)
    base = TrainConfig(batch_size=args.batch, device=str(device), context=1)
    variants = bench_variants(preset, args, device)

    # Every Trainer seeds its model's initialisation with TrainConfig.seed: all start from the same weights.
    trainers = {
        name: Trainer(cfg, base.replace(**OPTIONS[name]), frames[:1].cpu()) for name in variants if name != "reference"
    }
    first = next(iter(trainers.values()))
    steps: dict[str, Callable[[], Any]] = {}
    diff = None
    if "reference" in variants:
        ref = reference_model(first.model)
        diff = check_same_logits(ref, first.model, frames)
        log.info("%s: reference logits equal the fast model's (max |diff| %.2e)", preset, diff)
        ref_step = reference_step(ref, base)
        steps["reference"] = lambda: ref_step(frames)
    for name, trainer in trainers.items():
        steps[name] = lambda trainer=trainer: trainer.train_step(frames)

    first_loss, compile_s, first_rel = first_updates(preset, steps, list(trainers), device)
    log.info("%s: timing %s, %d repeats", preset, ", ".join(steps), args.repeats)
    times = interleaved(steps, device, args.repeats, warmup=max(0, args.warmup - 1))

    frames_per_step = args.batch * (args.seq_len - 1)
    flops_per_step = 3 * first.model.flops_per_frame(args.size, args.size) * frames_per_step
    peak = bf16_peak(device)
    rows = []
    for name, ts in times.items():
        t = median(ts)
        row = {
            "preset": preset,
            "variant": name,
            "step_s": t,
            "frames_per_s": frames_per_step / t,
            "model_gflop_per_s": flops_per_step / t / 1e9,
            "vs_reference": paired_ratio(times["reference"], ts) if "reference" in times else None,
            "times_s": ts,
        }
        if peak is not None:
            row["fraction_of_bf16_peak"] = flops_per_step / t / peak
        row["first_step_loss"] = first_loss[name]
        row["first_step_loss_rel_diff"] = first_rel[name]
        if name in compile_s:
            row["compile_s"] = compile_s[name]
        rows.append(row)
    return {
        "preset": preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "size": args.size,
        "frames_per_step": frames_per_step,
        "model_flops_per_step": flops_per_step,
        "reference_max_abs_logit_diff": diff,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["micro", "mini", "full"])
    p.add_argument("--size", type=int, default=64, help="frame height and width")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=4, help="frames per sequence (T-1 are predicted)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per variant first (>= 1: the first is always untimed)"
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--loader-batches", type=int, default=50, help="batches to time the data loader on (0: skip)")
    p.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="reuse torch.compile's on-disk cache (default: a fresh one, so compile_s is a cold compile)",
    )
    p.add_argument(
        "--force-cpu-bf16",
        action="store_true",
        help="time the bf16 variants on a CPU without native bf16 too (emulated: slow)",
    )
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/train_<device>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.seq_len < 2:
        p.error("--seq-len must be >= 2")
    if set(args.variants) <= {"reference"}:
        p.error("--variants needs at least one fast variant")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.force_cpu_bf16:  # the Trainer would otherwise ignore cpu_amp on such a CPU
        vpn.train.cpu_has_native_bf16 = lambda: True
    device = resolve_device(args.device)
    out = Path(args.out or f"benchmarks/results/train_{device.type}.json")
    with tempfile.TemporaryDirectory(prefix="bench_inductor_") as cache:
        if not args.warm_compile_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles
        return run(args, device, out)


def run(args: argparse.Namespace, device: torch.device, out: Path) -> int:
    """Benchmark every preset, write the JSON after each, print the table."""
    results = {"benchmark": "train", "environment": environment(device), "args": vars(args), "presets": []}
    for preset in args.presets:
        results["presets"].append(bench_preset(preset, args, device))
        write_json(results, out)  # after every preset, so a long run leaves what it has measured
        sync(device)
    if args.loader_batches:
        results["loader_batches_per_s"] = loader_rate(args.batch, args.size, args.loader_batches, 0)
        write_json(results, out)

    rows = [r for pr in results["presets"] for r in pr["rows"]]
    columns = ["preset", "variant", "step_s", "frames_per_s", "model_gflop_per_s", "vs_reference"]
    if any("fraction_of_bf16_peak" in r for r in rows):
        columns.append("fraction_of_bf16_peak")
    columns.append("compile_s")
    print(
        f"\n{results['environment']['device']}: batch {args.batch}, {args.seq_len} frames, {args.size}x{args.size}, "
        f"median of {args.repeats} interleaved repeats; model FLOP/s = 3 x counted forward FLOPs"
    )
    print(markdown_table(rows, columns))
    if "loader_batches_per_s" in results:
        fastest = max(r["frames_per_s"] for r in rows) / (args.batch * (args.seq_len - 1))
        print(
            f"\ndata loader: {results['loader_batches_per_s']:.1f} batches/s "
            f"(fastest step above: {fastest:.2f} steps/s)"
        )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
