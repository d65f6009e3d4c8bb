"""Nothing counted twice, nothing half-written (issue 28, item 5), without Ray: atomic writes synced
before their rename, a set of tables replaced whole, `vpn train --resume` and metrics.jsonl, a trial's
final metrics after a crash between its FINISHED and Ray's checkpoint, the profiles' results folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vpn import files
from vpn.cli import main


def test_atomic_writes_sync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "out" / "table.json"
    files.write_text(target, "{}")
    assert target.read_text() == "{}"
    (kind0, synced), rename, folder = events
    assert kind0 == "fsync" and Path(synced).parent == target.parent and Path(synced).name.startswith(".table.json.")
    assert rename == ("replace", str(target))
    assert folder == ("fsync", str(target.parent))  # the rename itself made durable
    assert [p.name for p in target.parent.iterdir()] == ["table.json"]


def test_a_set_of_files_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "results" / "cpu"
    with files.atomic_dir(out) as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text("old")
    with pytest.raises(RuntimeError), files.atomic_dir(out) as tmp:
        (tmp / "a").write_text("new")
        (tmp / "b").write_text("new")
        raise RuntimeError("the third table failed")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "old", "b": "old", "c": "old"}
    with files.atomic_dir(out) as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text("new")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "new", "b": "new", "c": "new"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["cpu"]  # no temporary folder left


def test_vpn_train_resume_logs_each_step_once(tmp_path):
    data = tmp_path / "mm"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        np.save(data / f"{split}.npy", (rng.random((n, 4, 1, 8, 8)) < 0.3).astype(np.uint8) * 255)
    out = tmp_path / "run"
    common = ["--data", str(data), "--batch-size", "2", "--out", str(out), "--quiet", "--set", "log_every=1"]
    model = ["--preset", "micro", "--filter-fraction", "0.0625", "--output", "bernoulli", "--set", "context=2"]
    assert main(["train", *model, "--steps", "4", "--set", "val_every=100", *common]) == 0
    # A continuation that crashed after logging steps 5 to 7 (its last checkpoint still at step 4),
    # the last line cut short.
    log = out / "metrics.jsonl"
    with log.open("a") as f:
        f.writelines(json.dumps({"step": s, "train_nats_per_frame": 1.0}) + "\n" for s in (5, 6, 7))
        f.write('{"step": 8, "train_nats')
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--steps", "8", *common]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(r["train_nats_per_frame"] != 1.0 for r in rows)  # the crashed run's rows were trained again
    # A new run (no --resume) into the same folder starts the file over.
    assert main(["train", *model, "--steps", "2", *common]) == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (creating one costs seconds); yields (client, its folder)."""
    from pipeline.sweep.record import tracking

    root = tmp_path_factory.mktemp("store")
    return tracking.client(f"sqlite:///{root / 'mlflow.db'}"), root


