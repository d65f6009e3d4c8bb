"""The cluster path: trials log to an `mlflow server` (here on loopback) through MLFLOW_TRACKING_URI,
artifacts included (proxied by the server), exactly as they would to the server on a head node."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from conftest import write_splits

from pipeline.sweep.driver import QUIET_ENV, run_sweep
from pipeline.sweep.record import tracking
from pipeline.sweep.record.parent import TAG_PARENT, TAG_PARENT_OF, trial_runs
from pipeline.sweep.spec.sweep import load_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("local_ray"),  # conftest: one local Ray for the module
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),  # inside MLflow's SQL store
]


def test_trial_logs_to_a_tracking_server(tmp_path, mlflow_server, monkeypatch):
    # train mode scores the test split at the end
    data = write_splits(tmp_path / "data", {"train": 8, "val": 4, "test": 2}, frames=5, p=0.3, seed=1)
    spec = {
        "name": "server_sweep",
        "data": str(data),
        "model": {"output": "bernoulli", "enc_blocks": 1, "dec_blocks": 1},
        "train": {"steps": 10, "batch_size": 2, "log_every": 5, "val_every": 5, "val_batches": 1, "ckpt_every": 10,
                  "context": 2, "device": "cpu"},
        "search": {"model": {"filter_fraction": [0.03125]}},
        "run": {"cpus_per_trial": 1},
        "profiles": {"cpu": {}},
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    for k, v in QUIET_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

    outcome = run_sweep(load_spec(path), "cpu", storage=str(tmp_path / "ray"), results_dir=tmp_path / "results")

    assert outcome.tracking_uri == mlflow_server
    assert outcome.statuses == {"f0.03125": "FINISHED"}
    client = tracking.client(mlflow_server)
    exp = client.get_experiment_by_name("server_sweep")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server chose and proxies it
    every = client.search_runs([exp.experiment_id])
    (run,) = trial_runs(every)
    (parent,) = [r for r in every if TAG_PARENT_OF in r.data.tags]  # the sweep's, through the server too
    assert run.data.tags[TAG_PARENT] == parent.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["sweep"] == "server_sweep" and run.data.tags["profile"] == "cpu"
    assert run.data.params["enc_blocks"] == "1" and run.data.params["filter_fraction"] == "0.03125"
    for key in tracking.CURVE_KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [5, 10], key
    # The checkpoint went through the server into its artifact store.
    assert (tmp_path / "server_artifacts").is_dir()
    local = client.download_artifacts(run.info.run_id, tracking.CHECKPOINT_ARTIFACT, str(tmp_path / "dl"))
    assert torch.load(local, weights_only=True)["step"] == 10
    trials = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    assert list(trials["run_id"]) == [run.info.run_id]
    assert trials["checkpoint_uri"].tolist() == [f"runs:/{run.info.run_id}/checkpoint/checkpoint.pt"]
