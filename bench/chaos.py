"""Chaos: the example job under seeded random faults, on the local backend and on Slurm.

Each episode runs jobs/train_ddp.py (through tests/jobs/chaos_train.py, which only adds a way
to arm a storage fault in a running attempt) and injects faults from a seeded schedule: each
fault fires once training has passed its step and the previous fault was survived. Then it
checks that nothing was lost:
- the final model digest equals an uninterrupted run's (same config, no faults);
- no process of the run is left (tagged through the environment they all inherit, or naming
  the run directory on their command line);
- no MASTER_PORT lease is still held, nothing is left in the run's private TMPDIR, and no
  temporary, stale or displaced checkpoint directory is left;
- events.jsonl shows each fault's effect (a failure, hang, preemption, requeue or resume) after
  its injection, a later attempt training again, and the run ending succeeded.

    .venv/bin/python bench/chaos.py --seed 1 --minutes 10 --backend both
    .venv/bin/python bench/chaos.py --seed 7 --faults 8 --kinds rank_kill,storage_error

Prints a table per backend (injected, survived, work lost in steps, restart time) and exits 1
if any check failed. Slurm uses the cluster named by SLURM_CONF if `sinfo` answers, else starts
one with scripts/slurm/start.sh (root). tests/integration/test_chaos.py and
tests/slurm/test_slurm_chaos.py run a short schedule of the same driver.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

if __package__:  # imported as bench.chaos (the tests)
    from .slurm_bench import cluster_up, start_cluster
else:  # run as bench/chaos.py: this folder is sys.path[0]
    from slurm_bench import cluster_up, start_cluster

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "tests" / "jobs" / "chaos_train.py"
PRELOAD = [  # what the fork server preloads for jobs/train_ddp.py itself (the wrapper imports none)
    "argparse", "math", "torch.nn", "torch.nn.functional", "torch.utils.data",
    "orchestrator.runtime", "torch._dynamo", "torch.utils.tensorboard",
]  # fmt: skip

# Fault kinds per backend. Preemption on Slurm is its own --signal warning (scancel --signal),
# locally the same signals sent to every rank, as Slurm delivers them to every task.
LOCAL_KINDS = ("rank_kill", "rank_stop", "preempt_term", "preempt_usr2", "supervisor_kill", "storage_error")
SLURM_KINDS = ("rank_kill", "rank_stop", "preempt_signal", "requeue", "storage_error", "supervisor_kill")
# Killing the fork server (local) or a node agent (Slurm): recovery is new (issue 13 point 3).
AGENT_KINDS = {"local": ("forkserver_kill",), "slurm": ("node_agent_kill",)}
STORAGE_FAULTS = (
    "ckpt.file_written:eio",
    "ckpt.file_written:enospc",
    "ckpt.manifest_written:eio",
    "ckpt.before_commit:exit",
)
# The ledger events that show each kind's effect on the attempt it hit.
EFFECTS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "rank_kill": (("attempt_ended", "failed"),),
    "rank_stop": (("hang_detected", None),),
    "preempt_term": (("preempted", None), ("attempt_ended", "preempted")),
    "preempt_usr2": (("preempted", None), ("attempt_ended", "preempted")),
    "preempt_signal": (("preempted", None), ("attempt_ended", "preempted")),
    "requeue": (("preempted", None), ("requeued", None), ("incarnation_ended", None), ("job_started", None)),
    "supervisor_kill": (("resumed", None),),
    "storage_error": (("attempt_ended", "failed"),),
    "forkserver_kill": (("attempt_ended", "failed"),),
    "node_agent_kill": (("attempt_ended", "failed"),),
}
PER_ATTEMPT = ("attempt_ended", "hang_detected", "preempted")  # must name the attempt that was hit
FORKSERVER = "orchestrator.launch.forkserver"


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: it fires once training has passed `at_step`."""

    kind: str
    at_step: int
    choice: int  # a seeded pick among the targets: which rank, which node, which failpoint


