"""The MLflow runs of a sweep, one per grid point, created by the driver before any trial starts.

Each holds the params (both configs, the preset, parameter count, FLOPs per frame, frame size) and
the tags (sweep, profile, sweep_id, the code's git commit), with the data as a dataset input; it
starts SCHEDULED, and its trial reattaches to it (TrialConfig.run_id), also after a retry or a resume.
Each is nested under the sweep's parent run (pipeline.sweep.record.parent).
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
from collections.abc import Mapping
from typing import Any

from pipeline.paths import repo_root
from pipeline.sweep.record import tracking
from pipeline.sweep.record.lineage import TAG_ARCHIVED
from pipeline.sweep.spec.data_check import SweepDataError, streams
from pipeline.sweep.spec.sweep import Point, Sweep

log = logging.getLogger(__name__)


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


def point_tags(sweep: Sweep, point: Point, sweep_id: str, code: Mapping[str, str]) -> dict[str, str]:
    """The run's tags: where it belongs (sweep, profile, id, point), and the code's git tags."""
    return {
        tracking.TAG_SWEEP: sweep.name,
        tracking.TAG_PROFILE: sweep.profile,
        tracking.TAG_SWEEP_ID: sweep_id,
        tracking.TAG_POINT: str(point.index),
        tracking.TAG_LABEL: point.label,
        tracking.TAG_MODE: sweep.mode,
        tracking.TAG_SPEC: sweep.source,
        tracking.TAG_WORKERS: str(sweep.run.workers_per_trial),
        "mlflow.user": getpass.getuser(),  # MLflow's "User" column
        **code,
    }


def create_runs(
    client, experiment_id: str, sweep: Sweep, sweep_id: str, data_info: Mapping[str, Any], parent: str | None = None
) -> list[str]:
    """One SCHEDULED run per point, with the code's git commit and the data as a dataset input, nested
    under run `parent` (mlflow.parentRunId). Runs left by an earlier start of this sweep id that never
    trained (a driver stopped before Ray saved the sweep) are deleted; a run that holds metrics never is
    (the driver refuses or archives those first: pipeline.sweep.cluster.claim). Returns the run ids in
    grid order."""
    stale = tracking.sweep_runs(client, experiment_id, sweep_id)
    trained = [r.info.run_name for r in stale if r.data.metrics]
    if trained:
        raise SweepDataError(f"sweep {sweep_id}: runs {', '.join(trained)} hold metrics; --start-over archives them")
    if stale:
        log.warning("sweep %s: deleting %d MLflow run(s) of an earlier start that never trained", sweep_id, len(stale))
        for run in stale:
            tracking.retrying(client.delete_run, run.info.run_id)
    frame_hw = data_info["shape"][3:]
    code = tracking.git_tags(repo_root())
    profile = {
        "splits": data_info.get("shapes", {}),
        "identity_of": data_info.get("identity_of"),
        "train.data": "stream" if streams(sweep) else "fixed",
    }
    dataset = tracking.dataset_input(sweep.data, data_info["identity"], profile)
    run_ids = []
    for p in sweep.points:
        params, tags = point_params(sweep, p, frame_hw), point_tags(sweep, p, sweep_id, code)
        if parent is not None:
            tags[tracking.TAG_PARENT] = parent
        run_id = tracking.create_run(client, experiment_id, p.label, params, tags)
        tracking.retrying(client.log_inputs, run_id, datasets=[dataset])
        run_ids.append(run_id)
    return run_ids


def drop_orphans(client, experiment_id: str, sweep_id: str, known_trial_ids: set[str]) -> list[str]:
    """Delete the runs of a searched sweep that no trial of Ray Tune's state will ever open: SCHEDULED,
    without metrics, their Ray trial unknown to Tune (made as the trial started, just before a crash that
    came before Tune saved the trial; the resumed searcher drew it again under a new trial id). Left,
    such a run would make the sweep look interrupted forever. Returns their names."""
    orphans = [
        r
        for r in tracking.sweep_runs(client, experiment_id, sweep_id)
        if r.info.status == "SCHEDULED" and not r.data.metrics
        and r.data.tags.get(tracking.TAG_TRIAL_ID) not in known_trial_ids
    ]  # fmt: skip
    for run in orphans:
        tracking.retrying(client.delete_run, run.info.run_id)
    if orphans:
        log.info(
            "sweep %s: deleted %d run(s) that no trial will open (made just before a crash)", sweep_id, len(orphans)
        )
    return [r.info.run_name for r in orphans]


def archive_sweep(client, experiment_id: str, sweep_id: str, stamp: str) -> int:
    """Start over, keeping the old runs: the sweep's runs and its parent get the sweep id
    `<sweep_id>~archived-<stamp>` (tag archived_from=<sweep_id>), so that no lookup of the sweep finds
    them again but they stay in the experiment with their metrics; unfinished ones are marked KILLED.
    Returns how many runs were archived."""
    archived = f"{sweep_id}~archived-{stamp}"
    runs = tracking.sweep_runs(client, experiment_id, sweep_id)
    parents = tracking.retrying(
        client.search_runs, [experiment_id], filter_string=f"tags.{tracking.TAG_PARENT_OF} = '{sweep_id}'"
    )
    for run in runs:
        tracking.set_tags(client, run.info.run_id, {tracking.TAG_SWEEP_ID: archived, TAG_ARCHIVED: sweep_id})
    for parent in parents:
        tracking.set_tags(client, parent.info.run_id, {tracking.TAG_PARENT_OF: archived, TAG_ARCHIVED: sweep_id})
    for run in [*runs, *parents]:
        if run.info.status in ("RUNNING", "SCHEDULED"):
            tracking.retrying(client.set_terminated, run.info.run_id, status="KILLED")
    return len(runs)
