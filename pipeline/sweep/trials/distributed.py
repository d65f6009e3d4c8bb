"""Data-parallel trials: one Tune trial, N Ray Train workers, one MLflow run (run.workers_per_trial > 1).

Ray's Train V2 pattern for tuning ("Hyperparameter Tuning with Ray Tune" in Ray's Train guide): the
Tune trial is a light driver (`driver`) that builds a ray.train.torch.TorchTrainer of N workers
(`worker`) and waits for it; TuneReportCallback forwards rank 0's reports to Tune, so the progress
table, ASHA and the driver-side TrackingCallback see a data-parallel trial as any other.

- Placement (pipeline.sweep.cluster.placement.plan, before any trial starts): each worker asks for the
  per-worker resources (pipeline.sweep.spec.sweep.RunSettings: cpus_per_worker, gpus_per_worker), the
  driver for none; a trial that no placement can ever hold stops the sweep at once, naming the fields.
- Workers (`worker`): each rank runs pipeline.sweep.trials.trainable.run_trial with ray.train as its session,
  on the GPU Ray Train gave it (`rank_device`), whatever CUDA device train.device names.
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
  trial's MLflow run and logs no step twice (pipeline.sweep.record.tracking.MetricBuffer).
- Non-finite loss: the loss is all-reduced, so every rank sees it at the same step. Rank 0 marks the
  run FAILED as a one-worker trial does; every rank then ends without an error (a NaN is
  deterministic: Ray Train must not retry it) and the driver raises NonFiniteLoss, so that Tune
  marks the trial ERROR and a Tune retry refuses at once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.sweep.record import tracking
from pipeline.sweep.trials.devices import require_usable_gpu
from pipeline.sweep.trials.trial import TrialConfig

log = logging.getLogger(__name__)

TRAIN_RUN_NAME = "train"  # the Train run's folder inside the trial's folder


def driver(config: Mapping[str, Any], plan: Mapping[str, Any]) -> None:
    """Ray Tune function trainable of a data-parallel trial: runs its TorchTrainer to the end.

    plan: pipeline.sweep.cluster.placement.Plan.to_dict() (bound with tune.with_parameters, so a resumed
    sweep places its workers on the cluster it finds, not the one the sweep started on).
    """
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.sweep.trials import search
    from pipeline.sweep.trials.trainable import refuse_known_non_finite, searched_run

    cfg = searched_run(search.trial_config(config), tune.get_context().get_trial_id())
    if cfg.fault is not None:  # test hook: rank 0 may kill this driver (pipeline.sweep.trials.faults)
        cfg = cfg.replace(fault=cfg.fault.for_driver(os.getpid()))
    client = tracking.client(cfg.tracking_uri)
    refuse_known_non_finite(tracking.retrying(client.get_run, cfg.run_id))
    ctx = tune.get_context()
    storage = ctx.get_storage()  # the trial's folder on the sweep's storage (local, NFS, s3://)
    # Ray Train carries the loop's config as plain values: the TrialConfig's dict again.
    loop_config = {
        "trial": cfg.to_dict(),
        "plan": dict(plan),
        "trial_id": ctx.get_trial_id(),
        "trial_name": ctx.get_trial_name(),
    }
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
    refuse_known_non_finite(tracking.retrying(client.get_run, cfg.run_id))


def worker(loop_config: Mapping[str, Any]) -> None:
    """One rank of a data-parallel trial (Ray Train worker function)."""
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.sweep.trials.trainable import NonFiniteLoss, TrialClosed, run_trial

    plan = loop_config["plan"]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(plan["worker"]["CPU"])))  # the cores Ray granted this worker
    require_usable_gpu(float(plan["worker"].get("GPU", 0)))  # a GPU torch cannot use: fail at once (devices)
    tags = {
        tracking.TAG_TRIAL_ID: loop_config["trial_id"],
        tracking.TAG_TRIAL_NAME: loop_config["trial_name"],
        tracking.TAG_RESOURCES: json.dumps(plan["worker"], sort_keys=True),  # per worker
    }
    cfg = TrialConfig.from_dict(loop_config["trial"])
    cfg = cfg.replace(train=cfg.train.replace(device=rank_device(cfg.train.device, ray.train.torch.get_device)))
    try:
        run_trial(cfg, ray.train, tags, rank=rank)
    except NonFiniteLoss:
        return  # not a crash to retry: the driver raises it for Tune (module docstring)
    except TrialClosed as e:  # stopped (ASHA): Ray ends the other ranks with the driver; no restart
        log.info("%s", e)


def rank_device(name: str, ray_device: Callable[[], Any]) -> str:
    """The device a data-parallel rank trains on, for train.device `name`.

    A CUDA device (auto on a GPU worker, cuda, cuda:0) becomes the GPU Ray Train gave this rank
    (ray_device: ray.train.torch.get_device). Ray Train shows every worker of a node all of the
    node's granted GPUs, so an explicit cuda:0 would put every rank of the node on GPU 0. A CPU
    device stays as it is.
    """
    from vpn.train import resolve_device

    if name == "cpu" or (name == "auto" and resolve_device(name).type != "cuda"):  # not the CUDA the rank has
        return name
    device = ray_device()
    if device.type != "cuda":
        raise ValueError(
            f"train.device={name!r} but Ray Train gave this worker no GPU (it runs on {device}); "
            "set run.gpus_per_worker: 1, or train.device: cpu"
        )
    return str(device)
