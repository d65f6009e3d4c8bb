"""The best trial of a sweep, as an MLflow model registered under the sweep's name.

After the results tables are written, the driver takes the trial they rank best (metrics.json's
`best`, from pipeline.sweep.record.results.summary: in train mode the least excess of the test NLL over its floor,
in overfit mode the least train NLL), rebuilds its VideoPixelNetwork from the run's checkpoint
artifact, and logs it into that same run with mlflow.pytorch.log_model, registered in the Model
Registry as the sweep's name. The runs table's Model column and the Models page then show it, and it
loads in one line (from the repository root, where MLflow's default store is ./mlflow.db; elsewhere
set MLFLOW_TRACKING_URI first):

    model = mlflow.pytorch.load_model("models:/depth_width/latest")   # a VideoPixelNetwork, eval mode

That line unpickles the module (pickle runs code: load models from stores you trust). The model's
folder also holds the trial's checkpoint, extra_files/checkpoint.pt, which vpn.checkpoint.load_model reads
with weights_only (no code runs), and vpn/'s source (code/), so neither way needs this project
installed beyond torch.

Beside it, in the same run, a second logged model serves futures (pipeline.sweep.record.futures): a pyfunc,
registered as `<sweep>_futures`, that takes the data's raw uint8 frames, prepares them as the trial
did and returns sampled uint8 frames (`mlflow models serve -m models:/depth_width_futures/latest`).
Two models, because one MLmodel has one pyfunc flavour: the PyTorch flavour's pyfunc is its forward
pass (logits), and `mlflow.pytorch.load_model` needs that flavour under the sweep's name.

Registering is idempotent: the run is tagged registered_model_version (and registered_futures_version), and a
sweep run again without change (a resume) whose best run already holds both models registers nothing
new; a run that holds only the PyTorch one (registered before the futures model existed) gets the other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.paths import repo_root
from pipeline.sweep.record import futures, tracking

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in its run
TAG_REGISTERED = "registered_model_version"  # on the run: the version its model got


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


@contextlib.contextmanager
def _level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _signature(channels: int, height: int, width: int, output: str):
    """uint8 frames (B, T, C, H, W) in; logits out: bernoulli (B, T-1, C, H, W), categorical (B, T-1, C, 256, H, W)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    out_shape = (-1, -1, channels, *((256,) if output == "categorical" else ()), height, width)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, channels, height, width), "frames")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), out_shape, "logits")]),
    )


def register_best(client, uri: str, sweep: str, summary: Mapping[str, Any]) -> str | None:
    """Log and register the best trial's models (see the module docstring); returns the PyTorch model's
    version, or None when no trial was ranked or its run holds no checkpoint. Each of the two models is
    logged once: a run that holds one (its tag) gets only the other."""
    best = summary.get("best")
    if not best:
        log.info("sweep %s: no finished trial, no model registered", sweep)
        return None
    run = tracking.retrying(client.get_run, best["run_id"])
    held, held_futures = run.data.tags.get(TAG_REGISTERED), run.data.tags.get(futures.TAG_FUTURES)
    if held and held_futures:
        return held
    with tempfile.TemporaryDirectory(prefix="vpn-register-") as d:
        try:
            path = client.download_artifacts(run.info.run_id, tracking.CHECKPOINT_ARTIFACT, d)
        except Exception as e:  # an unreachable artifact store must not fail the sweep
            log.warning(
                "sweep %s: best trial %s has no readable checkpoint, no model registered: %s", sweep, best["trial"], e
            )
            return None
        steps = [m.step for m in tracking.retrying(client.get_metric_history, run.info.run_id, tracking.TRAIN_KEY)]
        step = max(steps, default=0)  # the model page shows the run's metrics at its last step
        if not held:
            held = _log_pytorch(client, uri, run, path, sweep, best, step)
        if not held_futures:
            with _store(uri):
                held_futures = futures.log_futures(client, run, path, sweep, step)
            _tag_version(client, futures.registered_name(sweep), held_futures, run, best)
            tracking.set_tags(client, run.info.run_id, {futures.TAG_FUTURES: held_futures})
            name = futures.registered_name(sweep)
            log.info("sweep %s: its futures registered as models:/%s/%s", sweep, name, held_futures)
    return held


def _tag_version(client, name: str, version: str, run, best: Mapping[str, Any]) -> None:
    tags = {"sweep_id": run.data.tags.get(tracking.TAG_SWEEP_ID, ""), "trial": best["trial"], "run_id": run.info.run_id}
    tags.update({k: f"{v:.6g}" for k, v in best.items() if isinstance(v, float)})
    for key, value in tags.items():
        tracking.retrying(client.set_model_version_tag, name, version, key, value)


def _log_pytorch(client, uri: str, run, path: str, sweep: str, best: Mapping[str, Any], step: int) -> str:
    """The VideoPixelNetwork of the checkpoint at `path`, logged with mlflow.pytorch into `run` and
    registered as `sweep`; returns its version."""
    import mlflow.pytorch
    import numpy as np
    import torch

    from vpn.checkpoint import load_model

    model = load_model(path)
    params = run.data.params
    height, width = int(params.get("frame_height", 0)) or -1, int(params.get("frame_width", 0)) or -1
    # Created here, in the run's experiment: log_model alone would file it under the process's
    # active experiment (the Default one, artifacts in ./mlruns), whatever the run's.
    logged = tracking.retrying(
        client.create_logged_model, run.info.experiment_id, name=MODEL_NAME, source_run_id=run.info.run_id,
        params=dict(params),
        tags={"sweep_id": run.data.tags.get(tracking.TAG_SWEEP_ID, ""), "trial": best["trial"]},
    )  # fmt: skip
    # mlflow.pytorch warns on every pickled model; the choice is deliberate (see the docstring).
    with _store(uri), _level("mlflow.pytorch", logging.ERROR):
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            model_id=logged.model_id,
            run_id=run.info.run_id,
            registered_model_name=sweep,
            serialization_format="pickle",  # a VideoPixelNetwork back, with .sample() and .nll()
            code_paths=[str(repo_root() / "vpn")],
            extra_files=[path],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            signature=_signature(model.cfg.image_channels, height, width, model.cfg.output),
            step=step,
            await_registration_for=0,  # the SQL and server registries create versions READY
        )
    version = str(info.registered_model_version)
    _tag_version(client, sweep, version, run, best)
    tracking.set_tags(client, run.info.run_id, {TAG_REGISTERED: version})
    log.info("sweep %s: best trial %s registered as models:/%s/%s", sweep, best["trial"], sweep, version)
    return version
