"""A sweep continued under new code: the unfinished sweep of the same spec, profile and data under other
code, the files that differ, and every code version each run trained under.

The sweep id covers the code a trial imports (pipeline.sweep.spec.identity), so a typo fixed halfway
through a week-long sweep gives a new id: without a flag, a new sweep, so that results never mix code
versions silently. The driver says so, naming the unfinished sweep and the files that differ; with
--continue-under-new-code it continues that sweep (its id, its Ray folder, its runs) under the new code.

What each sweep's parent run (pipeline.sweep.record.parent) records for it:
- tag sweep_base: the id without the code (identity.base_id_of), shared by the sweeps to compare;
- tag code_version: the code its last driver ran, JSON {"commit", "dirty", "code"} (git's commit, whether
  tracked files differed from it, the code identity's first 10 hex digits; commit null without .git);
- artifact code.json: that code's files with their sha256 (what the next driver compares);
- tag continued_under: the ids (of other code) under which it was continued, comma-separated, so that
  rerunning that code resumes it without the flag.
A trial, when it opens its run, appends the parent's code_version to the run's tag code_versions (a JSON
list) unless it is the last entry already: each run lists every code version it trained under.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType

from pipeline.sweep.record import tracking

log = logging.getLogger(__name__)

TAG_BASE, TAG_CODE_VERSION, TAG_CONTINUED = "sweep_base", "code_version", "continued_under"
TAG_CODE_VERSIONS = "code_versions"  # on a trial's run: every code version it trained under
CODE_ARTIFACT = "code.json"
# On the runs and parent of a sweep started over (pipeline.sweep.record.runs.archive_sweep): the id they had.
TAG_ARCHIVED = "archived_from"
CONTINUE_FLAG = "--continue-under-new-code"


def code_version(root: Path, code_identity: str) -> dict[str, Any]:
    """The version of the code at `root`: git's commit (None without .git), dirty, the code's identity."""
    git = tracking.git_tags(root)
    return {
        "commit": git.get(tracking.TAG_GIT_COMMIT),
        "dirty": git.get(tracking.TAG_GIT_DIRTY) == "true",
        "code": code_identity[:10],
    }


@dataclass(frozen=True)
class Choice:
    """Which sweep this driver drives: its own id, or an unfinished one of other code it continues."""

    sweep_id: str
    continued: bool = False  # an unfinished sweep of other code, continued under this code
    differ: tuple[str, ...] = ()  # the files that differ from that sweep's code


def choose_sweep(
    client, experiment_id: str, base: str, computed_id: str, files: Mapping[str, str], continue_code: bool
) -> Choice:
    """The sweep this driver drives (see the module docstring); reads only, and logs what it chose."""
    parents = [p for p in _parents(client, experiment_id, base) if TAG_ARCHIVED not in p.data.tags]
    if any(p.data.tags.get(tracking.TAG_PARENT_OF) == computed_id for p in parents):
        return Choice(computed_id)  # this code's own sweep: a plain resume
    for p in parents:
        if computed_id in p.data.tags.get(TAG_CONTINUED, "").split(","):
            log.info("sweep %s was continued under this code (%s): resuming it", _id(p), computed_id)
            return Choice(_id(p), continued=True)
    unfinished = sorted((p for p in parents if p.info.status != "FINISHED"), key=lambda p: -p.info.start_time)
    if not unfinished:
        if continue_code:
            log.warning("%s: no unfinished sweep of this spec, profile and data under other code; new sweep %s",
                        CONTINUE_FLAG, computed_id)  # fmt: skip
        return Choice(computed_id)
    other = unfinished[0]
    differ = files_differ(_code_files(client, other.info.run_id), files)
    listed = ", ".join(differ) or "none recorded"
    if continue_code:
        log.warning("continuing sweep %s, unfinished, under this code; the files that differ: %s", _id(other), listed)
        return Choice(_id(other), continued=True, differ=differ)
    log.warning(
        "an unfinished sweep %s of this spec, profile and data exists under other code (the files that differ: "
        "%s): this is a new sweep, %s; rerun with %s to continue %s instead",
        _id(other), listed, computed_id, CONTINUE_FLAG, _id(other),
    )  # fmt: skip
    return Choice(computed_id, differ=differ)


def files_differ(old: Mapping[str, str] | None, new: Mapping[str, str]) -> tuple[str, ...]:
    """The paths whose contents differ, added or removed ones too; () where the old code is unknown."""
    if old is None:
        return ()
    return tuple(sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p)))


def record_code(
    client, parent_id: str, base: str, version: Mapping[str, Any], files: Mapping[str, str], computed_id: str
) -> None:
    """On the parent run: its base, the code its driver runs now (tag and code.json), and, for a sweep
    continued under other code (computed_id is not its own id), that code's id in continued_under."""
    tags = tracking.retrying(client.get_run, parent_id).data.tags
    text = json.dumps(dict(version), sort_keys=True)
    update = {TAG_BASE: base, TAG_CODE_VERSION: text}
    continued = [i for i in tags.get(TAG_CONTINUED, "").split(",") if i]
    if computed_id != tags.get(tracking.TAG_PARENT_OF) and computed_id not in continued:
        update[TAG_CONTINUED] = ",".join([*continued, computed_id])
    if tags.get(TAG_CODE_VERSION) != text:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CODE_ARTIFACT
            path.write_text(json.dumps({"version": dict(version), "files": dict(files)}, indent=1, sort_keys=True))
            tracking.retrying(client.log_artifact, parent_id, str(path))
    if any(tags.get(k) != v for k, v in update.items()):
        tracking.set_tags(client, parent_id, update)


def trained_under(client, run: Any) -> dict[str, str]:
    """The run's code_versions tag with its parent's code_version appended (if it is not the last one
    already); {} where the parent records none. Called by the trial as it opens its run."""
    parent_id = run.data.tags.get(tracking.TAG_PARENT)
    if not parent_id:
        return {}
    version = tracking.retrying(client.get_run, parent_id).data.tags.get(TAG_CODE_VERSION)
    if version is None:
        return {}
    versions = json.loads(run.data.tags.get(TAG_CODE_VERSIONS, "[]"))
    if versions and versions[-1] == json.loads(version):
        return {}
    return {TAG_CODE_VERSIONS: json.dumps([*versions, json.loads(version)], sort_keys=True)}


def _parents(client, experiment_id: str, base: str) -> list[Any]:
    return list(
        tracking.retrying(
            client.search_runs,
            [experiment_id],
            filter_string=f"tags.{TAG_BASE} = '{base}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
        )
    )


def _id(parent: Any) -> str:
    return parent.data.tags[tracking.TAG_PARENT_OF]


def _code_files(client, parent_id: str) -> dict[str, str] | None:
    """The files of code.json on a parent run, None where it has none."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.retrying(client.download_artifacts, parent_id, CODE_ARTIFACT, tmp)
            return json.loads(Path(path).read_text())["files"]
    except Exception as e:  # a parent recorded before code.json existed, or an unreadable artifact
        log.info("run %s: no %s (%s)", parent_id, CODE_ARTIFACT, e)
        return None
