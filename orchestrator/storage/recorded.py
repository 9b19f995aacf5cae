"""Values read back from records that others may have written: a run's events, its metrics.json,
a sweep's record. A run directory may sit in a shared folder or a team's object store, and a job
writes what it likes in its own files, so a field may hold anything JSON or YAML can. Each reader
returns the value as the type orch writes it, or None: the folds behind `orch status`, `orch ls`,
`orch report` and the goodput ledger treat None as absent, so a crafted record is never a
traceback, never text taken for a number, and never a number no clock can show as a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# The widest integer orch writes: steps, attempts, ranks and counts are int64 (TensorBoard's
# steps are), and a number past it would be a count no loop or float should take at its word.
INT64 = (-(2**63), 2**63 - 1)
# The last second a clock shows (9999-12-31 23:59:59 UTC: datetime's, and so the report's,
# limit); time.localtime and datetime.fromtimestamp raise past it.
LAST_CLOCK_TIME = 253_402_300_799.0


def whole(value: Any) -> int | None:
    """An integer as orch records one (a step, an attempt, a rank, a count: an int64, which JSON
    may hold as 3.0), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and INT64[0] <= value <= INT64[1]:
        return value
    return None


def ordinal(value: Any) -> int | None:
    """A whole number from 0 up (an attempt's number, a sweep point's index), else None."""
    number = whole(value)
    return number if number is not None and number >= 0 else None


def real(value: Any) -> float | None:
    """A number as orch records one (a scalar: NaN included), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int past float's range
        return None


def seconds(value: Any) -> float | None:
    """A duration as orch records one (restore_s, block_s...): finite and not negative, else None."""
    number = real(value)
    return number if number is not None and 0.0 <= number < math.inf else None


def moment(record: Mapping[str, Any]) -> float | None:
    """A record's `time`: seconds since 1970 that a clock can show, else None."""
    t = real(record.get("time"))
    return t if t is not None and 0.0 <= t <= LAST_CLOCK_TIME else None


def label(value: Any) -> str | None:
    """A name as orch records one (a backend, a state), else None."""
    return value if isinstance(value, str) else None


def mapping(value: Any) -> Mapping[str, Any]:
    """A record's part that should be a mapping (run.yaml's, metrics.json's), else empty."""
    return value if isinstance(value, Mapping) else {}
