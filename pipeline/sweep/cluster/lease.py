"""One driver per sweep: a lease on the sweep id, held in the MLflow store while a driver lives.

Where it lives, and why. A second driver of a sweep can come from a second terminal, a job resubmitted
by mistake, or a `dvc repro` beside a `ray job submit`, on this machine or another one. The MLflow
store is the one thing every driver of a sweep shares: its runs are there. Ray's storage may be a
local folder that differs per machine, and s3:// has no locks; a file lock works only on a shared
file system. So the lease is a row of the MLflow store, and it works wherever the sweep does: the
SQLite file of one machine, or an `mlflow server` that every node reaches.

How it is taken atomically. MLflow's client API has no compare-and-set, but every MLflow store keeps
experiment names unique (a unique constraint in its SQL tables, which a deleted experiment still
holds). The lease of sweep S is the experiment `.sweep-lease/S/<n>`, generation n: a driver takes the
next generation by creating that experiment, and of two drivers that try at once exactly one succeeds;
the other reads the leases again and finds the winner. The lease's tags name its holder (host, pid,
user, since when) and its last heartbeat.

While the driver lives, a thread sets the heartbeat tag every lapse / 10 seconds (30 s by default; every
5 s while the store does not answer). A lease whose heartbeat is older than its lapse time (300 s by
default, VPN_LEASE_LAPSE_S) has lapsed: its driver was killed, and the next driver takes the next
generation without a manual step; at once where the holder ran on this host (by its name) and its
process is gone (a killed driver restarted on the same node), or ran in a Slurm job that has ended (a
requeued job's earlier start, a cancelled job: pipeline.sweep.cluster.slurm). A driver that finds a holder silent for
more than two heartbeats (most likely dead) waits for its lease to lapse rather than refusing, so that
a job resubmitted after a crash goes on by itself. Clocks are the holders' own: they must agree to well
under the lapse time (NTP).

A driver that finds a newer generation at its heartbeat (another driver took the sweep over with
--take-over, or after this one's heartbeats stopped for longer than the lapse time) has lost the lease:
it stops its sweep (SIGINT: Tune saves and stops) and writes nothing more. The lease is deleted when the
driver ends; a deleted lease keeps its name, so generations only grow.
"""

from __future__ import annotations

import datetime
import getpass
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from pipeline.sweep.cluster.slurm import driver_gone, this_job
from pipeline.sweep.record import tracking
from pipeline.sweep.spec.data_check import SweepDataError

log = logging.getLogger(__name__)

LEASE_PREFIX = ".sweep-lease/"
LAPSE_ENV = "VPN_LEASE_LAPSE_S"
DEFAULT_LAPSE_S = 300.0
BEATS_PER_LAPSE = 10  # heartbeats in one lapse time: a holder is lapsed after missing this many
RETRY_S = 5.0  # the heartbeat's pace while the store does not answer
TAG_HOST, TAG_PID, TAG_USER = "lease.host", "lease.pid", "lease.user"
TAG_SINCE, TAG_BEAT, TAG_LAPSE = "lease.since_ms", "lease.heartbeat_ms", "lease.lapse_s"
TAG_SLURM_JOB, TAG_SLURM_RESTART = "lease.slurm_job", "lease.slurm_restart"


class LeaseHeld(SweepDataError):
    """Another live driver holds the sweep's lease (exit status 2, nothing created)."""


class LeaseLost(SweepDataError):
    """This driver's lease was taken over while it ran: it must write nothing more."""


def lapse_s() -> float:
    """The lapse time of a lease taken here: VPN_LEASE_LAPSE_S, else 300 s."""
    value = float(os.environ.get(LAPSE_ENV) or DEFAULT_LAPSE_S)
    if value <= 0:
        raise SweepDataError(f"{LAPSE_ENV}={value}: the lease's lapse time must be > 0 seconds")
    return value


