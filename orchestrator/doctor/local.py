"""The local backend's needs: free ports for MASTER_PORT, and cores for the ranks asked."""

from __future__ import annotations

import os

from orchestrator.doctor.check import Check, fail, ok, warn
from orchestrator.spec.config import ClusterConfig

AREA = "local"


def local_checks(config: ClusterConfig) -> list[Check]:
    return [_ports(config), _cores(config)]


def _ports(config: ClusterConfig) -> Check:
    from orchestrator.launch.ports import PORT_RANGE, lease_port

    fixed = config.distributed.master_port if isinstance(config.distributed.master_port, int) else None
    try:
        with lease_port(fixed) as lease:
            port = lease.port
    except OSError as exc:
        where = (
            f"port {fixed} (distributed.master_port)" if fixed else f"ports {PORT_RANGE[0]}-{PORT_RANGE[1]}"
        )
        return fail(
            AREA,
            "MASTER_PORT",
            f"no free port: {where}: {exc}",
            "set distributed.master_port: auto" if fixed else "stop what holds the ports, or free some",
        )
    what = (
        f"port {port} is free" if fixed else f"a free port in {PORT_RANGE[0]}-{PORT_RANGE[1]} (e.g. {port})"
    )
    return ok(AREA, "MASTER_PORT", what)


def _cores(config: ClusterConfig) -> Check:
    res = config.resources
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    asked = res.world_size * res.cpus_per_rank
    what = (
        f"{asked} asked ({res.world_size} rank(s) x {res.cpus_per_rank} cpus_per_rank), {cores} core(s) here"
    )
    if asked > 4 * cores:
        return fail(
            AREA,
            "cores",
            what,
            "lower resources.nodes, ranks_per_node or cpus_per_rank: ranks this oversubscribed"
            " time out in collectives",
        )
    if asked > cores:
        return warn(
            AREA,
            "cores",
            what,
            "ranks will share cores (slower, and step times vary); lower cpus_per_rank or the rank count",
        )
    return ok(AREA, "cores", what)
