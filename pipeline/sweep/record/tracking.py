"""MLflow glue for sweeps: where runs go, one run per trial, metrics in batches, never a step twice.

- Store: MLFLOW_TRACKING_URI when set (an `mlflow server` for clusters), else an embedded SQLite
  store at <repo>/mlflow.db with artifacts in <repo>/mlartifacts, both absolute, so trials whose
  working directory is under /tmp/ray write to the same place.
- One experiment per sweep (the spec's name), created once by the driver before any trial starts
  (concurrent first use of a new SQLite database races on its migrations).
- One run per trial, created by the driver with the trial's params and tags. The trial config and
  the trial's checkpoints carry the run id, so a retried or resumed trial reattaches to its run.
- Per-step metrics are buffered and written with MlflowClient.log_batch when the trainable reports
  to Tune (pipeline.sweep.record.outbox: held while the server is away, saved with each checkpoint).
  The outbox drops steps that the run already holds, so a trial restarted from an older checkpoint
  re-trains those steps (batches are a pure function of (seed, step)) without logging them again:
  each curve has every step exactly once.
- A server that is away is waited for (pipeline.sweep.record.outage): every method of `client()`
  retries for up to VPN_TRACKING_WAIT_S seconds, and MLflow's own HTTP retries are kept short.
- What the runs table's columns show: Source from the git tags (git_tags: the script, the commit,
  the branch, and mlflow.source.git.dirty), Dataset from the data's input (dataset_input: name,
  path, and a digest of the data's own identity), Model from the sweep's registered best trial
  (pipeline.sweep.record.registry).
- The categorical head's NLLs are also logged in bits per sub-pixel (with_bits), the PixelCNN
  literature's unit: nats per frame / (C * H * W * ln 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag, ViewType
from mlflow.tracking import MlflowClient

from pipeline.paths import repo_root
from pipeline.sweep.record import outage

outage.use_short_http_retries()  # before any request: MLflow reads them at each one

log = logging.getLogger(__name__)

TRAIN_KEY = "train_nats_per_frame"
VAL_KEY = "val_nats_per_frame"
SPEED_KEY = "steps_per_second"
# Logged once, at the end of a train-mode trial (pipeline.sweep.trials.trainable.score_test_split).
TEST_KEY = "test_nats_per_frame"
TEST_FLOOR_KEY = "test_floor_nats_per_frame"
TEST_SEQUENCES_KEY = "test_sequences_scored"
CURVE_KEYS = (TRAIN_KEY, VAL_KEY, SPEED_KEY)
# Bits per sub-pixel beside nats per frame (categorical head only; with_bits).
NATS_SUFFIX, BITS_SUFFIX = "_nats_per_frame", "_bits_per_subpixel"
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
TAG_WORKERS = "workers_per_trial"  # data-parallel workers (pipeline.sweep.trials.distributed); 1: the trial itself
# A sweep's parent run (pipeline.sweep.record.parent) and its trials' link to it (MLflow's own nesting tag).
TAG_PARENT_OF, TAG_PARENT = "sweep_parent_of", "mlflow.parentRunId"
# Experiment tag naming the latest sweep id of a profile: pipeline.sweep.record.results reads it.
EXPERIMENT_LATEST = "latest_sweep_id.{profile}"
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"
# MLflow's own tags: the runs table's Source column and a run's Source (script, branch, commit) read them.
TAG_SOURCE_NAME, TAG_SOURCE_TYPE = "mlflow.source.name", "mlflow.source.type"
TAG_GIT_COMMIT, TAG_GIT_BRANCH, TAG_GIT_DIRTY = (
    "mlflow.source.git.commit",
    "mlflow.source.git.branch",
    "mlflow.source.git.dirty",
)
TAG_PRECISION = "precision"  # what the trial's forward pass ran in: bf16 or fp32 (vpn.train.Trainer.precision)

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


def retrying(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn, again while SQLite says "database is locked" (concurrent trials writing at once) or the
    server is away, for up to VPN_TRACKING_WAIT_S seconds (outage.patient)."""
    return outage.patient(fn, *args, **kwargs)