@dataclass(frozen=True)
class Holder:
    """One generation of a sweep's lease, as its experiment's tags record it."""

    experiment_id: str
    generation: int
    active: bool  # False once its driver released it (the experiment deleted)
    host: str
    pid: int
    user: str
    since_ms: int
    heartbeat_ms: int
    lapse_s: float
    slurm_job: str = ""  # the Slurm job its driver ran in, if any, and that job's restart count
    slurm_restart: int = 0

    @classmethod
    def of(cls, experiment: Any, generation: int) -> Holder:
        tags = experiment.tags
        return cls(
            experiment_id=experiment.experiment_id,
            generation=generation,
            active=experiment.lifecycle_stage == "active",
            host=tags.get(TAG_HOST, "?"),
            pid=int(tags.get(TAG_PID, "0")),
            user=tags.get(TAG_USER, "?"),
            since_ms=int(tags.get(TAG_SINCE, "0")),
            heartbeat_ms=int(tags.get(TAG_BEAT, tags.get(TAG_SINCE, "0"))),
            lapse_s=float(tags.get(TAG_LAPSE, DEFAULT_LAPSE_S)),
            slurm_job=tags.get(TAG_SLURM_JOB, ""),
            slurm_restart=int(tags.get(TAG_SLURM_RESTART, "0")),
        )

    def silent_s(self, now: float) -> float:
        """Seconds since its last heartbeat."""
        return max(0.0, now - self.heartbeat_ms / 1000)

    def live(self, now: float) -> bool:
        """Active, heard from within its lapse time, not a process of this host that has ended, and not
        a driver of a Slurm job that has ended."""
        return self.active and self.silent_s(now) <= self.lapse_s and not self.gone_here() and not self.gone_in_slurm()

    def gone_in_slurm(self) -> bool:
        """Whether its driver ran in a Slurm job that has certainly ended (pipeline.sweep.cluster.slurm:
        an earlier start of this same job, or a job Slurm no longer runs): lapsed at once."""
        if not self.slurm_job:
            return False
        return driver_gone(self.slurm_job, self.slurm_restart)

    def gone_here(self) -> bool:
        """Whether its driver ran on this host (by name) and its process is gone: lapsed at once."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's live process
            return False
        return False

    def describe(self, now: float) -> str:
        since = datetime.datetime.fromtimestamp(self.since_ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return (
            f"pid {self.pid} on {self.host} (user {self.user}{job}) since {since} UTC, "
            f"last heartbeat {self.silent_s(now):.0f} s ago"
        )


def lease_name(sweep_id: str, generation: int) -> str:
    return f"{LEASE_PREFIX}{sweep_id}/{generation}"


def holders(client, sweep_id: str) -> list[Holder]:
    """Every generation of the sweep's lease, released ones too, oldest first."""
    prefix = lease_name(sweep_id, 0)[:-1]
    found = tracking.retrying(
        client.search_experiments, view_type=ViewType.ALL, filter_string=f"name LIKE '{prefix}%'", max_results=1000
    )
    out = []
    for e in found:
        rest = e.name[len(prefix) :]
        if e.name.startswith(prefix) and rest.isdigit():  # LIKE's `_` matches any character
            out.append(Holder.of(e, int(rest)))
    return sorted(out, key=lambda h: h.generation)


