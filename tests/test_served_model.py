"""The registered models (pipeline.sweep.record.futures, pyfunc_model): raw frames in, the trial's preparation,
sampled uint8 frames out, equal to model.sample with the same seed, through pyfunc.load_model and through a
REST request to `mlflow models serve` on loopback; beside it, the sweep's model (logits, and the
VideoPixelNetwork itself). Loading either unpickles nothing, and a request past a limit is refused with a
400 naming the limit, before any sampling, so that the server stays responsive."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import environ, free_port

from pipeline.sweep.driver import QUIET_ENV
from pipeline.sweep.record import futures, registry, tracking
from vpn import VideoPixelNetwork, VPNConfig
from vpn.checkpoint import load_model
from vpn.config import TrainConfig
from vpn.evaluate import prepare
from vpn.train import Trainer

NOLOAD = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # MLflow's SQL store

TINY = VPNConfig.preset("micro", filter_fraction=8 / 128, output="bernoulli")
# 16x16 data, trained at 8x8 (downsample 2): the served model must pool as the trial did
CFG = TrainConfig(steps=2, batch_size=2, context=2, seq_len=5, downsample=2, device="cpu")
# the trial's shapes as limits: its batch of 2, its 5 frames, its horizon of 3, 2 x 3 frames of 1x8x8
LIMITS = {"max_batch": 2, "max_context": 5, "max_frames": 3, "max_pixels": 2 * 3 * 64}


def raw_frames(n: int, t: int, seed: int) -> np.ndarray:
    """uint8 (n, t, 1, 16, 16) grey values, so that pooling has something to average."""
    return np.random.default_rng(seed).integers(0, 256, (n, t, 1, 16, 16), dtype=np.uint8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store holding one finished run with a checkpoint, registered as the sweep `tiny`."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    checkpoint = Trainer(TINY, CFG, torch.from_numpy(raw_frames(4, 6, 0))).save(root / "checkpoint.pt")
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("tiny", artifact_location=(root / "art").as_uri())
    run = client.create_run(exp, run_name="t0", tags={tracking.TAG_SWEEP_ID: "tiny-cpu-0"})
    for key, value in {
        "frame_height": 8, "frame_width": 8, "downsample": 2, "seq_len": 5, "context": 2, "mode": "train",
    }.items():  # fmt: skip
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, tracking.TRAIN_KEY, 40.0, step=2)
    client.log_artifact(run.info.run_id, str(checkpoint), "checkpoint")
    client.set_terminated(run.info.run_id, "FINISHED")
    best = {"run_id": run.info.run_id, "trial": "t0", "test_excess": 1.5}
    with environ({**QUIET_ENV, "MLFLOW_TRACKING_URI": uri}):
        version = registry.register_best(client, uri, "tiny", {"best": best})
        yield {"root": root, "uri": uri, "client": client, "best": best, "version": version, "ckpt": checkpoint}


def expected(checkpoint, frames: np.ndarray, n: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """What the documented library call gives: model.sample of the prepared frames, a generator seeded alike."""
    model = load_model(checkpoint)
    prepared = prepare(torch.from_numpy(frames), CFG.replace(seq_len=None))  # (B, T, 1, 8, 8)
    generator = torch.Generator().manual_seed(seed)
    return model.sample(prepared, n, generator=generator, temperature=temperature).numpy()


class Context:
    """What MLflow hands load_context: the artifacts' local paths and the model's config."""

    def __init__(self, checkpoint, **config) -> None:
        self.artifacts = {"checkpoint": str(checkpoint)}
        self.model_config = {"mode": "futures", **LIMITS, **config}


def test_futures_model_predicts_model_sample_of_the_prepared_frames(tmp_path):
    """The model's code alone, as MLflow calls it (fast: no store)."""
    from mlflow.exceptions import MlflowException

    from pipeline.sweep.record.pyfunc_model import CheckpointModel

    checkpoint = Trainer(TINY, CFG, torch.from_numpy(raw_frames(4, 6, 0))).save(tmp_path / "checkpoint.pt")
    served = CheckpointModel()
    served.load_context(Context(checkpoint))
    frames = raw_frames(2, 3, seed=4)
    out = served.predict(None, frames, {"frames": 2, "temperature": 1.0, "seed": 5})
    assert out.dtype == np.uint8 and np.array_equal(out, expected(checkpoint, frames, 2, seed=5))
    bad = {  # each refused as INVALID_PARAMETER_VALUE (the server's 400) naming what was wrong
        "uint8": (frames.astype(np.int64), 2),
        "params.frames": (frames, 0),
        # the limits, each just past the trial's shapes; the product last: 2 sequences x 3 frames fit
        "max_batch=2": (raw_frames(3, 2, seed=1), 1),
        "max_context=5": (raw_frames(1, 6, seed=1), 1),
        "max_frames=3": (frames, 10**6),
    }
    for message, (given, n) in bad.items():
        with pytest.raises(MlflowException, match=message) as refused:
            served.predict(None, given, {"frames": n, "temperature": 1.0, "seed": 5})
        assert refused.value.get_http_status_code() == 400, message
    served.load_context(Context(checkpoint, max_pixels=2 * 2 * 64))
    with pytest.raises(MlflowException, match=r"2 sequences x 3 frames x 1x8x8 = 384 pixels.*max_pixels=256"):
        served.predict(None, frames, {"frames": 3, "temperature": 1.0, "seed": 5})
    assert served.predict(None, frames, {"frames": 2, "temperature": 1.0, "seed": 5}).shape == (2, 2, 1, 8, 8)


