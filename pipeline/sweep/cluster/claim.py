"""A driver claims its sweep before anything is created: which sweep it drives, the lease that keeps a
second driver out, and starting over on request.

1. Which sweep: the id of this spec, profile, data and code; or, with --continue-under-new-code, an
   unfinished sweep of the same spec, profile and data under other code (pipeline.sweep.record.lineage:
   the driver names it and the files that differ either way).
2. The lease on that id (pipeline.sweep.cluster.lease): a second driver is refused here, with exit
   status 2, before it creates or deletes anything, in one sentence naming the holder and how to take
   over (--take-over).
3. Under the lease: with --start-over, the sweep's runs and parent are archived (kept in the
   experiment with their metrics, under another sweep id: pipeline.sweep.record.runs.archive_sweep) and
   Ray's folder of the sweep is moved aside (<folder>.archived-<UTC time>), then the sweep starts
   afresh. Without it, runs that hold metrics while Ray's folder holds no sweep (another machine's
   storage, or a deleted folder) are refused: they are never deleted, and a new Ray sweep would train
   every trial again beside them.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.paths import repo_root
from pipeline.sweep.cluster.lease import Lease
from pipeline.sweep.record import lineage, tracking
from pipeline.sweep.record.runs import archive_sweep
from pipeline.sweep.spec import identity
from pipeline.sweep.spec.data_check import SweepDataError
from pipeline.sweep.spec.sweep import Sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claiming:
    """How a driver claims its sweep: the command line's --start-over, --take-over and
    --continue-under-new-code (see the module docstring)."""

    start_over: bool = False
    take_over: bool = False
    continue_under_new_code: bool = False


@dataclass(frozen=True)
class Claim:
    """The sweep this driver drives, under its lease, and what its parent run must record of the code."""

    sweep_id: str
    path: str  # Ray's folder of the sweep: <storage>/<sweep id>
    lease: Lease
    base: str  # identity.base_id_of: the id without the code
    computed_id: str  # the id of this code (sweep_id differs from it for a sweep continued under new code)
    files: dict[str, str]  # identity.code_digests
    version: dict[str, Any]  # lineage.code_version

    def record(self, client, parent_id: str) -> None:
        """The code this driver runs on the sweep's parent run (lineage.record_code)."""
        lineage.record_code(client, parent_id, self.base, self.version, self.files, self.computed_id)


def claim_sweep(
    client, experiment_id: str, uri: str, sweep: Sweep, data_identity: str, store: str, claiming: Claiming | None
) -> Claim:
    """Choose the sweep, take its lease, start over if asked (see the module docstring); raises
    pipeline.sweep.cluster.lease.LeaseHeld or SweepDataError (exit status 2) having changed nothing."""
    claiming = claiming or Claiming()
    files = identity.code_digests()
    computed = identity.sweep_id_of(sweep, data_identity, files)
    base = identity.base_id_of(sweep, data_identity)
    choice = lineage.choose_sweep(client, experiment_id, base, computed, files, claiming.continue_under_new_code)
    location = tracking.artifact_location(uri, sweep.name)
    lease = Lease.acquire(client, choice.sweep_id, take_over=claiming.take_over, artifact_location=location)
    try:
        path = f"{store.rstrip('/')}/{choice.sweep_id}"
        if claiming.start_over:
            _start_over(client, experiment_id, choice.sweep_id, path)
        else:
            _refuse_lost_ray_state(client, experiment_id, choice.sweep_id, path)
        latest = tracking.EXPERIMENT_LATEST.format(profile=sweep.profile)
        tracking.retrying(client.set_experiment_tag, experiment_id, latest, choice.sweep_id)
    except BaseException:
        lease.release()
        raise
    version = lineage.code_version(repo_root(), identity.code_identity(digests=files))
    return Claim(choice.sweep_id, path, lease, base, computed, files, version)


def _start_over(client, experiment_id: str, sweep_id: str, path: str) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    archived = archive_sweep(client, experiment_id, sweep_id, stamp)
    moved = _move_aside(path, f"{path}.archived-{stamp}")
    log.warning(
        "sweep %s starts over: %d run(s) archived as sweep %s~archived-%s%s", sweep_id, archived, sweep_id, stamp,
        f"; Ray's folder moved to {moved}" if moved else "",
    )  # fmt: skip


def _refuse_lost_ray_state(client, experiment_id: str, sweep_id: str, path: str) -> None:
    from ray import tune

    if tune.Tuner.can_restore(path):
        return
    trained = [r.info.run_name for r in tracking.sweep_runs(client, experiment_id, sweep_id) if r.data.metrics]
    if trained:
        raise SweepDataError(
            f"MLflow holds {len(trained)} trained run(s) of sweep {sweep_id} ({', '.join(trained[:5])}) but "
            f"Ray's folder {path} holds no sweep: give --storage (or VPN_SWEEP_STORAGE) the storage its "
            "first driver used, or rerun with --start-over to archive those runs and start the sweep again"
        )


def _move_aside(path: str, to: str) -> str | None:
    """Move Ray's folder of a sweep to `to` (a rename on a local path; a copy, then a delete, on a URI);
    None where there is none."""
    if "://" not in path:
        if not Path(path).exists():
            return None
        os.replace(path, to)
        return to
    import pyarrow.fs

    fs, where = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(where).type == pyarrow.fs.FileType.NotFound:
        return None
    dest = pyarrow.fs.FileSystem.from_uri(to)[1]
    pyarrow.fs.copy_files(where, dest, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(where)
    return to
