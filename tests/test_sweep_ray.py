"""Real sweeps through Ray Tune on CPU (tiny models, tiny data), checked against what MLflow holds.

One local Ray instance and one SQLite MLflow store serve the whole module (each costs seconds to
start); every test uses its own sweep name, so its own MLflow experiment.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import environ, running_local_ray, write_splits

from pipeline.sweep.driver import QUIET_ENV, run_sweep
from pipeline.sweep.record import forecasting, results, tracking
from pipeline.sweep.record.parent import TAG_PARENT, TAG_PARENT_OF, trial_runs
from pipeline.sweep.spec.sweep import load_spec
from vpn.checkpoint import load_model
from vpn.config import TrainConfig, VPNConfig
from vpn.data import MovingMNIST
from vpn.metrics import bernoulli_lower_bound
from vpn.model import VideoPixelNetwork, count_flops_per_frame
from vpn.train import Trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),  # inside MLflow's SQL store
]

REPO = Path(__file__).resolve().parents[1]
TRAIN = {
    "batch_size": 4,
    "log_every": 5,
    "val_every": 10,
    "val_batches": 1,
    "ckpt_every": 10,
    "context": 3,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny data, one MLflow store and one Ray instance for the module; yields their locations."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_splits(root / "data", {"train": 16, "val": 8, "test": 4})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # One GPU declared (none is there): lets a test see GPU requests scheduled, fractions too.
    with environ({**QUIET_ENV, "MLFLOW_TRACKING_URI": uri}), running_local_ray(num_gpus=1) as address:
        yield {"root": root, "data": data, "uri": uri, "address": address}


def make_spec(env, name: str, search: dict, train: dict | None = None, run: dict | None = None, **top) -> Path:
    spec = {
        "name": name,
        "data": str(env["data"]),
        "model": {"output": "bernoulli", "dec_blocks": 1, "filter_fraction": 0.03125},
        "train": {**TRAIN, **(train or {})},
        "search": search,
        "run": {"cpus_per_trial": 1, "max_failures": 1, **(run or {})},
        "profiles": {"cpu": {}},
        **top,  # replaces any of the above
    }
    path = env["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def steps_of(client, run_id: str, key: str) -> list[int]:
    return [s for s, _ in history(client, run_id, key)]


def every_run(client, name: str):
    """Every run of the experiment, deleted ones included: "one run per trial" means no other."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)


def all_runs(client, name: str):
    """Every trial's run of the experiment, deleted ones included: every run but the sweeps' parents."""
    return trial_runs(every_run(client, name))


def parent_of(client, name: str, runs) -> object:
    """The experiment's one parent run (every run of it is a trial's or this), with `runs` nested under it."""
    (parent,) = [r for r in every_run(client, name) if TAG_PARENT_OF in r.data.tags]
    assert {r.data.tags[TAG_PARENT] for r in runs} == {parent.info.run_id}
    return parent


