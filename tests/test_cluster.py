"""A sweep on a real multi-node Ray cluster survives losing a node; data-parallel trials survive too.

One machine plays the cluster (ray.cluster_utils.Cluster, as Ray's own tests do): a head node that
runs no training (no CPU; it offers pipeline.sweep.cluster.placement.DRIVER_RESOURCE, so the drivers of
data-parallel trials live there, as sweeps/cluster.yaml places them) and two worker nodes of one
CPU each. The sweeps run as `python -m pipeline.sweep` driver processes joining it through
RAY_ADDRESS, with storage in a local folder (shared: it is one machine) and MLflow behind an
`mlflow server` on loopback, as on a real cluster. Trials pause at a known step (the `hold_at_step`
test hook) so that the node under them can be killed mid-trial (`remove_node(allow_graceful=False)`);
a replacement node joins, and the trial must resume from its last checkpoint into the same MLflow
run, every step logged once, ending on the uninterrupted run's numbers.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import environ, free_port, running_mlflow_server, write_splits

from pipeline.sweep.cluster.placement import DRIVER_RESOURCE
from pipeline.sweep.driver import QUIET_ENV
from pipeline.sweep.record import tracking
from vpn.config import TrainConfig, VPNConfig
from vpn.data import MovingMNIST
from vpn.train import Trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),  # inside MLflow's SQL store
]

REPO = Path(__file__).resolve().parents[1]
MODEL = {"output": "bernoulli", "dec_blocks": 1, "filter_fraction": 0.03125}
TRAIN = {"steps": 40, "batch_size": 4, "log_every": 5, "val_every": 10, "val_batches": 1, "ckpt_every": 10,
         "context": 3, "device": "cpu", "test_sequences": 4}  # fmt: skip
# Node deaths noticed in about 3 s instead of Ray's default of 30 or more.
FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Data, an `mlflow server` on loopback and a 3-node Ray cluster; yields their handles."""
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("cluster")
    data = write_splits(root / "data", {"train": 16, "val": 8, "test": 4})
    gcs_port = free_port()
    # Ray's worker processes start from the nodes' environment: they import this checkout, and they
    # find this cluster by RAY_ADDRESS even when other Ray instances run on the machine (Ray Train's
    # PlacementGroupCleaner, on the head, asks the State API whether a driver is gone).
    env = {
        **QUIET_ENV,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "RAY_ADDRESS": f"{get_node_ip_address()}:{gcs_port}",
    }
    with environ(env), running_mlflow_server(root) as uri:
        ray_cluster = None
        try:
            ray_cluster = Cluster(
                initialize_head=True,
                # The dashboard serves the State API that Ray Train needs to release a dead driver's workers.
                head_node_args={"num_cpus": 0, "resources": {DRIVER_RESOURCE: 1}, "gcs_server_port": gcs_port,
                                "include_dashboard": True, "dashboard_port": free_port(),
                                "_system_config": FAST_FAILURE_DETECTION},
            )  # fmt: skip
            for _ in range(2):
                ray_cluster.add_node(num_cpus=1)
            yield {"root": root, "data": data, "uri": uri, "ray": ray_cluster}
        finally:
            if ray_cluster is not None:
                ray_cluster.shutdown()


