"""How a profile merges into a spec's base sections.

A profile merges key by key into model, train, run, run.asha and overfit; in search it replaces whole
axes (an axis set to null is removed, and `rows` is replaced as a whole), and it may replace data,
mode and description. What it set is returned too, so that an error names the profile's own path
(pipeline.sweep.spec.validate.Blame).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def apply_profile(base: Mapping[str, Any], override: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Merge a profile into the base sections; returns the merged spec and the paths the profile set."""
    merged = copy.deepcopy({k: v for k, v in base.items() if k != "profiles"})
    touched: set[str] = set()
    for key, value in override.items():
        if key in ("model", "train", "overfit", "run") and isinstance(value, dict):
            section = merged.get(key) or {}
            if not isinstance(section, dict):
                section = {}
            for k, v in value.items():
                if key == "run" and k == "asha" and isinstance(v, dict) and isinstance(section.get("asha"), dict):
                    section["asha"] = {**section["asha"], **copy.deepcopy(v)}
                    touched.update(f"run.asha.{kk}" for kk in v)
                    continue
                section[k] = copy.deepcopy(v)
                touched.add(f"{key}.{k}")
            merged[key] = section
        elif key == "search" and isinstance(value, dict):
            search = merged.get("search") or {}
            if not isinstance(search, dict):
                search = {}
            for k, v in value.items():
                if k in ("model", "train") and isinstance(v, dict):
                    axes = dict(search.get(k) or {})
                    for axis, values in v.items():
                        if values is None:
                            axes.pop(axis, None)
                        else:
                            axes[axis] = copy.deepcopy(values)
                        touched.add(f"search.{k}.{axis}")
                    search[k] = axes
                else:
                    search[k] = copy.deepcopy(v)
                    touched.add(f"search.{k}")
            merged["search"] = search
        else:
            merged[key] = copy.deepcopy(value)
            touched.add(key)
    return merged, touched
