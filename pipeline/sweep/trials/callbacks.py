"""Driver-side Ray Tune hooks of a sweep. In their own module (not pipeline.sweep, which runs as
__main__) so that the pickled experiment state refers to them by an importable name on resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pipeline.sweep.record import tracking
from pipeline.sweep.trials import search
from pipeline.sweep.trials.trial import TrialConfig, current_uri

log = logging.getLogger(__name__)


def trial_config(trial: Any) -> TrialConfig:
    """The TrialConfig of a Tune trial, from the dict Tune carries (pipeline.sweep.trials.trial), with a
    searched trial's drawn values applied (pipeline.sweep.trials.search)."""
    return search.trial_config(trial.config)


def trial_name(trial: Any) -> str:
    """Ray's trial name (progress table, folder): <point>_<label>."""
    cfg = trial_config(trial)
    return f"{cfg.point:03d}_{cfg.label}"


class TrackingCallback(Callback):
    """Closes the MLflow runs of trials that ended without closing them themselves.

    - A trial stopped by the scheduler (ASHA) is killed between two reports: its run is marked
      FINISHED with the tag stopped_early=true (its curve is complete up to its last report).
    - A trial that errored for good (crashes beyond max_failures) is marked FAILED with the error.
    A trial that ends normally, or on a non-finite loss, has already set its own status.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client = None

    def __getstate__(self) -> dict[str, Any]:  # pickled into the experiment state: no client
        return {"uri": self.uri, "_client": None}

    def __setstate__(self, state: dict[str, Any]) -> None:  # restored on a resume: this job's server
        self.__dict__.update(state, uri=current_uri(state["uri"]))

    @property
    def client(self):
        if self._client is None:
            self._client = tracking.client(self.uri)
        return self._client

    def _open_run(self, trial: Any):
        cfg = trial_config(trial)
        run_id = cfg.run_id or tracking.find_trial_run(self.client, cfg.experiment_id, cfg.sweep_id, trial.trial_id)
        if run_id is None:  # a searched trial that never started has no run
            return None
        run = tracking.retrying(self.client.get_run, run_id)
        return run if run.info.status in ("RUNNING", "SCHEDULED") else None

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._open_run(trial)
        if run is not None:
            step = (trial.last_result or {}).get("step")
            tags = {tracking.TAG_STOPPED_EARLY: "true", "stopped_at_step": step}
            tracking.set_tags(self.client, run.info.run_id, tags)
            tracking.retrying(self.client.set_terminated, run.info.run_id, status="FINISHED")
            log.info("trial %s stopped early by the scheduler at step %s", trial_name(trial), step)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._open_run(trial)
        if run is not None:
            error = _last_line(trial.get_error()) or "trial failed (see the Ray trial's error.txt)"
            tracking.set_tags(self.client, run.info.run_id, {tracking.TAG_ERROR: error[:5000]})
            tracking.retrying(self.client.set_terminated, run.info.run_id, status="FAILED")


class CheckpointMarker(Callback):
    """The test hook `checkpoint_marker` (pipeline.sweep.trials.faults): one JSON line {"trial", "step"} per
    checkpoint Tune registers. Tune calls on_checkpoint from the same loop iteration that then
    registers it, so once the line is read the checkpoint is the one a restart resumes from."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        # The save was asked for by the result carrying the checkpoint, and the trial's next step
        # waits for it: last_result is that result.
        line = json.dumps({"trial": trial_name(trial), "step": (trial.last_result or {}).get("step")})
        with Path(self.path).open("a") as out:  # one writer (this driver), one short line per write
            out.write(line + "\n")


def _last_line(text: Any) -> str:
    lines = [line for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
