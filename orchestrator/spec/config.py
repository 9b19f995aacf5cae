"""cluster.yaml -> frozen dataclasses.

Every field carries its documentation and its constraints in `field(metadata=...)`; one
generic walker validates a YAML mapping against the dataclass tree, so every error names its
dotted YAML path and says what is wrong in one line (`ConfigError`). Loading reads the file and
checks that the entrypoint exists; it starts nothing.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import yaml

from orchestrator.errors import ConfigError

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: any of them in a
# value that reaches a shell, an #SBATCH line or a log line could start a new line or a new
# command. Lone surrogates are not text at all (they cannot be encoded into argv or environ).
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Patterns end in \Z, not $: `$` also matches before a trailing newline ("RANK\n").
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_MEMORY = re.compile(r"^[0-9]+[KMGT]?\Z")
_TIME = re.compile(r"^(?:(?:(\d+)-)?(\d+):)?(\d+):(\d+)\Z|^(\d+)\Z")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}\Z")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
# job.model_factory: `path/to/file.py:function` or `package.module:function`.
_FACTORY = re.compile(
    r"^(?:[^:\x00-\x1f]+\.py|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):[A-Za-z_][A-Za-z0-9_]*\Z"
)
# A YAML integer this long is refused as a string value: str() of one past ~4300 digits raises.
_MAX_INT_BITS = 4000
# A name that looks like it holds a secret: anywhere in the name (WANDB_API_KEY, HFTOKEN...), or
# as a whole `_`-separated word (OPENAI_KEY, DB_PASS, BASIC_AUTH). TOKEN followed by a letter
# names tokens, not a token (TOKENIZERS_PARALLELISM, MAX_TOKENS). Such a name in job.env is
# refused and its value redacted wherever shown: listing a harmless name in job.pass_env costs a
# line, a secret stored in clear in a run directory cannot be taken back.
_SECRET_NAME = re.compile(
    r"(SECRET|TOKEN(?![A-Z])|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE)"
    r"|(?<![A-Z0-9])(KEY|PASS|PWD|AUTH)(?![A-Z0-9])",
    re.IGNORECASE,
)


def _f(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field whose metadata holds its docs and its constraints."""
    meta = {"doc": doc, **checks}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples / mapping proxies for frozen defaults")
    if isinstance(default, types.MappingProxyType):
        return field(default_factory=lambda: types.MappingProxyType({}), metadata=meta)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    script: str | None = _f(None, "Python script to run on every rank (path relative to cluster.yaml).")
    module: str | None = _f(
        None, "Python module to run with `python -m` instead of a script.", pattern=_MODULE
    )
    args: tuple[str, ...] = _f(
        (),
        (
            "Arguments passed to the entrypoint, each the text as written (`on`, `0x10` stay as they are;"
            " stored in run.yaml). An option that carries a secret (`--api-key=...`, `--hf-token X`) is"
            " refused: have the script read it from a variable listed in job.pass_env."
        ),
    )
    env: Mapping[str, str] = _f(
        types.MappingProxyType({}),
        (
            "Extra environment variables for every rank (values as written; stored in run.yaml)."
            " Secret-looking names (`*TOKEN*`, `*SECRET*`, `*PASSWORD*`, `*API_KEY*`, `*_KEY`, ...;"
            " not `TOKENIZERS_*`) are refused: export the variable and list it in job.pass_env."
        ),
    )
    pass_env: tuple[str, ...] = _f(
        (),
        (
            "Names of variables copied from the environment of `orch run` / `orch submit` to every"
            " rank; their values are never written to run.yaml, events, logs or scripts"
            " (use this for secrets). Each must be set when the run starts or resumes."
        ),
        item_pattern=ENV_NAME,
    )
    python: str | None = _f(None, "Interpreter for the ranks (default: the one running orch).")
    model_factory: str | None = _f(
        None,
        (
            "How `orch export` builds the model: `FILE.py:FUNCTION` (relative to cluster.yaml) or"
            " `package.module:FUNCTION`, called with job.args as a list of strings, returning"
            " `(model, example_inputs)`: a fresh nn.Module of the trained architecture and a tuple of"
            " tensors it accepts (the export is checked against the eager model on them)."
        ),
        pattern=_FACTORY,
    )
    deterministic: bool = _f(
        False,
        (
            "Bitwise-reproducible kernels: torch.use_deterministic_algorithms, cuDNN deterministic"
            " and no autotuning, a fixed cuBLAS workspace (slower on GPUs; see docs/runtime.md)."
        ),
    )


