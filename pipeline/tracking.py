"""MLflow glue for sweeps: where runs go, one run per trial, metrics in batches, never a step twice.

- Store: MLFLOW_TRACKING_URI when set (an `mlflow server` for clusters), else an embedded SQLite
  store at <repo>/mlflow.db with artifacts in <repo>/mlartifacts, both absolute, so trials whose
  working directory is under /tmp/ray write to the same place.
- One experiment per sweep (the spec's name), created once by the driver before any trial starts
  (concurrent first use of a new SQLite database races on its migrations).
- One run per trial, created by the driver with the trial's params and tags. The trial config and
  the trial's checkpoints carry the run id, so a retried or resumed trial reattaches to its run.
- Per-step metrics are buffered and written with MlflowClient.log_batch when the trainable reports
  to Tune. MetricBuffer drops steps that the run already holds, so a trial restarted from an
  older checkpoint re-trains those steps (batches are a pure function of (seed, step)) without
  logging them again: each curve has every step exactly once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag, ViewType  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.spec import repo_root  # noqa: E402

log = logging.getLogger(__name__)

TRAIN_KEY = "train_nats_per_frame"
VAL_KEY = "val_nats_per_frame"
SPEED_KEY = "steps_per_second"
# Logged once, at the end of a train-mode trial (pipeline.trainable.test_metrics).
TEST_KEY = "test_nats_per_frame"
TEST_FLOOR_KEY = "test_floor_nats_per_frame"
TEST_SEQUENCES_KEY = "test_sequences_scored"
CURVE_KEYS = (TRAIN_KEY, VAL_KEY, SPEED_KEY)
# MLflow's limits per log_batch request.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100

# Run tags (mlflow.runName is the trial's label).
TAG_SWEEP, TAG_PROFILE, TAG_SWEEP_ID, TAG_POINT = "sweep", "profile", "sweep_id", "point"
TAG_LABEL, TAG_MODE, TAG_SPEC = "label", "mode", "spec"
TAG_ERROR, TAG_NON_FINITE_STEP, TAG_STOPPED_EARLY = "error", "non_finite_step", "stopped_early"
TAG_RESUMED_FROM, TAG_TRIAL_ID, TAG_TRIAL_NAME = "resumed_from_step", "ray_trial_id", "ray_trial_name"
# Runs are created when the sweep starts; this is when the trial first ran (epoch ms).
TAG_STARTED = "trial_started_ms"
TAG_RESOURCES = "ray_resources"  # what Ray granted the trial (each worker), e.g. {"CPU": 1.0, "GPU": 0.5}
TAG_WORKERS = "workers_per_trial"  # data-parallel workers (pipeline.distributed); 1: the trial itself
# Experiment tag naming the latest sweep id of a profile: pipeline.results reads it.
EXPERIMENT_LATEST = "latest_sweep_id.{profile}"
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"

T = TypeVar("T")


def default_tracking_uri() -> str:
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded SQLite store in the repository."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite database (<db dir>/mlartifacts/<experiment>); a server decides its own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():  # sqlite:///rel/path.db is relative to the cwd: pin it now
            db = db.resolve()
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db: trials do not share the driver's cwd."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def retrying(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """Call fn, retrying while SQLite says "database is locked" (concurrent trials writing at once)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
            if "database is locked" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(c: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created (with artifacts beside a SQLite store) if missing."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_location(uri, name))


def sweep_runs(c: MlflowClient, experiment_id: str, sweep_id: str) -> list[Any]:
    """Every live run of one sweep, in grid order."""
    runs: list[Any] = []
    token = None
    while True:
        page = c.search_runs(
            [experiment_id],
            filter_string=f"tags.{TAG_SWEEP_ID} = '{sweep_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: int(r.data.tags.get(TAG_POINT, "0")))


def create_run(
    c: MlflowClient,
    experiment_id: str,
    name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> str:
    """A new run in status SCHEDULED, holding its params and tags: the trial sets it RUNNING."""
    run = retrying(c.create_run, experiment_id, tags=dict(tags), run_name=name)
    run_id = run.info.run_id
    items = [Param(k, _param_str(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        retrying(c.log_batch, run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
    retrying(c.update_run, run_id, status="SCHEDULED")
    return run_id


def _param_str(v: Any) -> str:
    return "None" if v is None else repr(v) if isinstance(v, float) else str(v)


def set_tags(c: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    retrying(c.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def last_logged_step(c: MlflowClient, run_id: str, keys: Iterable[str] = CURVE_KEYS) -> int:
    """The largest step the run holds for any curve metric (0 when none)."""
    steps = [m.step for key in keys for m in retrying(c.get_metric_history, run_id, key)]
    return max(steps, default=0)


class MetricBuffer:
    """Per-step metrics, held until flush() writes them with log_batch.

    after_step: steps up to this one are already in the run (logged before a restart): add() drops
    them, and flush() raises it to the last step written, so no step reaches MLflow twice.
    """

    def __init__(self, c: MlflowClient, run_id: str, after_step: int = 0) -> None:
        self.client, self.run_id, self.after_step = c, run_id, after_step
        self._pending: list[Metric] = []

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        if step <= self.after_step:
            return
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            retrying(self.client.log_batch, self.run_id, metrics=pending[i : i + MAX_METRICS_PER_BATCH])
        if pending:
            self.after_step = max(self.after_step, max(m.step for m in pending))
