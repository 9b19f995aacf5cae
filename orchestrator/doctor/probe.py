"""`orch doctor --probe` on Slurm, from the login node: one short job on the requested shape
(srun: one task per node, the config's partition, account, QOS, GPUs and extra flags, its setup
lines) runs probe_node.py on every node. Each node's findings come back on srun's output, not
through the storage, so a run directory the nodes cannot see is reported, not silently lost;
the login node then looks for the file each node wrote (the storage shared both ways)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import uuid
from typing import Any

from orchestrator.doctor.check import Check, Status, fail, ok
from orchestrator.doctor.probe_node import PREFIX
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.rundir import join_url, this_host, url_to_fs

AREA = "probe"
PROBE_MINUTES = 5  # the probe job's own time limit
# What a healthy node's one line says (the probe's other checks are implied by its report).
_SUMMARY = ("python", "torch devices", "MASTER_ADDR:MASTER_PORT")
_TASK_ERROR = re.compile(r"srun: error: (\S+): tasks? ([\d,-]+): (.*)")


def probe_argv(config: ClusterConfig, python: str, probe_dir: str) -> list[str]:
    res, slurm = config.resources, config.slurm
    minutes = min(PROBE_MINUTES, res.time_limit_minutes or PROBE_MINUTES)
    argv = [
        "srun",
        f"--nodes={res.nodes}",
        "--ntasks-per-node=1",
        "--job-name=orch-doctor",
        f"--time={minutes}",
        "--label",
        "--kill-on-bad-exit=0",
    ]
    if res.gpus_per_node:
        argv.append(f"--gres=gpu:{res.gpus_per_node}")
    for key in ("partition", "account", "qos"):
        value = getattr(slurm, key)
        if value:
            argv.append(f"--{key}={value}")
    argv.extend(slurm.extra_flags)
    command = [python, "-m", "orchestrator.doctor.probe_node", probe_dir, str(res.gpus_per_node)]
    if slurm.setup:  # the batch script runs these before the launch: so does the probe
        script = "\n".join([*slurm.setup, 'exec "$@"'])
        return [*argv, "/bin/bash", "-c", script, "orch-doctor", *command]
    return [*argv, *command]


def probe_checks(config: ClusterConfig, python: str, timeout_s: float) -> list[Check]:
    probe_dir = join_url(config.storage_root, ".orch-doctor", f"probe-{uuid.uuid4().hex[:12]}")
    fs, path = url_to_fs(probe_dir)
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path}/login.json", json.dumps({"host": this_host(), "time": time.time()}).encode())
    except Exception as exc:  # noqa: BLE001 - the storage checks say more
        return [
            fail(
                AREA,
                "probe",
                f"cannot write the probe's marker under {probe_dir}: {exc}",
                "fix storage.root first",
            )
        ]
    argv = probe_argv(config, python, probe_dir)
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        _remove(fs, path)
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        if PREFIX not in out:
            return [
                fail(
                    AREA,
                    "probe job",
                    f"no node reported within {timeout_s:g}s (still queued, or its nodes hang):"
                    f" {shlex.join(argv[:8])} ...",
                    "look at `squeue -n orch-doctor`; raise --probe-timeout on a busy cluster",
                )
            ]
        proc = subprocess.CompletedProcess(argv, 124, out, "")
    try:
        return _read(config, proc, fs, path, time.monotonic() - started)
    finally:
        _remove(fs, path)


def _read(
    config: ClusterConfig, proc: subprocess.CompletedProcess, fs: Any, path: str, took: float
) -> list[Check]:
    reports: dict[int, dict[str, Any]] = {}
    for line in proc.stdout.splitlines():
        label, _, text = line.partition(": ")
        if text.startswith(PREFIX) and label.strip().isdigit():
            reports[int(label)] = json.loads(text[len(PREFIX) :])
    errors: dict[int, tuple[str, str]] = {}  # task -> (node, what srun said)
    stderr_by_task: dict[int, list[str]] = {}
    for line in proc.stderr.splitlines():
        m = _TASK_ERROR.match(line)
        if m:
            for task in _tasks(m.group(2)):
                errors[task] = (m.group(1), m.group(3))
            continue
        label, _, text = line.partition(": ")
        if label.strip().isdigit():
            stderr_by_task.setdefault(int(label), []).append(text)
    checks: list[Check] = []
    nodes = config.resources.nodes
    if not reports and not errors:
        said = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:300]
        return [
            fail(
                AREA,
                "probe job",
                f"srun did not run the probe: {said}",
                "the same request is what `orch submit` would make: see the slurm checks above",
            )
        ]
    for task in range(nodes):
        report = reports.get(task)
        if report is None:
            node, said = errors.get(task, ("?", "no report"))
            last = (stderr_by_task.get(task) or [said])[-1][:300]
            checks.append(
                fail(
                    AREA,
                    f"node {node}",
                    f"the probe did not run: {last}",
                    "the job's Python (job.python, or the interpreter running orch) and the orchestrator"
                    " must be installed at the same path on every node, e.g. a venv on shared storage",
                )
            )
            continue
        node = report["node"]
        if all(c["status"] == "ok" for c in report["checks"]):
            # One line for a node where everything holds: what it found, in short.
            found = "; ".join(c["detail"] for c in report["checks"] if c["name"] in _SUMMARY)
            checks.append(ok(AREA, f"node {node}", found))
        else:
            checks.extend(_as_check(node, c) for c in report["checks"] if c["status"] != "ok")
        if any(c["name"] == "run directory writable" and c["status"] == "ok" for c in report["checks"]):
            if not fs.exists(f"{path}/node-{task}.json"):
                checks.append(
                    fail(
                        AREA,
                        f"node {node}",
                        "its file in the run directory is not visible from the login node",
                        "use storage shared both ways",
                    )
                )
    bad = sum(1 for c in checks if c.status is Status.FAIL)
    summary = f"{len(reports)} of {nodes} node(s) reported in {took:.1f}s"
    checks.insert(
        0,
        ok(AREA, "probe job", summary + ": all ok")
        if not bad
        else Check(
            AREA, "probe job", Status.FAIL, f"{summary}; {bad} problem(s) below", "see each node's line"
        ),
    )
    return checks


def _as_check(node: str, c: dict[str, Any]) -> Check:
    return Check(AREA, f"node {node} {c['name']}", Status(c["status"]), c["detail"], c.get("fix"))


def _tasks(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _remove(fs: Any, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except Exception:  # noqa: BLE001 - best effort: a probe folder left behind is harmless
        pass
