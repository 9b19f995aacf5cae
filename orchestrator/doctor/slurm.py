"""The Slurm backend's needs, asked of the scheduler from the login node: its commands, the
controller, the partition (up, big enough, long enough, GPUs), the account and QOS, and
accounting (without it `orch status` cannot tell what became of a job that left the queue)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from orchestrator.doctor.check import Check, fail, ok, warn
from orchestrator.spec.config import ClusterConfig

AREA = "slurm"
COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scontrol", "sinfo", "scancel")
QUERY_S = 10.0  # each scheduler query's limit: a controller that does not answer is a finding


@dataclass(frozen=True)
class Answer:
    code: int
    out: str
    err: str

    @property
    def said(self) -> str:
        text = (self.err or self.out).strip()
        return text.splitlines()[0][:300] if text else f"exit code {self.code}"


def query(*argv: str) -> Answer:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=QUERY_S)
    except FileNotFoundError:
        return Answer(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Answer(124, "", f"{argv[0]} did not answer within {QUERY_S:g}s")
    return Answer(proc.returncode, proc.stdout, proc.stderr)


def slurm_checks(config: ClusterConfig) -> list[Check]:
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return [
            fail(
                AREA,
                "commands",
                f"not found: {', '.join(missing)}",
                "run orch on a Slurm login node (with the Slurm client commands on PATH and SLURM_CONF set)",
            )
        ]
    checks = [ok(AREA, "commands", ", ".join(COMMANDS) + " found")]
    ping = query("scontrol", "ping")
    if ping.code != 0 or " is UP" not in ping.out:
        return checks + [
            fail(
                AREA,
                "controller",
                f"slurmctld does not answer: {ping.said}",
                "check SLURM_CONF and that slurmctld runs",
            )
        ]
    checks.append(ok(AREA, "controller", ping.out.strip().splitlines()[0]))
    accounting = query("sacct", "-n", "-X", "-S", "now", "-o", "JobID")
    if accounting.code == 124:  # slow, not off: a busy slurmdbd
        checks.append(
            warn(
                AREA,
                "accounting",
                accounting.said,
                "sacct is slow here: `orch status` may lag behind the scheduler",
            )
        )
    elif accounting.code != 0:
        checks.append(
            fail(
                AREA,
                "accounting",
                f"sacct fails: {accounting.said}",
                "ask the admins to enable accounting (slurmdbd, AccountingStorageType): without it a job's"
                " end state is unknown once it leaves the queue, and `orch status` cannot tell",
            )
        )
    else:
        checks.append(ok(AREA, "accounting", "sacct answers (job states are known after jobs end)"))
    checks.extend(partition_checks(config))
    if config.slurm.account:
        checks.append(_account(config.slurm.account, accounting.code == 0))
    if config.slurm.qos:
        checks.append(_qos(config, accounting.code == 0))
    return checks


# ---------------------------------------------------------------------------- partition


def parse_fields(line: str) -> dict[str, str]:
    """`scontrol show ... -o`'s one line as {key: value}."""
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def slurm_minutes(text: str) -> int | None:
    """A Slurm time (`30`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`) in minutes; None: no limit."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts
    total = (int(days or 0) * 24 + hours) * 60 + minutes
    return total + (1 if seconds else 0)


def _unlimited(value: str) -> bool:
    return value.upper() in ("UNLIMITED", "INFINITE", "ALL", "")


def partition_checks(config: ClusterConfig) -> list[Check]:
    name = config.slurm.partition
    # --all: hidden partitions too (a user may be allowed on one that `sinfo` does not list).
    shown = query("scontrol", "--all", "--oneliner", "show", "partition")
    if shown.code != 0:
        return [fail(AREA, "partition", f"scontrol show partition: {shown.said}", "check the controller")]
    partitions = {
        p["PartitionName"]: p for p in map(parse_fields, shown.out.splitlines()) if "PartitionName" in p
    }
    if name is None:
        default = next((n for n, p in partitions.items() if p.get("Default") == "YES"), None)
        if default is None:
            return [
                fail(
                    AREA,
                    "partition",
                    "slurm.partition is not set and the cluster has no default partition",
                    f"set slurm.partition (partitions: {', '.join(sorted(partitions))})",
                )
            ]
        name, label = default, f"{default} (the default)"
    else:
        label = name
    if name not in partitions:
        return [
            fail(
                AREA,
                "partition",
                f"slurm.partition: no partition {name!r} on this cluster",
                f"set slurm.partition to one of: {', '.join(sorted(partitions)) or '(none)'}",
            )
        ]
    p = partitions[name]
    res = config.resources
    problems: list[tuple[str, str]] = []
    if p.get("State", "UP") != "UP":
        problems.append((f"partition {name} is {p.get('State')}", "pick a partition that is UP"))
    total = int(p.get("TotalNodes", "0") or 0)
    max_nodes = p.get("MaxNodes", "UNLIMITED")
    if res.nodes > total:
        problems.append(
            (f"resources.nodes {res.nodes}: partition {name} has {total} node(s)", "lower resources.nodes")
        )
    elif not _unlimited(max_nodes) and res.nodes > int(max_nodes):
        problems.append(
            (
                f"resources.nodes {res.nodes}: partition {name} allows at most {max_nodes} per job",
                "lower resources.nodes",
            )
        )
    max_time = slurm_minutes(p.get("MaxTime", "UNLIMITED"))
    asked = res.time_limit_minutes
    if max_time is not None and asked is not None and asked > max_time:
        problems.append(
            (
                f"resources.time_limit {res.time_limit} ({asked} min) is over partition {name}'s MaxTime"
                f" {p.get('MaxTime')} ({max_time} min)",
                f"set resources.time_limit to at most {p.get('MaxTime')},"
                " or use a partition with a longer limit",
            )
        )
    if max_time is not None and asked is None:
        problems.append(
            (
                f"resources.time_limit is not set; partition {name}'s MaxTime is {p.get('MaxTime')}",
                "set resources.time_limit, so the warning before the limit (slurm.signal_lead_s)"
                " comes in time",
            )
        )
    for allow, deny, value, what in (
        ("AllowAccounts", "DenyAccounts", config.slurm.account, "slurm.account"),
        ("AllowQos", "DenyQos", config.slurm.qos, "slurm.qos"),
    ):
        allowed, denied = p.get(allow, "ALL"), p.get(deny, "")
        # Slurm keeps account and QOS names in lower case.
        if value and not _unlimited(allowed) and value.lower() not in allowed.lower().split(","):
            problems.append(
                (
                    f"{what} {value!r} is not allowed on partition {name} ({allow}={allowed})",
                    f"use one of: {allowed}",
                )
            )
        if value and denied and value.lower() in denied.lower().split(","):
            problems.append(
                (f"{what} {value!r} is denied on partition {name} ({deny}={denied})", f"use another {what}")
            )
    checks = []
    fatal = [pr for pr in problems if "is not set" not in pr[0]]
    if fatal:
        checks.extend(fail(AREA, "partition", what, fix) for what, fix in fatal)
    else:
        limit = p.get("MaxTime", "UNLIMITED")
        checks.append(
            ok(AREA, "partition", f"{label}: UP, {total} node(s), MaxTime {limit}, {res.nodes} node(s) asked")
        )
    checks.extend(warn(AREA, "time limit", what, fix) for what, fix in problems if "is not set" in what)
    if res.gpus_per_node:
        checks.append(_gpus(name, res.gpus_per_node, res.nodes))
    return checks


def _gpus(partition: str, per_node: int, nodes: int) -> Check:
    # (-p names the partition: sinfo shows it even if hidden; it refuses -p with --all)
    shown = query("sinfo", "-h", "-N", "-p", partition, "-o", "%N %G")
    if shown.code != 0:
        return fail(AREA, "GPUs", f"sinfo: {shown.said}", "check the controller")
    counts: dict[str, int] = {}
    for line in shown.out.splitlines():
        node, _, gres = line.partition(" ")
        found = re.findall(r"gpu(?::[\w.-]+)?:(\d+)", gres)
        counts[node] = max([int(n) for n in found] or [0])
    enough = [n for n, c in counts.items() if c >= per_node]
    what = (
        f"{per_node} per node asked on {nodes} node(s); {len(enough)} node(s) of {partition} have that many"
    )
    if len(enough) < nodes:
        most = max(counts.values() or [0])
        return fail(
            AREA,
            "GPUs",
            what + f" (the most on one node: {most})",
            "lower resources.gpus_per_node or resources.nodes, or pick a GPU partition",
        )
    return ok(AREA, "GPUs", what)


# ---------------------------------------------------------------------------- account, QOS


def _account(account: str, accounting: bool) -> Check:
    if not accounting:
        return warn(
            AREA,
            "account",
            f"slurm.account {account!r}: cannot be checked without accounting",
            "ask the admins",
        )
    import getpass

    user = getpass.getuser()
    shown = query(
        "sacctmgr", "-n", "-P", "show", "assoc", f"account={account}", f"user={user}", "format=account,user"
    )
    if shown.code != 0:
        return warn(AREA, "account", f"sacctmgr: {shown.said}", "check the account with your admins")
    if not shown.out.strip():
        return fail(
            AREA,
            "account",
            f"slurm.account: no association of user {user} with account {account!r}",
            "set slurm.account to one of yours (`sacctmgr show assoc user=$USER format=account`)",
        )
    return ok(AREA, "account", f"{account} exists")


def _qos(config: ClusterConfig, accounting: bool) -> Check:
    qos = config.slurm.qos
    assert qos is not None
    if not accounting:
        return warn(AREA, "QOS", f"slurm.qos {qos!r}: cannot be checked without accounting", "ask the admins")
    shown = query("sacctmgr", "-n", "-P", "show", "qos", qos, "format=name,maxwall")
    if shown.code != 0:
        return warn(AREA, "QOS", f"sacctmgr: {shown.said}", "check the QOS with your admins")
    rows = [line.split("|") for line in shown.out.splitlines() if line.strip()]
    row = next((r for r in rows if r and r[0] == qos), None)
    if row is None:
        return fail(
            AREA,
            "QOS",
            f"slurm.qos: no QOS {qos!r} on this cluster",
            "set slurm.qos to one that exists (`sacctmgr show qos`)",
        )
    max_wall = slurm_minutes(row[1]) if len(row) > 1 else None
    asked = config.resources.time_limit_minutes
    if max_wall is not None and asked is not None and asked > max_wall:
        return fail(
            AREA,
            "QOS",
            f"resources.time_limit {config.resources.time_limit} is over QOS {qos}'s MaxWall {row[1]}",
            f"set resources.time_limit to at most {row[1]}",
        )
    return ok(AREA, "QOS", f"{qos} exists" + (f", MaxWall {row[1]}" if max_wall is not None else ""))
