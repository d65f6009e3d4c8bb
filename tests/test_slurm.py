"""sweeps/slurm.sbatch on a real Slurm: Debian's slurm-wlm and munge, two nodes on one host.

The test starts its own daemons and stops exactly those: a munged on its own socket and key, one
slurmctld and two slurmd (`slurmd -N n1`, `-N n2`, one port, pid file, spool folder and log each:
`%n` in slurm.conf), all on 127.0.0.1, ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no
cgroups). Each node has one CPU, so a two-node job puts one trial on each: the Ray head on n1, a Ray
worker on n2, started by the script's `srun -w NODE`, trials on n2 writing to the MLflow server that
the script runs on n1. Both "nodes" are this host: the shared filesystem is its disk, and both Ray
nodes have its address (Ray's choice, as on a cluster). The copy of the script changes only its EDIT
lines: the partition, no GPUs, one CPU.

1. The tiny sweep, two nodes: its trial runs FINISHED in the repository's mlflow.db, the job's log
   naming the store, the sweep id and the tables' folder; the job's secrets gone; nothing left running.
2. A longer sweep stopped three ways and resumed each time: the time limit's warning (SIGUSR1 to the
   batch shell, as `--signal=B:USR1@600` sends it: the script stops the driver and requeues the job),
   a preemption (`scontrol requeue`), and `scancel` followed by the same sbatch command. It ends with
   each trial once, FINISHED, every step logged once. A requeued job waits 2 minutes before Slurm starts
   it again (its begin time); the test sets that begin time to now.
3. `bash -n` and shellcheck pass on the script.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, need_tools
from test_job_submit import copy_repository

from pipeline.sweep.record.tracking import TRAIN_KEY

REPO = Path(__file__).resolve().parents[1]
STEPS = 400  # the longer sweep's
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
CONF = """ClusterName=vpntest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool-%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd-%n.log
SlurmUser=root
SlurmdUser=root
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=3600
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname={host} Port={port1} CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname={host} Port={port2} CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def need_slurm() -> None:
    need_tools("the Slurm test", (*DAEMONS, "sbatch", "scontrol", "squeue", "scancel"), "slurm-wlm and munge",
               root_for="slurmd runs the jobs")  # fmt: skip


