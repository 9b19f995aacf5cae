"""Run ids: sortable by start time, unique, safe in paths, Slurm job names and shells."""

from __future__ import annotations

import re
import secrets
import time

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def new_run_id(name: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{name[:40]}-{stamp}-{secrets.token_hex(3)}"


def is_valid_run_id(text: str) -> bool:
    return bool(RUN_ID.match(text)) and ".." not in text
