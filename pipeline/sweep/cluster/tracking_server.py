"""The head's MLflow server: the PostgreSQL behind it, its two logins, and the server itself.

sweeps/onprem.yaml and sweeps/cluster.yaml run `python -m pipeline.sweep.cluster.tracking_server` among
the head's start commands, at every `ray up`. Each step does nothing where its work is already done:

1. PostgreSQL (`postgres_up`). Both the runs (database `mlflow`) and the basic-auth users
   (`mlflow_auth`) live there, because SQLite holds one write lock per file, which every server worker
   and up to 100 trials would take turns on. Debian's PostgreSQL binaries run a database cluster of
   the head's own user in ~/mlflow/postgres. It is reached only through a Unix socket in the private
   folder ~/mlflow: no TCP port, so nothing listens on the network, no port clashes with a system
   PostgreSQL, and no other user of the head can connect. Nothing needs root beyond installing the
   package. Its password is made on the head, once, into ~/mlflow/pgpass (libpq's PGPASSFILE); it is
   never in the repository, in a URI or on a command line.
2. The logins (`set_logins`), written into MLflow's auth database through MLflow's own store:
   - the admin: the operator's login, read from a file that the head then empties. The workers copy
     the head's file mounts, so they receive the empty file;
   - the trials' login, which is not an admin. With `default_permission = READ` it can read every
     experiment. It can create experiments and registered models, and gets MANAGE on those it
     creates (MLflow grants it), but it cannot delete anything else or manage users.
   MLflow creates its admin only when none exists, and ignores MLFLOW_AUTH_ADMIN_PASSWORD afterwards.
   Setting both passwords here at every start is what makes a changed password take effect. A
   running server takes the change within CACHE_SECONDS (how long a worker trusts a checked login).
3. `mlflow server --app-name basic-auth` on the given (private) address, detached, unless it
   already answers. Its process group is in ~/mlflow/server.pid.

Everything written under ~/mlflow is private: the folder is 0700, the files 0600 (umask 077).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vpn.files import atomic_path

log = logging.getLogger(__name__)

ROLE = "mlflow"  # the PostgreSQL role, superuser of the head's own database cluster
DATABASES = {"runs": "mlflow", "auth": "mlflow_auth"}
USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
# Each server worker keeps up to 15 connections per database (SQLAlchemy's pool: 5, plus 10
# overflow), so 4 workers could open 120: more than PostgreSQL's default 100.
MAX_CONNECTIONS = 300
# How long each server worker trusts a login it has checked. Without the cache, every request costs a
# password hash check (werkzeug's scrypt: 0.11 s of CPU here), and 100 trials' requests would keep the
# head's cores busy with it. The price: an old password keeps working for up to this long after a change.
CACHE_SECONDS = 30


@dataclass(frozen=True)
class Login:
    username: str
    password: str
    source: Path


def read_login(path: Path) -> Login | None:
    """The login in a credentials file (`export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...`,
    the shell line that ~/.vpn_env sources); None for an empty file."""
    text = path.read_text()
    if not text.strip():
        return None
    try:
        words = [w for w in shlex.split(text, comments=True) if w != "export"]
    except ValueError as e:
        raise ValueError(f"{path}: not a shell line of export KEY=VALUE ({e})") from None
    values = dict(w.split("=", 1) for w in words if "=" in w)
    for key in (USERNAME, PASSWORD):
        if not values.get(key):
            raise ValueError(f"{path}: {key} is missing (expected: export {USERNAME}=... {PASSWORD}=...)")
    return Login(values[USERNAME], values[PASSWORD], path)


def private_folder(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # an existing folder too
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` atomically into a file only its owner can read (0600 from its creation on)."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)


# ------------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin() -> Path:
    """bin/ of the newest Debian PostgreSQL installed (the head's setup installs the package)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError(
            "no PostgreSQL under /usr/lib/postgresql: install Debian's postgresql on the head "
            "(sudo apt-get install -y postgresql; the configs' head_setup_commands do)"
        )
    return found[-1].parent


