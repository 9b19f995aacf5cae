"""Every name and format that ranks (orchestrator.runtime) and supervisors share, in one place.

The job side imports this module and nothing else of the controller, so it is stdlib only:
- the env contract (torchrun's variables plus ORCH_*) and the runtime settings;
- exit codes;
- the files a rank writes in its attempt's log folder (log, error record, heartbeat);
- the error record and heartbeat formats, with their readers;
- the names of the events in a run's ledger (events.jsonl).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, AnyStr

# ---------------------------------------------------------------------------- environment

ENV_RUN_ID = "ORCH_RUN_ID"
ENV_RUN_DIR = "ORCH_RUN_DIR"  # an fsspec URL
ENV_ATTEMPT = "ORCH_ATTEMPT"
# The torchrun contract plus the orchestrator's own three. A script written for torchrun runs
# unchanged: it reads these and calls init_process_group with init_method="env://".
CONTRACT_VARS: tuple[str, ...] = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "NNODES",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    # the rest of what torchrun sets: frameworks detect a torchrun launch by these
    # (torch.distributed.is_torchelastic_launched() checks TORCHELASTIC_RUN_ID)
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
    ENV_RUN_ID,
    ENV_RUN_DIR,
    ENV_ATTEMPT,
)
# The part of the contract that differs from rank to rank.
PER_RANK_VARS: tuple[str, ...] = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "ROLE_RANK")
ROLE_NAME = "default"  # torchrun's role when none is named

# Settings the runtime reads; not part of the torchrun contract.
ENV_CKPT_INTERVAL = "ORCH_CKPT_INTERVAL"
ENV_CKPT_KEEP = "ORCH_CKPT_KEEP"
ENV_CKPT_ASYNC = "ORCH_CKPT_ASYNC"
ENV_DIST_BACKEND = "ORCH_DIST_BACKEND"
ENV_COLLECTIVE_TIMEOUT = "ORCH_COLLECTIVE_TIMEOUT_S"  # distributed.timeout_s
ENV_DETERMINISTIC = "ORCH_DETERMINISTIC"  # job.deterministic: "1" or "0"
# profile: when enabled, `wait:10,warmup:2,active:5,repeat:1,ranks:0+1,memory:0,shapes:0,stack:0`
# (ranks empty: every rank); unset otherwise. Plain words, digits, `:,+`: safe in any shell line.
ENV_PROFILE = "ORCH_PROFILE"
# Set per node by the local backend from resources.gpus_per_node (under Slurm, by Slurm).
ENV_VISIBLE_GPUS = "CUDA_VISIBLE_DEVICES"
ENV_ERROR_FILE = "ORCH_ERROR_FILE"
ENV_ELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"  # torch elastic's @record writes here
ENV_HEARTBEAT_FILE = "ORCH_HEARTBEAT_FILE"
ENV_INCARNATION = "ORCH_INCARNATION"
ENV_LOG_DIR = "ORCH_LOG_DIR"  # Slurm: the attempt's log folder, where each rank finds its files
# Slurm, node agent: the batch step bound GPUs per task (--gpus-per-task, --gpu-bind), so the
# agent gives each rank it forks this many of the node's GPUs, as srun would give each task.
ENV_GPUS_PER_RANK = "ORCH_GPUS_PER_RANK"
ENV_FAULT = "ORCH_FAULT"  # failpoints for fault-injection tests (orchestrator.storage.faults)
# job.pass_env's names (never their values), comma-separated: a rank masks those variables'
# values in the error record it writes (exception_record), as its launcher masks its log.
ENV_PASS_ENV = "ORCH_MASKED_VARS"
RUNTIME_VARS: tuple[str, ...] = (
    ENV_CKPT_INTERVAL,
    ENV_CKPT_KEEP,
    ENV_CKPT_ASYNC,
    ENV_DIST_BACKEND,
    ENV_COLLECTIVE_TIMEOUT,
    ENV_DETERMINISTIC,
    ENV_PROFILE,
    ENV_VISIBLE_GPUS,
    ENV_ERROR_FILE,
    ENV_INCARNATION,
    ENV_HEARTBEAT_FILE,
    ENV_ELASTIC_ERROR_FILE,
    ENV_PASS_ENV,
    "OMP_NUM_THREADS",
    "PYTHONUNBUFFERED",
)

# ---------------------------------------------------------------------------- secrets

# What stands in for a job.pass_env value wherever orch writes or shows text that held one.
REDACTED = "<redacted>"
# Values shorter than this are not masked: replacing every "1", "yes" or "gpu" would garble
# every log and hide nothing a guess would not find (CI systems skip short secrets too).
MIN_SECRET_CHARS = 4


def secret_values(names: Iterable[str], environ: Mapping[str, str]) -> tuple[str, ...]:
    """The values to mask: those of the variables `names` in `environ` that are at least
    MIN_SECRET_CHARS long, longest first (a secret that holds another is replaced whole)."""
    values = {environ.get(name, "") for name in names}
    return tuple(sorted((v for v in values if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True))


def passed_secrets(environ: Mapping[str, str]) -> tuple[str, ...]:
    """In a rank: the values of the variables that ENV_PASS_ENV names."""
    return secret_values(filter(None, environ.get(ENV_PASS_ENV, "").split(",")), environ)


class SeenSecrets:
    """The job.pass_env values a rank has seen (passed_secrets), from its start on: a job may
    remove a variable once it has read it (`os.environ.pop("HF_TOKEN")`), and the value must
    still be redacted from what the rank records when it fails."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def look(self, environ: Mapping[str, str]) -> tuple[str, ...]:
        """Add the values `environ` has now; every value seen, longest first."""
        self._values.update(passed_secrets(environ))
        return tuple(sorted(self._values, key=len, reverse=True))