@dataclass(frozen=True, kw_only=True)
class ResourcesSpec:
    nodes: int = _f(1, "Number of nodes (simulated nodes on the local backend).", min=1, max=65536)
    ranks_per_node: int = _f(1, "Ranks (processes) per node.", min=1, max=1024)
    cpus_per_rank: int = _f(1, "CPU cores per rank; also sets OMP_NUM_THREADS.", min=1, max=1024)
    gpus_per_node: int = _f(0, "GPUs per node (0 on CPU-only clusters).", min=0, max=64)
    memory: str | None = _f(None, "Memory per node, Slurm syntax (e.g. 16G, 512M).", pattern=_MEMORY)
    time_limit: str | None = _f(
        None, "Wall-clock limit: MINUTES, HH:MM:SS or D-HH:MM:SS.", pattern=_TIME, coerce_int=True
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def time_limit_minutes(self) -> int | None:
        if self.time_limit is None:
            return None
        m = _TIME.match(self.time_limit)
        assert m, "validated at load"
        if m.group(5) is not None:
            return int(m.group(5))
        days, hours, minutes, seconds = (int(g or 0) for g in m.group(1, 2, 3, 4))
        if m.group(2) is None:  # MM:SS
            hours, minutes, seconds = 0, int(m.group(3)), int(m.group(4))
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        return max(1, -(-total // 60))


@dataclass(frozen=True, kw_only=True)
class DistributedSpec:
    backend: Literal["auto", "gloo", "nccl"] = _f(
        "auto", "Process-group backend: auto picks nccl with GPUs, gloo otherwise."
    )
    master_port: int | Literal["auto"] = _f(
        "auto", "Rendezvous port: auto picks one no other run uses, or a fixed port.", min=1024, max=65535
    )
    timeout_s: float = _f(
        600.0,
        "Collective timeout: a collective waiting this long fails (NCCL aborts it and the rank exits).",
        min=1.0,
        max=86400.0,
    )


@dataclass(frozen=True, kw_only=True)
class StorageSpec:
    root: str = _f(
        "./runs", "Where run directories live: a path (relative to cluster.yaml) or any fsspec URL."
    )
    checkpoint_interval: int = _f(50, "Save a checkpoint every N training steps.", min=1)
    keep: int = _f(2, "Keep the newest K committed checkpoints.", min=2, max=1000)
    async_save: bool = _f(
        False,
        (
            "Write checkpoints in the background; training blocks only while tensors are copied"
            " (parameters and optimizer state are copied beside the next forward/backward, until"
            " the optimizer's next step)."
        ),
    )


@dataclass(frozen=True, kw_only=True)
class RestartSpec:
    max_restarts: int = _f(
        3, "Attempts started after a failure before the run is declared failed.", min=0, max=1000
    )
    backoff_s: float = _f(1.0, "Wait before the first restart; doubles each time.", min=0.0, max=3600.0)
    backoff_max_s: float = _f(60.0, "Upper bound of the restart wait.", min=0.0, max=86400.0)
    stop_grace_s: float = _f(10.0, "After SIGTERM, how long ranks get before SIGKILL.", min=0.0, max=3600.0)
    crash_loop_attempts: int = _f(
        3,
        "Stop retrying after this many failed attempts in a row without a new checkpoint (0: never).",
        min=0,
        max=1000,
    )
    on_divergence: Literal["fail", "rollback"] = _f(
        "fail",
        (
            "When the runtime's divergence guard finds a non-finite loss or gradient norm: fail (never"
            " retried), or rollback: restart from the newest checkpoint (all are from before the"
            " divergence) and skip the data consumed since it; counts as a restart."
        ),
    )


@dataclass(frozen=True, kw_only=True)
class WatchdogSpec:
    hang_timeout_s: float | Literal["auto"] = _f(
        "auto",
        (
            "A training rank silent this long is hung;"
            " auto: max(min_hang_s, hang_factor x its step time) after 5 steps."
        ),
        min=1.0,
        max=86400.0,
    )
    hang_factor: float = _f(
        30.0, "auto: how many typical step times of silence make a hang.", min=2.0, max=100000.0
    )
    min_hang_s: float = _f(60.0, "auto: never call a rank hung sooner than this.", min=1.0, max=86400.0)
    startup_timeout_s: float | None = _f(
        None, "Limit from start to the first training step (null: none).", min=1.0, max=86400.0
    )
    save_timeout_s: float = _f(1800.0, "Limit for one checkpoint save.", min=1.0, max=86400.0)


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    mode: Literal["auto", "subprocess"] = _f(
        "auto",
        (
            "How ranks start: auto forks them from a server that imported torch and the job's imports once,"
            " one server per machine (local) or per node (slurm: one node agent per node);"
            " fresh interpreters where forking is unsafe, with the reason logged."
            " subprocess always starts fresh interpreters (slurm: one srun task per rank)."
        ),
    )
    preload: tuple[str, ...] = _f(
        (),
        (
            "Extra modules the fork server imports once"
            " (besides torch and the entrypoint's top-level imports)."
        ),
        item_pattern=_MODULE,
    )


@dataclass(frozen=True, kw_only=True)
class ProfileSpec:
    enabled: bool = _f(False, "Profile each attempt's steps with torch.profiler (`orch run --profile`).")
    wait: int = _f(
        10,
        "Steps of each attempt before the profiler starts (start-up noise); at least 1.",
        min=1,
        max=10**9,
    )
    warmup: int = _f(2, "Steps traced but discarded, so the active steps start warm.", min=0, max=1000)
    active: int = _f(5, "Steps recorded in each trace.", min=1, max=1000)
    repeat: int = _f(1, "How many wait-free warmup+active cycles (each its own trace).", min=1, max=100)
    ranks: tuple[int, ...] = _f((0,), "Ranks that profile (each writes its own trace); [] for every rank.")
    memory: bool = _f(False, "Record tensor allocations too (profile_memory; costs more while active).")
    record_shapes: bool = _f(False, "Record input shapes of each op (group the top-ops table by shape).")
    with_stack: bool = _f(False, "Record Python stacks of each op (large traces).")


@dataclass(frozen=True, kw_only=True)
class SlurmSpec:
    partition: str | None = _f(None, "Slurm partition (-p).", pattern=_NAME)
    account: str | None = _f(None, "Slurm account (-A).", pattern=_NAME)
    qos: str | None = _f(None, "Slurm QOS.", pattern=_NAME)
    signal_lead_s: int = _f(
        120, "Seconds before the time limit or preemption that ranks get SIGUSR2.", min=1, max=65535
    )
    max_requeues: int = _f(10, "How many times a preempted or timed-out job is requeued.", min=0, max=10000)
    persistent_agents: bool = _f(
        True,
        (
            "With launch.mode auto: the node agents and their warm fork servers live for the whole"
            " allocation, and each attempt is a message to them, so a restart forks at once."
            " false starts a new srun step (and fork servers) for every attempt;"
            " after a node or agent failure a new step is started either way."
        ),
    )
    setup: tuple[str, ...] = _f(
        (),
        (
            "Shell lines run in the batch script before the launch (module load ...);"
            " not #SBATCH, #PBS or #BSUB lines, which sbatch would read as options (use extra_flags)."
        ),
        item_pattern=re.compile(r"^(?!\s*#\s*(SBATCH|PBS|BSUB))", re.IGNORECASE),
    )
    extra_flags: tuple[str, ...] = _f(
        (),
        (
            "Extra sbatch flags, each `--flag` or `--flag=value` (e.g. `--constraint=a100|h100`)."
            " Refused: backslashes, quotes, backticks and `$ ; < > #` in values, and the flags orch"
            " sets itself or relies on (`--nodes`, `--time`, `--output`, `--export`, `--wrap`, ...;"
            " the error names the field to use instead)."
        ),
        item_pattern=re.compile(r"^--[a-z][a-z0-9-]*(=.*)?\Z"),
    )


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    backend: Literal["local", "slurm"] = _f("local", "Where to run: local (this machine) or slurm.")
    name: str | None = _f(None, "Job name (default: the entrypoint's name).", pattern=_NAME)
    job: JobSpec = _f(JobSpec, "What to run on every rank.")
    resources: ResourcesSpec = _f(ResourcesSpec, "How many nodes and ranks, and what each gets.")
    distributed: DistributedSpec = _f(DistributedSpec, "torch.distributed settings.")
    storage: StorageSpec = _f(StorageSpec, "Run directory and checkpoint settings.")
    restart: RestartSpec = _f(RestartSpec, "What the supervisor does when a rank fails.")
    watchdog: WatchdogSpec = _f(
        WatchdogSpec, "When a silent rank counts as hung (ranks using orchestrator.runtime send heartbeats)."
    )
    launch: LaunchSpec = _f(
        LaunchSpec, "How ranks start: forked from a pre-warmed server, or fresh interpreters."
    )
    profile: ProfileSpec = _f(
        ProfileSpec,
        (
            "torch.profiler over a window of steps, driven by the runtime (Checkpointer.step_end);"
            " traces in RUN_DIR/profile for TensorBoard and Perfetto, top ops via `orch profile`."
        ),
    )
    slurm: SlurmSpec = _f(SlurmSpec, "Settings used only by the slurm backend.")
    # Where the file was loaded from: relative paths in it resolve against this directory.
    base_dir: str = field(default=".", metadata={"doc": "internal", "internal": True})

    @property
    def job_name(self) -> str:
        if self.name:
            return self.name
        stem = (
            self.job.module.rsplit(".", 1)[-1]
            if self.job.module
            else os.path.splitext(os.path.basename(self.job.script or "job"))[0]
        )
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", stem) or "job"

    @property
    def script_path(self) -> str | None:
        if self.job.script is None:
            return None
        return os.path.normpath(os.path.join(self.base_dir, self.job.script))

    @property
    def storage_root(self) -> str:
        """storage.root with a relative local path resolved against cluster.yaml's directory."""
        root = self.storage.root
        if "://" in root or os.path.isabs(root):
            return root.rstrip("/") or "/"
        return os.path.normpath(os.path.join(self.base_dir, root))


# ---------------------------------------------------------------------------- the walker


def _oneline(text: str) -> str:
    """`text` with every non-printable character (newline, escape, NUL, U+2028...) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _error(source: str, path: str, problem: str) -> ConfigError:
    """A ConfigError whose message is one line whatever the user wrote into the key or file name."""
    return ConfigError(_oneline(source), _oneline(path), _oneline(problem))


def _number_text(value: int | float) -> str:
    """str(value), also for integers too long for str() (which raises ValueError past ~4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{'-' if value < 0 else ''}<an integer of {value.bit_length()} bits>"
    return str(value)


def _key_text(key: Any) -> str:
    """A mapping key as it appears in a dotted path (YAML keys may be any hashable scalar)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return _number_text(key)
    return str(key)


def _scalar_text(value: Any, path: str, source: str) -> str:
    """A list item or env value given as a YAML number, as the string the process will see."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        raise _error(source, path, "integer too long; quote it if it is meant as text")
    return str(value)


def _doc_of(cls: type, name: str) -> str:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("doc", "")


def _check_string(
    value: str, path: str, source: str, meta: Mapping[str, Any], pattern_key: str = "pattern"
) -> str:
    if _CONTROL_CHARS.search(value):
        raise _error(source, path, "contains a control character (newline, tab, escape...); not allowed")
    pattern = meta.get(pattern_key)
    if pattern is not None and not pattern.match(value):
        raise _error(source, path, f"{value!r} is not valid ({meta.get('doc', '').rstrip('.')})")
    return value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of integers" if typing.get_args(tp)[0] is int else "a list of strings"
    if typing.get_origin(tp) in (Mapping, dict, collections.abc.Mapping) or tp is Mapping:
        return "a mapping of strings"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, path: str, source: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        last: ConfigError | None = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path, source, meta)
            except ConfigError as exc:
                last = exc
                # A value of the right type but out of range says more than "wrong type".
                if not exc.problem.startswith("expected"):
                    raise
        raise _error(source, path, f"expected {_type_name(tp)}, got {_describe(value)}") from last
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, str):
            return value
        raise _error(source, path, f"expected one of {', '.join(map(repr, choices))}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _check_range(value, path, source, meta)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise _error(source, path, "must be a finite number")
            # Range first: float() of a huge YAML integer raises OverflowError.
            _check_range(value, path, source, meta)
            try:
                return float(value)
            except OverflowError:
                raise _error(source, path, "must be a finite number") from None
    elif tp is str:
        if (
            meta.get("coerce_int")
            and isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value < 10**9
        ):
            value = str(value)  # `time_limit: 90` means 90 minutes, as in sbatch
        if isinstance(value, str):
            return _check_string(value, path, source, meta)
    elif origin is tuple and typing.get_args(tp)[0] is int:
        if isinstance(value, (list, tuple)):
            return tuple(_convert(int, item, f"{path}[{i}]", source, meta) for i, item in enumerate(value))
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            out = []
            for i, item in enumerate(value):
                if not isinstance(item, (str, int, float)) or isinstance(item, bool):
                    raise _error(source, f"{path}[{i}]", f"expected a string, got {_describe(item)}")
                item_path = f"{path}[{i}]"
                out.append(
                    _check_string(
                        _scalar_text(item, item_path, source), item_path, source, meta, "item_pattern"
                    )
                )
            return tuple(out)
    elif origin in (Mapping, dict, collections.abc.Mapping) or tp is Mapping:
        if isinstance(value, Mapping):
            out_map: dict[str, str] = {}
            for k, v in value.items():
                key_path = f"{path}.{_key_text(k)}"
                if not isinstance(k, str) or not ENV_NAME.match(k):
                    raise _error(source, key_path, "is not a valid environment variable name")
                if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    raise _error(source, key_path, f"expected a string, got {_describe(v)}")
                out_map[k] = _check_string(_scalar_text(v, key_path, source), key_path, source, {})
            return types.MappingProxyType(dict(sorted(out_map.items())))
    else:  # pragma: no cover - a field type the walker does not know is a programming error
        raise TypeError(f"unsupported field type {tp!r} at {path}")
    raise _error(source, path, f"expected {_type_name(tp)}, got {_describe(value)}")


def _check_range(value: int | float, path: str, source: str, meta: Mapping[str, Any]) -> int | float:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise _error(source, path, f"must be >= {lo}, got {_number_text(value)}")
    if hi is not None and value > hi:
        raise _error(source, path, f"must be <= {hi}, got {_number_text(value)}")
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = _number_text(value) if isinstance(value, int) else repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _error(source, path, f"expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{_key_text(key)}" if path else _key_text(key)
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise _error(source, key_path, f"unknown key{hint}")
        kwargs[key] = _convert(hints[key], value, key_path, source, fields[key].metadata)
    for name, _field in fields.items():
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, f"{path}.{name}" if path else name, source)
    return cls(**kwargs)


# ---------------------------------------------------------------------------- overrides


def parse_override(text: str, source: str = "--set") -> tuple[tuple[str, ...], Any]:
    """`dotted.path=value` -> (path parts, YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise _error(source, key or text, "expected --set dotted.path=value")
    try:
        as_written = ((),) if tuple(key.split(".")) in _AS_WRITTEN else ()
        value = _yaml_load(raw, as_written) if raw.strip() else ""
    except Exception:  # noqa: BLE001 - not YAML (a bad date, a huge integer...): the text itself
        value = raw
    return tuple(key.split(".")), value


def apply_overrides(data: Mapping[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """A copy of the raw mapping with each `dotted.path=value` written into it."""
    return apply_values(data, [parse_override(text) for text in overrides])


def apply_values(
    data: Mapping[str, Any], values: typing.Iterable[tuple[tuple[str, ...], Any]], source: str = "--set"
) -> dict[str, Any]:
    """A copy of the raw mapping with each (path parts, value) written into it."""
    result: dict[str, Any] = _deep_copy(data)
    for parts, value in values:
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise _error(source, ".".join(parts[: i + 1]), "is not a mapping")
            # Copy on write: a YAML alias of this mapping elsewhere keeps its own value.
            child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    """Copies mappings and lists, without recursion (YAML nests as deep as the parser allows);
    shared (YAML alias) and self-referencing nodes stay shared instead of being expanded."""
    if not isinstance(data, (Mapping, list)):
        return data
    memo: dict[int, Any] = {}

    def shell(node: Any) -> tuple[Any, bool]:
        if id(node) in memo:
            return memo[id(node)], False
        memo[id(node)] = new = [] if isinstance(node, list) else {}
        return new, True

    root, _ = shell(data)
    stack = [(data, root)]
    while stack:
        src, dst = stack.pop()
        for key, value in enumerate(src) if isinstance(src, list) else src.items():
            if isinstance(value, (Mapping, list)):
                copied, fresh = shell(value)
                if fresh:
                    stack.append((value, copied))
                value = copied
            if isinstance(dst, list):
                dst.append(value)
            else:
                dst[key] = value
    return root


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. 2020-13-01, !!int foo, a 5000-digit integer
            raise yaml.constructor.ConstructorError(
                None, None, str(exc) or type(exc).__name__, node.start_mark
            ) from None


# Values that are command-line or environment text: kept as the user wrote them. YAML 1.1 would read `on` as
# true and `0x10` as 16, and the job would receive "True" and "16". A time limit too: YAML 1.1
# reads an unquoted `12:00:00` as the base-60 integer 43200 (which would mean 43200 minutes).
_AS_WRITTEN = (("job", "args"), ("job", "env"), ("resources", "time_limit"))
_STR_TAG = "tag:yaml.org,2002:str"


def _yaml_load(text: str, as_written: tuple[tuple[str, ...], ...] = _AS_WRITTEN) -> Any:
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        for path in as_written:
            _keep_as_written(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _keep_as_written(node: yaml.Node, path: tuple[str, ...]) -> None:
    """Tag the plain scalars of the sequence or mapping at `path` (`node` itself for an empty
    path) as strings, so that they construct to their text."""
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            return
        found = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key]
        if not found:
            return
        node = found[-1]
    if isinstance(node, yaml.SequenceNode):
        items = node.value
    elif isinstance(node, yaml.MappingNode):
        items = [v for _, v in node.value]
    elif isinstance(node, yaml.ScalarNode):
        if node.tag == "tag:yaml.org,2002:null":
            return  # `null`: no value, not the text "null"
        items = [node]
    else:
        return
    for item in items:
        if isinstance(item, yaml.ScalarNode) and item.style is None and item.tag != _STR_TAG:
            if not item.value or item.value == "~":
                continue  # an empty item stays null: the config says what is wrong with it
            item.tag = _STR_TAG


def _yaml_error(exc: BaseException, text: str) -> tuple[str, str]:
    """(where, problem) for an exception raised while parsing YAML text."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "malformed YAML"
    elif isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow; no mark
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return f"line {line}, column {column}", f"unacceptable character #x{exc.character:04x}: {exc.reason}"
    elif isinstance(exc, RecursionError):
        return "<file>", "nested too deeply"
    else:  # a value the YAML constructors could not build (a date like 2020-13-01, a huge integer...)
        mark, problem = None, str(exc) or type(exc).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "<file>"
    return where, problem


# ---------------------------------------------------------------------------- loading


def parse_config(
    data: Any, *, source: str = "cluster.yaml", base_dir: str = ".", check_files: bool = True
) -> ClusterConfig:
    """Validate a raw mapping (as YAML gives it) into a ClusterConfig."""
    config = _build(ClusterConfig, data, "", source)
    config = dataclasses.replace(config, base_dir=os.path.abspath(base_dir))
    job = config.job
    if (job.script is None) == (job.module is None):
        raise _error(source, "job", "set exactly one of job.script or job.module")
    if check_files and job.script is not None:
        path = config.script_path
        assert path is not None
        if not os.path.isfile(path):
            raise _error(source, "job.script", f"file not found: {path}")
    for name in job.pass_env:
        if name in job.env:
            raise _error(source, "job.pass_env", f"{name} is also set in job.env; set it in one place")
    _check_env_secrets(job, source)
    from orchestrator.contract import CONTRACT_VARS, RUNTIME_VARS

    # The orchestrator sets these for every rank and would silently override the user's value.
    for name in job.env:
        if name in CONTRACT_VARS:
            raise _error(source, f"job.env.{name}", "is set by the orchestrator (env contract); remove it")
        if name in RUNTIME_VARS:
            raise _error(
                source, f"job.env.{name}", f"is set by the orchestrator{_runtime_hint(name)}; remove it"
            )
    for i, name in enumerate(job.pass_env):
        if name in CONTRACT_VARS or name in RUNTIME_VARS:
            raise _error(
                source,
                f"job.pass_env[{i}]",
                f"{name} is set by the orchestrator{_runtime_hint(name)}; remove it",
            )
    _check_gpus(config, source)
    outside = [r for r in config.profile.ranks if not 0 <= r < config.resources.world_size]
    if outside:
        raise _error(
            source,
            "profile.ranks",
            f"rank {outside[0]} is outside the world of {config.resources.world_size} ranks",
        )
    _check_extra_flags(config.slurm.extra_flags, source)
    if config.backend == "slurm" and "\\" in config.storage.root:
        # The batch log's path goes into an #SBATCH line, where sbatch reads a backslash as an
        # escape even inside quotes: sbatch aborts on the quoting, or records another path.
        raise _error(
            source, "storage.root", "contains a backslash, which sbatch misreads; not allowed on slurm"
        )
    return config


def _check_gpus(config: ClusterConfig, source: str) -> None:
    """NCCL gives each rank a GPU of its own (two ranks on one GPU abort with "Duplicate GPU
    detected"): it needs at least as many GPUs per node as ranks. `auto` picks NCCL wherever the
    ranks see a GPU, so with GPUs it is held to the same rule; gloo may share them."""
    res, backend = config.resources, config.distributed.backend
    if backend == "nccl" and res.gpus_per_node == 0:
        raise _error(
            source, "distributed.backend", "nccl needs GPUs: set resources.gpus_per_node >= 1 (or use gloo)"
        )
    if backend in ("nccl", "auto") and 0 < res.gpus_per_node < res.ranks_per_node:
        raise _error(
            source,
            "resources.ranks_per_node",
            f"{res.ranks_per_node} ranks per node with {res.gpus_per_node} GPU(s) per node:"
            f" {'nccl' if backend == 'nccl' else 'auto (nccl on GPUs)'} needs a GPU per rank;"
            " lower ranks_per_node, raise gpus_per_node, or set distributed.backend: gloo",
        )


# A command-line option of job.args that carries a secret (`--api-key=...`, `--hf-token X`).
# Stricter than _SECRET_NAME: bare KEY/PASS/AUTH are common option words (`--sort-key`), and an
# option naming where a secret is kept (`--api-key-file`, `--token-env`) carries none.
_SECRET_OPTION = re.compile(
    r"^--?[\w-]*(SECRET|TOKEN(?![A-Z])|PASSWORD|PASSWD|CREDENTIAL|API[_-]?KEY|ACCESS[_-]?KEY|PRIVATE[_-]?KEY)"
    r"(?![\w-]*[_-](FILE|PATH|ENV|VAR|DIR)$)",
    re.IGNORECASE,
)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name looks like it holds a secret (_SECRET_NAME)."""
    return bool(_SECRET_NAME.search(name))


def _check_env_secrets(job: JobSpec, source: str) -> None:
    """job.env is frozen into run.yaml, which travels with the run directory (shared storage,
    object stores): a secret must come from the launching environment instead (job.pass_env)."""
    for name in job.env:
        if is_secret_name(name):
            raise _error(
                source,
                f"job.env.{name}",
                "looks like a secret and job.env is stored in clear in run.yaml;"
                f" export {name} and list it in job.pass_env instead",
            )
    # job.args are stored in run.yaml too; an option's value is the next item or after `=`.
    for index, arg in enumerate(job.args):
        option, has_value, _ = arg.partition("=")
        follows = index + 1 < len(job.args) and not job.args[index + 1].startswith("-")
        if _SECRET_OPTION.match(option) and (has_value or follows):
            raise _error(
                source,
                f"job.args[{index}]",
                f"{option} looks like it carries a secret and job.args is stored in clear in run.yaml;"
                " have the script read it from an environment variable listed in job.pass_env",
            )


# sbatch options that orch sets from one of its own fields, or relies on; the text says which.
_SBATCH_OWNED: Mapping[str, str] = types.MappingProxyType(
    {
        "job-name": "set it with name",
        "nodes": "set it with resources.nodes",
        "ntasks": "set it with resources.nodes and resources.ranks_per_node",
        "ntasks-per-node": "set it with resources.ranks_per_node",
        "cpus-per-task": "set it with resources.cpus_per_rank",
        "gres": "set it with resources.gpus_per_node",
        "mem": "set it with resources.memory",
        "time": "set it with resources.time_limit",
        "partition": "set it with slurm.partition",
        "account": "set it with slurm.account",
        "qos": "set it with slurm.qos",
        "signal": "set it with slurm.signal_lead_s",
        "requeue": "orch always sets it; slurm.max_requeues bounds the requeues",
        "no-requeue": "orch requeues preempted jobs; slurm.max_requeues bounds the requeues",
        "output": "orch keeps the batch log in the run directory",
        "error": "orch keeps the batch log in the run directory",
        "input": "the batch step reads no input",
        "open-mode": "orch appends to the batch log across requeues",
        "export": "ranks get the submitting environment, job.env and job.pass_env as orch passes them",
        "export-file": "ranks get the submitting environment, job.env and job.pass_env as orch passes them",
        "wrap": "it would replace the batch script orch submits",
        "array": "a run is one job",
        "wait": "orch submit would block until the job ends",
        "parsable": "orch reads sbatch's usual reply",
        "test-only": "nothing would be submitted (orch render shows what would be)",
    }
)
# In an sbatch flag's value: characters a shell or sbatch's own #SBATCH parser gives a meaning
# (quotes, escapes, comments, substitutions, redirections) and that no sbatch option needs.
# Kept: | & ! * ( ) [ ] of Slurm's feature and node expressions, and spaces (quoted as one word).
_SBATCH_UNSAFE = re.compile(r"[\\'\"`$;<>#]")


def _check_extra_flags(flags: tuple[str, ...], source: str) -> None:
    """Each flag reaches sbatch as one #SBATCH option, and none overrides what orch sets."""
    seen: set[str] = set()
    for i, flag in enumerate(flags):
        path = f"slurm.extra_flags[{i}]"
        name, eq, value = flag[2:].partition("=")
        bad = _SBATCH_UNSAFE.search(value)
        if bad:
            raise _error(source, path, f"{flag!r} contains {bad.group()!r}; not allowed in an sbatch flag")
        if eq and not value:
            raise _error(source, path, f"{flag!r} has an empty value; write --{name} without '='")
        # sbatch takes any unambiguous prefix of a long option, as getopt_long does: --out is --output.
        owned = [o for o in _SBATCH_OWNED if o.startswith(name)]
        if owned:
            full = name if name in owned else min(owned, key=len)
            said = f"--{name}" if full == name else f"--{name} (short for --{full})"
            raise _error(source, path, f"{said} is not allowed: {_SBATCH_OWNED.get(full, 'orch sets it')}")
        if name in seen:
            raise _error(source, path, f"--{name} is given twice")
        seen.add(name)


_RUNTIME_SOURCES = {
    "OMP_NUM_THREADS": "resources.cpus_per_rank",
    "ORCH_CKPT_INTERVAL": "storage.checkpoint_interval",
    "ORCH_CKPT_KEEP": "storage.keep",
    "ORCH_CKPT_ASYNC": "storage.async_save",
    "ORCH_DIST_BACKEND": "distributed.backend",
    "ORCH_COLLECTIVE_TIMEOUT_S": "distributed.timeout_s",
    "ORCH_DETERMINISTIC": "job.deterministic",
    "CUDA_VISIBLE_DEVICES": "resources.gpus_per_node (per node; under Slurm, Slurm sets it)",
}


def _runtime_hint(name: str) -> str:
    field_path = _RUNTIME_SOURCES.get(name)
    return f" from {field_path}" if field_path else ""


# What load_config does with a `sweep:` section (a sweep's base config and its points are read
# by orchestrator.spec.sweep): refuse it (orch run, orch submit), or leave it out (storage.root).
SweepSection = Literal["refuse", "ignore"]


def read_document(path: str) -> dict[str, Any]:
    """cluster.yaml as raw data (a mapping); a missing, unreadable or malformed file is one line."""
    source = path
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise _error(source, "<file>", "not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(source, "<file>", f"cannot read: {exc}") from None
    try:
        data = _yaml_load(text)
    except Exception as exc:  # noqa: BLE001 - whatever the YAML library raises, the file is at fault
        where, problem = _yaml_error(exc, text)
        raise _error(source, where, f"malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _error(source, "<top>", f"expected a mapping, got {_describe(data)}")
    return dict(data)


def load_config(
    path: str,
    overrides: typing.Iterable[str] = (),
    *,
    backend: str | None = None,
    check_files: bool = True,
    sweep: SweepSection = "refuse",
) -> ClusterConfig:
    """Read cluster.yaml, apply `--set` overrides and `--backend`, validate."""
    data = apply_overrides(read_document(path), overrides)
    if backend is not None:
        data["backend"] = backend
    if data.get("sweep") is not None:
        if sweep == "refuse":
            raise _error(
                path,
                "sweep",
                "this config is a sweep: start it with `orch sweep` (`orch render` shows every point)",
            )
    data.pop("sweep", None)  # `sweep: null` (--set sweep=null): one run of the base config
    return parse_config(
        data, source=path, base_dir=os.path.dirname(os.path.abspath(path)), check_files=check_files
    )


def config_from_run_record(record: Mapping[str, Any]) -> ClusterConfig:
    """The config frozen into a run's run.yaml (written by `orch run`/`orch submit`)."""
    return parse_config(
        record["config"], source="run.yaml", base_dir=record.get("base_dir", "."), check_files=False
    )


def quick_start_config(
    *,
    script: str | None,
    module: str | None,
    overrides: typing.Iterable[str] = (),
    backend: str | None = None,
    base_dir: str = ".",
) -> ClusterConfig:
    """The config of `orch run train.py` without a cluster.yaml: every default, the entrypoint,
    and the command line's overrides. Errors name the command line as their source."""
    job: dict[str, Any] = {"module": module} if module else {"script": script}
    data = apply_overrides({"job": job}, overrides)
    if backend is not None:
        data["backend"] = backend
    return parse_config(data, source="command line", base_dir=base_dir)


# What `orch resume --set` may change: a section (ending in ".") or one field.
# profile.*: observing a resumed attempt (or dropping ranks a smaller world no longer has).
RESUME_MAY_CHANGE = ("restart.", "resources.", "job.args", "profile.")


def config_for_resume(record: Mapping[str, Any], overrides: typing.Iterable[str]) -> ClusterConfig:
    """A run's frozen config with the `--set` overrides a resume may apply: the restart policy,
    the resources (a new world size resumes exactly), the job's arguments and the profiler.
    Anything else would make the resumed run a different run."""
    overrides = list(overrides)
    for text in overrides:
        key = text.partition("=")[0]
        if not any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUME_MAY_CHANGE):
            raise _error(
                "--set", key, "cannot change on resume (only restart.*, resources.*, job.args and profile.*)"
            )
    data = apply_overrides(record["config"], overrides)
    return parse_config(data, source="run.yaml", base_dir=record.get("base_dir", "."), check_files=False)


def config_to_dict(config: ClusterConfig) -> dict[str, Any]:
    """Plain data for run.yaml (no internal fields)."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {
                f.name: plain(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")
            }
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        if isinstance(obj, Mapping):
            return {k: plain(v) for k, v in obj.items()}
        return obj

    return plain(config)


def field_docs(cls: type = ClusterConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted path, doc, default) for every field: the reference in docs/ is generated from this."""
    out: list[tuple[str, str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.append((path, f.metadata.get("doc", ""), None))
            out.extend(field_docs(hints[f.name], path + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else {}
            out.append((path, f.metadata.get("doc", ""), default))
    return out