class Lease:
    """This driver's lease on a sweep id: `Lease.acquire(...)`, then `with lease:` until the driver ends."""

    def __init__(self, client, sweep_id: str, holder: Holder, on_lost: Callable[[], None] | None = None) -> None:
        self.client, self.sweep_id, self.holder = client, sweep_id, holder
        self.lost: str | None = None  # who took the sweep over, once one has
        self._on_lost = on_lost or _interrupt_self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeats, name=f"lease {sweep_id}", daemon=True)

    @classmethod
    def acquire(
        cls,
        client,
        sweep_id: str,
        *,
        take_over: bool = False,
        artifact_location: str | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> Lease:
        """Take the sweep's lease, or raise LeaseHeld naming the live holder and how to take over.

        take_over: take it even from a live holder (who stops at its next heartbeat). A holder silent
        for more than two heartbeats is waited for until its lease lapses (see the module docstring)."""
        lapse, raced = lapse_s(), 0
        while True:
            leases = holders(client, sweep_id)
            now = time.time()
            live = [h for h in leases if h.live(now)]
            if live and not take_over:
                holder = live[-1]
                if holder.silent_s(now) <= 2 * holder.lapse_s / BEATS_PER_LAPSE:
                    raise LeaseHeld(_held_message(sweep_id, holder, now))
                wait = holder.lapse_s - holder.silent_s(now) + 1
                log.warning("sweep %s: its driver (%s) seems dead: waiting %.0f s for its lease to lapse",
                            sweep_id, holder.describe(now), wait)  # fmt: skip
                time.sleep(min(wait, holder.lapse_s / BEATS_PER_LAPSE))
                continue
            generation = leases[-1].generation + 1 if leases else 0
            since = int(time.time() * 1000)
            tags = {
                TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()), TAG_USER: getpass.getuser(),
                TAG_SINCE: str(since), TAG_BEAT: str(since), TAG_LAPSE: str(lapse),
                "mlflow.note.content": f"The lease of sweep {sweep_id}: held while its driver runs, deleted when "
                "it ends (pipeline/sweep/cluster/lease.py).",
            }  # fmt: skip
            if job := this_job():
                tags.update({TAG_SLURM_JOB: job[0], TAG_SLURM_RESTART: str(job[1])})
            try:
                experiment_id = client.create_experiment(
                    lease_name(sweep_id, generation), artifact_location=artifact_location, tags=tags
                )
            except MlflowException as e:
                raced += 1
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                if raced > 5:  # it exists, yet the search does not show it: this user may not read it
                    raise SweepDataError(
                        f"sweep {sweep_id}: its lease {lease_name(sweep_id, generation)} exists in the MLflow store "
                        "but this user cannot read it; ask its owner, or an admin to grant READ on it"
                    ) from None
                continue  # another driver took this generation first: read the leases again
            break
        for old in leases:  # lapsed or taken over: released for them, so the experiments list stays short
            if old.active:
                _delete(client, old.experiment_id)
        holder = Holder(
            experiment_id, generation, True, tags[TAG_HOST], os.getpid(), tags[TAG_USER], since, since, lapse,
            tags.get(TAG_SLURM_JOB, ""), int(tags.get(TAG_SLURM_RESTART, "0")),
        )  # fmt: skip
        log.info("sweep %s: lease %s taken (lapses %.0f s after the last heartbeat)", sweep_id, generation, lapse)
        lease = cls(client, sweep_id, holder, on_lost)
        lease._thread.start()
        return lease

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Stop the heartbeats and delete the lease (unless it was taken over); idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=30)
        if self.lost is None and not _delete(self.client, self.holder.experiment_id):
            log.warning("sweep %s: lease not released; it lapses %.0f s after its last heartbeat",
                        self.sweep_id, self.holder.lapse_s)  # fmt: skip

    def ensure_held(self) -> None:
        """Raise LeaseLost if another driver took the sweep over while this one ran."""
        if self.lost is not None:
            raise LeaseLost(
                f"sweep {self.sweep_id} was taken over by {self.lost} while this driver ran: this driver "
                "stopped and left its runs to that one"
            )

    def _heartbeats(self) -> None:
        pace = self.holder.lapse_s / BEATS_PER_LAPSE
        wait = pace
        while not self._stop.wait(wait):
            try:
                newer = [h for h in holders(self.client, self.sweep_id) if h.generation > self.holder.generation]
                if newer or not self._still_active():
                    self.lost = newer[-1].describe(time.time()) if newer else "someone who deleted its lease"
                    log.error("sweep %s: taken over by %s; stopping this driver", self.sweep_id, self.lost)
                    self._on_lost()
                    return
                now_ms = str(int(time.time() * 1000))
                tracking.retrying(self.client.set_experiment_tag, self.holder.experiment_id, TAG_BEAT, now_ms)
                wait = pace
            except Exception as e:  # the store away: beat again soon, it may lapse meanwhile
                log.warning("sweep %s: lease heartbeat failed (%s); retrying in %.0f s", self.sweep_id, e, RETRY_S)
                wait = min(RETRY_S, pace)

    def _still_active(self) -> bool:
        experiment = tracking.retrying(self.client.get_experiment, self.holder.experiment_id)
        return experiment.lifecycle_stage == "active"


def _held_message(sweep_id: str, holder: Holder, now: float) -> str:
    return (
        f"sweep {sweep_id} is already driven by {holder.describe(now)}: stop that driver and rerun this "
        f"command, or wait, as its lease lapses {holder.lapse_s:.0f} s after its last heartbeat, or rerun "
        "with --take-over once you know that driver is dead"
    )


def _delete(client, experiment_id: str) -> bool:
    try:
        tracking.retrying(client.delete_experiment, experiment_id)
        return True
    except Exception as e:  # already deleted by a driver that took over, or the store away
        log.info("lease experiment %s not deleted: %s", experiment_id, e)
        return False


def _interrupt_self() -> None:
    """Stop this driver as Ctrl+C does: Ray Tune saves the sweep's state and returns."""
    os.kill(os.getpid(), signal.SIGINT)
