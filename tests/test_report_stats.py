"""Seeds and searches in the report: t intervals against scipy on fixed numbers, the paper's and the
decoders' paired differences, fANOVA importance on a table where one knob matters, and a searched
sweep's report section (figures, table, fitted trend)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pipeline.report.build import build_report
from pipeline.report.decoders import verdict
from pipeline.report.params import ReportParams
from pipeline.report.search_figures import importances, power_fit, searched_axes, training_flops
from pipeline.report.stats import paired_difference, paper_contrasts, seed_intervals, seed_section, t_interval

EXCESS = [1.31, 1.18, 1.47, 1.22]
A = [2.10, 2.35, 1.98, 2.21, 2.40]
B = [1.90, 2.02, 1.95, 1.88, 2.11]


def test_t_interval_matches_scipy_on_fixed_numbers():
    got = t_interval(EXCESS)
    low, high = sps.t.interval(0.95, len(EXCESS) - 1, loc=np.mean(EXCESS), scale=sps.sem(EXCESS))
    assert (got.n, got.mean) == (4, pytest.approx(np.mean(EXCESS)))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    assert t_interval([1.3]) is None and t_interval([1.3, math.nan]) is None  # one value: no interval


def test_paired_difference_matches_scipys_paired_t_test():
    got = paired_difference(dict(enumerate(A)), dict(enumerate(B)))
    test = sps.ttest_rel(A, B)
    ci = test.confidence_interval(0.95)
    assert (got.low, got.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert got.excludes_zero == (test.pvalue < 0.05) and got.excludes_zero  # these numbers differ
    # pairing by seed: seed 9 of b has no partner and is left out; shuffled seeds pair the same
    same = paired_difference({4 - k: a for k, a in enumerate(A[::-1])}, {**dict(enumerate(B)), 9: 0.0})
    assert same == got
    # a difference within the noise includes 0, as scipy's p-value says
    close = paired_difference({0: 1.0, 1: 1.2, 2: 0.9}, {0: 1.1, 1: 1.0, 2: 1.0})
    assert not close.excludes_zero and sps.ttest_rel([1.0, 1.2, 0.9], [1.1, 1.0, 1.0]).pvalue > 0.05


def _trial(run, config, seed, excess, **fields):
    base = {"run_id": run, "status": "FINISHED", "config": config, "enc_blocks": 2, "dec_blocks": 3,
            "filter_fraction": 0.25, "seed": seed, "sample": seed, "excess": excess, "decoder": "pixelcnn"}  # fmt: skip
    return {**base, **fields}


def test_seed_intervals_group_seeds_of_one_config_and_say_nothing_with_one_seed():
    rows = [_trial(f"a{s}", "enc 2 / dec 3 / f 0.25", s, e) for s, e in enumerate(EXCESS)]
    rows += [_trial("b0", "enc 4 / dec 3 / f 0.25", 0, 0.9, enc_blocks=4)]  # one seed: left out
    rows += [_trial("c0", "x", 0, 5.0, status="FAILED")]
    table = seed_intervals(pd.DataFrame(rows))
    assert list(table["config"]) == ["enc 2 / dec 3 / f 0.25"] and list(table["seeds"]) == [4]
    assert table["CI low"].iloc[0] == pytest.approx(t_interval(EXCESS).low)
    one_seed = pd.DataFrame([_trial(f"r{k}", f"c{k}", 0, 1.0 + k) for k in range(3)])
    assert seed_section(one_seed) == [] and paper_contrasts(one_seed) == []


def test_paper_contrasts_pair_rows_by_seed():
    rows = []
    for s, (a, b) in enumerate(zip(A, B)):  # dilation (a) worse than none (b) in every seed
        rows.append(_trial(f"d{s}", "rmb-dil", s, a, block="rmb", dilation=True, row="rmb_dilation"))
        rows.append(_trial(f"n{s}", "rmb-nodil", s, b, block="rmb", dilation=False, row="rmb"))
    lines = paper_contrasts(pd.DataFrame(rows))
    assert len([line for line in lines if line.startswith("- ")]) == 1, lines
    ci = sps.ttest_rel(A, B).confidence_interval(0.95)
    assert "dilation, RMB blocks" in lines[2] and "**excludes 0**" in lines[2]
    assert f"[{ci.low:+.3g}, {ci.high:+.3g}]" in lines[2]


def test_decoder_verdict_gives_the_interval_of_the_difference_with_seeds():
    diffs = [0.1, -0.2, 0.05, 0.15]
    pairs = pd.DataFrame({"decoder": "stacks", "reference": "pixelcnn", "matched": True,
                          "nll_difference": diffs, "reference_nll": 10.0})  # fmt: skip
    text = verdict(pairs, noise=0.3)
    low, high = sps.t.interval(0.95, 3, loc=np.mean(diffs), scale=sps.sem(diffs))
    assert f"[{low:+.3g}, {high:+.3g}]" in text and "includes 0" in text
    assert "not a significant difference" in verdict(pairs, noise=None)  # one seed: today's sentence
    assert "CI" not in verdict(pairs, noise=None)


def searched_table(n: int = 24, seed: int = 0, seeds: int = 1) -> pd.DataFrame:
    """A random search over enc_blocks, dec_blocks and filter_fraction where only enc_blocks moves
    the excess (dec_blocks and the width add noise of a hundredth of its effect)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        enc, dec, frac = int(rng.integers(1, 13)), int(rng.integers(3, 17)), float(rng.uniform(0.125, 1.0))
        for s in range(seeds):
            excess = 0.5 + 0.4 * enc + 0.004 * rng.normal()
            rows.append(
                {
                    "run_id": f"r{k}-{s}",
                    "trial": f"t{k:03d}",
                    "sweep": "search",
                    "profile": "cpu",
                    "status": "FINISHED",
                    "preset": None,
                    "enc_blocks": enc,
                    "dec_blocks": dec,
                    "filter_fraction": frac,
                    "seed": s,
                    "sample": s,
                    "parameters": 1000 * enc * dec,
                    "flops_per_frame": int(1e6 * enc * dec * frac),
                    "steps_completed": 200,
                    "steps": 200,
                    "batch_size": 8,
                    "seq_len": 6,
                    "mean_steps_per_second": 5.0,
                    "converged_step": None,
                    "checkpoint_uri": None,
                    "est_gpu_hours": 1e-4 * enc * dec,
                    "test_nats_per_frame": 50 + excess,
                    "test_floor_nats_per_frame": 50.0,
                    "test_excess_nats_per_frame": excess,
                }
            )
    return pd.DataFrame(rows)


