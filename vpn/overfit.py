"""The blog post's experiment: train on one sequence until its NLL reaches the sequence's floor."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from vpn.config import TrainConfig, VPNConfig
from vpn.evaluate import prepare
from vpn.metrics import bernoulli_lower_bound
from vpn.train import NonFiniteLossError, Trainer


@dataclass(frozen=True)
class OverfitResult:
    """converged_step: first step whose loss was within tol of the floor (None: never).
    losses: train nats/frame at steps 1..len(losses). floor, tol: in nats/frame."""

    converged_step: int | None
    floor: float
    tol: float
    losses: list[float]


def sequence_floor(model_cfg: VPNConfig, sequence: Tensor) -> float:
    """The smallest NLL (nats/frame over frames 1..T-1) any model can reach on this sequence.

    bernoulli: the entropy of the grey-level targets (the paper's lower bound). categorical: 0, as
    each sub-pixel has one true value that a model can put all its mass on.
    """
    if model_cfg.output == "categorical":
        return 0.0
    return float(bernoulli_lower_bound(sequence[None], context=1)[0])


def overfit(
    model_cfg: VPNConfig,
    train_cfg: TrainConfig,
    sequence: Tensor,
    tol: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> OverfitResult:
    """Train on one sequence (uint8 (T, C, H, W)) until its NLL is within tol of its floor.

    tol defaults to 0.01 nats per sub-pixel (0.01 * C * H * W nats/frame after seq_len/downsample).
    Runs at most train_cfg.steps updates and reads the loss every step (this is a diagnostic, so a
    host sync per step is fine). Returns the step at which it converged, as the blog post reports.
    """
    from tqdm.auto import tqdm

    train_cfg = train_cfg.replace(batch_size=1)
    seq = prepare(sequence[None], train_cfg)[0]  # (T, C, H, W) after seq_len / downsample
    floor = sequence_floor(model_cfg, seq)
    tol = 0.01 * seq[0].numel() if tol is None else float(tol)
    trainer = Trainer(model_cfg, train_cfg.replace(seq_len=None, downsample=1, data="fixed"), seq[None])
    batch = seq[None]
    losses: list[float] = []
    converged = None
    with tqdm(total=train_cfg.steps, disable=not progress, desc="overfit", dynamic_ncols=True) as bar:
        for step in range(1, train_cfg.steps + 1):
            loss = float(trainer.train_step(batch))
            if not math.isfinite(loss):
                raise NonFiniteLossError(step, loss)
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
            bar.update(1)
            bar.set_postfix(nats=f"{loss:.2f}", floor=f"{floor:.2f}")
            if loss <= floor + tol:
                converged = step
                break
    return OverfitResult(converged, floor, tol, losses)
