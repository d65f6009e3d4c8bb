"""The pipeline around the model: the data stages (data/), the sweep machinery (sweep/), the reports (report/).

The model library `vpn` knows nothing of DVC, Ray or MLflow; everything that does lives here.
"""

from __future__ import annotations

import sys

try:
    import torch  # noqa: F401
except ModuleNotFoundError as err:  # the usual cause: `dvc repro` run with another `python` on PATH
    raise ModuleNotFoundError(
        f"{err.name} is not installed for {sys.executable}. The DVC stages run `python` from PATH: "
        "activate the project's environment first (`. .venv/bin/activate`, then `dvc repro`).",
        name=err.name,
    ) from err
