"""The Ray Tune trainable: one sweep trial, a thin wrapper around vpn.train.Trainer.

`trial(config)` runs one grid point. config["trial"] is the dict of the point's
pipeline.sweep.trials.trial.TrialConfig, turned back into it here: the two configs, the absolute data path,
the tracking URI and the id of the MLflow run the driver created for this point. From here on the
flow is one-way: rank 0 opens that run once (`_TrialRun`: its client, id and metric buffer), and
everything the trial logs goes through it.

Reporting, checkpointing and logging hang off the Trainer's hooks:
- every log_every steps the metrics go into a MetricBuffer (nothing is written yet);
- at a validation step (train mode) or a log step (overfit mode) the buffer is flushed to MLflow
  with one log_batch, and the metrics are reported to Tune (progress display, ASHA);
- every ckpt_every steps and at the end the Trainer's checkpoint (plus trial.json with the run id)
  is reported to Tune as a Checkpoint; the last one is also logged as the run's artifact
  checkpoint/checkpoint.pt, for sampling.
- at the end of a train-mode trial the test split is scored (`score_test_split`) with the trial's own frame preparation
  (vpn.train.Trainer.score: model.nll over frames context..T-1, on train.test_sequences sequences or
  all): test_nats_per_frame, and the floor of exactly those frames, test_floor_nats_per_frame.
  A trial that ASHA stops early never reaches its end and has no test score. Then, unless
  train.forecast_samples is 0, the same split is scored by free-running prediction
  (pipeline.sweep.record.forecasting: test_mse, test_mae, test_ssim, test_psnr, their best-of-k and
  mean-frame versions, and their values per predicted frame).
- pictures (pipeline.sweep.record.pictures), for MLflow's image view: at each validation a train-mode trial
  draws run.sample_frames frames after the context of validation sequence 0 ("samples"); an overfit
  trial shows its reconstruction of the sequence ("reconstruction") at its first report, at each
  checkpoint and at its last step.
- an overfit trial is vpn.overfit's one loop (fit_sequence), with the logging above in its per-step
  hook; the loss of every step is logged. A categorical head's NLLs are also logged in bits per sub-pixel.
- MLflow's system metrics (CPU, memory, disk, network, GPU) unless the spec turned them off
  (run.system_metrics).

Restarts. A trial retried after a crash, or resumed after the sweep was interrupted, restores the
Trainer from its last Tune checkpoint and reattaches to the same MLflow run. Steps the run already
holds are not logged again (MetricBuffer), so its curve has no gap and no duplicate.

Non-finite loss. Trainer raises NonFiniteLossError at the next host sync. The run is then marked
FAILED with tags error and non_finite_step, and the error is raised so that Ray marks the trial
ERROR; the other trials go on. A NaN is deterministic (same batches, same weights), so a retry
that finds its run failed this way raises again at once instead of training to the same NaN.

Test hooks (pipeline.sweep.trials.faults) fire at every logged step, through TrialConfig.fault.

Data-parallel trials (run.workers_per_trial > 1, pipeline.sweep.trials.distributed) run the same `run_trial` on
every Ray Train worker, with ray.train in place of ray.tune: rank 0 alone talks to MLflow and writes
the checkpoints, every rank reports (a barrier in Ray Train) and scores its share.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.sweep.record import forecasting, pictures, tracking
from pipeline.sweep.trials import search
from pipeline.sweep.trials.devices import require_usable_gpu
from pipeline.sweep.trials.trial import TrialConfig
from vpn.data import MovingMNIST, training_source
from vpn.evaluate import prepare
from vpn.overfit import fit_sequence, one_sequence
from vpn.train import NonFiniteLossError, Trainer, resolve_device

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
TRIAL_FILE = "trial.json"


class NonFiniteLoss(RuntimeError):
    """The trial's loss became NaN or infinite: vpn's NonFiniteLossError, with the MLflow run named."""


# Per-checkpoint INFO lines of Ray's storage module ("Checkpoint successfully created at: ..."), and
# MLflow's system-metrics start and stop lines: a sweep's console shows progress, not these.
QUIET_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage", "mlflow.system_metrics")


def quiet_framework_logs() -> None:
    """Raise the loggers in QUIET_LOGGERS to WARNING in this process (a trial's worker)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class TrialClosed(RuntimeError):
    """The trial's MLflow run was closed from outside (its trial stopped) while a worker still ran."""


def trial(config: Mapping[str, Any]) -> None:
    """Ray Tune function trainable for one grid point (config["trial"]: a TrialConfig's dict)."""
    from ray import tune

    quiet_framework_logs()
    ctx = tune.get_context()
    cfg = searched_run(search.trial_config(config), ctx.get_trial_id())
    granted = dict(ctx.get_trial_resources().required_resources)  # e.g. {"CPU": 1.0, "GPU": 0.5}
    # Threads = the CPUs Ray granted this trial (trials share the node's cores).
    torch.set_num_threads(max(1, int(granted.get("CPU", 1))))
    require_usable_gpu(float(granted.get("GPU", 0)))  # a GPU torch cannot use fails the trial at once (devices)
    cap_gpu_memory(float(granted.get("GPU", 0)), resolve_device(cfg.train.device))
    tags = {
        tracking.TAG_TRIAL_ID: ctx.get_trial_id(),
        tracking.TAG_TRIAL_NAME: ctx.get_trial_name(),
        tracking.TAG_RESOURCES: json.dumps(granted, sort_keys=True),
    }
    run_trial(cfg, tune, tags)


def cap_gpu_memory(gpus: float, device: torch.device) -> float | None:
    """Cap this process's share of a GPU that it shares (0 < gpus < 1: Ray packs 1 / gpus trials on
    one GPU, and they share its memory). torch's caching allocator then takes at most that fraction
    of the device's memory: a trial that outgrows its share fails alone, with an out-of-memory error
    of its own, instead of starving the trials beside it, and "auto" memory settings plan for the
    share (vpn.train.gpu_memory_gib). Returns the fraction set, or None (a whole GPU, or none)."""
    if not 0 < gpus < 1 or device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(float(gpus), index)
    return float(gpus)


def searched_run(cfg: TrialConfig, trial_id: str, wait_s: float = 30.0) -> TrialConfig:
    """A searched trial's config with its run id: the run the driver made as the trial started
    (pipeline.sweep.trials.searched_runs); waited for briefly, as a slow store may lag. A grid's: unchanged."""
    if cfg.run_id is not None:
        return cfg
    client = tracking.client(cfg.tracking_uri)
    deadline = time.monotonic() + wait_s
    while (run_id := tracking.find_trial_run(client, cfg.experiment_id, cfg.sweep_id, trial_id)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"trial {cfg.label} ({trial_id}): no MLflow run in sweep {cfg.sweep_id}")
        time.sleep(0.5)
    return cfg.replace(run_id=run_id)


@dataclass(frozen=True)
class _TrialRun:
    """The trial's MLflow run as rank 0 writes it: one client, the run's id, its metric buffer."""

    client: Any  # mlflow.tracking.MlflowClient
    run_id: str
    buffer: tracking.MetricBuffer

    @classmethod
    def open(cls, cfg: TrialConfig, tags: Mapping[str, Any]) -> _TrialRun:
        """Reattach to the run the driver created: refuse a known NaN, tag it, mark it RUNNING."""
        client = tracking.client(cfg.tracking_uri)
        run = tracking.retrying(client.get_run, cfg.run_id)
        refuse_known_non_finite(run)
        tags = dict(tags)
        if tracking.TAG_STARTED not in run.data.tags:  # the run was created when the sweep started
            tags[tracking.TAG_STARTED] = int(time.time() * 1000)
        tracking.set_tags(client, cfg.run_id, tags)
        tracking.retrying(client.update_run, cfg.run_id, status="RUNNING")
        buffer = tracking.MetricBuffer(client, cfg.run_id, after_step=tracking.last_logged_step(client, cfg.run_id))
        return cls(client, cfg.run_id, buffer)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        tracking.set_tags(self.client, self.run_id, tags)

    def fail_non_finite(self, err: NonFiniteLossError) -> None:
        """Mark the run FAILED on a non-finite loss, keeping the finite steps before it."""
        self.buffer.flush()  # the finite steps before it belong to the curve
        self.set_tags({tracking.TAG_ERROR: str(err), tracking.TAG_NON_FINITE_STEP: err.step})
        tracking.retrying(self.client.set_terminated, self.run_id, status="FAILED")


def run_trial(cfg: TrialConfig, session, tags: Mapping[str, Any], rank: int = 0) -> None:
    """Train one grid point in this process and record it (see the module docstring).

    session: ray.tune in a one-worker trial, ray.train on a worker of a data-parallel trial (the
    same report / get_checkpoint / Checkpoint). rank: this worker's rank; only rank 0 touches MLflow
    (tags set here, the run's status, its metrics) and writes checkpoints.
    """
    run = _TrialRun.open(cfg, tags) if rank == 0 else None
    runner = _overfit if cfg.mode == "overfit" else _train
    # One monitor a trial, on rank 0: NVML ignores CUDA_VISIBLE_DEVICES, so each rank's would log
    # every GPU of the node again.
    monitor = _system_metrics(cfg) if cfg.system_metrics and rank == 0 else None
    try:
        runner(cfg, run, session)
    except NonFiniteLossError as err:
        if run is not None:
            run.fail_non_finite(err)
        raise NonFiniteLoss(f"{err} (MLflow run {cfg.run_id})") from None
    finally:
        if monitor is not None:
            monitor.finish()


def _system_metrics(cfg: TrialConfig):
    """MLflow's system metrics monitor on the trial's run (a thread sampling CPU, memory, disk,
    network, and NVIDIA GPUs where nvidia-ml-py finds one, every 10 s); it stops itself once the run
    is no longer RUNNING. A resumed trial continues the run's system-metric steps."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(cfg.run_id, resume_logging=True, tracking_uri=cfg.tracking_uri)
    monitor.start()
    return monitor


def refuse_known_non_finite(run) -> None:
    """Raise NonFiniteLoss if the run already failed on a non-finite loss (it would again)."""
    run_id = run.info.run_id
    step = run.data.tags.get(tracking.TAG_NON_FINITE_STEP)
    if run.info.status == "FAILED" and step is not None:
        error = run.data.tags.get(tracking.TAG_ERROR, f"non-finite loss at step {step}")
        raise NonFiniteLoss(f"{error} (MLflow run {run_id}; not retrained: a non-finite loss is deterministic)")


def _restore(
    tune, fresh: Callable[[], Trainer], load: Callable[[Path], Trainer], run: _TrialRun | None, run_id: str
) -> tuple[Trainer, dict[str, Any] | None]:
    """The Trainer from the trial's last Tune checkpoint and that checkpoint's trial.json, else a
    fresh Trainer and None. A restore is recorded on the run (tag resumed_from_step)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return fresh(), None
    with checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / TRIAL_FILE).read_text())
        if meta["run_id"] != run_id:
            raise RuntimeError(f"checkpoint {checkpoint.path} belongs to MLflow run {meta['run_id']}, not {run_id}")
        trainer = load(Path(d) / CHECKPOINT_FILE)
    if run is not None:  # rank 0
        run.set_tags({tracking.TAG_RESUMED_FROM: trainer.step})
    log.info("trial %s resumed from its checkpoint at step %d", meta.get("label"), trainer.step)
    return trainer, meta


