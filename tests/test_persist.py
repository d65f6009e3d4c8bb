"""pipeline.sweep.cluster.persist: a sweep run from Ray's uploaded copy of a working directory is refused unless
its MLflow store, Ray storage and results tables all live outside the copy (fast; no Ray)."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipeline.sweep.cluster.persist import check_results_persist, example_line, uploaded_copy
from pipeline.sweep.driver import run_sweep
from pipeline.sweep.spec.data_check import SweepDataError
from pipeline.sweep.spec.sweep import load_spec


@pytest.fixture()
def copy(tmp_path):
    """A folder laid out as Ray unpacks a job's working_dir."""
    root = tmp_path / "ray" / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    root.mkdir(parents=True)
    return root


def test_the_copy_is_recognised_and_a_repository_is_not(copy, tmp_path):
    assert uploaded_copy(copy)
    assert not uploaded_copy(tmp_path / "repo")


def test_nothing_set_is_refused_naming_each_setting_and_the_line(copy):
    with pytest.raises(SweepDataError) as e:
        check_results_persist(copy, "sweeps/depth_width.yaml", storage=None, results_dir=None, env={})
    msg = str(e.value)
    for name in ("MLFLOW_TRACKING_URI", "VPN_SWEEP_STORAGE (or --storage)", "VPN_RESULTS_DIR (or --results-dir)"):
        assert name in msg
    assert str(copy) in msg and example_line("sweeps/depth_width.yaml") in msg


@pytest.mark.parametrize(
    "which", ["MLFLOW_TRACKING_URI", "VPN_SWEEP_STORAGE", "VPN_RESULTS_DIR", "relative_db", "relative_storage"]
)
def test_a_home_inside_the_copy_is_refused(copy, tmp_path, which, monkeypatch):
    monkeypatch.chdir(copy)  # a job's cwd is the copy: relative paths land there
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "VPN_SWEEP_STORAGE": str(tmp_path / "ray_results"),
        "VPN_RESULTS_DIR": str(tmp_path / "results"),
    }
    bad = {
        "MLFLOW_TRACKING_URI": ("MLFLOW_TRACKING_URI", f"sqlite:///{copy}/mlflow.db"),
        "VPN_SWEEP_STORAGE": ("VPN_SWEEP_STORAGE", str(copy / "ray_results")),
        "VPN_RESULTS_DIR": ("VPN_RESULTS_DIR", str(copy / "results")),
        "relative_db": ("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        "relative_storage": ("VPN_SWEEP_STORAGE", "ray_results"),
    }[which]
    env[bad[0]] = bad[1]
    with pytest.raises(SweepDataError, match=f"inside the copy: {bad[0]}"):
        check_results_persist(copy, "s.yaml", storage=None, results_dir=None, env=env)


def test_homes_outside_the_copy_or_on_servers_pass(copy, tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://10.0.0.1:5000", "VPN_SWEEP_STORAGE": "s3://bucket/ray_results"}
    check_results_persist(copy, "s.yaml", storage=None, results_dir=tmp_path / "results", env=env)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "VPN_RESULTS_DIR": str(tmp_path)}
    check_results_persist(copy, "s.yaml", storage=str(tmp_path / "ray"), results_dir=None, env=env)
    # Not a copy: the repository's defaults are fine.
    check_results_persist(tmp_path, "s.yaml", storage=None, results_dir=None, env={})


def test_the_example_line_is_valid_json_once_the_shell_expands_it(tmp_path):
    line = example_line("sweeps/depth_width.yaml")
    quoted = line.split("--runtime-env-json ", 1)[1].split(" -- ", 1)[0]
    out = subprocess.run(
        ["bash", "-c", f"printf %s {quoted}"], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    env = json.loads(out.stdout)["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert env["VPN_SWEEP_STORAGE"] == f"{tmp_path}/ray_results" and env["VPN_RESULTS_DIR"] == f"{tmp_path}/results"
    assert line.endswith(" -- python -m pipeline.sweep sweeps/depth_width.yaml")


def test_run_sweep_refuses_before_ray_starts(copy, monkeypatch):
    import sys

    monkeypatch.setattr("pipeline.sweep.driver.repo_root", lambda: copy)
    for k in ("MLFLOW_TRACKING_URI", "VPN_SWEEP_STORAGE", "VPN_RESULTS_DIR"):
        monkeypatch.delenv(k, raising=False)
    ray_loaded = "ray" in sys.modules
    with pytest.raises(SweepDataError, match="uploaded copy"):
        run_sweep(load_spec("sweeps/depth_width.yaml"), "tiny")
    assert not (copy / "mlflow.db").exists()
    if not ray_loaded:
        assert "ray" not in sys.modules  # refused before `import ray`
