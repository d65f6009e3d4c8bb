"""The report stage on synthetic results tables: figures, numbers, failed trials, empty sweeps."""

from __future__ import annotations

import json
import re

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.report.analysis import ResultsError, find_plateaus, iterations_to_converge, pareto_front
from pipeline.report.build import build_report
from pipeline.report.params import ReportParams


def write_tables(root, sweep, trials, curves):
    folder = root / "results" / sweep
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(trials).to_parquet(folder / "trials.parquet")
    pd.DataFrame(
        curves, columns=["run_id", "step", "train_nats_per_frame", "val_nats_per_frame", "steps_per_second"]
    ).to_parquet(folder / "curves.parquet")


def synthetic(n_failed: int = 1):
    trials, curves = [], []
    k = 0
    for enc in (1, 2):
        for dec in (1, 3):
            for frac in (1 / 32, 1 / 16):
                k += 1
                status = "FAILED" if k <= n_failed else "FINISHED"
                trials.append(
                    {
                        "run_id": f"r{k}",
                        "trial": f"t{k}",
                        "sweep": "demo",
                        "profile": "cpu",
                        "status": status,
                        "error": "training loss is nan (non-finite) at step 40" if status == "FAILED" else None,
                        "preset": None,
                        "enc_blocks": enc,
                        "dec_blocks": dec,
                        "filter_fraction": frac,
                        "parameters": 1000 * k,
                        "flops_per_frame": 10**6 * k,
                        "steps": 200,
                        "steps_per_second": 5.0 + k,
                        "converged_step": None,
                        "checkpoint": None,
                    }
                )
                end = 100.0 - 3 * k
                for step in range(10, 210, 10):
                    loss = end + 300 * np.exp(-step / (10 * k))
                    curves.append((f"r{k}", step, loss, loss + 2 if step % 50 == 0 else np.nan, 5.0 + k))
    return trials, curves


def with_forecasts(trials, horizon: int = 3):
    """Free-running scores on the finished trials (pipeline.sweep.record.forecasting's columns), trial k
    better than trial k-1, worsening over the horizon."""
    for k, t in enumerate(trials, start=1):
        if t["status"] != "FINISHED":
            continue
        mse = 40.0 - k
        t.update(
            steps_completed=200, frame_height=16, frame_width=16, seq_len=6, context=3, batch_size=8, data="fixed",
            forecast_temperature=1.0, test_forecast_samples=10.0, test_forecast_sequences=16.0,
            test_mse=mse, test_mae=2 * mse, test_ssim=0.5, test_psnr=10.0,
            test_mse_best=mse - 5, test_mae_best=2 * mse - 5, test_ssim_best=0.6, test_psnr_best=11.0,
            test_mse_mean_frame=mse - 10, test_mae_mean_frame=2 * mse - 10, test_ssim_mean_frame=0.7,
            test_psnr_mean_frame=12.0,
            **{f"test_{m}_by_frame": [v * (1 + h / 10) for h in range(horizon)]
               for m, v in (("mse", mse), ("mae", 2 * mse), ("ssim", 0.5), ("psnr", 10.0))},
        )  # fmt: skip
    return trials


