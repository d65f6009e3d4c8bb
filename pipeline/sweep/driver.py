"""Stage `sweep`: run a sweep spec with Ray Tune, one MLflow run per trial, then the results tables.

    python -m pipeline.sweep sweeps/depth_width.yaml [--profile cpu|gpu|auto] [--data DIR]
                                                     [--storage PATH] [--retry-errored] [--start-over]
                                                     [--take-over] [--continue-under-new-code]
    python -m pipeline.sweep SPEC --profile P --plan [--json]   # the memory and cost plan; no Ray

1. The spec is loaded and validated, every profile of it, before Ray starts (pipeline.sweep.spec.sweep). With
   an explicit profile the data is checked too (splits present, channels, frames, frame size:
   pipeline.sweep.spec.data_check).
2. Ray: joins the cluster named by RAY_ADDRESS (as `ray job submit` sets it), or the one `ray start`
   left on this node, else starts a local one. `--profile auto` (the default) picks `gpu` when the
   cluster has GPUs and `cpu` otherwise. GPUs are used or refused: a profile that asks for GPUs on a
   cluster without any, or with GPUs torch cannot use, is refused before any run is created. On an
   autoscaling cluster whose GPU nodes are still booting, VPN_WAIT_FOR_NODES=<seconds> makes the
   driver wait for them before it looks (sweeps/cluster.yaml sets it). With run.workers_per_trial
   N > 1 a trial is N data-parallel Ray Train workers (pipeline.sweep.trials.distributed); whether the cluster
   can ever hold them is checked before anything is created (all of this: pipeline.sweep.cluster.placement).
3. The sweep's identity is `<name>-<profile>-<fingerprint>`, the fingerprint covering the resolved
   grid, the data's stats.json and the source of every module a trial runs (pipeline.sweep.spec.identity:
   the files the trainable imports, found by reading the imports). It names the Ray
   experiment folder under the storage path and tags every MLflow run. Rerunning the same command
   with the same identity resumes: finished trials are kept, unfinished ones continue from their
   last checkpoint (`--retry-errored` also retries errored ones). A changed spec, data or model code
   is a new sweep (its parent run and trials sit beside the old ones in the same MLflow experiment);
   --continue-under-new-code continues an unfinished sweep of other code instead. One driver per
   sweep: a second is refused while the first holds the sweep's lease; --start-over archives the
   sweep's runs and starts it again (all of this: pipeline.sweep.cluster.claim).
4. The sweep's parent run is opened (pipeline.sweep.record.parent: found again on a resume), then one MLflow
   run per grid point is created, nested under it, before any trial starts, holding the params
   (the configs, preset, parameter count, FLOPs per frame, frame size) and the tags (sweep,
   profile, sweep_id) (pipeline.sweep.record.runs). Each trial gets its pipeline.sweep.trials.trial.TrialConfig,
   holding its run's id: the trial reattaches to it, also after a retry or a resume. A searcher's
   runs are made as its trials start (pipeline.sweep.trials.searched_runs).
5. At the end results/<name>/<profile>/{trials,curves}.parquet and metrics.json are rebuilt from MLflow
   (pipeline.sweep.record.results), and the parent gets the best trial's metrics. Exit status: 0 when every
   trial reached a final state (FINISHED or FAILED: failures are results, recorded in the table), 130
   when the sweep was interrupted (Ctrl+C, SIGTERM, SIGUSR1: Tune stops and saves), 2 for a bad spec
   or data, or a sweep another driver drives.

Data: --data, else VPN_DATA, else the spec's data (relative to the repository).
Storage: --storage, else VPN_SWEEP_STORAGE, else the profile's run.storage_path, else
<repo>/ray_results. A multi-node cluster needs shared storage here (s3://, gs://, NFS).
MLflow: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db (pipeline.sweep.record.tracking).
Tables: --results-dir, else VPN_RESULTS_DIR/<sweep name>/<profile>, else <repo>/results/<sweep name>/<profile>.
Run from Ray's uploaded copy of a working directory (`ray job submit --working-dir .`), the sweep
refuses to start unless the MLflow store, the storage and the tables are all outside that copy
(pipeline.sweep.cluster.persist): Ray deletes the copy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.paths import repo_root
from pipeline.sweep.cluster.claim import Claiming, claim_sweep
from pipeline.sweep.cluster.persist import RESULTS_ENV, STORAGE_ENV, check_results_persist
from pipeline.sweep.cluster.placement import WAIT_ENV, choose_profile, trainable_of, wait_for_nodes
from pipeline.sweep.cluster.plan import check_plan, check_plan_on_cluster, show_plan
from pipeline.sweep.spec.budget import trial_gpu_hours
from pipeline.sweep.spec.data_check import SweepDataError, check_data
from pipeline.sweep.spec.inputs import check_run_inputs
from pipeline.sweep.spec.sweep import SpecError, Sweep, SweepSpec, load_spec
from pipeline.sweep.trials.faults import Faults
from pipeline.sweep.trials.trial import TrialConfig

log = logging.getLogger(__name__)

# Telemetry off before Ray or MLflow is imported; trials inherit the environment of a local Ray.
# MLflow's artifact download bars are console chatter in a pipeline's log.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}  # fmt: skip
# Ray Tune's table reporter (CLIReporter) is used only with the legacy output engine.
# Checkpoints force experiment snapshots (num_to_keep): expected here, so no warning about it.
LEGACY_OUTPUT_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
EXIT_BAD_SPEC, EXIT_INTERRUPTED = 2, 130
_graceful_signals = False  # set by the command line (main): SIGTERM and SIGUSR1 stop the sweep as Ctrl+C


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


@dataclass(frozen=True)
class _Experiment:
    """Where one sweep is recorded: the MLflow store and experiment, and the Ray experiment folder."""

    uri: str
    client: Any  # mlflow.tracking.MlflowClient
    experiment_id: str
    store: str  # Ray's storage path (local, absolute; or a URI)
    path: str = ""  # <store>/<sweep id>, once the sweep is claimed (pipeline.sweep.cluster.claim)


def connect_ray() -> bool:
    """Join RAY_ADDRESS / the node's `ray start` cluster, or start a local one. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    return True


