"""What MLflow's UI shows of a sweep, read back from a real store after tiny sweeps: the pictures of
each run (samples at every validation, an overfit run's reconstruction), the data as a dataset input,
the git commit, bits per sub-pixel, and the best trial as a registered model that loads in one line.
The train sweep runs as the command a user types, so its console is checked too, and the link it
prints is opened in headless Chromium against the store served by `mlflow server`: every trial's
train curve is drawn in the chart view."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import environ, running_local_ray, running_mlflow_server, write_splits
from mlflow.entities import Metric
from PIL import Image

from pipeline.sweep.driver import QUIET_ENV, run_sweep, runs_url
from pipeline.sweep.record import futures, pictures, registry, tracking
from pipeline.sweep.record.parent import TAG_PARENT, TAG_PARENT_OF, open_parent, trial_runs
from pipeline.sweep.record.runs import create_runs
from pipeline.sweep.spec.sweep import load_spec
from vpn.checkpoint import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),  # inside MLflow's SQL store
]

REPO = Path(__file__).resolve().parents[1]
TRAIN = {
    "batch_size": 4,
    "log_every": 5,
    "val_every": 5,
    "val_batches": 1,
    "ckpt_every": 10,
    "context": 3,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny data with a stats.json (as the data stage writes), one SQLite store, one local Ray."""
    root = tmp_path_factory.mktemp("ui")
    data = write_splits(root / "moving_mnist", {"train": 16, "val": 4, "test": 4})
    stats = {"params": {"seed": 0, "frame_size": 8}, "train": {"shape": [16, 6, 1, 8, 8]}}
    (data / "stats.json").write_text(json.dumps(stats))
    uri = f"sqlite:///{root / 'server.db'}"  # the database conftest.running_mlflow_server(root) serves
    # MLflow's system metrics every 0.2 s instead of 10: these trials last a second or two (Ray's
    # workers inherit the environment of the Ray started here)
    quick = {**QUIET_ENV, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    with environ(quick), running_local_ray() as address:
        yield {"root": root, "data": data, "uri": uri, "stats": stats, "address": address}


def write_spec(env, name: str, **sections) -> Path:
    spec = {
        "name": name,
        "data": str(env["data"]),
        "run": {"cpus_per_trial": 1, "max_failures": 0},
        "profiles": {"cpu": {}},
        **sections,
    }
    path = env["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def images(client, run_id: str, key: str) -> dict[int, Image.Image]:
    """step -> the full-size PNG logged under key (MLflow names them <key>+step+<step>+...png)."""
    out = {}
    for artifact in client.list_artifacts(run_id, "images"):
        name = artifact.path.rsplit("/", 1)[-1]
        if name.startswith(f"{key}+step+") and name.endswith(".png"):
            local = client.download_artifacts(run_id, artifact.path)
            out[int(name.split("+")[2])] = Image.open(io.BytesIO(Path(local).read_bytes()))
    return out


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def train_console(env) -> str:
    """A train sweep of two rows (Bernoulli and categorical heads) run as a user types it; its console."""
    model = {"enc_blocks": 1, "dec_blocks": 1, "filter_fraction": 0.03125}
    rows = [{"name": "bern", "model": {"output": "bernoulli"}}, {"name": "cat", "model": {"output": "categorical"}}]
    spec = write_spec(env, "ui_train", mode="train", model=model, train={**TRAIN, "steps": 10}, search={"rows": rows})
    console = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", str(spec), "--profile", "cpu", "--storage", str(env["root"] / "ray"),
         "--results-dir", str(env["root"] / "results_train")],
        cwd=REPO, env={**os.environ, "RAY_ADDRESS": env["address"]},
        check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = console.stdout + console.stderr
    assert console.returncode == 0, out[-4000:]
    return out


def test_train_sweep_as_the_ui_shows_it(env, train_console):
    out = train_console
    # the console: Tune's progress and the result, not Ray's line per checkpoint (4 checkpoints here)
    assert "Checkpoint successfully created" not in out and "Downloading artifacts" not in out, out[-4000:]
    assert "ui_train-cpu-" in out and "2 finished, 0 failed" in out
    assert f"#/experiments/{tracking.client(env['uri']).get_experiment_by_name('ui_train').experiment_id}/runs" in out

    client = tracking.client(env["uri"])
    exp = client.get_experiment_by_name("ui_train")
    every = client.search_runs([exp.experiment_id])
    runs = {r.info.run_name: r for r in trial_runs(every)}
    assert sorted(runs) == ["bern", "cat"]
    (parent,) = [r for r in every if TAG_PARENT_OF in r.data.tags]  # the sweep's row, its trials nested
    assert {r.data.tags[TAG_PARENT] for r in runs.values()} == {parent.info.run_id}
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"))
    digest = hashlib.sha256(json.dumps(env["stats"], sort_keys=True).encode()).hexdigest()[:16]
    for name, run in runs.items():
        run_id = run.info.run_id
        # pictures: one per validation (steps 5 and 10): the truth above, context + 1 drawn frame below
        shots = images(client, run_id, pictures.SAMPLES_KEY)
        assert sorted(shots) == [5, 10], name
        k = pictures.MIN_FRAME_PX // 8  # 8x8 frames enlarged to 64 px
        assert shots[10].size == ((4 * 8 + 3 * 2 + 2 + 2) * k, (2 * 8 + 2) * k), name  # 3 + 1 frames, gaps, the bar
        assert run.data.tags["mlflow.loggedImages"] == "True"
        # the data: the Dataset column's name, the source path, the digest of its stats.json
        (dataset_input,) = run.inputs.dataset_inputs
        dataset = dataset_input.dataset
        assert (dataset.name, dataset.digest) == ("moving_mnist", digest)
        assert json.loads(dataset.source) == {"uri": str(env["data"])}
        assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]
        # the code: the Source and Version columns
        tags = run.data.tags
        assert tags[tracking.TAG_GIT_COMMIT] == commit and tags[tracking.TAG_GIT_DIRTY] == str(dirty).lower()
        assert tags[tracking.TAG_SOURCE_NAME] == "pipeline/sweep/driver.py" and tags[tracking.TAG_PRECISION] == "fp32"
        # what "auto" chose on this CPU: the plain step (vpn.train.Trainer._memory_settings)
        params = run.data.params
        assert (params["memory.activation_checkpointing"], params["memory.micro_batch_size"]) == ("False", "None")
    # bits per sub-pixel beside nats per frame, for the categorical head only: nats / (C*H*W ln 2)
    cat, bern = runs["cat"].data.metrics, runs["bern"].data.metrics
    for split in ("train", "val", "test"):
        nats = cat[f"{split}_nats_per_frame"]
        assert cat[f"{split}_bits_per_subpixel"] == pytest.approx(nats / (64 * math.log(2)), rel=1e-9), split
        assert f"{split}_bits_per_subpixel" not in bern
    for metrics in (cat, bern):  # MLflow's system metrics, on by default (on CPU too)
        assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics

    # the best trial, by the results' ranking, is the run's model and models:/ui_train/1
    best = json.loads((env["root"] / "results_train" / "metrics.json").read_text())["best"]
    best_run = client.get_run(best["run_id"])
    assert best_run.data.tags[registry.TAG_REGISTERED] == "1"
    # the runs table's Model column: the PyTorch model and the futures pyfunc (tests/test_served_model.py)
    outputs = {
        client.get_logged_model(o.model_id).name: client.get_logged_model(o.model_id)
        for o in best_run.outputs.model_outputs
    }
    assert sorted(outputs) == [futures.FUTURES_NAME, registry.MODEL_NAME]
    for logged in outputs.values():  # in the sweep's experiment, beside its runs
        assert logged.experiment_id == exp.experiment_id and logged.artifact_location.startswith(exp.artifact_location)
    (served,) = client.search_model_versions("name='ui_train_futures'")
    assert served.run_id == best["run_id"] and best_run.data.tags[futures.TAG_FUTURES] == "1"
    (version,) = client.search_model_versions("name='ui_train'")
    assert version.run_id == best["run_id"] and version.tags["trial"] == best["trial"]
    import mlflow.pytorch

    loaded = mlflow.pytorch.load_model("models:/ui_train/latest")  # the documented one line (MLFLOW_TRACKING_URI set)
    checkpoint = load_model(
        client.download_artifacts(best["run_id"], tracking.CHECKPOINT_ARTIFACT, str(env["root"] / "ckpt"))
    )
    frames = torch.from_numpy(np.load(env["data"] / "test.npy"))
    with torch.no_grad():
        assert torch.equal(loaded(frames), checkpoint(frames)) and not loaded.training
    # the checkpoint itself is in the model's folder, for a load that runs no pickled code
    folder = Path(mlflow.artifacts.download_artifacts("models:/ui_train/latest", dst_path=str(env["root"] / "model")))
    assert load_model(folder / "extra_files" / "checkpoint.pt").cfg == checkpoint.cfg
    # registering again (the sweep resumed, nothing changed) makes no new version
    assert registry.register_best(client, env["uri"], "ui_train", {"best": best}) == "1"
    assert len(client.search_model_versions("name='ui_train'")) == 1