# -- one full sweep: exactly what MLflow holds -------------------------------------------------------
def test_sweep_through_ray_records_every_trial_in_mlflow(env):
    spec_path = make_spec(
        env, "full_sweep", {"model": {"enc_blocks": [1, 2]}, "train": {"lr": [1e-3, 1e30]}}, {"steps": 20}
    )
    out = env["root"] / "results_full"
    outcome = run_sweep(load_spec(spec_path), "cpu", storage=str(env["root"] / "ray"), results_dir=out)

    # lr = 1e30 drives the loss to NaN at the first host sync (step 5): those trials fail, the rest finish.
    labels = ["e1-lr=0.001", "e1-lr=1e+30", "e2-lr=0.001", "e2-lr=1e+30"]
    assert outcome.statuses == dict(zip(labels, ["FINISHED", "FAILED", "FINISHED", "FAILED"]))
    assert not outcome.interrupted
    client = tracking.client(env["uri"])
    exp = client.get_experiment_by_name("full_sweep")
    assert exp.tags[tracking.EXPERIMENT_LATEST.format(profile="cpu")] == outcome.sweep_id
    runs = {r.info.run_name: r for r in all_runs(client, "full_sweep")}
    assert sorted(runs) == labels  # one run per trial, no other
    # ... all under the sweep's parent run, which holds the sweep and its outcome
    parent = parent_of(client, "full_sweep", runs.values())
    assert parent.data.tags[TAG_PARENT_OF] == outcome.sweep_id and parent.info.status == "FINISHED"
    assert parent.data.params["algorithm"] == "grid" and parent.data.params["trials"] == "4"
    assert parent.data.metrics["trials_run"] == 4
    # a CPU grid: no GPU-hour estimates on the parent (they say nothing of it)
    assert not {"est_gpu_hours_used", "est_gpu_hours_planned"} & set(parent.data.metrics)
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["sweep.json"]
    about = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep.json", str(env["root"]))).read_text())
    assert about["space"] == {"model.enc_blocks": [1, 2], "train.lr": [1e-3, 1e30]}
    assert [p["label"] for p in about["points"]] == labels

    for point, label in enumerate(labels):
        run = runs[label]
        enc, lr = (1 if label.startswith("e1") else 2), (1e-3 if "0.001" in label else 1e30)
        tags = run.data.tags
        assert {k: tags[k] for k in ("sweep", "profile", "sweep_id", "point", "label", "mode", "spec")} == {
            "sweep": "full_sweep",
            "profile": "cpu",
            "sweep_id": outcome.sweep_id,
            "point": str(point),
            "label": label,
            "mode": "train",
            "spec": str(spec_path),
        }
        model = VPNConfig(enc_blocks=enc, dec_blocks=1, filter_fraction=0.03125, output="bernoulli")
        train = TrainConfig.from_dict({**TRAIN, "steps": 20, "lr": lr})
        expected = {k: str(v) for k, v in {**model.to_dict(), **train.to_dict()}.items() if not isinstance(v, float)}
        expected.update({k: repr(v) for k, v in {**model.to_dict(), **train.to_dict()}.items() if isinstance(v, float)})
        expected.update(
            preset="None",
            row="None",
            preset_width_scale="None",
            mu_channels="4",
            lstm_channels="8",
            parameters=str(VideoPixelNetwork(model).num_parameters()),
            flops_per_frame=str(count_flops_per_frame(model, 8, 8)),
            frame_height="8",
            frame_width="8",
            mode="train",
            data_path=str(env["data"]),
            sample="0",
        )
        # what train's "auto" memory settings chose at the trial's start: on CPU, today's plain step
        expected.update({"memory.activation_checkpointing": "False", "memory.micro_batch_size": "None"})
        assert run.data.params == expected

        if lr == 1e-3:
            assert run.info.status == "FINISHED"
            assert steps_of(client, run.info.run_id, tracking.TRAIN_KEY) == [5, 10, 15, 20]
            assert steps_of(client, run.info.run_id, tracking.SPEED_KEY) == [5, 10, 15, 20]
            assert steps_of(client, run.info.run_id, tracking.VAL_KEY) == [10, 20]
            train_curve = [v for _, v in history(client, run.info.run_id, tracking.TRAIN_KEY)]
            assert all(math.isfinite(v) for v in train_curve) and train_curve[-1] < train_curve[0]
            test_keys = (tracking.TEST_KEY, tracking.TEST_FLOOR_KEY, tracking.TEST_SEQUENCES_KEY)
            logged = {k for k in run.data.metrics if not k.startswith("system/")}  # MLflow's system metrics aside
            # plus the free-running scores (TrainConfig.forecast_samples defaults to 10:
            # pipeline.sweep.record.forecasting)
            forecast_keys = {*forecasting.SCALAR_KEYS, *forecasting.BY_FRAME_KEYS}
            assert logged == {*tracking.CURVE_KEYS, *test_keys, *forecast_keys}
            assert steps_of(client, run.info.run_id, tracking.TEST_KEY) == [20]  # once, at the end
            artifact = client.download_artifacts(
                run.info.run_id, tracking.CHECKPOINT_ARTIFACT, str(env["root"] / label)
            )
            state = torch.load(artifact, weights_only=True)
            assert state["step"] == 20 and state["model_config"] == model.to_dict()
            # the test score, recomputed independently: model.nll of the final weights on the whole
            # test split (4 sequences), frames 3..5 given 0..2; the floor, the lower bound of those frames
            test = MovingMNIST(env["data"], "test")
            frames = torch.stack([test[k] for k in range(len(test))])
            with torch.no_grad():
                nll = load_model(artifact).nll(frames, context=3).double().mean()
            assert run.data.metrics[tracking.TEST_KEY] == pytest.approx(float(nll), rel=1e-5)
            floor = bernoulli_lower_bound(frames, context=3).double().mean()
            assert run.data.metrics[tracking.TEST_FLOOR_KEY] == pytest.approx(float(floor), rel=1e-6)
            assert run.data.metrics[tracking.TEST_SEQUENCES_KEY] == 4
        else:
            assert run.info.status == "FAILED"
            assert tags[tracking.TAG_NON_FINITE_STEP] == "5"
            assert "non-finite" in tags[tracking.TAG_ERROR] and "step 5" in tags[tracking.TAG_ERROR]
            assert {k for k in run.data.metrics if not k.startswith("system/")} == set()  # nothing finite was logged
            assert client.list_artifacts(run.info.run_id) == []

    # The tables, read back from MLflow.
    trials = pd.read_parquet(out / "trials.parquet")
    curves = pd.read_parquet(out / "curves.parquet")
    assert list(trials.columns) == list(results.TRIAL_COLUMNS)
    assert list(curves.columns) == list(results.CURVE_COLUMNS)
    assert list(trials["trial"]) == labels
    assert list(trials["status"]) == ["FINISHED", "FAILED", "FINISHED", "FAILED"]
    assert list(trials["enc_blocks"]) == [1, 1, 2, 2] and list(trials["steps_completed"]) == [20, 0, 20, 0]
    assert list(trials["non_finite_step"].astype("float").fillna(-1)) == [-1, 5, -1, 5]
    assert trials["preset"].isna().all()
    finished = trials[trials["status"] == "FINISHED"]
    assert finished["checkpoint_uri"].str.endswith("/checkpoint/checkpoint.pt").all()
    assert (finished["best_val_nats_per_frame"] <= finished["final_val_nats_per_frame"]).all()
    for _, row in finished.iterrows():  # the test score and its excess, as MLflow holds them
        metrics_of = runs[row["trial"]].data.metrics
        assert row["test_nats_per_frame"] == metrics_of[tracking.TEST_KEY]
        assert row["test_excess_nats_per_frame"] == pytest.approx(
            metrics_of[tracking.TEST_KEY] - metrics_of[tracking.TEST_FLOOR_KEY]
        )
    assert trials.loc[trials["status"] == "FAILED", "test_nats_per_frame"].isna().all()
    assert len(curves) == 8 and set(curves["trial"]) == {"e1-lr=0.001", "e2-lr=0.001"}
    assert curves.groupby("trial")["step"].apply(list).to_dict() == {
        l: [5, 10, 15, 20] for l in ("e1-lr=0.001", "e2-lr=0.001")
    }
    assert curves["val_nats_per_frame"].isna().tolist() == [True, False, True, False] * 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["trials"], metrics["finished"], metrics["failed"]) == (4, 2, 2)
    best = finished.loc[finished["test_excess_nats_per_frame"].idxmin()]  # ranked by the excess over the floor
    assert metrics["best"]["trial"] == best["trial"]
    assert metrics["best"]["test_excess_nats_per_frame"] == pytest.approx(best["test_excess_nats_per_frame"])
    # the parent holds the best trial's scores; the tables (and the registry's best) are the trials' alone
    assert parent.data.metrics["best_test_excess_nats_per_frame"] == pytest.approx(best["test_excess_nats_per_frame"])
    assert parent.info.run_id not in set(trials["run_id"])

    # `python -m pipeline.sweep.record.results` rebuilds the same tables from MLflow alone.
    again = env["root"] / "results_again"
    assert results.main(["full_sweep", "--out", str(again)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(again / "trials.parquet"), trials)
    pd.testing.assert_frame_equal(pd.read_parquet(again / "curves.parquet"), curves)


# -- a trial killed mid-run resumes from its checkpoint ---------------------------------------------------
def test_killed_trial_resumes_from_checkpoint_without_gap_or_duplicate(env):
    # Reports (and MLflow flushes) every 5 steps, checkpoints every 10: the worker is SIGKILLed when
    # step 20 is logged, so MLflow already holds step 15 while the last checkpoint is at step 10.
    train = {"steps": 30, "val_every": 5, "ckpt_every": 10}
    spec_path = make_spec(env, "killed", {"model": {"enc_blocks": [1]}}, train, run={"max_failures": 2})
    marker = env["root"] / "killed.marker"
    outcome = run_sweep(
        load_spec(spec_path), "cpu", storage=str(env["root"] / "ray"), results_dir=env["root"] / "results_killed",
        fault={"kill_at_step": 20, "marker": str(marker)},
    )  # fmt: skip
    assert marker.read_text() == "20"  # it was killed
    assert outcome.statuses == {"e1": "FINISHED"}
    client = tracking.client(env["uri"])
    runs = all_runs(client, "killed")
    assert len(runs) == 1  # the retry reattached to its run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_RESUMED_FROM] == "10"
    for key in (tracking.TRAIN_KEY, tracking.VAL_KEY, tracking.SPEED_KEY):
        assert steps_of(client, run.info.run_id, key) == [5, 10, 15, 20, 25, 30], key  # no gap, no duplicate

    # The curve is the uninterrupted run's: the same batches after the restore (exact resume).
    model = VPNConfig(enc_blocks=1, dec_blocks=1, filter_fraction=0.03125, output="bernoulli")
    cfg = TrainConfig.from_dict({**TRAIN, **train})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference: dict[int, dict[str, float]] = {}
        trainer = Trainer(model, cfg, MovingMNIST(env["data"], "train"), MovingMNIST(env["data"], "val"))
        trainer.fit(on_log=lambda step, m: reference.__setitem__(step, m), progress=False)
    finally:
        torch.set_num_threads(threads)
    for key in (tracking.TRAIN_KEY, tracking.VAL_KEY):
        logged = dict(history(client, run.info.run_id, key))
        assert logged == pytest.approx({s: m[key] for s, m in reference.items()}, rel=1e-5), key


# -- an interrupted sweep, restarted, finishes only what was unfinished ----------------------------------
def test_interrupted_sweep_resumes_only_unfinished_trials(env):
    spec_path = make_spec(
        env, "interrupted", {"model": {"enc_blocks": [1, 2, 3]}},
        {"steps": 400, "log_every": 10, "val_every": 50, "ckpt_every": 50},
        run={"max_concurrent": 1},
    )  # fmt: skip
    storage = env["root"] / "ray"
    log_path = env["root"] / "interrupted.log"
    client = tracking.client(env["uri"])
    # The first start: a separate driver process joining this module's Ray cluster (RAY_ADDRESS),
    # interrupted with Ctrl+C (SIGINT) once the first trial finished and the second is under way.
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipeline.sweep", str(spec_path), "--profile", "cpu", "--storage", str(storage)],
            cwd=REPO, env={**os.environ, "RAY_ADDRESS": env["address"]}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and driver.poll() is None:
                exp = client.get_experiment_by_name("interrupted")
                runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])} if exp else {}
                second = runs.get("e2")
                if (
                    runs.get("e1") is not None and runs["e1"].info.status == "FINISHED"
                    and second is not None and second.info.status == "RUNNING"
                    and steps_of(client, second.info.run_id, tracking.TRAIN_KEY)[-1:] >= [100]
                ):  # fmt: skip
                    break
                time.sleep(0.3)
            else:
                pytest.fail(f"the first trial did not finish in time:\n{log_path.read_text()[-3000:]}")
            driver.send_signal(signal.SIGINT)
            assert driver.wait(timeout=120) == 130, log_path.read_text()[-3000:]
        finally:
            if driver.poll() is None:
                driver.kill()
    before = {r.info.run_name: r for r in all_runs(client, "interrupted")}
    assert sorted(before) == ["e1", "e2", "e3"]
    parent_before = parent_of(client, "interrupted", before.values())
    assert parent_before.info.status == "KILLED"  # the sweep was interrupted
    assert before["e1"].info.status == "FINISHED"
    assert before["e2"].info.status == "KILLED"  # stopped mid-run, marked so until resumed
    assert before["e3"].info.status == "SCHEDULED"  # never started
    e2_logged = steps_of(client, before["e2"].info.run_id, tracking.TRAIN_KEY)

    # The restart: same command, so the same sweep id; it resumes in this process.
    outcome = run_sweep(
        load_spec(spec_path), "cpu", storage=str(storage), results_dir=env["root"] / "results_interrupted"
    )
    assert outcome.statuses == {"e1": "FINISHED", "e2": "FINISHED", "e3": "FINISHED"}
    after = {r.info.run_name: r for r in all_runs(client, "interrupted")}
    assert {k: r.info.run_id for k, r in after.items()} == {k: r.info.run_id for k, r in before.items()}
    parent = parent_of(client, "interrupted", after.values())  # the resume reattached to the same parent
    assert parent.info.run_id == parent_before.info.run_id and parent.info.status == "FINISHED"
    # The finished trial was not rerun: not touched at all.
    assert after["e1"].info.end_time == before["e1"].info.end_time
    assert after["e1"].data.tags == before["e1"].data.tags
    # The interrupted one continued from a checkpoint; the unstarted one ran from scratch.
    assert int(after["e2"].data.tags[tracking.TAG_RESUMED_FROM]) in range(50, 401, 50)
    assert int(after["e2"].data.tags[tracking.TAG_RESUMED_FROM]) <= e2_logged[-1]
    assert tracking.TAG_RESUMED_FROM not in after["e3"].data.tags
    for label in ("e1", "e2", "e3"):
        assert steps_of(client, after[label].info.run_id, tracking.TRAIN_KEY) == list(range(10, 401, 10)), label
        assert steps_of(client, after[label].info.run_id, tracking.VAL_KEY) == list(range(50, 401, 50)), label