def run_sweep(spec: SweepSpec, profile: str = "auto", **options: Any) -> SweepOutcome:
    """Run (or resume) one sweep; see the module docstring and _run_sweep for the options."""
    with contextlib.ExitStack() as held:  # the sweep's lease, from its claim to its last record
        return _run_sweep(spec, profile, held, **options)


def _run_sweep(
    spec: SweepSpec,
    profile: str,
    held: contextlib.ExitStack,
    *,
    data: str | Path | None = None,
    storage: str | None = None,
    retry_errored: bool = False,
    results_dir: str | Path | None = None,
    write_tables: bool = True,
    fault: Mapping[str, Any] | Faults | None = None,
    claiming: Claiming | None = None,
) -> SweepOutcome:
    """`fault` is a test hook passed to the trials (pipeline.sweep.trials.faults, e.g. {"kill_at_step": n,
    "marker": path}: SIGKILL the worker once at that step); `claiming`: --start-over, --take-over and
    --continue-under-new-code (pipeline.sweep.cluster.claim). The lease taken enters `held`."""
    check_run_inputs(data=data, storage=storage, results_dir=results_dir)  # paths, environment (spec.inputs)
    # Refused at once when every result would live in Ray's uploaded copy of a working directory.
    check_results_persist(repo_root(), _spec_arg(spec), storage=storage, results_dir=results_dir)
    for k, v in {**QUIET_ENV, **LEGACY_OUTPUT_ENV}.items():
        os.environ.setdefault(k, v)
    if isinstance(fault, Mapping):  # as JSON gives it (tests/test_cluster.py)
        fault = Faults.from_dict(fault) if fault else None
    if results_dir:  # replaced whole at the end: refused now if it holds more than the tables
        from pipeline.sweep.record.results import check_results_folder

        check_results_folder(Path(results_dir))

    sweep = data_info = None
    if profile != "auto":  # everything checkable is checked before Ray starts
        sweep = spec.resolve(profile, data)
        check_plan(sweep, spec.root)  # a GPU trial that cannot fit its GPU (pipeline.sweep.cluster.plan)
        data_info = check_data(sweep)

    import ray

    from pipeline.sweep.record import tracking
    from pipeline.sweep.record.parent import close_parent, open_parent

    started = connect_ray()
    if _graceful_signals:  # ray.init puts its own SIGTERM handler (sys.exit) over the command line's
        signal.signal(signal.SIGTERM, _stop_gracefully)
    try:
        sweep, data_info, cluster = _resolve_on_cluster(ray, spec, profile, data, sweep, data_info)
        check_plan_on_cluster(
            ray, sweep, spec.root
        )  # the GPUs' real memory, before any trial (pipeline.sweep.cluster.plan)
        # Every check of the trials' placement before anything is created.
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        trainable, max_concurrent = trainable_of(sweep, cluster, nodes)
        exp = _open_experiment(sweep, storage)
        _check_reach(ray, exp)
        # One driver per sweep: a second is refused here, having created nothing (pipeline.sweep.cluster.claim).
        claim = claim_sweep(exp.client, exp.experiment_id, exp.uri, sweep, data_info["identity"], exp.store, claiming)
        held.enter_context(claim.lease)
        sweep_id, exp = claim.sweep_id, dataclasses.replace(exp, path=claim.path)
        log.info("sweep %s: MLflow %s (experiment %r); Ray storage %s; tables %s", sweep_id, exp.uri, sweep.name,
                 exp.path, results_dir or _tables_folder(sweep))  # fmt: skip
        # The sweep's parent run, its trials nested under it (pipeline.sweep.record.parent); found again on a resume.
        parent = open_parent(exp.client, exp.experiment_id, sweep, sweep_id)
        claim.record(exp.client, parent)  # the code this driver runs (pipeline.sweep.record.lineage)
        tuner = _tuner(sweep, sweep_id, exp, data_info, trainable, max_concurrent, retry_errored, fault, parent)
        tuner.fit()
    finally:
        if started:
            ray.shutdown()

    claim.lease.ensure_held()  # a driver that took the sweep over owns its runs now
    statuses, unfinished = _close_unfinished(exp, sweep_id)
    out = None
    if write_tables:
        out = _write_tables(sweep, sweep_id, exp, results_dir, register=not unfinished)
    summary = json.loads((out / "metrics.json").read_text()) if out is not None else None
    runs = tracking.sweep_runs(exp.client, exp.experiment_id, sweep_id)
    costs = None if sweep.search.searched else {p.label: trial_gpu_hours(sweep, p) for p in sweep.points}
    close_parent(exp.client, parent, runs, summary, done=not unfinished, costs=costs)
    return SweepOutcome(sweep, sweep_id, exp.experiment_id, exp.uri, exp.path, statuses, unfinished, out)