# Every chart card of MLflow's chart view: its text (the legend names the metric), where it sits, and each
# line's run id and number of points (Plotly keeps a chart's traces on its div as .data).
CHART_CARDS = """JSON.stringify([...document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"]')]
  .map(card => ({text: card.innerText, top: card.getBoundingClientRect().top, height: window.innerHeight,
                 traces: [...card.querySelectorAll('.js-plotly-plot')].flatMap(plot => (plot.data || [])
                   .map(t => [t.uuid, (t.x || []).length]))})))"""


def curve_charts(browser, url: str, metric: str, runs: int) -> list[dict]:
    """The chart cards of `metric` that the page at url draws, once one holds `runs` runs' lines (or 120 s passed)."""

    def cards(value) -> list[dict]:
        return [c for c in json.loads(value or "[]") if f"({metric})" in c["text"]]

    value = browser.poll(url, CHART_CARDS, lambda v: any(len({t[0] for t in c["traces"]}) >= runs for c in cards(v)))
    return cards(value)


def grid_of_twelve(env, client) -> tuple[str, str, dict[str, int]]:
    """A sweep of 12 trials made by the driver's own functions (its parent, its saved view, its runs), each
    given a train curve of its own length: (experiment id, sweep id, {run id: points})."""
    model = {"enc_blocks": [1, 2, 3], "dec_blocks": [1, 2], "filter_fraction": [0.03125, 0.0625]}
    sweep = load_spec(write_spec(env, "ui_twelve", mode="train", search={"model": model})).resolve("cpu")
    experiment_id = client.create_experiment("ui_twelve")
    sweep_id = "ui_twelve-cpu-000000000000"
    parent = open_parent(client, experiment_id, sweep, sweep_id)
    data_info = {"shape": [16, 6, 1, 8, 8], "identity": "0" * 16}
    points = {}
    for i, run_id in enumerate(create_runs(client, experiment_id, sweep, sweep_id, data_info, parent)):
        curve = [Metric(tracking.TRAIN_KEY, 50.0 - s - i, 0, s) for s in range(1, 4 + i)]
        client.log_batch(run_id, metrics=curve)
        points[run_id] = len(curve)
    return experiment_id, sweep_id, points