def test_forecast_section_beside_openstl(tmp_path):
    trials, curves = synthetic(n_failed=1)
    write_tables(tmp_path, "demo", with_forecasts(trials), curves)
    metrics = build_report("demo", ReportParams(sweeps=("demo",)), tmp_path)
    out = tmp_path / "reports" / "demo"
    with Image.open(out / "forecast.png") as image:
        image.verify()
    text = (out / "report.md").read_text()
    assert "MSE, MAE, SSIM, PSNR beside OpenSTL" in text and "video_benchmarks.md" in text
    assert "deterministic" in text and "ours over 256, theirs over 4,096" in text
    for method in ("ConvLSTM-L", "PredRNN", "PredRNN++", "SimVP+IncepU", "SimVP+gSTA-S"):
        assert f"| {method} |" in text
    assert "| SimVP+gSTA-S | 2000 epoch | 15.05 | 49.8 | 0.9675 |" in text
    # the best trial by the mean frame's MSE: trial 8 (mse 40 - 8, mean frame 22)
    assert metrics["best_forecast_mse_mean_frame"] == pytest.approx(22.0)
    # each table's caption: the sequences, the test set and the size; per pixel, the unit both share
    assert "Ours: the first 16 sequences of the data's test split, 16x16 frames, 3 frames predicted from 3" in text
    assert "64x64 frames, 10 predicted from 10, on the 10,000 sequences of the standard test file" in text
    assert metrics["best_forecast_mse_per_pixel_mean_frame"] == pytest.approx(22.0 / 256)
    assert f"has an MSE of {22 / 256:.4g}, against OpenSTL's {14.07 / 4096:.4g} to {32.15 / 4096:.4g}" in text
    # the test NLL agrees with the MSE here (none given): nothing said of an order
    assert "disagree" not in text and "forecast_order" not in metrics


def test_the_report_says_where_mse_and_the_likelihood_order_the_trials_differently(tmp_path):
    """Trial k has the better MSE the larger k is, and the worse test NLL: the report says so with the
    run's numbers; and names the standard test file where the data's stats.json records it."""
    trials, curves = synthetic(n_failed=1)
    data = tmp_path / "moving_mnist"
    data.mkdir()
    (data / "stats.json").write_text(json.dumps({"splits": {"test": {"source_file": "/x/mnist_test_seq.npy"}}}))
    for k, t in enumerate(with_forecasts(trials), start=1):
        t.update(data_path=str(data), test_nats_per_frame=20.0 + k if t["status"] == "FINISHED" else None,
                 test_sequences_scored=1000)  # fmt: skip
    write_tables(tmp_path, "demo", trials, curves)
    metrics = build_report("demo", ReportParams(sweeps=("demo",)), tmp_path)
    text = (tmp_path / "reports" / "demo" / "report.md").read_text()
    assert "the first 16 sequences of the standard test file (mnist_test_seq.npy)" in text
    line = next(x for x in text.splitlines() if "MSE and the likelihood disagree" in x)
    assert "MSE over 16 test sequences, the NLL over 1,000" in line
    assert "by the mean frame's MSE enc 2 / dec 3 / f 0.0625 comes first (22.00, against 23.00 to 28.00" in line
    assert "by the test NLL it is 7 of 7 (28.00 nats/frame, 6.00 behind enc 1 / dec 1 / f 0.0625)" in line
    assert "the per-pixel mean, a blur" in line  # the reason
    order = metrics["forecast_order"]
    assert order["its_nll_rank"] == 7 and order["kendall_tau"] == pytest.approx(-1.0)
    assert order["by_nll"] == list(reversed(order["by_mse"]))


def test_report_figures_table_and_numbers(tmp_path):
    trials, curves = synthetic(n_failed=1)
    write_tables(tmp_path, "demo", trials, curves)
    metrics = build_report("demo", ReportParams(sweeps=("demo",)), tmp_path)
    out = tmp_path / "reports" / "demo"
    for name in ("curves.png", "converge_heatmaps.png", "pareto.png", "speed.png"):
        with Image.open(out / name) as image:
            image.verify()
    text = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "<table>" in html and "<img" in html
    # failed trial: said, and marked in the table
    assert "1 did not" in text and "**FAILED**" in text and "non-finite" in text
    # the best NLL is the smallest last validation value among finished trials, as in the tables
    df = pd.DataFrame(curves, columns=["run_id", "step", "train", "val", "sps"])
    finished = [t["run_id"] for t in trials if t["status"] == "FINISHED"]
    last_val = df[df.run_id.isin(finished)].dropna(subset=["val"]).groupby("run_id")["val"].last()
    assert metrics["best_nll"] == pytest.approx(last_val.min())
    assert f"{last_val.min():.2f} nats/frame" in text
    # every trial is a row of the table, with its final NLL as in the tables
    for run_id, value in last_val.items():
        row = next(line for line in text.splitlines() if f"| {run_id} |" in line)
        assert f"{value:.4g}" in row
    assert json.loads((out / "metrics.json").read_text())["finished"] == 7


