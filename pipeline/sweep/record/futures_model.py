"""The registered model that predicts futures: an MLflow pyfunc (models from code) over a checkpoint.

MLflow runs this file when the model loads (mlflow.pyfunc.load_model, `mlflow models serve`): it is
the model's code, copied into the model's folder by pipeline.sweep.record.registry, with vpn/ beside it
(code_paths), so loading needs torch and MLflow, not this project. Nothing is unpickled: the weights
come from the trial's checkpoint, read by vpn.checkpoint.load_model with weights_only.

predict(frames uint8 (B, T, C, H, W) at the data's size, params) -> uint8 (B, n, C, H/d, W/d):
  1. the trial's own frame preparation (vpn.evaluate.prepare with the checkpoint's TrainConfig):
     the average-pool by `downsample`. seq_len is not applied: it keeps the first seq_len frames, and
     here every given frame is context, so cutting them would predict after the wrong frame;
  2. n = params["frames"] frames drawn after the last given one by the cached sampler
     (VideoPixelNetwork.sample), each drawn frame fed back, at params["temperature"], from one
     torch.Generator seeded by params["seed"]: the same seed gives the same frames as
     model.sample with a generator seeded alike, and never touches the global RNG.
The params' defaults (the trial's horizon, 1.0, 0) live in the signature's params schema.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from vpn.checkpoint import load_checkpoint, load_model
from vpn.config import TrainConfig
from vpn.evaluate import prepare

CHECKPOINT = "checkpoint"  # the artifact's key: the trial's checkpoint file


class FuturesModel(mlflow.pyfunc.PythonModel):
    """Sampled future frames of a VideoPixelNetwork checkpoint (see the module docstring)."""

    def load_context(self, context) -> None:
        path = context.artifacts[CHECKPOINT]
        self.model = load_model(path)  # eval mode, on the CPU
        # only seq_len and downsample of it are used (prepare); the checkpoint's own config
        self.train_cfg = TrainConfig.from_dict(load_checkpoint(path)["train_config"]).replace(seq_len=None)

    # model_input: np.ndarray tells MLflow to validate against the logged signature, not a type hint's.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        params = params or {}
        n, temperature, seed = int(params["frames"]), float(params["temperature"]), int(params["seed"])
        if n < 1:
            raise ValueError(f"params.frames must be >= 1, got {n}")
        if not temperature > 0:
            raise ValueError(f"params.temperature must be > 0, got {temperature}")
        given = np.asarray(model_input)
        if given.dtype != np.uint8:
            raise TypeError(f"frames must be uint8 intensities (B, T, C, H, W), got {given.dtype}")
        frames = prepare(torch.from_numpy(given), self.train_cfg)  # (B, T, C, H/d, W/d)
        generator = torch.Generator().manual_seed(seed)
        drawn = self.model.sample(frames, n, generator=generator, temperature=temperature)  # (B, n, C, H/d, W/d)
        return drawn.numpy()


mlflow.models.set_model(FuturesModel())
