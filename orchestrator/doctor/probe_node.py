"""`orch doctor --probe`, on each node of the probe's allocation (one task per node, started
by srun from the login node): what this node makes of the run's setup, as JSON on stdout, which
srun carries back to the login node, so nothing here depends on the storage being shared.
slurmstepd forwards output in pieces of at most 1024 bytes, each labelled on its own: the
report goes out in numbered pieces well under that (`ORCH-PROBE i/n <text>`), which the login
node puts back together per task. Imports only the stdlib until it checks the storage, the
orchestrator's runtime and torch.

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
PIECE = 600  # characters of JSON per output line: far under slurmstepd's 1024-byte messages
# The probe's MASTER_PORT: candidates derived from the job id, which every node knows, so no node
# has to tell another anything first; the first node listens on the first free one and the others
# try them in turn, each connection proving itself with the job id.
PORT_BASE, PORT_SPAN, PORT_TRIES = 20000, 12000, 8
CONNECT_S = 45.0  # how long other nodes keep trying (the first node may still be importing)


def _check(name: str, status: str, detail: str, fix: str | None = None) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail[:500], "fix": fix}


def master_of(env: dict[str, str]) -> tuple[str, list[int]]:
    """MASTER_ADDR (the first node, as the real run's) and the probe's candidate ports."""
    from orchestrator.backends.slurm.hostlist import expand_hostlist

    hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost")
    first = int(env.get("SLURM_JOB_ID", "0")) % PORT_SPAN
    return hosts[0], [PORT_BASE + (first + i * 997) % PORT_SPAN for i in range(PORT_TRIES)]


def _listen(ports: list[int], expected: int, token: str, seen: list[str]) -> tuple[threading.Thread, int]:
    server, busy = None, []
    for port in ports:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(("", port))
            break
        except OSError:
            server.close()
            busy.append(port)
            server = None
    if server is None:
        raise OSError(f"ports {', '.join(map(str, busy))} are all in use")
    server.listen(64)
    server.settimeout(CONNECT_S + 15)

    def accept() -> None:
        try:
            while len(seen) < expected:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(5)
                    hello = conn.recv(256).decode(errors="replace")
                    if hello.startswith(token):
                        seen.append(hello[len(token) :])
                        conn.sendall(token.encode())
        except OSError:
            pass
        finally:
            server.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread, port


def _reach(host: str, ports: list[int], token: str, me: str) -> tuple[int | None, str]:
    """The candidate port of the first node that answered with the token, or why none did."""
    deadline = time.monotonic() + CONNECT_S
    last = "no answer"
    while time.monotonic() < deadline:
        for port in ports:
            try:
                with socket.create_connection((host, port), timeout=3) as conn:
                    conn.settimeout(5)
                    conn.sendall(f"{token}{me}".encode())
                    if conn.recv(64).decode(errors="replace") == token:
                        return port, ""
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    return None, last


def probe(probe_dir: str, gpus_per_node: int, env: dict[str, str]) -> dict[str, Any]:
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    task = int(env.get("SLURM_PROCID", "0"))
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    checks = [_check("python", "ok", f"{platform.python_version()} at {sys.executable}")]
    host, ports = master_of(env)
    token = f"orch-probe {env.get('SLURM_JOB_ID', '0')} "
    listener, seen, bound = None, [], None
    if task == 0:
        try:
            listener, bound = _listen(ports, ntasks - 1, token, seen)
        except OSError as exc:
            checks.append(
                _check(
                    "MASTER_ADDR:MASTER_PORT",
                    "warn",
                    f"cannot listen: {exc}",
                    "free some ports in 20000-32000",
                )
            )
    checks.append(_runtime())
    checks.extend(_storage(probe_dir, node, task))
    checks.append(_torch(gpus_per_node, env))
    if task == 0 and listener is not None:
        listener.join(CONNECT_S + 15)
        missing = ntasks - 1 - len(seen)
        detail = f"{host}:{bound} listened; {len(seen)} of {ntasks - 1} other node(s) reached it"
        status, fix = ("ok", None) if missing <= 0 else ("warn", "see the other nodes' lines")
        checks.append(_check("MASTER_ADDR:MASTER_PORT", status, detail, fix))
    elif task != 0:
        port, why = _reach(host, ports, token, node)
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
    report = probe(args[0], int(args[1]), dict(os.environ))
    for line in pieces(report):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