def test_curves_figure_plots_the_tables_curves(tmp_path, monkeypatch):
    """The curves figure draws, per split panel, one line per finished trial whose points are that
    trial's (step, value) rows of curves.parquet (val: the logged ones); one colour per depth."""
    from pipeline.report import figures as report_figures

    figures = {}
    save = report_figures.save_figure

    def capture(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(report_figures, "save_figure", capture)
    trials, curves = synthetic(n_failed=1)
    # a second trial of r2's architecture (as a learning-rate sweep has): its own line, not a mean
    trials.append(trials[1] | {"run_id": "r9", "trial": "t9"})
    curves += [("r9", step, train + 7, val + 7, sps) for run_id, step, train, val, sps in curves if run_id == "r2"]
    write_tables(tmp_path, "demo", trials, curves)
    build_report("demo", ReportParams(sweeps=("demo",)), tmp_path)

    table = pd.DataFrame(curves, columns=["run_id", "step", "train", "val", "sps"])
    depth = {t["run_id"]: (t["enc_blocks"], t["dec_blocks"]) for t in trials if t["status"] == "FINISHED"}
    axes = {ax.get_title().split()[0]: ax for ax in figures["curves.png"].axes}
    assert sorted(axes) == ["train", "val"]
    for split, ax in axes.items():
        expected = {
            run_id: (tuple(rows["step"]), tuple(rows[split]))
            for run_id, rows in table.dropna(subset=[split]).sort_values("step").groupby("run_id")
            if run_id in depth
        }
        lines = [line for line in ax.lines if len(line.get_xdata())]  # (the legend's entries are empty)
        drawn = {
            (tuple(line.get_xdata()), tuple(line.get_ydata())): matplotlib.colors.to_hex(line.get_color())
            for line in lines
        }
        assert len(lines) == len(expected) == 8 and set(drawn) == set(expected.values()), split
        colours = {depth[run_id]: set() for run_id in expected}
        for run_id, xy in expected.items():
            colours[depth[run_id]].add(drawn[xy])
        assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == len(colours)


def test_empty_sweep_says_so(tmp_path):
    write_tables(tmp_path, "empty", [], [])
    metrics = build_report("empty", ReportParams(sweeps=("empty",)), tmp_path)
    text = (tmp_path / "reports" / "empty" / "report.md").read_text()
    assert "no runs" in text and metrics["trials"] == 0


def test_all_failed_sweep_does_not_crash(tmp_path):
    trials, curves = synthetic(n_failed=8)
    write_tables(tmp_path, "bad", trials, curves)
    metrics = build_report("bad", ReportParams(sweeps=("bad",)), tmp_path)
    text = (tmp_path / "reports" / "bad" / "report.md").read_text()
    assert "No trial finished" in text and metrics["failed"] == 8
    assert len(re.findall(r"\*\*FAILED\*\*", text)) == 8


def test_missing_or_corrupt_tables_name_the_file(tmp_path):
    with pytest.raises(ResultsError, match="trials.parquet"):
        build_report("nothing", ReportParams(sweeps=("nothing",)), tmp_path)
    folder = tmp_path / "results" / "broken"
    folder.mkdir(parents=True)
    (folder / "trials.parquet").write_bytes(b"not parquet")
    (folder / "curves.parquet").write_bytes(b"not parquet")
    with pytest.raises(ResultsError, match="trials.parquet"):
        build_report("broken", ReportParams(sweeps=("broken",)), tmp_path)


def test_iterations_to_converge():
    steps = np.arange(1, 11) * 10
    losses = np.array([100, 60, 30, 15, 12, 11, 10.5, 10.2, 10.1, 10.0])
    # within 5% of the 90-nat drop of the final value (10 + 4.5): first at 12 (step 50)
    assert iterations_to_converge(steps, losses, 0.05) == 50
    assert iterations_to_converge(steps, np.full(10, 5.0), 0.05) is None


def test_plateau_found_only_where_the_loss_stalls():
    steps = np.arange(1, 301)
    stalled = np.concatenate([np.linspace(100, 60, 50), np.full(100, 60.0), np.linspace(60, 10, 150)])
    found = find_plateaus(steps, stalled, None, min_fraction=0.1, progress=0.1)
    # flat from step 51 to 150; it ends once the descent after it has made 10% of what is left
    assert len(found) == 1 and 45 <= found[0][0] <= 60 and 150 <= found[0][1] <= 170
    # a steady descent, and an exponential's slow final approach, are not plateaus
    assert find_plateaus(steps, np.linspace(100, 10, 300), None, min_fraction=0.1, progress=0.1) == []
    decay = 10 + 90 * np.exp(-steps / 30.0)
    assert find_plateaus(steps, decay, None, min_fraction=0.05, progress=0.1) == []
    # a stall inside the first 5% of the drop is the start, not a plateau
    slow_start = np.concatenate([np.full(60, 100.0), np.linspace(100, 10, 240)])
    assert find_plateaus(steps, slow_start, None, min_fraction=0.1, progress=0.1) == []
    # only the curve up to the convergence step counts
    assert find_plateaus(steps, stalled, 40, min_fraction=0.1, progress=0.1) == []


def test_pareto_front():
    cost = np.array([1, 2, 3, 4, 2])
    loss = np.array([10, 8, 9, 5, 12])
    assert pareto_front(cost, loss).tolist() == [True, True, False, True, False]


def test_params_are_validated():
    with pytest.raises(ValueError, match="converge_fraction"):
        ReportParams(converge_fraction=1.5)
    with pytest.raises(ValueError, match="sweeps"):
        ReportParams(sweeps=())


def test_samples_use_the_trials_preparation_and_the_overfit_sequence(tmp_path):
    """An overfit trial's checkpoint holds the already-pooled sequence's config (downsample 1); the
    report must pool as the trial did (its row) and sample the sequence it memorised."""
    import torch

    from pipeline.report.samples import sample_frames
    from vpn import VPNConfig
    from vpn.config import TrainConfig
    from vpn.evaluate import prepare
    from vpn.train import Trainer

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    splits = {name: rng.integers(0, 256, (3, 6, 1, 16, 16), dtype=np.uint8) for name in ("train", "test")}
    for name, array in splits.items():
        np.save(data / f"{name}.npy", array)
    model = VPNConfig.preset("micro", filter_fraction=4 / 128, output="bernoulli")
    ckpt = Trainer(
        model,
        TrainConfig(steps=1, batch_size=1, seq_len=None, downsample=1),
        torch.zeros(1, 4, 1, 4, 4, dtype=torch.uint8),
    ).save(tmp_path / "ckpt.pt")
    best = pd.Series(
        {
            "checkpoint": ckpt.as_uri(),
            "config": "micro",
            "output": "bernoulli",
            "seq_len": 5,
            "downsample": 4,
            "overfit_split": "train",
            "overfit_index": 2,
        }
    )
    params = ReportParams(data="data", sample_context=2, sample_frames=3)
    truth, sampled, context, label = sample_frames(best, params, tmp_path)
    expected = prepare(torch.from_numpy(splits["train"][2:3]), TrainConfig(seq_len=5, downsample=4, context=1))[0]
    assert torch.equal(truth, expected) and truth.shape == (5, 1, 4, 4)
    assert sampled.shape == (3, 1, 4, 4) and context == 2 and "train sequence 2" in label
    # a train sweep's row (no overfit sequence) samples params.sample_split / sample_index
    truth, *_ = sample_frames(best.drop(["overfit_split", "overfit_index"]), params, tmp_path)
    assert torch.equal(
        truth, prepare(torch.from_numpy(splits["test"][0:1]), TrainConfig(seq_len=5, downsample=4, context=1))[0]
    )


def test_overfit_report_shows_the_blog_posts_figure(tmp_path):
    """An overfit sweep: iterations per preset from converged_step, plateaus found in the curves."""
    trials, curves = [], []
    shapes = {  # preset: (converged step, curve)
        "full": (120, lambda s: 10 + 90 * np.exp(-s / 20.0)),
        "mini": (
            300,
            lambda s: np.where(s < 60, 100 - 0.6 * s, np.where(s < 180, 64.0, np.maximum(64 - 0.45 * (s - 180), 10))),
        ),
    }
    for k, (preset, (converged, curve)) in enumerate(shapes.items()):
        trials.append(
            {
                "run_id": f"o{k}",
                "trial": f"t{k}",
                "sweep": "ovf",
                "profile": "cpu",
                "status": "FINISHED",
                "error": None,
                "mode": "overfit",
                "preset": preset,
                "enc_blocks": 2 + k,
                "dec_blocks": 3 + k,
                "filter_fraction": 0.125,
                "parameters": 100 * (k + 1),
                "flops_per_frame": 10**5 * (k + 1),
                "steps": converged,
                "steps_per_second": 20.0,
                "converged_step": converged,
                "checkpoint": None,
            }
        )
        for step in range(1, converged + 1):
            curves.append((f"o{k}", step, float(curve(np.float64(step))), np.nan, 20.0))
    write_tables(tmp_path, "ovf", trials, curves)
    metrics = build_report("ovf", ReportParams(sweeps=("ovf",)), tmp_path)
    out = tmp_path / "reports" / "ovf"
    with Image.open(out / "overfit.png") as image:
        image.verify()
    assert metrics["iterations_to_converge"] == {
        "full (enc 2 / dec 3 / f 0.125)": 120,
        "mini (enc 3 / dec 4 / f 0.125)": 300,
    }
    assert metrics["plateau"] == {"full (enc 2 / dec 3 / f 0.125)": False, "mini (enc 3 / dec 4 / f 0.125)": True}
    text = (out / "report.md").read_text()
    cells = {
        line.split(" | ")[0]: [c.strip(" |") for c in line.split(" | ")[1:]]
        for line in text.splitlines()
        if line.startswith(("| full |", "| mini |"))
    }
    assert cells["| full"] == ["120", "600", "no", "no"]
    assert (
        cells["| mini"][:2] == ["300", "5,000"]
        and re.fullmatch(r"\d+-\d+", cells["| mini"][2])
        and cells["| mini"][3] == "yes"
    )


def test_report_from_a_real_mlflow_store_with_a_failed_trial_and_an_empty_experiment(tmp_path):
    """The path the pipeline takes: MLflow runs -> pipeline.sweep.record.results tables -> report. A failed run
    is marked with its error; an experiment without runs gives a report that says so."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.record import tracking
    from pipeline.sweep.record.results import write_results

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}", registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("real", artifact_location=(tmp_path / "art").as_uri())
    expected = {}
    for k, (status, enc) in enumerate([("FINISHED", 1), ("FINISHED", 2), ("FAILED", 3)]):
        run = client.create_run(
            exp,
            run_name=f"e{enc}",
            tags={
                tracking.TAG_SWEEP_ID: "real-cpu-0",
                tracking.TAG_PROFILE: "cpu",
                tracking.TAG_MODE: "train",
                tracking.TAG_LABEL: f"e{enc}",
                **({tracking.TAG_ERROR: "training loss is nan (non-finite) at step 20"} if status == "FAILED" else {}),
            },
        )
        rid = run.info.run_id
        for key, value in {
            "enc_blocks": enc,
            "dec_blocks": 3,
            "filter_fraction": 0.0625,
            "parameters": 1000 * enc,
            "flops_per_frame": 10**6 * enc,
            "steps": 40,
        }.items():
            client.log_param(rid, key, value)
        steps = range(10, 50, 10) if status == "FINISHED" else range(10, 30, 10)
        metrics = [Metric("train_nats_per_frame", 100.0 / (s * enc), 0, s) for s in steps]
        metrics += [Metric("val_nats_per_frame", 110.0 / (s * enc) + k, 0, s) for s in steps if s % 20 == 0]
        metrics += [Metric("steps_per_second", 5.0 + k, 0, s) for s in steps]
        client.log_batch(rid, metrics=metrics)
        client.set_terminated(rid, status)
        expected[rid] = 110.0 / (40 * enc) + k
    client.create_experiment("nothing")

    write_results(client, "real", "cpu", "real-cpu-0", "train", tmp_path / "results" / "real")
    write_results(client, "nothing", "cpu", "nothing-cpu-0", "train", tmp_path / "results" / "nothing")
    metrics = build_report("real", ReportParams(sweeps=("real",)), tmp_path)
    text = (tmp_path / "reports" / "real" / "report.md").read_text()
    finished = {rid: v for rid, v in expected.items() if client.get_run(rid).info.status == "FINISHED"}
    assert metrics["best_nll"] == pytest.approx(min(finished.values()))
    assert metrics["finished"] == 2 and metrics["failed"] == 1
    failed_row = next(line for line in text.splitlines() if "| **FAILED** |" in line)
    assert "non-finite" in failed_row and "1 did not" in text
    empty = build_report("nothing", ReportParams(sweeps=("nothing",)), tmp_path)
    assert empty["trials"] == 0 and "no runs" in (tmp_path / "reports" / "nothing" / "report.md").read_text()


def test_ablation_report_ranks_by_excess_and_sits_beside_the_papers_rows(tmp_path):
    """Rows of the paper's table: each trial's test NLL, floor and excess next to the paper's row,
    and the best trial is the one with the least excess over its floor (not the least val NLL)."""
    rows = [
        ("baseline", "baseline", "rmb", True, 60.0, 20.0),
        ("rmb", "pixelcnn", "rmb", False, 30.0, 20.0),
        ("rmb_dilated", "pixelcnn", "rmb", True, 26.0, 20.0),
        ("relu", "pixelcnn", "relu", False, 29.0, 20.0),
        ("relu_dilated", "pixelcnn", "relu", True, 27.5, 18.0),  # lowest test NLL but not least excess
    ]
    trials, curves = [], []
    for k, (name, decoder, block, dilation, test, floor) in enumerate(rows):
        trials.append(
            {
                "run_id": f"r{k}",
                "trial": name,
                "row": name,
                "point": k,
                "sweep": "abl",
                "profile": "cpu",
                "status": "FINISHED",
                "error": None,
                "preset": None,
                "enc_blocks": 4,
                "dec_blocks": 3,
                "filter_fraction": 0.0625,
                "decoder": decoder,
                "block": block,
                "dilation": dilation,
                "parameters": 1000,
                "flops_per_frame": 10**6,
                "steps": 500,
                "step_budget": 500,
                "batch_size": 8,
                "seq_len": 6,
                "context": 3,
                "frame_height": 16,
                "frame_width": 16,
                "data": "stream",
                "steps_per_second": 5.0,
                "test_nats_per_frame": test,
                "test_floor_nats_per_frame": floor,
                "test_excess_nats_per_frame": test - floor,
                "test_sequences_scored": 1000,
                "converged_step": None,
                "checkpoint": None,
            }
        )
        for step in range(10, 110, 10):
            curves.append((f"r{k}", step, test + 100 / step, test + 1 + 100 / step if step % 50 == 0 else np.nan, 5.0))
    write_tables(tmp_path, "abl", trials, curves)
    metrics = build_report("abl", ReportParams(sweeps=("abl",)), tmp_path)
    out = tmp_path / "reports" / "abl"
    with Image.open(out / "ablation.png") as image:
        image.verify()
    assert metrics["best_config"].startswith("rmb_dilated")  # excess 6.0, the least
    assert metrics["best_excess_nats_per_frame"] == pytest.approx(6.0)
    assert metrics["rows"]["baseline"] == {
        "test_nats_per_frame": 60.0,
        "floor": 20.0,
        "excess": 40.0,
        "paper_nats_per_frame": 110.1,
        "excess_nats_per_pixel": pytest.approx(40.0 / 256),  # 16x16 grey frames
        "paper_excess_nats_per_pixel": pytest.approx((110.1 - 86.3) / 4096),  # the paper's 64x64
    }
    assert metrics["best_excess_nats_per_pixel"] == pytest.approx(6.0 / 256)
    # the paper's gap beside ours per pixel, and what holds there (the sign), never a match in nats/frame
    gap = metrics["finding"]["baseline_gap"]
    assert gap["nats_per_frame"] == pytest.approx(40.0 - 6.0) and gap["pixels"] == 256
    assert gap["nats_per_pixel"] == pytest.approx(34.0 / 256) and gap["paper_nats_per_pixel"] == pytest.approx(
        22.5 / 4096
    )
    assert gap["same_sign_as_paper"] is True
    assert metrics["rows"]["relu_dilated"]["paper_nats_per_frame"] == 87.7
    text = (out / "report.md").read_text()
    table = text.split("## The paper's rows")[1]
    assert (
        "16x16 frames" in table and "4,000 training sequences (streamed)" in table and "1,000 test sequences" in table
    )
    line = next(x for x in table.splitlines() if x.startswith("| rmb_dilated |"))
    assert "VPN, RMB, dilation" in line and "| 26 | 20 | 6 | 87.6 | 1.3 | 0.02344 | 0.0003174 |" in line
    finding = table.split("### The paper's finding")[1]
    assert "+0.133 nats/pixel" in finding and "+0.00549 nats/pixel" in finding and "the paper's sign" in finding
    assert "do not compare across sizes" in table and "compares across frame sizes" not in text
    # the table of every trial is sorted by excess
    every = text.split("## Every trial")[1]
    order = [name for name, *_ in rows if f"| {name} (" in every]
    positions = sorted(order, key=lambda n: every.index(f"| {n} ("))
    assert positions == ["rmb_dilated", "relu", "relu_dilated", "rmb", "baseline"]


@pytest.mark.slow
def test_report_html_in_a_real_browser(tmp_path):
    """report.html opened in headless Chromium (Debian's package; .ci/run installs it): every image
    loads, the tables render, and the page logs no console error. A page with a missing image is
    opened too, so a check that could never fail does not pass."""
    import os

    from cdp import Chromium, find_chromium

    executable = find_chromium()
    if executable is None:
        message = "no Chromium on PATH (Debian: apt-get install chromium; or set VPN_CHROMIUM)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # CI installs it: missing there is a failure, not a skip
        pytest.skip(message)
    trials, curves = synthetic(n_failed=1)
    write_tables(tmp_path, "demo", with_forecasts(trials), curves)
    build_report("demo", ReportParams(sweeps=("demo",)), tmp_path)
    report = tmp_path / "reports" / "demo" / "report.html"
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!doctype html><html><body><img src='missing.png'><table><tr><td>x</td></tr></table></body></html>"
    )

    # a searched sweep with two seeds a draw: its own figures (tests/test_report_stats.py's table)
    from test_report_stats import searched_table

    table = searched_table(n=6, seeds=2)
    searched_curves = [(r, step, 100.0 - step / 10, 99.0, 5.0) for r in table["run_id"] for step in (10, 200)]
    write_tables(tmp_path, "search", table.to_dict("records"), searched_curves)
    build_report("search", ReportParams(sweeps=("search",)), tmp_path)

    with Chromium(executable) as browser:
        page = browser.open(report.as_uri())
        searched = browser.open((tmp_path / "reports" / "search" / "report.html").as_uri())
        control = browser.open(broken.as_uri())

    names = {i["src"].rsplit("/", 1)[-1] for i in page.images}
    assert names >= {"curves.png", "converge_heatmaps.png", "pareto.png", "speed.png", "forecast.png"}, page.images
    assert all(i["complete"] and i["width"] > 0 for i in page.images), page.images
    # the free-running scores of the 7 finished trials, OpenSTL's 9 published rows, every trial
    assert [t["rows"] for t in page.tables] == [1 + 7, 1 + 9, 1 + len(trials)], page.tables
    assert page.tables[2]["columns"] >= 10 and all(t["height"] > 0 for t in page.tables)
    assert page.errors == []
    names = {i["src"].rsplit("/", 1)[-1] for i in searched.images}
    assert names >= {"parallel.png", "importance.png", "compute.png"}, searched.images
    assert all(i["complete"] and i["width"] > 0 for i in searched.images), searched.images
    # the seeds' intervals (6 configs), the importances (3 axes), every trial
    assert [t["rows"] for t in searched.tables] == [1 + 6, 1 + 3, 1 + 12], searched.tables
    assert searched.errors == []
    # the control page: the missing image is seen as such, with the console error the browser logged
    assert control.images == [{"src": "missing.png", "complete": True, "width": 0}]
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in control.errors), control.errors


def test_one_ranking_for_the_results_the_report_and_the_decoder_comparison():
    """pipeline.sweep.record.results' ranking, each rule on a small table: the least test excess where any
    trial has one (trials without one left out), else the least of the fallback column; the excess
    is skipped where the caller says so (overfit mode); None where no trial has a value."""
    from pipeline.report.decoders import with_score
    from pipeline.sweep.record.results import EXCESS, best_trial, rank_column, summary

    trials = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "trial": ["ta", "tb", "tc", "td"],
            "status": ["FINISHED"] * 4,
            "preset": [None] * 4,
            "test_nats_per_frame": [np.nan, 25.0, 23.0, np.nan],
            "test_floor_nats_per_frame": [np.nan, 20.0, 20.0, np.nan],
            EXCESS: [np.nan, 5.0, 3.0, np.nan],  # d has no excess, though the least val NLL
            "best_val_nats_per_frame": [9.0, 8.0, 7.0, 1.0],
            "best_train_nats_per_frame": [2.0, 4.0, 6.0, np.nan],
            "final_nll": [9.5, 8.5, 7.5, 1.5],
        }
    )
    assert rank_column(trials, "best_val_nats_per_frame") == EXCESS
    assert best_trial(trials, "best_val_nats_per_frame")["run_id"] == "c"
    # no trial scored on the test split (a NaN column, or none): the fallback
    no_excess = trials.assign(**{EXCESS: np.nan})
    assert rank_column(no_excess, "best_val_nats_per_frame") == "best_val_nats_per_frame"
    assert best_trial(no_excess, "best_val_nats_per_frame")["run_id"] == "d"
    assert best_trial(trials.drop(columns=[EXCESS]), "final_nll")["run_id"] == "d"
    # by_excess=False (overfit mode): the fallback even where an excess exists; NaNs left out
    assert rank_column(trials, "best_train_nats_per_frame", by_excess=False) == "best_train_nats_per_frame"
    assert best_trial(trials, "best_train_nats_per_frame", by_excess=False)["run_id"] == "a"
    # nothing to rank by
    assert best_trial(no_excess.assign(final_nll=np.nan), "final_nll") is None
    assert best_trial(trials.iloc[:0], "final_nll") is None
    # the three callers: results' metrics.json, the decoder comparison's score
    assert summary(trials, "s", "cpu", "s-cpu-0", "train")["best"]["run_id"] == "c"
    assert summary(trials, "s", "cpu", "s-cpu-0", "overfit")["best"]["run_id"] == "a"
    assert summary(no_excess, "s", "cpu", "s-cpu-0", "train")["best"]["run_id"] == "d"
    scored, name = with_score(trials)
    assert name == "test NLL" and scored["score"].equals(trials[EXCESS])
    scored, name = with_score(no_excess)
    assert name == "final NLL" and scored["score"].equals(trials["final_nll"])
