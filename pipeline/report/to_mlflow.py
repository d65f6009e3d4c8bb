"""After the report stage: a sweep's report inside its parent MLflow run.

    run_id = log_report(sweep, out_dir, results_dir)   # None where no parent run is found

Every sweep execution has a parent run, tag sweep_parent_of=<sweep id> (pipeline.sweep.record.parent), which
MLflow's UI shows as the sweep's row; the sweep id is the one of results/<sweep>/<profile>/trials.parquet. Its
artifacts get:
- report/: report.html, report.md, metrics.json and every PNG figure of reports/<sweep>/;
- results/: trials.parquet, curves.parquet and metrics.json of results/<sweep>/<profile>/.
Logging again (the report rebuilt) overwrites the same paths. Where there is nothing to log to, nothing
is logged and a line says why: a table of no single sweep id, a SQLite store that does not exist (a
report built from copied tables creates no store), or a sweep whose parent is not in the store (one
run before sweeps had parents).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.sweep.record import tracking

log = logging.getLogger(__name__)

REPORT_FILES = ("report.html", "report.md", "metrics.json")
RESULTS_FILES = ("trials.parquet", "curves.parquet", "metrics.json")


def sweep_id_of(trials: pd.DataFrame) -> str | None:
    """The sweep id of a trials table (the results stage writes one sweep's trials), else None."""
    ids = trials["sweep_id"].dropna().astype(str).unique() if "sweep_id" in trials.columns else []
    if len(ids) != 1:
        log.warning("a trials table with sweep ids %s: no parent run to log to", list(ids))
        return None
    return str(ids[0])


def parent_run(client, experiment: str, sweep_id: str) -> str | None:
    """The parent run's id of `sweep_id` in experiment `experiment`, else None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    tag = tracking.TAG_PARENT_OF
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.{tag} = '{sweep_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _store_exists(uri: str) -> bool:
    """False only for a SQLite store whose file is missing (opening it would create an empty store)."""
    if not uri.startswith("sqlite:///"):
        return True
    return Path(uri.removeprefix("sqlite:///")).is_file() or uri.startswith("sqlite:///:memory:")


def log_report(sweep: str, out_dir: Path, results_dir: Path, client=None) -> str | None:
    """Log reports/<sweep>/ and the tables in results_dir (the module docstring) to the sweep's parent run;
    its run id, or None where there is none (a warning says why)."""
    out_dir, results_dir = Path(out_dir), Path(results_dir)
    trials = pd.read_parquet(results_dir / "trials.parquet")
    sweep_id = sweep_id_of(trials)
    if sweep_id is None:
        return None
    if client is None:
        uri = tracking.absolute_uri(tracking.tracking_uri())
        if not _store_exists(uri):
            log.warning("%s: no MLflow store at %s: report not logged", sweep, uri)
            return None
        client = tracking.client(uri)
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
