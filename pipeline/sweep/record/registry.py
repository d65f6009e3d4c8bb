"""The best trial of a sweep, as MLflow models registered under the sweep's name and `<sweep>_futures`.

After the results tables are written, the driver takes the trial they rank best (metrics.json's
`best`, from pipeline.sweep.record.results.summary: in train mode the least excess of the test NLL over its floor,
in overfit mode the least train NLL) and logs two models into that same run, both pyfuncs of the same
code over the run's checkpoint (pipeline.sweep.record.pyfunc_model, "models from code"), registered in the
Model Registry. The runs table's Model column and the Models page then show them.

- "model", registered as the sweep's name: its predict is the forward pass (logits), and its `.model`
  the VideoPixelNetwork, so it loads in one line (from the repository root, where MLflow's default store
  is ./mlflow.db; elsewhere set MLFLOW_TRACKING_URI first):

      model = mlflow.pyfunc.load_model("models:/depth_width/latest").unwrap_python_model().model

- "futures", registered as `<sweep>_futures` (pipeline.sweep.record.futures): raw uint8 frames in,
  prepared as the trial did, sampled uint8 frames out (`mlflow models serve -m
  models:/depth_width_futures/latest`), within limits per request.

Loading either unpickles nothing: the weights come from the trial's checkpoint (artifacts/checkpoint.pt),
read with torch.load(weights_only=True). It executes the model's code: pyfunc_model.py and code/vpn/,
copied from the driver's checkout when the model was logged (docs/sweeps.md says what a loader trusts).

Registering is idempotent: the run is tagged registered_model_version (and registered_futures_version), and a
sweep run again without change (a resume) whose best run already holds both models registers nothing
new. A run that holds only one gets the other. A run registered by an earlier release (no
registered_model_format tag: its "model" the PyTorch flavour, a pickled module, and its futures model
without limits) gets both again as new versions, so that `latest` loads without unpickling and serves
within limits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.sweep.record import futures, tracking

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in its run
TAG_REGISTERED = "registered_model_version"  # on the run: the version its model got
# on the run: how its models were logged. Absent where an earlier release registered the PyTorch flavour
# (a pickled module) and a futures model without limits.
TAG_FORMAT, FORMAT = "registered_model_format", "pyfunc-checkpoint"


ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def _store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model and its registration) on `uri`, and the process's settings as
    they were afterwards. mlflow.set_tracking_uri / set_registry_uri also write (and on a reset to
    None, delete) the environment variables, so both the module globals and the variables are saved."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_settings
    from mlflow.tracking._tracking_service import utils as tracking_settings

    env = {k: os.environ.get(k) for k in ENV_KEYS}
    saved = tracking_settings._tracking_uri, registry_settings._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_settings._tracking_uri, registry_settings._registry_uri = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def register_best(client, uri: str, sweep: str, summary: Mapping[str, Any]) -> str | None:
    """Log and register the best trial's models (see the module docstring); returns the sweep's model's
    version, or None when no trial was ranked or its run holds no checkpoint. Each of the two models is
    logged once: a run that holds one (its tag) gets only the other."""
    best = summary.get("best")
    if not best:
        log.info("sweep %s: no finished trial, no model registered", sweep)
        return None
    run = tracking.retrying(client.get_run, best["run_id"])
    tags = run.data.tags
    # Without the format tag, what the run holds is an earlier release's: a pickled module and a futures
    # model without limits. Both are registered again, so that `latest` is neither.
    current = tags.get(TAG_FORMAT) == FORMAT
    held, held_futures = (tags.get(TAG_REGISTERED), tags.get(futures.TAG_FUTURES)) if current else (None, None)
    if held and held_futures:
        return held
    with tempfile.TemporaryDirectory(prefix="vpn-register-") as d:
        path = _checkpoint(client, run, d, sweep)
        if path is None:
            return None
        steps = [m.step for m in tracking.retrying(client.get_metric_history, run.info.run_id, tracking.TRAIN_KEY)]
        step = max(steps, default=0)  # the model page shows the run's metrics at its last step
        if not held:
            with _store(uri):
                held = futures.log_pyfunc(
                    client, run, path, "logits", name=MODEL_NAME, registered=sweep, step=step,
                    tags={"sweep_id": tags.get(tracking.TAG_SWEEP_ID, ""), "trial": best["trial"]},
                )  # fmt: skip
            _tag_version(client, sweep, held, run, best)
            tracking.set_tags(client, run.info.run_id, {TAG_REGISTERED: held, TAG_FORMAT: FORMAT})
            log.info("sweep %s: best trial %s registered as models:/%s/%s", sweep, best["trial"], sweep, held)
        if not held_futures:
            with _store(uri):
                held_futures = futures.log_futures(client, run, path, sweep, step)
            _tag_futures(client, sweep, held_futures, run, best)
    return held


def register_futures(client, uri: str, sweep: str, run_id: str, limits: Mapping[str, int]) -> str | None:
    """Log run `run_id`'s futures model again with `limits` over the trial's defaults (any of max_batch,
    max_context, max_frames, max_pixels), registered as a new version of `<sweep>_futures`; returns that
    version, or None when the run holds no readable checkpoint. The run's tag then names the new version."""
    run = tracking.retrying(client.get_run, run_id)
    with tempfile.TemporaryDirectory(prefix="vpn-register-") as d:
        path = _checkpoint(client, run, d, sweep)
        if path is None:
            return None
        steps = [m.step for m in tracking.retrying(client.get_metric_history, run_id, tracking.TRAIN_KEY)]
        with _store(uri):
            version = futures.log_futures(client, run, path, sweep, max(steps, default=0), limits=limits)
    _tag_futures(client, sweep, version, run, {"trial": run.info.run_name or ""})
    return version


def _checkpoint(client, run, folder: str, sweep: str) -> str | None:
    """The run's checkpoint downloaded into `folder`, or None (logged) when it cannot be read."""
    try:
        return client.download_artifacts(run.info.run_id, tracking.CHECKPOINT_ARTIFACT, folder)
    except Exception as e:  # an unreachable artifact store must not fail the sweep
        log.warning("sweep %s: run %s has no readable checkpoint, no model registered: %s", sweep, run.info.run_id, e)
        return None


def _tag_futures(client, sweep: str, version: str, run, best: Mapping[str, Any]) -> None:
    name = futures.registered_name(sweep)
    _tag_version(client, name, version, run, best)
    tracking.set_tags(client, run.info.run_id, {futures.TAG_FUTURES: version})
    log.info("sweep %s: its futures registered as models:/%s/%s", sweep, name, version)


def _tag_version(client, name: str, version: str, run, best: Mapping[str, Any]) -> None:
    tags = {"sweep_id": run.data.tags.get(tracking.TAG_SWEEP_ID, ""), "trial": best["trial"], "run_id": run.info.run_id}
    tags.update({k: f"{v:.6g}" for k, v in best.items() if isinstance(v, float)})
    for key, value in tags.items():
        tracking.retrying(client.set_model_version_tag, name, version, key, value)
