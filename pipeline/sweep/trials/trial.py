"""What one trial of a sweep is given: `TrialConfig`, one frozen dataclass of typed pieces.

The driver builds it for each grid point (`TrialConfig.of_point`); the trainable, the data-parallel
workers and the driver-side callbacks read its attributes. It becomes a plain dict (`to_dict`) only
where Ray carries it, and back (`from_dict`) where Ray hands it over:

    driver:  param_space={"trial": grid_search([c.to_dict() for c in configs])}   (pickled into the
             experiment state, so a resumed sweep hands its trials the same dicts)
    trial:   TrialConfig.from_dict(config["trial"])   (pipeline.sweep.trials.trainable.trial,
             pipeline.sweep.trials.distributed.driver and worker, pipeline.sweep.trials.callbacks)

The dict holds only JSON values: the two configs as their to_dict(), the data path as a string.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pipeline.sweep.record import outage
from pipeline.sweep.spec.sweep import OverfitSettings, Point, Sweep
from pipeline.sweep.trials.faults import Faults
from vpn.config import TrainConfig, VPNConfig, refuse_unknown_keys

# The tracking server's address when it differs from the one a trial's config recorded at the sweep's
# start: Ray Tune restores a resumed trial's config as it was, and a requeued Slurm job starts its MLflow
# server anew, on another port or node (sweeps/slurm.sbatch sets this on every Ray node of the job).
TRIALS_URI_ENV = "VPN_TRIALS_TRACKING_URI"


def current_uri(recorded: str) -> str:
    """The tracking URI to use for one recorded in Ray Tune's state (a trial's config, a driver callback):
    VPN_TRIALS_TRACKING_URI where set, else the recorded one."""
    return os.environ.get(TRIALS_URI_ENV) or recorded


@dataclass(frozen=True)
class TrialConfig:
    """One grid point as a trial runs it.

    point, label: the point's index in the grid and its readable name (the MLflow run name).
    run_id: the MLflow run the driver created for the point; the trial reattaches to it on a retry.
    mode: "train" or "overfit"; overfit: the one-sequence settings in overfit mode, else None.
    data: the absolute Moving MNIST folder (trials run with their working directory under /tmp/ray).
    tracking_uri: the MLflow store, absolute (VPN_TRIALS_TRACKING_URI, where set, replaces it in from_dict).
    sample_frames, system_metrics: what the trial logs besides its curves (pipeline.sweep.spec.sweep.RunSettings).
    fault: test hooks (pipeline.sweep.trials.faults), None in every real sweep.
    tracking_wait_s: how long the trial waits for an away tracking server at its start and end (the
    driver's VPN_TRACKING_WAIT_S; None: the trial's own, pipeline.sweep.record.outage).
    sweep_id, experiment_id: where a searched trial finds its run (run_id None: the driver creates the
    run when the trial starts, pipeline.sweep.trials.searched_runs); None for a grid's trials.
    """

    point: int
    label: str
    run_id: str | None
    mode: str
    model: VPNConfig
    train: TrainConfig
    data: Path
    tracking_uri: str
    overfit: OverfitSettings | None
    sample_frames: int
    system_metrics: bool
    fault: Faults | None = None
    sweep_id: str | None = None
    experiment_id: str | None = None
    tracking_wait_s: float | None = None

    def __post_init__(self) -> None:
        if (self.mode == "overfit") != (self.overfit is not None):
            raise ValueError(f"trial {self.label}: mode={self.mode!r} with overfit={self.overfit!r}")

    @classmethod
    def of_point(
        cls, sweep: Sweep, point: Point, run_id: str, tracking_uri: str, fault: Faults | None = None
    ) -> TrialConfig:
        return cls(
            point=point.index,
            label=point.label,
            run_id=run_id,
            mode=sweep.mode,
            model=point.model,
            train=point.train,
            data=Path(sweep.data),
            tracking_uri=tracking_uri,
            overfit=sweep.overfit if sweep.mode == "overfit" else None,
            sample_frames=sweep.run.sample_frames,
            system_metrics=sweep.run.system_metrics,
            fault=fault,
            tracking_wait_s=outage.wait_s(),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values only: the dict Ray Tune carries in `config["trial"]`."""
        return {
            "point": self.point,
            "label": self.label,
            "run_id": self.run_id,
            "mode": self.mode,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data": str(self.data),
            "tracking_uri": self.tracking_uri,
            "overfit": dataclasses.asdict(self.overfit) if self.overfit is not None else None,
            "sample_frames": self.sample_frames,
            "system_metrics": self.system_metrics,
            "fault": self.fault.to_dict() if self.fault is not None else None,
            "sweep_id": self.sweep_id,
            "experiment_id": self.experiment_id,
            "tracking_wait_s": self.tracking_wait_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        refuse_unknown_keys(cls, d)
        return cls(
            **{
                **d,
                "model": VPNConfig.from_dict(d["model"]),
                "train": TrainConfig.from_dict(d["train"]),
                "data": Path(d["data"]),
                "overfit": OverfitSettings(**d["overfit"]) if d.get("overfit") is not None else None,
                "fault": Faults.from_dict(d["fault"]) if d.get("fault") else None,
                "tracking_uri": current_uri(d["tracking_uri"]),
            }
        )

    def replace(self, **changes: Any) -> TrialConfig:
        return dataclasses.replace(self, **changes)
