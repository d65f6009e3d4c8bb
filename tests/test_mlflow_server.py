"""The cluster path: trials log to an `mlflow server` (here on loopback) through MLFLOW_TRACKING_URI,
artifacts included (proxied by the server), exactly as they would to the server on a head node."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.sweep import tracking
from pipeline.sweep.driver import QUIET_ENV, run_sweep
from pipeline.sweep.spec import load_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),  # inside MLflow's SQL store
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """A local Ray for this module (unless one is already up)."""
    os.environ.update(QUIET_ENV)
    import ray

    started = not ray.is_initialized()
    if started:
        # "local": a Ray of its own, even where another runs on the machine (a `ray start`, a test)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture()
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts; yields its URI."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server_artifacts"), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its workers share its process group
        env={**os.environ, **QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_trial_logs_to_a_tracking_server(tmp_path, mlflow_server, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("val", 4), ("test", 2)):  # train mode scores the test split at the end
        np.save(data / f"{split}.npy", (rng.random((n, 5, 1, 8, 8)) < 0.3).astype(np.uint8) * 255)
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
    (run,) = client.search_runs([exp.experiment_id])
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
