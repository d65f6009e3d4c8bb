"""The registered models' code: an MLflow pyfunc (models from code) over a trial's checkpoint, in two modes.

MLflow runs this file when a model loads (mlflow.pyfunc.load_model, `mlflow models serve`): it is the
model's code, copied into the model's folder by pipeline.sweep.record.futures, with vpn/ beside it
(code_paths), so loading needs torch and MLflow, not this project. Nothing is unpickled: the weights
come from the trial's checkpoint (the artifact "checkpoint"), read by vpn.checkpoint.load_model with
weights_only. The model's config (MLmodel's model_config, set where the model is logged) holds the mode
and the limits; `mlflow.pyfunc.load_model(..., model_config=...)` and, for a server, the environment
variable MLFLOW_PYFUNC_INFERENCE_CONFIG (JSON) override them key by key.

Both modes take uint8 frames (B, T, C, H, W) at the data's size and first prepare them as the trial did
(vpn.evaluate.prepare with the checkpoint's TrainConfig: the average-pool by `downsample`; seq_len is
not applied: it keeps the first seq_len frames, and here every given frame is input):
- "logits" (registered as the sweep's name): the forward pass, float32 logits predicting frames
  1..T-1, (B, T-1, C, H/d, W/d) for the Bernoulli head, (B, T-1, C, 256, H/d, W/d) for the categorical;
- "futures" (registered as `<sweep>_futures`): n = params["frames"] frames drawn after the last given
  one by the cached sampler (VideoPixelNetwork.sample), each drawn frame fed back, at
  params["temperature"], from one torch.Generator seeded by params["seed"]: uint8 (B, n, C, H/d, W/d),
  the same frames as model.sample with a generator seeded alike, and never touching the global RNG.
  The params' defaults (the trial's horizon, 1.0, 0) live in the signature's params schema.

The limits bound what one request may cost, so that no request can occupy a server's thread for long
(MLflow's request timeout answers 504 but leaves the prediction running): max_batch (sequences),
max_context (given frames), max_frames (frames drawn, futures only) and max_pixels (pixels predicted:
B x n x C x H/d x W/d drawn, or B x (T-1) x C x H/d x W/d scored), the product that bounds the work.
A request past one is refused before anything is computed, with MLflow's INVALID_PARAMETER_VALUE,
which the scoring server answers as 400 naming the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from vpn.checkpoint import load_checkpoint, load_model
from vpn.config import TrainConfig
from vpn.evaluate import prepare

CHECKPOINT = "checkpoint"  # the artifact's key: the trial's checkpoint file
MODES = ("logits", "futures")
# mode -> its limits, in the order a request is checked (the cheap shape checks before the product)
LIMITS = {
    "logits": ("max_batch", "max_context", "max_pixels"),
    "futures": ("max_batch", "max_context", "max_frames", "max_pixels"),
}
RAISE = "raise it where the model is logged, or with MLFLOW_PYFUNC_INFERENCE_CONFIG for a server (docs/forecast.md)"


def refuse(message: str) -> MlflowException:
    """A bad request: the scoring server answers INVALID_PARAMETER_VALUE as 400 with this message."""
    return MlflowException.invalid_parameter_value(message)


def check_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model's config, checked: {"mode": one of MODES, and every limit of that mode: an int >= 1}."""
    config = dict(config or {})
    mode = config.get("mode")
    if mode not in MODES:
        raise refuse(f"model_config.mode must be one of {', '.join(MODES)}, got {mode!r}")
    unknown = sorted(set(config) - {"mode", *LIMITS[mode]})
    if unknown:
        raise refuse(f"model_config has no key {unknown[0]!r} in mode {mode} (keys: mode, {', '.join(LIMITS[mode])})")
    for key in LIMITS[mode]:
        value = config.get(key)
        # bool is an int to Python; a JSON override may carry 1e6 or "8": each a mistake to name
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise refuse(f"model_config.{key} must be an integer >= 1, got {value!r}")
    return config


class CheckpointModel(mlflow.pyfunc.PythonModel):
    """A VideoPixelNetwork checkpoint as a pyfunc: logits or sampled futures (see the module docstring).

    `.model` is the VideoPixelNetwork itself, in eval mode:
    mlflow.pyfunc.load_model(uri).unwrap_python_model().model.
    """

    def load_context(self, context) -> None:
        self.config = check_config(context.model_config)
        self.mode = self.config["mode"]
        path = context.artifacts[CHECKPOINT]
        self.model = load_model(path)  # eval mode, on the CPU
        # only seq_len and downsample of it are used (prepare); the checkpoint's own config
        self.train_cfg = TrainConfig.from_dict(load_checkpoint(path)["train_config"]).replace(seq_len=None)

    # model_input: np.ndarray tells MLflow to validate against the logged signature, not a type hint's.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        given = np.asarray(model_input)
        if given.dtype != np.uint8:
            raise refuse(f"frames must be uint8 intensities (B, T, C, H, W), got {given.dtype}")
        channels = self.model.cfg.image_channels
        if given.ndim != 5 or given.shape[2] != channels:
            raise refuse(f"frames must be (B, T, {channels}, H, W), got {given.shape}")
        if self.mode == "logits":
            if given.shape[1] < 2:
                raise refuse(f"the logits need T >= 2 frames (each predicted from those before), got {given.shape[1]}")
            self.check_limits(given.shape, None)
            with torch.no_grad():
                return self.model(prepare(torch.from_numpy(given), self.train_cfg)).numpy()  # (B, T-1, C, [256,] h, w)
        params = params or {}
        n, temperature, seed = int(params["frames"]), float(params["temperature"]), int(params["seed"])
        if n < 1:
            raise refuse(f"params.frames must be >= 1, got {n}")
        if not temperature > 0:
            raise refuse(f"params.temperature must be > 0, got {temperature}")
        self.check_limits(given.shape, n)
        frames = prepare(torch.from_numpy(given), self.train_cfg)  # (B, T, C, H/d, W/d)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return self.model.sample(frames, n, generator=generator, temperature=temperature).numpy()

    def check_limits(self, shape: tuple[int, ...], frames: int | None) -> None:
        """Refuse a request past a limit before any work: shape (B, T, C, H, W) at the data's size,
        frames the frames to draw (futures) or None (logits: T-1 frames predicted)."""
        b, t, c, h, w = shape
        d = self.train_cfg.downsample
        n = frames if frames is not None else t - 1
        pixels = b * n * c * (h // d) * (w // d)
        asked = {
            "max_batch": (b, f"a batch of {b} sequences (the inputs' first axis)"),
            "max_context": (t, f"{t} given frames (the inputs' second axis)"),
            "max_frames": (frames, f"params.frames={frames}"),
            "max_pixels": (pixels, f"{b} sequences x {n} frames x {c}x{h // d}x{w // d} = {pixels} pixels to predict"),
        }
        for key in LIMITS[self.mode]:
            value, what = asked[key]
            if value > self.config[key]:
                raise refuse(f"{what}: over this model's limit {key}={self.config[key]}; {RAISE}")


mlflow.models.set_model(CheckpointModel())
