"""MLflow runs of a searched sweep.

A grid's runs are created before any trial starts (pipeline.sweep.record.runs.create_runs). A searcher's
trials are drawn while the sweep runs, so their runs are created on the driver as each trial starts
(SearchedRuns.on_trial_start, which Tune calls before the trial's function runs), keyed by the Ray
trial id: a trial restarted after a crash or a resume finds its run (tracking.find_trial_run) and no
second one is made; a run made just before a crash that came before Tune saved its trial is deleted when
the resumed sweep ends (it holds no metrics, and no trial of Tune's will open it). Each run holds the
params of a grid point's run plus `est_gpu_hours`, the trial's estimated cost (pipeline.sweep.spec.budget).

Every trial's run is nested under the sweep's parent run (tag mlflow.parentRunId; pipeline.sweep.record.parent),
as a grid's are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from pipeline.paths import repo_root
from pipeline.sweep.record import tracking
from pipeline.sweep.record.parent import COST_PARAM, TAG_PARENT, TAG_PARENT_OF
from pipeline.sweep.record.runs import drop_orphans, point_params, point_tags
from pipeline.sweep.spec.budget import FRAME_SIZE, trial_gpu_hours
from pipeline.sweep.spec.grid import Point
from pipeline.sweep.trials.search import INDEX, trial_config
from pipeline.sweep.trials.trial import current_uri

__all__ = ["COST_PARAM", "TAG_PARENT", "TAG_PARENT_OF", "SearchedRuns", "searched_tune_args"]


class SearchedRuns(Callback):
    """Creates a searched trial's MLflow run when the trial starts (once per Ray trial id)."""

    def __init__(self, sweep: Any, sweep_id: str, uri: str, experiment_id: str, data_info: Mapping, parent: str):
        self.sweep, self.sweep_id, self.uri, self.experiment_id = sweep, sweep_id, uri, experiment_id
        self.data_info, self.parent = dict(data_info), parent
        self._client = None

    def __getstate__(self) -> dict[str, Any]:  # pickled into the experiment state: no client
        return {**self.__dict__, "_client": None}

    def __setstate__(self, state: dict[str, Any]) -> None:  # restored on a resume: this job's server
        self.__dict__.update(state, uri=current_uri(state["uri"]))

    @property
    def client(self):
        if self._client is None:
            self._client = tracking.client(self.uri)
        return self._client

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if tracking.find_trial_run(self.client, self.experiment_id, self.sweep_id, trial.trial_id):
            return
        cfg = trial_config(trial.config)
        axes = dict(trial.config["axes"])
        index = int(trial.config.get(INDEX, 0))
        point = Point(cfg.point, cfg.label, cfg.model, cfg.train, axes, cfg.model.matching_preset(), index)
        frame_hw = tuple(self.data_info["shape"][3:])
        params = point_params(self.sweep, point, frame_hw)
        params[COST_PARAM] = trial_gpu_hours(self.sweep, point)  # as the budget counts it
        tags = point_tags(self.sweep, point, self.sweep_id, tracking.git_tags(repo_root()))
        tags.update({tracking.TAG_TRIAL_ID: trial.trial_id, TAG_PARENT: self.parent})
        run_id = tracking.create_run(self.client, self.experiment_id, cfg.label, params, tags)
        about = {"identity_of": self.data_info.get("identity_of")}
        dataset = tracking.dataset_input(self.sweep.data, self.data_info["identity"], about)
        tracking.retrying(self.client.log_inputs, run_id, datasets=[dataset])

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Tune's state is saved: delete the runs that none of its trials will open (drop_orphans)."""
        drop_orphans(self.client, self.experiment_id, self.sweep_id, {t.trial_id for t in trials})


def searched_tune_args(sweep: Any, sweep_id: str, exp: Any, data_info: Mapping, fault: Any, parent: str):
    """(param_space, TuneConfig's search_alg and num_samples, callbacks) of a searched sweep.

    The base TrialConfig is the space's low corner with no run: every searched field is replaced by
    the drawn value (search.trial_config), and the run is made when the trial starts (SearchedRuns).
    """
    from pipeline.sweep.record.tracking import VAL_KEY
    from pipeline.sweep.trials import search
    from pipeline.sweep.trials.trial import TrialConfig

    base = TrialConfig.of_point(sweep, sweep.points[0], None, exp.uri, fault)
    base = base.replace(point=-1, label="drawn", sweep_id=sweep_id, experiment_id=exp.experiment_id)
    searcher = search.searcher(sweep, VAL_KEY, FRAME_SIZE)
    drawn = {"search_alg": searcher, "num_samples": sweep.trial_count}
    runs = SearchedRuns(sweep, sweep_id, exp.uri, exp.experiment_id, data_info, parent)
    return search.param_space(sweep, base), drawn, [runs]
