"""A sweep's report logged into its parent MLflow run (pipeline.report.to_mlflow), read back from a real
SQLite store: a searched sweep's (the whole report stage) and a grid's; a report without a store opens none."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.report.build import main
from pipeline.report.to_mlflow import log_report
from pipeline.sweep.record import tracking
from pipeline.sweep.record.parent import TAG_PARENT_OF

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # MLflow's SQL store

SWEEP_ID = "search-cpu-0123abcd"


def _searched_results(root):
    from test_report import write_tables
    from test_report_stats import searched_table

    table = searched_table(n=5).assign(sweep_id=SWEEP_ID)
    curves = [(r, step, 100.0 - step / 10, 99.0, 5.0) for r in table["run_id"] for step in (10, 200)]
    write_tables(root, "search", table.to_dict("records"), curves)


@pytest.mark.slow  # a real MLflow store and a whole report: about a minute on 2 loaded cores
def test_searched_report_lands_in_its_parent_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = tracking.client(uri)
    exp = client.create_experiment("search", artifact_location=(tmp_path / "artifacts").as_uri())
    other = client.create_run(exp, tags={TAG_PARENT_OF: "search-cpu-other"}).info.run_id  # another sweep's
    parent = client.create_run(exp, tags={TAG_PARENT_OF: SWEEP_ID}).info.run_id
    _searched_results(tmp_path)
    (tmp_path / "params.yaml").write_text("report:\n  sweeps: [search]\n")
    assert main(["--params", str(tmp_path / "params.yaml")]) == 0  # the report stage, as dvc runs it

    report = {a.path for a in client.list_artifacts(parent, "report")}
    assert report >= {f"report/{n}" for n in ("report.html", "report.md", "metrics.json", "parallel.png",
                                               "importance.png", "compute.png", "curves.png")}  # fmt: skip
    assert {a.path for a in client.list_artifacts(parent, "results")} == {
        "results/trials.parquet", "results/curves.parquet"
    }  # the synthetic results have no metrics.json  # fmt: skip
    html = client.download_artifacts(parent, "report/report.html", str(tmp_path / "back"))
    assert Path(html).read_bytes() == (tmp_path / "reports" / "search" / "report.html").read_bytes()
    trials = pd.read_parquet(client.download_artifacts(parent, "results/trials.parquet", str(tmp_path / "back")))
    assert list(trials["run_id"]) == [f"r{k}-0" for k in range(5)]
    assert client.list_artifacts(other) == []
    # logging again (the report rebuilt) overwrites: the same artifacts, no second copy
    before = {a.path for a in client.list_artifacts(parent, "report")}
    assert log_report("search", tmp_path / "reports" / "search", tmp_path / "results" / "search") == parent
    assert {a.path for a in client.list_artifacts(parent, "report")} == before
    # a searched sweep whose parent is not in the store: a warning, nothing logged
    client.set_tag(parent, TAG_PARENT_OF, "search-cpu-moved")
    assert log_report("search", tmp_path / "reports" / "search", tmp_path / "results" / "search") is None


def test_a_grid_report_lands_in_its_parent_and_no_store_is_created(tmp_path, monkeypatch):
    from test_report import synthetic, write_tables

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    trials, curves = synthetic(n_failed=0)
    write_tables(tmp_path, "demo", [{**t, "sweep_id": "demo-cpu-42"} for t in trials], curves)
    reports = tmp_path / "reports" / "demo"
    reports.mkdir(parents=True)
    (reports / "report.html").write_text("<html>grid</html>")
    (reports / "curves.png").write_bytes(b"png")
    # no store yet (a report built from copied tables): nothing logged, no empty store created
    assert log_report("demo", reports, tmp_path / "results" / "demo") is None
    assert not db.exists()

    client = tracking.client(f"sqlite:///{db}")
    exp = client.create_experiment("demo", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, tags={TAG_PARENT_OF: "demo-cpu-42"}).info.run_id
    assert log_report("demo", reports, tmp_path / "results" / "demo") == parent
    assert {a.path for a in client.list_artifacts(parent, "report")} == {"report/report.html", "report/curves.png"}
    assert {a.path for a in client.list_artifacts(parent, "results")} == {
        "results/trials.parquet", "results/curves.parquet"
    }  # fmt: skip
    # a table of several sweep ids (not one sweep's): no parent to choose, nothing logged
    write_tables(tmp_path, "demo", [{**t, "sweep_id": f"demo-cpu-{i}"} for i, t in enumerate(trials)], curves)
    assert log_report("demo", reports, tmp_path / "results" / "demo") is None
