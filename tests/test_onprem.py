"""`ray up` / `ray submit` / `ray down` of sweeps/onprem.yaml over real SSH, on loopback.

Debian's OpenSSH server on 127.0.0.1 (a free port, reached through a loopback relay as the
config's `ssh_proxy_command`: Ray's launcher has no SSH port setting), a throwaway host key and user
key, and a throwaway Unix user as the node's SSH user: `ray up` and `ray down` run `ray stop` on the
node, which ends every Ray process its user may signal, so the node's user is not the one running
the tests. A copy of the config whose head is 127.0.0.1 with no workers, changed only where a test
must: tiny data synced instead of pulled or built, free ports, a Ray temp folder in the node user's
home, a local folder for the shared storage. Everything else runs as written: file_mounts of the
repository, Ray's token and the two MLflow logins; the README's install into ~/vpn-venv from the
node's /usr/bin/python3 (its pip finds the wheels this machine's pip finds: no network);
~/.vpn_env; PostgreSQL and the basic-auth MLflow server (pipeline/sweep/cluster/tracking_server.py,
with Debian's PostgreSQL binaries of this machine); `ray start`.

The same `ray up` checks what issue 30 asks of the secrets: every secret file 0600 and its folder
0700 on the node, though this machine's copies are 0644 (as `ray get-auth-token --generate` writes
them with the default umask); the admin's login emptied on the node; and no password or token in the
console, the runs' params and tags, the results or the server's logs.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import environ, free_port, need_tools, write_splits
from test_job_submit import copy_repository

from pipeline.sweep.record import tracking

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USER = "vpnssh"
RELAY = """import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while data := sys.stdin.buffer.read1(65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    sys.stdout.buffer.write(data); sys.stdout.buffer.flush()
"""


def need_ssh() -> None:
    need_tools("the on-prem test", ("/usr/sbin/sshd", "rsync", "ssh-keygen", "useradd"), "openssh-server and rsync",
               root_for="to add the throwaway SSH user")  # fmt: skip


def node_user(key_pub: str) -> pwd.struct_passwd:
    """The throwaway SSH user, created once, its authorized key replaced by this run's."""
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True)
        user = pwd.getpwnam(USER)
    # No password, but not locked: with UsePAM off, sshd refuses a locked account's keys too.
    subprocess.run(["usermod", "-p", "*", USER], check=True)
    ssh = Path(user.pw_dir) / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(key_pub)
    for p in (ssh, ssh / "authorized_keys"):
        os.chown(p, user.pw_uid, user.pw_gid)
    (ssh / "authorized_keys").chmod(0o600)
    # The node's pip finds the packages where this machine's pip does (a lab node has its own index
    # or the internet): this user's pip config, else the folders pip was told to look in.
    mine = Path.home() / ".config" / "pip" / "pip.conf"
    theirs = Path(user.pw_dir) / ".config" / "pip" / "pip.conf"
    theirs.parent.mkdir(parents=True, exist_ok=True)
    extra = "".join(f"{k} = {os.environ[v]}\n" for k, v in (("find-links", "PIP_FIND_LINKS"),) if v in os.environ)
    theirs.write_text(mine.read_text() if mine.is_file() else f"[global]\n{extra}")
    for p in (theirs.parent.parent, theirs.parent, theirs):
        os.chown(p, user.pw_uid, user.pw_gid)
    # A fresh node but for its venv (the config keeps an existing ~/vpn-venv: minutes saved): the
    # MLflow admin is created at a server's first start, so an old ~/mlflow keeps an old password.
    for stale in ("mlflow", "vpn", "shared", "raytmp", "vpn-data", ".vpn_env", ".vpn_mlflow_admin"):
        path = Path(user.pw_dir) / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return user