def test_fanova_ranks_the_one_knob_that_matters_first():
    table = searched_table().rename(columns={"test_excess_nats_per_frame": "excess"})
    scores = importances(table, ["dec_blocks", "filter_fraction", "enc_blocks"])
    assert next(iter(scores)) == "enc_blocks" and scores["enc_blocks"] > 0.9, scores
    assert sum(scores.values()) == pytest.approx(1.0)


def test_power_fit_recovers_a_power_law():
    cost = np.geomspace(1e12, 1e16, 9)
    assert power_fit(cost, 3e3 * cost**-0.25) == (pytest.approx(3e3), pytest.approx(-0.25))
    assert power_fit(cost[:2], cost[:2]) is None  # under three points: no fit


def test_searched_report_shows_parallel_coordinates_importance_and_compute(tmp_path):
    from test_report import write_tables

    table = searched_table(n=10, seeds=2)
    curves = [(r, step, 100.0 - step / 10, 99.0, 5.0) for r in table["run_id"] for step in (10, 100, 200)]
    write_tables(tmp_path, "search", table.to_dict("records"), curves)
    metrics = build_report("search", ReportParams(sweeps=("search",)), tmp_path)
    out = tmp_path / "reports" / "search"
    text = (out / "report.md").read_text()
    for name in ("parallel.png", "importance.png", "compute.png"):
        assert f"]({name})" in text and (out / name).stat().st_size > 1000
    assert "fANOVA (optuna.importance.FanovaImportanceEvaluator" in text
    assert "excess = a C^b fitted by least squares on log10(excess)" in text
    assert next(iter(metrics["importance"])) == "enc_blocks"
    assert "## Seeds: mean test excess with a 95% confidence interval" in text
    summary = pd.read_parquet(tmp_path / "results" / "search" / "trials.parquet").rename(
        columns={"test_excess_nats_per_frame": "excess"}
    )
    assert searched_axes(summary) == ["enc_blocks", "dec_blocks", "filter_fraction"]
    expected = 3 * summary["flops_per_frame"] * 5 * 8 * 200
    assert training_flops(summary).tolist() == pytest.approx(expected.astype(float).tolist())


