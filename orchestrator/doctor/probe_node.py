"""`orch doctor --probe`, on each node of the probe's allocation (one task per node, started
by srun from the login node): what this node makes of the run's setup, as JSON on stdout, which
srun carries back to the login node, so nothing here depends on the storage being shared.
slurmstepd forwards output in pieces of at most 1024 bytes, each labelled on its own: the
report goes out in numbered pieces well under that (`ORCH-PROBE i/n <text>`), which the login
node puts back together per task. Imports only the stdlib until it checks the storage, the
orchestrator's runtime and torch. The connection test between the nodes (probe_link.py) proves
itself with the token the login node gave srun's environment (ENV_PROBE_TOKEN), which this
process removes from its own environment before it imports or starts anything.

    python -m orchestrator.doctor.probe_node PROBE_DIR GPUS_PER_NODE
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import threading
import time
from typing import Any

from orchestrator.doctor.probe_link import CONNECT_S, ENV_PROBE_TOKEN, ProbeListener, candidate_ports, reach

PREFIX = "ORCH-PROBE "
PIECE = 600  # characters of JSON per output line: far under slurmstepd's 1024-byte messages


def _check(name: str, status: str, detail: str, fix: str | None = None) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail[:500], "fix": fix}


def master_of(env: dict[str, str]) -> str:
    """MASTER_ADDR: the first node, as the real run's."""
    from orchestrator.backends.slurm.hostlist import expand_hostlist

    return expand_hostlist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost")[0]


def _listen(host: str, ports: list[int], token: str, expected: int) -> tuple[ProbeListener, threading.Thread]:
    """The first node's listener, where MASTER_ADDR resolves here, serving in a thread."""
    from orchestrator.backends.slurm.channel import listen_address

    listener = ProbeListener(listen_address(host), ports, token, expected)
    return listener, listener.start(CONNECT_S + 15)


def probe(probe_dir: str, gpus_per_node: int, env: dict[str, str]) -> dict[str, Any]:
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    task = int(env.get("SLURM_PROCID", "0"))
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    checks = [_check("python", "ok", f"{platform.python_version()} at {sys.executable}")]
    host = master_of(env)
    token = env.get(ENV_PROBE_TOKEN, "")
    ports = candidate_ports(token)
    listener, thread = None, None
    if not token:
        checks.append(
            _check(
                "MASTER_ADDR:MASTER_PORT",
                "warn",
                f"not tested: no {ENV_PROBE_TOKEN} in the environment (srun did not pass it on)",
                "let srun pass the environment on (no --export=NONE in slurm.extra_flags)",
            )
        )
    elif task == 0:
        try:
            listener, thread = _listen(host, ports, token, ntasks - 1)
        except OSError as exc:
            checks.append(
                _check(
                    "MASTER_ADDR:MASTER_PORT",
                    "warn",
                    f"cannot listen on {host}: {exc}",
                    "free some ports in 20000-32000, and make MASTER_ADDR resolve to an address of this node",
                )
            )
    checks.append(_runtime())
    checks.extend(_storage(probe_dir, node, task))
    checks.append(_torch(gpus_per_node, env))
    if listener is not None and thread is not None:
        thread.join(CONNECT_S + 15)
        reached = sorted(listener.reached)
        detail = (
            f"{host}:{listener.port} listened; {len(reached)} of {ntasks - 1} other node(s) reached it"
            + (f" ({', '.join(reached)})" if reached else "")
        )
        status, fix = ("ok", None) if len(reached) >= ntasks - 1 else ("warn", "see the other nodes' lines")
        checks.append(_check("MASTER_ADDR:MASTER_PORT", status, detail, fix))
    elif token and task != 0:
        port, why = reach(host, ports, token, node)
        checks.append(
            _check("MASTER_ADDR:MASTER_PORT", "ok", f"reached {host}:{port}")
            if port is not None
            else _check(
                "MASTER_ADDR:MASTER_PORT",
                "fail",
                f"cannot reach {host} on any of ports {', '.join(map(str, ports))}: {why}",
                "the nodes must reach each other on TCP ports 20000-32000 (firewall, name resolution)",
            )
        )
    return {"node": node, "task": task, "checks": checks}


def _runtime() -> dict[str, Any]:
    """What every rank imports: the orchestrator's runtime (and with it torch)."""
    try:
        import orchestrator.runtime as runtime
    except Exception as exc:  # noqa: BLE001 - an ImportError, a broken CUDA library (OSError)...
        return _check(
            "orchestrator",
            "fail",
            f"cannot import orchestrator.runtime: {type(exc).__name__}: {exc}",
            "install the orchestrator and torch into the job's Python on the nodes",
        )
    return _check(
        "orchestrator", "ok", f"orchestrator.runtime imports from {runtime.__file__.rsplit('/', 2)[0]}"
    )


def _storage(probe_dir: str, node: str, task: int) -> list[dict[str, Any]]:
    """The run directory as this node sees it: the login node's marker readable (the same
    storage), and a file of this node's written there (the login node looks for it)."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(probe_dir)
        marker = json.loads(fs.cat_file(f"{path}/login.json"))
    except FileNotFoundError:
        return [
            _check(
                "run directory",
                "fail",
                f"{probe_dir} is not visible here (the login node's marker is missing): not shared"
                " with this node",
                "set storage.root to a filesystem (or object store) that the login node and every node share",
            )
        ]
    except Exception as exc:  # noqa: BLE001 - credentials, client errors: one line
        return [
            _check(
                "run directory",
                "fail",
                f"{probe_dir}: {type(exc).__name__}: {exc}",
                "check the storage from the nodes",
            )
        ]
    checks = [_check("run directory", "ok", f"visible ({probe_dir}, written by {marker.get('host')})")]
    try:
        fs.pipe_file(f"{path}/node-{task}.json", json.dumps({"node": node, "time": time.time()}).encode())
        checks.append(_check("run directory writable", "ok", "a file written"))
    except Exception as exc:  # noqa: BLE001
        checks.append(
            _check(
                "run directory writable",
                "fail",
                f"{type(exc).__name__}: {exc}",
                "make storage.root writable from the nodes",
            )
        )
    return checks


def _torch(gpus_per_node: int, env: dict[str, str]) -> dict[str, Any]:
    try:
        import torch

        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # noqa: BLE001 - not installed, or a CUDA library that does not load
        return _check(
            "torch",
            "fail",
            f"{type(exc).__name__}: {exc}",
            "install torch into the job's Python on the nodes",
        )
    visible = env.get("CUDA_VISIBLE_DEVICES")
    detail = f"torch {torch.__version__}, {seen} CUDA device(s) (CUDA_VISIBLE_DEVICES={visible})"
    if gpus_per_node and seen < gpus_per_node:
        return _check(
            "torch devices",
            "fail",
            detail + f"; {gpus_per_node} asked",
            "a CUDA build of torch that matches the nodes' driver (a CPU wheel sees none),"
            " and resources.gpus_per_node",
        )
    return _check("torch devices", "ok", detail)


def pieces(report: dict[str, Any]) -> list[str]:
    """The report as output lines: `ORCH-PROBE i/n <piece of its JSON>`."""
    text = json.dumps(report)
    parts = [text[i : i + PIECE] for i in range(0, len(text), PIECE)] or [""]
    return [f"{PREFIX}{i}/{len(parts)} {part}" for i, part in enumerate(parts)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    env = dict(os.environ)
    os.environ.pop(ENV_PROBE_TOKEN, None)  # the probe's, not for what it imports or starts
    report = probe(args[0], int(args[1]), env)
    for line in pieces(report):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
