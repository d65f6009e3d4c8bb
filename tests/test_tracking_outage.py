"""A tracking server that restarts while a sweep trains (issue 28): nothing stops, nothing is lost, nothing
is logged twice.

The sweep test kills a real `mlflow server` (SIGKILL) while a 2-trial sweep trains and starts it again
on the same port and store `outage_s` seconds later. The trials train on meanwhile (their steps during
the outage carry the outage's timestamps), pause at a known step until the server is back (the
`pauses` test hook, which also holds them at step KILL_AT until the server is killed), then finish.
CI runs a 45 s outage, longer than one call's retries (record/outage.HTTP_DEFAULTS: about 3 s);
VPN_OUTAGE_S=600 runs the 10-minute one (docs/sweeps.md records the longest run).

The faster tests check the pieces against a server that is away, then started: calls that wait
(record/outage) and the outbox of a trial (record/outbox), whose pending metrics and pictures go
through a checkpoint's folder and reach the server once.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import MlflowServer, free_port, write_splits
from PIL import Image

from pipeline.sweep.driver import QUIET_ENV
from pipeline.sweep.record import outage, outbox, pictures, tracking
from pipeline.sweep.record.parent import trial_runs

REPO = Path(__file__).resolve().parents[1]
OUTAGE_ENV = "VPN_OUTAGE_S"
STEPS, KILL_AT, PAUSE_AT = 60, 15, 40
TRAIN = {"steps": STEPS, "batch_size": 4, "log_every": 5, "val_every": 10, "val_batches": 1, "ckpt_every": 20,
         "context": 3, "device": "cpu", "test_sequences": 4, "forecast_samples": 0}  # fmt: skip


def picture_steps(client, run_id: str, key: str = pictures.SAMPLES_KEY) -> list[int]:
    """The steps of a run's pictures under key, one per picture (its .png), sorted."""
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    return sorted(int(n.split("+")[2]) for n in names if n.startswith(f"{key}+step+") and n.endswith(".png"))


# -- the pieces, against a server that is away and then comes --------------------------------------
def test_a_call_gives_up_after_the_wait_naming_the_variable():
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(outage.TrackingUnavailable, match=outage.WAIT_ENV):
        tracking.client(dead, wait=1).get_experiment_by_name("x")
    assert time.monotonic() - start < 30  # MLflow's own retries are short (HTTP_DEFAULTS), not 4 minutes
    assert not outage.probe(dead)
    with pytest.raises(ValueError, match=outage.WAIT_ENV), pytest.MonkeyPatch.context() as m:
        m.setenv(outage.WAIT_ENV, "soon")
        outage.wait_s()


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_the_outbox_holds_through_an_outage_and_sends_each_step_once(tmp_path):
    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    # The driver's calls wait: this one is made before the server exists and returns once it answers.
    later = threading.Timer(2.0, server.start)
    later.start()
    try:
        client = tracking.client(server.uri, wait=300)
        experiment = tracking.ensure_experiment(client, "outbox", server.uri)
        later.join()
        run_id = client.create_run(experiment).info.run_id

        box = outbox.Outbox(client, run_id, server.uri, wait=60)
        box.add(5, {"train": 1.0})
        box.add_picture("samples", 5, Image.new("L", (24, 8), 90))
        assert box.flush() and len(box) == 0

        server.stop(signal.SIGKILL)  # a crash
        start = time.monotonic()
        box.add(10, {"train": 0.5, "val": 0.6})
        box.add_picture("samples", 10, Image.new("L", (24, 8), 200))
        assert not box.flush() and box.away  # the trial trains on
        assert not box.flush()  # within the back-off: no second failing call
        assert time.monotonic() - start < 20
        box.add(15, {"train": 0.25})
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        box.save(ckpt)  # a checkpoint during the outage holds what is pending

        server.start()
        box.add(20, {"train": 0.125})
        assert box.flush(wait=True) and not box.away
        # The trial restarted from that checkpoint: its outbox sends again what the server already has.
        held = tracking.last_logged_step(client, run_id, ["train"])
        again = outbox.Outbox(client, run_id, server.uri, after_step=held)
        again.load(ckpt)
        assert len(again) == 4  # 3 metrics, 1 picture
        assert again.flush() and len(again) == 0
        again.add(20, {"train": 0.125})  # a step the run held when the trial restarted: dropped
        assert len(again) == 0

        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train")] == [
            (5, 1.0), (10, 0.5), (15, 0.25), (20, 0.125)
        ]  # fmt: skip
        assert [m.step for m in client.get_metric_history(run_id, "val")] == [10]
        assert picture_steps(client, run_id, "samples") == [5, 10]  # sent again, the same files overwritten
        names = {Path(a.path).name for a in client.list_artifacts(run_id, "images")}
        assert len(names) == 4 and sum(n.endswith("+compressed.webp") for n in names) == 2
        assert client.get_run(run_id).data.tags[outbox.LOGGED_IMAGES_TAG] == "True"
    finally:
        later.cancel()
        server.stop()


