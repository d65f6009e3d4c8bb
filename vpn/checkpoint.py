"""Checkpoints: self-describing files that rebuild the architecture from their own config.

A checkpoint (vpn.train.Trainer.state_dict) holds the model and optimizer state, the step, the best
validation NLL, both configs and the RNG states, all as plain data, so it loads with
torch.load(weights_only=True): a file from elsewhere never runs code. Writes are atomic (a temporary
file, then a rename), so a crash mid-save leaves the previous checkpoint.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from vpn.config import TrainConfig, VPNConfig
from vpn.files import atomic_path
from vpn.model import VideoPixelNetwork

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vpn-checkpoint/1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically (temp file, then rename); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True: no code runs) and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, not a torch file, or objects beyond plain data
        # torch's message is a paragraph that ends by advising weights_only=False, which would run
        # the file's code: it goes to the debug log, the user gets one sentence.
        log.debug("torch.load(%s, weights_only=True) failed: %s", path, err)
        raise ValueError(_unreadable(path, str(err))) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file, so this project did not write it")
    _check_configs(path, state)
    return state


def _check_configs(path: Path, state: dict[str, Any]) -> None:
    """The configs and weights every reader of a checkpoint takes from it, there and valid (one sentence)."""
    for key, cls in (("model_config", VPNConfig), ("train_config", TrainConfig)):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"checkpoint {path} has no {key}, so it cannot be rebuilt: it is not a whole checkpoint")
        try:
            cls.from_dict(state[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint {path}: {key}: {e}") from None
    if not isinstance(state.get("model"), dict):
        raise ValueError(f"checkpoint {path} has no model weights")


def _unreadable(path: Path, torch_error: str) -> str:
    """One sentence for a checkpoint torch.load refused: foreign objects, or bytes it cannot parse."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", torch_error)
    if found:
        return (
            f"checkpoint {path} is not a VPN checkpoint: it stores Python objects ({found.group(1)}), "
            "which are never loaded because loading them could run code"
        )
    return f"checkpoint {path} cannot be read: it is truncated, corrupt or not a PyTorch file"


def mismatch(path: str | Path, error: Exception) -> ValueError:
    """The one sentence for a checkpoint whose state does not fit its own configs (weights of another
    model configuration than its model_config, an optimizer state of other parameters)."""
    # torch's message is a header line, then one line per key: the first key's line says enough.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    detail = detail if len(detail) <= 200 else detail[:200] + "..."
    return ValueError(f"checkpoint {path}: its state does not fit its own configs ({detail})")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> VideoPixelNetwork:
    """The model of a checkpoint, rebuilt from its config, in eval mode."""
    state = load_checkpoint(path, map_location)
    model = VideoPixelNetwork(VPNConfig.from_dict(state["model_config"]))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise mismatch(path, e) from None
    return model.to(map_location).eval()