@dataclass(frozen=True)
class JobShape:
    """The example job's size; a checkpoint every `checkpoint_interval` steps."""

    steps: int = 150
    checkpoint_interval: int = 10
    step_sleep: float = 0.04
    dataset_size: int = 1024
    nodes: int = 1
    ranks_per_node: int = 2

    def args(self) -> list[str]:
        return [
            "--steps", str(self.steps), "--log-every", "10", "--step-sleep", str(self.step_sleep),
            "--dataset-size", str(self.dataset_size),
        ]  # fmt: skip


@dataclass
class Injection:
    """What the driver did, and what the ledger says came of it."""

    fault: Fault
    time: float
    attempt: int
    target: str  # what was hit, e.g. "rank 1 pid 1234 (SIGKILL)"
    fired: bool = True  # the process existed and was signalled, or the failpoint was passed
    effect: str | None = None  # the first ledger event that shows the fault's effect
    effect_time: float | None = None
    recovered_attempt: int | None = None
    restart_s: float | None = None  # injection -> the next attempt training again
    lost_steps: int | None = None  # the hit attempt's last step - the step it resumed from
    problems: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return self.fired and self.effect is not None and self.restart_s is not None and not self.problems


@dataclass
class Episode:
    backend: str
    seed: int
    run_dir: Path
    injections: list[Injection]
    digest_ok: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.digest_ok and not self.problems and all(i.survived for i in self.injections)


# ------------------------------------------------------------------------------ the schedule