def test_a_bad_model_config_is_named_at_load(tmp_path):
    from mlflow.exceptions import MlflowException

    from pipeline.sweep.record.pyfunc_model import CheckpointModel, check_config

    checkpoint = Trainer(TINY, CFG, torch.from_numpy(raw_frames(4, 6, 0))).save(tmp_path / "checkpoint.pt")
    for config, message in [
        ({"mode": "pickle"}, "model_config.mode must be one of logits, futures"),
        ({"max_frames": 0}, "model_config.max_frames must be an integer >= 1, got 0"),
        ({"max_pixels": True}, "model_config.max_pixels must be an integer >= 1, got True"),
        ({"max_batch": "8"}, "model_config.max_batch must be an integer >= 1, got '8'"),
        ({"max_tokens": 8}, "model_config has no key 'max_tokens' in mode futures"),
    ]:
        with pytest.raises(MlflowException, match=message):
            CheckpointModel().load_context(Context(checkpoint, **config))
    with pytest.raises(MlflowException, match="no key 'max_frames' in mode logits"):
        check_config({"mode": "logits", **LIMITS})


def test_default_limits_are_the_trial_shapes():
    assert futures.default_limits(CFG, 1, 8, 8, "futures") == LIMITS
    assert futures.default_limits(CFG, 1, 8, 8, "logits") == {
        "max_batch": 2,
        "max_context": 5,
        "max_pixels": 2 * 4 * 64,
    }
    # whole sequences (seq_len None): the paper's 10 given 10; an unknown frame size: 64x64 pooled by 2
    whole = CFG.replace(seq_len=None, context=10)
    assert futures.default_limits(whole, 3, -1, -1, "futures") == {
        "max_batch": 2, "max_context": 20, "max_frames": 10, "max_pixels": 2 * 10 * 3 * 32 * 32,
    }  # fmt: skip


def test_signature_takes_the_data_size_and_gives_the_trained_size_with_the_params():
    sig = futures.signature(1, 16, 16, 4, 10)
    assert sig.inputs.inputs[0].shape == (-1, -1, 1, 64, 64) and sig.inputs.inputs[0].type == np.dtype(np.uint8)
    assert sig.outputs.inputs[0].shape == (-1, -1, 1, 16, 16) and sig.outputs.inputs[0].type == np.dtype(np.uint8)
    assert {p.name: p.default for p in sig.params.params} == {"frames": 10, "temperature": 1.0, "seed": 0}
    logits = futures.logits_signature(3, 16, 16, 4, "categorical")
    assert logits.inputs.inputs[0].shape == (-1, -1, 3, 64, 64) and logits.outputs.inputs[0].shape == (
        -1, -1, 3, 256, 16, 16,
    )  # fmt: skip


