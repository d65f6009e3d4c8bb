"""Searched sweeps: the space validated before Ray, seeded searchers (Ray Tune's OptunaSearch, Repeater),
the budget's ledger; and (slow) real searched sweeps through Ray: the trial count, nesting under the
sweep's parent run, and a budget that allows exactly 3 trials running exactly 3."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.sweep.spec import budget
from pipeline.sweep.spec.sweep import SpecError, load_spec
from pipeline.sweep.trials import search
from pipeline.sweep.trials.trial import TrialConfig

# hpbandster 0.7.4 (2018) calls ConfigSpace APIs that ConfigSpace 1.x deprecates (pyproject.toml pins <1.3).
pytestmark = pytest.mark.filterwarnings("ignore:Please use:DeprecationWarning")

TRAIN = {"steps": 10, "batch_size": 2, "context": 2, "device": "cpu", "log_every": 5, "val_every": 5}
SPACE = {"model": {"enc_blocks": {"int": [1, 3]}, "dec_blocks": [1, 2]}, "train": {"lr": {"loguniform": [1e-4, 1e-2]}}}


def spec_of(tmp_path: Path, search_: dict, run: dict, data: str = "data", **top) -> Path:
    spec = {
        "name": "s",
        "data": data,
        "model": {"output": "bernoulli", "filter_fraction": 0.03125},
        "train": TRAIN,
        "search": search_,
        "run": run,
        "profiles": {"cpu": {}},
        **top,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_of(tmp_path, algorithm="optuna", run=None, space=SPACE, seed=3):
    path = spec_of(tmp_path, {"algorithm": algorithm, "seed": seed, **space}, run or {"num_samples": 4})
    return load_spec(path, root=tmp_path).resolve("cpu")


def draws(sweep, n: int) -> list[TrialConfig]:
    """n suggestions of the sweep's searcher, each completed at once (metric: its number), as Tune would."""
    base = TrialConfig.of_point(sweep, sweep.points[0], None, "sqlite:///unused", None)
    s = search.searcher(sweep, "val", budget.FRAME_SIZE)
    s.set_search_properties(None, None, search.param_space(sweep, base))
    out = []
    for i in range(n):
        c = s.suggest(f"trial{i}")
        if c in (None, s.FINISHED):
            break
        out.append(search.trial_config({**s.constants, **c}))
        s.on_trial_complete(f"trial{i}", {"val": float(i % 3), "step": out[-1].train.steps})
    return out


def error_of(tmp_path, search_: dict, run: dict) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(spec_of(tmp_path, search_, run), root=tmp_path)
    return str(info.value)


# -- the space, checked before Ray ---------------------------------------------------------------------
def test_space_is_checked_at_both_ends_and_names_the_field(tmp_path):
    sweep = sweep_of(tmp_path)
    low, high = sweep.points  # the corners, checked like grid points
    assert (low.model.enc_blocks, low.model.dec_blocks, low.train.lr) == (1, 1, 1e-4)
    assert (high.model.enc_blocks, high.model.dec_blocks, high.train.lr) == (3, 2, 1e-2)
    assert sweep.trial_count == 4
    bad = {"algorithm": "random", "model": {"enc_blocks": {"int": [0, 3]}}}
    assert "search.model.enc_blocks" in error_of(tmp_path, bad, {"num_samples": 2})
    bad = {"algorithm": "random", "model": {"filter_fraction": {"uniform": [0.5, 2.0]}}}
    assert "search.model.filter_fraction" in error_of(tmp_path, bad, {"num_samples": 2})
    bad = {"algorithm": "random", "train": {"lr": {"loguniform": [0, 1]}}}
    assert "search.train.lr" in error_of(tmp_path, bad, {"num_samples": 2})
    assert "needs search.algorithm" in error_of(tmp_path, {"model": {"enc_blocks": {"int": [1, 2]}}}, {})
    assert "run.num_samples" in error_of(tmp_path, {"algorithm": "optuna", **SPACE}, {})
    assert "search.algorithm" in error_of(tmp_path, {"algorithm": "hyperopt", **SPACE}, {"num_samples": 2})