def plan(seed: int, kinds: tuple[str, ...], count: int, shape: JobShape) -> tuple[Fault, ...]:
    """`count` faults spread over the run: one per equal slice of steps (after the first
    checkpoint, before the last interval, so a storage fault still meets a save), every kind
    once before any twice. The same seed gives the same schedule."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < count:
        batch = list(kinds)
        rng.shuffle(batch)
        order.extend(batch)
    lo, hi = shape.checkpoint_interval + 2, shape.steps - shape.checkpoint_interval - 3
    width = (hi - lo) / count
    return tuple(
        Fault(kind, lo + int(i * width) + rng.randrange(max(1, int(width) - 2)), rng.randrange(1 << 16))
        for i, kind in enumerate(order[:count])
    )


# ------------------------------------------------------------------------------ the run's files


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line being appended
            break
    return events


def heartbeat_step(run_dir: Path, attempt: int) -> int:
    """The furthest step any rank of `attempt` reported (heartbeat: "step time phase ema")."""
    best = -1
    for path in (run_dir / "logs" / f"attempt-{attempt}").glob("rank-*.heartbeat"):
        try:
            best = max(best, int(path.read_bytes().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return best


def current_attempt(events: list[dict[str, Any]]) -> int | None:
    started = [e["attempt"] for e in events if e["event"] == "attempt_started"]
    return started[-1] if started else None


def training(events: list[dict[str, Any]], attempt: int, after: float = 0.0) -> dict[str, Any] | None:
    return next(
        (
            e
            for e in events
            if e["event"] == "training_started" and e.get("attempt") == attempt and e["time"] >= after
        ),
        None,
    )


# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    cmdline: str
    stdout: str  # where fd 1 points: a rank's log names its attempt and rank


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def tagged(tag: str, run_dir: Path | None = None) -> list[Proc]:
    """Processes whose environment carries `tag` (every process the run started inherits it;
    forked ranks show their fork server's) or whose command line names the run directory."""
    found = []
    needles = {f"CHAOS_TAG={tag}".encode()}
    if run_dir is not None:  # also a process started with a cleaned environment
        needles.add(f"ORCH_RUN_DIR={run_dir}".encode())
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environ = _read(f"/proc/{name}/environ").split(b"\0")
            cmdline = _read(f"/proc/{name}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
            if needles.isdisjoint(environ) and not (run_dir and str(run_dir) in cmdline):
                continue
            ppid = int(re.search(rb"PPid:\s+(\d+)", _read(f"/proc/{name}/status")).group(1))
            try:
                stdout = os.readlink(f"/proc/{name}/fd/1")
            except OSError:
                stdout = ""
        except (OSError, AttributeError):
            continue  # gone meanwhile, or not ours to read
        found.append(Proc(int(name), ppid, cmdline, stdout))
    return found


def ranks_of(procs: list[Proc], attempt: int) -> dict[int, Proc]:
    """The attempt's rank processes, by rank: their stdout is logs/attempt-N/rank-R.log."""
    pattern = re.compile(rf"/attempt-{attempt}/rank-(\d+)\.log$")
    out = {}
    for p in procs:
        m = pattern.search(p.stdout)
        if m and "/bin/sh" not in p.cmdline and "srun" not in p.cmdline.split(" ")[0]:
            out[int(m.group(1))] = p
    return out


def fork_servers(procs: list[Proc]) -> list[Proc]:
    by_pid = {p.pid: p for p in procs}
    return [
        p
        for p in procs
        if FORKSERVER in p.cmdline and FORKSERVER not in getattr(by_pid.get(p.ppid), "cmdline", "")
    ]


def signal_one(proc: Proc, signum: int, what: str) -> tuple[str, bool]:
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        return f"{what} pid {proc.pid}: gone before {signal.Signals(signum).name}", False
    return f"{what} pid {proc.pid} ({signal.Signals(signum).name})", True


# ------------------------------------------------------------------------------ backends


class LocalRun:
    """`orch run` in the foreground; a killed supervisor is followed by `orch resume RUN`."""

    backend = "local"

    def __init__(self, cfg: Path, run_id: str, env: dict[str, str], log: Path) -> None:
        self.cfg, self.run_id, self.env, self.log = cfg, run_id, env, log
        self.proc = self._start("run", str(cfg), "--run-id", run_id)
        self.finished: int | None = None

    def _start(self, *argv: str) -> subprocess.Popen:
        with self.log.open("a") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", *argv, "--quiet"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )

    def supervisor(self, procs: list[Proc]) -> Proc | None:
        return next((p for p in procs if p.pid == self.proc.pid), None)

    def resume_after_kill(self) -> None:
        self.proc.wait(timeout=30)
        # The reaper takes the ranks along; resume refuses while the run still looks alive.
        self.proc = self._start("resume", self.run_id, "--config", str(self.cfg))

    def poll(self) -> bool:
        if self.proc.poll() is None:
            return False
        self.finished = self.proc.returncode
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class SlurmRun:
    """`orch submit`; the run is over when the ledger says so and Slurm has let the job go."""

    backend = "slurm"

    def __init__(self, cfg: Path, run_id: str, env: dict[str, str], log: Path) -> None:
        self.cfg, self.run_id, self.env, self.log = cfg, run_id, env, log
        self.job = self._orch_json("submit", str(cfg), "--run-id", run_id)["job_id"]
        self.finished: int | None = None
        self._last_check = 0.0

    def _orch_json(self, *argv: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *argv, "--json"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
            timeout=120,
        )
        with self.log.open("a") as out:
            out.write(f"$ orch {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"orch {argv[0]} failed: {proc.stderr.strip()[-500:]}")
        return json.loads(proc.stdout)

    def supervisor(self, procs: list[Proc]) -> Proc | None:
        started = [e for e in read_events(self.run_dir) if e["event"] == "job_started"]
        pid = started[-1]["pid"] if started else None
        return next((p for p in procs if p.pid == pid), None)

    @property
    def run_dir(self) -> Path:
        return Path(yaml.safe_load(self.cfg.read_text())["storage"]["root"]) / self.run_id

    def resume_after_kill(self) -> None:
        # The batch step dies with its supervisor; resume refuses while Slurm still runs the job.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._status().get("slurm_state") not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                break
            time.sleep(1)
        self.job = self._orch_json("resume", self.run_id, "--config", str(self.cfg))["job_id"]

    def _status(self) -> dict[str, Any]:
        return self._orch_json("status", self.run_id, "--config", str(self.cfg))

    def poll(self) -> bool:
        if time.monotonic() - self._last_check < 2:
            return False
        self._last_check = time.monotonic()
        if not any(e["event"] == "run_finished" for e in read_events(self.run_dir)):
            return False
        st = self._status()
        if st["state"] in ("running", "pending") or st.get("slurm_state") in (
            "PENDING", "CONFIGURING", "RUNNING", "COMPLETING",
        ):  # fmt: skip
            return False
        self.finished = 0 if st["state"] == "succeeded" else 1
        return True

    def stop(self) -> None:
        if self.finished is None:
            subprocess.run(["scancel", self.job], capture_output=True, timeout=60)


# ------------------------------------------------------------------------------ injecting


class Injector:
    """Fires one fault at the run's live processes (or through Slurm, or the storage arm
    file) and says what it hit; a fault whose target does not exist does not count as fired."""

    def __init__(self, run: LocalRun | SlurmRun, tag: str, run_dir: Path, work: Path) -> None:
        self.run, self.tag, self.run_dir, self.work = run, tag, run_dir, work
        self.arm_file = work / "arm.json"

    def fire(self, fault: Fault, attempt: int) -> Injection:
        procs = tagged(self.tag, self.run_dir)
        now = time.time()
        target, fired = getattr(self, f"_{fault.kind}")(fault, attempt, procs)
        return Injection(fault, now, attempt, target, fired)

    def _pick_rank(self, fault: Fault, attempt: int, procs: list[Proc]) -> tuple[int, Proc] | None:
        ranks = ranks_of(procs, attempt)
        if not ranks:
            return None
        rank = sorted(ranks)[fault.choice % len(ranks)]
        return rank, ranks[rank]

    def _rank_signal(self, fault: Fault, attempt: int, procs: list[Proc], signum: int) -> tuple[str, bool]:
        picked = self._pick_rank(fault, attempt, procs)
        if picked is None:
            return f"no rank of attempt {attempt} found", False
        return signal_one(picked[1], signum, f"rank {picked[0]}")

    def _rank_kill(self, fault, attempt, procs):
        return self._rank_signal(fault, attempt, procs, signal.SIGKILL)

    def _rank_stop(self, fault, attempt, procs):
        return self._rank_signal(fault, attempt, procs, signal.SIGSTOP)

    def _every_rank(self, attempt: int, procs: list[Proc], signum: int) -> tuple[str, bool]:
        ranks = ranks_of(procs, attempt)
        results = [signal_one(p, signum, f"rank {r}") for r, p in sorted(ranks.items())]
        return "; ".join(text for text, _ in results) or "no rank found", bool(results) and all(
            ok for _, ok in results
        )

    def _preempt_term(self, fault, attempt, procs):
        return self._every_rank(attempt, procs, signal.SIGTERM)

    def _preempt_usr2(self, fault, attempt, procs):
        return self._every_rank(attempt, procs, signal.SIGUSR2)

    def _supervisor_kill(self, fault, attempt, procs):
        sup = self.run.supervisor(procs)
        if sup is None:
            return "no supervisor found", False
        return signal_one(sup, signal.SIGKILL, "supervisor")

    def _forkserver_kill(self, fault, attempt, procs):
        servers = fork_servers(procs)
        if not servers:
            return "no fork server found", False
        return signal_one(servers[fault.choice % len(servers)], signal.SIGKILL, "fork server")

    def _node_agent_kill(self, fault, attempt, procs):
        agents = sorted((p for p in procs if "node_agent" in p.cmdline), key=lambda p: p.pid)
        agents = [p for p in agents if not any(q.pid == p.ppid for q in agents)]  # not its helpers
        if not agents:
            return "no node agent found", False
        return signal_one(agents[fault.choice % len(agents)], signal.SIGKILL, "node agent")

    def _preempt_signal(self, fault, attempt, procs):
        proc = subprocess.run(["scancel", "--signal=USR2", self.run.job], capture_output=True, text=True)
        return f"scancel --signal=USR2 {self.run.job}: rc {proc.returncode} {proc.stderr.strip()}", (
            proc.returncode == 0
        )

    def _requeue(self, fault, attempt, procs):
        proc = subprocess.run(["scontrol", "requeue", self.run.job], capture_output=True, text=True)
        return f"scontrol requeue {self.run.job}: rc {proc.returncode} {proc.stderr.strip()}", (
            proc.returncode == 0
        )

    def _storage_error(self, fault, attempt, procs):
        spec = STORAGE_FAULTS[fault.choice % len(STORAGE_FAULTS)]
        tmp = self.arm_file.with_suffix(".tmp")
        record = str(self.record(attempt))
        tmp.write_text(json.dumps({"attempt": attempt, "fault": spec, "record": record}))
        tmp.rename(self.arm_file)  # the ranks' poller never reads half a file
        # Fired only once the failpoint is passed: checked after the effect (fault_records).
        return f"ORCH_FAULT={spec} armed in attempt {attempt}", True

    def record(self, attempt: int) -> Path:
        """Where the ranks of `attempt` note each failpoint that fired (ORCH_FAULT_RECORD)."""
        return self.work / f"faults-fired-attempt-{attempt}.txt"

    def fault_records(self, attempt: int) -> list[str]:
        path = self.record(attempt)
        return path.read_text().split() if path.exists() else []


# ------------------------------------------------------------------------------ one episode


def write_config(work: Path, backend: str, shape: JobShape, arm_file: Path | None) -> Path:
    data: dict[str, Any] = {
        "backend": backend,
        "job": {"script": str(WRAPPER), "args": shape.args(), "env": {}},
        "resources": {"nodes": shape.nodes, "ranks_per_node": shape.ranks_per_node, "cpus_per_rank": 1},
        "storage": {"root": str(work / "runs"), "checkpoint_interval": shape.checkpoint_interval, "keep": 2},
        # Every fault may land between two checkpoints, so no crash-loop limit; a fixed hang
        # limit so a SIGSTOPped rank is found in seconds (in any phase, saving included), not
        # after `min_hang_s`.
        "restart": {"max_restarts": 50, "backoff_s": 0.1, "crash_loop_attempts": 0, "stop_grace_s": 5},
        "watchdog": {"hang_timeout_s": 4},
        "launch": {"preload": PRELOAD},
    }
    if arm_file is not None:
        data["job"]["env"]["CHAOS_ARM_FILE"] = str(arm_file)
    if backend == "slurm":
        data["resources"]["time_limit"] = "15"
        data["slurm"] = {"partition": "debug", "signal_lead_s": 30, "max_requeues": 50}
    work.mkdir(parents=True, exist_ok=True)
    path = work / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def private_env(work: Path, tag: str) -> dict[str, str]:
    """The run's own port-lock folder and TMPDIR, so a leak of either is visible, and the tag
    that every process of the run inherits."""
    (work / "ports").mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "CHAOS_TAG": tag,
        "ORCH_PORT_LOCK_DIR": str(work / "ports"),
        "TMPDIR": str(work / "tmp"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def start(backend: str, cfg: Path, run_id: str, env: dict[str, str], log: Path) -> LocalRun | SlurmRun:
    return (LocalRun if backend == "local" else SlurmRun)(cfg, run_id, env, log)


def status(cfg: Path, run_id: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", run_id, "--config", str(cfg), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()}


def reference_digest(work: Path, shape: JobShape, timeout: float = 600) -> str:
    """The uninterrupted run's final digest. Local even for Slurm: the same world size gives
    the same weights on either backend (tests/slurm checks that)."""
    cfg = write_config(work, "local", shape, None)
    tag = uuid.uuid4().hex
    run = LocalRun(cfg, "reference", private_env(work, tag), work / "orch.log")
    deadline = time.monotonic() + timeout
    while not run.poll():
        if time.monotonic() > deadline:
            run.stop()
            raise RuntimeError(f"the reference run did not finish in {timeout}s")
        time.sleep(0.2)
    st = status(cfg, "reference")
    if run.finished != 0 or st.get("state") != "succeeded":
        raise RuntimeError(f"the reference run failed: {st}; see {work / 'orch.log'}")
    return st["newest_checkpoint_digest"]


def _ready(fault: Fault, events: list[dict[str, Any]], run_dir: Path, progress: int, last: Injection | None):
    """The next fault fires when training has passed its step, the previous fault was survived
    (a later attempt is training), and the current attempt is past its first steps."""
    attempt = current_attempt(events)
    if attempt is None or progress < fault.at_step:
        return None
    if last is not None and attempt <= last.attempt:
        return None
    began = training(events, attempt)
    if began is None or heartbeat_step(run_dir, attempt) < (began.get("step") or 0) + 3:
        return None
    if any(e["event"] == "run_finished" for e in events if e["time"] >= began["time"]):
        return None
    return attempt


def drive(
    run: LocalRun | SlurmRun,
    injector: Injector,
    faults: tuple[Fault, ...],
    run_dir: Path,
    deadline: float,
    say: Callable[[str], None],
    done: list[Injection],
) -> None:
    """Inject the faults in order until the run ends; `done` collects what was injected, also
    when the run times out (what fired before still gets judged)."""
    pending = list(faults)
    progress = 0
    while not run.poll():
        if time.monotonic() > deadline:
            run.stop()
            raise TimeoutError("the chaos run did not finish in time")
        events = read_events(run_dir)
        attempt = current_attempt(events)
        if attempt is not None:
            progress = max(progress, heartbeat_step(run_dir, attempt))
        ready = _ready(pending[0], events, run_dir, progress, done[-1] if done else None) if pending else None
        if ready is not None:
            inj = injector.fire(pending.pop(0), ready)
            say(f"  step ~{progress}: {inj.fault.kind} -> {inj.target}")
            done.append(inj)
            if inj.fault.kind == "supervisor_kill" and inj.fired:
                run.resume_after_kill()
        time.sleep(0.1)
    for fault in pending:
        say(f"  not injected (the run ended first): {fault.kind} at step {fault.at_step}")


def judge(inj: Injection, events: list[dict[str, Any]], run_dir: Path, injector: Injector) -> None:
    """Fill in what the ledger shows of one injection: its effect, the recovery, the cost."""
    wanted = EFFECTS[inj.fault.kind]
    for e in events:
        if e["time"] < inj.time or (
            e["event"] in PER_ATTEMPT and e.get("attempt", inj.attempt) != inj.attempt
        ):
            continue
        if any(
            e["event"] == name and (status is None or e.get("status") == status) for name, status in wanted
        ):
            inj.effect = f"{e['event']}" + (f" {e['status']}" if "status" in e else "")
            inj.effect_time = e["time"]
            break
    back = next(
        (
            e
            for e in events
            if e["event"] == "training_started" and e["attempt"] > inj.attempt and e["time"] > inj.time
        ),
        None,
    )
    if back is not None:
        inj.recovered_attempt = back["attempt"]
        inj.restart_s = back["time"] - inj.time
        restored = next(
            (e for e in events if e["event"] == "restored" and e["attempt"] == back["attempt"]),
            {"step": None},
        )
        inj.lost_steps = max(0, heartbeat_step(run_dir, inj.attempt) - (restored["step"] or 0))
    if inj.fault.kind == "storage_error":
        inj.fired = bool(injector.fault_records(inj.attempt))
        if not inj.fired:
            inj.problems.append("the armed failpoint was never passed")
    if inj.effect is None:
        inj.problems.append(f"no {' / '.join(n for n, _ in wanted)} event after the injection")
    if back is None:
        inj.problems.append("no later attempt trained again")


def leftovers(tag: str, run_dir: Path, work: Path, wait_s: float = 15) -> list[str]:
    """Anything of the run still there after it ended: processes, held port leases, files in
    its TMPDIR, uncommitted checkpoint directories."""
    deadline = time.monotonic() + wait_s
    while (procs := tagged(tag, run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)  # exits are reaped asynchronously (the reaper, slurmstepd)
    found = [f"process {p.pid} ({p.cmdline[:100]})" for p in procs]
    for lock in sorted((work / "ports").glob("*.lock")):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            found.append(f"port lease {lock.name} still held")
        finally:
            os.close(fd)
    # torch's own cache folder (made when torch._dynamo is imported) is not the run's to remove;
    # this user's private folder (storage/private.py) stays by design, but holds no file of a run.
    mine = f"orch-{os.getuid()}"
    found += [
        f"left in TMPDIR: {p.name}"
        for p in sorted((work / "tmp").iterdir())
        if not p.name.startswith("torchinductor_") and p.name != mine
    ]
    found += [
        f"left in TMPDIR: {p.relative_to(work / 'tmp')}"
        for p in sorted((work / "tmp" / mine).rglob("*"))
        if not p.is_dir()
    ]
    ckpt = run_dir / "ckpt"
    if ckpt.exists():
        found += [
            f"checkpoint leftover: {p.name}"
            for p in sorted(ckpt.iterdir())
            if re.search(r"\.(tmp|stale)-", p.name)
        ]
    return found


def episode(
    backend: str,
    seed: int,
    faults: tuple[Fault, ...],
    shape: JobShape,
    work: Path,
    reference: str,
    timeout: float = 600,
    say: Callable[[str], None] = print,
) -> Episode:
    work.mkdir(parents=True, exist_ok=True)
    tag, run_id = uuid.uuid4().hex, f"chaos-{seed}"
    injector_arm = work / "arm.json"
    cfg = write_config(work, backend, shape, injector_arm)
    run_dir = work / "runs" / run_id
    say(f"{backend} seed {seed}: {', '.join(f'{f.kind}@{f.at_step}' for f in faults)}")
    run = start(backend, cfg, run_id, private_env(work, tag), work / "orch.log")
    injector = Injector(run, tag, run_dir, work)
    ep = Episode(backend, seed, run_dir, [])
    try:
        drive(run, injector, faults, run_dir, time.monotonic() + timeout, say, ep.injections)
    except TimeoutError as exc:
        ep.problems.append(str(exc))
    finally:
        run.stop()
    events = read_events(run_dir)
    for inj in ep.injections:
        judge(inj, events, run_dir, injector)
    st = status(cfg, run_id)
    if st.get("state") != "succeeded":
        ep.problems.append(f"run ended {st.get('state')}: {st.get('root_cause') or st.get('error')}")
    ep.digest_ok = (
        st.get("newest_checkpoint") == shape.steps and st.get("newest_checkpoint_digest") == reference
    )
    if st.get("newest_checkpoint") != shape.steps:
        ep.problems.append(f"the newest checkpoint is step {st.get('newest_checkpoint')}, not {shape.steps}")
    elif not ep.digest_ok:
        ep.problems.append("the final model digest differs from the uninterrupted run's")
    ep.problems += leftovers(tag, run_dir, work)
    if len(ep.injections) < len(faults):
        ep.problems.append(f"only {len(ep.injections)} of {len(faults)} faults were injected")
    return ep


# ------------------------------------------------------------------------------ the report


def table(episodes: list[Episode]) -> str:
    rows: dict[str, list[Injection]] = {}
    for ep in episodes:
        for inj in ep.injections:
            rows.setdefault(inj.fault.kind, []).append(inj)

    def spread(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        return f"{fmt.format(statistics.median(values))} / {fmt.format(max(values))}"

    lines = [
        "| fault | injected | survived | work lost, steps (median / max) | restart s (median / max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, injs in sorted(rows.items()):
        lost = [i.lost_steps for i in injs if i.lost_steps is not None]
        restart = [i.restart_s for i in injs if i.restart_s is not None]
        lines.append(
            f"| {kind} | {sum(i.fired for i in injs)} | {sum(i.survived for i in injs)}"
            f" | {spread(lost, '{:.0f}')} | {spread(restart, '{:.1f}')} |"
        )
    runs_ok = sum(ep.ok for ep in episodes)
    lines.append(f"\n{len(episodes)} run(s), {runs_ok} with the reference digest and nothing lost or leaked")
    for ep in episodes:
        for inj in ep.injections:
            for problem in inj.problems:
                lines.append(
                    f"  {ep.backend} seed {ep.seed}: {inj.fault.kind}@{inj.fault.at_step}: {problem}"
                )
        for problem in ep.problems:
            lines.append(f"  {ep.backend} seed {ep.seed}: {problem}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the CLI


def kinds_for(backend: str, with_agents: bool, only: str | None) -> tuple[str, ...]:
    kinds = (LOCAL_KINDS if backend == "local" else SLURM_KINDS) + (
        AGENT_KINDS[backend] if with_agents else ()
    )
    if only:
        wanted = tuple(k for k in only.split(",") if k)
        unknown = [k for k in wanted if k not in EFFECTS]
        if unknown:
            sys.exit(f"unknown fault kind(s) {unknown}: choose from {sorted(EFFECTS)}")
        kinds = tuple(k for k in wanted if k in kinds)
    return kinds


def slurm_cluster(work: Path) -> Path | None:
    """The cluster SLURM_CONF names if it answers, else a new one (returns its state folder)."""
    if cluster_up():
        return None
    state = work / "slurm-cluster"  # not work / "slurm": the episodes live there, and stop.sh wipes it
    start_cluster(state, nodes=3)
    return state


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> list[Episode]:
    shape = JobShape(
        steps=args.steps, nodes=2 if backend == "slurm" else 1, ranks_per_node=2 if backend == "local" else 1
    )
    kinds = kinds_for(backend, args.with_agent_kills, args.kinds)
    print(
        f"=== {backend}: reference run ({shape.nodes} x {shape.ranks_per_node} ranks, {shape.steps} steps)",
        flush=True,
    )
    reference = reference_digest(work / backend / "reference", shape)
    end = time.monotonic() + args.minutes * 60
    episodes: list[Episode] = []
    index = 0
    while not episodes or time.monotonic() < end:
        seed = args.seed * 1000 + index
        faults = plan(seed, kinds, args.faults, shape)
        ep = episode(
            backend,
            seed,
            faults,
            shape,
            work / backend / f"ep-{index}",
            reference,
            say=lambda s: print(s, flush=True),
        )
        episodes.append(ep)
        problems = [f"{i.fault.kind}: {p}" for i in ep.injections for p in i.problems] + ep.problems
        print(f"  -> {'ok' if ep.ok else 'PROBLEMS: ' + '; '.join(problems)}", flush=True)
        index += 1
    return episodes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--minutes", type=float, default=10, help="per backend: runs episodes until this is spent"
    )
    parser.add_argument("--backend", choices=("local", "slurm", "both"), default="local")
    parser.add_argument("--faults", type=int, default=6, help="faults per run")
    parser.add_argument("--steps", type=int, default=240, help="training steps per run")
    parser.add_argument("--kinds", help="comma-separated fault kinds (default: every kind of the backend)")
    parser.add_argument(
        "--with-agent-kills",
        action="store_true",
        help="also kill the fork server (local) or a node agent (Slurm)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="orch-chaos-"))
    backends = ("local", "slurm") if args.backend == "both" else (args.backend,)
    state = None
    ok = True
    try:
        for backend in backends:
            if backend == "slurm":
                state = slurm_cluster(work)
            episodes = run_backend(backend, args, work)
            print(f"\n{backend}, seed {args.seed}, {args.minutes:g} min, {args.faults} faults per run:\n")
            print(table(episodes), flush=True)
            ok = ok and all(ep.ok for ep in episodes)
    finally:
        if state is not None:
            subprocess.run(
                ["bash", str(REPO / "scripts" / "slurm" / "stop.sh"), str(state), "--wipe"],
                capture_output=True,
                timeout=180,
            )
        if args.keep or not ok:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
