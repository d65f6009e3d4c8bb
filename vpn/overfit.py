"""The blog post's experiment: train on one sequence until its NLL reaches the sequence's floor.

One loop (`fit_sequence`) serves both callers: `overfit` (`python -m vpn train --overfit`, with a
progress bar) and the sweep's overfit trials (pipeline.sweep.trials.trainable, which resumes from
checkpoints and logs, checkpoints and draws pictures in its per-step hook). `one_sequence` prepares
what both train on, so the floor, the tolerance and the Trainer's config are the same in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from vpn.config import TrainConfig, VPNConfig
from vpn.evaluate import prepare
from vpn.metrics import bernoulli_lower_bound
from vpn.train import NonFiniteLossError, Trainer

# The default tolerance: this many nats per sub-pixel above the floor count as converged.
TOL_PER_SUBPIXEL = 0.01


@dataclass(frozen=True)
class OverfitResult:
    """converged_step: first step whose loss was within tol of the floor (None: never).
    losses: train nats/frame at steps 1..len(losses). floor, tol: in nats/frame."""

    converged_step: int | None
    floor: float
    tol: float
    losses: list[float]


@dataclass(frozen=True)
class OneSequence:
    """What an overfit run trains on, and when it stops.

    sequence: uint8 (T, C, H, W), already cut to seq_len and pooled by downsample.
    floor, tol: nats/frame; converged at the first step whose loss is <= floor + tol.
    train_cfg: the Trainer's config: batch 1, and no seq_len or downsample (done on `sequence`).
    """

    sequence: Tensor
    floor: float
    tol: float
    train_cfg: TrainConfig

    @property
    def batch(self) -> Tensor:
        """uint8 (1, T, C, H, W): the same batch at every step."""
        return self.sequence[None]


def sequence_floor(model_cfg: VPNConfig, sequence: Tensor) -> float:
    """The smallest NLL (nats/frame over frames 1..T-1) any model can reach on this sequence.

    bernoulli: the entropy of the grey-level targets (the paper's lower bound). categorical: 0, as
    each sub-pixel has one true value that a model can put all its mass on.
    """
    if model_cfg.output == "categorical":
        return 0.0
    return float(bernoulli_lower_bound(sequence[None], context=1)[0])


def one_sequence(
    model_cfg: VPNConfig,
    train_cfg: TrainConfig,
    sequence: Tensor,
    tol: float | None = None,
    tol_per_subpixel: float = TOL_PER_SUBPIXEL,
) -> OneSequence:
    """sequence uint8 (T, C, H, W) as train_cfg prepares it, its floor, and the tolerance in nats/frame:
    `tol` when given, else tol_per_subpixel * C * H * W (of the prepared frames)."""
    train_cfg = train_cfg.replace(batch_size=1)
    seq = prepare(sequence[None], train_cfg)[0]  # (T, C, H, W) after seq_len / downsample
    floor = sequence_floor(model_cfg, seq)
    tol = tol_per_subpixel * seq[0].numel() if tol is None else float(tol)
    # seq is already cut and pooled: the Trainer must not do it again.
    return OneSequence(seq, floor, tol, train_cfg.replace(seq_len=None, downsample=1, data="fixed"))


def fit_sequence(
    trainer: Trainer,
    problem: OneSequence,
    steps: int,
    on_step: Callable[[int, float, bool], None] | None = None,
) -> int | None:
    """Train on problem.batch from trainer.step to `steps`, stopping at the first step within tol of
    the floor; returns that step, or None when it never got there.

    The loss is read every step (a host sync per step: this is a diagnostic), and a non-finite one
    raises NonFiniteLossError. on_step(step, loss, converged) runs after every step, the last one
    included (converged: this step is within tol).
    """
    batch = problem.batch
    while trainer.step < steps:
        loss = float(trainer.train_step(batch))
        step = trainer.step
        if not math.isfinite(loss):
            raise NonFiniteLossError(step, loss)
        converged = loss <= problem.floor + problem.tol
        if on_step is not None:
            on_step(step, loss, converged)
        if converged:
            return step
    return None


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

    problem = one_sequence(model_cfg, train_cfg, sequence, tol)
    trainer = Trainer(model_cfg, problem.train_cfg, problem.batch)
    losses: list[float] = []
    with tqdm(total=train_cfg.steps, disable=not progress, desc="overfit", dynamic_ncols=True) as bar:

        def step_done(step: int, loss: float, converged: bool) -> None:
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
            bar.update(1)
            bar.set_postfix(nats=f"{loss:.2f}", floor=f"{problem.floor:.2f}")

        converged = fit_sequence(trainer, problem, train_cfg.steps, step_done)
    return OverfitResult(converged, problem.floor, problem.tol, losses)
