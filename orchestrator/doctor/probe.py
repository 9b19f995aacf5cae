"""`orch doctor --probe` on Slurm, from the login node: one short job on the requested shape
(srun: one task per node, the config's partition, account, QOS, GPUs and extra flags, its setup
lines) runs probe_node.py on every node. Each node's findings come back on srun's output, not
through the storage, so a run directory the nodes cannot see is reported, not silently lost;
the login node then looks for the file each node wrote (the storage shared both ways). The nodes'
connection test proves itself with a random token this side gives srun's environment
(probe_link.ENV_PROBE_TOKEN), never its command line: the job id is no secret."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from typing import Any

from orchestrator.doctor.check import Check, Status, fail, ok
from orchestrator.doctor.probe_link import ENV_PROBE_TOKEN, new_token
from orchestrator.doctor.probe_node import PREFIX
from orchestrator.spec.config import ClusterConfig
from orchestrator.storage.rundir import join_url, this_host, url_to_fs

AREA = "probe"
PROBE_MINUTES = 5  # the probe job's own time limit
# sbatch flags that make no sense for (or would hold) a probe run with srun.
_SBATCH_ONLY = frozenset(
    {
        "begin", "dependency", "hold", "get-user-env", "kill-on-invalid-dep", "requeue", "no-requeue",
        "array", "mail-type", "mail-user", "parsable", "wait", "test-only", "export-file", "ignore-pbs",
        "deadline", "chdir", "open-mode",
    }
)  # fmt: skip
# What a healthy node's one line says (the probe's other checks are implied by its report).
_SUMMARY = ("python", "torch devices", "MASTER_ADDR:MASTER_PORT")
_TASK_ERROR = re.compile(r"srun: error: (\S+): tasks? ([\d,-]+): (.*)")
# srun names its job when it has to wait for it ("srun: job 42 queued and waiting for resources").
_JOB_ID = re.compile(r"srun: (?:job|Granted job allocation) (\d+)")


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
    # sbatch's own scheduling flags would make the probe wait or srun refuse it; the rest
    # (constraints, exclusivity, reservations, ...) shape the allocation as for the run.
    argv.extend(f for f in slurm.extra_flags if f[2:].partition("=")[0] not in _SBATCH_ONLY)
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
        proc = _run_probe(argv, timeout_s, {**os.environ, ENV_PROBE_TOKEN: new_token()})
        return _read(config, proc, fs, path, time.monotonic() - started, timeout_s)
    finally:
        _remove(fs, path)  # after reading: the nodes' files are part of what is checked


def _run_probe(argv: list[str], timeout_s: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """srun with `env` (it passes it on to the nodes), bounded: past the limit it is asked to
    stop (SIGTERM: srun cancels its job, queued or running), and whatever the nodes printed so
    far is kept. returncode 124: timed out."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        job = _JOB_ID.search(err or "")
        if job:  # srun gone before its job: make sure no allocation is left behind
            subprocess.run(["scancel", "--", job.group(1)], capture_output=True, timeout=30, check=False)
        return subprocess.CompletedProcess(argv, 124, out or "", err or "")


def parse_probe_output(
    stdout: str, stderr: str
) -> tuple[dict[int, Any], dict[int, tuple[str, str]], dict[int, list[str]]]:
    """srun --label's output put back together: each task's report (or the text that did not
    parse, as a str), srun's own per-task errors (node, what it said), each task's stderr."""
    pieces: dict[int, dict[int, str]] = {}
    counts: dict[int, int] = {}
    for line in stdout.splitlines():
        label, _, text = line.partition(": ")
        if not (label.strip().isdigit() and text.startswith(PREFIX)):
            continue
        head, _, body = text[len(PREFIX) :].partition(" ")
        index, _, count = head.partition("/")
        if not (index.isdigit() and count.isdigit()):
            continue
        task = int(label)
        pieces.setdefault(task, {})[int(index)] = body
        counts[task] = int(count)
    reports: dict[int, Any] = {}
    for task, got in pieces.items():
        text = "".join(got.get(i, "") for i in range(counts[task]))
        if len(got) < counts[task]:
            reports[task] = f"its report was cut short ({len(got)} of {counts[task]} pieces)"
            continue
        try:
            reports[task] = json.loads(text)
        except json.JSONDecodeError as exc:
            reports[task] = f"its report does not parse: {exc}"
    errors: dict[int, tuple[str, str]] = {}
    by_task: dict[int, list[str]] = {}
    for line in stderr.splitlines():
        m = _TASK_ERROR.match(line)
        if m:
            for task in _tasks(m.group(2)):
                errors[task] = (m.group(1), m.group(3))
            continue
        label, _, text = line.partition(": ")
        if label.strip().isdigit():
            by_task.setdefault(int(label), []).append(text)
    return reports, errors, by_task


def _read(
    config: ClusterConfig,
    proc: subprocess.CompletedProcess,
    fs: Any,
    path: str,
    took: float,
    timeout_s: float,
) -> list[Check]:
    reports, errors, stderr_by_task = parse_probe_output(proc.stdout, proc.stderr)
    nodes = config.resources.nodes
    timed_out = proc.returncode == 124
    if not reports and not errors:
        if timed_out:
            return [
                fail(
                    AREA,
                    "probe job",
                    f"no node reported within {timeout_s:g}s (still queued, or its nodes hang); the job"
                    " was cancelled",
                    "look at `squeue`/`sinfo` for why it waits; raise --probe-timeout on a busy cluster",
                )
            ]
        said = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:300]
        return [
            fail(
                AREA,
                "probe job",
                f"srun did not run the probe: {said}",
                "the same request is what `orch submit` would make: see the slurm checks above",
            )
        ]
    checks: list[Check] = []
    for task in range(nodes):
        report = reports.get(task)
        if not isinstance(report, dict):
            node, said = errors.get(task, (f"of task {task}", "no report"))
            if isinstance(report, str):
                what, fix = report, "run `orch doctor --probe` again; if it repeats, report it"
            elif timed_out and task not in errors:
                what, fix = f"no report within {timeout_s:g}s", "the node hangs or starts slowly: look at it"
            else:
                what = f"the probe did not run: {(stderr_by_task.get(task) or [said])[-1][:300]}"
                fix = (
                    "the job's Python (job.python, or the interpreter running orch) and the orchestrator"
                    " must be installed at the same path on every node, e.g. a venv on shared storage"
                )
            checks.append(fail(AREA, f"node {node}", what, fix))
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
    summary = (
        f"{sum(isinstance(r, dict) for r in reports.values())} of {nodes} node(s) reported in {took:.1f}s"
    )
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
