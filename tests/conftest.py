"""What several test modules share: tiny data, a copy of the checkout as a git repository, a free port,
the environment, a local Ray, an `mlflow server`, a PostgreSQL.

Helpers are plain functions and context managers (import them: `from conftest import local_ray`),
so that a module-scoped fixture can set the environment its Ray workers inherit before Ray starts;
`mlflow_server` and `local_ray` are also fixtures of those names.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# The files whose tests take minutes, longest first: pytest runs the suite in two processes
# (pyproject.toml: pytest-xdist, each file in one process, in collection order), and a long file
# started last would leave one process working alone at the end.
LONGEST_FILES = ("test_paper_finding.py", "test_cluster.py", "test_onprem.py", "test_slurm.py", "test_pipeline_e2e.py")


def pytest_collection_modifyitems(config, items) -> None:
    """LONGEST_FILES first, in that order, then the rest as collected (the order within a file kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


def write_splits(folder: Path, counts: Mapping[str, int], frames: int = 6, p: float = 0.25, seed: int = 0) -> Path:
    """Random sparse sequences, uint8 (N, frames, 1, 8, 8) in {0, 255}, as <folder>/<split>.npy for each split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        np.save(folder / f"{split}.npy", (rng.random((n, frames, 1, 8, 8)) < p).astype(np.uint8) * 255)
    return folder


def copy_repo(dest: Path) -> None:
    """The files git would carry (tracked and untracked-but-not-ignored): no data, no stores."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def git_repo(work: Path) -> dict[str, str]:
    """Make the copy a git repository (DVC's home) and return the environment its stages run in."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(
        DVC_NO_ANALYTICS="1",
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONPATH=str(work),  # the copy's pipeline/ and vpn/, in the driver and in Ray's workers
        RAY_ADDRESS="local",  # a Ray of the sweeps' own, even where another runs on this machine
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return env


def need_tools(test: str, tools: tuple[str, ...], installs: str, root_for: str | None = None) -> None:
    """Skip `test` where a machine-level tool (or root) is missing; under CI (CI set), fail, naming what
    .ci/run installs: there the test must run."""
    missing = [t for t in tools if not shutil.which(t)]
    if root_for and os.geteuid() != 0:
        missing.append(f"root ({root_for})")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{test} needs {missing} (.ci/run installs {installs})")
        pytest.skip(f"needs {missing}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set, and as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def running_local_ray(**init) -> Iterator[str]:
    """A Ray of its own (unless one is already up in this process), 2 CPUs; yields its GCS address.

    address "local": a Ray of its own, even where another runs on the machine (a `ray start`, a
    test). Its workers inherit this process's environment as it is now: set it before.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(**{"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False, **init})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with proxied artifacts in `root` and a SQLite backend there, or
    `backend` (a URI); `args` and `env` are added to its command line and environment. On one port for
    life: stop() then start() again is the same server restarted (its port, its store)."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        backend: str | None = None,
        workers: int = 1,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root, self.port = root, port or free_port()
        self.backend, self.workers, self.args, self.env = backend, workers, tuple(args), dict(env or {})
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> str:
        """Start it and wait until /health answers; returns its URI."""
        from pipeline.sweep.driver import QUIET_ENV

        with (self.root / "server.log").open("a") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                    "--backend-store-uri", self.backend or f"sqlite:///{self.root / 'server.db'}",
                    "--artifacts-destination", str(self.root / "server_artifacts"),
                    "--workers", str(self.workers), *self.args,
                ],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its workers share its process group
                env={**os.environ, **QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it and the workers it started, nothing else (SIGKILL: a crash, nothing flushed)."""
        if self._process is None:
            return
        server, self._process = self._process, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@contextlib.contextmanager
def running_mlflow_server(
    root: Path,
    backend: str | None = None,
    workers: int = 1,
    args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """An MlflowServer (see there) for the block; yields its URI."""
    server = MlflowServer(root, backend=backend, workers=workers, args=args, env=env)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture()
def mlflow_server(tmp_path) -> Iterator[str]:
    """An `mlflow server` for one test (running_mlflow_server in tmp_path); yields its URI."""
    with running_mlflow_server(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """A local Ray for the module, telemetry off (QUIET_ENV); yields its GCS address."""
    from pipeline.sweep.driver import QUIET_ENV

    with environ(QUIET_ENV), running_local_ray() as address:
        yield address


PG_USER = "vpnpg"  # PostgreSQL refuses to run as root: the tests' server runs as this user


def postgres_bin() -> Path | None:
    """The newest of Debian's PostgreSQL versions installed (its bin/ folder), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def _pg_user() -> pwd.struct_passwd:
    """Root: the unprivileged PG_USER, created when missing (a fresh CI machine); anyone else: themselves."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        PG_USER], check=True)  # fmt: skip
        return pwd.getpwnam(PG_USER)


@contextlib.contextmanager
def running_postgres(fsync: bool = False) -> Iterator[Callable[[str], str]]:
    """Debian's PostgreSQL in a temp folder on a free loopback port, with a password (scram-sha-256),
    run as an unprivileged user; yields `database(name) -> SQLAlchemy URI`, which creates the database.

    fsync off by default: a test's server need not survive a power loss, and it is faster on a loaded
    machine; the load benchmark keeps it on (what a real server does).
    """
    binaries = postgres_bin()
    if binaries is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("needs Debian's postgresql (/usr/lib/postgresql/*/bin)")
    user = _pg_user()
    as_user = {"user": user.pw_uid, "group": user.pw_gid} if os.geteuid() == 0 else {}
    # In /tmp, not pytest's tmp_path: that sits in root's 0700 folder, which the server's user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="vpn-pg-"))
    os.chown(folder, user.pw_uid, user.pw_gid)
    password, port = secrets.token_hex(16), free_port()
    (folder / "pw").write_text(password)
    os.chown(folder / "pw", user.pw_uid, user.pw_gid)
    data, log = folder / "data", folder / "postgres.log"

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True, **as_user)

    run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
        f"--pwfile={folder / 'pw'}", "-E", "UTF8", "--no-instructions")  # fmt: skip
    (folder / "pw").unlink()
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                   f"max_connections = 300\nfsync = {'on' if fsync else 'off'}\n")  # fmt: skip
    try:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", "start")
    except subprocess.CalledProcessError:
        pytest.fail(f"PostgreSQL did not start:\n{log.read_text()[-3000:] if log.exists() else ''}")
    base = f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}"

    def database(name: str) -> str:
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            if not c.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return f"{base}/{name}"

    try:
        yield database
    finally:
        subprocess.run([str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], cwd=folder,
                       check=False, capture_output=True, **as_user)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
