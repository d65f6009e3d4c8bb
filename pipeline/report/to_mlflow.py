"""After the report stage: a searched sweep's report inside its parent MLflow run.

    run_id = log_report(sweep, out_dir, results_dir)   # None for a grid, or where no parent run is found

A searched sweep (its trials carry `est_gpu_hours`) has a parent run, tag sweep_parent_of=<sweep id>
(pipeline.sweep.searched_runs), which MLflow's UI shows as the sweep's row. Its artifacts get:
- report/: report.html, report.md, metrics.json and every PNG figure of reports/<sweep>/;
- results/: trials.parquet, curves.parquet and metrics.json of results/<sweep>/.
Logging again (the report rebuilt) overwrites the same paths. A grid's runs have no parent yet: nothing
is logged, and MLflow is not opened (so a report run without a store creates none).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.sweep import tracking

log = logging.getLogger(__name__)

REPORT_FILES = ("report.html", "report.md", "metrics.json")
RESULTS_FILES = ("trials.parquet", "curves.parquet", "metrics.json")


def searched_sweep_id(trials: pd.DataFrame) -> str | None:
    """The sweep id of a searched sweep's trials table; None for a grid (or a table of no sweep id)."""
    if "est_gpu_hours" not in trials.columns or not trials["est_gpu_hours"].notna().any():
        return None
    ids = trials["sweep_id"].dropna().astype(str).unique() if "sweep_id" in trials.columns else []
    if len(ids) != 1:
        log.warning("a searched sweep's table with sweep ids %s: no parent run to log to", list(ids))
        return None
    return str(ids[0])


def parent_run(client, experiment: str, sweep_id: str) -> str | None:
    """The parent run's id of `sweep_id` in experiment `experiment`, else None."""
    from pipeline.sweep.searched_runs import TAG_PARENT_OF  # imports Ray: only for a searched sweep

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.{TAG_PARENT_OF} = '{sweep_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def log_report(sweep: str, out_dir: Path, results_dir: Path, client=None) -> str | None:
    """Log reports/<sweep>/ and results/<sweep>/ (the module docstring) to the sweep's parent run;
    its run id, or None where there is none (a grid, no parent found: a warning says which)."""
    out_dir, results_dir = Path(out_dir), Path(results_dir)
    trials = pd.read_parquet(results_dir / "trials.parquet")
    sweep_id = searched_sweep_id(trials)
    if sweep_id is None:
        return None
    client = client or tracking.client(tracking.absolute_uri(tracking.tracking_uri()))
    run_id = parent_run(client, sweep, sweep_id)
    if run_id is None:
        log.warning("%s: no parent run of sweep %s in %s: report not logged", sweep, sweep_id, client.tracking_uri)
        return None
    figures = sorted(p.name for p in out_dir.glob("*.png"))
    for name in (*REPORT_FILES, *figures):
        if (out_dir / name).is_file():
            tracking.retrying(client.log_artifact, run_id, str(out_dir / name), "report")
    for name in RESULTS_FILES:
        if (results_dir / name).is_file():
            tracking.retrying(client.log_artifact, run_id, str(results_dir / name), "results")
    return run_id
