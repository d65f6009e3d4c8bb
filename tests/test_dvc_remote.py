"""The data reaches another machine through a DVC remote, the way docs/data.md says: `dvc push` from
one clone to a local-folder remote (the on-prem shared folder's case), `git clone` + `dvc pull` into a
fresh clone, the same bytes there, and no stage run in the second clone.

The standard test file is versioned with `dvc add` and named by `generate.test_file`, as the docs
show: it is the one input no package can rebuild, so it must arrive through the remote too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_data_pipeline import REPO, TINY_PARAMS, run, write_fake_idx_dir, write_params

from pipeline.sweep.record.tracking import dataset_input
from pipeline.sweep.spec.data_check import json_dumps
from vpn.data import read_stats

pytestmark = [pytest.mark.slow]

DVC = [sys.executable, "-m", "dvc"]
TEST_FILE = "external/mnist_test_seq.npy"  # outside data/, which git ignores, so its .dvc file can be committed


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by its relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def source_project(root: Path, tmp_path: Path) -> Path:
    """A throwaway git + DVC project of this repository's dvc.yaml and packages, with tiny params, a
    `dvc add`-ed test file named by generate.test_file (and a dep of the generate stage, as the docs
    say to add), the data built by `dvc repro generate` and everything committed."""
    root.mkdir()
    for package in ("pipeline", "vpn"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages["stages"] = {k: stages["stages"][k] for k in ("fetch", "generate")}
    stages["stages"]["generate"]["deps"].append(TEST_FILE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["fetch"]["idx_dir"] = str(write_fake_idx_dir(tmp_path / "idx"))
    params["generate"] = {**TINY_PARAMS, "test_file": TEST_FILE}
    write_params(root / "params.yaml", **params)
    t, n, size = TINY_PARAMS["seq_len"], TINY_PARAMS["n_test"], TINY_PARAMS["frame_size"]
    (root / TEST_FILE).parent.mkdir(parents=True)
    rng = np.random.default_rng(3)
    np.save(root / TEST_FILE, rng.integers(0, 256, size=(t, n, size, size), dtype=np.uint8))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")  # the repository's: data/ is git-ignored
    run(["git", "init", "-q"], root)
    run([*DVC, "init", "-q"], root)
    run([*DVC, "add", "-q", TEST_FILE], root)
    run([*DVC, "repro", "generate"], root)
    return root


def stages_of(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def commit(root: Path, message: str) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message], root)


def run_without_python(cmd: list[str], cwd: Path, shims: Path) -> subprocess.CompletedProcess:
    """cmd with shims first on PATH, so a stage command's `python` is the failing one."""
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def failing_python(folder: Path) -> Path:
    """A `python` that only records that it ran: a stage command run under it would fail and leave
    the record, so its absence shows that no stage ran."""
    folder.mkdir()
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\necho "$@" >> {folder / "ran"}\nexit 1\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return folder


def test_push_from_one_clone_pull_into_a_fresh_one(tmp_path):
    remote = tmp_path / "shared" / "dvc-store"
    source = source_project(tmp_path / "source", tmp_path)
    run([*DVC, "remote", "add", "-d", "shared", str(remote)], source)
    commit(source, "data v1")  # dvc.lock, the .dvc file, .dvc/config with the remote: all in git
    run([*DVC, "push"], source)
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(source), str(clone)], tmp_path)
    assert not list(clone.rglob("*.npy")), "git carried data"
    # From here on, `python` fails and records: neither fetch nor generate may run in the clone.
    shims = failing_python(tmp_path / "shims")
    run_without_python([*DVC, "pull"], clone, shims)

    assert digests(clone / "data") == digests(source / "data")  # every output and the test file, same bytes
    generate = stages_of(clone)["generate"]
    pulled = {f"data/moving_mnist/{p}" for p in digests(clone / "data/moving_mnist")}
    assert pulled == {*generate["outs"], *generate["metrics"]}
    # Nothing to rebuild: dvc.lock's hashes match the pulled files, deps and params included.
    repro = run_without_python([*DVC, "repro", "generate"], clone, shims)
    assert "Data and pipelines are up to date" in repro.stdout, repro.stdout
    assert not (shims / "ran").exists(), (shims / "ran").read_text()

    # The run's dataset digest (from stats.json) is the same in both clones, and the commit's
    # dvc.lock holds the md5 of every file it was computed from.
    def digest(root: Path) -> str:
        return dataset_input(
            root / "data/moving_mnist", json_dumps(read_stats(root / "data/moving_mnist")), {}
        ).dataset.digest

    assert digest(clone) == digest(source)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["generate"]["outs"]}
    stats = (clone / "data/moving_mnist/stats.json").read_bytes()
    assert outs["data/moving_mnist/stats.json"] == hashlib.md5(stats).hexdigest()
    deps = {d["path"]: d["md5"] for d in lock["stages"]["generate"]["deps"] if "md5" in d}
    assert deps[TEST_FILE] == hashlib.md5((clone / TEST_FILE).read_bytes()).hexdigest()
