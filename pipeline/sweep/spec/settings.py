"""How a sweep's trials run, and the one-sequence experiment: the spec's run, run.asha and overfit
sections, one frozen dataclass each (pipeline.sweep.spec.validate reads them from a spec).

Each dataclass checks its own values in __post_init__, and each message starts with the field's name:
pipeline.params reads the field from there, so that the spec's error names its path
(run.asha.grace_steps: grace_steps must be >= 1, got 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RAY_RESOURCE_UNIT = 1e-4  # Ray counts resources in units of 1/10,000 (ray._common.ray_option_utils)


@dataclass(frozen=True)
class AshaSettings:
    """ASHA early stopping (Li et al. 2018), deciding on validation NLL at each report.

    grace_steps: training steps every trial runs before it can be stopped.
    reduction_factor: 1/reduction_factor of the trials survive each rung.
    """

    enabled: bool = False
    grace_steps: int = 100
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.grace_steps < 1:
            raise ValueError(f"grace_steps must be >= 1, got {self.grace_steps}")
        if not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class RunSettings:
    """How the trials run (resources, retries, storage); never what they compute.

    A trial runs workers_per_trial training processes. One (the default) is today's trial: the Tune
    trial trains, with cpus_per_trial CPUs and gpus_per_trial GPUs. N > 1 is data parallel
    (pipeline.sweep.trials.distributed): N Ray Train workers of cpus_per_worker CPUs and gpus_per_worker GPUs each
    (null: the per-trial values, so a profile that only raises workers_per_trial runs N copies of the
    one-worker trial's resources), splitting train.batch_size, the global batch, N ways.
    """

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    max_concurrent: int = 0
    # A searcher's trial count (search.algorithm other than grid; a grid runs each of its points):
    # num_samples configs drawn, each run `seeds` times with train.seed + 0..seeds-1.
    num_samples: int | None = None
    seeds: int = 1
    # Stop starting trials once their estimated cost would pass this (pipeline.sweep.spec.budget); null: none.
    budget_gpu_hours: float | None = None
    # The memory of one GPU the trials run on, in GB (1e9 bytes, as GPUs are sold), for the memory plan
    # (pipeline.sweep.cluster.plan); null: the smallest GPU sweeps/cluster.yaml offers.
    gpu_memory_gb: float | None = None
    # The memory one CPU trial's process may use, in GB, for the same plan; null: this machine's memory
    # shared by the trial processes its cores run at once.
    cpu_memory_gb: float | None = None
    max_failures: int = 2
    storage_path: str | None = None
    asha: AshaSettings = field(default_factory=AshaSettings)
    # What a trial logs besides its curves (neither changes what it computes, so neither is part of
    # the sweep's identity): frames drawn from the model at each validation, for MLflow's image view
    # (pipeline.sweep.record.pictures; 0: none), and MLflow's system metrics (CPU, memory, disk, network, NVIDIA
    # GPUs with nvidia-ml-py). Both costs are measured in docs/sweeps.md: 2% and 0.4% of a cpu trial.
    sample_frames: int = 1
    system_metrics: bool = True

    def __post_init__(self) -> None:
        if self.sample_frames < 0:
            raise ValueError(f"sample_frames must be >= 0, got {self.sample_frames}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")
        # Ray accepts fractions of one GPU, or whole GPUs.
        g = self.gpus_per_trial
        if g < 0 or (g > 1 and g != int(g)):
            raise ValueError(f"gpus_per_trial must be 0, a fraction in (0, 1] or a whole number, got {g}")
        for name in ("cpus_per_trial", "gpus_per_trial", "cpus_per_worker", "gpus_per_worker"):
            v = getattr(self, name)
            if v is not None and 0 < v < RAY_RESOURCE_UNIT:  # else Ray refuses it, but only as a trial starts
                raise ValueError(f"{name} must be 0 or at least {RAY_RESOURCE_UNIT} (Ray's unit), got {v}")
        n = self.workers_per_trial
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers_per_trial must be an integer >= 1, got {n!r}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0 or null, got {self.cpus_per_worker}")
        g = self.gpus_per_worker
        if g is not None and (g < 0 or (g > 1 and g != int(g))):
            raise ValueError(f"gpus_per_worker must be null, 0, a fraction in (0, 1] or a whole number, got {g}")
        if n == 1 and self.worker_gpus > 1:
            # The Trainer of a one-worker trial trains on one device: the others would sit idle.
            field_name = "gpus_per_worker" if self.gpus_per_worker is not None else "gpus_per_trial"
            raise ValueError(
                f"{field_name} must be at most 1 with workers_per_trial=1 (a trial trains on one GPU), got "
                f"{self.worker_gpus:g}; for several GPUs set workers_per_trial (data parallel, one GPU a worker)"
            )
        if n > 1 and self.worker_gpus not in (0, 1):
            # NCCL runs one rank per GPU; a rank holding several would use only one of them.
            field_name = "gpus_per_worker" if self.gpus_per_worker is not None else "gpus_per_trial"
            raise ValueError(
                f"{field_name} must be 0 (CPU workers, gloo) or 1 (one GPU per worker, NCCL) with "
                f"workers_per_trial={n}, got {self.worker_gpus:g}"
            )
        for name in ("max_concurrent", "max_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("num_samples", "seeds"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        b = self.budget_gpu_hours
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            raise ValueError(f"budget_gpu_hours must be a number > 0 or null, got {b!r}")
        for name in ("gpu_memory_gb", "cpu_memory_gb"):
            m = getattr(self, name)
            if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
                raise ValueError(f"{name} must be a number > 0 or null, got {m!r}")

    @property
    def worker_cpus(self) -> float:
        """CPUs of each training process (the trial itself when workers_per_trial is 1)."""
        return self.cpus_per_trial if self.cpus_per_worker is None else float(self.cpus_per_worker)

    @property
    def worker_gpus(self) -> float:
        """GPUs of each training process, before the cluster is asked (none there: CPU)."""
        return self.gpus_per_trial if self.gpus_per_worker is None else float(self.gpus_per_worker)


@dataclass(frozen=True)
class OverfitSettings:
    """The one-sequence experiment: sequence `index` of `split`, converged when the training NLL is
    within tol_per_subpixel * C*H*W nats/frame of that sequence's floor (vpn.overfit)."""

    split: str = "train"
    index: int = 0
    tol_per_subpixel: float = 0.01

    def __post_init__(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {self.split!r}")
        if self.index < 0:
            raise ValueError(f"index must be >= 0, got {self.index}")
        if not self.tol_per_subpixel > 0:
            raise ValueError(f"tol_per_subpixel must be > 0, got {self.tol_per_subpixel}")