class Slurm:
    """The test's own Slurm: its config, and the commands run against it."""

    def __init__(self, base: Path) -> None:
        self.base, self.conf = base, base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done

    def job(self, job: str) -> dict[str, str]:
        """scontrol's fields of the job (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job).stdout.strip()
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def start(self) -> None:
        base = self.base
        for folder in ("state", "spool-n1", "spool-n2"):
            (base / folder).mkdir()
        key = base / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(
            ["/usr/sbin/munged", "--force", f"--socket={base}/munge.sock", f"--key-file={key}",
             f"--log-file={base}/munged.log", f"--pid-file={base}/munged.pid", f"--seed-file={base}/munged.seed"],
            check=True, timeout=60,
        )  # fmt: skip
        self.conf.write_text(
            CONF.format(
                host=os.uname().nodename, base=base, ctld_port=free_port(), port1=free_port(), port2=free_port()
            )
        )
        self.run("/usr/sbin/slurmctld", "-f", str(self.conf), "-i")
        for node in ("n1", "n2"):
            self.run("/usr/sbin/slurmd", "-f", str(self.conf), "-N", node)
        deadline = time.monotonic() + 120
        while self.run("sinfo", "-h", "-o", "%T %D", check=False).stdout.split() != ["idle", "2"]:
            if time.monotonic() > deadline:
                logs = "".join(f"\n{p.name}:\n{p.read_text()[-2000:]}" for p in base.glob("*.log"))
                pytest.fail(f"the test's Slurm did not come up: {self.run('sinfo', check=False).stdout}{logs}")
            time.sleep(1)

    def stop(self) -> None:
        """Cancel the jobs left, then stop exactly the daemons this test started (their pid files)."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 90
            while self.run("squeue", "-h", "-o", "%i", check=False).stdout.split() and time.monotonic() < deadline:
                time.sleep(1)
        for name in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged"):
            pid_file = self.base / f"{name}.pid"
            if not pid_file.is_file():
                continue
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(60):
                    time.sleep(0.5)
                    os.kill(pid, 0)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def slurm():
    need_slurm()
    base = Path(tempfile.mkdtemp(prefix="vpnsl", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    cluster = Slurm(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def repository(slurm: Slurm, name: str) -> tuple[Path, dict[str, str]]:
    """A copy of the repository with tiny data and the script's EDIT lines set for the test's Slurm, and
    the environment sbatch runs in (the job inherits it, as it does on a cluster)."""
    repo = copy_repository(slurm.base / name)
    script = repo / "sweeps" / "slurm.sbatch"
    text = script.read_text()
    edits = {"#SBATCH --partition=gpu\n": "#SBATCH --partition=test\n", "#SBATCH --gres=gpu:1\n": "",
             "#SBATCH --cpus-per-task=8\n": "#SBATCH --cpus-per-task=1\n"}  # fmt: skip
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    script.write_text(text)
    home = slurm.base / f"{name}-home"
    home.mkdir()
    env = {k: v for k, v in slurm.env.items() if not k.startswith(("MLFLOW_", "RAY_", "VPN_"))}
    env.update(
        HOME=str(home), VPN_VENV=str(Path(sys.prefix)),
        RAY_TMPDIR=str(slurm.base / f"{name[:2]}r"),  # Ray's sockets: a short path of this test's own
    )  # fmt: skip
    return repo, env


def submit(slurm: Slurm, repo: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", "sweeps/slurm.sbatch", *args],
        cwd=repo, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def log_of(repo: Path, job: str) -> str:
    path = repo / f"slurm-vpn-sweep-{job}.out"
    return path.read_text() if path.is_file() else "(no log yet)"


def wait_job(slurm: Slurm, repo: Path, job: str, what, timeout: float = 600) -> dict[str, str]:
    """Poll the job until what(fields) holds; fail with its log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = slurm.job(job)
        if what(fields):
            return fields
        time.sleep(2)
    pytest.fail(f"job {job} timed out in state {slurm.job(job).get('JobState')}:\n{log_of(repo, job)[-6000:]}")


def ended(fields: dict[str, str]) -> bool:
    return fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def runs(repo: Path, experiment: str) -> dict[str, tuple[str, str]]:
    """The trial runs of the experiment in the repository's mlflow.db: name -> (status, run id)."""
    with sqlite3.connect(f"file:{repo / 'mlflow.db'}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute(
            "SELECT r.name, r.status, r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = ? AND r.lifecycle_stage = 'active' AND r.run_uuid IN "
            "(SELECT run_uuid FROM tags WHERE key = 'sweep_id')",
            (experiment,),
        ).fetchall()
    return {name: (status, run_id) for name, status, run_id in rows}


def steps(repo: Path, run_id: str, key: str = TRAIN_KEY) -> list[int]:
    with sqlite3.connect(f"file:{repo / 'mlflow.db'}?mode=ro", uri=True, timeout=30) as db:
        return [s for (s,) in db.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = ?", (run_id, key))]


def our_processes(marker: str) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd, env = " ".join(p.info["cmdline"] or []), p.info["environ"] or {}
        except psutil.Error:
            continue
        if p.pid != os.getpid() and (marker in cmd or marker in env.get("SLURM_CONF", "")):
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


def test_the_batch_script_passes_bash_n_and_shellcheck():
    script = REPO / "sweeps" / "slurm.sbatch"
    done = subprocess.run(["bash", "-n", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    need_tools("the batch script's check", ("shellcheck",), "shellcheck")
    done = subprocess.run(["shellcheck", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


@pytest.mark.slow
def test_the_tiny_sweep_runs_on_two_slurm_nodes(slurm):
    repo, env = repository(slurm, "tiny")
    job = submit(slurm, repo, env, "sweeps/depth_width.yaml", "--profile", "tiny")
    fields = wait_job(slurm, repo, job, ended)
    log = log_of(repo, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-6000:]
    trials = runs(repo, "depth_width")
    assert len(trials) == 2 and {s for s, _ in trials.values()} == {"FINISHED"}, (trials, log[-4000:])
    # Both nodes ran Ray, and the job's log names where everything went.
    assert "Ray: 2 of 2 node(s) up" in log, log[-4000:]
    assert f"the runs go to {repo}/mlflow.db" in log
    sweep_id = next(line for line in log.splitlines() if "sweep depth_width-tiny-" in line).split("sweep ")[1][:40]
    assert f"tables {repo}/results/depth_width/tiny" in log, log[-4000:]
    assert (repo / "results" / "depth_width" / "tiny" / "trials.parquet").is_file()
    assert sweep_id.startswith("depth_width-tiny-")
    # The job's secrets went with it; no daemon of the job is left.
    assert not (Path(env["HOME"]) / ".vpn_slurm" / job).exists()
    assert "MLFLOW_TRACKING_PASSWORD" not in log
    assert not [p for p in our_processes(str(repo)) if "slurmstepd" not in p]


def longer_spec(repo: Path) -> Path:
    """depth_width's tiny profile, longer: STEPS steps, every one logged, a checkpoint every 20 (long enough
    to be stopped three times while it trains)."""
    spec = yaml.safe_load((repo / "sweeps" / "depth_width.yaml").read_text())
    spec["profiles"]["tiny"]["train"].update(steps=STEPS, log_every=1, val_every=100, ckpt_every=20)
    path = repo / "sweeps" / "longer.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def progress(repo: Path) -> int:
    """The highest step that both trials have reported to Ray Tune (0 before): from their result.json in
    Tune's storage. Not from mlflow.db, which only the job's server may touch while the job runs."""
    reached = []
    for result in sorted((repo / "ray_results").glob("depth_width-tiny-*/0*_e1-*/result.json")):
        reported = []
        for line in result.read_text().splitlines():
            try:
                reported.append(json.loads(line).get("step", 0))
            except ValueError:  # a line being written
                pass
        reached.append(max(reported, default=0))
    return min(reached) if len(reached) == 2 else 0


def wait_progress(slurm: Slurm, repo: Path, job: str, beyond: int, timeout: float = 600) -> int:
    """The progress once the running job has taken both trials past step `beyond`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = progress(repo)
        state = slurm.job(job)
        if reached > beyond and state["JobState"] == "RUNNING":
            return reached
        if ended(state):
            pytest.fail(f"job {job} ended before step {beyond}:\n{log_of(repo, job)[-6000:]}")
        time.sleep(1)
    pytest.fail(f"job {job} did not pass step {beyond}:\n{log_of(repo, job)[-6000:]}")


def restart_now(slurm: Slurm, repo: Path, job: str, restarts: int) -> None:
    """Wait until the job is requeued (pending with `restarts` restarts), then let it start at once."""
    wait_job(slurm, repo, job, lambda f: f["JobState"] == "PENDING" and f.get("Restarts") == str(restarts))
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")


@pytest.mark.slow
def test_a_stopped_sweep_resumes_each_trial_once_and_each_step_once(slurm):
    repo, env = repository(slurm, "longer")
    spec = longer_spec(repo).relative_to(repo)
    command = (str(spec), "--profile", "tiny")
    job = submit(slurm, repo, env, *command)
    # 1. The time limit's warning: SIGUSR1 to the batch shell only; the job requeues itself.
    wait_progress(slurm, repo, job, 4)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    restart_now(slurm, repo, job, 1)
    log = log_of(repo, job)
    assert "requeueing job" in log and "exited with status 130" in log, log[-6000:]
    # 2. A preemption: `scontrol requeue` (SIGTERM to every process of the job, then requeued).
    wait_progress(slurm, repo, job, progress(repo))
    slurm.run("scontrol", "requeue", job)
    restart_now(slurm, repo, job, 2)
    # 3. scancel, then the same command by hand: a new job takes the sweep over at once.
    wait_progress(slurm, repo, job, progress(repo))
    slurm.run("scancel", job)
    wait_job(slurm, repo, job, ended)
    second = submit(slurm, repo, env, *command)
    fields = wait_job(slurm, repo, second, ended, timeout=900)
    log = log_of(repo, second)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-6000:]
    assert "waiting" not in log, log[-6000:]  # the cancelled job's lease was not waited for
    trials = runs(repo, "depth_width")
    assert len(trials) == 2 and {s for s, _ in trials.values()} == {"FINISHED"}, trials
    for name, (_, run_id) in trials.items():
        assert sorted(steps(repo, run_id)) == list(range(1, STEPS + 1)), name  # every step once
    # The secrets: the finished job removed its own; the cancelled one's, killed before its cleanup,
    # went at the next job's start.
    for job_id in (job, second):
        assert not (Path(env["HOME"]) / ".vpn_slurm" / job_id).exists(), job_id
