"""`ray job submit --working-dir .` keeps its results: the local-head case of docs/cluster.md, as written.

A head started with `ray start --head` on loopback with Ray's token authentication on
(RAY_AUTH_MODE=token, the token from `ray get-auth-token --generate` in ~/.ray/auth_token, here a
throwaway HOME). A client without the token is refused. The tiny sweep submitted with no settings is
refused at once (its results would live only in Ray's uploaded copy); submitted with the docs'
--runtime-env-json line it runs, and after the head is stopped and Ray's session folder deleted the
runs are in the repository's own mlflow.db, the tables in results/depth_width/tiny/.

The head is stopped as `ray stop` would stop it, but only this one: `ray start --block` in a process
group of its own, sent SIGTERM. (`ray stop` ends every Ray process on the machine, and this machine
runs other people's Ray at the same time.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_repo, free_port, write_splits

from pipeline.sweep.cluster.persist import example_line
from pipeline.sweep.driver import QUIET_ENV
from pipeline.sweep.record import tracking
from pipeline.sweep.record.parent import TAG_PARENT, TAG_PARENT_OF, trial_runs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),  # inside MLflow's SQL store
]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SPEC = "sweeps/depth_width.yaml --profile tiny"


def copy_repository(dest: Path) -> Path:
    """The repository's files as git sees them (conftest.copy_repo), with tiny data."""
    copy_repo(dest)
    write_splits(dest / "data" / "moving_mnist", {"train": 8, "val": 4, "test": 4})
    return dest


def our_processes(marker: str) -> list[str]:
    """Command lines of live processes that name `marker` (this test's temp folder)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and p.pid != os.getpid():
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


@pytest.fixture()
def head(tmp_path):
    """A token-authenticated Ray head on loopback, its own HOME and temp folder; yields what the
    client needs. Stopped (and checked gone) at the end even when the test fails."""
    base = Path(tempfile.mkdtemp(prefix="vpnjob", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    home, temp = base / "home", base / "ray"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "VPN_")) and k != "PYTHONPATH"}
    env.update(QUIET_ENV, HOME=str(home), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").is_file()
    env["RAY_AUTH_MODE"] = "token"
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--min-worker-port": 20000 + free_port() % 20000, "--dashboard-agent-listen-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}  # fmt: skip
    ports["--max-worker-port"] = ports["--min-worker-port"] + 200
    log = (tmp_path / "head.log").open("w")
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--num-cpus=2", f"--temp-dir={temp}", *(f"{k}={v}" for k, v in ports.items())]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"}
    try:
        deadline = time.monotonic() + 120
        while (
            subprocess.run([RAY, "job", "list"], check=False, env=client, capture_output=True, timeout=60).returncode
            != 0
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"client": client, "temp": temp, "base": base, "proc": proc}
    finally:
        stop_head(proc)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def stop_head(proc: subprocess.Popen) -> None:
    """`ray stop` for this head only: SIGTERM to its process group, SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def submit(repo: Path, env: dict[str, str], *runtime_env: str) -> subprocess.CompletedProcess:
    command = [RAY, "job", "submit", "--working-dir", ".", *runtime_env, "--", "python", "-m", "pipeline.sweep",
               *SPEC.split()]  # fmt: skip
    return subprocess.run(command, check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=480)


def runtime_env_of_docs(repo: Path) -> list[str]:
    """The --runtime-env-json argument of the documented line, as bash expands it in the repository."""
    line = example_line(SPEC)
    assert line in (REPO / "docs" / "cluster.md").read_text(), "docs/cluster.md must show this line word for word"
    quoted = line.split("--runtime-env-json ", 1)[1].split(" -- ", 1)[0]
    expanded = subprocess.run(
        ["bash", "-c", f"printf %s {quoted}"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout
    return ["--runtime-env-json", expanded]


def test_job_submit_keeps_its_runs_in_the_repository(head, tmp_path):
    repo = copy_repository(tmp_path / "repo")
    client = head["client"]

    # Token authentication is on: a client without the token is refused.
    no_token = {k: v for k, v in client.items() if k != "RAY_AUTH_MODE"}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    refused = subprocess.run(
        [RAY, "job", "list"], check=False, env=no_token, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr, (
        refused.stdout + refused.stderr
    )

    # No settings: refused at once, naming what to set and showing the line that sets it.
    bare = submit(repo, client)
    out = bare.stdout + bare.stderr
    assert bare.returncode != 0, out[-3000:]
    for name in ("uploaded copy", "MLFLOW_TRACKING_URI", "VPN_SWEEP_STORAGE", "VPN_RESULTS_DIR", "--runtime-env-json"):
        assert name in out, (name, out[-3000:])
    assert "Tuner" not in out and not (repo / "mlflow.db").exists()

    # As the docs say: every home of a result in the repository the job was submitted from.
    done = submit(repo, client, *runtime_env_of_docs(repo))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert f"MLflow: sqlite:///{repo}/mlflow.db" in out, out[-3000:]

    # Ray stopped and its session folder gone: the runs, the tables and Ray's folder are still here.
    stop_head(head["proc"])
    assert not our_processes(str(head["base"])), our_processes(str(head["base"]))
    assert any(head["temp"].glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*"))  # where the job ran
    shutil.rmtree(head["temp"])
    c = tracking.client(f"sqlite:///{repo}/mlflow.db")
    exp = c.get_experiment_by_name("depth_width")
    every = c.search_runs([exp.experiment_id])
    runs = trial_runs(every)
    assert len(runs) == 2  # the tiny profile's grid: dec_blocks 1 and 2
    (parent,) = [r for r in every if TAG_PARENT_OF in r.data.tags]  # the sweep's parent, its trials nested
    assert {r.data.tags[TAG_PARENT] for r in runs} == {parent.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
    trials = pd.read_parquet(repo / "results" / "depth_width" / "tiny" / "trials.parquet")
    assert sorted(trials["run_id"]) == sorted(r.info.run_id for r in runs)
    assert any((repo / "ray_results").iterdir()) and any((repo / "mlartifacts" / "depth_width").iterdir())
