"""The data half of the pipeline end to end: loading (vpn.data), the stage entry points, dvc.yaml, dvc repro.

The `dvc repro` test builds a throwaway DVC project in a temporary git repository with tiny params and
a folder of fake MNIST IDX files, so it needs no network.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data import generate as gen
from pipeline.data.fetch import IDX_FILES, FetchConfig
from pipeline.data.generate import GenerateConfig
from vpn.data import MovingMNIST, load_split, make_loader, read_stats, split_path

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "seed": 1, "n_train": 6, "n_val": 3, "n_test": 4, "val_digits": 20, "seq_len": 8,
    "frame_size": 40, "digit_size": 28, "digits": 2, "step": 0.1, "colour": False, "context": 3, "test_file": None,
}  # fmt: skip


def fake_mnist(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8),
        y_train=(np.arange(60) % 10).astype(np.uint8),
        x_test=rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8),
        y_test=(np.arange(30) % 10).astype(np.uint8),
    )
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moving_mnist")
    mnist = fake_mnist(root.parent / "mnist.npz")
    gen.generate(GenerateConfig(**{**TINY_PARAMS, "colour": True}), mnist, root)
    return root


# ------------------------------------------------------------------------------------------------
# vpn.data


def test_dataset_memory_maps_and_returns_uint8_sequences(data_root):
    ds = MovingMNIST(data_root, "val")
    assert isinstance(ds.data, np.memmap)  # nothing copied into RAM up front
    assert len(ds) == 3 and ds.shape == (3, 8, 3, 40, 40)
    assert (ds.seq_len, ds.channels, ds.frame_size) == (8, 3, (40, 40))
    item = ds[2]
    assert item.dtype == torch.uint8 and item.shape == (8, 3, 40, 40)
    np.testing.assert_array_equal(item.numpy(), np.load(data_root / "val.npy")[2])
    item[:] = 0  # the item is a private copy: the file is untouched
    assert ds[2].any()


def test_dataset_pickles_without_its_array(data_root):
    ds = MovingMNIST(data_root, "train")
    ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # a worker gets the path, not 6 x 8 x 3 x 40 x 40 bytes
    again = pickle.loads(blob)
    assert torch.equal(again[5], ds[5])


def test_loader_batches_and_reproducible_shuffling(data_root):
    ds = MovingMNIST(data_root, "train")
    batches = list(make_loader(ds, batch_size=4))
    assert [tuple(b.shape) for b in batches] == [(4, 8, 3, 40, 40), (2, 8, 3, 40, 40)]
    assert batches[0].dtype == torch.uint8

    def order(seed: int) -> list[torch.Tensor]:
        return [b for b in make_loader(ds, batch_size=6, shuffle=True, seed=seed)]

    assert torch.equal(order(7)[0], order(7)[0])
    assert not torch.equal(order(7)[0], order(8)[0])
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, batch_size=0)


def test_missing_split_is_named(tmp_path):
    np.save(tmp_path / "train.npy", np.zeros((1, 2, 1, 4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"val\.npy.*split 'val' not found.*train\.npy"):
        load_split(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match=r"test\.npy"):
        MovingMNIST(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_split(tmp_path, "valid")


@pytest.mark.parametrize(
    "array,what",
    [(np.zeros((1, 2, 1, 4, 4), np.float32), "float32"), (np.zeros((2, 4, 4), np.uint8), r"\(2, 4, 4\)")],
)
def test_wrong_dtype_or_ndim_is_named(tmp_path, array, what):
    np.save(tmp_path / "test.npy", array)
    with pytest.raises(ValueError, match=rf"test\.npy.*{what}"):
        load_split(tmp_path, "test")


def test_corrupt_file_is_named(tmp_path):
    (tmp_path / "test.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"test\.npy"):
        load_split(tmp_path, "test")


def test_missing_files_messages_say_what_is_there(tmp_path):
    """A missing split lists the .npy files the folder does hold (or says it holds none); an unknown
    split lists the valid ones; a missing stats file is named."""
    for name in ("train", "test"):
        np.save(tmp_path / f"{name}.npy", np.zeros((1, 2, 1, 4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found \(it holds test\.npy, train\.npy\)"):
        load_split(tmp_path, "val")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError, match=r"split 'val' not found \(it holds no \.npy files\)"):
            load_split(folder, "val")
    with pytest.raises(ValueError, match="expected one of train, val, test"):
        split_path(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match=r"stats\.json: no stats file"):
        read_stats(tmp_path)


def test_dataset_knows_its_file_and_says_so(data_root):
    ds = MovingMNIST(data_root, "val")
    assert ds.path == data_root / "val.npy"
    assert repr(ds) == f"MovingMNIST(root={str(data_root)!r}, split='val', shape=(3, 8, 3, 40, 40))"


def test_loader_defaults_and_options_reach_the_dataloader(data_root):
    """By default: every sequence once, in order, in the main process, nothing pinned or dropped;
    shuffling without a seed is seed 0's order. Each option is passed on as given."""
    ds = MovingMNIST(data_root, "train")
    everything = torch.stack([ds[i] for i in range(len(ds))])
    loader = make_loader(ds, batch_size=4)
    assert torch.equal(torch.cat(list(loader)), everything)
    assert (loader.num_workers, loader.drop_last, loader.pin_memory, loader.persistent_workers) == (
        0,
        False,
        False,
        False,
    )
    assert [len(b) for b in make_loader(ds, batch_size=1)] == [1] * 6
    assert [len(b) for b in make_loader(ds, batch_size=4, drop_last=True)] == [4]
    shuffled = torch.cat(list(make_loader(ds, batch_size=6, shuffle=True)))
    assert torch.equal(shuffled, torch.cat(list(make_loader(ds, batch_size=6, shuffle=True, seed=0))))
    assert not torch.equal(shuffled, everything)
    assert make_loader(ds, batch_size=2, pin_memory=True).pin_memory is True
    workers = make_loader(ds, batch_size=4, num_workers=1)  # a worker process reopens the memory map
    assert (workers.num_workers, workers.persistent_workers) == (1, True)
    assert torch.equal(torch.cat(list(workers)), everything)