def postgres_up(folder: Path, port: int = 5432) -> dict[str, str]:
    """Start (creating it the first time) the head's PostgreSQL in folder/postgres, reached through the
    Unix socket folder/.s.PGSQL.<port> only; returns {"runs": uri, "auth": uri} (URIs without a password:
    libpq reads it from folder/pgpass, which `main` names in PGPASSFILE)."""
    binaries, data, pgpass = postgres_bin(), folder / "postgres", folder / "pgpass"
    if not (data / "PG_VERSION").exists():
        password = secrets.token_hex(24)
        write_private(pgpass, f"*:*:*:{ROLE}:{password}\n")
        pwfile = folder / ".initdb_password"
        write_private(pwfile, password)
        try:
            subprocess.run(
                [binaries / "initdb", "-D", data, "-U", ROLE, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                 "-E", "UTF8", "--no-instructions"],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        with (data / "postgresql.conf").open("a") as conf:
            # listen_addresses '': no TCP socket at all, the Unix socket in the 0700 folder only.
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{folder}'\nport = {port}\n"
                       f"max_connections = {MAX_CONNECTIONS}\n")  # fmt: skip
    elif not pgpass.is_file():
        raise RuntimeError(f"{pgpass} is missing, but {data} exists: restore it (its password) or delete both")
    status = subprocess.run([binaries / "pg_ctl", "-D", data, "status"], capture_output=True, check=False)
    if status.returncode != 0:  # 3: not running
        log.info("starting PostgreSQL in %s", data)
        # A session of its own: it outlives the SSH session of `ray up` (and ignores its hang-up).
        started = subprocess.run(
            [binaries / "pg_ctl", "-D", data, "-l", folder / "postgres.log", "-w", "-t", "120", "start"],
            capture_output=True, text=True, start_new_session=True, check=False,
        )  # fmt: skip
        if started.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start: {started.stdout}{started.stderr} (log: {folder}/postgres.log)"
            )
    _create_databases(folder, port)
    return {key: f"postgresql+psycopg2://{ROLE}@/{name}?host={folder}&port={port}" for key, name in DATABASES.items()}


