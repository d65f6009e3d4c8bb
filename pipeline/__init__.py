"""Pipeline stages (one module per DVC stage, `python -m pipeline.<stage>`) and the glue they share.

The model library `vpn` knows nothing of DVC, Ray or MLflow; everything that does lives here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit move it onto `path` with os.replace.

    A reader (or DVC) therefore sees either the old file or the complete new one, never a half-written
    file; if the block raises, the temporary file is removed and `path` is left as it was. The parent
    folder is created if needed. The temporary name starts with a dot so globs of outputs skip it;
    the caller's writer creates the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would end up on the output. The writer creates the file itself.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
