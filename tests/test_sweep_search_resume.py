"""(slow) A searched sweep whose driver is interrupted mid-search resumes as a grid does: the same command
again restores the searcher, so the sweep ends with exactly num_samples x seeds trials, the draws an
uninterrupted searcher makes, one MLflow run each (under one parent) and every step logged once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.sweep.record import tracking
from pipeline.sweep.spec import budget
from pipeline.sweep.spec.sweep import load_spec
from pipeline.sweep.trials import search
from pipeline.sweep.trials.trial import TrialConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),  # inside MLflow's SQL store
]

REPO = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY, VAL_EVERY = 300, 10, 50
SAMPLES, SEEDS = 3, 2


def first_draws(sweep, n: int) -> list[float]:
    """The lr of the first n configs the sweep's searcher suggests (Repeater: each config SEEDS times)."""
    base = TrialConfig.of_point(sweep, sweep.points[0], None, "sqlite:///unused", None)
    s = search.searcher(sweep, "val", budget.FRAME_SIZE)
    s.set_search_properties(None, None, search.param_space(sweep, base))
    lrs = []
    for i in range(n * SEEDS):
        c = s.suggest(f"trial{i}")
        lrs.append(search.trial_config({**s.constants, **c}).train.lr)
        s.on_trial_complete(f"trial{i}", {"val": 1.0, "step": STEPS})
    return sorted(set(lrs))


def test_interrupted_search_resumes_without_duplicates(tmp_path):
    from conftest import environ, running_local_ray, write_splits

    from pipeline.sweep.driver import QUIET_ENV, run_sweep
    from pipeline.sweep.trials.searched_runs import TAG_PARENT, TAG_PARENT_OF

    data = write_splits(tmp_path / "data", {"train": 16, "val": 8, "test": 4})
    train = {"steps": STEPS, "batch_size": 2, "seq_len": 6, "context": 3, "device": "cpu", "log_every": LOG_EVERY,
             "val_every": VAL_EVERY, "val_batches": 1, "ckpt_every": 50}  # fmt: skip
    spec = {
        "name": "resumed_search",
        "data": str(data),
        "model": {"output": "bernoulli", "enc_blocks": 1, "dec_blocks": 1, "filter_fraction": 0.03125},
        "train": train,
        "search": {"algorithm": "random", "seed": 2, "train": {"lr": {"loguniform": [1e-4, 1e-2]}}},
        "run": {"num_samples": SAMPLES, "seeds": SEEDS, "cpus_per_trial": 1, "max_concurrent": 1, "max_failures": 0},
        "profiles": {"cpu": {}},
    }
    path = tmp_path / "resumed_search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    storage, log_path = tmp_path / "ray", tmp_path / "driver.log"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with environ({**QUIET_ENV, "MLFLOW_TRACKING_URI": uri}), running_local_ray() as address:
        client = tracking.client(uri)
        # The first start: a driver process of its own, interrupted (Ctrl+C) once a trial has finished
        # and the next one is under way, past its first checkpoint.
        with log_path.open("w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-m", "pipeline.sweep", str(path), "--profile", "cpu", "--storage", str(storage),
                 "--results-dir", str(tmp_path / "r")],
                cwd=REPO, env={**os.environ, "RAY_ADDRESS": address}, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and driver.poll() is None:
                    exp = client.get_experiment_by_name("resumed_search")
                    runs = client.search_runs([exp.experiment_id]) if exp else []
                    done = [r for r in runs if r.info.status == "FINISHED" and TAG_PARENT in r.data.tags]
                    going = [r for r in runs if r.info.status == "RUNNING" and TAG_PARENT in r.data.tags]
                    if done and any(
                        max([m.step for m in client.get_metric_history(r.info.run_id, tracking.TRAIN_KEY)] or [0]) >= 60
                        for r in going
                    ):
                        break
                    time.sleep(0.3)
                else:
                    pytest.fail(f"no trial finished in time:\n{log_path.read_text()[-3000:]}")
                driver.send_signal(signal.SIGINT)
                assert driver.wait(timeout=120) == 130, log_path.read_text()[-3000:]
            finally:
                if driver.poll() is None:
                    driver.kill()
        sweep = load_spec(path, root=tmp_path).resolve("cpu")
        exp = client.get_experiment_by_name("resumed_search")
        started = [r for r in client.search_runs([exp.experiment_id]) if TAG_PARENT in r.data.tags]
        assert 2 <= len(started) < SAMPLES * SEEDS  # interrupted mid-search
        # The rerun: the same command, in this process.
        outcome = run_sweep(load_spec(path, root=tmp_path), "cpu", storage=str(storage), results_dir=tmp_path / "r")

    assert sorted(outcome.statuses.values()) == ["FINISHED"] * (SAMPLES * SEEDS)
    from mlflow.entities import ViewType

    every = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)  # deleted ones too
    parents = [r for r in every if r.data.tags.get(TAG_PARENT_OF) == outcome.sweep_id]
    trials = [r for r in every if TAG_PARENT_OF not in r.data.tags]
    assert len(parents) == 1 and len(every) == 1 + SAMPLES * SEEDS  # one parent across the resume, no spare run
    assert {r.data.tags[TAG_PARENT] for r in trials} == {parents[0].info.run_id}
    assert len({r.data.tags[tracking.TAG_TRIAL_ID] for r in trials}) == SAMPLES * SEEDS  # no trial twice
    assert len({r.info.run_name for r in trials}) == SAMPLES * SEEDS
    # The searcher resumed its state: the draws of an uninterrupted searcher, each with both seeds.
    by_lr: dict[float, list[int]] = {}
    for r in trials:
        by_lr.setdefault(float(r.data.params["lr"]), []).append(int(r.data.params["seed"]))
    assert sorted(by_lr) == pytest.approx(first_draws(sweep, SAMPLES))
    assert all(sorted(seeds) == [0, 1] for seeds in by_lr.values()), by_lr
    for r in trials:  # each step once, no gap, resumed or not
        steps = [m.step for m in client.get_metric_history(r.info.run_id, tracking.TRAIN_KEY)]
        assert sorted(steps) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), r.info.run_name
        val = [m.step for m in client.get_metric_history(r.info.run_id, tracking.VAL_KEY)]
        assert sorted(val) == list(range(VAL_EVERY, STEPS + 1, VAL_EVERY)), r.info.run_name
    assert parents[0].info.status == "FINISHED" and client.get_run(parents[0].info.run_id).data.metrics[
        "trials_run"
    ] == (SAMPLES * SEEDS)