def test_bohb_refuses_asha_beside_it_and_repeats(tmp_path):
    bohb = {"algorithm": "bohb", **SPACE}
    message = error_of(tmp_path, bohb, {"num_samples": 2, "asha": {"enabled": True}})
    assert "run.asha.enabled" in message and "HyperBandForBOHB" in message
    message = error_of(tmp_path, bohb, {"num_samples": 2, "seeds": 2})
    assert "run.seeds" in message and "Repeater" in message
    sweep = sweep_of(tmp_path, "bohb", run={"num_samples": 2, "asha": {"reduction_factor": 2}})
    hb = search.scheduler(sweep)  # HyperBand on the step count, up to the profile's steps
    assert type(hb).__name__ == "HyperBandForBOHB" and hb._time_attr == "step" and hb._max_t_attr == 10
    assert hb._eta == 2


def test_grid_with_num_samples_is_told_of_seeds(tmp_path):
    message = error_of(tmp_path, {"model": {"enc_blocks": [1, 2]}}, {"num_samples": 2})
    assert "run.num_samples" in message and "run.seeds" in message


# -- the searchers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["random", "optuna", "bohb"])
def test_searchers_draw_inside_the_space_and_repeat_from_the_same_seed(tmp_path, algorithm):
    sweep = sweep_of(tmp_path, algorithm, run={"num_samples": 12})
    first = draws(sweep, 12)
    assert len(first) == 12
    for cfg in first:
        assert 1 <= cfg.model.enc_blocks <= 3 and isinstance(cfg.model.enc_blocks, int)
        assert cfg.model.dec_blocks in (1, 2) and 1e-4 <= cfg.train.lr <= 1e-2
    assert [c.point for c in first] == list(range(12)) and len({c.label for c in first}) == 12
    assert len({(c.model.enc_blocks, c.model.dec_blocks, c.train.lr) for c in first}) > 6  # not one config
    again = draws(sweep_of(tmp_path, algorithm, run={"num_samples": 12}), 12)
    assert [c.to_dict() for c in again] == [c.to_dict() for c in first]  # the same spec draws the same
    other = draws(sweep_of(tmp_path, algorithm, run={"num_samples": 12}, seed=4), 12)
    assert [c.train.lr for c in other] != [c.train.lr for c in first]


def test_bohb_state_survives_the_tuners_save_and_restore(tmp_path):
    """As Tune saves a searcher (SearchGenerator.save_to_dir: the wrappers' get_state, TuneBOHB's own
    pickle) and restores it on a resume: the numbering, the ledger and BOHB's results go on."""
    from ray.tune.search import SearchGenerator

    sweep = sweep_of(tmp_path, "bohb", run={"num_samples": 6})
    base = TrialConfig.of_point(sweep, sweep.points[0], None, "sqlite:///unused", None)

    def fresh():
        s = search.searcher(sweep, "val", budget.FRAME_SIZE)
        s.set_search_properties(None, None, search.param_space(sweep, base))
        return s

    def draw(s, ids, results=True):
        out = []
        for i in ids:
            out.append(search.trial_config({**s.constants, **s.suggest(f"trial{i}")}).to_dict())
            if results:  # as HyperBandForBOHB reports a rung: BOHB records the score at that budget
                s.on_trial_result(f"trial{i}", {"val": float(i), "step": 3, "hyperband_info": {"budget": 3}})
        return out

    whole = fresh()
    first, rest = draw(whole, range(3)), draw(whole, range(3, 6), results=False)
    s = fresh()
    assert draw(s, range(3)) == first
    SearchGenerator(s).save_to_dir(str(tmp_path), session_str="x")
    back = fresh()
    SearchGenerator(back).restore_from_dir(str(tmp_path))
    assert back.count == 3 and len(back.searcher.bohber.configs[3]) == 3  # BOHB's 3 results at budget 3
    # no model yet (BOHB needs dims + 1 results at a budget): the next draws are ConfigSpace's, seeded
    assert draw(back, range(3, 6), results=False) == rest
    assert [c["point"] for c in rest] == [3, 4, 5]


