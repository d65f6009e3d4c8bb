"""Fault injection for the tests of crashes and lost nodes: never set by a spec.

A test passes `run_sweep(..., fault={...})`; the dict becomes a `Faults` in the trial's config
(pipeline.sweep.trials.trial.TrialConfig.fault), and the trial calls this module at two points only:

- `Faults.for_driver(pid)`: the driver of a data-parallel trial (pipeline.sweep.trials.distributed.driver)
  hands its own process id to its workers, so that rank 0 can kill it;
- `Faults.at_step(step, rank)`: every logged step of every rank (pipeline.sweep.trials.trainable), where
  the faults below fire, each once per marker file (the marker survives the restart it causes):

  kill_at_step: on rank `rank` (default 0), write the step to `marker` and SIGKILL this worker, like
    a lost node.
  hold_at_step: on that rank, write {"node_id", "pid", "step"} to `marker` and wait (hold_s, default
    300 s, or until the file `release` exists), so that a test can kill this worker's node at a known
    step, or act while the trial is known to be training.
  kill_driver_at_step: on rank 0 of a data-parallel trial, SIGKILL the trial's driver (driver_pid),
    write the step to `driver_marker`, then wait to be torn down.
  pauses: [[step, release], ...]: on that rank, at each step, write the step to `<release>.at.<pid>`
    and wait until the file `release` exists (at most hold_s), every time the step is reached: a
    test lets its trials go on only once it has done something (killed the tracking server, started
    it again: tests/test_tracking_outage.py).

One fault is the sweep driver's, not a trial's: `checkpoint_marker`, a file to which the driver appends
{"trial", "step"} (a JSON line) each time Ray Tune registers a trial's checkpoint
(pipeline.sweep.trials.callbacks.CheckpointMarker). A trial's report reaches Tune before its checkpoint is
registered (Tune fetches it with a separate `save` call on the trial's actor), so a test that kills a
node must wait for this line, not for the trial's own marker, to know which checkpoint it resumes from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self


@dataclass(frozen=True)
class Faults:
    """What to break in a trial, and where (see the module docstring)."""

    kill_at_step: int | None = None
    hold_at_step: int | None = None
    rank: int = 0
    marker: str | None = None
    hold_s: float = 300.0
    release: str | None = None
    kill_driver_at_step: int | None = None
    driver_marker: str | None = None
    driver_pid: int | None = None
    checkpoint_marker: str | None = None
    pauses: list | None = None  # [[step, release file], ...]

    def __post_init__(self) -> None:
        if (self.kill_at_step is not None or self.hold_at_step is not None) and not self.marker:
            raise ValueError("fault: kill_at_step and hold_at_step need a marker file")
        if self.kill_driver_at_step is not None and not self.driver_marker:
            raise ValueError("fault: kill_driver_at_step needs a driver_marker file")
        if any(len(p) != 2 or not p[1] for p in self.pauses or ()):
            raise ValueError(f"fault: pauses must be [[step, release file], ...], got {self.pauses!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:  # a misspelt hook would silently test nothing
            raise ValueError(f"unknown fault key(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set: plain values, for the dict that Ray Tune carries."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def for_driver(self, pid: int) -> Faults:
        """These faults with the driver's process id, for kill_driver_at_step."""
        return dataclasses.replace(self, driver_pid=pid)

    def at_step(self, step: int, rank: int) -> None:
        """Fire the faults due at this step on this rank (each once per marker file)."""
        if self.kill_driver_at_step == step and rank == 0 and _first_to(self.driver_marker, str(step)):
            os.kill(self.driver_pid, signal.SIGKILL)
            _hold(self.hold_s)
        for at, release in self.pauses or ():
            if at == step and rank == self.rank:
                Path(f"{release}.at.{os.getpid()}").write_text(str(step))
                _hold(self.hold_s, until=Path(release))
        if rank != self.rank or step not in (self.kill_at_step, self.hold_at_step):
            return
        if self.kill_at_step == step:
            if _first_to(self.marker, str(step)):
                os.kill(os.getpid(), signal.SIGKILL)
            return
        import ray

        note = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "step": step}
        if _first_to(self.marker, json.dumps(note)):
            _hold(self.hold_s, self.release)


def _first_to(path: str, text: str) -> bool:
    """Create `path` holding `text`, atomically; False if it exists (another worker, or an earlier try)."""
    marker = Path(path)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
    tmp.write_text(text)
    try:
        os.link(tmp, marker)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _hold(seconds: float, until: str | Path | None = None) -> None:
    """Wait `seconds`, or less once the file `until` exists."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and Path(until).exists()):
        time.sleep(0.2)
