"""A sweep's directory on storage: its record and its points, each a whole run directory.

    <root>/<sweep-id>/sweep.yaml     what was swept: the points' values, backend, max_parallel
                     /events.jsonl   the sweep's own ledger (a Slurm job array's id, cancels)
                     /.orch-claim    the lock whoever runs or submits its points holds
                     /slurm/         submitit's files for the job array (slurm backend)
                     /<index>/       point `index`: run.yaml, events, ckpt/, logs/, tb/ (RunDir)

The points' run directories are created with the sweep, so a sweep stopped before it started
some of them still names them all: `orch status SWEEP` shows them `created`, and
`orch resume SWEEP` starts them.

A sweep's directory may be written by others: sweep.yaml is read back with only the points orch
could have written (a whole index from 0 up, its values a mapping), so a crafted point is left out
instead of failing every verb on the sweep, and never names a folder outside it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.contract import Event
from orchestrator.storage.recorded import mapping, ordinal
from orchestrator.storage.rundir import (
    DirClaim,
    RunDir,
    append_event,
    claim_directory,
    create_directory,
    is_local_url,
    join_url,
    load_yaml,
    read_events,
    url_to_fs,
)

SWEEP_FILE = "sweep.yaml"


@dataclass(frozen=True)
class SweepDir:
    url: str

    @property
    def sweep_id(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return is_local_url(self.url)

    def child(self, *parts: str) -> str:
        return join_url(self.url, *parts)

    def point(self, index: int) -> RunDir:
        return RunDir(self.child(str(index)))

    def create(self, record: dict[str, Any]) -> None:
        """Make the directory (private on local filesystems) and write sweep.yaml into it."""
        create_directory(self.url, SWEEP_FILE, record)

    def exists(self) -> bool:
        if self.is_local:
            return os.path.isfile(os.path.join(self.url.removeprefix("file://"), SWEEP_FILE))
        fs, path = url_to_fs(self.url)
        return fs.exists(f"{path}/{SWEEP_FILE}")

    def record(self) -> dict[str, Any]:
        if self.is_local:
            with open(os.path.join(self.url.removeprefix("file://"), SWEEP_FILE), "rb") as fh:
                data = fh.read()
        else:
            fs, path = url_to_fs(self.url)
            data = fs.cat_file(f"{path}/{SWEEP_FILE}")
        record = load_yaml(data) or {}  # libyaml's: a 1000-point record in ms (orch ls)
        return {**record, "points": readable_points(record)} if isinstance(record, dict) else {}

    def points(self, record: Mapping[str, Any] | None = None) -> list[tuple[dict[str, Any], RunDir]]:
        """(the point's record: index and values, its run directory), in the record's order."""
        record = self.record() if record is None else record
        return [(p, self.point(p["index"])) for p in readable_points(record)]

    def append_event(self, event: Event, **fields: Any) -> dict[str, Any]:
        return append_event(self.url, event, **fields)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.url)

    def claim(self) -> DirClaim:
        """The sweep's exclusive claim (claim_directory): held by whoever runs or submits its
        points, for the local runner its whole life."""
        return claim_directory(self.url)


def readable_points(record: Any) -> list[dict[str, Any]]:
    """A sweep record's points as orch writes them, {index, values}: a point whose index is not a
    whole number from 0 up is left out, values that are not a mapping are read as none."""
    points = mapping(record).get("points")
    if not isinstance(points, list):
        return []
    readable = []
    for point in points:
        index = ordinal(mapping(point).get("index"))
        if index is not None:
            readable.append({**point, "index": index, "values": dict(mapping(point.get("values")))})
    return readable


def remove_tree(url: str) -> None:
    """Remove a directory and everything in it (a sweep whose creation failed)."""
    if is_local_url(url):
        shutil.rmtree(url.removeprefix("file://"), ignore_errors=True)
        return
    fs, path = url_to_fs(url)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
