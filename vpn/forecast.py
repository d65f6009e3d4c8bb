"""Free-running prediction scored with the field's frame metrics (vpn.video_metrics).

Given the first `context` frames of a test sequence, the model draws every later frame with the
cached sampler (vpn.sample), each drawn frame fed back as the next step's input: the ground truth
after the context is never read. k samples are drawn per sequence, and three summaries reported:

- mean: each metric averaged over the k samples (and sequences and frames). What one draw from the
  model is worth; the Bernoulli head draws binary frames, so against grey targets even a perfect
  model pays for every grey pixel here.
- best: per sequence, the sample whose metric (averaged over the horizon) is best, chosen per
  metric; the protocol of the stochastic video models (SV2P, Babaeizadeh et al. 2018; SVG, Denton
  and Fergus 2018; SAVP, Lee et al. 2018). An optimistic number: it grows with k.
- mean_frame: the metrics of the per-pixel mean of the k samples, a Monte Carlo estimate of the
  model's expected frame. Deterministic models trained with MSE (OpenSTL's) predict the conditional
  mean, so this is the like-for-like number beside theirs; the reports lead with it.

Randomness: one torch.Generator seeded by `seed` draws everything, so the global RNG the training
uses is never touched, and the same seed gives the same frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vpn.batches import as_dataset
from vpn.config import TrainConfig
from vpn.evaluate import prepare
from vpn.metrics import grey_targets
from vpn.model import VideoPixelNetwork
from vpn.video_metrics import HIGHER_IS_BETTER, METRICS, frame_metrics

SUMMARIES = ("mean", "best", "mean_frame")


@dataclass(frozen=True)
class ForecastScore:
    """Free-running scores of `sequences` test sequences, `samples` draws each (see the module docstring).

    mean, best, mean_frame: {metric: value} over sequences and the `frames` predicted frames.
    per_frame: {metric: one value per predicted frame}, the mean over samples and sequences, to see
        how each metric degrades over the horizon.
    """

    sequences: int
    samples: int
    frames: int
    temperature: float
    mean: dict[str, float]
    best: dict[str, float]
    mean_frame: dict[str, float]
    per_frame: dict[str, tuple[float, ...]]


@torch.no_grad()
def free_run(
    model: VideoPixelNetwork,
    frames: Tensor,
    context: int,
    samples: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    method: str = "cached",
) -> Tensor:
    """frames uint8 (B, T, C, H, W) -> drawn uint8 (B, samples, T - context, C, H, W).

    Only frames[:, :context] is read; each drawn frame is the input of the next step.
    """
    b, t = frames.shape[:2]
    if not 1 <= context < t:
        raise ValueError(f"context={context} must be in [1, T) for T={t}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = next(model.parameters()).device
    given = frames[:, :context].to(device).repeat_interleave(samples, dim=0)  # (B*k, context, C, H, W)
    drawn = model.sample(given, t - context, generator=generator, temperature=temperature, method=method)
    return drawn.cpu().unflatten(0, (b, samples))  # (B, k, T - context, C, H, W)


def _best_of(per_sample: np.ndarray, metric: str) -> float:
    """(N, k, T) -> the mean over sequences of the best sample's horizon mean."""
    horizon = per_sample.mean(axis=2)  # (N, k)
    best = horizon.max(axis=1) if HIGHER_IS_BETTER[metric] else horizon.min(axis=1)
    return float(best.mean())


@torch.no_grad()
def forecast(
    model: VideoPixelNetwork,
    data: Dataset | Tensor,
    cfg: TrainConfig,
    sequences: int | None = None,
    samples: int = 10,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
) -> ForecastScore:
    """Score the first `sequences` sequences of data (None: all) by free-running prediction.

    Sequences are prepared as in training (cfg's seq_len, downsample); frames cfg.context..T-1 are
    drawn given the frames before, `samples` times each, in batches of batch_size sequences
    (default cfg.batch_size; the draws depend on it, as on the seed).
    """
    data = as_dataset(data)
    n = len(data) if sequences is None else min(len(data), sequences)
    if n < 1:
        raise ValueError("nothing to score: the data holds no sequence")
    step = batch_size or cfg.batch_size
    generator = torch.Generator().manual_seed(seed)  # a CPU generator drives a model on any device
    per_sample = {m: [] for m in METRICS}  # each (B, k, T') per batch
    per_mean_frame = {m: [] for m in METRICS}  # each (B, T') per batch
    for start in range(0, n, step):
        truth = prepare(torch.stack([data[i] for i in range(start, min(n, start + step))]), cfg)
        drawn = free_run(model, truth, cfg.context, samples, generator, temperature)  # (B, k, T', C, H, W)
        target = grey_targets(truth[:, cfg.context :]).numpy()  # (B, T', C, H, W)
        b, k, h = drawn.shape[:3]
        pred = grey_targets(drawn).numpy()
        scores = frame_metrics(pred.reshape(b * k, *pred.shape[2:]), np.repeat(target, k, axis=0))
        mean_scores = frame_metrics(pred.mean(axis=1), target)
        for m in METRICS:
            per_sample[m].append(scores[m].reshape(b, k, h))
            per_mean_frame[m].append(mean_scores[m])
    values = {m: np.concatenate(v) for m, v in per_sample.items()}  # (N, k, T')
    frames_mean = {m: np.concatenate(v) for m, v in per_mean_frame.items()}  # (N, T')
    return ForecastScore(
        sequences=n,
        samples=samples,
        frames=values["mse"].shape[2],
        temperature=temperature,
        mean={m: float(v.mean()) for m, v in values.items()},
        best={m: _best_of(v, m) for m, v in values.items()},
        mean_frame={m: float(v.mean()) for m, v in frames_mean.items()},
        per_frame={m: tuple(float(x) for x in v.mean(axis=(0, 1))) for m, v in values.items()},
    )