def replace_secrets(text: AnyStr, secrets: Sequence[AnyStr], marker: AnyStr) -> AnyStr:
    """`text` with each whole occurrence of a secret replaced by `marker` (secrets longest first)."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, marker)
    return text


def secret_start_at_end(text: AnyStr, secrets: Sequence[AnyStr], shortest: int) -> int:
    """How many characters at the end of `text` begin a secret without completing it (the
    longest such end, at least `shortest` long), or 0: what a cut through a secret leaves."""
    found = 0
    for secret in secrets:
        longest = min(len(secret) - 1, len(text))
        start = text.find(secret[:1], len(text) - longest) if longest >= max(shortest, 1) else -1
        # Candidates from the longest end down; the first that begins the secret is its longest.
        while start != -1 and len(text) - start >= max(shortest, found + 1):
            if secret.startswith(text[start:]):
                found = len(text) - start
                break
            start = text.find(secret[:1], start + 1)
    return found


def redact_text(text: str, secrets: Sequence[str], limit: int | None = None) -> str:
    """`text` with each secret replaced by REDACTED, then cut to `limit` characters. Redacted
    before the cut, so a secret across the cut is replaced whole; and a text that ends with the
    first MIN_SECRET_CHARS or more characters of a secret, as one cut through it before it
    reached us does, ends with REDACTED instead."""
    text = replace_secrets(text, secrets, REDACTED)
    if limit is not None:
        text = text[:limit]
    cut = secret_start_at_end(text, secrets, MIN_SECRET_CHARS)
    return text[: len(text) - cut] + REDACTED if cut else text


def redact_json(value: Any, secrets: Sequence[str]) -> Any:
    """Parsed JSON with each whole secret replaced by REDACTED in every string, at any depth,
    keys included; the rest (structure, numbers) as it was. For a record another writer made
    (torch elastic's `@record`), whose texts are whole: no cut to count a secret's start at."""
    if isinstance(value, str):
        return replace_secrets(value, secrets, REDACTED)
    if isinstance(value, list):
        return [redact_json(item, secrets) for item in value]
    if isinstance(value, dict):
        return {redact_json(key, secrets): redact_json(item, secrets) for key, item in value.items()}
    return value


# ---------------------------------------------------------------------------- exit codes

# A rank that saved a checkpoint because it was asked to stop (preemption, requeue) exits with
# EX_TEMPFAIL: "temporary failure, run me again". Any other non-zero code is a failure.
PREEMPTED_EXIT_CODE = 75

# ---------------------------------------------------------------------------- files

FORKSERVER_LOG = "forkserver.log"  # in logs/: the local fork server's own output
# A checkpoint's state file, written by rank 0 (runtime/checkpoint.py): model, optimizer,
# scheduler, scaler, progress, extras; `orch export` reads the model's weights from it.
CKPT_STATE_FILE = "state.pt"
CKPT_MODEL_KEY = "model"
# In the run directory: profile/attempt-N/ holds each profiled rank's traces
# (rank-R.<time>.pt.trace.json: TensorBoard's profiler plugin reads the folder as one run per
# attempt, one worker per rank; Perfetto opens each file) and its top ops (rank-R.top_ops.json).
PROFILE_DIR = "profile"


def profile_worker_name(rank: int | str) -> str:
    return f"rank-{rank}"


def top_ops_name(rank: int | str) -> str:
    return f"rank-{rank}.top_ops.json"


def encode_profile(settings: dict[str, Any]) -> str:
    """ORCH_PROFILE's value: `key:value` pairs; `ranks` as `0+1`; booleans as 0/1."""
    parts = []
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = "+".join(str(int(v)) for v in value)
        elif isinstance(value, bool):
            value = int(value)
        parts.append(f"{key}:{value}")
    return ",".join(parts)


def decode_profile(text: str) -> dict[str, Any]:
    """ORCH_PROFILE's value back: ints, and `ranks` as a tuple (empty: every rank)."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition(":")
        out[key] = tuple(int(v) for v in value.split("+") if v) if key == "ranks" else int(value)
    return out


# In the run directory: rank 0's last logged scalars ({"step", "time", "scalars"}), written by
# runtime.Metrics at most every METRICS_WRITE_S and at close; read by `orch status SWEEP`.
METRICS_FILE = "metrics.json"
METRICS_WRITE_S = 5.0


def attempt_dir_name(attempt: int | str) -> str:
    return f"attempt-{attempt}"


def attempt_number(folder: str) -> int | None:
    """The attempt of an attempt folder's name (`attempt-3`), else None."""
    number = folder.removeprefix("attempt-")
    return int(number) if number != folder and number.isdecimal() else None


def rank_log_name(rank: int | str) -> str:
    return f"rank-{rank}.log"


def node_log_name(node: int | str) -> str:
    """Under Slurm: a node agent's (and its fork server's) output."""
    return f"node-{node}.log"


def node_agent_record_name(node: int | str) -> str:
    """Under Slurm: a node agent's sign of life (write_agent_record), in the attempt's log folder."""
    return f"node-{node}.agent.json"


class AgentState(StrEnum):
    STARTING = "starting"  # starting its fork server and ranks (the ranks' start-up limit applies)
    RUNNING = "running"  # rewritten every AGENT_BEAT_S while the agent watches its ranks
    FAILED = "failed"  # its fork server died or was stopped: `reason` says how
    EXITED = "exited"  # left with `code`


# How often a node agent renews its record, and how long the supervisor lets it go stale before
# it names the agent as lost (SIGSTOPped, or its node gone): twenty renewals, so a shared
# filesystem's metadata stalls (seconds, on a busy Lustre or NFS) do not count.
AGENT_BEAT_S = 1.0
AGENT_SILENCE_S = 20.0

# A persistent node agent's line to its supervisor (backends/slurm/channel.py): `host:port`, and
# the token that proves the agent was started by that supervisor. The agent's, never a rank's.
ENV_AGENT_ADDR = "ORCH_AGENT_ADDR"
ENV_AGENT_TOKEN = "ORCH_AGENT_TOKEN"


def write_agent_record(path: str, *, state: AgentState, pid: int, host: str, **extra: object) -> None:
    """Atomically (a reader never sees half a record): the agent's state, pid, host and time."""
    tmp = f"{path}.tmp-{pid}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"state": state.value, "pid": pid, "host": host, "time": time.time(), **extra}, fh)
    os.replace(tmp, path)


def read_agent_record(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def rank_error_name(rank: int | str) -> str:
    return f"rank-{rank}.error.json"


def rank_heartbeat_name(rank: int | str) -> str:
    return f"rank-{rank}.heartbeat"


# The flight recorder's dumps: torch appends the rank to this prefix (orchestrator.runtime.nccl).
FLIGHT_RECORDER_PREFIX = "nccl-trace-rank-"


def flight_recorder_prefix(log_dir: str) -> str:
    return os.path.join(log_dir, FLIGHT_RECORDER_PREFIX)


def rank_of_file(name: str) -> int | None:
    """The rank in a rank file's name (`rank-3.log`, `rank-3.error.json`), else None."""
    if not name.startswith("rank-"):
        return None
    number = name[5:].split(".", 1)[0]
    return int(number) if number.isdecimal() else None


def rank_files(log_dir: str, rank: int) -> tuple[str, str]:
    """A rank's error file and heartbeat file in its attempt's log folder (templates/
    slurm_task.sh spells the same names in shell)."""
    return os.path.join(log_dir, rank_error_name(rank)), os.path.join(log_dir, rank_heartbeat_name(rank))


def rank_files_env(log_dir: str, rank: int) -> dict[str, str]:
    """Where a rank's runtime writes its error record and heartbeats."""
    error_file, heartbeat = rank_files(log_dir, rank)
    return {ENV_ERROR_FILE: error_file, ENV_ELASTIC_ERROR_FILE: error_file, ENV_HEARTBEAT_FILE: heartbeat}


# ---------------------------------------------------------------------------- error records

# The `type` of the record a rank writes to its error file when it stops on request.
PREEMPTED_TYPE = "Preempted"
# The `type` a supervisor gives a rank its watchdog found silent.
HANG_TYPE = "Hang"
# The `type` of a rank's record when the checkpoint fence stopped it: a newer incarnation runs.
STALE_TYPE = "StaleIncarnationError"
# The `type` of a rank's record when the divergence guard found a non-finite loss or gradient
# norm (runtime.DivergenceError): its own failure class, restarted only as a rollback.
DIVERGED_TYPE = "DivergenceError"
# The `type` of a failure of our own process between supervisor and ranks (a fork server or a
# node agent that died or was stopped): the ranks it held count as its victims.
LAUNCHER_TYPE = "LauncherFailed"


def error_record(
    kind: str, message: str, *, rank: int, time: float, pid: int, **extra: object
) -> dict[str, Any]:
    """What a rank writes to its error file: an uncaught exception, or a stop on request.

    `type` is the exception's class name (the supervisor's policy decides on it, never on the
    message's words); an exception's record also has `where` (error_location) and `traceback`.
    """
    return {"rank": rank, "type": kind, "message": message, "time": time, "pid": pid, **extra}


def _library_dirs() -> tuple[str, ...]:
    """Where code that is not the job's own lives: Python's library, installed packages, and
    this package (a job's call into orchestrator.runtime is named at the job's line)."""
    import sysconfig

    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    dirs.add(os.path.dirname(os.path.abspath(__file__)))
    return tuple(os.path.join(d, "") for d in dirs)


def error_location(exc: BaseException) -> str | None:
    """`FILE:LINE` where the job's own code raised `exc`: the innermost frame of its traceback
    outside the library (an error raised inside torch is named at the job's call into it), or
    for a SyntaxError the line that does not parse; None when no frame is the job's."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{exc.filename}:{exc.lineno}"
    library = _library_dirs()
    where = None
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith("<") and not os.path.abspath(name).startswith(library):
            where = f"{name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def exception_record(
    exc: BaseException, *, rank: int, time: float, pid: int, secrets: Sequence[str] = ()
) -> dict[str, Any]:
    """The error record of an uncaught exception: its class, message, where, and traceback,
    with each of `secrets` (passed_secrets: the job.pass_env values) redacted before the cuts."""
    import traceback

    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return error_record(
        type(exc).__name__,
        redact_text(str(exc), secrets, limit=4000),
        rank=rank,
        time=time,
        pid=pid,
        where=error_location(exc),
        traceback=redact_text(trace, secrets)[-20000:],
    )


# Blank bytes a rank's error file holds from its start (blank reads as "no record"): when the
# run directory's disk is full at the moment of failure, often because of that failure, the
# record is written over them instead of being lost with the root cause it names.
ERROR_FILE_RESERVED_BYTES = 8192


def write_error_record(path: str, record: dict[str, Any]) -> None:
    """Write a rank's error record atomically; on a full disk, over the blank space reserved
    for it (without the traceback, which also reaches the rank's log, and a shorter message)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)
        return
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    fitted = {k: v for k, v in record.items() if k != "traceback"}
    fitted["message"] = str(record.get("message", ""))[: ERROR_FILE_RESERVED_BYTES // 2]
    body = json.dumps(fitted).encode()
    try:
        size = os.path.getsize(path)
        if size < len(body):
            return  # not reserved, or holding a longer record: nothing fits safely
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return  # the traceback still reaches the rank's log
    try:
        os.pwrite(fd, body.ljust(size, b" "), 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_error_record(path: str) -> dict[str, Any] | None:
    """A rank's error file (ours, or torch elastic's `@record` format), as {type, message,
    time, ...}; None if absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("message"), dict):  # torch.distributed.elastic format
        inner = data["message"]
        text = str(inner.get("message", ""))
        extra = inner.get("extraInfo", {})
        error_type, _, message = text.partition(": ")
        return {
            "type": error_type or None,
            "message": message or text,
            "time": float(extra.get("timestamp", 0) or 0),
        }
    return data


# ---------------------------------------------------------------------------- heartbeats


class Phase(StrEnum):
    """What a rank is doing, as its heartbeat says; each phase has its own hang limit."""

    INIT = "init"  # until the first step
    TRAIN = "train"
    SYNC = "sync"  # in a collective (DDP's gradient all-reduce): its silence waits on a peer
    SAVE = "save"  # writing a checkpoint
    EXIT = "exit"  # shutting down: no limit


HEARTBEAT_BYTES = 96  # one record: "step wall_time phase step_time_ema", space padded


def encode_heartbeat(step: int, now: float, phase: str, step_time_ema: float) -> bytes:
    return f"{step} {now:.3f} {phase} {step_time_ema:.6f}".encode().ljust(HEARTBEAT_BYTES)


def read_heartbeat(path: str) -> tuple[int, float, str, float] | None:
    """(step, time, phase, step-time EMA) of a heartbeat file, or None before the first beat."""
    try:
        with open(path, "rb") as fh:
            fields = fh.read(HEARTBEAT_BYTES).decode("ascii", "replace").split()
        return int(fields[0]), float(fields[1]), fields[2], float(fields[3])
    except (FileNotFoundError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------- events


class Event(StrEnum):
    """The `event` of each record in a run's ledger. Supervisors, the CLI and rank 0's runtime
    write them; `orch status`, `orch logs -f` and the goodput ledger read them."""

    # the CLI
    SUBMITTED = "submitted"
    CANCEL_REQUESTED = "cancel_requested"
    RESUMED = "resumed"  # `orch resume`: the run goes on from its newest checkpoint
    # a sweep's own ledger (storage/sweepdir.py): its local runner, or its Slurm job arrays
    SWEEP_STARTED = "sweep_started"
    SWEEP_FINISHED = "sweep_finished"
    # supervisors
    RUN_STARTED = "run_started"  # local supervisor
    JOB_STARTED = "job_started"  # Slurm supervisor, once per incarnation of the job
    ATTEMPT_STARTED = "attempt_started"
    ATTEMPT_ENDED = "attempt_ended"
    LAUNCHER_NOTICE = "launcher_notice"
    HANG_DETECTED = "hang_detected"
    RESTART_SCHEDULED = "restart_scheduled"
    # after a divergence with restart.on_divergence: rollback ({attempt: the next one, to_step})
    ROLLBACK_SCHEDULED = "rollback_scheduled"
    GIVING_UP = "giving_up"
    PREEMPTED = "preempted"
    REQUEUED = "requeued"
    INCARNATION_ENDED = "incarnation_ended"
    WARNING = "warning"
    RUN_FINISHED = "run_finished"
    # rank 0's runtime
    RESTORED = "restored"
    TOTAL_STEPS = "total_steps"  # runtime.declare_total_steps: what an ETA counts toward
    TRAINING_STARTED = "training_started"
    CHECKPOINT_COMMITTED = "checkpoint_committed"
    # rank 0's runtime: the divergence guard fired ({first_step, last_step, epoch, sampler}); a
    # later attempt's restore rolled back to a checkpoint and skipped the data since it
    # ({step, diverged_at, skipped, epoch})
    DIVERGED = "diverged"
    ROLLED_BACK = "rolled_back"
