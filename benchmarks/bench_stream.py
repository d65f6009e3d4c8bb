"""Can streamed Moving MNIST keep up with a GPU? Sequences generated per second per CPU core.

    python -m benchmarks.bench_stream --batch 16 --repeats 7

Times `MovingMNISTStream.__getitems__` (what a DataLoader worker runs for one batch: per-sequence
generators, one vectorised trajectory pass, one render) at the paper's 64x64, 20 frames, 2 digits,
on one thread, against two plain references in the same run, interleaved:

- `fixed_read`: the same number of sequences read from the data stage's train.npy (memory-mapped,
  page-cached), what `train.data: fixed` costs;
- `per_sequence`: the stream drawn one sequence at a time (`__getitem__`), no vectorising.

and sets the rate against what a model consumes: sequences/s = 40% of an H100's dense bf16 peak
(989 TFLOP/s) / (3 x forward FLOPs per frame x 19 predicted frames), from the counted FLOPs
(VideoPixelNetwork.flops_per_frame). Cores needed = consumption / generation per core: well below 1,
the training process itself keeps up (train.num_workers 0 or a few for overlap); above 1, set
train.num_workers to at least that (DataLoader workers each generate whole batches).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment, interleaved, markdown_table, median, paired_ratio, write_json
from vpn.config import VPNConfig
from vpn.data import MovingMNIST
from vpn.model import count_flops_per_frame
from vpn.moving_mnist import MovingMNISTStream, SequenceSpec

H100_BF16_PEAK = 989.4e12  # dense, SXM data sheet (as benchmarks.bench_train)
UTILISATION = 0.4


def consumption(preset: str, size: int, seq_len: int) -> float:
    """Sequences/s one H100 trains on at 40% of its bf16 peak (forward + backward = 3 x forward)."""
    flops_per_sequence = (
        3 * count_flops_per_frame(VPNConfig.preset(preset, output="bernoulli"), size, size) * (seq_len - 1)
    )
    return UTILISATION * H100_BF16_PEAK / flops_per_sequence


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default="data/moving_mnist", help="the data stage's folder (train_digits.npy, train.npy)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches-per-repeat", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/stream_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    stream = MovingMNISTStream.from_folder(args.data, seed=0)
    spec: SequenceSpec = stream.spec
    fixed = MovingMNIST(args.data, "train")
    b, k = args.batch, args.batches_per_repeat
    counter = {"stream": 0, "single": 0}

    def streamed() -> None:
        for _ in range(k):
            start = counter["stream"]
            torch.stack(stream.__getitems__(list(range(start, start + b))))
            counter["stream"] += b

    def per_sequence() -> None:
        for _ in range(k):
            start = counter["single"]
            torch.stack([stream[i] for i in range(start, start + b)])
            counter["single"] += b

    rng = np.random.default_rng(0)

    def fixed_read() -> None:
        for _ in range(k):
            torch.stack([fixed[int(i)] for i in rng.integers(0, len(fixed), b)])

    device = torch.device("cpu")
    times = interleaved(
        {"stream": streamed, "per_sequence": per_sequence, "fixed_read": fixed_read}, device, args.repeats
    )
    per_core = b * k / median(times["stream"])
    rows = [
        {"source": name, "sequences/s (1 core)": b * k / median(t), "ms per batch": 1e3 * median(t) / k}
        for name, t in times.items()
    ]
    print(
        f"Moving MNIST {spec.frame_size}x{spec.frame_size}, {spec.seq_len} frames, {spec.digits} digits, "
        f"batch {b}, 1 thread"
    )
    print(markdown_table(rows, ["source", "sequences/s (1 core)", "ms per batch"]))
    print(
        f"\nstream vs per-sequence: {paired_ratio(times['per_sequence'], times['stream']):.2f}x; "
        f"stream vs fixed read: {paired_ratio(times['fixed_read'], times['stream']):.2f}x "
        "(below 1: slower than reading)"
    )
    needs = []
    for preset in ("full", "mini", "micro"):
        rate = consumption(preset, spec.frame_size, spec.seq_len)
        needs.append({"preset": preset, "H100 consumes (seq/s at 40% bf16)": rate, "cores to keep up": rate / per_core})
    print()
    print(markdown_table(needs, ["preset", "H100 consumes (seq/s at 40% bf16)", "cores to keep up"]))
    write_json(
        {
            "environment": environment(device),
            "batch": b,
            "spec": spec.__dict__,
            "times_s": times,
            "rows": rows,
            "needs": needs,
        },
        Path(args.out),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
