"""Run ids: sortable by start time, unique, safe in paths, Slurm job names and shells.

A run of its own has an id like `mnist-20261130-101500-ab12` and lives at `<root>/<id>/`. A sweep
has an id of the same form and a directory `<root>/<sweep-id>/` holding its points, each a whole
run at `<root>/<sweep-id>/<index>/` with the run id `<sweep-id>/<index>`. An id of digits only
is therefore a point's index, never a run of its own: that keeps a run directory's id readable
from its path alone (RunDir.run_id), with no file to open.
"""

from __future__ import annotations

import re
import secrets
import time

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}\Z")
POINT_INDEX = re.compile(r"^(0|[1-9][0-9]{0,5})\Z")


def new_run_id(name: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{name[:40]}-{stamp}-{secrets.token_hex(3)}"


def is_valid_run_id(text: str) -> bool:
    """A top-level run or sweep id (not a point's `<sweep-id>/<index>`)."""
    return bool(RUN_ID.match(text)) and ".." not in text and not POINT_INDEX.match(text)


def is_point_index(name: str) -> bool:
    return bool(POINT_INDEX.match(name))


def point_run_id(sweep_id: str, index: int) -> str:
    return f"{sweep_id}/{index}"


def split_point_id(text: str) -> tuple[str, int] | None:
    """`<sweep-id>/<index>` -> (sweep id, index); None for anything else."""
    sweep_id, sep, index = text.partition("/")
    if sep and is_valid_run_id(sweep_id) and is_point_index(index):
        return sweep_id, int(index)
    return None


def point_index_of_path(path: str) -> int:
    """The index of the sweep point whose run directory is `path` (its name)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not is_point_index(name):
        raise ValueError(f"{path} is not a sweep point's directory")
    return int(name)


def run_id_of_path(path: str) -> str:
    """The run id of a run directory's path or URL: its name, or `<sweep-id>/<index>` for a point."""
    parts = path.rstrip("/").rsplit("/", 2)
    if len(parts) >= 2 and is_point_index(parts[-1]):
        return f"{parts[-2]}/{parts[-1]}"
    return parts[-1]
