"""params.yaml section `report`: which sweeps, where the tables are read and the reports written."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vpn.config import SEED_LIMIT

SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a spec's `name` (pipeline.sweep.spec.validate.NAME_RE)


@dataclass(frozen=True)
class ReportParams:
    """params.yaml section `report`.

    sweeps: sweep names to report (folders under results_dir).
    results_dir / out_dir: where the tables are read and the reports written (relative to the repo).
    data: Moving MNIST folder, for the ground truth beside the best run's samples.
    sample_split, sample_index, sample_context, sample_frames, sample_seed: the samples figure.
    converge_fraction, plateau_min_fraction, plateau_progress: see pipeline/report/build.py's docstring.
    """

    sweeps: tuple[str, ...] = ("depth_width",)
    results_dir: str = "results"
    out_dir: str = "reports"
    data: str = "data/moving_mnist"
    sample_split: str = "test"
    sample_index: int = 0
    sample_context: int = 5
    sample_frames: int = 5
    sample_seed: int = 0
    converge_fraction: float = 0.05
    plateau_min_fraction: float = 0.05
    plateau_progress: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.sweeps, str) or not isinstance(self.sweeps, (list, tuple)):
            raise ValueError(f"report.sweeps must be a list of sweep names, got {self.sweeps!r}")
        object.__setattr__(self, "sweeps", tuple(self.sweeps))
        if not self.sweeps:
            raise ValueError("report.sweeps must name at least one sweep")
        for name in self.sweeps:  # each names a folder under results_dir and out_dir
            if not isinstance(name, str) or not SWEEP_NAME.match(name):
                raise ValueError(f"report.sweeps: {name!r} is not a sweep name (letters, digits, '_', '.', '-')")
        if self.sample_split not in ("train", "val", "test"):
            raise ValueError(f"report.sample_split must be train, val or test, got {self.sample_split!r}")
        if self.sample_index < 0:
            raise ValueError(f"report.sample_index must be >= 0, got {self.sample_index!r}")
        if not 0 <= self.sample_seed < SEED_LIMIT:
            raise ValueError(f"report.sample_seed must be in [0, 2**32), got {self.sample_seed!r}")
        for name in ("converge_fraction", "plateau_min_fraction", "plateau_progress"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"report.{name} must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("sample_context", "sample_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"report.{name} must be >= 1, got {getattr(self, name)!r}")
