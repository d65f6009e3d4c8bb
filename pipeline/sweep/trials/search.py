"""A searched sweep in Ray Tune: its space as Tune domains, the seeded searcher, its scheduler, each trial's config.

    param_space = {"trial": base TrialConfig dict (run_id None), "axes": {"model.enc_blocks": tune.randint(...)}}
    search_alg  = NumberedSearcher(Repeater(OptunaSearch(sampler=TPESampler(seed) | RandomSampler(seed)), k), budget)
                | NumberedSearcher(TuneBOHB(seed), budget)                      # search.algorithm: bohb
    scheduler   = ASHAScheduler (run.asha.enabled) | HyperBandForBOHB (bohb) | None

- random: Optuna's RandomSampler; optuna: Optuna's TPESampler (n_startup_trials: a third of the draws,
  2 to 10, random before TPE models anything). Both through Ray Tune's OptunaSearch, seeded with
  search.seed: the same spec draws the same configs (TPE's later draws also follow the results).
- bohb: Ray Tune's TuneBOHB (hpbandster's BOHB, Falkner et al. 2018) with its HyperBandForBOHB
  scheduler, on the step count: max_t is the profile's train.steps, and 1/reduction_factor of each
  bracket's trials go on at each rung (run.asha.reduction_factor, HyperBand's eta; ASHA itself stays
  off, the spec refuses both). HyperBand pauses a trial at its rung (it resumes from its last
  checkpoint) and stops the ones that lose; BOHB learns from every trial's score at every rung. Its
  random draws (all of them until it has a model) come from ConfigSpace seeded with search.seed; its
  model-based draws use numpy's global generator, seeded here too, and also follow the results.
- run.seeds = k: Ray Tune's Repeater runs each draw k times (config["__trial_index__"] = 0..k-1, the
  seed offset) and tells the searcher the mean of the k validation NLLs.
- NumberedSearcher numbers the draws (config["__number__"], the trial's point index and label) and
  keeps the budget (pipeline.sweep.spec.budget.Budget); both are searcher state, saved and restored with the
  Tuner, so a resumed sweep continues the numbering and the ledger.

trial_config(config) turns what Tune hands a trial into its TrialConfig: the base with the drawn axes
applied, the seed offset added, and a label t<number>-<axes>[-s<seed index>].
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ray.tune.search import Searcher

from pipeline.sweep.spec.budget import Budget, trial_gpu_hours
from pipeline.sweep.spec.grid import point_label
from pipeline.sweep.spec.space import Range
from pipeline.sweep.trials.trial import TrialConfig
from vpn.config import TrainConfig, VPNConfig

NUMBER, INDEX = "__number__", "__trial_index__"  # INDEX: ray.tune.search.repeater.TRIAL_INDEX


def domains(axes: Mapping[str, Any]) -> dict[str, Any]:
    """Tune domains of the axes: tune.choice for a list, randint (high end included), uniform, loguniform."""
    from ray import tune

    out = {}
    for path, axis in axes.items():
        if not isinstance(axis, Range):
            out[path] = tune.choice(list(axis))
        elif axis.kind == "int":
            out[path] = tune.randint(axis.low, axis.high + 1)  # randint's upper end is exclusive
        elif axis.kind == "uniform":
            out[path] = tune.uniform(axis.low, axis.high)
        else:
            out[path] = tune.loguniform(axis.low, axis.high)
    return out


def param_space(sweep: Any, base: TrialConfig) -> dict[str, Any]:
    return {"trial": base.to_dict(), "axes": domains(dict(sweep.search.axes())), "seeds": sweep.run.seeds}


def searcher(sweep: Any, metric: str, frame_size: int) -> Any:
    """The seeded searcher of `sweep`, repeated run.seeds times, numbered and budgeted."""
    budget = Budget(sweep.run.budget_gpu_hours) if sweep.run.budget_gpu_hours is not None else None
    if sweep.search.algorithm == "bohb":  # no Repeater: the spec refuses run.seeds > 1 with bohb
        return NumberedSearcher(_bohb(sweep.search.seed, metric), budget, frame_size)
    import optuna
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    seed, n = sweep.search.seed, sweep.run.num_samples
    if sweep.search.algorithm == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n // 3)))
    inner = OptunaSearch(metric=metric, mode="min", sampler=sampler)
    if sweep.run.seeds > 1:
        inner = Repeater(inner, repeat=sweep.run.seeds, set_index=True)
    return NumberedSearcher(inner, budget, frame_size)


def _bohb(seed: int, metric: str) -> Any:
    """Ray Tune's TuneBOHB, seeded; a clear error where hpbandster or ConfigSpace is missing."""
    import numpy as np

    try:
        import ConfigSpace  # noqa: F401
        import hpbandster  # noqa: F401
    except ImportError as e:  # both are project dependencies (pyproject.toml); an old environment lacks them
        raise RuntimeError(f"search.algorithm bohb needs hpbandster and ConfigSpace: pip install -e . ({e})") from e
    from ray.tune.search.bohb import TuneBOHB

    # hpbandster's BOHB draws its model-based configs from numpy's global generator (np.random.rand,
    # scipy's truncnorm): seeded here, in the driver, which is where the searcher runs.
    np.random.seed(seed)
    return TuneBOHB(metric=metric, mode="min", seed=seed)