def test_seeds_repeat_each_draw_with_consecutive_seeds(tmp_path):
    sweep = sweep_of(tmp_path, "optuna", run={"num_samples": 3, "seeds": 2})
    drawn = draws(sweep, sweep.trial_count)
    assert len(drawn) == 6
    for a, b in zip(drawn[::2], drawn[1::2]):
        assert (a.model, a.train.lr) == (b.model, b.train.lr)
        assert (a.train.seed, b.train.seed) == (0, 1)
        assert a.label.endswith("-s0") and b.label.endswith("-s1")


# -- the budget --------------------------------------------------------------------------------------
def test_budget_allows_exactly_the_trials_it_pays_for(tmp_path):
    space = {"model": {"enc_blocks": [2], "dec_blocks": [1]}, "train": {"lr": {"loguniform": [1e-4, 1e-2]}}}
    one = budget.trial_gpu_hours(None, sweep_of(tmp_path, "random", space=space).points[0])
    sweep = sweep_of(tmp_path, "random", run={"num_samples": 5, "budget_gpu_hours": 3.5 * one}, space=space)
    assert len(draws(sweep, 5)) == 3
    # by hand: 3 x (forward + backward) x counted FLOPs x frames x batch x steps / (peak x MFU)
    from vpn.model import count_flops_per_frame

    flops = count_flops_per_frame(sweep.points[0].model, 64, 64)
    expected = 3 * flops * (20 - 1) * 2 * 10 / (budget.PEAK_FLOPS * budget.MFU) / 3600
    assert one == pytest.approx(expected)
    line = budget.plan_line(3.5 * one, [one], 5)
    assert "allows 3 of 5 trials" in line and "estimate" in line


def test_early_stopping_gives_back_what_it_saved():
    ledger = budget.Budget(limit=2.0)
    ledger.start("a", 1.0)
    ledger.start("b", 1.0)
    assert not ledger.allows(0.5)
    ledger.finish("a", step=25, steps=100)  # stopped at a quarter: 0.75 given back
    assert ledger.spent == pytest.approx(1.25) and ledger.allows(0.75) and not ledger.allows(0.8)
    ledger.finish("b", step=100, steps=100)  # ran to the end: nothing
    assert ledger.spent == pytest.approx(1.25)


def test_budget_below_one_trial_or_on_a_grid_is_refused(tmp_path):
    message = error_of(tmp_path, {"algorithm": "random", **SPACE}, {"num_samples": 2, "budget_gpu_hours": 1e-12})
    assert "run.budget_gpu_hours" in message and "less than one trial" in message
    message = error_of(tmp_path, {"model": {"enc_blocks": [1, 2]}}, {"budget_gpu_hours": 1.0})
    assert "run.budget_gpu_hours" in message and "grid" in message


