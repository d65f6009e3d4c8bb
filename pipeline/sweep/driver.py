"""Stage `sweep`: run a sweep spec with Ray Tune, one MLflow run per trial, then the results tables.

    python -m pipeline.sweep sweeps/depth_width.yaml [--profile cpu|gpu|auto] [--data DIR]
                                                     [--storage PATH] [--retry-errored]

1. The spec is loaded and validated, every profile of it, before Ray starts (pipeline.sweep.spec). With
   an explicit profile the data is checked too (splits present, channels, frames, frame size).
2. Ray: joins the cluster named by RAY_ADDRESS (as `ray job submit` sets it), or the one `ray start`
   left on this node, else starts a local one. `--profile auto` (the default) picks `gpu` when the
   cluster has GPUs and `cpu` otherwise. GPUs are requested per trial only when the cluster has
   some: in Ray 2.60 a GPU request on a CPU-only cluster leaves the trial PENDING forever. On an
   autoscaling cluster whose GPU nodes are still booting, VPN_WAIT_FOR_NODES=<seconds> makes the
   driver wait for them before it looks (sweeps/cluster.yaml sets it). With run.workers_per_trial
   N > 1 a trial is N data-parallel Ray Train workers (pipeline.sweep.distributed); whether the cluster
   can ever hold them is checked here, before anything is created.
3. The sweep's identity is `<name>-<profile>-<fingerprint>`, the fingerprint covering the resolved
   grid, the data's stats.json and the source files in CODE_FILES (the model, the training loop,
   the trainable: the DVC stage's code deps). It names the Ray
   experiment folder under the storage path and tags every MLflow run. Rerunning the same command
   with the same identity resumes: finished trials are kept, unfinished ones continue from their
   last checkpoint (`--retry-errored` also retries errored ones). A changed spec, data or model code
   is a new sweep (its runs sit beside the old ones in the same MLflow experiment).
4. One MLflow run per grid point is created here, before any trial starts, holding the params
   (the configs, preset, parameter count, FLOPs per frame, frame size) and the tags (sweep,
   profile, sweep_id). The trial reattaches to it, also after a retry or a resume.
5. At the end results/<name>/{trials,curves}.parquet and metrics.json are rebuilt from MLflow
   (pipeline.sweep.results). Exit status: 0 when every trial reached a final state (FINISHED or FAILED:
   failures are results, recorded in the table), 130 when the sweep was interrupted (Ctrl+C), 2 for
   a bad spec or data.

Data: --data, else VPN_DATA, else the spec's data (relative to the repository).
Storage: --storage, else VPN_SWEEP_STORAGE, else the profile's run.storage_path, else
<repo>/ray_results. A multi-node cluster needs shared storage here (s3://, gs://, NFS).
MLflow: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db (pipeline.sweep.tracking).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.paths import repo_root
from pipeline.sweep.spec import Point, SpecError, Sweep, SweepSpec, load_spec

log = logging.getLogger(__name__)

# Telemetry off before Ray or MLflow is imported; trials inherit the environment of a local Ray.
# MLflow's artifact download bars are console chatter in a pipeline's log.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}  # fmt: skip
STORAGE_ENV = "VPN_SWEEP_STORAGE"
WAIT_ENV = "VPN_WAIT_FOR_NODES"
# Ray Tune's table reporter (CLIReporter) is used only with the legacy output engine.
# Checkpoints force experiment snapshots (num_to_keep): expected here, so no warning about it.
LEGACY_OUTPUT_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
# Source files whose change makes a sweep a new one (the model, the loop, the trainable).
# The same files the DVC stage lists as deps (vpn's CLI, sampler and plots do not count).
CODE_FILES = (
    "vpn/config.py", "vpn/layers.py", "vpn/model.py", "vpn/metrics.py", "vpn/train.py", "vpn/batches.py",
    "vpn/evaluate.py", "vpn/checkpoint.py", "vpn/overfit.py", "vpn/data.py", "vpn/moving_mnist.py", "pipeline/sweep/trainable.py", "pipeline/sweep/tracking.py", "pipeline/sweep/distributed.py",
)  # fmt: skip
EXIT_BAD_SPEC, EXIT_INTERRUPTED = 2, 130


class DataError(ValueError):
    """The data a sweep needs is missing or does not fit its configs."""


@dataclass(frozen=True)
class SweepOutcome:
    """What a finished (or interrupted) sweep left behind."""

    sweep: Sweep
    sweep_id: str
    experiment_id: str
    tracking_uri: str
    experiment_path: str
    statuses: Mapping[str, str]  # label -> MLflow run status
    interrupted: bool
    results_dir: Path | None


# -- checks before Ray ---------------------------------------------------------------------------
def check_data(sweep: Sweep) -> dict[str, Any]:
    """Open the splits the sweep reads (memory-mapped headers only) and check every point fits them.

    Returns {"shape": (N, T, C, H, W) of train or the overfit split, "identity": str (stats.json,
    else the shapes), "identity_of": what the identity was taken from, "shapes": split -> shape}.
    """
    from vpn.data import load_split, read_stats

    # train mode reads val while training and scores test at the end; train.npy only if a point trains
    # on the fixed set (a stream draws from train_digits.npy instead).
    streamed = sweep.mode == "train" and any(p.train.data == "stream" for p in sweep.points)
    if sweep.mode == "train":
        fixed = any(p.train.data == "fixed" for p in sweep.points)
        splits = (("train",) if fixed else ()) + ("val", "test")
    else:
        splits = (sweep.overfit.split,)
    shapes = {}
    for split in splits:
        try:
            shapes[split] = tuple(load_split(sweep.data, split).shape)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{sweep.source}: data: {e}") from e
    if streamed:
        from vpn.moving_mnist import MovingMNISTStream

        try:
            stream = MovingMNISTStream.from_folder(sweep.data)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise DataError(f"{sweep.source}: train.data=stream: {e}") from e
        spec = stream.spec
        shapes["stream"] = (0, spec.seq_len, spec.channels, spec.frame_size, spec.frame_size)
    for split, shape in shapes.items():  # every source the trials read must have the same frames
        if shape[1:] != shapes[splits[0]][1:]:
            raise DataError(
                f"{sweep.source}: data: {split} has sequences of shape {shape[1:]} but {splits[0]} has "
                f"{shapes[splits[0]][1:]} (T, C, H, W)"
            )
    n, t, c, h, w = shapes[splits[0]]
    for p in sweep.points:
        where = f"{sweep.source}: point {p.label}"
        if p.model.image_channels != c:
            raise DataError(f"{where}: model.image_channels={p.model.image_channels} but {sweep.data} has C={c}")
        frames = p.train.seq_len or t
        if frames > t:
            raise DataError(f"{where}: train.seq_len={frames} but the data has {t} frames per sequence")
        if sweep.mode == "train" and p.train.context >= frames:
            raise DataError(f"{where}: train.context={p.train.context} leaves no frame to score of {frames}")
        if h // p.train.downsample < 2 or w // p.train.downsample < 2:
            raise DataError(f"{where}: train.downsample={p.train.downsample} shrinks {h}x{w} frames below 2x2")
    if sweep.mode == "overfit" and sweep.overfit.index >= n:
        raise DataError(
            f"{sweep.source}: overfit.index={sweep.overfit.index} but split {sweep.overfit.split} has {n} sequences"
        )
    try:
        identity, identity_of = json_dumps(read_stats(sweep.data)), "stats.json"
    except FileNotFoundError:  # hand-made data (tests): its shapes stand in for the stats
        identity, identity_of = json_dumps(shapes), "array shapes"
    return {"shape": (n, t, c, h, w), "identity": identity, "identity_of": identity_of, "shapes": shapes}


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def code_identity(root: Path | None = None) -> str:
    """sha256 of the source that determines what a trial computes."""
    root = root or repo_root()
    h = hashlib.sha256()
    for name in CODE_FILES:
        h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return h.hexdigest()


def sweep_id_of(sweep: Sweep, data_identity: str) -> str:
    return f"{sweep.name}-{sweep.profile}-{sweep.fingerprint(data_identity, code_identity())[:10]}"


# -- MLflow runs ---------------------------------------------------------------------------------
def point_params(sweep: Sweep, point: Point, frame_hw: tuple[int, int]) -> dict[str, Any]:
    """The run's params: both configs (unprefixed: no field name is shared), the preset, the
    derived widths, the parameter count and the FLOPs of one frame at the frame size trained on."""
    import torch

    from vpn.model import VideoPixelNetwork, count_flops_per_frame

    h, w = frame_hw[0] // point.train.downsample, frame_hw[1] // point.train.downsample
    with torch.device("meta"):  # counts without memory or compute
        parameters = VideoPixelNetwork(point.model).num_parameters()
    params: dict[str, Any] = {**point.model.to_dict(), **point.train.to_dict()}
    params.update(
        preset=point.preset,
        row=point.axes.get("row"),
        preset_width_scale=sweep.search.preset_width_scale if sweep.search.preset else None,
        mu_channels=point.model.mu_channels,
        lstm_channels=point.model.lstm_channels,
        parameters=parameters,
        flops_per_frame=count_flops_per_frame(point.model, h, w),
        frame_height=h,
        frame_width=w,
        mode=sweep.mode,
        data_path=str(sweep.data),  # not `data`: that is TrainConfig's source, fixed or stream
        sample=point.sample,
    )
    if sweep.mode == "overfit":
        params.update({f"overfit_{k}": v for k, v in dataclasses.asdict(sweep.overfit).items()})
    return params


def create_runs(client, experiment_id: str, sweep: Sweep, sweep_id: str, data_info: Mapping[str, Any]) -> list[str]:
    """One SCHEDULED run per point, with the code's git commit and the data as a dataset input; runs
    left by an earlier start of this sweep id are deleted."""
    from pipeline.sweep import tracking

    stale = tracking.sweep_runs(client, experiment_id, sweep_id)
    if stale:
        log.warning("sweep %s starts over: deleting %d MLflow run(s) of its earlier start", sweep_id, len(stale))
        for run in stale:
            tracking.retrying(client.delete_run, run.info.run_id)
    frame_hw = data_info["shape"][3:]
    code = tracking.git_tags(repo_root())
    streamed = sweep.mode == "train" and any(p.train.data == "stream" for p in sweep.points)
    profile = {
        "splits": data_info.get("shapes", {}),
        "identity_of": data_info.get("identity_of"),
        "train.data": "stream" if streamed else "fixed",
    }
    dataset = tracking.dataset_input(sweep.data, data_info["identity"], profile)
    run_ids = []
    for p in sweep.points:
        tags = {
            tracking.TAG_SWEEP: sweep.name,
            tracking.TAG_PROFILE: sweep.profile,
            tracking.TAG_SWEEP_ID: sweep_id,
            tracking.TAG_POINT: str(p.index),
            tracking.TAG_LABEL: p.label,
            tracking.TAG_MODE: sweep.mode,
            tracking.TAG_SPEC: sweep.source,
            tracking.TAG_WORKERS: str(sweep.run.workers_per_trial),
            "mlflow.user": getpass.getuser(),  # MLflow's "User" column
            **code,
        }
        run_id = tracking.create_run(client, experiment_id, p.label, point_params(sweep, p, frame_hw), tags)
        tracking.retrying(client.log_inputs, run_id, datasets=[dataset])
        run_ids.append(run_id)
    return run_ids


def trial_config(sweep: Sweep, point: Point, run_id: str, uri: str, fault: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the trainable gets: plain values only (it is pickled into the Ray experiment state)."""
    return {
        "point": point.index,
        "label": point.label,
        "run_id": run_id,
        "mode": sweep.mode,
        "model": point.model.to_dict(),
        "train": point.train.to_dict(),
        "data": str(sweep.data),
        "tracking_uri": uri,
        "overfit": dataclasses.asdict(sweep.overfit) if sweep.mode == "overfit" else None,
        "sample_frames": sweep.run.sample_frames,
        "system_metrics": sweep.run.system_metrics,
        "fault": dict(fault) if fault else None,
    }


