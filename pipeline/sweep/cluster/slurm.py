"""A sweep inside a Slurm job: what sweeps/slurm.sbatch asks of Python, and what a driver asks of Slurm.

sweeps/slurm.sbatch runs `python -m pipeline.sweep.cluster.slurm COMMAND` for the steps a shell does
badly (docs/cluster.md, "On a Slurm cluster"):

    prepare --folder F [--mlflow]  the job's private folder F (0700, on the shared home): Ray's token
                                    and, with --mlflow, the job's MLflow logins and auth database; F/env
                                    is the shell line the script sources (RAY_AUTH_MODE=token, the token's
                                    path, the trials' login). Folders of ended jobs beside F (a job
                                    killed before its own cleanup) are removed
    address                         the head's address: VPN_HEAD_IP, else Ray's choice of this node's
                                    address
    port --host H                   a free TCP port on this node
    ray-start (--head --ip H --port P | --address A)
                                    `ray start ... --block` with free ports for Ray's other listeners,
                                    so that two jobs on one node do not clash; the node's CPUs (and GPUs)
                                    are the ones Slurm granted the step; a worker's address is Ray's
                                    choice
    mlflow --folder F --host H --port P --store URI --artifacts DIR
                                    `mlflow server --app-name basic-auth` on H:P only, one worker (the
                                    store is one SQLite file), writing the store and the artifacts
                                    folder on the shared filesystem
    wait-mlflow URL --pid PID       until the server answers (or its process ended)
    wait-nodes N                    until the Ray cluster (RAY_ADDRESS) has N live nodes

And for the lease (pipeline.sweep.cluster.lease): a driver that runs in a Slurm job records the job's id
and restart count in its lease, and `driver_gone` tells a later driver when that holder is certainly
dead: an earlier run of this same job (Slurm runs one instance of a job at a time, so a requeued job's
previous instance has ended), or a job that Slurm no longer runs (cancelled, finished, requeued and
pending). A requeued or resubmitted job then takes the sweep over at once instead of waiting for the
lease to lapse.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

JOB_ENV, RESTART_ENV = "SLURM_JOB_ID", "SLURM_RESTART_COUNT"
HEAD_IP_ENV = "VPN_HEAD_IP"
# The states in which a job's processes may still run (squeue's %T): any other state means its driver
# is gone (PENDING after a requeue, CANCELLED, COMPLETED, FAILED, TIMEOUT, PREEMPTED, NODE_FAIL, ...).
LIVE_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING"})
GONE = "GONE"  # squeue no longer knows the job (ended more than MinJobAge ago)


# -- the lease's questions -------------------------------------------------------------------------
def this_job() -> tuple[str, int] | None:
    """(job id, restart count) of the Slurm job this process runs in, or None outside Slurm."""
    job = os.environ.get(JOB_ENV)
    if not job:
        return None
    return job, int(os.environ.get(RESTART_ENV) or 0)


def job_state(job: str) -> str | None:
    """The job's state as squeue gives it, GONE once squeue no longer knows it, None if squeue cannot tell
    (not installed here, or the controller does not answer)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        done = subprocess.run(
            [squeue, "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode == 0:
        states = done.stdout.split()
        return states[0] if states else GONE
    return GONE if "Invalid job id" in done.stderr else None


def driver_gone(job: str, restart: int) -> bool:
    """Whether the driver that ran in Slurm job `job` (its `restart`-th start) has certainly ended."""
    mine = this_job()
    if mine is not None and mine[0] == job:
        return restart < mine[1]  # an earlier instance of this very job: Slurm has ended it
    state = job_state(job)
    return state is not None and state not in LIVE_STATES


# -- the batch script's steps ----------------------------------------------------------------------
def node_address() -> str:
    """This node's address for Ray and the MLflow server: VPN_HEAD_IP (on the head), else Ray's own choice
    (the address of the interface that routes outside; nothing is sent). Ray turns a loopback address
    given to it into that one, so the two must agree. A node with several networks (Ethernet beside
    InfiniBand, say) may need VPN_HEAD_IP set to the one the other nodes reach."""
    import ray.util

    return os.environ.get(HEAD_IP_ENV) or ray.util.get_node_ip_address()


def ray_node_address() -> str:
    import ray.util

    return ray.util.get_node_ip_address()


def worker_ports() -> int:
    """The first of 200 ports for Ray's workers: below the kernel's ephemeral range, from which the free
    ports above come (so the two never overlap), at a random place, so that two jobs on a node seldom
    share one."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    return 10002 + secrets.randbelow(max(1, ephemeral - 10002 - 201))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare(folder: Path, mlflow: bool) -> None:
    """The job's private folder: Ray's token, and with `mlflow` the job's own MLflow logins (see main)."""
    from pipeline.sweep.cluster.tracking_server import (
        PASSWORD,
        USERNAME,
        Login,
        private_folder,
        set_logins,
        write_auth_config,
        write_private,
    )

    private_folder(folder.parent)
    for old in folder.parent.iterdir():  # a cancelled job's (killed before it could clean up)
        state = job_state(old.name) if old.name != folder.name and old.name.isdigit() else None
        if state is not None and state not in LIVE_STATES:
            shutil.rmtree(old, ignore_errors=True)
    private_folder(folder)
    token = folder / "ray_token"
    write_private(token, secrets.token_hex(32) + "\n")  # as `ray get-auth-token --generate` makes one
    lines = [f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}"]
    if mlflow:
        # New logins at every start of the job: nothing of them outlives it. The admin's password is
        # set (MLflow would otherwise create its admin with a default password) and then forgotten.
        auth_uri = f"sqlite:///{folder / 'auth.db'}"
        admin = Login("admin", secrets.token_hex(16), folder)
        trials = Login("vpn-trials", secrets.token_hex(16), folder)
        name = set_logins(auth_uri, admin, trials)
        # MANAGE for every login without a grant: the trials' login must write the experiments that an
        # earlier `dvc repro` created in the same mlflow.db (no grant exists for them). Only this job
        # knows the password, and the server listens on the head's address only.
        write_auth_config(folder / "basic_auth.ini", auth_uri, name, default_permission="MANAGE")
        lines.append(f"export {USERNAME}={trials.username} {PASSWORD}={trials.password}")
    write_private(folder / "env", "\n".join(lines) + "\n")


def ray_start(head: bool, ip: str, port: int | None, address: str | None) -> list[str]:
    """`ray start ... --block` for this node, with free ports for Ray's listeners besides the head's port."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    command = [shutil.which("ray") or "ray", "start", "--block", f"--node-ip-address={ip}"]
    if cpus:
        command.append(f"--num-cpus={cpus}")
    # GPUs: Ray counts CUDA_VISIBLE_DEVICES, which Slurm sets to the step's GPUs (--gres).
    command += [
        f"--node-manager-port={free_port(ip)}",
        f"--object-manager-port={free_port(ip)}",
        f"--dashboard-agent-listen-port={free_port(ip)}",
        f"--dashboard-agent-grpc-port={free_port(ip)}",
        f"--metrics-export-port={free_port(ip)}",
        f"--runtime-env-agent-port={free_port(ip)}",
    ]
    low = worker_ports()
    command += [f"--min-worker-port={low}", f"--max-worker-port={low + 200}"]
    if head:
        # No dashboard: the sweep does not need it, and it would be one more listener on the network.
        command += ["--head", f"--port={port}", "--include-dashboard=false"]
        command.append(f"--ray-client-server-port={free_port(ip)}")
    else:
        command.append(f"--address={address}")
    return command


def serve_mlflow(folder: Path, host: str, port: int, store: str, artifacts: Path) -> list[str]:
    """The server's command line; its environment is set by `main` (the auth config, no login of its own)."""
    artifacts.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", host, "--port", str(port),
        "--backend-store-uri", store,
        # Artifacts as plain paths on the shared filesystem, as the embedded default keeps them, so that
        # `mlflow ui` on the same mlflow.db shows them after the job (a proxied `mlflow-artifacts:` URI
        # would need this server).
        "--default-artifact-root", artifacts.resolve().as_uri(), "--no-serve-artifacts",
        # One writer process: SQLite takes one write lock per file, and this is the only process that
        # writes the file over the network filesystem.
        "--workers", "1",
        "--uvicorn-opts", "--no-access-log",  # a line per request would bury the job's log
    ]  # fmt: skip


def wait_mlflow(url: str, pid: int, timeout: float) -> None:
    from pipeline.sweep.cluster.tracking_server import answers

    deadline = time.monotonic() + timeout
    while not answers(url):
        if not _alive(pid):
            raise RuntimeError(f"the MLflow server for {url} ended before it answered (see the job's log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow server at {url} did not answer within {timeout:.0f} s")
        time.sleep(1)


def wait_nodes(count: int, timeout: float, pid: int | None = None) -> list[dict]:
    """The live nodes of the Ray cluster at RAY_ADDRESS once there are `count` of them. `pid`: the head's
    `srun`, whose end means the head failed (ray.init would wait for it forever)."""
    import ray

    host, port = os.environ["RAY_ADDRESS"].rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:  # the head's port first
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            break
        except OSError:
            pass
        if pid is not None and not _alive(pid):
            raise RuntimeError("the Ray head ended before it answered (see `ray start` above in the job's log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head did not answer at {host}:{port} within {timeout:.0f} s")
        time.sleep(1)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False, logging_level=logging.WARNING)
    try:
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= count:
                return alive
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(alive)} of the job's {count} Ray nodes joined within {timeout:.0f} s")
            time.sleep(2)
    finally:
        ray.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="the job's private folder: Ray's token, MLflow's logins")
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--mlflow", action="store_true", help="the job serves MLflow: make its logins")
    commands.add_parser("address", help="the head's address")
    p = commands.add_parser("port", help="a free TCP port")
    p.add_argument("--host", default="127.0.0.1")
    p = commands.add_parser("ray-start", help="ray start --block on this node")
    p.add_argument("--head", action="store_true")
    p.add_argument("--ip", help="the head's address (a worker's is Ray's choice)")
    p.add_argument("--port", type=int)
    p.add_argument("--address")
    p = commands.add_parser("mlflow", help="the job's MLflow server (runs until stopped)")
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--artifacts", type=Path, required=True)
    p = commands.add_parser("wait-mlflow", help="until the MLflow server answers")
    p.add_argument("url")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300)
    p = commands.add_parser("wait-nodes", help="until the Ray cluster has N live nodes")
    p.add_argument("count", type=int)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--pid", type=int, help="the head's srun: its end fails the wait")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.command == "prepare":
            os.umask(0o077)
            prepare(args.folder, args.mlflow)
        elif args.command == "address":
            print(node_address())
        elif args.command == "port":
            print(free_port(args.host))
        elif args.command == "ray-start":
            if args.head == (args.address is not None) or (args.head and (args.port is None or args.ip is None)):
                parser.error("ray-start: either --head --ip H --port P, or --address A")
            ip = args.ip or ray_node_address()
            command = ray_start(args.head, ip, args.port, args.address)
            print(f"{socket.gethostname()}: {' '.join(command)}", flush=True)
            os.execv(command[0], command)
        elif args.command == "mlflow":
            command = serve_mlflow(args.folder, args.host, args.port, args.store, args.artifacts)
            env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(args.folder / "basic_auth.ini"),
                MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32),
                MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                # MLflow's Host check: the head's address (the trials) and loopback (an SSH tunnel's end).
                MLFLOW_SERVER_ALLOWED_HOSTS=f"{args.host},{args.host}:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*",
            )
            print(f"MLflow server: {args.store} on http://{args.host}:{args.port} (basic-auth)", flush=True)
            os.execve(command[0], command, env)
        elif args.command == "wait-mlflow":
            wait_mlflow(args.url, args.pid, args.timeout)
        elif args.command == "wait-nodes":
            nodes = wait_nodes(args.count, args.timeout, args.pid)
            described = [
                f"{n['NodeManagerAddress']} { ({k: v for k, v in n['Resources'].items() if k in ('CPU', 'GPU')}) }"
                for n in nodes
            ]
            print(f"Ray: {len(nodes)} of {args.count} node(s) up: {'; '.join(described)}")
    except (RuntimeError, ValueError, OSError) as e:
        print(f"slurm: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