# -- ASHA stops the hopeless trials early -------------------------------------------------------------
def test_asha_stops_hopeless_trials_and_marks_their_runs(env):
    # lr 1e-7 barely moves: once a good trial has reported at a rung, a bad one arriving there is
    # below the cutoff (rungs at steps 10 and 20 for grace 10, reduction factor 2, 40 steps).
    spec_path = make_spec(
        env, "asha", {"model": {"enc_blocks": [1, 2, 3]}, "train": {"lr": [3e-3, 1e-7]}}, {"steps": 40},
        run={"asha": {"enabled": True, "grace_steps": 10, "reduction_factor": 2}},
    )  # fmt: skip
    out = env["root"] / "results_asha"
    outcome = run_sweep(load_spec(spec_path), "cpu", storage=str(env["root"] / "ray"), results_dir=out)
    assert set(outcome.statuses.values()) == {"FINISHED"}  # stopped early is not a failure
    trials = pd.read_parquet(out / "trials.parquet").set_index("trial")
    stopped = trials[trials["stopped_early"]]
    assert any(label.endswith("lr=1e-07") for label in stopped.index), trials[["steps_completed", "stopped_early"]]
    assert set(stopped["steps_completed"]) <= {10, 20}
    assert (trials.loc[~trials["stopped_early"], "steps_completed"] == 40).all()
    client = tracking.client(env["uri"])
    for label, row in stopped.iterrows():
        run = client.get_run(row["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STOPPED_EARLY] == "true", label
        assert steps_of(client, row["run_id"], tracking.TRAIN_KEY)[-1] == row["steps_completed"], label
    assert len(all_runs(client, "asha")) == 6


# -- GPUs used or refused, never silently skipped (issue 28 item 4) -----------------------------------------
def test_a_gpu_torch_cannot_use_is_refused_before_any_run(env):
    # The module's Ray declares one GPU, which torch here (a CPU-only wheel, or no NVIDIA driver) cannot
    # use: a GPU profile is refused, --profile auto (which picks gpu on a cluster with GPUs) too, within a
    # minute, naming the node, torch and its CUDA build; no MLflow run (not even the experiment), no Ray folder.
    import ray

    from pipeline.sweep.cluster.placement import probe_gpus
    from pipeline.sweep.spec.data_check import SweepDataError
    from pipeline.sweep.trials import devices

    if not ray.cluster_resources().get("GPU"):
        pytest.skip("the Ray instance was started elsewhere, without a GPU")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here: the declared GPU may be usable")
    spec_path = make_spec(
        env, "gpu_refused", {"model": {"enc_blocks": [1, 2]}}, {"steps": 10, "device": "auto"},
        run={"gpus_per_trial": 0.5},
        profiles={"cpu": {"run": {"gpus_per_trial": 0}, "train": {"device": "cpu"}}, "gpu": {}},
    )  # fmt: skip
    storage = env["root"] / "ray_gpu_refused"
    for profile in ("gpu", "auto"):
        started = time.monotonic()
        with pytest.raises(SweepDataError) as info:
            run_sweep(load_spec(spec_path), profile, storage=str(storage), write_tables=False)
        assert time.monotonic() - started < 60
        msg = str(info.value)
        assert msg.startswith(f"{spec_path}: profiles.gpu: run.gpus_per_trial=0.5: Ray offers a GPU on node "), msg
        assert ray.util.get_node_ip_address() in msg and f"torch {torch.__version__}" in msg, msg
        assert (
            "a CPU-only build, no CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        ) in msg
        assert "--profile cpu" in msg and "\n" not in msg
    assert tracking.client(env["uri"]).get_experiment_by_name("gpu_refused") is None and not storage.exists()
    probe = probe_gpus(ray, timeout_s=120)
    assert probe.gpus == () and "torch there sees no CUDA device" in probe.why_none and len(probe.unusable) == 1
    # A trial that Ray granted such a GPU (one that joined after the probe) fails at once, with the same words.
    check = ray.remote(num_gpus=0.5, num_cpus=0, max_retries=0)(devices.require_usable_gpu)
    with pytest.raises(devices.GPUUnusable, match=r"Ray granted this trial 0.5 GPU on node .* cannot use it"):
        ray.get(check.remote(0.5))