def _store_with_sweeps(store, name: str, sweeps: dict[str, str]):
    """Experiment `name` with one finished run per sweep id (id -> profile); returns the client."""
    from mlflow.entities import Metric

    from pipeline.sweep.record import tracking

    client, root = store
    exp = client.create_experiment(name, artifact_location=(root / name).as_uri())
    for sweep_id, profile in sweeps.items():
        tags = {tracking.TAG_SWEEP_ID: sweep_id, tracking.TAG_PROFILE: profile, tracking.TAG_MODE: "train"}
        run = client.create_run(exp, run_name="e1", tags={**tags, tracking.TAG_LABEL: "e1"})
        for key, value in {"enc_blocks": 1, "dec_blocks": 1, "filter_fraction": 0.5, "steps": 10}.items():
            client.log_param(run.info.run_id, key, value)
        client.log_batch(
            run.info.run_id, metrics=[Metric(tracking.VAL_KEY, 3.0, 0, 10), Metric(tracking.TRAIN_KEY, 3.0, 0, 10)]
        )
        client.set_terminated(run.info.run_id, "FINISHED")
    return client


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # inside MLflow's SQL store
def test_the_profiles_of_one_spec_keep_their_own_tables_replaced_together(store, tmp_path, monkeypatch):
    import pandas as pd

    from pipeline.report.analysis import ResultsError, load_results, tables_folder
    from pipeline.sweep.record import results

    client = _store_with_sweeps(store, "spec", {"spec-cpu-1": "cpu", "spec-gpu-1": "gpu", "spec-cpu-2": "cpu"})
    monkeypatch.setattr(results, "repo_root", lambda: tmp_path)
    cpu = results.write_results(client, "spec", "cpu", "spec-cpu-1", "train")
    gpu = results.write_results(client, "spec", "gpu", "spec-gpu-1", "train")
    assert cpu != gpu
    for folder, sweep_id in ((cpu, "spec-cpu-1"), (gpu, "spec-gpu-1")):
        assert json.loads((folder / "metrics.json").read_text())["sweep_id"] == sweep_id
        assert set(pd.read_parquet(folder / "trials.parquet")["sweep_id"]) == {sweep_id}
    # the report reads one profile's tables, and asks which where there are several
    with pytest.raises(ResultsError, match="cpu, gpu; give --profile"):
        tables_folder(tmp_path / "results", "spec")
    assert set(load_results(tmp_path / "results", "spec", "gpu")[0]["run_id"]) == set(
        pd.read_parquet(gpu / "trials.parquet")["run_id"]
    )

    # A write that fails at its third table leaves the three old ones, never a mix of sweeps.
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(results, "summary", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        results.write_results(client, "spec", "cpu", "spec-cpu-2", "train")
    assert set(pd.read_parquet(cpu / "trials.parquet")["sweep_id"]) == {"spec-cpu-1"}
    assert set(pd.read_parquet(cpu / "curves.parquet")["run_id"]) == set(
        pd.read_parquet(cpu / "trials.parquet")["run_id"]
    )
    assert sorted(p.name for p in (tmp_path / "results" / "spec").iterdir()) == ["cpu", "gpu"]


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_a_trial_retried_after_its_run_finished_logs_its_final_metrics_once(store, tmp_path):
    """trainable marks the run FINISHED, then reports the final checkpoint to Ray: a crash in between
    makes Ray retry the trial, which scores and reaches the end again (here: the end, twice)."""
    from types import SimpleNamespace

    from mlflow.entities import Metric

    from pipeline.sweep.record import tracking
    from pipeline.sweep.trials import trainable
    from pipeline.sweep.trials.trial import TrialConfig
    from vpn.config import TrainConfig, VPNConfig
    from vpn.train import Trainer

    client, root = store
    exp = client.create_experiment("final", artifact_location=(root / "final").as_uri())
    run_id = tracking.create_run(client, exp, "e1", {}, {})
    frames = (np.random.default_rng(0).random((4, 4, 1, 8, 8)) < 0.3).astype(np.uint8) * 255
    model = VPNConfig(enc_blocks=1, dec_blocks=1, filter_fraction=0.03125, output="bernoulli")
    train = TrainConfig(steps=2, batch_size=2, context=2, device="cpu")
    cfg = TrialConfig(0, "e1", run_id, "train", model, train, tmp_path, client.tracking_uri, None, 0, False)
    reported = []
    tune = SimpleNamespace(report=lambda *a, **k: reported.append(a), Checkpoint=SimpleNamespace(from_directory=str))
    final = {tracking.TEST_KEY: 5.0, tracking.TEST_SEQUENCES_KEY: 4.0}
    series = [Metric("test_mse_by_frame", 0.1 * s, 0, s) for s in (1, 2)]
    for _attempt in range(2):  # the trial, then Ray's retry of it
        trainer = Trainer(model, train, frames)
        run = trainable._TrialRun.open(cfg, {})
        reporter = trainable._Reporter(cfg, trainer, run, tune, torch_frame(frames))
        reporter.log(2, {tracking.TRAIN_KEY: 1.0})
        reporter.checkpoint(2, final=True, extra=final, series=series)
    assert len(reported) == 2 and client.get_run(run_id).info.status == "FINISHED"
    for key in (tracking.TRAIN_KEY, *final):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [2], key
    assert sorted(m.step for m in client.get_metric_history(run_id, "test_mse_by_frame")) == [1, 2]


def torch_frame(frames):
    import torch

    return torch.zeros(frames.shape[2:])
