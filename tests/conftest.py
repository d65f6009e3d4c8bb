"""What several test modules share: tiny data, a copy of the checkout as a git repository, a free port,
the environment, a local Ray, an `mlflow server`.

Helpers are plain functions and context managers (import them: `from conftest import local_ray`),
so that a module-scoped fixture can set the environment its Ray workers inherit before Ray starts;
`mlflow_server` and `local_ray` are also fixtures of those names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# The files whose tests take minutes, longest first: pytest runs the suite in two processes
# (pyproject.toml: pytest-xdist, each file in one process, in collection order), and a long file
# started last would leave one process working alone at the end.
LONGEST_FILES = ("test_paper_finding.py", "test_cluster.py", "test_onprem.py", "test_pipeline_e2e.py")


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
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts in `root`, on one port
    for life: stop() then start() again is the same server restarted (its port, its store)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> str:
        """Start it and wait until /health answers; returns its URI."""
        from pipeline.sweep.driver import QUIET_ENV

        with (self.root / "server.log").open("a") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                    "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                    "--artifacts-destination", str(self.root / "server_artifacts"), "--workers", "1",
                ],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its workers share its process group
                env={**os.environ, **QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
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
def running_mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts in `root`; yields its URI."""
    server = MlflowServer(root)
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