# ------------------------------------------------------------------------------------------------
# Stage entry points and dvc.yaml


def write_params(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


def test_generate_main_prints_the_lower_bound(tmp_path, capsys):
    mnist = fake_mnist(tmp_path / "mnist.npz")
    params = write_params(tmp_path / "params.yaml", generate=TINY_PARAMS)
    out = tmp_path / "moving"
    assert gen.main(["--params", str(params), "--mnist", str(mnist), "--out", str(out)]) == 0
    bound = read_stats(out)["lower_bound_nats_per_frame"]
    assert f"test lower bound {bound:.4f} nats/frame" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override,message",
    [
        ({"n_trian": 5}, r"'n_trian'.*section 'generate'"),
        ({"digit_size": 41}, "digit_size=41 is bigger than frame_size=40"),
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"digits": 0}, "digits must be >= 1"),
        ({"n_val": -1}, "n_val must be >= 1"),
        ({"val_digits": 60}, "val_digits=60 must be smaller"),
    ],
)
def test_generate_main_refuses_bad_params_and_writes_nothing(tmp_path, caplog, override, message):
    mnist = fake_mnist(tmp_path / "mnist.npz")
    params = write_params(tmp_path / "params.yaml", generate={**TINY_PARAMS, **override})
    out = tmp_path / "moving"
    assert gen.main(["--params", str(params), "--mnist", str(mnist), "--out", str(out)]) == 1
    assert re.search(message, caplog.text)
    assert not out.exists()


def test_generate_main_names_a_missing_section(tmp_path, caplog):
    params = write_params(tmp_path / "params.yaml", fetch={})
    assert gen.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 1
    assert "no section 'generate'" in caplog.text


def test_dvc_yaml_lists_every_param_and_the_scripts():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage, cfg_cls in (("fetch", FetchConfig), ("generate", GenerateConfig)):
        fields = [f.name for f in dataclasses.fields(cfg_cls)]
        assert stages[stage]["params"] == [f"{stage}.{f}" for f in fields]
        assert sorted(params[stage]) == sorted(fields)
        cfg_cls(**params[stage])  # the shipped values are valid
        script = f"pipeline/data/{stage}.py"  # a dep itself or inside a listed folder
        assert any(script == d or script.startswith(d.rstrip("/") + "/") for d in stages[stage]["deps"]), script
    assert "data/mnist/mnist.npz" in stages["generate"]["deps"]
    assert stages["generate"]["metrics"] == ["data/moving_mnist/stats.json"]


# ------------------------------------------------------------------------------------------------
# dvc repro in a throwaway project


def write_fake_idx_dir(folder: Path) -> Path:
    """Full-size MNIST IDX files of made-up digits (40 patterns repeated: gzip keeps them tiny)."""
    folder.mkdir(parents=True)
    patterns = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    for key, stem in IDX_FILES.items():
        n = 60000 if "train" in key else 10000
        array = np.resize(patterns, (n, 28, 28)) if key.startswith("x") else (np.arange(n) % 10).astype(np.uint8)
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))
    return folder


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        # dvc runs stage commands through the shell: `python` must be this interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(cwd),
    }
    result = subprocess.run(cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_dvc_repro_builds_the_data_reproducibly(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project)
    for package in ("pipeline", "vpn"):
        shutil.copytree(REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["fetch"]["idx_dir"] = str(write_fake_idx_dir(tmp_path / "idx"))
    params["generate"] = TINY_PARAMS
    write_params(project / "params.yaml", **params)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], project)
    run([*dvc, "init", "-q"], project)

    first = run([*dvc, "repro", "generate"], project)
    stats = read_stats(project / "data/moving_mnist")
    assert f"test lower bound {stats['lower_bound_nats_per_frame']:.4f} nats/frame" in first.stdout
    assert stats["splits"]["test"]["shape"] == [4, 8, 1, 40, 40]
    assert MovingMNIST(project / "data/moving_mnist", "train")[0].shape == (8, 1, 40, 40)
    lock = (project / "dvc.lock").read_text()

    assert "up to date" in run([*dvc, "repro", "generate"], project).stdout
    # Rebuilt from scratch, every output hashes as before: byte-for-byte reproducible.
    run([*dvc, "repro", "--force", "generate"], project)
    assert (project / "dvc.lock").read_text() == lock

    params["generate"] = {**TINY_PARAMS, "seed": 2}
    write_params(project / "params.yaml", **params)
    again = run([*dvc, "repro", "generate"], project)
    assert "'fetch' didn't change" in again.stdout + again.stderr
    assert (project / "dvc.lock").read_text() != lock
