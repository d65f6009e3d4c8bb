"""Data-parallel trials: one Tune trial, N Ray Train workers, one MLflow run (run.workers_per_trial > 1).

Ray's Train V2 pattern for tuning ("Hyperparameter Tuning with Ray Tune" in Ray's Train guide): the
Tune trial is a light driver (`driver`) that builds a ray.train.torch.TorchTrainer of N workers
(`worker`) and waits for it; TuneReportCallback forwards rank 0's reports to Tune, so the progress
table, ASHA and the driver-side TrackingCallback see a data-parallel trial as any other.

- Placement (`plan`, before any trial starts): each worker asks for the per-worker resources
  (pipeline.sweep.spec.RunSettings: cpus_per_worker, gpus_per_worker). A TorchTrainer places its workers
  across nodes, so a trial fits when the live nodes together hold N such bundles. If they cannot
  the sweep stops at once with an error naming the fields: a placement group that can never be
  placed would leave the trial waiting forever. GPUs are requested only where the cluster has some
  (as for one-worker trials). The driver asks for no CPU or GPU (a small logical `memory`
  request, or a share of the custom resource `trial_driver` where a node offers it: Ray's advice
  is to keep drivers on a node that training cannot take down, such as the head), and the sweep
  runs at most as many trials at once as the cluster holds worker groups (max_concurrent_trials),
  so idle drivers do not pile up waiting for workers.
- Workers (`worker`): each rank runs pipeline.sweep.trainable.run_trial with ray.train as its session.
  TorchTrainer has started the process group (NCCL on GPUs, gloo on CPUs), so vpn.train.Trainer
  shards each step's global batch by rank and wraps the model in DDP: N workers compute the
  one-worker curve up to float rounding. Rank 0 alone talks to MLflow and writes checkpoints; every
  rank reports (ray.train.report is a barrier) and scores its share of the validation and test
  sequences.
- Restarts: the Train run lives in the trial's own folder of the sweep's storage
  (<experiment>/<trial>/train, the same name on every start). A dead worker or a lost worker node:
  Ray Train restarts the worker group from the run's last checkpoint (FailureConfig(max_failures=
  run.max_failures)), waiting for the cluster to offer N workers again. A dead driver (its node
  lost, the sweep interrupted and resumed): Tune restarts the trial, and the new TorchTrainer finds
  the run's checkpoints in storage and continues from the last. Either way rank 0 reattaches to the
  trial's MLflow run and logs no step twice (pipeline.sweep.tracking.MetricBuffer).
- Non-finite loss: the loss is all-reduced, so every rank sees it at the same step. Rank 0 marks the
  run FAILED as a one-worker trial does; every rank then ends without an error (a NaN is
  deterministic: Ray Train must not retry it) and the driver raises NonFiniteLoss, so that Tune
  marks the trial ERROR and a Tune retry refuses at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.sweep import tracking
from pipeline.sweep.spec import RunSettings

log = logging.getLogger(__name__)

# A custom resource that marks the nodes where trial drivers should run (sweeps/cluster.yaml puts it
# on the head). Absent, a driver asks for DRIVER_MEMORY bytes of Ray's logical `memory` resource:
# a request that takes no CPU or GPU from the workers (Tune refuses a request of nothing at all).
DRIVER_RESOURCE = "trial_driver"
DRIVER_SHARE = 0.01
DRIVER_MEMORY = 256 * 2**20
TRAIN_RUN_NAME = "train"  # the Train run's folder inside the trial's folder


@dataclass(frozen=True)
class Plan:
    """How a data-parallel trial runs on this cluster (the driver gets it as a plain dict)."""

    workers: int
    worker: dict[str, float]  # Ray resources of each worker, {"CPU": c} or {"CPU": c, "GPU": 1}
    driver: dict[str, float]  # the Tune trial's, in tune.with_resources' keys
    max_concurrent: int  # worker groups the cluster holds at once
    max_failures: int  # Ray Train's restarts of the worker group per driver start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bundles_per_node(nodes: Iterable[Mapping[str, float]], bundle: Mapping[str, float]) -> list[int]:
    """How many copies of `bundle` each node holds (its total resources, not what is free now)."""
    out = []
    for node in nodes:
        fits = [math.floor(float(node.get(k, 0)) / v + 1e-9) for k, v in bundle.items() if v > 0]
        out.append(min(fits) if fits else 0)
    return out


def plan(run: RunSettings, nodes: list[Mapping[str, float]]) -> Plan:
    """The placement of run.workers_per_trial workers on the live nodes' resources (ray.nodes()).

    Raises ValueError naming the spec's fields when no placement can ever hold one trial.
    """
    n = run.workers_per_trial
    cpu_field = "cpus_per_worker" if run.cpus_per_worker is not None else "cpus_per_trial"
    gpu_field = "gpus_per_worker" if run.gpus_per_worker is not None else "gpus_per_trial"
    gpus = run.worker_gpus
    cluster_gpus = sum(float(node.get("GPU", 0)) for node in nodes)
    if gpus and not cluster_gpus:
        log.warning("run.%s=%g but the cluster has no GPU: the %d workers of each trial run on CPU", gpu_field, gpus, n)
        gpus = 0.0
    worker = {"CPU": run.worker_cpus, **({"GPU": gpus} if gpus else {})}
    per_node = bundles_per_node(nodes, worker)
    if sum(per_node) < n:
        held = ", ".join(f"{ {k: node.get(k, 0) for k in worker} }" for node in nodes)
        raise ValueError(
            f"run.workers_per_trial={n} workers of {worker} each (run.{cpu_field}={run.worker_cpus:g}, "
            f"run.{gpu_field}={gpus:g}) cannot be placed: the cluster's nodes ({held}) hold {sum(per_node)} such "
            f"worker(s). Lower run.workers_per_trial or the per-worker resources, or add nodes "
            f"(on an autoscaling cluster, VPN_WAIT_FOR_NODES waits for them)"
        )
    if any(float(node.get(DRIVER_RESOURCE, 0)) > 0 for node in nodes):
        driver = {DRIVER_RESOURCE: DRIVER_SHARE}
    else:
        driver = {"memory": float(DRIVER_MEMORY)}
    return Plan(n, worker, driver, max(1, sum(per_node) // n), run.max_failures)


def driver(config: Mapping[str, Any], plan: Mapping[str, Any]) -> None:
    """Ray Tune function trainable of a data-parallel trial: runs its TorchTrainer to the end.

    plan: Plan.to_dict() (bound with tune.with_parameters, so a resumed sweep places its workers on
    the cluster it finds, not the one the sweep started on).
    """
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.sweep.trainable import refuse_known_non_finite

    cfg = config["trial"]
    if cfg.get("fault"):  # test hook: rank 0 may kill this driver (pipeline.sweep.trainable._Reporter)
        cfg = {**cfg, "fault": {**cfg["fault"], "driver_pid": os.getpid()}}
    client = tracking.client(cfg["tracking_uri"])
    refuse_known_non_finite(tracking.retrying(client.get_run, cfg["run_id"]))
    ctx = tune.get_context()
    storage = ctx.get_storage()  # the trial's folder on the sweep's storage (local, NFS, s3://)
    loop_config = {"trial": cfg, "plan": dict(plan), "trial_id": ctx.get_trial_id(), "trial_name": ctx.get_trial_name()}
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan["workers"], use_gpu=bool(plan["worker"].get("GPU")), resources_per_worker=plan["worker"]
        ),
        run_config=ray.train.RunConfig(
            # The same (storage, name) on every start of this trial: a new driver resumes the run.
            name=TRAIN_RUN_NAME,
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=plan["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
    # The workers end without an error on a non-finite loss; rank 0 has marked the run FAILED.
    refuse_known_non_finite(tracking.retrying(client.get_run, cfg["run_id"]))


def worker(loop_config: Mapping[str, Any]) -> None:
    """One rank of a data-parallel trial (Ray Train worker function)."""
    import ray.train
    import torch

    from pipeline.sweep.trainable import NonFiniteLoss, TrialClosed, run_trial

    plan = loop_config["plan"]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(plan["worker"]["CPU"])))  # the cores Ray granted this worker
    tags = {
        tracking.TAG_TRIAL_ID: loop_config["trial_id"],
        tracking.TAG_TRIAL_NAME: loop_config["trial_name"],
        tracking.TAG_RESOURCES: json.dumps(plan["worker"], sort_keys=True),  # per worker
    }
    try:
        run_trial(loop_config["trial"], ray.train, tags, rank=rank)
    except NonFiniteLoss:
        return  # not a crash to retry: the driver raises it for Tune (module docstring)
    except TrialClosed as e:  # stopped (ASHA): Ray ends the other ranks with the driver; no restart
        log.info("%s", e)