def write_spec(cluster, name: str, search: dict, run: dict) -> Path:
    spec = {"name": name, "data": str(cluster["data"]), "model": MODEL, "train": TRAIN, "search": search,
            "run": {"cpus_per_trial": 1, "max_failures": 1, **run}, "profiles": {"cpu": {}}}  # fmt: skip
    path = cluster["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def start_sweep(cluster, spec: Path, fault: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """`python -m pipeline.sweep` as a driver process joining the cluster (fault: the test hook, as JSON)."""
    log = cluster["root"] / f"{spec.stem}.log"
    code = (
        "import json, sys; from pipeline.sweep.driver import run_sweep; "
        "from pipeline.sweep.spec.sweep import load_spec; "
        "o = run_sweep(load_spec(sys.argv[1]), 'cpu', storage=sys.argv[2], fault=json.loads(sys.argv[3]) or None, "
        "write_tables=False); sys.exit(130 if o.interrupted else 0)"
    )
    env = {**os.environ, "RAY_ADDRESS": cluster["ray"].address, "MLFLOW_TRACKING_URI": cluster["uri"]}
    assert env["RAY_ADDRESS"] == os.environ["RAY_ADDRESS"]
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", code, str(spec), str(cluster["root"] / "ray"), json.dumps(fault or {})],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return driver, log


def wait_for(what: str, check, driver: subprocess.Popen, log: Path, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if driver.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.25)
    driver.kill()
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def marker_note(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def kill_node_of(cluster, node_id: str) -> None:
    """Kill the worker node with this id, processes and all, and add a fresh one in its place."""
    (node,) = [n for n in cluster["ray"].worker_nodes if n.node_id == node_id]
    cluster["ray"].remove_node(node, allow_graceful=False)
    cluster["ray"].add_node(num_cpus=1)


def finish(driver: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    """The sweep's exit, 0. The timeouts here are for hangs only: the 2-worker faults sweep took 164 s
    beside the rest of the suite on 2 cores, and over 300 s in a run whose every process compiled its
    imports from source (.ci/run), which is slow, not broken."""
    try:
        assert driver.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()


def runs_of(client, name: str) -> dict:
    """Every trial's run of the experiment, deleted ones included, by label: one run per trial means no
    other (but the sweep's parent run, which every trial's run is nested under)."""
    from mlflow.entities import ViewType

    from pipeline.sweep.record.parent import TAG_PARENT, TAG_PARENT_OF, trial_runs

    exp = client.get_experiment_by_name(name)
    every = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    runs = trial_runs(every)
    parents = {r.info.run_id for r in every if TAG_PARENT_OF in r.data.tags}
    assert len(parents) == 1 and {r.data.tags.get(TAG_PARENT) for r in runs} == parents, parents
    labels = [r.info.run_name for r in runs]
    assert len(labels) == len(set(labels)), labels
    return {r.info.run_name: r for r in runs}


def curve(client, run_id: str, key: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {sorted(steps)}"
    return {m.step: m.value for m in history}


def uninterrupted(data: Path, enc_blocks: int, **train) -> tuple[dict[int, dict[str, float]], float]:
    """The same trial's curve and final test score, trained in this process without interruption
    (one thread, as the trials run: the CPU trainer is deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig.from_dict({**TRAIN, **train})
        trainer = Trainer(
            VPNConfig(enc_blocks=enc_blocks, **MODEL), cfg, MovingMNIST(data, "train"), MovingMNIST(data, "val")
        )
        logged: dict[int, dict[str, float]] = {}
        trainer.fit(on_log=lambda step, m: logged.__setitem__(step, m), progress=False)
        return logged, trainer.score(MovingMNIST(data, "test"), cfg.test_sequences).nats_per_frame
    finally:
        torch.set_num_threads(threads)


def assert_whole_curve(client, run, reference: dict[int, dict[str, float]], test_nll: float, rel: float) -> None:
    """Every step once, no gap, and the uninterrupted run's values; the same final test NLL."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    for key in (tracking.TRAIN_KEY, tracking.VAL_KEY):
        logged = curve(client, run_id, key)
        assert logged == pytest.approx({s: m[key] for s, m in reference.items() if key in m}, rel=rel), key
    assert sorted(curve(client, run_id, tracking.SPEED_KEY)) == list(range(5, 41, 5))
    assert run.data.metrics[tracking.TEST_KEY] == pytest.approx(test_nll, rel=rel)


def test_sweep_survives_a_lost_node(cluster):
    """One-worker trials: the node under a trial dies at step 25; the trial resumes from step 20."""
    spec = write_spec(cluster, "lost_node", {"model": {"enc_blocks": [1, 2]}}, {})
    marker, registered = cluster["root"] / "lost_node.marker", cluster["root"] / "lost_node.checkpoints"
    fault = {"hold_at_step": 25, "marker": str(marker), "checkpoint_marker": str(registered)}
    driver, log = start_sweep(cluster, spec, fault)
    note = wait_for("a trial to reach step 25", lambda: marker_note(marker), driver, log)

    def step_20_registered() -> bool:  # by both trials: the held one's is among them
        lines = registered.read_text().splitlines() if registered.exists() else []
        return len({n["trial"] for n in map(json.loads, lines) if n["step"] == 20}) == 2

    # The step-20 report reaches Tune before its checkpoint is registered (a separate `save` call):
    # killed in between, the trial would resume from step 10.
    wait_for("Tune to register both trials' step-20 checkpoints", step_20_registered, driver, log)
    kill_node_of(cluster, note["node_id"])
    finish(driver, log)

    client = tracking.client(cluster["uri"])
    runs = runs_of(client, "lost_node")
    assert sorted(runs) == ["e1", "e2"]
    resumed = [label for label, r in runs.items() if tracking.TAG_RESUMED_FROM in r.data.tags]
    assert len(resumed) == 1, resumed  # the one whose node was killed, from its last checkpoint
    assert runs[resumed[0]].data.tags[tracking.TAG_RESUMED_FROM] == "20"
    for label, run in runs.items():
        reference, test_nll = uninterrupted(cluster["data"], int(label[1:]))
        assert_whole_curve(client, run, reference, test_nll, rel=1e-6)


def test_data_parallel_trial_survives_a_lost_node(cluster):
    """Two workers, one per node: rank 1's node dies at step 25; Ray Train restarts both workers
    (on the replacement node) from step 20, and the curve is the one-worker run's."""
    spec = write_spec(cluster, "ddp_lost_node", {"model": {"enc_blocks": [1]}}, {"workers_per_trial": 2})
    marker = cluster["root"] / "ddp_lost_node.marker"
    driver, log = start_sweep(cluster, spec, {"hold_at_step": 25, "rank": 1, "marker": str(marker)})
    note = wait_for("rank 1 to reach step 25", lambda: marker_note(marker), driver, log)

    def step_20_registered() -> bool:  # Ray Train registers a reported checkpoint when it polls the workers
        snapshots = glob.glob(
            str(cluster["root"] / "ray" / "ddp_lost_node-*" / "*" / "train" / "checkpoint_manager_snapshot.json")
        )
        latest = json.loads(Path(snapshots[0]).read_text())["latest_checkpoint_result"] if snapshots else None
        return bool(latest) and latest["metrics"]["step"] == 20

    wait_for("the step-20 checkpoint", step_20_registered, driver, log)
    kill_node_of(cluster, note["node_id"])
    finish(driver, log)

    client = tracking.client(cluster["uri"])
    (run,) = runs_of(client, "ddp_lost_node").values()
    assert run.data.tags[tracking.TAG_WORKERS] == "2"
    assert run.data.tags[tracking.TAG_RESUMED_FROM] == "20"
    reference, test_nll = uninterrupted(cluster["data"], 1)
    assert_whole_curve(client, run, reference, test_nll, rel=1e-5)


def test_data_parallel_sweep_recovers_dead_workers_and_drivers_stops_early_and_fails_nan(cluster):
    """Two-worker trials, one at a time (the cluster holds one pair): for lr 1e-3, rank 1's process
    is killed at step 25 (Ray Train restarts the workers), then the trial's driver at step 35 (Tune
    restarts the trial, whose new TorchTrainer finds the run in storage); ASHA stops lr 1e-7 at its
    first rung; lr 1e30 reaches a NaN at step 5 and its run is FAILED, not retrained.
    Last, a trial that no placement can hold stops the sweep before it starts, naming the field."""
    asha = {"enabled": True, "grace_steps": 10, "reduction_factor": 2}
    search = {"model": {"enc_blocks": [1]}, "train": {"lr": [1e-3, 1e-7, 1e30]}}
    spec = write_spec(cluster, "ddp_faults", search, {"workers_per_trial": 2, "asha": asha})
    markers = cluster["root"] / "ddp_worker.marker", cluster["root"] / "ddp_driver.marker"
    fault = {
        "kill_at_step": 25,
        "rank": 1,
        "marker": str(markers[0]),
        "kill_driver_at_step": 35,
        "driver_marker": str(markers[1]),
    }
    driver, log = start_sweep(cluster, spec, fault)
    finish(driver, log)
    assert [m.read_text() for m in markers] == ["25", "35"]  # both were killed

    client = tracking.client(cluster["uri"])
    runs = runs_of(client, "ddp_faults")
    assert sorted(runs) == ["e1-lr=0.001", "e1-lr=1e+30", "e1-lr=1e-07"]
    good, stopped, nan = runs["e1-lr=0.001"], runs["e1-lr=1e-07"], runs["e1-lr=1e+30"]
    # Each restart resumed from a checkpoint registered before the kill (the last one, or the one
    # before it if Ray Train had not yet polled the workers); the driver's restart is the later one.
    assert good.data.tags[tracking.TAG_RESUMED_FROM] in ("20", "30")
    reference, test_nll = uninterrupted(cluster["data"], 1, lr=1e-3)
    assert_whole_curve(client, good, reference, test_nll, rel=1e-5)
    # Stopped at the first rung (step 10). Its workers run ahead of Tune by the reports in flight
    # (a step here is milliseconds), so its curve may go on a little past the rung, never to the end.
    assert stopped.info.status == "FINISHED" and stopped.data.tags[tracking.TAG_STOPPED_EARLY] == "true"
    assert stopped.data.tags["stopped_at_step"] == "10"
    logged = sorted(curve(client, stopped.info.run_id, tracking.TRAIN_KEY))
    assert logged == list(range(5, logged[-1] + 1, 5)) and 10 <= logged[-1] < 40, logged
    assert nan.info.status == "FAILED" and nan.data.tags[tracking.TAG_NON_FINITE_STEP] == "5"
    assert "non-finite" in nan.data.tags[tracking.TAG_ERROR]
    assert nan.data.metrics == {}

    # A valid spec (batch 4 splits 4 ways) that the cluster's two one-CPU workers can never hold.
    too_big = write_spec(cluster, "ddp_too_big", {"model": {"enc_blocks": [1]}}, {"workers_per_trial": 4})
    env = {**os.environ, "RAY_ADDRESS": cluster["ray"].address, "MLFLOW_TRACKING_URI": cluster["uri"]}
    command = [
        sys.executable,
        "-m",
        "pipeline.sweep",
        str(too_big),
        "--profile",
        "cpu",
        "--storage",
        str(cluster["root"] / "ray"),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "run.workers_per_trial=4 workers of {'CPU': 1.0} each (run.cpus_per_trial=1" in done.stderr
    assert "ddp_too_big" not in {e.name for e in client.search_experiments()}  # nothing was started
