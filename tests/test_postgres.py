"""The cluster's tracking server as the configs' head runs it: `mlflow server --app-name basic-auth` on a
real PostgreSQL, with the two logins that pipeline/sweep/cluster/tracking_server.py sets (issue 28
item 3; issue 30 items 2, 3 and 6).

One PostgreSQL (Debian's, conftest.running_postgres) and one basic-auth server on it serve the
module. Its runs and its users are both in PostgreSQL. The logins are set by
tracking_server.set_logins, as the head's setup sets them. A local Ray starts after the trials'
login is in the environment: Ray's workers inherit it, as every node's ~/.vpn_env gives it to them.
The head's own PostgreSQL (a Unix socket, started by tracking_server.postgres_up) runs in
tests/test_onprem.py, over SSH.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from conftest import environ, running_local_ray, running_mlflow_server, running_postgres, write_splits

from pipeline.sweep.cluster import tracking_server
from pipeline.sweep.cluster.tracking_server import Login
from pipeline.sweep.driver import QUIET_ENV

pytestmark = [pytest.mark.slow]
CACHE = 3  # seconds


@dataclass(frozen=True)
class Head:
    uri: str  # the MLflow server
    admin: Login
    trials: Login
    runs_db: str  # SQLAlchemy URIs of the two databases (with the test's PostgreSQL password)
    auth_db: str


def login(path: Path, username: str) -> Login:
    password = secrets.token_hex(16)
    path.write_text(f"export MLFLOW_TRACKING_USERNAME={username} MLFLOW_TRACKING_PASSWORD={password}\n")
    return Login(username, password, path)


@contextlib.contextmanager
def as_user(user: Login) -> Iterator[None]:
    with environ({"MLFLOW_TRACKING_USERNAME": user.username, "MLFLOW_TRACKING_PASSWORD": user.password}):
        yield


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    root = tmp_path_factory.mktemp("head")
    admin, trials = login(root / "admin", "admin"), login(root / "trials", "vpn-trials")
    with running_postgres() as database:
        runs_db, auth_db = database("mlflow"), database("mlflow_auth")
        tracking_server.set_logins(auth_db, tracking_server.read_login(admin.source), trials)
        # A checked login trusted for CACHE (the configs' 30 s, shortened): the rotation test waits it out.
        tracking_server.write_auth_config(root / "basic_auth.ini", auth_db, "admin", cache_seconds=CACHE)
        env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}  # fmt: skip
        server = running_mlflow_server(root, backend=runs_db, workers=2, args=("--app-name", "basic-auth"), env=env)
        # The trials' login for the module (after the server started): its Ray workers and clients use it.
        with server as uri, environ(QUIET_ENV), as_user(trials), running_local_ray():
            yield Head(uri, admin, trials, runs_db, auth_db)


def tiny_spec(tmp_path: Path, name: str) -> Path:
    data = write_splits(tmp_path / "data", {"train": 8, "val": 4, "test": 2}, frames=5, p=0.3, seed=1)
    spec = {
        "name": name,
        "data": str(data),
        "model": {"output": "bernoulli", "enc_blocks": 1, "dec_blocks": 1},
        "train": {"steps": 10, "batch_size": 2, "log_every": 5, "val_every": 5, "val_batches": 1, "ckpt_every": 10,
                  "context": 2, "device": "cpu"},
        "search": {"model": {"filter_fraction": [0.03125]}},
        "run": {"cpus_per_trial": 1},
        "profiles": {"cpu": {}},
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rows(db: str, query: str) -> list[tuple]:
    engine = sqlalchemy.create_engine(db)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(sqlalchemy.text(query))]
    finally:
        engine.dispose()


def test_a_sweep_on_postgres_with_the_trials_login(head, tmp_path, capfd):
    from mlflow.server import get_app_client

    from pipeline.sweep.driver import run_sweep
    from pipeline.sweep.record import tracking
    from pipeline.sweep.record.parent import trial_runs
    from pipeline.sweep.spec.sweep import load_spec

    with environ({"MLFLOW_TRACKING_URI": head.uri}):
        outcome = run_sweep(load_spec(tiny_spec(tmp_path, "pg_sweep")), "cpu", storage=str(tmp_path / "ray"),
                            results_dir=tmp_path / "results")  # fmt: skip
    assert outcome.statuses == {"f0.03125": "FINISHED"}
    client = tracking.client(head.uri)
    exp = client.get_experiment_by_name("pg_sweep")
    every = client.search_runs([exp.experiment_id])
    (run,) = trial_runs(every)
    for key in tracking.CURVE_KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [5, 10], key
    assert client.get_registered_model("pg_sweep").latest_versions  # registered with the trials' login
    # Stored in PostgreSQL: the trial's run and the sweep's parent run, and a curve's points.
    stored = rows(head.runs_db, f"SELECT run_uuid FROM runs WHERE experiment_id = {int(exp.experiment_id)}")
    assert sorted(r for (r,) in stored) == sorted(r.info.run_id for r in every) and len(stored) == 2
    assert rows(head.runs_db, f"SELECT count(*) FROM metrics WHERE run_uuid = '{run.info.run_id}'")[0][0] > 0
    # The trials' login created the experiment and the model, so MLflow gave it MANAGE on them, and no more.
    with as_user(head.admin):
        auth = get_app_client("basic-auth", tracking_uri=head.uri)
        assert auth.get_user_permission("vpn-trials", "experiment", exp.experiment_id).permission == "MANAGE"
        assert auth.get_user_permission("vpn-trials", "registered_model", "pg_sweep").permission == "MANAGE"
        assert not auth.get_user("vpn-trials").is_admin
    # No password in the console, the params and tags, or the results.
    out = capfd.readouterr()
    outputs = {
        "console": out.out + out.err,
        "params and tags": "\n".join(f"{k}={v}" for r in every for k, v in {**r.data.params, **r.data.tags}.items()),
        "results/": "\n".join(p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "results").rglob("*")
                              if p.is_file()),
    }  # fmt: skip
    pg_password = sqlalchemy.engine.make_url(head.runs_db).password
    passwords = {"trials'": head.trials.password, "admin's": head.admin.password, "PostgreSQL": pg_password}
    for name, secret in passwords.items():
        for where, text in outputs.items():
            assert secret not in text, f"the {name} password is in the {where}"


def refused(call) -> int:
    """The HTTP status of a refused MLflow call (it must be refused)."""
    from mlflow.exceptions import MlflowException, RestException

    with pytest.raises((RestException, MlflowException)) as e:
        call()
    return getattr(e.value, "get_http_status_code", lambda: None)() or int(str(e.value).split("error code ")[1][:3])


def test_the_trials_login_cannot_delete_another_experiment_or_manage_users(head):
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    with as_user(head.admin):
        other = MlflowClient(head.uri).create_experiment(f"operators_{secrets.token_hex(3)}")
        MlflowClient(head.uri).create_registered_model(f"operators_model_{other}")
    client, auth = MlflowClient(head.uri), get_app_client("basic-auth", tracking_uri=head.uri)  # the trials' login
    # What a sweep does, in an experiment of its own: allowed.
    mine = client.create_experiment(f"trials_{secrets.token_hex(3)}")
    run = client.create_run(mine)
    client.log_param(run.info.run_id, "x", 1)
    client.set_terminated(run.info.run_id)
    assert client.get_experiment(other).name.startswith("operators_")  # default_permission READ
    # What it must not do: 403 for each.
    for what, call in {
        "delete another experiment": lambda: client.delete_experiment(other),
        "write into another experiment": lambda: client.create_run(other),
        "delete another registered model": lambda: client.delete_registered_model(f"operators_model_{other}"),
        "create a user": lambda: auth.create_user("intruder", secrets.token_hex(16)),
        "make itself an admin": lambda: auth.update_user_admin("vpn-trials", True),
        "change the admin's password": lambda: auth.update_user_password("admin", secrets.token_hex(16)),
        "delete a user": lambda: auth.delete_user("admin"),
    }.items():
        assert refused(call) == 403, what
    with as_user(head.admin):
        assert MlflowClient(head.uri).get_experiment(other).lifecycle_stage == "active"
        admin_auth = get_app_client("basic-auth", tracking_uri=head.uri)
        assert not admin_auth.get_user("vpn-trials").is_admin
        assert admin_auth.get_user_permission("vpn-trials", "experiment", other).permission == "READ"
        assert admin_auth.get_user_permission("vpn-trials", "experiment", mine).permission == "MANAGE"


def test_a_changed_password_takes_effect_on_the_running_server(head, tmp_path):
    """MLflow ignores MLFLOW_AUTH_ADMIN_PASSWORD once its admin exists; the head's setup sets both
    passwords in the auth database itself (tracking_server.set_logins), and the running server takes
    them: the new ones at once, and it refuses the old ones once its workers' cache of checked logins expires."""
    from mlflow import MlflowClient

    new_admin, new_trials = login(tmp_path / "admin", "admin"), login(tmp_path / "trials", "vpn-trials")
    try:
        tracking_server.set_logins(head.auth_db, new_admin, new_trials)
        for new in (new_admin, new_trials):
            with as_user(new):
                assert MlflowClient(head.uri).search_experiments(max_results=1)
        time.sleep(CACHE + 1)
        for old in (head.admin, head.trials):
            with as_user(old):
                assert refused(lambda: MlflowClient(head.uri).search_experiments(max_results=1)) == 401
        # With the admin's file emptied (the head's copy after a start), the admin's password stays.
        tracking_server.set_logins(head.auth_db, None, new_trials, admin_name="admin")
        with as_user(new_admin):
            assert MlflowClient(head.uri).search_experiments(max_results=1)
    finally:
        tracking_server.set_logins(head.auth_db, head.admin, head.trials)  # the module's logins again


def test_login_files_are_checked(tmp_path):
    path = tmp_path / "credentials"
    path.write_text("export MLFLOW_TRACKING_USERNAME=vpn-trials\n")
    with pytest.raises(ValueError, match=f"{path}: MLFLOW_TRACKING_PASSWORD is missing"):
        tracking_server.read_login(path)
    path.write_text("")
    assert tracking_server.read_login(path) is None
    same = login(tmp_path / "trials", "admin")
    with pytest.raises(ValueError, match="the admin's name: the trials need a login of their own"):
        tracking_server.set_logins("sqlite:///unused.db", login(tmp_path / "admin", "admin"), same)