@pytest.mark.slow
@NOLOAD
def test_pyfunc_predicts_the_samples_of_model_sample_from_raw_frames(store):
    import mlflow.pyfunc

    # 3 sequences are over the trial's batch of 2: raised for this load (the model's config, key by key)
    served = mlflow.pyfunc.load_model("models:/tiny_futures/latest", model_config={"max_batch": 3, "max_pixels": 576})
    assert served.model_config == {"mode": "futures", **LIMITS, "max_batch": 3, "max_pixels": 576}
    frames = raw_frames(3, 2, seed=1)  # the data's own 16x16 frames
    out = served.predict(frames, params={"frames": 2, "seed": 7, "temperature": 0.8})
    assert out.dtype == np.uint8 and out.shape == (3, 2, 1, 8, 8)
    assert np.array_equal(out, expected(store["ckpt"], frames, 2, seed=7, temperature=0.8))
    # the defaults: the trial's horizon (seq_len 5 - context 2), temperature 1, seed 0
    default = served.predict(frames)
    assert default.shape == (3, 3, 1, 8, 8) and np.array_equal(default, expected(store["ckpt"], frames, 3, seed=0))
    assert not np.array_equal(served.predict(frames, params={"seed": 8}), default)  # the seed is used
    # the trained size is not the data's: the schema names the expected shape
    with pytest.raises(Exception, match="16, 16"):
        served.predict(raw_frames(1, 2, seed=2)[..., :8, :8])
    assert store["version"] == "1"
    # the models' config reaches their MLmodel only, not the run's params (where `mode` is the sweep's)
    params = store["client"].get_run(store["best"]["run_id"]).data.params
    assert params["mode"] == "train" and not {k for k in params if k.startswith("max_")}


@pytest.mark.slow
@NOLOAD
def test_loading_the_registered_models_unpickles_nothing(store, monkeypatch, tmp_path):
    """The sweep's model is the VideoPixelNetwork of the checkpoint and its logits, and neither model's load
    unpickles: MLflow's pickle switch off, pickle's and cloudpickle's loaders broken, torch.load only with
    weights_only. The model's folder holds no pickle, only code, YAML, text and the checkpoint."""
    import cloudpickle
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    def unpickle(*args, **kwargs):
        raise AssertionError("a load unpickled")

    real_load, loads = torch.load, []

    def torch_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "load", unpickle)
        monkeypatch.setattr(module, "loads", unpickle)
    monkeypatch.setattr(torch, "load", torch_load)
    # the README's one line
    model = mlflow.pyfunc.load_model("models:/tiny/latest").unwrap_python_model().model
    assert isinstance(model, VideoPixelNetwork) and not model.training
    reference = load_model(store["ckpt"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    logits = mlflow.pyfunc.load_model("models:/tiny/latest")
    frames = raw_frames(2, 4, seed=6)
    with torch.no_grad():
        want = reference(prepare(torch.from_numpy(frames), CFG.replace(seq_len=None))).numpy()  # (2, 3, 1, 8, 8)
    assert np.array_equal(logits.predict(frames), want)
    assert logits.model_config == {"mode": "logits", "max_batch": 2, "max_context": 5, "max_pixels": 2 * 4 * 64}
    for given, message in [(raw_frames(3, 2, seed=6), "max_batch=2"), (raw_frames(1, 1, seed=6), "T >= 2 frames")]:
        with pytest.raises(MlflowException, match=message):
            logits.predict(given)
    mlflow.pyfunc.load_model("models:/tiny_futures/latest")
    assert loads and all(w is True for w in loads), loads
    monkeypatch.undo()
    for uri in ("models:/tiny/latest", "models:/tiny_futures/latest"):
        folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / uri.split("/")[1])))
        files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file() and "code" not in f.parts)
        assert files == [  # registered_model_meta: YAML the download itself writes (name and version)
            "MLmodel", "artifacts/checkpoint.pt", "conda.yaml", "pyfunc_model.py", "python_env.yaml",
            "registered_model_meta", "requirements.txt",
        ], (uri, files)  # fmt: skip
        assert (folder / "code" / "vpn" / "model.py").is_file()