def scheduler(sweep: Any) -> Any:
    """The sweep's trial scheduler: HyperBandForBOHB for bohb, ASHA where run.asha.enabled, else None."""
    from ray.tune.schedulers import ASHAScheduler, HyperBandForBOHB

    from pipeline.sweep.record.tracking import VAL_KEY

    steps = max(p.train.steps for p in sweep.points)  # a searched sweep's points: its space's corners
    asha = sweep.run.asha
    if sweep.search.algorithm == "bohb":
        return HyperBandForBOHB(
            time_attr="step", metric=VAL_KEY, mode="min", max_t=steps, reduction_factor=asha.reduction_factor
        )
    if not asha.enabled:
        return None
    return ASHAScheduler(
        time_attr="step",
        metric=VAL_KEY,
        mode="min",
        max_t=steps,
        grace_period=min(asha.grace_steps, steps),
        reduction_factor=asha.reduction_factor,
    )


def trial_config(config: Mapping[str, Any]) -> TrialConfig:
    """The TrialConfig of a Tune trial's config: a grid point's as it is, a searched one's as drawn."""
    base = TrialConfig.from_dict(config["trial"])
    if "axes" not in config:
        return base
    axes, index = dict(config["axes"]), int(config.get(INDEX, 0))
    model = {**base.model.to_dict(), **{p[6:]: v for p, v in axes.items() if p.startswith("model.")}}
    train = {**base.train.to_dict(), **{p[6:]: v for p, v in axes.items() if p.startswith("train.")}}
    train["seed"] = base.train.seed + index
    number = int(config[NUMBER])
    shown = {p: float(f"{v:.3g}") if isinstance(v, float) else v for p, v in axes.items()}
    label = f"t{number:03d}-" + point_label(shown, index if config.get("seeds", 1) > 1 else None)
    return base.replace(point=number, label=label, model=VPNConfig.from_dict(model), train=TrainConfig.from_dict(train))


class NumberedSearcher(Searcher):
    """Numbers each suggestion and stops suggesting once the budget would pass (Searcher.FINISHED).

    Wraps Ray Tune's searchers as its ConcurrencyLimiter does; only the numbering and the ledger are
    its own (get_state / set_state, saved with the Tuner's searcher state).
    """

    def __init__(self, searcher: Any, budget: Budget | None, frame_size: int) -> None:
        self.searcher, self.budget, self.frame_size = searcher, budget, frame_size
        self.count = 0
        self.constants: dict[str, Any] = {}
        self.steps: dict[str, int] = {}  # trial id -> its train.steps (for what early stopping saved)
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        # The constant parts of param_space (Tune merges them into a suggestion only after suggest).
        self.constants = {k: v for k, v in config.items() if k != "axes"}
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | str | None:
        config = self.searcher.suggest(trial_id)
        if config is None or config == self.FINISHED:
            return config
        # Plain Python values: TuneBOHB hands a choice among ints or floats back as a numpy scalar.
        if "axes" in config:
            config = {**config, "axes": {k: v.item() if hasattr(v, "item") else v for k, v in config["axes"].items()}}
        config = {**config, NUMBER: self.count}
        cfg = trial_config({**self.constants, **config})
        if self.budget is not None:
            cost = trial_gpu_hours(None, cfg, self.frame_size)
            if not self.budget.allows(cost):  # Tune asks no more after FINISHED: no later trial starts
                return self.FINISHED
            self.budget.start(trial_id, cost)
        self.steps[trial_id] = cfg.train.steps
        self.count += 1
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    # HyperBandForBOHB tells the searcher of each trial it pauses and resumes (TuneBOHB counts only
    # running trials against its concurrency), through whatever wraps it, as ConcurrencyLimiter does.
    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(trial_id)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.budget is not None and trial_id in self.steps:
            self.budget.finish(trial_id, (result or {}).get("step"), self.steps[trial_id])
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