# -- the check: a 2-trial sweep through a killed and restarted server -----------------------
def _outages() -> list:
    long = os.environ.get(OUTAGE_ENV)
    return [45, pytest.param(int(long or 600), id="long", marks=pytest.mark.skipif(not long, reason=f"{OUTAGE_ENV}"))]


def _start_sweep(root: Path, spec: Path, uri: str, fault: dict) -> tuple[subprocess.Popen, Path]:
    """The sweep's driver in a process of its own, with a Ray of its own (as `python -m pipeline.sweep`)."""
    log = root / "driver.log"
    code = (
        "import json, sys; from pipeline.sweep.driver import run_sweep; "
        "from pipeline.sweep.spec.sweep import load_spec; "
        "o = run_sweep(load_spec(sys.argv[1]), 'cpu', storage=sys.argv[2], fault=json.loads(sys.argv[3]), "
        "write_tables=False); print('STATUSES', json.dumps(dict(o.statuses)), o.sweep_id); "
        "sys.exit(130 if o.interrupted else 0)"
    )
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": "local",
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5", "PYTHONPATH": str(REPO)}  # fmt: skip
    env.pop(outage.WAIT_ENV, None)  # the default wait (30 min), longer than any outage here
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", code, str(spec), str(root / "ray"), json.dumps(fault)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return driver, log


def _until(what: str, check, driver: subprocess.Popen, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        if driver.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    driver.kill()
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
@pytest.mark.parametrize("outage_s", _outages())
def test_a_sweep_trains_through_a_tracking_server_outage(tmp_path, outage_s):
    data = write_splits(tmp_path / "data", {"train": 16, "val": 8, "test": 4})
    spec = {"name": "outage", "data": str(data), "model": {"output": "bernoulli", "dec_blocks": 1},
            "train": TRAIN, "search": {"model": {"filter_fraction": [0.03125, 0.0625]}},
            "run": {"cpus_per_trial": 1, "max_failures": 1, "sample_frames": 1}, "profiles": {"cpu": {}}}  # fmt: skip
    spec_path = tmp_path / "outage.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    killed_file, back_file = tmp_path / "server_killed", tmp_path / "server_back"

    def both_at(release: Path) -> bool:
        return len(glob.glob(f"{release}.at.*")) >= 2

    try:
        client = tracking.client(server.start(), wait=60)
        pauses = [[KILL_AT, str(killed_file)], [PAUSE_AT, str(back_file)]]
        driver, log = _start_sweep(tmp_path, spec_path, server.uri, {"pauses": pauses, "hold_s": outage_s + 900})

        _until(f"both trials at step {KILL_AT}", lambda: both_at(killed_file), driver, log, 600)
        server.stop(signal.SIGKILL)
        killed = time.time()
        killed_file.write_text("killed")
        # The trials train on: both reach the next pause while the server is away.
        _until(f"both trials at step {PAUSE_AT}", lambda: both_at(back_file), driver, log, outage_s + 600)
        time.sleep(max(0.0, killed + outage_s - time.time()))
        server.start()  # the same port and store
        back = time.time()
        back_file.write_text("back")
        assert driver.wait(timeout=900) == 0, log.read_text()[-4000:]

        out = log.read_text()
        statuses = json.loads(out.split("STATUSES ", 1)[1].split("\n")[0].rsplit(" ", 1)[0])
        assert statuses == {"f0.03125": "FINISHED", "f0.0625": "FINISHED"}, out[-4000:]
        assert back - killed >= outage_s
        exp = client.get_experiment_by_name("outage")
        runs = trial_runs(client.search_runs([exp.experiment_id]))
        assert len(runs) == 2
        log_steps, val_steps = list(range(5, STEPS + 1, 5)), list(range(10, STEPS + 1, 10))
        for run in runs:
            run_id = run.info.run_id
            assert tracking.TAG_RESUMED_FROM not in run.data.tags  # never restarted from a checkpoint
            assert tracking.TAG_ERROR not in run.data.tags
            train = client.get_metric_history(run_id, tracking.TRAIN_KEY)
            assert sorted(m.step for m in train) == log_steps  # each step once
            assert sorted(m.step for m in client.get_metric_history(run_id, tracking.VAL_KEY)) == val_steps
            # trained through the outage: every step from the kill to the pause was taken while the server was away
            during = sorted(m.step for m in train if killed * 1000 < m.timestamp < back * 1000)
            assert during == list(range(KILL_AT, PAUSE_AT, 5)), (during, killed, back)
            # a picture at every validation, once: before, during and after the outage
            assert picture_steps(client, run_id) == val_steps
            system = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
            steps = [m.step for m in system]
            assert len(steps) == len(set(steps))  # no sample twice
            stamps = [m.timestamp / 1000 for m in system]
            assert any(killed < t < back for t in stamps) and any(t > back for t in stamps)  # held, then resumed
    finally:
        server.stop()
