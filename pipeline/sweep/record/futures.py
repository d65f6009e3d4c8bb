"""The best trial's second logged model: a pyfunc that serves sampled futures (pipeline.sweep.record.futures_model).

pipeline.sweep.record.registry logs two models into the best trial's run: "model", the PyTorch flavour
registered as the sweep's name (mlflow.pytorch.load_model gives the VideoPixelNetwork, whose generic
pyfunc returns logits), and "futures", this pyfunc, registered as `<sweep>_futures`:

    mlflow.pyfunc.load_model("models:/depth_width_futures/latest").predict(frames, params={"seed": 1})
    mlflow models serve -m models:/depth_width_futures/latest --env-manager local --host 127.0.0.1 --port 5001

It takes uint8 context frames (B, T, C, H, W) at the data's size and returns uint8 sampled frames
(B, frames, C, H/d, W/d) at the size the trial trained on; params: frames, temperature, seed.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from pipeline.paths import repo_root
from pipeline.sweep.record import tracking

log = logging.getLogger(__name__)

FUTURES_NAME = "futures"  # the logged model's name in its run
SUFFIX = "_futures"  # registered as the sweep's name + this
TAG_FUTURES = "registered_futures_version"  # on the run: the version the pyfunc got
CODE = Path(__file__).with_name("futures_model.py")  # the model's code (models from code)
DEFAULT_HORIZON = 10  # frames predicted when the trial used whole sequences: the paper's 10 given 10


def registered_name(sweep: str) -> str:
    return f"{sweep}{SUFFIX}"


def signature(channels: int, height: int, width: int, downsample: int, horizon: int):
    """uint8 context (B, T, C, H, W) at the data's size -> uint8 frames (B, frames, C, H/d, W/d); the params
    frames (default: the trial's horizon), temperature (1.0) and seed (0). height, width: the trained size."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    raw = (height * downsample, width * downsample) if height > 0 and width > 0 else (-1, -1)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, channels, *raw))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, channels, height, width))]),
        params=ParamSchema(
            [
                ParamSpec("frames", "long", horizon),
                ParamSpec("temperature", "double", 1.0),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


def horizon(checkpoint: str) -> int:
    """Frames after the context in the trial's sequences (seq_len - context), or DEFAULT_HORIZON."""
    from vpn.checkpoint import load_checkpoint
    from vpn.config import TrainConfig

    cfg = TrainConfig.from_dict(load_checkpoint(checkpoint)["train_config"])
    return cfg.seq_len - cfg.context if cfg.seq_len is not None else DEFAULT_HORIZON


def log_futures(client, run, checkpoint: str, sweep: str, step: int) -> str:
    """Log the pyfunc into `run` (its experiment), registered as registered_name(sweep); returns its version.
    The caller holds the store (registry._store): Model.log registers through the fluent registry."""
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import Model

    from vpn.checkpoint import load_model

    params = run.data.params
    cfg = load_model(checkpoint).cfg
    height, width = int(params.get("frame_height", 0)) or -1, int(params.get("frame_width", 0)) or -1
    logged = tracking.retrying(
        client.create_logged_model, run.info.experiment_id, name=FUTURES_NAME, source_run_id=run.info.run_id,
        params=dict(params), tags={"trial": run.info.run_name or ""},
    )  # fmt: skip
    sig = signature(cfg.image_channels, height, width, int(params.get("downsample", 1)), horizon(checkpoint))
    # No input example: MLflow would run predict on it at log time, a whole sampled horizon on the driver.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = Model.log(
            artifact_path=None,  # deprecated: `name` names it
            name=FUTURES_NAME,
            flavor=mlflow.pyfunc,
            run_id=run.info.run_id,
            model_id=logged.model_id,
            python_model=str(CODE),  # models from code: nothing pickled
            artifacts={"checkpoint": checkpoint},
            code_paths=[str(repo_root() / "vpn")],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            signature=sig,
            registered_model_name=registered_name(sweep),
            step=step,
            await_registration_for=0,  # the SQL and server registries create versions READY
        )
    return str(info.registered_model_version)