def _resolve_on_cluster(
    ray, spec: SweepSpec, profile: str, data, sweep: Sweep | None, data_info: dict[str, Any] | None
) -> tuple[Sweep, dict[str, Any], dict[str, float]]:
    """The sweep of the profile the cluster calls for (`--profile auto`) with its data checked, and the
    cluster's resources once it offers one trial's workers (or VPN_WAIT_FOR_NODES ran out)."""
    wait_s = float(os.environ.get(WAIT_ENV, "0"))
    if sweep is None:
        gpu = spec.resolve("gpu", data) if "gpu" in spec.profiles else None
        cluster = wait_for_nodes(ray, {"GPU": gpu.run.worker_gpus * gpu.run.workers_per_trial} if gpu else {}, wait_s)
        sweep = spec.resolve(choose_profile(spec, profile, cluster), data)
        check_plan(sweep, spec.root)  # before any run or trial is made
        data_info = check_data(sweep)
    n, worker = sweep.run.workers_per_trial, {"CPU": sweep.run.worker_cpus, "GPU": sweep.run.worker_gpus}
    need = {k: v * n for k, v in worker.items()}
    cluster = wait_for_nodes(ray, need, wait_s, bundles=[{k: v for k, v in worker.items() if v}] * n)
    log.info("sweep %s, profile %s: %d trial(s); cluster %s", sweep.name, sweep.profile, len(sweep.points), cluster)
    return sweep, data_info, cluster