def test_a_grid_gets_no_search_section(tmp_path):
    from test_report import synthetic, write_tables

    trials, curves = synthetic(n_failed=0)
    write_tables(tmp_path, "demo", trials, curves)
    build_report("demo", ReportParams(sweeps=("demo",)), tmp_path)
    text = (tmp_path / "reports" / "demo" / "report.md").read_text()
    assert "which knob matters" not in text and "## Seeds" not in text


def _rows_table(excess: dict[str, list[float]]) -> pd.DataFrame:
    """Trials of the paper's rows, one per (row, seed), at 32x32."""
    arch = {"baseline": {"decoder": "baseline", "block": "rmb", "dilation": True},
            "rmb": {"block": "rmb", "dilation": False}, "relu": {"block": "relu", "dilation": False},
            "relu_dilated": {"block": "relu", "dilation": True}}  # fmt: skip
    rows = [
        _trial(f"{row}{s}", row, s, e, row=row, frame_height=32, frame_width=32, **arch[row])
        for row, values in excess.items()
        for s, e in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_paper_finding_gives_the_baseline_gap_and_rmb_over_relu_with_paired_intervals():
    from pipeline.report.finding import PAPER_BASELINE_GAP, PAPER_RMB_OVER_RELU, finding_lines, paper_finding

    base, rmb, relu, relu_dil = [37.1, 36.2, 38.0], [15.0, 15.4, 14.9], [16.7, 17.0, 16.2], [17.3, 17.1, 16.9]
    finding = paper_finding(_rows_table({"baseline": base, "rmb": rmb, "relu": relu, "relu_dilated": relu_dil}))
    gap = finding.baseline_gap
    assert (gap.a, gap.b, finding.frames) == ("Baseline", "VPN, RMB, no dilation", "32x32")  # the best VPN row
    assert gap.value == pytest.approx(np.mean(base) - np.mean(rmb)) and gap.paper == pytest.approx(22.5)
    ci = sps.ttest_rel(base, rmb).confidence_interval(0.95)
    assert (gap.interval.low, gap.interval.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    blocks = finding.rmb_over_relu  # best RMB (rmb) against best ReLU (relu, not relu_dilated)
    assert blocks.b == "VPN, ReLU, no dilation" and blocks.value == pytest.approx(np.mean(rmb) - np.mean(relu))
    assert (PAPER_BASELINE_GAP, PAPER_RMB_OVER_RELU) == (pytest.approx(110.1 - 87.6), pytest.approx(87.6 - 87.7))
    text = "\n".join(finding_lines(finding))
    assert f"{gap.value:+.2f} nats/frame" in text and f"[{ci.low:+.2f}, {ci.high:+.2f}]" in text and "+22.5" in text
    assert finding.to_json()["baseline_gap"]["ci95"] == [pytest.approx(ci.low), pytest.approx(ci.high)]
    # per pixel, the unit the gap is set beside the paper's in: 32x32 grey frames against the paper's 64x64
    as_json = finding.to_json()["baseline_gap"]
    assert as_json["nats_per_pixel"] == pytest.approx(gap.value / 1024) and as_json["pixels"] == 1024
    assert as_json["ci95_per_pixel"] == [pytest.approx(ci.low / 1024), pytest.approx(ci.high / 1024)]
    assert as_json["paper_nats_per_pixel"] == pytest.approx(22.5 / 4096) and as_json["same_sign_as_paper"]
    assert f"{gap.value / 1024:+.3g} nats/pixel" in text and "only the sign carries over" in text


def test_paper_finding_with_one_seed_has_no_interval_and_none_without_a_baseline():
    from pipeline.report.finding import finding_lines, paper_finding

    one = paper_finding(_rows_table({"baseline": [6.63], "rmb": [5.81], "relu": [5.86]}))
    assert one.baseline_gap.value == pytest.approx(0.82) and one.baseline_gap.interval is None
    assert "one seed: no interval" in "\n".join(finding_lines(one))
    assert paper_finding(_rows_table({"rmb": [5.8], "relu": [5.9]})) is None and finding_lines(None) == []
