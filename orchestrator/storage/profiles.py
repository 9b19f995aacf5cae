"""A run's profiles (RUN_DIR/profile/attempt-N, written by runtime/profiling.py): the top-ops
tables each profiled rank left, read back for `orch profile`, and the table's one format."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.contract import PROFILE_DIR, attempt_dir_name, attempt_number, rank_of_file
from orchestrator.storage.rundir import RunDir, join_url, url_to_fs


def read_top_ops(run: RunDir) -> dict[int, dict[int, dict[str, Any]]]:
    """{attempt: {rank: its top_ops.json}} for every profiled attempt and rank."""
    fs, root = url_to_fs(run.child(PROFILE_DIR))
    found: dict[int, dict[int, dict[str, Any]]] = {}
    try:
        folders = fs.ls(root, detail=False)
    except FileNotFoundError:
        return found
    for folder in folders:
        attempt = attempt_number(folder.rstrip("/").rsplit("/", 1)[-1])
        if attempt is None:
            continue
        for path in fs.ls(folder, detail=False):
            name = path.rsplit("/", 1)[-1]
            rank = rank_of_file(name)
            if rank is None or not name.endswith(".top_ops.json"):
                continue
            with fs.open(path, "rb") as fh:
                found.setdefault(attempt, {})[rank] = json.loads(fh.read())
    return found


def trace_folder(run: RunDir, attempt: int) -> str:
    return join_url(run.url, PROFILE_DIR, attempt_dir_name(attempt))


def format_top_ops(record: dict[str, Any]) -> str:
    """A top-ops record as a table: per op, calls and time per profiled step."""
    steps = max(1, int(record.get("steps") or 1))
    total = float(record.get("total_self_cpu_us") or 0) or sum(r["self_cpu_us"] for r in record["ops"]) or 1.0
    head = f"{'OP':44} {'CALLS/STEP':>10} {'SELF CPU/STEP':>14} {'% CPU':>6} {'TOTAL/STEP':>11}"
    lines = [f"{head} {'DEVICE/STEP':>12}"]
    for r in record["ops"]:
        lines.append(
            f"{r['name'][:44]:44} {r['calls'] / steps:>10.1f} {_ms(r['self_cpu_us'] / steps):>14}"
            f" {100 * r['self_cpu_us'] / total:>5.1f}% {_ms(r['cpu_total_us'] / steps):>11}"
            f" {_ms(r['self_device_us'] / steps):>12}"
        )
    return "\n".join(lines)


def _ms(us: float) -> str:
    return f"{us / 1000:.3f} ms"