# -- Ray -----------------------------------------------------------------------------------------
def connect_ray() -> bool:
    """Join RAY_ADDRESS / the node's `ray start` cluster, or start a local one. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    return True


def trial_resources(sweep: Sweep, cluster: Mapping[str, float]) -> dict[str, float]:
    """{"cpu": n, "gpu": g} of a one-worker trial: GPUs only where the cluster has them (else the
    request would hang). Data-parallel trials: pipeline.sweep.distributed.plan."""
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
        raise DataError(f"{sweep.source}: run.{gpu_field}={want:g} but the cluster has only {gpus:g} GPU(s)")
    cpus = run.worker_cpus
    if cpus > float(cluster.get("CPU", 0)):
        have = float(cluster.get("CPU", 0))
        cpu_field = "cpus_per_worker" if run.cpus_per_worker is not None else "cpus_per_trial"
        raise DataError(f"{sweep.source}: run.{cpu_field}={cpus:g} but the cluster has {have:g} CPU(s)")
    return {"cpu": cpus, "gpu": want}


def trainable_of(sweep: Sweep, cluster: Mapping[str, float], nodes: list[Mapping[str, float]]):
    """The Tune trainable with its resources, and the most trials to run at once (None: Tune's choice).

    One worker per trial: pipeline.sweep.trainable.trial, which trains in the Tune trial itself. Several:
    pipeline.sweep.distributed.driver, which runs them through Ray Train; every check that placement
    can ever hold the trial happens here, before any trial starts.
    """
    from ray import tune

    if sweep.run.workers_per_trial == 1:
        from pipeline.sweep.trainable import trial

        return tune.with_resources(trial, trial_resources(sweep, cluster)), sweep.run.max_concurrent or None
    from pipeline.sweep import distributed

    try:
        plan = distributed.plan(sweep.run, nodes)
    except ValueError as e:
        raise DataError(f"{sweep.source}: {e}") from e
    log.info(
        "%d worker(s) of %s per trial, at most %d trial(s) at once; drivers ask for %s",
        plan.workers, plan.worker, plan.max_concurrent, plan.driver,
    )  # fmt: skip
    driver = tune.with_parameters(distributed.driver, plan=plan.to_dict())
    return tune.with_resources(driver, plan.driver), sweep.run.max_concurrent or plan.max_concurrent


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


def choose_profile(spec: SweepSpec, requested: str, cluster: Mapping[str, float] | None) -> str:
    if requested != "auto":
        return requested
    has_gpu = bool(cluster and cluster.get("GPU", 0))
    for name in ("gpu", "cpu") if has_gpu else ("cpu",):
        if name in spec.profiles:
            return name
    return spec.profiles[0]


def run_sweep(
    spec: SweepSpec,
    profile: str = "auto",
    *,
    data: str | Path | None = None,
    storage: str | None = None,
    retry_errored: bool = False,
    results_dir: str | Path | None = None,
    write_tables: bool = True,
    fault: Mapping[str, Any] | None = None,
) -> SweepOutcome:
    """Run (or resume) one sweep; see the module docstring. `fault` is a test hook passed to the
    trials ({"kill_at_step": n, "marker": path}: SIGKILL the worker once at that step)."""
    for k, v in {**QUIET_ENV, **LEGACY_OUTPUT_ENV}.items():
        os.environ.setdefault(k, v)

    sweep = data_info = None
    if profile != "auto":  # everything checkable is checked before Ray starts
        sweep = spec.resolve(profile, data)
        data_info = check_data(sweep)

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.sweep import results, tracking
    from pipeline.sweep.callbacks import TrackingCallback, trial_name

    started = connect_ray()
    try:
        wait_s = float(os.environ.get(WAIT_ENV, "0"))
        if sweep is None:
            gpu = spec.resolve("gpu", data) if "gpu" in spec.profiles else None
            cluster = wait_for_nodes(
                ray, {"GPU": gpu.run.worker_gpus * gpu.run.workers_per_trial} if gpu else {}, wait_s
            )
            sweep = spec.resolve(choose_profile(spec, profile, cluster), data)
            data_info = check_data(sweep)
        n, worker = sweep.run.workers_per_trial, {"CPU": sweep.run.worker_cpus, "GPU": sweep.run.worker_gpus}
        need = {k: v * n for k, v in worker.items()}
        cluster = wait_for_nodes(ray, need, wait_s, bundles=[{k: v for k, v in worker.items() if v}] * n)
        log.info("sweep %s, profile %s: %d trial(s); cluster %s", sweep.name, sweep.profile, len(sweep.points), cluster)
        # Every check of the trials' placement before anything is created.
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        trainable, max_concurrent = trainable_of(sweep, cluster, nodes)
        sweep_id = sweep_id_of(sweep, data_info["identity"])
        uri = tracking.absolute_uri(tracking.tracking_uri())
        client = tracking.client(uri)
        experiment_id = tracking.ensure_experiment(client, sweep.name, uri)
        client.set_experiment_tag(experiment_id, tracking.EXPERIMENT_LATEST.format(profile=sweep.profile), sweep_id)

        store = storage or os.environ.get(STORAGE_ENV) or sweep.run.storage_path or str(repo_root() / "ray_results")
        if "://" not in store:
            store = str(Path(store).expanduser().resolve())
        experiment_path = f"{store.rstrip('/')}/{sweep_id}"
        if sum(1 for n in ray.nodes() if n.get("Alive")) > 1:  # what other nodes cannot reach
            if uri.startswith("sqlite:"):
                raise DataError(
                    f"the Ray cluster has several nodes but the MLflow store is a local file ({uri}): "
                    "set MLFLOW_TRACKING_URI to an `mlflow server` every node reaches"
                )
            if "://" not in store:
                log.warning("storage %s is a local path on a multi-node cluster: it must be shared (NFS)", store)

        if tune.Tuner.can_restore(experiment_path):
            held = tracking.sweep_runs(client, experiment_id, sweep_id)
            if len(held) != len(sweep.points):
                raise DataError(
                    f"{experiment_path} holds sweep {sweep_id} but the MLflow store {uri} has {len(held)} of its "
                    f"{len(sweep.points)} runs; delete that folder to start the sweep over"
                )
            log.info("resuming sweep %s from %s (finished trials are kept)", sweep_id, experiment_path)
            tuner = tune.Tuner.restore(
                experiment_path,
                trainable,
                resume_unfinished=True,
                resume_errored=retry_errored,
                restart_errored=False,
            )
        else:
            run_ids = create_runs(client, experiment_id, sweep, sweep_id, data_info)
            configs = [trial_config(sweep, p, r, uri, fault) for p, r in zip(sweep.points, run_ids)]
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(configs)},
                tune_config=tune.TuneConfig(
                    scheduler=_asha(sweep, ASHAScheduler),
                    max_concurrent_trials=max_concurrent,
                    # A new worker costs seconds of imports per trial. Not for data-parallel trials: a
                    # trial stopped by ASHA must take its Ray Train workers down with its driver.
                    reuse_actors=sweep.run.workers_per_trial == 1,
                    trial_name_creator=trial_name,
                    trial_dirname_creator=trial_name,
                ),
                run_config=tune.RunConfig(
                    name=sweep_id,
                    storage_path=store,
                    failure_config=tune.FailureConfig(max_failures=sweep.run.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    callbacks=[TrackingCallback(uri)],
                    progress_reporter=_reporter(sweep, tune),
                    verbose=1,
                ),
            )
        tuner.fit()
    finally:
        if started:
            ray.shutdown()

    runs = tracking.sweep_runs(client, experiment_id, sweep_id)
    statuses = {r.data.tags.get(tracking.TAG_LABEL, r.info.run_name): r.info.status for r in runs}
    unfinished = [r for r in runs if r.info.status in ("RUNNING", "SCHEDULED")]
    for r in unfinished:
        if r.info.status == "RUNNING":  # its trial was stopped mid-run: honest in the UI until resumed
            tracking.retrying(client.set_terminated, r.info.run_id, status="KILLED")
    if unfinished:
        log.warning(
            "sweep %s interrupted: %d trial(s) unfinished; rerun the command to resume", sweep_id, len(unfinished)
        )
    out = None
    if write_tables:
        out_dir = Path(results_dir) if results_dir else None
        out = results.write_results(client, sweep.name, sweep.profile, sweep_id, sweep.mode, out_dir)
        if not unfinished:  # the best of a finished sweep, by the tables' own ranking
            from pipeline.sweep import registry

            summary = json.loads((out / "metrics.json").read_text())
            try:
                registry.register_best(client, uri, sweep.name, summary)
            except Exception as e:  # the tables are written; a registry that refuses must not fail the sweep
                log.warning("sweep %s: the best trial's model was not registered: %s", sweep_id, e)
    return SweepOutcome(sweep, sweep_id, experiment_id, uri, experiment_path, statuses, bool(unfinished), out)


def _asha(sweep: Sweep, cls):
    if not sweep.run.asha.enabled:
        return None
    from pipeline.sweep.tracking import VAL_KEY

    steps = max(p.train.steps for p in sweep.points)
    return cls(
        time_attr="step",
        metric=VAL_KEY,
        mode="min",
        max_t=steps,
        grace_period=min(sweep.run.asha.grace_steps, steps),
        reduction_factor=sweep.run.asha.reduction_factor,
    )


def _reporter(sweep: Sweep, tune):
    from pipeline.sweep.tracking import TRAIN_KEY, VAL_KEY

    metrics = {"step": "step", TRAIN_KEY: "train NLL"}
    metrics.update({VAL_KEY: "val NLL"} if sweep.mode == "train" else {"converged_step": "converged at"})
    return tune.CLIReporter(
        metric_columns=metrics,
        parameter_columns={"trial/label": "trial"},
        max_report_frequency=30,
        max_progress_rows=50,
        print_intermediate_tables=True,
    )


# -- command line --------------------------------------------------------------------------------
def runs_url(uri: str, experiment_id: str) -> str:
    """Where MLflow 3.17's UI lists an experiment's runs (it opens experiments on an empty GenAI page)."""
    page = f"#/experiments/{experiment_id}/runs"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (after `mlflow ui --backend-store-uri {uri}`)"


def find_spec(path: str) -> Path:
    """The spec as given, else relative to the repository (for `ray submit`, which runs in ~)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    alt = repo_root() / p
    return alt if alt.is_file() else p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a sweep spec with Ray Tune, tracked in MLflow.")
    parser.add_argument("spec", help="sweep spec YAML, e.g. sweeps/depth_width.yaml")
    parser.add_argument(
        "--profile", default="auto", help="a profile of the spec (cpu, gpu); auto: gpu on a cluster with GPUs, else cpu"
    )
    parser.add_argument("--data", help="moving_mnist folder, replacing the spec's data (relative: to the repo)")
    parser.add_argument(
        "--storage", help=f"Ray storage path (default: ${STORAGE_ENV}, the profile's, <repo>/ray_results)"
    )
    parser.add_argument("--retry-errored", action="store_true", help="on resume, retry errored trials too")
    parser.add_argument("--results-dir", help="where the tables go (default: results/<sweep name>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(find_spec(args.spec))
        if args.profile != "auto" and args.profile not in spec.profiles:
            known = ", ".join(spec.profiles)
            raise SpecError(f"{args.spec}: profiles: no profile {args.profile!r} (the spec has: {known})")
        if args.data is None and os.environ.get("VPN_DATA"):
            args.data = os.environ["VPN_DATA"]
        outcome = run_sweep(
            spec,
            args.profile,
            data=args.data,
            storage=args.storage,
            retry_errored=args.retry_errored,
            results_dir=args.results_dir,
        )
    except (SpecError, DataError) as e:
        log.error("%s", e)
        return EXIT_BAD_SPEC
    failed = sorted(label for label, s in outcome.statuses.items() if s == "FAILED")
    done = sum(s == "FINISHED" for s in outcome.statuses.values())
    listed = f": {', '.join(failed)}" if failed else ""
    print(f"sweep {outcome.sweep_id}: {done} finished, {len(failed)} failed{listed}")
    print(f"MLflow: {outcome.tracking_uri} (experiment {outcome.sweep.name!r}); Ray: {outcome.experiment_path}")
    print(f"the runs in MLflow's UI: {runs_url(outcome.tracking_uri, outcome.experiment_id)}")
    if outcome.results_dir is not None:
        print(f"results: {outcome.results_dir}")
    return EXIT_INTERRUPTED if outcome.interrupted else 0