# -- real searched sweeps through Ray ------------------------------------------------------------------
@pytest.mark.slow
def test_searched_sweep_with_budget_runs_three_trials_nested_under_its_parent(tmp_path):
    from conftest import environ, running_local_ray, write_splits

    from pipeline.sweep.driver import QUIET_ENV, run_sweep
    from pipeline.sweep.record import tracking
    from pipeline.sweep.trials.searched_runs import TAG_PARENT, TAG_PARENT_OF

    data = write_splits(tmp_path / "data", {"train": 16, "val": 8, "test": 4})
    space = {"model": {"enc_blocks": [1], "dec_blocks": [1]}, "train": {"lr": {"loguniform": [1e-4, 1e-2]}}}
    run = {"num_samples": 5, "cpus_per_trial": 1, "max_failures": 0}
    train = {**TRAIN, "seq_len": 6, "context": 3, "val_batches": 1, "ckpt_every": 10}
    path = spec_of(tmp_path, {"algorithm": "random", "seed": 1, **space}, run, data=str(data), train=train)
    one = budget.trial_gpu_hours(None, load_spec(path, root=tmp_path).resolve("cpu").points[0])
    run["budget_gpu_hours"] = 3.5 * one
    path = spec_of(tmp_path, {"algorithm": "random", "seed": 1, **space}, run, data=str(data), train=train)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with environ({**QUIET_ENV, "MLFLOW_TRACKING_URI": uri}), running_local_ray():
        outcome = run_sweep(load_spec(path, root=tmp_path), "cpu", storage=str(tmp_path / "ray"))
    assert sorted(outcome.statuses.values()) == ["FINISHED"] * 3  # 3 of the 5 draws: the budget's
    client = tracking.client(uri)
    runs = tracking.sweep_runs(client, outcome.experiment_id, outcome.sweep_id)
    assert [r.data.tags[tracking.TAG_POINT] for r in runs] == ["0", "1", "2"]
    parents = client.search_runs([outcome.experiment_id], filter_string=f"tags.{TAG_PARENT_OF} = '{outcome.sweep_id}'")
    assert len(parents) == 1
    parent = parents[0]
    assert {r.data.tags[TAG_PARENT] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_run"] == 3
    assert parent.data.metrics["est_gpu_hours_used"] == pytest.approx(3 * one, rel=1e-6)
    assert "best_test_excess_nats_per_frame" in parent.data.metrics
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["sweep.json"]
    for r in runs:
        assert 1e-4 <= float(r.data.params["lr"]) <= 1e-2
        steps = [m.step for m in client.get_metric_history(r.info.run_id, tracking.TRAIN_KEY)]
        assert steps == [5, 10]  # each step once


@pytest.mark.slow
def test_bohb_sweep_pauses_and_stops_trials_nested_under_its_parent(tmp_path):
    """TuneBOHB with HyperBandForBOHB through Ray: 3 draws of 9 steps (HyperBand's rungs at steps 1, 3, 9
    with eta 3), a report and a checkpoint every 3 steps. HyperBand pauses trials at a rung (they go on
    from their checkpoint) and stops the losers; every run lands under the parent, each step once."""
    from conftest import environ, running_local_ray, write_splits

    from pipeline.sweep.driver import QUIET_ENV, run_sweep
    from pipeline.sweep.record import tracking
    from pipeline.sweep.record.parent import TAG_PARENT, TAG_PARENT_OF

    data = write_splits(tmp_path / "data", {"train": 16, "val": 8, "test": 4})
    train = {**TRAIN, "steps": 9, "log_every": 3, "val_every": 3, "ckpt_every": 3, "seq_len": 6, "context": 3,
             "val_batches": 1, "forecast_samples": 0}  # fmt: skip
    space = {"model": {"enc_blocks": [1], "dec_blocks": [1]}, "train": {"lr": {"loguniform": [1e-4, 3e-2]}}}
    run = {"num_samples": 3, "cpus_per_trial": 1, "max_failures": 0}
    path = spec_of(tmp_path, {"algorithm": "bohb", "seed": 1, **space}, run, data=str(data), train=train)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with environ({**QUIET_ENV, "MLFLOW_TRACKING_URI": uri}), running_local_ray():
        outcome = run_sweep(load_spec(path, root=tmp_path), "cpu", storage=str(tmp_path / "ray"))
    assert sorted(outcome.statuses.values()) == ["FINISHED"] * 3 and not outcome.interrupted
    client = tracking.client(uri)
    runs = tracking.sweep_runs(client, outcome.experiment_id, outcome.sweep_id)
    parent_of = f"tags.{TAG_PARENT_OF} = '{outcome.sweep_id}'"
    (parent,) = client.search_runs([outcome.experiment_id], filter_string=parent_of)
    assert len(runs) == 3 and {r.data.tags[TAG_PARENT] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.params["algorithm"] == "bohb"
    stopped = [r for r in runs if r.data.tags.get(tracking.TAG_STOPPED_EARLY) == "true"]
    paused = [r for r in runs if tracking.TAG_RESUMED_FROM in r.data.tags]  # went on from its checkpoint
    assert stopped and paused, [(r.info.run_name, r.data.tags) for r in runs]
    last = {}
    for r in runs:
        assert 1e-4 <= float(r.data.params["lr"]) <= 3e-2
        steps = [m.step for m in client.get_metric_history(r.info.run_id, tracking.TRAIN_KEY)]
        assert steps == sorted(set(steps)) and steps[0] == 3, (r.info.run_name, steps)  # each step once
        last[r.info.run_name] = steps[-1]
    assert max(last.values()) == 9 and min(last.values()) < 9, last  # one ran to max_t, one did not
