"""One check's outcome: a line of `orch doctor`, and what to do when it is not ok."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"  # the run may work, but slower or with less insight than expected
    FAIL = "fail"  # the run will not work (or `orch submit` would be refused)


@dataclass(frozen=True)
class Check:
    area: str  # environment | config | storage | local | slurm | probe
    name: str  # what was checked, a few words
    status: Status
    detail: str  # what was found, one line
    fix: str | None = None  # what to do, for warn and fail

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


def ok(area: str, name: str, detail: str) -> Check:
    return Check(area, name, Status.OK, detail)


def warn(area: str, name: str, detail: str, fix: str) -> Check:
    return Check(area, name, Status.WARN, detail, fix)


def fail(area: str, name: str, detail: str, fix: str) -> Check:
    return Check(area, name, Status.FAIL, detail, fix)


def format_check(check: Check) -> list[str]:
    lines = [f"{check.status.value:4}  {check.area:11} {check.name}: {check.detail}"]
    if check.fix:
        lines.append(f"{'':17} fix: {check.fix}")
    return lines
