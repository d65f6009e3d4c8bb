"""Every sweep execution's parent MLflow run: the trials are its nested runs (MLflow's mlflow.parentRunId).

MLflow's UI then shows a sweep as one row that expands into its trials, the layout MLflow's docs show
for a hyperparameter search. One parent per sweep id (tag sweep_parent_of=<sweep id>), found again on a
resume, so a resumed sweep's trials stay under the same row. It has no sweep_id tag: every lookup of a
sweep's trials (tracking.sweep_runs: the results tables, the registry's best trial, the report) leaves it out.

What it holds:
- when the sweep starts (open_parent): params algorithm, trials, seeds, budget_gpu_hours; sweep.json
  (the spec's source, the space, the sweep's identity: every resolved point of a grid);
- when the sweep ends (close_parent): best_<metric> for the best trial's scores (results' metrics.json),
  trials_run, and where a trial had a GPU or a budget ruled the search, est_gpu_hours_used (the trials'
  estimated cost less what early stopping saved, pipeline.sweep.spec.budget) and a grid's
  est_gpu_hours_planned; FINISHED, or KILLED for an interrupted sweep until a resume finishes it;
- after the report stage, report/ and results/ (pipeline.report.to_mlflow).

Beside it, on the experiment, a saved view of MLflow's UI named by the sweep id (save_curves_view): the
sweep's trials, every one, their convergence curves overlaid in the chart view. The link the sweep prints
opens it (pipeline.sweep.driver.runs_url); MLflow's "Views" menu lists it. Why a view and not the plain
runs page: there MLflow 3.17 shows a parent's trials only once the user expands its row (a link cannot
expand it: a saved view leaves runsExpanded out), and charts only the first 10 runs.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.sweep.record import tracking
from pipeline.sweep.spec.space import describe

TAG_PARENT_OF, TAG_PARENT = tracking.TAG_PARENT_OF, tracking.TAG_PARENT
COST_PARAM = "est_gpu_hours"  # a searched trial's estimated cost (pipeline.sweep.trials.searched_runs)
# MLflow 3.17's saved views: an experiment tag <prefix><id> whose value is {name, createdAt, state}, the
# state a JSON string of the runs page's search facets and UI state (the web UI's savedViewEnvelope.ts);
# the page opens one with ?viewStateShareKey=<id>.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
CURVE_CHARTS = "(train|val)_nats_per_frame"  # the chart search box's regex: the convergence curves


def open_parent(client, experiment_id: str, sweep: Any, sweep_id: str) -> str:
    """The sweep id's parent run: found again (a resume, a restart), else created with sweep.json; the
    sweep's saved view of its curves written either way."""
    save_curves_view(client, experiment_id, sweep_id)
    runs = client.search_runs([experiment_id], filter_string=f"tags.{TAG_PARENT_OF} = '{sweep_id}'", max_results=1)
    if runs:
        tracking.retrying(client.update_run, runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    tags = {TAG_PARENT_OF: sweep_id, tracking.TAG_SWEEP: sweep.name, tracking.TAG_PROFILE: sweep.profile}
    tags[tracking.TAG_MODE] = sweep.mode
    params = {"algorithm": sweep.search.algorithm, "trials": sweep.trial_count, "seeds": sweep.run.seeds}
    params["budget_gpu_hours"] = sweep.run.budget_gpu_hours
    run_id = tracking.create_run(client, experiment_id, sweep_id, params, tags)
    tracking.retrying(client.update_run, run_id, status="RUNNING")
    about = {"spec": sweep.source, "space": describe(dict(sweep.search.axes())), **sweep.identity()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.json"
        path.write_text(json.dumps(about, indent=1, default=str))
        tracking.retrying(client.log_artifact, run_id, str(path))
    return run_id


def curves_view_state(sweep_id: str) -> dict[str, Any]:
    """The runs page's state that shows every trial of the sweep with its curves (see the module docstring).

    The UI fills each field left out with its default. Sorted by run name, MLflow lists runs flat: it nests
    children under their parent only in its default order, by start time. The filter on the sweep id
    leaves out the parent (which has no sweep_id tag) and every other sweep; SHOW_ALL lifts the chart
    view's default of the first 10 runs."""
    return {
        "searchFilter": f"tags.{tracking.TAG_SWEEP_ID} = '{sweep_id}'",
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": True,
        "runsHiddenMode": "SHOW_ALL",
        "chartsSearchFilter": CURVE_CHARTS,
    }


def save_curves_view(client, experiment_id: str, sweep_id: str) -> str:
    """The sweep's saved view on its experiment (tag VIEW_TAG_PREFIX + sweep id, rewritten on a resume);
    returns its id, the sweep id."""
    envelope = {
        "name": f"{sweep_id}: the trials' curves",
        "createdAt": int(time.time() * 1000),
        "state": json.dumps(curves_view_state(sweep_id)),
    }
    tracking.retrying(client.set_experiment_tag, experiment_id, VIEW_TAG_PREFIX + sweep_id, json.dumps(envelope))
    return sweep_id


def close_parent(
    client,
    parent_id: str,
    runs: list[Any],
    summary: Mapping[str, Any] | None,
    done: bool,
    costs: Mapping[str, float] | None = None,
) -> None:
    """The best trial's metrics and the budget's use on the parent; FINISHED when the sweep is (else KILLED).
    The GPU-hour estimates only where they mean something (_gpu_estimates_apply).

    costs: each run's estimated GPU-hours by label, for a grid (whose runs carry no est_gpu_hours);
    a searched trial's run holds its own."""
    metrics = {f"best_{k}": float(v) for k, v in ((summary or {}).get("best") or {}).items() if _number(v)}
    metrics["trials_run"] = float(len(runs))
    if _gpu_estimates_apply(client, parent_id, runs):
        metrics["est_gpu_hours_used"] = sum(
            _cost_used(r, (costs or {}).get(r.data.tags.get(tracking.TAG_LABEL, ""))) for r in runs
        )
        if costs is not None:
            metrics["est_gpu_hours_planned"] = float(sum(costs.values()))
    tracking.retrying(client.log_batch, parent_id, metrics=_metrics(metrics))
    tracking.retrying(client.set_terminated, parent_id, status="FINISHED" if done else "KILLED")


def trial_runs(runs: list[Any]) -> list[Any]:
    """The trials' runs of a list of an experiment's runs: every run but the sweeps' parents."""
    return [r for r in runs if TAG_PARENT_OF not in r.data.tags]


def _gpu_estimates_apply(client, parent_id: str, runs: list[Any]) -> bool:
    """Whether a trial was granted a GPU, or a budget in GPU-hours ruled the search (its ledger counts the
    estimates on any device). A CPU sweep without a budget gets none: an H100's hours say nothing of it."""
    budget = tracking.retrying(client.get_run, parent_id).data.params.get("budget_gpu_hours", "None")
    if budget not in ("None", ""):
        return True
    return any(json.loads(r.data.tags.get(tracking.TAG_RESOURCES) or "{}").get("GPU", 0) for r in runs)


def _cost_used(run: Any, cost: float | None = None) -> float:
    """A run's estimated cost, less what early stopping saved (the part of its steps it never ran)."""
    if cost is None:
        cost = float(run.data.params.get(COST_PARAM, "0") or 0)
    stopped = run.data.tags.get("stopped_at_step")
    steps = int(run.data.params.get("steps", "0") or 0)
    if stopped not in (None, "None") and steps:
        return cost * min(1.0, int(stopped) / steps)
    return cost


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metrics(values: Mapping[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in values.items()]
