"""Nothing counted twice, nothing half-written (issue 28, item 5), without Ray: atomic writes synced
before their rename, a set of tables replaced whole, `vpn train --resume` and metrics.jsonl, a trial's
final metrics after a crash between its FINISHED and Ray's checkpoint, the profiles' results folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vpn import files
from vpn.cli import main


def test_atomic_writes_sync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "out" / "table.json"
    files.write_text(target, "{}")
    assert target.read_text() == "{}"
    (kind0, synced), rename, folder = events
    assert kind0 == "fsync" and Path(synced).parent == target.parent and Path(synced).name.startswith(".table.json.")
    assert rename == ("replace", str(target))
    assert folder == ("fsync", str(target.parent))  # the rename itself made durable
    assert [p.name for p in target.parent.iterdir()] == ["table.json"]


def test_a_set_of_files_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "results" / "cpu"
    with files.atomic_dir(out) as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text("old")
    with pytest.raises(RuntimeError), files.atomic_dir(out) as tmp:
        (tmp / "a").write_text("new")
        (tmp / "b").write_text("new")
        raise RuntimeError("the third table failed")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "old", "b": "old", "c": "old"}
    with files.atomic_dir(out) as tmp:
        for name in ("a", "b", "c"):
            (tmp / name).write_text("new")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "new", "b": "new", "c": "new"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["cpu"]  # no temporary folder left


def test_vpn_train_resume_logs_each_step_once(tmp_path):
    data = tmp_path / "mm"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        np.save(data / f"{split}.npy", (rng.random((n, 4, 1, 8, 8)) < 0.3).astype(np.uint8) * 255)
    out = tmp_path / "run"
    common = ["--data", str(data), "--batch-size", "2", "--out", str(out), "--quiet", "--set", "log_every=1"]
    model = ["--preset", "micro", "--filter-fraction", "0.0625", "--output", "bernoulli", "--set", "context=2"]
    assert main(["train", *model, "--steps", "4", "--set", "val_every=100", *common]) == 0
    # A continuation that crashed after logging steps 5 to 7 (its last checkpoint still at step 4),
    # the last line cut short.
    log = out / "metrics.jsonl"
    with log.open("a") as f:
        f.writelines(json.dumps({"step": s, "train_nats_per_frame": 1.0}) + "\n" for s in (5, 6, 7))
        f.write('{"step": 8, "train_nats')
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--steps", "8", *common]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(r["train_nats_per_frame"] != 1.0 for r in rows)  # the crashed run's rows were trained again
    # A new run (no --resume) into the same folder starts the file over.
    assert main(["train", *model, "--steps", "2", *common]) == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
