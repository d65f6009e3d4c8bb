"""The decoder comparison (pipeline/report/decoders.py) on tiny synthetic summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.report.build import build_report
from pipeline.report.decoders import decoder_comparison, match_pairs, seed_noise, verdict
from pipeline.report.params import ReportParams


def trial(
    k: int, decoder: str, dec: int, frac: float, params: int, nll: float, seed: int = 0, status: str = "FINISHED"
) -> dict:
    return {
        "run_id": f"r{k}",
        "status": status,
        "decoder": decoder,
        "enc_blocks": 1,
        "dec_blocks": dec,
        "filter_fraction": frac,
        "block": "rmb",
        "output": "bernoulli",
        "seed": seed,
        "step_budget": 200,
        "parameters": params,
        "flops_per_frame": params * 512,
        "steps_per_second": 10.0 if decoder == "pixelcnn" else 8.0,
        "final_nll": nll,
    }


def crossed(gain: float, seeds: int = 1) -> pd.DataFrame:
    """Both decoders at two sizes; the stacks 3% larger and `gain` nats/frame better."""
    rows = []
    for dec, frac, params, nll in ((3, 1 / 32, 10_000, 120.0), (6, 1 / 16, 40_000, 110.0)):
        for seed in range(seeds):
            jitter = 0.1 * seed
            rows.append(trial(len(rows), "pixelcnn", dec, frac, params, nll + jitter, seed))
            rows.append(trial(len(rows), "stacks", dec, frac, int(params * 1.03), nll - gain + jitter, seed))
    return pd.DataFrame(rows)


def test_pairs_join_the_same_size_and_conditions():
    summary = crossed(gain=2.0, seeds=2)
    pairs = match_pairs(summary)
    assert len(pairs) == 4 and pairs["matched"].all()
    assert (pairs["size"] == pairs["reference_size"]).all()
    assert pairs["nll_difference"].tolist() == pytest.approx([-2.0] * 4)
    assert pairs["parameter_ratio"].tolist() == pytest.approx([1.03] * 4, rel=1e-3)
    assert pairs["speed_ratio"].tolist() == pytest.approx([0.8] * 4)
    # each stacks trial's partner ran with its own seed
    by_run = summary.set_index("run_id")
    assert all(
        by_run.loc[a, "seed"] == by_run.loc[b, "seed"] for a, b in zip(pairs["run_id"], pairs["reference_run_id"])
    )


def test_nearest_parameters_when_the_same_size_is_not_matched():
    """A stacks trial 30% larger than the same-size reference pairs with a deeper reference of about
    its own size; one with no reference within 10% is listed, unmatched, and kept out of the verdict."""
    summary = pd.DataFrame([
        trial(0, "pixelcnn", 3, 1 / 32, 10_000, 120.0), trial(1, "pixelcnn", 6, 1 / 32, 13_500, 118.0),
        trial(2, "stacks", 3, 1 / 32, 13_000, 117.0), trial(3, "stacks", 12, 1 / 32, 30_000, 100.0),
        trial(4, "stacks", 6, 1 / 32, 1, 1.0, status="FAILED"),
    ])  # fmt: skip
    pairs = match_pairs(summary).set_index("run_id")
    assert pairs.loc["r2", "reference_run_id"] == "r1" and pairs.loc["r2", "matched"]
    assert not pairs.loc["r3", "matched"] and "r4" not in pairs.index
    assert "1 of 1 pairs" in verdict(pairs.reset_index(), None)


def test_verdict_says_gain_loss_or_no_clear_difference():
    noisy = crossed(gain=0.05, seeds=3)  # seed spread 0.1: a 0.05 gain is noise
    assert seed_noise(noisy) == pytest.approx(0.1)
    assert "no clear difference" in verdict(match_pairs(noisy), seed_noise(noisy))
    assert "stacks gains" in verdict(match_pairs(crossed(gain=2.0, seeds=3)), 0.1)
    assert "stacks loses" in verdict(match_pairs(crossed(gain=-2.0, seeds=3)), 0.1)
    one_seed = crossed(gain=2.0)
    assert seed_noise(one_seed) is None
    assert "no noise estimate" in verdict(match_pairs(one_seed), None)
    assert "2 of 2 pairs" in verdict(match_pairs(one_seed), None)


def test_comparison_lines_and_figure(tmp_path):
    lines, figures = decoder_comparison(crossed(gain=1.5), tmp_path)
    text = "\n".join(lines)
    assert text.startswith("## Decoders at matched parameters")
    assert "| size (vs reference's) |" in text and text.count("| stacks |") == 2
    assert "-1.5" in text and "parameters x1.030" in text and "steps/s x0.80" in text
    # a third decoder gets its own verdict
    three = pd.concat(
        [
            crossed(gain=1.5),
            crossed(gain=-3.0).query("decoder == 'stacks'").assign(decoder="other", run_id=lambda d: d["run_id"] + "x"),
        ]
    )
    text = "\n".join(decoder_comparison(three, tmp_path)[0])
    assert "- **other**: At matched parameters other has the lower final NLL in 0 of 2" in text
    assert "- **stacks**: At matched parameters stacks has the lower final NLL in 2 of 2" in text
    [(_title, name)] = figures
    with Image.open(tmp_path / name) as image:
        image.verify()
    # one decoder only: said, no figure
    lines, figures = decoder_comparison(crossed(gain=1.0).query("decoder == 'pixelcnn'"), tmp_path)
    assert figures == [] and "one decoder" in "\n".join(lines)


def test_build_report_adds_the_comparison_for_a_decoder_sweep(tmp_path):
    """pipeline.report.build.build_report calls it when the trials differ in `decoder`."""
    trials, curves = [], []
    for k, (decoder, dec, frac) in enumerate(
        [(d, dec, f) for d in ("pixelcnn", "stacks") for dec in (1, 3) for f in (1 / 32, 1 / 16)]
    ):
        trials.append(
            {
                "run_id": f"r{k}",
                "trial": f"t{k}",
                "sweep": "dec",
                "profile": "cpu",
                "status": "FINISHED",
                "error": None,
                "preset": None,
                "decoder": decoder,
                "enc_blocks": 1,
                "dec_blocks": dec,
                "filter_fraction": frac,
                "seed": 0,
                "block": "rmb",
                "parameters": 1000 * dec * (2 if frac > 0.04 else 1) * (1.04 if decoder == "stacks" else 1),
                "flops_per_frame": 10**6 * dec,
                "steps": 200,
                "steps_per_second": 5.0,
                "converged_step": None,
                "checkpoint": None,
            }
        )
        for step in range(10, 210, 10):
            loss = 100 - k + 300 * np.exp(-step / 30)
            curves.append((f"r{k}", step, loss, loss + 1 if step % 50 == 0 else np.nan, 5.0))
    folder = tmp_path / "results" / "dec"
    folder.mkdir(parents=True)
    pd.DataFrame(trials).to_parquet(folder / "trials.parquet")
    columns = ["run_id", "step", "train_nats_per_frame", "val_nats_per_frame", "steps_per_second"]
    pd.DataFrame(curves, columns=columns).to_parquet(folder / "curves.parquet")
    build_report("dec", ReportParams(sweeps=("dec",)), tmp_path)
    text = (tmp_path / "reports" / "dec" / "report.md").read_text()
    assert "## Decoders at matched parameters" in text and "(decoders.png)" in text
    assert "4 pairs" in text  # the stacks win all four (lower NLL: later run ids)
    with Image.open(tmp_path / "reports" / "dec" / "decoders.png") as image:
        image.verify()