def _open_experiment(sweep: Sweep, storage: str | None) -> _Experiment:
    """The sweep's MLflow experiment (created if missing) and Ray storage: --storage, else
    VPN_SWEEP_STORAGE, else the profile's run.storage_path, else <repo>/ray_results."""
    from pipeline.sweep.record import tracking

    uri = tracking.absolute_uri(tracking.tracking_uri())
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, sweep.name, uri)
    store = storage or os.environ.get(STORAGE_ENV) or sweep.run.storage_path or str(repo_root() / "ray_results")
    if "://" not in store:
        store = str(Path(store).expanduser().resolve())
    return _Experiment(uri, client, experiment_id, store)


def _check_reach(ray, exp: _Experiment) -> None:
    """On a multi-node cluster, refuse a store that other nodes cannot reach (a local SQLite file), and
    warn of local storage (it must be shared)."""
    if sum(1 for n in ray.nodes() if n.get("Alive")) <= 1:
        return
    if exp.uri.startswith("sqlite:"):
        raise SweepDataError(
            f"the Ray cluster has several nodes but the MLflow store is a local file ({exp.uri}): "
            "set MLFLOW_TRACKING_URI to an `mlflow server` every node reaches"
        )
    if "://" not in exp.store:
        log.warning("storage %s is a local path on a multi-node cluster: it must be shared (NFS)", exp.store)