class _Reporter:
    """Checkpoint saving, MLflow flushes and Tune reports of one trial, shared by both modes.

    run is None on the ranks > 0 of a data-parallel trial: they only report (every rank must, the
    same number of times) and write nothing.
    """

    def __init__(self, cfg: TrialConfig, trainer: Trainer, run: _TrialRun | None, tune, frame: Tensor) -> None:
        """frame: one prepared frame (C, H, W), the size the NLLs are per."""
        self.cfg, self.trainer, self.run, self.tune = cfg, trainer, run, tune
        self.latest: dict[str, float] = {}
        self.no_pictures = False
        # bits per sub-pixel beside nats per frame for the categorical head (tracking.with_bits)
        self.subpixels = frame.numel() if trainer.model_cfg.output == "categorical" else 0
        if run is not None:  # rank 0
            run.set_tags({tracking.TAG_PRECISION: trainer.precision})
            # What train.activation_checkpointing / micro_batch_size ("auto") resolved to on this device.
            chosen = {
                "memory.activation_checkpointing": trainer.activation_checkpointing,
                "memory.micro_batch_size": trainer.micro_batch_size,
            }
            changed = tracking.log_params_once(run.client, run.run_id, chosen)
            if changed:
                log.warning("trial %s: memory settings %s now (first run: %s)", cfg.label, chosen, changed)

    def _with_bits(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        if not self.subpixels:
            return dict(metrics)
        finite = {k: v for k, v in metrics.items() if v is not None}
        return {**metrics, **tracking.with_bits(finite, self.subpixels)}

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.cfg.fault is not None:  # test hooks only (pipeline.sweep.trials.faults)
            self.cfg.fault.at_step(step, self.trainer.rank)
        metrics = self._with_bits(metrics)
        if self.run is not None:
            self.run.buffer.add(step, metrics)
        self.latest.update(metrics)

    def picture(self, step: int, key: str, draw: Callable[[], Any]) -> None:
        """Log draw()'s image under key at step, unless the run already holds that step (a restart).
        A picture that fails is reported once and not tried again: it must never cost the trial."""
        if self.run is None or step <= self.run.buffer.after_step or self.no_pictures:
            return  # ranks > 0 draw nothing: rank 0 logs the pictures
        try:
            tracking.log_image(self.run.client, self.run.run_id, draw(), key, step)
        except Exception as e:  # pictures are a view of the run, not its result
            log.warning("trial %s: no more %s pictures (step %d): %s", self.cfg.label, key, step, e)
            self.no_pictures = True

    def report(self, step: int, extra: Mapping[str, Any] | None = None) -> None:
        if self.run is not None:
            self._flush()
        self.tune.report(self._result(step, extra))

    def _flush(self) -> None:
        # Workers of a data-parallel trial outlive a stop of their trial (ASHA ends the driver; Ray
        # takes the workers down a moment later): once the driver side has closed the run
        # (pipeline.sweep.trials.callbacks.TrackingCallback), nothing more may reach it.
        if self.trainer.world_size > 1:
            status = tracking.retrying(self.run.client.get_run, self.run.run_id).info.status
            if status != "RUNNING":
                raise TrialClosed(f"MLflow run {self.run.run_id} is {status}: this trial was stopped; not logging")
        self.run.buffer.flush()

    def _result(self, step: int, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"step": step, **self.latest, **{k: v for k, v in (extra or {}).items() if v is not None}}

    def checkpoint(
        self, step: int, final: bool, extra: Mapping[str, Any] | None = None, series: list | None = None
    ) -> None:
        """Save, flush, (at the end: artifact + FINISHED,) then report with the checkpoint.

        series: MLflow Metrics logged in one batch at the end besides extra (the per-frame forecast).
        """
        extra = self._with_bits(extra) if extra else extra
        if self.run is None:  # a rank > 0: rank 0 writes the checkpoint
            self.tune.report(self._result(step, extra))
            return
        client, run_id = self.run.client, self.run.run_id
        with tempfile.TemporaryDirectory(prefix="vpn-ckpt-") as d:
            self.trainer.save(Path(d) / CHECKPOINT_FILE)
            meta = {"run_id": run_id, "step": step, "label": self.cfg.label, "final": final, **(extra or {})}
            (Path(d) / TRIAL_FILE).write_text(json.dumps(meta))
            self._flush()
            if final:
                for k, v in (extra or {}).items():
                    if v is not None:
                        tracking.retrying(client.log_metric, run_id, k, float(v), step=step)
                if series:
                    tracking.retrying(client.log_batch, run_id, metrics=series)
                tracking.retrying(client.log_artifact, run_id, str(Path(d) / CHECKPOINT_FILE), "checkpoint")
                tracking.retrying(client.set_terminated, run_id, status="FINISHED")
            self.tune.report(self._result(step, extra), checkpoint=self.tune.Checkpoint.from_directory(d))


def score_test_split(trainer: Trainer, data_root: str | Path) -> dict[str, float]:
    """The test split scored as the paper scores it, with its floor (see the module docstring)."""
    result = trainer.score(MovingMNIST(data_root, "test"), trainer.cfg.test_sequences)
    metrics = {tracking.TEST_KEY: result.nats_per_frame, tracking.TEST_SEQUENCES_KEY: float(result.sequences)}
    if result.floor_nats_per_frame is not None:
        metrics[tracking.TEST_FLOOR_KEY] = result.floor_nats_per_frame
    return metrics


def final_scores(trainer: Trainer, data_root: str | Path) -> tuple[dict[str, float], list]:
    """The test NLL, then (after it: it reads no RNG the NLL uses) the free-running scores, and
    the per-frame series of the latter; see the module docstring."""
    metrics = score_test_split(trainer, data_root)
    start = time.perf_counter()
    result = forecasting.forecast_test_split(trainer, data_root)
    if result is None:
        return metrics, []
    metrics.update(forecasting.scalars(result, time.perf_counter() - start))
    return metrics, forecasting.by_frame(result)


def _train(cfg: TrialConfig, run: _TrialRun | None, tune) -> None:
    train_cfg = cfg.train
    # fixed: the data stage's train.npy; stream: fresh sequences from its training digits.
    train_data = training_source(cfg.data, train_cfg.data, train_cfg.seed)
    val_data = MovingMNIST(cfg.data, "val")
    trainer, _ = _restore(
        tune,
        lambda: Trainer(cfg.model, train_cfg, train_data, val_data),
        # This process's device, not the one rank 0 saved (data parallel: each rank has its own GPU).
        lambda p: Trainer.from_checkpoint(p, train_data, val_data, device=train_cfg.device),
        run,
        cfg.run_id,
    )
    shown = prepare(val_data[0][None], train_cfg)[0]  # (T, C, H, W): validation sequence 0 as trained on
    rep = _Reporter(cfg, trainer, run, tune, shown[0])
    until = train_cfg.steps
    context = train_cfg.context
    n_sampled = min(cfg.sample_frames, len(shown) - context)

    def is_checkpoint(step: int) -> bool:  # the Trainer's own rule for calling on_checkpoint
        return step == until or bool(train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0)

    def samples():  # the same sequence and seed at every validation: only the weights differ
        return pictures.sample_strip(trainer.model, shown, context, n_sampled, seed=train_cfg.seed)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        rep.log(step, metrics)
        if tracking.VAL_KEY in metrics and n_sampled > 0:
            rep.picture(step, pictures.SAMPLES_KEY, samples)
        if tracking.VAL_KEY in metrics and not is_checkpoint(step):
            rep.report(step)

    def on_checkpoint(step: int) -> None:
        if step != until:
            rep.checkpoint(step, final=False)
            return
        extra, series = final_scores(trainer, cfg.data)
        rep.checkpoint(step, final=True, extra=extra, series=series)

    if trainer.step >= until:  # restored from the final checkpoint: nothing left but the bookkeeping
        extra, series = final_scores(trainer, cfg.data)
        rep.checkpoint(trainer.step, final=True, extra=extra, series=series)
        return
    trainer.fit(until, on_log=on_log, on_checkpoint=on_checkpoint, progress=False)


def _overfit(cfg: TrialConfig, run: _TrialRun | None, tune) -> None:
    """The blog post's experiment with checkpoints: one sequence, the loss of every step logged,
    stopping at the first step within tol of the sequence's floor (vpn.overfit.fit_sequence, the
    loop of `python -m vpn train --overfit` too). Overfit trials run one worker: run is rank 0's."""
    settings = cfg.overfit
    data = MovingMNIST(cfg.data, settings.split)
    problem = one_sequence(cfg.model, cfg.train, data[settings.index], tol_per_subpixel=settings.tol_per_subpixel)
    trainer, meta = _restore(
        tune,
        lambda: Trainer(cfg.model, problem.train_cfg, problem.batch),
        lambda p: Trainer.from_checkpoint(p, problem.batch, device=problem.train_cfg.device),
        run,
        cfg.run_id,
    )
    run.set_tags({"floor_nats_per_frame": f"{problem.floor:.6f}", "tol_nats_per_frame": f"{problem.tol:.6f}"})
    rep = _Reporter(cfg, trainer, run, tune, problem.sequence[0])
    if meta is not None and meta.get("final"):  # restored from its final checkpoint: only bookkeeping left
        _finish_overfit(rep, run, trainer.step, meta.get("converged_step"))
        return
    show = cfg.sample_frames > 0  # the same switch as the train mode's samples
    steps, every, ckpt_every = cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every
    tick, tick_step = time.perf_counter(), trainer.step

    def reconstruction():
        return pictures.reconstruction_strip(trainer.model, problem.sequence)

    def on_step(step: int, loss: float, converged: bool) -> None:
        nonlocal tick, tick_step
        metrics = {tracking.TRAIN_KEY: loss}
        if step % every == 0 or step == steps or converged:
            now = time.perf_counter()
            metrics[tracking.SPEED_KEY] = (step - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, step
        rep.log(step, metrics)
        final = converged or step == steps
        if show and (final or step == every or (ckpt_every and step % ckpt_every == 0)):
            rep.picture(step, pictures.RECONSTRUCTION_KEY, reconstruction)
        if final:
            _finish_overfit(rep, run, step, step if converged else None)
        elif ckpt_every and step % ckpt_every == 0:
            rep.checkpoint(step, final=False)
        elif step % every == 0:
            rep.report(step)

    fit_sequence(trainer, problem, steps, on_step)


def _finish_overfit(rep: _Reporter, run: _TrialRun, step: int, converged: int | None) -> None:
    # Tagged before the run is marked FINISHED, so a finished run always says whether it converged.
    run.set_tags({"converged": str(converged is not None).lower()})
    rep.checkpoint(step, final=True, extra={"converged_step": converged})
