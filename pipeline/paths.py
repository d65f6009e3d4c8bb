"""Where the repository is: relative spec paths, the default MLflow store and the results start here."""

from __future__ import annotations

from pathlib import Path


def repo_root() -> Path:
    """The repository this package lives in (the parent folder of `pipeline/`)."""
    return Path(__file__).resolve().parents[1]
