"""Data-parallel throughput: one training process against N DDP workers, the same global batch.

    python -m benchmarks.bench_ddp --preset micro --size 64 --batch 4 --seq-len 4 --workers 2 \
        --device cpu --out benchmarks/results/ddp_cpu.json

What a sweep trial does with run.workers_per_trial = N (pipeline.sweep.trials.distributed), without Ray around it:
N processes in a torch.distributed group (gloo on CPU, NCCL on CUDA, one GPU per rank), each running
vpn.train.Trainer.train_step on its B/N sequences of the same global batch of B; DDP averages the
gradients. Against it, one process running the same Trainer on all B sequences (on CPU once per
thread count in --single-threads: a one-worker trial of 1 CPU, and one given all the cores the N
workers share).

Timing: every variant in the same run, interleaved (one update of each per repeat, the order
alternating), each from the same initial weights on the same batch, as benchmarks/common.py does.
Rank 0 announces each variant to the others over a gloo group; while it times a one-process variant
the other ranks wait in that blocking receive (their CPU time over the run is reported, to show they
did not compete for the cores). A DDP update is timed from a barrier to a barrier, so it includes the
gradient all-reduce and the wait for the slowest rank. Reported: median seconds per update, predicted
frames per second (B x (T-1) per update), model FLOP/s (3 x the counted forward FLOPs), and the median
over repeats of the per-repeat ratio one process / N workers.

Before timing, the first update's loss of every variant is compared: each DDP rank's shard loss,
averaged over the ranks, must equal the one process's loss on the whole batch (fp32: 1e-5 relative).
Not included: Ray's own costs (worker start, reports and checkpoints: per report, not per update).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import environment, markdown_table, median, paired_ratio, resolve_device, sync, write_json
from vpn import VPNConfig
from vpn.config import TrainConfig
from vpn.train import Trainer

log = logging.getLogger("bench_ddp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process of the benchmark; rank 0 also runs the one-process variants and writes the results."""
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(
        0, 256, (args.batch, args.seq_len, 1, args.size, args.size), generator=gen, dtype=torch.uint8
    )
    model_cfg = VPNConfig.preset(args.preset)
    train_cfg = TrainConfig(batch_size=args.batch, device=str(device), context=1)

    # The one-process trainers are built before the process group exists: plain Trainers, no DDP.
    singles: dict[str, Trainer] = {}
    if rank == 0:
        for threads in args.single_threads if not cuda else [args.threads_per_worker]:
            singles[f"1 worker x {threads} thread(s)" if not cuda else "1 worker"] = Trainer(
                model_cfg, train_cfg, frames[:1]
            )
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    control = dist.new_group(backend="gloo")  # variant announcements, on the CPU whatever the device
    torch.set_num_threads(args.threads_per_worker)
    parallel = Trainer(model_cfg, train_cfg, frames[:1])  # DDP: the process group exists now
    per_rank = args.batch // world
    shard = frames[rank * per_rank : (rank + 1) * per_rank].to(device)
    whole = frames.to(device)
    ddp_name = f"{world} workers x {args.threads_per_worker} thread(s)" if not cuda else f"{world} workers (DDP)"
    names = [*singles, ddp_name] if rank == 0 else []
    n_names = len(args.single_threads if not cuda else [1]) + 1

    def run(index: int) -> tuple[float, float]:
        """Announce variant `index`, run one update of it; rank 0 gets (seconds, loss)."""
        code = torch.tensor([index], dtype=torch.int64)
        dist.broadcast(code, src=0, group=control)
        index = int(code)
        if index == n_names - 1:  # the DDP variant: every rank
            dist.barrier(group=control)
            start = time.perf_counter()
            loss = parallel.train_step(shard)
            dist.all_reduce(loss)  # the global batch's loss, for the check (and a sync)
            sync(device)
            dist.barrier(group=control)
            return time.perf_counter() - start, float(loss) / world
        if rank != 0:
            return 0.0, 0.0
        name = names[index]
        threads = int(name.split(" x ")[1].split()[0]) if " x " in name else args.threads_per_worker
        torch.set_num_threads(threads)
        start = time.perf_counter()
        loss = singles[name].train_step(whole)
        sync(device)
        seconds = time.perf_counter() - start
        torch.set_num_threads(args.threads_per_worker)
        return seconds, float(loss)

    cpu_start = time.process_time()
    first = {}
    for index in range(n_names):  # the first update of each, untimed: warm-up and the check
        first[index] = run(index)[1]
    for _ in range(args.warmup - 1):
        for index in range(n_names):
            run(index)
    times: dict[int, list[float]] = {i: [] for i in range(n_names)}
    for r in range(args.repeats):
        for index in range(n_names) if r % 2 == 0 else reversed(range(n_names)):
            times[index].append(run(index)[0])
    dist.broadcast(torch.tensor([-1]), src=0, group=control)  # done
    cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, cpu, group=control)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "names": names, "first_loss": [first[i] for i in range(n_names)],
            "times": [times[i] for i in range(n_names)], "cpu_s_per_rank": [float(c) for c in gathered],
            "flops_per_frame": parallel.model.flops_per_frame(args.size, args.size),
        }))  # fmt: skip
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="micro")
    p.add_argument("--size", type=int, default=64, help="frame height and width")
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences per update), split over the workers")
    p.add_argument("--seq-len", type=int, default=4, help="frames per sequence (T-1 are predicted)")
    p.add_argument("--workers", type=int, default=2, help="DDP workers (on CUDA: one GPU each)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch CPU threads of each DDP worker")
    p.add_argument(
        "--single-threads",
        type=int,
        nargs="+",
        default=None,
        help="thread counts of the one-process variants (CPU; default: 1 and workers x threads-per-worker)",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1, help="untimed updates per variant (>= 1: the first is the check)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (auto: cuda if present)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/ddp_<device>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.device = resolve_device(args.device).type
    if args.batch % args.workers:
        p.error(f"--batch {args.batch} must be a multiple of --workers {args.workers}")
    if args.device == "cuda" and torch.cuda.device_count() < args.workers:
        p.error(f"--workers {args.workers} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    if args.single_threads is None:
        args.single_threads = sorted({1, args.workers * args.threads_per_worker})
    out = Path(args.out or f"benchmarks/results/ddp_{args.device}.json")

    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        log.info("%d workers against one process: %s, batch %d x %d frames, %dx%d, %s", args.workers, args.preset,
                 args.batch, args.seq_len, args.size, args.size, args.device)  # fmt: skip
        mp.spawn(_rank, args=(args.workers, free_port(), args, str(raw_path)), nprocs=args.workers)
        raw = json.loads(raw_path.read_text())

    names, times, first = raw["names"], raw["times"], raw["first_loss"]
    ddp = len(names) - 1
    for name, loss in zip(names, first):  # fp32 on CPU: the same update up to float rounding
        rel = abs(loss - first[0]) / abs(first[0])
        if args.device == "cpu" and rel > 1e-5:
            raise AssertionError(f"{name}'s first loss {loss} differs from {first[0]} ({names[0]})")
    frames_per_step = args.batch * (args.seq_len - 1)
    flops_per_step = 3 * raw["flops_per_frame"] * frames_per_step
    rows = []
    for i, name in enumerate(names):
        t = median(times[i])
        rows.append({
            "variant": name, "step_s": t, "frames_per_s": frames_per_step / t,
            "model_gflop_per_s": flops_per_step / t / 1e9,
            "ddp_speedup": paired_ratio(times[i], times[ddp]) if i != ddp else None,
            "first_step_loss": first[i], "spread_s": [min(times[i]), max(times[i])], "times_s": times[i],
        })  # fmt: skip
    env = environment(torch.device(args.device))
    env["threads"] = "per variant"
    results = {"benchmark": "ddp", "environment": env, "args": vars(args), "frames_per_step": frames_per_step,
               "cpu_s_per_rank": raw["cpu_s_per_rank"], "rows": rows}  # fmt: skip
    write_json(results, out)
    print(
        f"\n{env['device']}: {args.preset}, global batch {args.batch} x {args.seq_len} frames, "
        f"{args.size}x{args.size}, median of {args.repeats} interleaved repeats; "
        f"ddp_speedup = one process's time / the {args.workers} workers' (median of per-repeat ratios)"
    )
    print(markdown_table(rows, ["variant", "step_s", "frames_per_s", "model_gflop_per_s", "ddp_speedup"]))
    print(
        f"\nCPU seconds per rank over the run: {', '.join(f'{c:.1f}' for c in raw['cpu_s_per_rank'])} "
        f"(rank 0 also runs the one-process variants)"
    )
    print(
        "spread of each variant's times (s): "
        + "; ".join(f"{r['variant']}: {r['spread_s'][0]:.3g}-{r['spread_s'][1]:.3g}" for r in rows)
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
