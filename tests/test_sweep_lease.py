"""One driver per sweep, starting over, orphaned runs and a sweep continued under new code (issue 28,
items 1, 5 and 6), against a real `mlflow server` and a real local Ray shared by the module.

The lease itself first (no Ray): exactly one of several drivers racing for it wins, a second is refused
naming the holder, a killed holder's lease lapses, --take-over stops the holder. Then real sweeps: two
drivers at once, the second started while the first trains; runs that hold metrics never deleted and
started over only on request; a searched sweep's run left SCHEDULED by a crash; an interrupted sweep
resumed under edited code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import environ, running_local_ray, running_mlflow_server, write_splits

from pipeline.sweep.cluster import lease as leases
from pipeline.sweep.cluster.claim import Claiming
from pipeline.sweep.driver import QUIET_ENV, run_sweep
from pipeline.sweep.record import lineage, tracking
from pipeline.sweep.record.parent import TAG_PARENT_OF, trial_runs
from pipeline.sweep.spec import identity
from pipeline.sweep.spec.data_check import SweepDataError, check_data
from pipeline.sweep.spec.sweep import load_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
]

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"batch_size": 2, "seq_len": 6, "context": 3, "log_every": 5, "val_every": 10, "val_batches": 1,
         "ckpt_every": 10, "device": "cpu", "forecast_samples": 0, "test_sequences": 2}  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny data, an `mlflow server` and a local Ray for the module; yields their locations."""
    root = tmp_path_factory.mktemp("lease")
    data = write_splits(root / "data", {"train": 8, "val": 4, "test": 4})
    with (
        running_mlflow_server(root) as uri,
        environ({**QUIET_ENV, "MLFLOW_TRACKING_URI": uri}),
        running_local_ray() as address,
    ):
        yield {"root": root, "data": data, "uri": uri, "address": address}


def make_spec(env, name: str, search: dict, train: dict | None = None, run: dict | None = None) -> Path:
    spec = {
        "name": name,
        "data": str(env["data"]),
        "model": {"output": "bernoulli", "enc_blocks": 1, "dec_blocks": 1, "filter_fraction": 0.03125},
        "train": {**TRAIN, **(train or {})},
        "search": search,
        "run": {"cpus_per_trial": 1, "max_failures": 1, "sample_frames": 0, "system_metrics": False, **(run or {})},
        "profiles": {"cpu": {}},
    }
    path = env["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep(env, path: Path, **options):
    """The spec's cpu profile, in this process; no tables (nor the registry's minutes of logging a model)."""
    return run_sweep(load_spec(path), "cpu", storage=str(env["root"] / "ray"), write_tables=False, **options)


def every_run(client, name: str):
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)


