"""The best trial's registered models, logged as pyfuncs over its checkpoint (pipeline.sweep.record.pyfunc_model).

pipeline.sweep.record.registry logs two models into the best trial's run, both the same code over the
same checkpoint ("models from code": nothing pickled), in two modes: "model", registered as the sweep's
name, whose predict is the forward pass (logits) and whose `.model` is the VideoPixelNetwork, and
"futures", registered as `<sweep>_futures`, which serves sampled futures:

    mlflow.pyfunc.load_model("models:/depth_width/latest").unwrap_python_model().model   # a VideoPixelNetwork
    mlflow.pyfunc.load_model("models:/depth_width_futures/latest").predict(frames, params={"seed": 1})
    mlflow models serve -m models:/depth_width_futures/latest --env-manager local --host 127.0.0.1 --port 5001

Both take uint8 frames (B, T, C, H, W) at the data's size; the futures model returns uint8 sampled frames
(B, frames, C, H/d, W/d) at the size the trial trained on; params: frames, temperature, seed.

Each model's config (MLmodel's model_config) holds its limits per request (pyfunc_model.LIMITS):
by default the trial's own shapes (default_limits); `limits` of log_futures / log_pyfunc raises them.
"""

from __future__ import annotations

import functools
import logging
import types
import warnings
from collections.abc import Mapping
from pathlib import Path

from pipeline.paths import repo_root
from pipeline.sweep.record import tracking

log = logging.getLogger(__name__)

FUTURES_NAME = "futures"  # the logged model's name in its run
SUFFIX = "_futures"  # registered as the sweep's name + this
TAG_FUTURES = "registered_futures_version"  # on the run: the version the pyfunc got
CODE = Path(__file__).with_name("pyfunc_model.py")  # the models' code (models from code)
DEFAULT_HORIZON = 10  # frames predicted when the trial used whole sequences: the paper's 10 given 10
DATA_SIDE = 64  # Moving MNIST's frame side, for a run that logged no frame_height / frame_width


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


def logits_signature(channels: int, height: int, width: int, downsample: int, output: str):
    """uint8 frames (B, T, C, H, W) at the data's size -> float32 logits at the trained size (height, width):
    bernoulli (B, T-1, C, H/d, W/d), categorical (B, T-1, C, 256, H/d, W/d)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    raw = (height * downsample, width * downsample) if height > 0 and width > 0 else (-1, -1)
    out_shape = (-1, -1, channels, *((256,) if output == "categorical" else ()), height, width)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, channels, *raw))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), out_shape)]),
    )


def trial_length(cfg) -> int:
    """Frames in the trial's sequences (a TrainConfig's seq_len), or its context + DEFAULT_HORIZON when it
    used whole sequences (the data's 20 at the paper's 10 given 10)."""
    return cfg.seq_len if cfg.seq_len is not None else cfg.context + DEFAULT_HORIZON


def default_limits(cfg, channels: int, height: int, width: int, mode: str) -> dict[str, int]:
    """The trial's own shapes as a model's limits per request (pyfunc_model.LIMITS[mode]): its batch_size
    sequences of its sequence length, its horizon drawn (futures) or T-1 frames scored (logits), and their
    product in pixels at the trained size (height, width; <= 0: unknown, DATA_SIDE / downsample)."""
    side = DATA_SIDE // cfg.downsample
    frame = channels * (height if height > 0 else side) * (width if width > 0 else side)
    length = trial_length(cfg)
    predicted = length - cfg.context if mode == "futures" else length - 1
    limits = {"max_batch": cfg.batch_size, "max_context": length, "max_pixels": cfg.batch_size * predicted * frame}
    if mode == "futures":
        limits["max_frames"] = predicted
    return limits


def log_pyfunc(
    client, run, checkpoint: str, mode: str, *, name: str, registered: str, step: int,
    limits: Mapping[str, int] | None = None, tags: Mapping[str, str] | None = None,
) -> str:  # fmt: skip
    """Log pyfunc_model over `checkpoint` into `run` (its experiment) as `name`, in `mode` ("logits" or
    "futures", with its signature), registered as `registered`; returns its version. Its model_config: the
    mode and default_limits, with `limits` (any of pyfunc_model.LIMITS[mode]) over them. The caller holds the
    store (registry._store): Model.log registers through the fluent registry."""
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import Model

    from pipeline.sweep.record.pyfunc_model import check_config
    from vpn.checkpoint import load_checkpoint

    # vpn.config, not the package's top level: where the repository is a folder named vpn/ in the working
    # directory (a `ray submit` driver in the node's home), `vpn` itself resolves to it as a namespace package
    from vpn.config import TrainConfig, VPNConfig

    state = load_checkpoint(checkpoint)
    model_cfg, cfg = VPNConfig.from_dict(state["model_config"]), TrainConfig.from_dict(state["train_config"])
    params = run.data.params
    height, width = int(params.get("frame_height", 0)) or -1, int(params.get("frame_width", 0)) or -1
    channels = model_cfg.image_channels
    config = check_config({"mode": mode, **default_limits(cfg, channels, height, width, mode), **(limits or {})})
    if mode == "futures":
        sig = signature(channels, height, width, cfg.downsample, trial_length(cfg) - cfg.context)
    else:
        sig = logits_signature(channels, height, width, cfg.downsample, model_cfg.output)
    logged = tracking.retrying(
        client.create_logged_model, run.info.experiment_id, name=name, source_run_id=run.info.run_id,
        params=dict(params), tags=dict(tags or {}),
    )  # fmt: skip
    # Model.log would also log a model_config argument as the run's params, where `mode` clashes with the
    # run's own and the limits would pose as the trial's: given to save_model alone, it reaches the MLmodel only.
    flavor = types.SimpleNamespace(save_model=functools.partial(mlflow.pyfunc.save_model, model_config=config))
    # No input example: MLflow would run predict on it at log time (a whole sampled horizon on the driver).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = Model.log(
            artifact_path=None,  # deprecated: `name` names it
            name=name,
            flavor=flavor,
            run_id=run.info.run_id,
            model_id=logged.model_id,
            python_model=str(CODE),  # models from code: nothing pickled
            artifacts={"checkpoint": checkpoint},
            code_paths=[str(repo_root() / "vpn")],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            signature=sig,
            registered_model_name=registered,
            step=step,
            await_registration_for=0,  # the SQL and server registries create versions READY
        )
    return str(info.registered_model_version)


def log_futures(client, run, checkpoint: str, sweep: str, step: int, limits: Mapping[str, int] | None = None) -> str:
    """Log the futures pyfunc into `run`, registered as registered_name(sweep); returns its version.
    limits: any of max_batch, max_context, max_frames, max_pixels, over the trial's defaults."""
    return log_pyfunc(
        client, run, checkpoint, "futures", name=FUTURES_NAME, registered=registered_name(sweep), step=step,
        limits=limits, tags={"trial": run.info.run_name or ""},
    )  # fmt: skip
