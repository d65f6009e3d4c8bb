"""The registered futures model (pipeline.sweep.record.futures): raw frames in, the trial's preparation, sampled
uint8 frames out, equal to model.sample with the same seed, through pyfunc.load_model and through a
REST request to `mlflow models serve` on loopback. The PyTorch model stays registered beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import environ, free_port

from pipeline.sweep.driver import QUIET_ENV
from pipeline.sweep.record import futures, registry, tracking
from vpn import VPNConfig
from vpn.checkpoint import load_model
from vpn.config import TrainConfig
from vpn.evaluate import prepare
from vpn.train import Trainer

NOLOAD = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # MLflow's SQL store

TINY = VPNConfig.preset("micro", filter_fraction=8 / 128, output="bernoulli")
# 16x16 data, trained at 8x8 (downsample 2): the served model must pool as the trial did
CFG = TrainConfig(steps=2, batch_size=2, context=2, seq_len=5, downsample=2, device="cpu")


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
    for key, value in {"frame_height": 8, "frame_width": 8, "downsample": 2, "seq_len": 5, "context": 2}.items():
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
    """What MLflow hands load_context: the artifacts' local paths."""

    def __init__(self, checkpoint) -> None:
        self.artifacts = {"checkpoint": str(checkpoint)}


def test_futures_model_predicts_model_sample_of_the_prepared_frames(tmp_path):
    """The model's code alone, as MLflow calls it (fast: no store)."""
    from pipeline.sweep.record.futures_model import FuturesModel

    checkpoint = Trainer(TINY, CFG, torch.from_numpy(raw_frames(4, 6, 0))).save(tmp_path / "checkpoint.pt")
    served = FuturesModel()
    served.load_context(Context(checkpoint))
    frames = raw_frames(2, 3, seed=4)
    out = served.predict(None, frames, {"frames": 2, "temperature": 1.0, "seed": 5})
    assert out.dtype == np.uint8 and np.array_equal(out, expected(checkpoint, frames, 2, seed=5))
    with pytest.raises(TypeError, match="uint8"):
        served.predict(None, frames.astype(np.int64), {"frames": 2, "temperature": 1.0, "seed": 5})
    with pytest.raises(ValueError, match="params.frames"):
        served.predict(None, frames, {"frames": 0, "temperature": 1.0, "seed": 5})


def test_signature_takes_the_data_size_and_gives_the_trained_size_with_the_params():
    sig = futures.signature(1, 16, 16, 4, 10)
    assert sig.inputs.inputs[0].shape == (-1, -1, 1, 64, 64) and sig.inputs.inputs[0].type == np.dtype(np.uint8)
    assert sig.outputs.inputs[0].shape == (-1, -1, 1, 16, 16) and sig.outputs.inputs[0].type == np.dtype(np.uint8)
    assert {p.name: p.default for p in sig.params.params} == {"frames": 10, "temperature": 1.0, "seed": 0}


@pytest.mark.slow
@NOLOAD
def test_pyfunc_predicts_the_samples_of_model_sample_from_raw_frames(store):
    import mlflow.pyfunc
    import mlflow.pytorch

    served = mlflow.pyfunc.load_model("models:/tiny_futures/latest")
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
    # the PyTorch flavour is still the sweep's name, as the README loads it
    assert store["version"] == "1"
    assert isinstance(mlflow.pytorch.load_model("models:/tiny/latest"), torch.nn.Module)


@pytest.mark.slow
@NOLOAD
def test_registering_again_adds_no_version_and_an_old_run_gets_its_futures(store):
    client, best = store["client"], store["best"]
    assert registry.register_best(client, store["uri"], "tiny", {"best": best}) == "1"
    assert len(client.search_model_versions("name='tiny'")) == 1
    assert len(client.search_model_versions("name='tiny_futures'")) == 1
    # a run registered before the futures model existed (only the PyTorch tag) gets only the futures
    client.delete_tag(best["run_id"], futures.TAG_FUTURES)
    assert registry.register_best(client, store["uri"], "tiny", {"best": best}) == "1"
    assert len(client.search_model_versions("name='tiny'")) == 1
    (latest, *_) = client.search_model_versions("name='tiny_futures'", order_by=["version_number DESC"])
    assert str(latest.version) == "2" and latest.run_id == best["run_id"] and latest.tags["trial"] == "t0"


@pytest.mark.slow
@NOLOAD
def test_rest_answer_of_mlflow_models_serve_equals_model_sample(store):
    port = free_port()
    log = (store["root"] / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny_futures/1",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # `mlflow models serve` execs `uvicorn` from PATH: the venv's bin first, as an activated venv has it
        # (CI calls the venv's python without activating it)
        env={**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": store["uri"],
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
        frames = raw_frames(2, 3, seed=3)
        body = json.dumps({"inputs": frames.tolist(), "params": {"frames": 2, "seed": 11}}).encode()
        request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = np.asarray(json.loads(r.read())["predictions"])
    finally:
        if server.poll() is None:  # a server that died already has its log in the assertion above
            os.killpg(server.pid, 15)  # its own session: the server and its workers
            server.wait(timeout=30)
    assert answer.shape == (2, 2, 1, 8, 8)
    assert np.array_equal(answer, expected(store["ckpt"], frames, 2, seed=11))
