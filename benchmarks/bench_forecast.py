"""What free-running scoring adds to a cpu trial: vpn.forecast.forecast against vpn.evaluate.score.

    python -m benchmarks.bench_forecast --sequences 16 --samples 10 --test-sequences 1000

On untrained models of the depth_width cpu grid's smallest and largest depth (random uint8 64x64
clips, prepared as the cpu profile: 6 frames, 3 of context, pooled 4x to 16x16), one torch thread,
times the test NLL of --test-sequences sequences (what a trial already pays at its end) and the
free-running scoring of --sequences x --samples, in the same process, and prints their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from vpn.config import TrainConfig, VPNConfig
from vpn.evaluate import score
from vpn.forecast import forecast
from vpn.model import VideoPixelNetwork

MODELS = ((1, 3, 0.03125), (4, 6, 0.0625))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--test-sequences", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = torch.randint(0, 256, (args.test_sequences, 6, 1, 64, 64), dtype=torch.uint8)
    cfg = TrainConfig(seq_len=6, context=3, downsample=4, batch_size=8)
    print("| model | test NLL | free-running | ratio |\n|---|---|---|---|")
    for enc, dec, ff in MODELS:
        torch.manual_seed(0)
        spec = {"enc_blocks": enc, "dec_blocks": dec, "filter_fraction": ff, "output": "bernoulli", "dilation": False}
        model = VideoPixelNetwork(VPNConfig.from_dict(spec))
        start = time.perf_counter()
        score(model, data, cfg, args.test_sequences)
        nll_s = time.perf_counter() - start
        start = time.perf_counter()
        forecast(model, data, cfg, args.sequences, samples=args.samples)
        free_s = time.perf_counter() - start
        print(f"| enc {enc} / dec {dec} / f {ff:g} | {nll_s:.1f} s | {free_s:.1f} s | {free_s / nll_s:.2f} |")


if __name__ == "__main__":
    main()