@pytest.mark.slow
@NOLOAD
def test_registering_again_adds_no_version_and_an_old_run_gets_its_missing_models(store):
    client, best = store["client"], store["best"]
    assert registry.register_best(client, store["uri"], "tiny", {"best": best}) == "1"
    assert len(client.search_model_versions("name='tiny'")) == 1
    assert len(client.search_model_versions("name='tiny_futures'")) == 1
    # a run registered before the futures model existed (only the sweep's model's tag) gets only the futures
    client.delete_tag(best["run_id"], futures.TAG_FUTURES)
    assert registry.register_best(client, store["uri"], "tiny", {"best": best}) == "1"
    assert len(client.search_model_versions("name='tiny'")) == 1
    (latest, *_) = client.search_model_versions("name='tiny_futures'", order_by=["version_number DESC"])
    assert str(latest.version) == "2" and latest.run_id == best["run_id"] and latest.tags["trial"] == "t0"
    # a run registered by an earlier release (no format tag: a pickled module, futures without limits)
    # gets both models again, as new versions
    client.delete_tag(best["run_id"], registry.TAG_FORMAT)
    assert registry.register_best(client, store["uri"], "tiny", {"best": best}) == "2"
    tags = client.get_run(best["run_id"]).data.tags
    assert (tags[registry.TAG_FORMAT], tags[futures.TAG_FUTURES]) == (registry.FORMAT, "3")
    assert len(client.search_model_versions("name='tiny_futures'")) == 3
    # limits raised where the model is logged: a new version, its config in the MLmodel, not in the run's
    # params (MLflow's Model.log would try to log them there, and warn where they clash)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mlflow").addHandler(handler)
    try:
        version = registry.register_futures(client, store["uri"], "tiny", best["run_id"], {"max_frames": 30})
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    assert not [r for r in records if "params" in r.getMessage()], [r.getMessage() for r in records]
    assert version == "4" and client.get_run(best["run_id"]).data.tags[futures.TAG_FUTURES] == "4"
    import mlflow.pyfunc

    config = mlflow.pyfunc.load_model("models:/tiny_futures/4").model_config
    assert config == {"mode": "futures", **LIMITS, "max_frames": 30}
    with pytest.raises(Exception, match="model_config.max_frames must be an integer >= 1, got 0"):
        registry.register_futures(client, store["uri"], "tiny", best["run_id"], {"max_frames": 0})
    assert len(client.search_model_versions("name='tiny_futures'")) == 4


def post(url: str, body: dict) -> tuple[int, dict, float]:
    """The scoring server's status, JSON answer and seconds for one request."""
    request = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read()), time.monotonic() - start
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.monotonic() - start


@pytest.mark.slow
@NOLOAD
def test_rest_answer_of_mlflow_models_serve_equals_model_sample_and_oversized_requests_are_refused(store):
    port = free_port()
    log = (store["root"] / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny_futures/1",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # `mlflow models serve` execs `uvicorn` from PATH: the venv's bin first, as an activated venv has it
        # (CI calls the venv's python without activating it). The server's own limit on the product,
        # lowered (docs/forecast.md), so that a request within the three shape limits can pass it.
        env={**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": store["uri"],
             "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"max_pixels": 2 * 2 * 64}),
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (store["root"] / "serve.log").read_text()
            time.sleep(0.5)
        oversized = {  # the limit each passes, just (the trial's shapes: LIMITS; the server's max_pixels 256)
            "max_batch=2": {"inputs": raw_frames(3, 2, seed=1).tolist(), "params": {"frames": 1}},
            "max_context=5": {"inputs": raw_frames(1, 6, seed=1).tolist(), "params": {"frames": 1}},
            "max_frames=3": {"inputs": raw_frames(1, 2, seed=1).tolist(), "params": {"frames": 10**6}},
            "max_pixels=256": {"inputs": raw_frames(2, 2, seed=1).tolist(), "params": {"frames": 3}},
        }
        for limit, body in oversized.items():
            status, answer, seconds = post(url, body)
            assert (status, answer["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), (limit, answer)
            assert f"over this model's limit {limit}" in answer["message"] and seconds < 10, (limit, seconds)
        # more million-frame requests at once than the server has threads (min(32, cores + 4)): all
        # refused, none left drawing, so the server still answers
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(url, oversized["max_frames=3"]), range(40)))
        assert [a[0] for a in answers] == [400] * 40 and max(a[2] for a in answers) < 30
        frames = raw_frames(2, 3, seed=3)
        status, answer, _ = post(url, {"inputs": frames.tolist(), "params": {"frames": 2, "seed": 11}})
        assert status == 200, answer
        drawn = np.asarray(answer["predictions"])
    finally:
        if server.poll() is None:  # a server that died already has its log in the assertion above
            os.killpg(server.pid, 15)  # its own session: the server and its workers
            server.wait(timeout=30)
    assert drawn.shape == (2, 2, 1, 8, 8)
    assert np.array_equal(drawn, expected(store["ckpt"], frames, 2, seed=11))