def _tuner(
    sweep: Sweep,
    sweep_id: str,
    exp: _Experiment,
    data_info,
    trainable,
    max_concurrent,
    retry_errored,
    fault,
    parent: str | None = None,
):
    """The Tuner of this sweep id: restored from its Ray folder (a resume), else new: a grid with its
    MLflow runs created and one TrialConfig per point, or a searcher; runs nested under `parent`."""
    from ray import tune

    from pipeline.sweep.record import tracking
    from pipeline.sweep.record.runs import create_runs
    from pipeline.sweep.trials.callbacks import CheckpointMarker, TrackingCallback, trial_name
    from pipeline.sweep.trials.search import scheduler
    from pipeline.sweep.trials.searched_runs import searched_tune_args

    if tune.Tuner.can_restore(exp.path):
        held = tracking.sweep_runs(exp.client, exp.experiment_id, sweep_id)
        if not sweep.search.searched and len(held) != len(sweep.points):  # a searcher's runs come as it draws
            raise SweepDataError(
                f"{exp.path} holds sweep {sweep_id} but the MLflow store {exp.uri} has {len(held)} of its "
                f"{len(sweep.points)} runs; rerun with --start-over to archive them and start the sweep over"
            )
        log.info("resuming sweep %s from %s (finished trials are kept)", sweep_id, exp.path)
        return tune.Tuner.restore(
            exp.path, trainable, resume_unfinished=True, resume_errored=retry_errored, restart_errored=False
        )
    callbacks = [TrackingCallback(exp.uri)]
    if fault is not None and fault.checkpoint_marker:  # a test's hook (pipeline.sweep.trials.faults)
        callbacks.append(CheckpointMarker(fault.checkpoint_marker))
    if sweep.search.searched:  # drawn as it runs (pipeline.sweep.trials.search), each run made as its trial starts
        space, drawn, more = searched_tune_args(sweep, sweep_id, exp, data_info, fault, parent)
        callbacks += more
    else:
        run_ids = create_runs(exp.client, exp.experiment_id, sweep, sweep_id, data_info, parent)
        configs = [TrialConfig.of_point(sweep, p, r, exp.uri, fault) for p, r in zip(sweep.points, run_ids)]
        space, drawn = {"trial": tune.grid_search([c.to_dict() for c in configs])}, {}
    return tune.Tuner(
        trainable,
        # The Ray Tune boundary: Tune carries (and pickles into its experiment state) plain dicts.
        param_space=space,
        tune_config=tune.TuneConfig(
            **drawn,
            scheduler=scheduler(sweep),  # ASHA, HyperBandForBOHB (search.algorithm bohb) or none
            max_concurrent_trials=max_concurrent,
            # A new worker costs seconds of imports per trial. Not for data-parallel trials: a
            # trial stopped by ASHA must take its Ray Train workers down with its driver.
            reuse_actors=sweep.run.workers_per_trial == 1,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep_id,
            storage_path=exp.store,
            failure_config=tune.FailureConfig(max_failures=sweep.run.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            progress_reporter=_reporter(sweep, tune),
            verbose=1,
        ),
    )


def _reporter(sweep: Sweep, tune):
    from pipeline.sweep.record.tracking import TRAIN_KEY, VAL_KEY

    metrics = {"step": "step", TRAIN_KEY: "train NLL"}
    metrics.update({VAL_KEY: "val NLL"} if sweep.mode == "train" else {"converged_step": "converged at"})
    return tune.CLIReporter(
        metric_columns=metrics,
        parameter_columns={"trial/label": "trial"},
        max_report_frequency=30,
        max_progress_rows=50,
        print_intermediate_tables=True,
    )


def _close_unfinished(exp: _Experiment, sweep_id: str) -> tuple[dict[str, str], bool]:
    """Each run's status by label, and whether any trial is unfinished (an interrupted sweep); a run
    left RUNNING is marked KILLED until a resume continues it."""
    from pipeline.sweep.record import tracking

    runs = tracking.sweep_runs(exp.client, exp.experiment_id, sweep_id)
    statuses = {r.data.tags.get(tracking.TAG_LABEL, r.info.run_name): r.info.status for r in runs}
    unfinished = [r for r in runs if r.info.status in ("RUNNING", "SCHEDULED")]
    for r in unfinished:
        if r.info.status == "RUNNING":  # its trial was stopped mid-run: honest in the UI until resumed
            tracking.retrying(exp.client.set_terminated, r.info.run_id, status="KILLED")
    if unfinished:
        log.warning(
            "sweep %s interrupted: %d trial(s) unfinished; rerun the command to resume", sweep_id, len(unfinished)
        )
    return statuses, bool(unfinished)


def _write_tables(sweep: Sweep, sweep_id: str, exp: _Experiment, results_dir, register: bool) -> Path:
    """The results tables (pipeline.sweep.record.results) and, for a finished sweep (`register`), its best
    trial's model in the registry (pipeline.sweep.record.registry)."""
    from pipeline.sweep.record import results, tracking

    out_dir = Path(results_dir or _tables_folder(sweep))
    out = results.write_results(exp.client, sweep.name, sweep.profile, sweep_id, sweep.mode, out_dir)
    if register:  # the best of a finished sweep, by the tables' own ranking
        from pipeline.sweep.record import registry

        summary = json.loads((out / "metrics.json").read_text())
        try:  # retried whole while the server is away: mlflow.pytorch.log_model has a client of its own
            tracking.retrying(registry.register_best, exp.client, exp.uri, sweep.name, summary)
        except Exception as e:  # the tables are written; a registry that refuses must not fail the sweep
            log.warning("sweep %s: the best trial's model was not registered: %s", sweep_id, e)
    return out


def _tables_folder(sweep: Sweep) -> Path:
    """Where the tables go without --results-dir: VPN_RESULTS_DIR is the parent, like <repo>/results,
    and the tables go to <parent>/<name>/<profile>."""
    from pipeline.sweep.record import results

    return Path(results.results_folder(sweep.name, sweep.profile, os.environ.get(RESULTS_ENV)))


def _spec_arg(spec: SweepSpec) -> str:
    """The spec as a command names it: relative to the repository when it lies there."""
    try:
        return str(Path(spec.path).resolve().relative_to(spec.root.resolve()))
    except ValueError:
        return str(spec.path)


# -- command line --------------------------------------------------------------------------------
def runs_url(uri: str, experiment_id: str, sweep_id: str | None = None) -> str:
    """Where MLflow 3.17's UI shows an experiment's runs (it opens experiments on an empty GenAI page): with
    a sweep id, its saved view in the chart view, every trial's curves overlaid (record.parent.save_curves_view)."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if sweep_id is not None:
        page += f"&compareRunsMode=CHART&viewStateShareKey={urllib.parse.quote(sweep_id, safe='')}"
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


def _stop_gracefully(signum: int, frame: Any) -> None:
    """SIGTERM (scancel, a preemption, a job's requeue) and SIGUSR1 (sweeps/slurm.sbatch's warning before
    the time limit) stop the sweep as Ctrl+C does: while Tune runs, its own SIGINT handler saves the
    sweep's state and returns, keeping every checkpoint; before it runs, KeyboardInterrupt. Either way the
    lease is released and the exit status is 130, and the same command resumes."""
    log.warning("%s: stopping the sweep; it resumes from its checkpoints when rerun", signal.Signals(signum).name)
    tune_handler = signal.getsignal(signal.SIGINT)
    if callable(tune_handler) and tune_handler not in (signal.default_int_handler, _stop_gracefully):
        tune_handler(signal.SIGINT, frame)  # ray.tune.tune._setup_signal_catching's: sets its stop event
    else:
        raise KeyboardInterrupt


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
    parser.add_argument("--start-over", action="store_true", help="archive the sweep's runs and Ray folder; start anew")
    parser.add_argument("--take-over", action="store_true", help="take the sweep from its driver (once it is dead)")
    parser.add_argument(
        "--continue-under-new-code", action="store_true", help="continue the unfinished sweep of other code"
    )
    parser.add_argument(
        "--results-dir",
        help=f"where the tables go (default: ${RESULTS_ENV}/<name>/<profile>, else results/<name>/<profile>)",
    )
    parser.add_argument("--plan", action="store_true", help="print each trial's memory and cost plan; starts no Ray")
    parser.add_argument("--json", action="store_true", help="with --plan: a JSON list, one object per trial")
    args = parser.parse_args(argv)
    if args.json and not args.plan:
        parser.error("--json: only with --plan")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(find_spec(args.spec))
        if args.profile != "auto" and args.profile not in spec.profiles:
            known = ", ".join(spec.profiles)
            raise SpecError(f"{args.spec}: profiles: no profile {args.profile!r} (the spec has: {known})")
        if args.plan:  # pipeline.sweep.cluster.plan; auto plans the gpu profile where the spec has one
            name = args.profile if args.profile != "auto" else ("gpu" if "gpu" in spec.profiles else "cpu")
            print(show_plan(spec.resolve(name), args.json, spec.root))
            return 0
        if args.data is None and os.environ.get("VPN_DATA"):
            args.data = os.environ["VPN_DATA"]
        global _graceful_signals
        _graceful_signals = True
        for stop in (signal.SIGTERM, signal.SIGUSR1):  # Tune's own handler takes SIGUSR1 while it runs
            signal.signal(stop, _stop_gracefully)
        # Ray's core worker would put its crash handler (absl's) on SIGTERM in this process, which dumps a
        # stack and aborts (exit 134) instead of the stop above.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        outcome = run_sweep(
            spec,
            args.profile,
            data=args.data,
            storage=args.storage,
            retry_errored=args.retry_errored,
            results_dir=args.results_dir,
            claiming=Claiming(args.start_over, args.take_over, args.continue_under_new_code),
        )
    except (SpecError, SweepDataError) as e:
        log.error("%s", e)
        return EXIT_BAD_SPEC
    except KeyboardInterrupt:  # before or after Tune ran: the lease is released, nothing half-written
        log.warning("interrupted; rerun the same command to resume the sweep")
        return EXIT_INTERRUPTED
    failed = sorted(label for label, s in outcome.statuses.items() if s == "FAILED")
    done = sum(s == "FINISHED" for s in outcome.statuses.values())
    listed = f": {', '.join(failed)}" if failed else ""
    print(f"sweep {outcome.sweep_id}: {done} finished, {len(failed)} failed{listed}")
    print(f"MLflow: {outcome.tracking_uri} (experiment {outcome.sweep.name!r}); Ray: {outcome.experiment_path}")
    print(f"the runs in MLflow's UI: {runs_url(outcome.tracking_uri, outcome.experiment_id, outcome.sweep_id)}")
    if outcome.results_dir is not None:
        print(f"results: {outcome.results_dir}")
    return EXIT_INTERRUPTED if outcome.interrupted else 0


if __name__ == "__main__":  # `ray submit sweeps/cluster.yaml pipeline/sweep/driver.py -- SPEC` runs this file
    sys.exit(main())