def test_the_printed_link_shows_every_trials_curve(env, train_console):
    """The link the sweep prints, opened in a real browser against the served store, shows the chart view
    with every trial's train curve in one chart on the first screen, and nothing of the parent run; and
    so does a sweep of 12 trials (MLflow charts only 10 runs unless told otherwise)."""
    from cdp import Chromium, find_chromium

    executable = find_chromium()
    if executable is None:
        message = "no Chromium on PATH (Debian: apt-get install chromium; or set VPN_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    (line,) = [line for line in train_console.splitlines() if line.startswith("the runs in MLflow's UI: ")]
    printed = line.split(": ", 1)[1]
    assert printed.startswith("http://127.0.0.1:5000/#/experiments/") and "mlflow ui --backend-store-uri" in printed
    page = printed.split()[0].removeprefix("http://127.0.0.1:5000/")  # the address `mlflow ui` would serve
    client = tracking.client(env["uri"])
    exp = client.get_experiment_by_name("ui_train")
    trials = {r.info.run_id: len(client.get_metric_history(r.info.run_id, tracking.TRAIN_KEY))
              for r in trial_runs(client.search_runs([exp.experiment_id]))}  # fmt: skip
    assert len(trials) == 2 and min(trials.values()) >= 2
    twelve_id, twelve_sweep, twelve = grid_of_twelve(env, client)
    with running_mlflow_server(env["root"]) as served, Chromium(executable, timeout=120) as browser:
        for url, runs in ((f"{served}/{page}", trials), (runs_url(served, twelve_id, twelve_sweep), twelve)):
            charts = curve_charts(browser, url, tracking.TRAIN_KEY, len(runs))
            assert len(charts) == 1, (url, charts)
            (chart,) = charts
            assert chart["top"] < chart["height"] - 200, chart  # on the first screen, no scrolling
            drawn = {run_id: n for run_id, n in chart["traces"]}
            assert drawn == runs, (url, chart)  # every trial, each with its every point; no other run


def test_overfit_runs_log_their_reconstruction(env):
    spec = write_spec(
        env, "ui_overfit", mode="overfit", model={"output": "bernoulli"},
        train={"steps": 12, "seq_len": 4, "context": 1, "log_every": 4, "ckpt_every": 8, "device": "cpu", "lr": 3e-3},
        search={"preset": ["micro"], "preset_width_scale": 0.03125},
        overfit={"split": "train", "index": 0, "tol_per_subpixel": 1e-9},
    )  # fmt: skip
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    outcome = run_sweep(
        load_spec(spec), "cpu", storage=str(env["root"] / "ray"), results_dir=env["root"] / "results_overfit"
    )
    assert outcome.statuses == {"micro": "FINISHED"}
    # registering used MLflow's process-wide settings: they are as they were (the next sweep's store)
    assert (
        {k: os.environ.get(k) for k in before}
        == before
        == {"MLFLOW_TRACKING_URI": env["uri"], "MLFLOW_REGISTRY_URI": None}
    )
    client = tracking.client(env["uri"])
    (run,) = trial_runs(client.search_runs([client.get_experiment_by_name("ui_overfit").experiment_id]))
    shots = images(client, run.info.run_id, pictures.RECONSTRUCTION_KEY)
    assert sorted(shots) == [4, 8, 12]  # the first report, the checkpoint, the last step
    # the reconstruction row of the last one is the model's expected frames given the true past
    model = load_model(
        client.download_artifacts(run.info.run_id, tracking.CHECKPOINT_ARTIFACT, str(env["root"] / "ovf"))
    )
    sequence = torch.from_numpy(np.load(env["data"] / "train.npy")[0, :4])
    assert np.array_equal(np.asarray(shots[12]), np.asarray(pictures.reconstruction_strip(model, sequence)))
    assert images(client, run.info.run_id, pictures.SAMPLES_KEY) == {}
    assert client.get_registered_model("ui_overfit").latest_versions[0].run_id == run.info.run_id
