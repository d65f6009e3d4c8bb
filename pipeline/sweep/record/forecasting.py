"""Free-running scoring of a finished train-mode trial (vpn.forecast), and its MLflow keys.

After the test NLL, a trial with train.forecast_samples = k > 0 draws k futures of each of the first
train.forecast_sequences test sequences (or test_sequences) and logs, once, at its final step:

- test_mse, test_mae, test_ssim, test_psnr: the mean over the k samples (OpenSTL's definitions,
  vpn.video_metrics);
- test_<metric>_best: the best of k per sequence; test_<metric>_mean_frame: the per-pixel mean of
  the k samples (the like-for-like number beside deterministic models: vpn.forecast);
- test_forecast_sequences, test_forecast_samples: what was scored;
- test_<metric>_by_frame: one value per predicted frame, logged with step = 1..horizon (so this key's
  step counts frames after the context, not training steps): how each metric degrades.

Scoring runs after training has ended, on its own torch.Generator (seeded by train.seed), so the
NLLs the trial logged are those it would log without it.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.entities import Metric

from vpn.data import MovingMNIST
from vpn.forecast import ForecastScore, forecast
from vpn.train import Trainer
from vpn.video_metrics import METRICS

SEQUENCES_KEY, SAMPLES_KEY = "test_forecast_sequences", "test_forecast_samples"
SECONDS_KEY = "test_forecast_seconds"  # wall time of the scoring, for its cost (docs/forecast.md)
MEAN_KEYS = tuple(f"test_{m}" for m in METRICS)
BEST_KEYS = tuple(f"test_{m}_best" for m in METRICS)
MEAN_FRAME_KEYS = tuple(f"test_{m}_mean_frame" for m in METRICS)
BY_FRAME_KEYS = tuple(f"test_{m}_by_frame" for m in METRICS)
SCALAR_KEYS = (*MEAN_KEYS, *BEST_KEYS, *MEAN_FRAME_KEYS, SEQUENCES_KEY, SAMPLES_KEY, SECONDS_KEY)


def scalars(result: ForecastScore, seconds: float) -> dict[str, float]:
    """The logged scalar metrics of a ForecastScore (see the module docstring)."""
    out = {f"test_{m}": result.mean[m] for m in METRICS}
    out.update({f"test_{m}_best": result.best[m] for m in METRICS})
    out.update({f"test_{m}_mean_frame": result.mean_frame[m] for m in METRICS})
    out.update({SEQUENCES_KEY: float(result.sequences), SAMPLES_KEY: float(result.samples), SECONDS_KEY: seconds})
    return out


def by_frame(result: ForecastScore, timestamp_ms: int | None = None) -> list[Metric]:
    """test_<metric>_by_frame as MLflow metrics, step = 1..horizon, for one log_batch."""
    ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    return [
        Metric(f"test_{m}_by_frame", float(v), ts, step)
        for m in METRICS
        for step, v in enumerate(result.per_frame[m], start=1)
    ]


def forecast_test_split(trainer: Trainer, data_root: str | Path) -> ForecastScore | None:
    """The trial's test split scored by free-running prediction; None when forecast_samples is 0."""
    cfg = trainer.cfg
    if cfg.forecast_samples == 0:
        return None
    sequences = cfg.forecast_sequences if cfg.forecast_sequences is not None else cfg.test_sequences
    return forecast(
        trainer.model,
        MovingMNIST(data_root, "test"),
        cfg,
        sequences,
        samples=cfg.forecast_samples,
        temperature=cfg.forecast_temperature,
        seed=cfg.seed,
    )
