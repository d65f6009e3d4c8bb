"""Sampling throughput: the cached sampler against the naive per-pixel rerun, in the same run.

    python -m benchmarks.bench_sample --preset micro --size 64 --batches 1 4 16 64 \
        --device auto --out benchmarks/results/sample_cpu.json

Both decode one new frame of a batch given its LSTM context (vpn.sample.decode_frame):

- naive: for every pixel (and colour) the whole decoder runs on the whole partly drawn frame, as the
  public implementations sample. Every pixel costs the same full pass, so it is timed on the first
  --naive-pixels pixels of the frame: a whole 64x64 frame would take hours on a CPU.
- cached: one position of every layer per pixel, the row above's taps (the stacks: the vertical
  stack's row) once per row. Timed on the first --pixels pixels (one image row at 64x64, so one
  per-row step is included), including its per-frame setup; with --full-frame-batches also on a
  whole frame, the figure a user sees. The stacks' vertical stack first runs at row 1 (row 0 has
  no row above), so their first-row figure leaves it out: compare the decoders on whole frames.

Each of --decoders is timed the same way, one after the other (default: the masked decoder,
"pixelcnn", and Gated PixelCNN's vertical and horizontal stacks, "stacks", at the same preset).

Throughput is pixels per second: batch x pixels drawn / seconds (greyscale, so one value a pixel).
Before timing, both samplers draw the first pixels from the same context and seed, and their logits
are checked equal within float tolerance.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    environment,
    interleaved,
    markdown_table,
    median,
    resolve_device,
    time_once,
    write_json,
)
from vpn import VideoPixelNetwork, VPNConfig
from vpn.sample import decode_frame

log = logging.getLogger("bench_sample")

# The targets: cached / naive pixels per second at batch 64.
TARGET_AT_64 = {"cpu": 10.0, "cuda": 50.0}


def lstm_context(model: VideoPixelNetwork, batch: int, size: int, device: torch.device) -> torch.Tensor:
    """The LSTM state after one random frame: the context of the frame to sample, (B, L, H, W)."""
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (batch, 1, model.cfg.image_channels, size, size), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        h, _ = model.lstm.step(model.encode(frames.to(device))[:, 0])
    return h


def check_same_logits(model: VideoPixelNetwork, context: torch.Tensor, pixels: int) -> float:
    """Both samplers on the first `pixels` pixels, same seed: max |logit difference| (raises if not close)."""
    logs: dict[str, list[torch.Tensor]] = {"naive": [], "cached": []}
    for method, record in logs.items():
        decode_frame(
            model,
            context,
            torch.Generator(context.device).manual_seed(1),
            method=method,
            record_logits=record,
            n_pixels=pixels,
        )
    for a, b in zip(logs["cached"], logs["naive"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return max(float((a - b).abs().max()) for a, b in zip(logs["cached"], logs["naive"]))


def time_batch(
    model: VideoPixelNetwork, decoder: str, batch: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """One row of the table: naive and cached pixels/s at one batch size, interleaved."""
    context = lstm_context(model, batch, args.size, device)
    gen = torch.Generator(device).manual_seed(0)
    fns = {
        "naive": lambda: decode_frame(model, context, gen, method="naive", n_pixels=args.naive_pixels),
        "cached": lambda: decode_frame(model, context, gen, method="cached", n_pixels=args.pixels),
    }
    log.info(
        "%s, batch %d: timing naive (%d px) and cached (%d px), %d repeats",
        decoder,
        batch,
        args.naive_pixels,
        args.pixels,
        args.repeats,
    )
    times = interleaved(fns, device, args.repeats, warmup=1)
    per_pixel = {
        "naive": [t / args.naive_pixels for t in times["naive"]],
        "cached": [t / args.pixels for t in times["cached"]],
    }
    row = {
        "decoder": decoder,
        "batch": batch,
        "naive_pixels_per_s": batch / median(per_pixel["naive"]),
        "cached_pixels_per_s": batch / median(per_pixel["cached"]),
        "speedup": median([n / c for n, c in zip(per_pixel["naive"], per_pixel["cached"])]),
        "naive_times_s": times["naive"],
        "cached_times_s": times["cached"],
    }
    if batch in args.full_frame_batches:
        t = time_once(lambda: decode_frame(model, context, gen, method="cached"), device)
        row["cached_full_frame_s"] = t
        row["cached_full_frame_pixels_per_s"] = batch * args.size * args.size / t
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="micro")
    p.add_argument(
        "--decoders",
        nargs="+",
        choices=("pixelcnn", "stacks"),
        default=["pixelcnn", "stacks"],
        help="decoders to time, each at the preset's depth and widths",
    )
    p.add_argument("--size", type=int, default=64, help="frame height and width")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--pixels", type=int, default=64, help="pixels the cached sampler is timed on")
    p.add_argument("--naive-pixels", type=int, default=4, help="pixels the naive sampler is timed on")
    p.add_argument(
        "--full-frame-batches",
        type=int,
        nargs="*",
        default=[1, 64],
        help="batch sizes to also time the cached sampler on a whole frame",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/sample_<device>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out or f"benchmarks/results/sample_{device.type}.json")

    results: dict[str, Any] = {
        "benchmark": "sample",
        "environment": environment(device),
        "args": vars(args),
        "rows": [],
    }
    results["cached_vs_naive_max_abs_logit_diff"] = {}
    for decoder in args.decoders:
        torch.manual_seed(0)
        model = VideoPixelNetwork(VPNConfig.preset(args.preset, decoder=decoder)).to(device).eval()
        # Two rows and two pixels: the cached samplers' per-row steps (the row above's taps, the
        # stacks' vertical row and links) run at least once before a compared pixel.
        diff = check_same_logits(model, lstm_context(model, 2, args.size, device), pixels=2 * args.size + 2)
        results["cached_vs_naive_max_abs_logit_diff"][decoder] = diff
        log.info("%s: cached logits equal naive logits on the first pixels (max |diff| %.2e)", decoder, diff)
        for batch in args.batches:
            results["rows"].append(time_batch(model, decoder, batch, args, device))
            write_json(results, out)  # after every batch size, so a long run leaves what it has measured

    target = TARGET_AT_64.get(device.type)
    print(
        f"\n{results['environment']['device']}: {args.preset} at {args.size}x{args.size}, greyscale; naive timed on "
        f"{args.naive_pixels} px, cached on {args.pixels} px (setup included); medians of {args.repeats} "
        "interleaved repeats"
    )
    columns = [
        "decoder",
        "batch",
        "naive_pixels_per_s",
        "cached_pixels_per_s",
        "speedup",
        "cached_full_frame_pixels_per_s",
    ]
    print(markdown_table(results["rows"], columns))
    for row in results["rows"]:
        if row["batch"] == 64 and target is not None:
            print(
                f"\n{row['decoder']}: target at batch 64 on {device.type}: >= {target:g}x; "
                f"measured {row['speedup']:.0f}x"
            )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
