"""The code part of a sweep's identity: the files a trial imports, found from the imports, not a list."""

from __future__ import annotations

from pathlib import Path

from pipeline.sweep.spec.identity import code_files, code_identity

REPO = Path(__file__).resolve().parents[1]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_module_the_trainable_imports_is_part_of_the_identity_and_an_unrelated_one_is_not(tmp_path):
    write(
        tmp_path,
        {
            "vpn/__init__.py": "",
            "vpn/config.py": "X = 1\n",
            "vpn/newmodule.py": "from vpn.config import X\n",
            "vpn/unrelated.py": "Y = 2\n",
            "pipeline/__init__.py": "",
            "pipeline/sweep/__init__.py": "",
            "pipeline/sweep/record/__init__.py": "",
            "pipeline/sweep/record/tracking.py": "import os\n",
            "pipeline/sweep/trials/__init__.py": "",
            "pipeline/sweep/trials/trainable.py": "import torch\nfrom pipeline.sweep.record import tracking\n\n"
            "def trial():\n    from vpn.newmodule import X  # a function-level import counts too\n",
            "pipeline/sweep/trials/distributed.py": "from pipeline.sweep.trials.trainable import trial\n",
            "pipeline/report/build.py": "from vpn.unrelated import Y\n",
        },
    )
    files = code_files(tmp_path)
    assert files == (
        "pipeline/__init__.py",
        "pipeline/sweep/__init__.py",
        "pipeline/sweep/record/__init__.py",
        "pipeline/sweep/record/tracking.py",
        "pipeline/sweep/trials/__init__.py",
        "pipeline/sweep/trials/distributed.py",
        "pipeline/sweep/trials/trainable.py",
        "vpn/__init__.py",
        "vpn/config.py",
        "vpn/newmodule.py",
    )
    before = code_identity(tmp_path)
    write(tmp_path, {"vpn/unrelated.py": "Y = 3\n", "pipeline/report/build.py": "Z = 0\n"})
    assert code_identity(tmp_path) == before  # not imported by a trial: not part of it
    write(tmp_path, {"vpn/newmodule.py": "from vpn.config import X\nW = 4\n"})
    assert code_identity(tmp_path) != before


def test_the_repositorys_trial_code():
    files = code_files(REPO)
    for name in (
        "vpn/model.py",
        "vpn/train.py",
        "vpn/overfit.py",
        "pipeline/sweep/trials/trainable.py",
        "pipeline/sweep/trials/distributed.py",
        "pipeline/sweep/record/tracking.py",
        "pipeline/sweep/trials/trial.py",
    ):
        assert name in files, name
    for name in (
        "vpn/cli.py",
        "pipeline/sweep/driver.py",
        "pipeline/sweep/record/results.py",
        "pipeline/report/build.py",
    ):
        assert name not in files, name
