"""`orch doctor --probe`, on each node of the probe's allocation (one task per node, started
by srun from the login node): what this node makes of the run's setup, as one line of JSON on
stdout (`ORCH-PROBE {...}`), which srun carries back to the login node, so nothing here depends
on the storage being shared. Imports only the stdlib until it checks torch and the storage.

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

PREFIX = "ORCH-PROBE "
PORT_BASE, PORT_SPAN = 20000, 12000  # MASTER_PORT for the probe: from the job id, as every node can compute
CONNECT_S = 45.0  # how long other nodes try to reach MASTER_ADDR:MASTER_PORT (the first node's start-up)


def _check(name: str, status: str, detail: str, fix: str | None = None) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, "fix": fix}


def master_of(env: dict[str, str]) -> tuple[str, int]:
    from orchestrator.backends.slurm.hostlist import expand_hostlist

    hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost")
    return hosts[0], PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % PORT_SPAN


def _listen(port: int, expected: int, seen: list[str]) -> threading.Thread:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("", port))
    server.listen(64)
    server.settimeout(CONNECT_S + 15)

    def accept() -> None:
        try:
            while len(seen) < expected:
                conn, _ = server.accept()
                with conn:
                    seen.append(conn.recv(256).decode(errors="replace"))
                    conn.sendall(b"ok")
        except OSError:
            pass
        finally:
            server.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def _reach(host: str, port: int, me: str) -> str | None:
    """None when MASTER_ADDR:MASTER_PORT answered, else why not."""
    deadline = time.monotonic() + CONNECT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=5) as conn:
                conn.sendall(me.encode())
                if conn.recv(16) == b"ok":
                    return None
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    return last


def probe(probe_dir: str, gpus_per_node: int, env: dict[str, str]) -> dict[str, Any]:
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    task = int(env.get("SLURM_PROCID", "0"))
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    checks = [
        _check("python", "ok", f"{platform.python_version()} at {sys.executable}"),
        _check(
            "orchestrator",
            "ok",
            f"imports from {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}",
        ),
    ]
    host, port = master_of(env)
    listener = None
    seen: list[str] = []
    if task == 0:
        try:
            listener = _listen(port, ntasks - 1, seen)
        except OSError as exc:
            checks.append(
                _check(
                    "MASTER_PORT",
                    "fail",
                    f"cannot listen on {port}: {exc}",
                    "free the port range 20000-32000 on the nodes",
                )
            )
    checks.extend(_storage(probe_dir, node, task))
    checks.append(_torch(gpus_per_node, env))
    if task == 0:
        if listener is not None:
            listener.join(CONNECT_S + 15)
            missing = ntasks - 1 - len(seen)
            detail = f"{host}:{port} listened; {len(seen)} of {ntasks - 1} other node(s) reached it"
            checks.append(
                _check(
                    "MASTER_ADDR:MASTER_PORT",
                    "ok" if missing <= 0 else "warn",
                    detail,
                    None if missing <= 0 else "see the other nodes' lines",
                )
            )
    else:
        why = _reach(host, port, node)
        checks.append(
            _check("MASTER_ADDR:MASTER_PORT", "ok", f"reached {host}:{port}")
            if why is None
            else _check(
                "MASTER_ADDR:MASTER_PORT",
                "fail",
                f"cannot reach {host}:{port}: {why}",
                "the nodes must reach each other on TCP ports 20000-32000 (firewall, name resolution)",
            )
        )
    return {"node": node, "task": task, "checks": checks}


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
                f"{probe_dir}: {type(exc).__name__}: {exc}"[:400],
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
                f"{type(exc).__name__}: {exc}"[:400],
                "make storage.root writable from the nodes",
            )
        )
    return checks


def _torch(gpus_per_node: int, env: dict[str, str]) -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        return _check(
            "torch", "fail", f"cannot import torch: {exc}", "install torch into the job's Python on the nodes"
        )
    visible = env.get("CUDA_VISIBLE_DEVICES")
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    report = probe(args[0], int(args[1]), dict(os.environ))
    print(PREFIX + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