def _create_databases(folder: Path, port: int) -> None:
    import psycopg2

    conn = psycopg2.connect(host=str(folder), port=port, user=ROLE, dbname="postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        with conn.cursor() as cur:
            for name in DATABASES.values():
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------
# The logins


def write_auth_config(
    path: Path, auth_uri: str, admin: str, cache_seconds: int = CACHE_SECONDS, default_permission: str = "READ"
) -> None:
    """MLflow's basic-auth config: `default_permission` (READ) for whoever has no grant, the users in
    `auth_uri`, a checked login trusted for `cache_seconds`."""
    write_private(
        path,
        f"[mlflow]\ndefault_permission = {default_permission}\ndatabase_uri = {auth_uri}\nadmin_username = {admin}\n"
        f"auth_cache_ttl_seconds = {cache_seconds}\n",
    )


def configured_admin(path: Path) -> str | None:
    """The admin's name in an existing basic_auth.ini (the head's copy of the admin's file is emptied)."""
    import configparser

    config = configparser.ConfigParser(interpolation=None)
    config.read(path)
    return config.get("mlflow", "admin_username", fallback=None)


def set_logins(auth_uri: str, admin: Login | None, trials: Login, admin_name: str | None = None) -> str:
    """Create or update the admin (from `admin`; None: keep the existing `admin_name`) and the trials'
    login (never an admin) in MLflow's auth database; returns the admin's name."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    name = admin.username if admin else admin_name
    if name is not None and trials.username == name:
        raise ValueError(
            f"{trials.source}: {USERNAME} is {name!r}, the admin's name: the trials need a login of their own"
        )
    store = SqlAlchemyStore()
    store.init_db(auth_uri)  # creates or migrates the auth database's tables
    try:
        if admin is not None:
            _put_user(store, admin, is_admin=True)
        elif name is None or not store.has_user(name):
            raise ValueError("the admin's credentials file is empty and MLflow has no admin yet: sync it again")
        _put_user(store, trials, is_admin=False)
    finally:
        store.engine.dispose()
    return name


def _put_user(store, login: Login, is_admin: bool) -> None:
    if not store.has_user(login.username):
        store.create_user(login.username, login.password, is_admin=is_admin)
        log.info("created MLflow user %s%s", login.username, " (admin)" if is_admin else "")
        return
    if not store.authenticate_user(login.username, login.password, use_primary=True):
        log.info("MLflow user %s: password changed", login.username)
        store.update_user(login.username, password=login.password)
    if store.get_user(login.username).is_admin != is_admin:
        store.update_user(login.username, is_admin=is_admin)


# ------------------------------------------------------------------------------------------------
# The server


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serve(folder: Path, host: str, port: int, artifacts: str, runs_uri: str, workers: int = 4) -> None:
    """`mlflow server --app-name basic-auth` on host:port, detached, unless one answers there already."""
    url = f"http://{host}:{port}"
    if answers(url):
        log.info("the MLflow server at %s is running", url)
        return
    # The server needs no login of its own: the trials' login is left out of its environment.
    env = {k: v for k, v in os.environ.items() if k not in (USERNAME, PASSWORD)}
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(folder / "basic_auth.ini"),
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    with (folder / "server.log").open("ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", host, "--port", str(port),
             "--backend-store-uri", runs_uri, "--artifacts-destination", artifacts, "--workers", str(workers)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group (server.pid): `kill -- -PID` stops it and its workers
        )  # fmt: skip
    write_private(folder / "server.pid", f"{server.pid}\n")
    deadline = time.monotonic() + 180
    while not answers(url):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow server did not start at {url}: see {folder}/server.log")
        time.sleep(1)
    log.info("the MLflow server answers at %s (PostgreSQL, basic-auth)", url)


def stop(folder: Path) -> None:
    """Stop the server (its process group, from server.pid) and then PostgreSQL; either may be down already."""
    pid_file = folder / "server.pid"
    if pid_file.is_file():
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                os.killpg(pid, 0)  # ProcessLookupError once the whole group is gone
                time.sleep(0.5)
            os.killpg(pid, signal.SIGKILL)
        pid_file.unlink()
        log.info("the MLflow server is stopped")
    if (folder / "postgres" / "PG_VERSION").exists():
        subprocess.run([postgres_bin() / "pg_ctl", "-D", folder / "postgres", "-m", "fast", "-w", "stop"],
                       capture_output=True, check=False)  # fmt: skip
        log.info("PostgreSQL is stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="PostgreSQL, the logins and the server, where not yet done")
    start.add_argument("--host", required=True, help="the head's private address: the server listens there only")
    start.add_argument("--port", type=int, default=5000)
    start.add_argument("--artifacts", required=True, help="--artifacts-destination: shared folder or s3:// URI")
    start.add_argument("--admin-login", type=Path, required=True, help="the admin's credentials file (emptied)")
    start.add_argument("--trials-login", type=Path, required=True, help="the trials' credentials file")
    start.add_argument("--workers", type=int, default=4, help="the server's worker processes")
    start.add_argument("--pg-port", type=int, default=5432, help="names the socket file only: no TCP port")
    halt = commands.add_parser("stop", help="stop the server, then PostgreSQL")
    for command in (start, halt):
        command.add_argument("--folder", type=Path, default=Path.home() / "mlflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.umask(0o077)  # every file below, PostgreSQL's and the server's logs included, private
    try:
        if args.command == "stop":
            stop(args.folder)
        else:
            start_all(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"tracking_server: {e}", file=sys.stderr)
        return 2
    return 0


def start_all(args: argparse.Namespace) -> None:
    folder = private_folder(args.folder)
    os.environ["PGPASSFILE"] = str(folder / "pgpass")  # here, and in the server it starts
    admin, trials = read_login(args.admin_login), read_login(args.trials_login)
    if trials is None:
        raise ValueError(f"{args.trials_login}: empty (expected: export {USERNAME}=... {PASSWORD}=...)")
    uris = postgres_up(folder, args.pg_port)
    name = set_logins(uris["auth"], admin, trials, configured_admin(folder / "basic_auth.ini"))
    write_auth_config(folder / "basic_auth.ini", uris["auth"], name)
    if admin is not None:
        # Now in MLflow's database: the head's copy goes, and so the workers' copies of it.
        write_private(args.admin_login, "")
    serve(folder, args.host, args.port, args.artifacts, uris["runs"], args.workers)


if __name__ == "__main__":
    raise SystemExit(main())