def user_processes(uid: int) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["uids", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["uids"] and p.info["uids"].real == uid and any(w in cmd for w in ("ray", "mlflow", "postgres")):
            found.append(f"{p.pid}: {cmd[:160]}")
    return found


@pytest.fixture()
def sshd(tmp_path):
    need_ssh()
    # One run at a time per machine: two runs (two checkouts' test suites) would share USER, and each
    # wipes the node's ~/vpn and `ray down` runs `ray stop` as USER, ending the other's Ray.
    lock = open("/tmp/vpn-test-onprem.lock", "w")  # noqa: SIM115 (held until the fixture ends)
    fcntl.flock(lock, fcntl.LOCK_EX)
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "host_key"], check=True)
    user = node_user(Path(f"{key}.pub").read_text())
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host_key'}\nPidFile {tmp_path / 'sshd.pid'}\n"
        f"AuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"UsePAM no\nAllowUsers {USER}\nStrictModes yes\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    log = tmp_path / "sshd.log"
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", config, "-E", log], start_new_session=True)
    (tmp_path / "relay.py").write_text(RELAY)
    try:
        yield {"key": key, "port": port, "user": user, "relay": tmp_path / "relay.py"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        lock.close()  # releases the flock


def cluster_copy(sshd, tmp_path: Path, repo: Path, mounts: dict[str, Path]) -> Path:
    """sweeps/onprem.yaml with the head on 127.0.0.1 and no workers, and the test's substitutions."""
    config = yaml.safe_load((REPO / "sweeps" / "onprem.yaml").read_text())
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config.update(min_workers=0, max_workers=0, cluster_name=f"vpn-test-{secrets.token_hex(3)}")
    config["auth"] = {
        "ssh_user": USER, "ssh_private_key": str(sshd["key"]),
        "ssh_proxy_command": f"{sys.executable} {sshd['relay']} {sshd['port']}",
    }  # fmt: skip
    data = write_splits(tmp_path / "data", {"train": 8, "val": 4, "test": 4})
    assert set(config["file_mounts"]) == {"~/vpn", *mounts}
    config["file_mounts"] = {"~/vpn": str(repo), **{k: str(v) for k, v in mounts.items()}, "~/vpn-data": str(data)}
    modes, env_line, bashrc, *install, data_line = config["setup_commands"]
    assert modes.startswith("chmod 700 ~/.ray")
    ray_port, mlflow_port = free_port(), free_port()
    env_line = (
        env_line.replace("VPN_HEAD_IP=192.168.1.10", "VPN_HEAD_IP=127.0.0.1")
        .replace("/mnt/vpn/", "$HOME/shared/")
        .replace("VPN_RAY_PORT=6379 VPN_MLFLOW_PORT=5000", f"VPN_RAY_PORT={ray_port} VPN_MLFLOW_PORT={mlflow_port}")
        .replace("VPN_DATA=$VPN_REPO/data/moving_mnist", "VPN_DATA=$HOME/vpn-data")
    )
    # Ray's temp folder in the node user's home: /tmp/ray belongs to whoever started Ray there first.
    env_line = env_line.replace("> ~/.vpn_env", "'export RAY_TMPDIR=$HOME/raytmp' > ~/.vpn_env")
    assert "test -f data/moving_mnist/val.npy" in data_line
    data_line = data_line.replace("test -f data/moving_mnist/val.npy", 'test -f "$VPN_DATA/val.npy"')
    config["setup_commands"] = [modes, env_line, bashrc, *install, data_line]
    start = config["head_start_ray_commands"]
    ports = {"--dashboard-port": free_port(), "--ray-client-server-port": free_port(),
             "--min-worker-port": 20000 + free_port() % 20000, "--dashboard-agent-listen-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}  # fmt: skip
    ports["--max-worker-port"] = ports["--min-worker-port"] + 200
    flags = " ".join(f"{k}={v}" for k, v in ports.items())
    start[-1] = start[-1].replace("--autoscaling-config", f"--num-cpus=2 {flags} --autoscaling-config")
    path = tmp_path / "onprem.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ray(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    done = subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0 and check:
        pytest.fail(f"ray {' '.join(args[:1])} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    return done


def login_file(path: Path, username: str) -> str:
    """A credentials file as docs/cluster.md writes it, but 0644: `ray up` must make the node's copy private."""
    password = secrets.token_hex(16)
    path.write_text(f"export MLFLOW_TRACKING_USERNAME={username} MLFLOW_TRACKING_PASSWORD={password}\n")
    path.chmod(0o644)
    return password


def test_ray_up_submit_down_over_ssh(sshd, tmp_path):
    repo = copy_repository(tmp_path / "repo")
    shutil.rmtree(repo / "data")  # data comes through file_mounts
    mounts = {k: tmp_path / k.rsplit("/", 1)[1].lstrip(".") for k in
              ("~/.ray/auth_token", "~/.vpn_mlflow_credentials", "~/.vpn_mlflow_admin")}  # fmt: skip
    logins = {"admin": login_file(mounts["~/.vpn_mlflow_admin"], "admin"),
              "vpn-trials": login_file(mounts["~/.vpn_mlflow_credentials"], "vpn-trials")}  # fmt: skip
    token = secrets.token_hex(32)
    mounts["~/.ray/auth_token"].write_text(token)
    mounts["~/.ray/auth_token"].chmod(0o644)  # `ray get-auth-token --generate` under the default umask
    config = cluster_copy(sshd, tmp_path, repo, mounts)
    home = Path(sshd["user"].pw_dir)
    uid = sshd["user"].pw_uid
    assert not user_processes(uid), user_processes(uid)
    console = []
    try:
        up = ray("up", "-y", "--no-config-cache", str(config), timeout=1500)  # the first install: minutes
        console.append(up.stdout + up.stderr)
        env_file = (home / ".vpn_env").read_text()
        uri = next(line.split("=", 1)[1] for line in env_file.splitlines() if "MLFLOW_TRACKING_URI" in line)
        port = next(w.split("=")[1] for w in env_file.split() if w.startswith("VPN_MLFLOW_PORT="))
        server = f"http://127.0.0.1:{port}"
        assert uri.endswith(":$VPN_MLFLOW_PORT")
        wait_for(f"{server}/health")  # unauthenticated by design; the server may still be starting
        check_secret_modes(home)
        # MLflow's own authentication: no credentials, 401.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert e.value.code == 401
        done = ray("submit", str(config), str(REPO / "pipeline/sweep/driver.py"), "--",
                   "sweeps/depth_width.yaml", "--profile", "tiny", timeout=900)  # fmt: skip
        console.append(done.stdout + done.stderr)
        assert "2 finished, 0 failed" in done.stdout, done.stdout[-4000:]
        with environ({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": logins["admin"]}):
            check_results(server, home, tmp_path)
            check_postgres(server, home)
            params_and_tags = logged_params_and_tags(server)
        pg_password = (home / "mlflow" / "pgpass").read_text().strip().rsplit(":", 1)[1]
        outputs = {"console": "\n".join(console), "params and tags": params_and_tags,
                   "results/": files_text(home / "vpn" / "results"), "~/.vpn_env": env_file,
                   "logs": files_text(home / "mlflow", "*.log")}  # fmt: skip
        for name, secret in {**logins, "Ray token": token, "PostgreSQL": pg_password}.items():
            for where, text in outputs.items():
                assert secret not in text, f"the {name} password or token is in the {where}"
    finally:
        # The documented stop: the server, then PostgreSQL (both outlive `ray down`).
        subprocess.run(["su", "-", USER, "-c", ". ~/.vpn_env && python -m pipeline.sweep.cluster.tracking_server stop"],
                       check=False, timeout=120)  # fmt: skip
        down = ray("down", "-y", str(config), check=False)
    assert down.returncode == 0, (down.stdout[-3000:], down.stderr[-3000:])
    deadline = time.monotonic() + 60
    while user_processes(uid) and time.monotonic() < deadline:
        time.sleep(1)
    assert not user_processes(uid), user_processes(uid)


def check_secret_modes(home: Path) -> None:
    """Issue 30: the secrets 0600 and their folders 0700 on the node, the admin's login emptied there."""
    private = {".ray": 0o700, ".ray/auth_token": 0o600, ".vpn_mlflow_credentials": 0o600,
               ".vpn_mlflow_admin": 0o600, "mlflow": 0o700, "mlflow/basic_auth.ini": 0o600,
               "mlflow/pgpass": 0o600, "mlflow/postgres": 0o700, "mlflow/server.log": 0o600,
               "mlflow/postgres.log": 0o600}  # fmt: skip
    modes = {rel: stat.S_IMODE((home / rel).stat().st_mode) for rel in private}
    assert modes == private, {rel: oct(m) for rel, m in modes.items()}
    assert (home / ".vpn_mlflow_admin").read_text() == ""  # now only in MLflow's user database


def check_postgres(server: str, home: Path) -> None:
    """The runs and the logins are in the head's PostgreSQL, and the driver wrote with the trials' login."""
    import psycopg2
    from mlflow.server import get_app_client

    folder = home / "mlflow"
    password = (folder / "pgpass").read_text().strip().rsplit(":", 1)[1]
    found = {}
    for db, query in (("mlflow", "SELECT count(*) FROM runs"), ("mlflow_auth", "SELECT username, is_admin FROM users")):
        conn = psycopg2.connect(host=str(folder), port=5432, user="mlflow", password=password, dbname=db)
        with conn, conn.cursor() as cur:
            cur.execute(query)
            found[db] = cur.fetchall()
        conn.close()
    assert found["mlflow"] == [(3,)]  # the sweep's parent run and its two trials
    assert sorted(found["mlflow_auth"]) == [("admin", True), ("vpn-trials", False)]
    auth = get_app_client("basic-auth", tracking_uri=server)
    exp = tracking.client(server).get_experiment_by_name("depth_width")
    # MLflow grants MANAGE to whoever creates an experiment or a registered model: the trials' login did.
    assert auth.get_user_permission("vpn-trials", "experiment", exp.experiment_id).permission == "MANAGE"
    assert auth.get_user_permission("vpn-trials", "registered_model", "depth_width").permission == "MANAGE"


def logged_params_and_tags(server: str) -> str:
    c = tracking.client(server)
    exp = c.get_experiment_by_name("depth_width")
    runs = c.search_runs([exp.experiment_id])
    return "\n".join(f"{k}={v}" for r in runs for k, v in {**r.data.params, **r.data.tags}.items())


def files_text(folder: Path, pattern: str = "**/*") -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(folder.glob(pattern)) if p.is_file())


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200
                return
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def check_results(server: str, home: Path, tmp_path: Path) -> None:
    """Every trial's run FINISHED on the head's server, the tables on the head, the model loads."""
    import mlflow.pyfunc
    import pandas as pd

    from pipeline.sweep.record import registry
    from pipeline.sweep.record.parent import trial_runs

    c = tracking.client(server)
    exp = c.get_experiment_by_name("depth_width")
    runs = trial_runs(c.search_runs([exp.experiment_id]))  # the sweep's parent run apart
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    trials = pd.read_parquet(home / "vpn" / "results" / "depth_width" / "tiny" / "trials.parquet")
    assert sorted(trials["run_id"]) == sorted(r.info.run_id for r in runs)
    (tmp_path / "model").mkdir()
    # registry._store: MLflow's process-wide URIs point at the server for this load only, and are
    # restored after it (left set, they sent later tests' registry calls to this stopped server).
    with registry._store(server):
        loaded = mlflow.pyfunc.load_model("models:/depth_width/latest", dst_path=str(tmp_path / "model"))
    model = loaded.unwrap_python_model().model
    assert sum(p.numel() for p in model.parameters()) > 0
