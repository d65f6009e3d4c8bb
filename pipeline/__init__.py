"""Pipeline stages (one module per DVC stage, `python -m pipeline.<stage>`) and the glue they share.

The model library `vpn` knows nothing of DVC, Ray or MLflow; everything that does lives here.
"""

from __future__ import annotations

from vpn.files import atomic_path as atomic_output  # noqa: F401  (the stages' name for it)