def client(uri: str | None = None, wait: float | None = None) -> outage.PatientClient:
    """A client of one store, its Model Registry included (MlflowClient would otherwise take the
    registry from the process's settings, e.g. ./mlflow.db of whatever the working directory is).
    Its every method waits up to `wait` seconds (VPN_TRACKING_WAIT_S) for an away server; `.once`
    is the bare MlflowClient."""
    uri = uri or tracking_uri()
    return outage.PatientClient(MlflowClient(tracking_uri=uri, registry_uri=uri), wait)


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


def find_trial_run(c: MlflowClient, experiment_id: str, sweep_id: str, trial_id: str) -> str | None:
    """The id of the live run of Ray trial `trial_id` in sweep `sweep_id` (a searched sweep's), or None."""
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.{TAG_SWEEP_ID} = '{sweep_id}' and tags.{TAG_TRIAL_ID} = '{trial_id}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=2,
    )
    if len(runs) > 1:
        raise RuntimeError(f"sweep {sweep_id}: two MLflow runs hold Ray trial {trial_id}")
    return runs[0].info.run_id if runs else None


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


def log_params_once(c: MlflowClient, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Log the params the run does not hold yet (MLflow's params are immutable); returns those it
    holds with another value (a trial restarted on another GPU may choose other memory settings)."""
    held = retrying(c.get_run, run_id).data.params
    new = [Param(k, _param_str(v)) for k, v in params.items() if k not in held]
    if new:
        retrying(c.log_batch, run_id, params=new)
    return {k: held[k] for k, v in params.items() if k in held and held[k] != _param_str(v)}


def set_tags(c: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    retrying(c.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def last_logged_step(c: MlflowClient, run_id: str, keys: Iterable[str] = CURVE_KEYS) -> int:
    """The largest step the run holds for any curve metric (0 when none)."""
    steps = [m.step for key in keys for m in retrying(c.get_metric_history, run_id, key)]
    return max(steps, default=0)


# -- what the runs table shows beside the metrics ------------------------------------------------------
def with_bits(metrics: Mapping[str, float], subpixels: int) -> dict[str, float]:
    """metrics plus, for every *_nats_per_frame, its *_bits_per_subpixel = nats / (subpixels * ln 2).

    subpixels = C * H * W of the frames scored (after pooling). Only for the categorical head: its NLL
    is a discrete likelihood over 256 levels; the Bernoulli head's is a cross-entropy against grey
    levels, for which bits per sub-pixel would not compare with the literature.
    """
    out = dict(metrics)
    for key, value in metrics.items():
        if key.endswith(NATS_SUFFIX) and "floor" not in key:
            out[key.removesuffix(NATS_SUFFIX) + BITS_SUFFIX] = float(value) / (subpixels * math.log(2))
    return out


def git_tags(root: Path) -> dict[str, str]:
    """The Source tags for code in git repository `root`: the script, the commit, the branch, and
    whether tracked files differ from the commit (dvc.lock aside: DVC rewrites it while the pipeline
    runs). Empty when root is not a git checkout (an uploaded working directory has no .git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError) as e:
        log.info("no git commit recorded on the runs: %s is not a git checkout (%s)", root, e)
        return {}
    tags = {
        TAG_SOURCE_NAME: "pipeline/sweep/driver.py",
        TAG_SOURCE_TYPE: "LOCAL",
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: str(bool(changed)).lower(),
    }
    if branch and branch != "HEAD":  # HEAD: a detached checkout has no branch
        tags[TAG_GIT_BRANCH] = branch
    return tags


def dataset_input(path: Path, identity: str, profile: Mapping[str, Any], context: str = "training") -> DatasetInput:
    """The Moving MNIST folder as an MLflow dataset input: the Dataset column shows its name, and the
    run's page its source path and digest. The digest is sha256 of the data's identity (its
    stats.json, which holds the generating params and every split's shape and pixel statistics: the
    same bytes for the same data on every machine), so one digest means one dataset."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    dataset = Dataset(
        name=Path(path).name,
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": str(path)}),
        profile=json.dumps(dict(profile), sort_keys=True, default=str),
    )
    return DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)])


def log_image(c: MlflowClient, run_id: str, image: Any, key: str, step: int) -> None:
    """One picture in the run's image view (key, with a step slider)."""
    retrying(c.log_image, run_id, image, key=key, step=step, synchronous=True)