def steps_of(client, run_id: str, key: str = tracking.TRAIN_KEY) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def when(path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


# -- the lease alone ------------------------------------------------------------------------------------
def test_one_of_racing_drivers_wins_a_second_is_refused_and_a_dead_ones_lease_lapses(env, monkeypatch):
    monkeypatch.setenv(leases.LAPSE_ENV, "6")  # heartbeats every 0.6 s
    client = tracking.client(env["uri"])
    outcomes: list[object] = []

    def race() -> None:
        try:
            outcomes.append(leases.Lease.acquire(client, "race-cpu-0"))
        except leases.LeaseHeld as e:
            outcomes.append(e)

    racers = [threading.Thread(target=race) for _ in range(4)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    (winner,) = [o for o in outcomes if isinstance(o, leases.Lease)]  # the store's unique names decide
    refusals = [str(o) for o in outcomes if isinstance(o, leases.LeaseHeld)]
    assert len(refusals) == 3
    for text in refusals:  # one sentence: the holder and how to take over
        assert f"pid {os.getpid()} on {socket.gethostname()}" in text and "since" in text and "UTC" in text
        assert "--take-over" in text and "lapses 6 s after its last heartbeat" in text
    time.sleep(2)  # heartbeats keep it live
    with pytest.raises(leases.LeaseHeld):
        leases.Lease.acquire(client, "race-cpu-0")

    # Killed: its heartbeats stop, the lease is not released. The next driver waits for it to lapse.
    winner._stop.set()
    winner._thread.join()
    time.sleep(1.5)  # more than two heartbeats missed: a driver started now waits instead of refusing
    start = time.monotonic()
    second = leases.Lease.acquire(client, "race-cpu-0")
    assert 2 < time.monotonic() - start < 20
    assert second.holder.generation == winner.holder.generation + 1
    assert client.get_experiment(winner.holder.experiment_id).lifecycle_stage == "deleted"

    # --take-over from a live holder: the holder stops at its next heartbeat and then writes nothing.
    stopped = threading.Event()
    second._on_lost = stopped.set
    third = leases.Lease.acquire(client, "race-cpu-0", take_over=True)
    assert stopped.wait(10)
    with pytest.raises(leases.LeaseLost, match="taken over by pid"):
        second.ensure_held()
    second.release()
    third.release()
    assert all(not h.active for h in leases.holders(client, "race-cpu-0"))

    # A driver of this host whose process is gone (killed, restarted on the same node): lapsed at once.
    gone = subprocess.run(["sh", "-c", "echo $$"], check=True, capture_output=True, text=True)
    now = str(int(time.time() * 1000))
    tags = {leases.TAG_HOST: socket.gethostname(), leases.TAG_PID: gone.stdout.strip(), leases.TAG_SINCE: now,
            leases.TAG_BEAT: now, leases.TAG_LAPSE: "600"}  # fmt: skip
    client.create_experiment(leases.lease_name("gone-cpu-0", 0), tags=tags)
    start = time.monotonic()
    leases.Lease.acquire(client, "gone-cpu-0").release()
    assert time.monotonic() - start < 10


# -- two drivers of one sweep at once; runs with metrics never deleted, starting over explicit ---------
def test_a_second_driver_is_refused_naming_the_holder_and_trained_runs_start_over_only_on_request(env):
    path = make_spec(env, "twice", {"model": {"enc_blocks": [1, 2]}}, {"steps": 10}, run={"max_concurrent": 1})
    marker, release = env["root"] / "twice.marker", env["root"] / "twice.release"
    second: dict[str, object] = {}

    def second_driver() -> None:  # started while the first trains (its first trial held at step 5)
        when(marker)
        out = str(env["root"] / "results" / "second")
        cmd = [sys.executable, "-m", "pipeline.sweep", str(path), "--profile", "cpu",
               "--storage", str(env["root"] / "ray"), "--results-dir", out]  # fmt: skip
        try:
            done = subprocess.run(
                cmd, check=False, cwd=REPO, env={**os.environ, "RAY_ADDRESS": env["address"]},
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            second.update(rc=done.returncode, out=done.stdout + done.stderr)
        finally:
            release.touch()

    thread = threading.Thread(target=second_driver)
    thread.start()
    try:
        outcome = sweep(env, path, fault={"hold_at_step": 5, "marker": str(marker), "release": str(release)})
    finally:
        release.touch()
        thread.join()
    assert second["rc"] == 2, second["out"][-3000:]
    refusal = [line for line in second["out"].splitlines() if "already driven by" in line]
    assert refusal and f"pid {os.getpid()} on {socket.gethostname()}" in refusal[0], second["out"][-3000:]
    assert "--take-over" in refusal[0]
    assert not (env["root"] / "results" / "second").exists()  # nothing written by the second

    assert outcome.statuses == {"e1": "FINISHED", "e2": "FINISHED"} and not outcome.interrupted
    client = tracking.client(env["uri"])
    runs = every_run(client, "twice")
    trials = trial_runs(runs)
    assert sorted(r.info.run_name for r in trials) == ["e1", "e2"]  # each trial once, deleted runs included
    assert len(runs) == 3  # and one parent
    for r in trials:
        assert r.info.lifecycle_stage == "active" and r.info.status == "FINISHED"
        assert steps_of(client, r.info.run_id) == [5, 10], r.info.run_name  # each step once
    assert all(not h.active for h in leases.holders(client, outcome.sweep_id))  # released at the end

    # Runs that hold metrics are never deleted: without their Ray folder (another machine's storage,
    # say) a driver refuses them, creating and deleting nothing ...
    ray_folder = Path(outcome.experiment_path)
    ray_folder.rename(ray_folder.with_name("elsewhere"))
    held = sorted((r.info.run_id, r.info.lifecycle_stage) for r in every_run(client, "twice"))
    with pytest.raises(SweepDataError, match="trained run.*--start-over"):
        sweep(env, path)
    assert sorted((r.info.run_id, r.info.lifecycle_stage) for r in every_run(client, "twice")) == held
    # ... and --start-over archives them (kept, with their metrics) and sets Ray's folder aside.
    ray_folder.with_name("elsewhere").rename(ray_folder)
    again = sweep(env, path, claiming=Claiming(start_over=True))
    assert again.sweep_id == outcome.sweep_id and again.statuses == {"e1": "FINISHED", "e2": "FINISHED"}
    runs = every_run(client, "twice")
    assert len(runs) == 6 and all(r.info.lifecycle_stage == "active" for r in runs)  # two parents, four trials
    for old in trials:
        tags = client.get_run(old.info.run_id).data.tags
        assert tags[tracking.TAG_SWEEP_ID].startswith(f"{outcome.sweep_id}~archived-")
        assert steps_of(client, old.info.run_id) == [5, 10]
    assert list(ray_folder.parent.glob(f"{ray_folder.name}.archived-*"))
    new = [r for r in trial_runs(runs) if r.data.tags[tracking.TAG_SWEEP_ID] == outcome.sweep_id]
    assert sorted(r.info.run_name for r in new) == ["e1", "e2"]
    assert all(steps_of(client, r.info.run_id) == [5, 10] for r in new)


# -- a searched run made just before a crash ----------------------------------------------------------
def test_a_searched_run_no_trial_will_open_does_not_leave_the_sweep_interrupted(env):
    path = make_spec(
        env, "orphan", {"algorithm": "random", "seed": 1, "train": {"lr": {"loguniform": [1e-4, 1e-2]}}},
        {"steps": 10}, run={"num_samples": 1, "max_failures": 0},
    )  # fmt: skip
    first = sweep(env, path)
    assert not first.interrupted
    client = tracking.client(env["uri"])
    before = {r.info.run_id: r for r in trial_runs(every_run(client, "orphan"))}
    parent = next(r for r in every_run(client, "orphan") if TAG_PARENT_OF in r.data.tags)
    # What SearchedRuns made for a trial that a crash then took before Tune saved it: a SCHEDULED run
    # under the parent, keyed by a Ray trial id that Tune's state never held.
    tags = {**next(iter(before.values())).data.tags, tracking.TAG_TRIAL_ID: "lost_00009"}
    del tags["mlflow.runName"]
    orphan = tracking.create_run(client, first.experiment_id, "t009-lost", {}, tags)
    assert client.get_run(orphan).info.status == "SCHEDULED" and tags[tracking.TAG_PARENT] == parent.info.run_id

    resumed = sweep(env, path)  # the rerun after the crash
    assert not resumed.interrupted and set(resumed.statuses.values()) == {"FINISHED"}
    assert client.get_run(orphan).info.lifecycle_stage == "deleted"
    after = {r.info.run_id: r for r in trial_runs(every_run(client, "orphan")) if r.info.lifecycle_stage == "active"}
    assert after.keys() == before.keys()
    assert all(after[k].info.end_time == before[k].info.end_time for k in after)  # nothing else touched
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


# -- an interrupted sweep continued under edited code -------------------------------------------------
def test_an_interrupted_sweep_continues_under_new_code_only_on_request(env, monkeypatch, caplog):
    path = make_spec(
        env, "edited", {"model": {"enc_blocks": [1, 2]}}, {"steps": 10, "ckpt_every": 5, "val_every": 5},
        run={"max_concurrent": 1},
    )  # fmt: skip
    marker = env["root"] / "edited.marker"

    def interrupt() -> None:  # Ctrl+C once the first trial is held at step 10 (checkpointed at 5)
        when(marker)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt)
    thread.start()
    first = sweep(env, path, fault={"hold_at_step": 10, "marker": str(marker), "hold_s": 120})
    thread.join()
    assert first.interrupted and first.statuses == {"e1": "RUNNING", "e2": "SCHEDULED"}  # as it stopped

    # A typo fixed in a module a trial imports: another sweep id for the same spec, profile and data.
    edited = "pipeline/sweep/record/tracking.py"
    real = identity.code_digests
    monkeypatch.setattr(identity, "code_digests", lambda root=None: {**real(root), edited: "0" * 64})
    client = tracking.client(env["uri"])
    exp = client.get_experiment_by_name("edited")
    parent = next(r for r in every_run(client, "edited") if TAG_PARENT_OF in r.data.tags)
    base = parent.data.tags[lineage.TAG_BASE]
    resolved = load_spec(path).resolve("cpu")
    computed = identity.sweep_id_of(resolved, check_data(resolved)["identity"])
    assert computed != first.sweep_id
    with caplog.at_level("WARNING"):
        choice = lineage.choose_sweep(client, exp.experiment_id, base, computed, identity.code_digests(), False)
    assert choice.sweep_id == computed and choice.differ == (edited,)  # without the flag: a new sweep
    assert first.sweep_id in caplog.text and edited in caplog.text and lineage.CONTINUE_FLAG in caplog.text

    # With the flag: the same sweep goes on under the new code, each step once.
    resumed = sweep(env, path, claiming=Claiming(continue_under_new_code=True))
    assert resumed.sweep_id == first.sweep_id and not resumed.interrupted
    assert resumed.statuses == {"e1": "FINISHED", "e2": "FINISHED"}
    runs = {r.info.run_name: r for r in trial_runs(every_run(client, "edited"))}
    assert len(runs) == 2
    versions = {k: json.loads(r.data.tags[lineage.TAG_CODE_VERSIONS]) for k, r in runs.items()}
    new = json.loads(client.get_run(parent.info.run_id).data.tags[lineage.TAG_CODE_VERSION])
    assert len(versions["e1"]) == 2 and versions["e1"][-1] == new and versions["e1"][0]["code"] != new["code"]
    assert versions["e2"] == [new]  # it trained only under the new code
    for r in runs.values():
        assert steps_of(client, r.info.run_id) == [5, 10], r.info.run_name
    # Rerunning the new code now resumes that sweep, without the flag.
    again = lineage.choose_sweep(client, exp.experiment_id, base, computed, identity.code_digests(), False)
    assert again.sweep_id == first.sweep_id and again.continued
