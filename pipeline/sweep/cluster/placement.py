"""Where a sweep's trials run: the profile for the cluster, its resources, and a placement that can hold them.

Every check here runs before anything is created (no MLflow run, no Ray experiment): a trial that can
never be placed would otherwise wait forever.

- `choose_profile`: `--profile auto` is `gpu` on a cluster with GPUs, else `cpu`.
- `wait_for_nodes`: an autoscaling cluster starts with its worker nodes still booting;
  VPN_WAIT_FOR_NODES=<seconds> waits for them (sweeps/cluster.yaml sets it).
- `trial_resources`: a one-worker trial's {"cpu", "gpu"}. GPUs are requested only when the cluster
  has some: in Ray 2.60 a GPU request on a CPU-only cluster leaves the trial PENDING forever.
- `plan`: the workers of a data-parallel trial (run.workers_per_trial > 1,
  pipeline.sweep.trials.distributed). A TorchTrainer places its workers across nodes, so a trial fits when
  the live nodes together hold N per-worker bundles. The trial's driver asks for no CPU or GPU (a
  small logical `memory` request, or a share of the custom resource `trial_driver` where a node
  offers it: Ray's advice is to keep drivers on a node that training cannot take down, such as the
  head), and the sweep runs at most as many trials at once as the cluster holds worker groups
  (max_concurrent_trials), so idle drivers do not pile up waiting for workers.
- `trainable_of`: the Tune trainable with those resources.
- `probe_gpus`: the memory of the live nodes' GPUs, measured on them (one task of one GPU a node), for
  the sweep's memory plan (pipeline.sweep.cluster.plan.check_plan_on_cluster).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.sweep.spec.data_check import SweepDataError
from pipeline.sweep.spec.sweep import RunSettings, Sweep, SweepSpec

log = logging.getLogger(__name__)

WAIT_ENV = "VPN_WAIT_FOR_NODES"
# A custom resource that marks the nodes where trial drivers should run (sweeps/cluster.yaml puts it
# on the head). Absent, a driver asks for DRIVER_MEMORY bytes of Ray's logical `memory` resource:
# a request that takes no CPU or GPU from the workers (Tune refuses a request of nothing at all).
DRIVER_RESOURCE = "trial_driver"
DRIVER_SHARE = 0.01
DRIVER_MEMORY = 256 * 2**20


def choose_profile(spec: SweepSpec, requested: str, cluster: Mapping[str, float] | None) -> str:
    if requested != "auto":
        return requested
    has_gpu = bool(cluster and cluster.get("GPU", 0))
    for name in ("gpu", "cpu") if has_gpu else ("cpu",):
        if name in spec.profiles:
            return name
    return spec.profiles[0]


def wait_for_nodes(
    ray, need: Mapping[str, float], wait_s: float, bundles: list[dict[str, float]] | None = None
) -> dict[str, float]:
    """The cluster's resources, after waiting up to wait_s for it to offer `need` ({"CPU": n, "GPU": g}).

    An autoscaling cluster starts with its worker nodes still booting (or none at all): what it has
    at submit time is not what it will have. VPN_WAIT_FOR_NODES (seconds, default 0) sets wait_s.
    While it waits, `bundles` (one trial's workers) are asked of the autoscaler, so that node types
    with min_workers 0 (sweeps/cluster.yaml's 8-GPU nodes) are started too.
    """
    import time

    cluster = dict(ray.cluster_resources())
    deadline = time.monotonic() + wait_s
    announced = False
    while any(float(cluster.get(k, 0)) < v for k, v in need.items() if v) and time.monotonic() < deadline:
        if not announced:
            log.info("waiting up to %.0f s for the cluster to offer %s (it has %s)", wait_s, dict(need), cluster)
            announced = True
            if bundles:
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=bundles)
        time.sleep(5)
        cluster = dict(ray.cluster_resources())
    if announced and bundles:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])  # the trials' own requests keep the nodes from here on
    return cluster


def trial_resources(sweep: Sweep, cluster: Mapping[str, float]) -> dict[str, float]:
    """{"cpu": n, "gpu": g} of a one-worker trial: GPUs only where the cluster has them (else the
    request would hang). Data-parallel trials: `plan`."""
    run = sweep.run
    gpus = float(cluster.get("GPU", 0))
    want = run.worker_gpus
    gpu_field = "gpus_per_worker" if run.gpus_per_worker is not None else "gpus_per_trial"
    if want and not gpus:
        log.warning(
            "profile %s asks for %g GPU(s) per trial but the cluster has none: trials run on CPU", sweep.profile, want
        )
        want = 0.0
    elif want > gpus:
        raise SweepDataError(f"{sweep.source}: run.{gpu_field}={want:g} but the cluster has only {gpus:g} GPU(s)")
    cpus = run.worker_cpus
    if cpus > float(cluster.get("CPU", 0)):
        have = float(cluster.get("CPU", 0))
        cpu_field = "cpus_per_worker" if run.cpus_per_worker is not None else "cpus_per_trial"
        raise SweepDataError(f"{sweep.source}: run.{cpu_field}={cpus:g} but the cluster has {have:g} CPU(s)")
    return {"cpu": cpus, "gpu": want}


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


def trainable_of(sweep: Sweep, cluster: Mapping[str, float], nodes: list[Mapping[str, float]]):
    """The Tune trainable with its resources, and the most trials to run at once (None: Tune's choice).

    One worker per trial: pipeline.sweep.trials.trainable.trial, which trains in the Tune trial itself. Several:
    pipeline.sweep.trials.distributed.driver, which runs them through Ray Train, placed by `plan`.
    """
    from ray import tune

    if sweep.run.workers_per_trial == 1:
        from pipeline.sweep.trials.trainable import trial

        return tune.with_resources(trial, trial_resources(sweep, cluster)), sweep.run.max_concurrent or None
    from pipeline.sweep.trials import distributed

    try:
        placed = plan(sweep.run, nodes)
    except ValueError as e:
        raise SweepDataError(f"{sweep.source}: {e}") from e
    log.info(
        "%d worker(s) of %s per trial, at most %d trial(s) at once; drivers ask for %s",
        placed.workers, placed.worker, placed.max_concurrent, placed.driver,
    )  # fmt: skip
    driver = tune.with_parameters(distributed.driver, plan=placed.to_dict())
    return tune.with_resources(driver, placed.driver), sweep.run.max_concurrent or placed.max_concurrent


GPU_PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GPUProbe:
    """What probe_gpus found: (node id, GPU name, total bytes) of each node that answered with a CUDA
    device, and, where none did, why (no node offers a GPU, torch there sees none, no answer in time)."""

    gpus: tuple[tuple[str, str, int], ...] = ()
    why_none: str = ""


def _gpu_memory() -> tuple[str, int] | None:
    """On a Ray worker granted one GPU: its name and total memory in bytes; None where torch sees none."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def probe_gpus(ray, timeout_s: float = GPU_PROBE_TIMEOUT_S) -> GPUProbe:
    """The GPUs of the cluster's live nodes, read by torch on each node that offers some: a task of
    num_gpus=1 pinned to each (NodeAffinitySchedulingStrategy), so a node type whose GPU differs is
    measured too. Nodes still booting are not seen; a task not run within timeout_s (every GPU busy)
    is cancelled, and the nodes that answered count."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    if not nodes:
        return GPUProbe(why_none="no node of the Ray cluster offers a GPU")
    task = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(_gpu_memory)
    refs = {n: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes}
    done, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    answers = {n: ray.get(ref) for n, ref in refs.items() if ref in done}
    gpus = tuple((n, *a) for n, a in answers.items() if a is not None)
    if gpus:
        return GPUProbe(gpus)
    if not answers:
        return GPUProbe(why_none=f"no node with a GPU ran the probe within {timeout_s:g} s")
    return GPUProbe(why_none=f"Ray offers GPUs on {len(answers)} node(s), but torch there sees no CUDA device")
