"""A sweep's compute budget (`run.budget_gpu_hours`): what one trial is estimated to cost, and the ledger
that stops a searcher from starting trials the budget cannot pay for.

The per-trial cost is an estimate, never a measurement:

    GPU-hours = 3 x F x (T - 1) x B x S / (PEAK_FLOPS x MFU) / 3600

F: the counted FLOPs of one frame's forward pass (vpn.model.count_flops_per_frame, at the frame size
after train.downsample), T - 1 the frames a sequence of train.seq_len predicts, B train.batch_size, S
train.steps; 3 x for forward and backward (the backward pass costs about twice the forward). PEAK_FLOPS
is one H100 SXM's dense bf16 peak and MFU the fraction of it a trial is assumed to reach (the figure
sweeps/paper_ablation.yaml's estimates use). Validation, sampling and data loading are not counted.

The ledger (Budget) counts the estimated cost of every trial started; a trial that early stopping
(ASHA) ended at step s of S gives back (1 - s/S) of its cost. A new trial starts only if the started
cost, less what was given back, plus its own cost stays within the budget; the first that would pass
it ends the search (pipeline.sweep.trials.search.NumberedSearcher asks). Only searched sweeps take a budget:
a grid runs every point, its cost is known before it starts (allowed_trials).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vpn.model import count_flops_per_frame

PEAK_FLOPS = 989e12  # NVIDIA H100 SXM, dense bf16 (its datasheet); an estimate's assumption
MFU = 0.4  # the fraction of PEAK_FLOPS a trial is assumed to reach (unmeasured)
# Moving MNIST's frames (params.yaml generate.frame_size): the validation, the plan and the ledger all count
# at this size, so that a budget means the same before and after the data is read.
FRAME_SIZE = 64
SEQ_LEN = 20  # the data's sequence length where train.seq_len is null (params.yaml generate.seq_len)


def trial_gpu_hours(sweep: Any, point: Any, frame_size: int = FRAME_SIZE) -> float:
    """The estimated GPU-hours of one trial of `point` (its .model VPNConfig and .train TrainConfig), run
    to its last step; see the module docstring. `sweep` is unused today: a finer estimate (the memory
    plan's, which knows the workers and the precision) takes its place with the same signature."""
    t = point.train
    side = max(1, frame_size // t.downsample)
    flops = count_flops_per_frame(point.model, side, side)
    frames = (t.seq_len or SEQ_LEN) - 1
    return 3.0 * flops * frames * t.batch_size * t.steps / (PEAK_FLOPS * MFU) / 3600.0


def allowed_trials(budget: float, cheapest: float, dearest: float, trials: int) -> tuple[int, int]:
    """How many trials a budget pays for, between all at the dearest corner's cost and all at the
    cheapest's, capped at the sweep's trial count (early stopping can only raise the first)."""
    return min(trials, math.floor(budget / dearest)), min(trials, math.floor(budget / cheapest))


def check_budget(budget: float | None, costs: list[float], searched: bool) -> None:
    """Refuse a budget on a grid, and one below the cheapest trial (no trial could start); ValueError."""
    if budget is None:
        return
    if not searched:
        raise ValueError(
            "a grid runs every point (its cost is known before it starts); a budget needs search.algorithm "
            "random, optuna or bohb"
        )
    if budget < min(costs):
        raise ValueError(
            f"budget_gpu_hours={budget:g} is less than one trial: the cheapest is estimated at {min(costs):.4g} "
            "GPU-hours (pipeline.sweep.spec.budget)"
        )


def plan_line(budget: float | None, costs: list[float], trials: int) -> str:
    """One line for the sweep's plan: the per-trial estimate and how many trials the budget allows."""
    cheap, dear = min(costs), max(costs)
    per = f"{cheap:.3g}" if math.isclose(cheap, dear) else f"{cheap:.3g} to {dear:.3g}"
    line = f"estimated {per} GPU-hours a trial (counted FLOPs at {MFU:.0%} of an H100's bf16 peak; an estimate)"
    if budget is None:
        return f"{line}; no budget"
    low, high = allowed_trials(budget, cheap, dear, trials)
    allows = f"{high}" if low == high else f"{low} to {high}"
    return f"{line}; budget {budget:g} GPU-hours allows {allows} of {trials} trials"


@dataclass
class Budget:
    """The ledger of one sweep execution: started cost, and what early stopping gave back (GPU-hours).

    Mutable on purpose: a searcher's state, saved and restored with the Tuner (Searcher.get_state).
    """

    limit: float
    started: dict[str, float] = field(default_factory=dict)  # trial id -> estimated cost
    saved: float = 0.0

    @property
    def spent(self) -> float:
        return sum(self.started.values()) - self.saved

    def allows(self, cost: float) -> bool:
        return self.spent + cost <= self.limit * (1 + 1e-9)  # rounding: a budget of exactly n trials allows n

    def start(self, trial_id: str, cost: float) -> None:
        self.started[trial_id] = cost

    def finish(self, trial_id: str, step: int | None, steps: int) -> None:
        """A trial ended at `step` of `steps` (None: it never reported): the unrun part is given back."""
        cost = self.started.get(trial_id)
        if cost is None or step is None or step >= steps:
            return
        self.saved += cost * (1 - max(0, step) / steps)
