"""cluster.yaml -> frozen dataclasses, and every bad input -> one line naming its dotted path.

Fast: no torch, no subprocesses except the console-script check at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import subprocess
import types
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.errors import ConfigError
from orchestrator.spec.config import ClusterConfig, apply_overrides, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "cluster.yaml"
ORCH = REPO / ".venv" / "bin" / "orch"


def default_mapping() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT.read_text(encoding="utf-8"))


def with_value(path: str, value: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the default mapping with the dotted `path` set to `value`."""
    data = copy.deepcopy(default_mapping() if data is None else data)
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def assert_one_line(exc: ConfigError, source: str, path: str) -> str:
    """str(exc) is exactly `<source>: <path>: <problem>` on one line; returns the problem."""
    msg = str(exc)
    assert msg.splitlines() == [msg], f"not one line: {msg!r}"
    assert msg == f"{source}: {path}: {exc.problem}", msg
    assert exc.problem and exc.problem.strip() == exc.problem
    return exc.problem


def parse_error(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, check_files=False)
    return info.value


# ---------------------------------------------------------------------------- the default file


def test_default_cluster_yaml_loads_with_expected_values() -> None:
    config = load_config(str(DEFAULT))
    assert isinstance(config, ClusterConfig)
    assert config.backend == "local"
    assert config.name is None and config.job_name == "train_ddp"
    assert config.job.script == "jobs/train_ddp.py" and config.job.module is None
    assert config.script_path == str(REPO / "jobs" / "train_ddp.py")
    assert config.job.args == ("--steps", "3000", "--batch-size", "32", "--log-every", "250")
    assert isinstance(config.job.env, types.MappingProxyType) and dict(config.job.env) == {}
    assert config.job.pass_env == () and config.job.python is None
    r = config.resources
    assert (r.nodes, r.ranks_per_node, r.world_size) == (1, 2, 2)
    assert (r.cpus_per_rank, r.gpus_per_node, r.memory) == (1, 0, None)
    assert r.time_limit == "00:30:00" and r.time_limit_minutes == 30
    assert config.distributed.backend == "auto" and config.distributed.master_port == "auto"
    s = config.storage
    assert (s.root, s.checkpoint_interval, s.keep, s.async_save) == ("./runs", 500, 2, False)
    assert config.storage_root == str(REPO / "runs")
    rs = config.restart
    assert (rs.max_restarts, rs.backoff_s, rs.backoff_max_s, rs.stop_grace_s) == (3, 1.0, 60.0, 10.0)
    assert all(isinstance(v, float) for v in (rs.backoff_s, rs.backoff_max_s, rs.stop_grace_s))
    sl = config.slurm
    assert (sl.partition, sl.account, sl.qos, sl.signal_lead_s, sl.max_requeues) == (
        None,
        None,
        None,
        120,
        10,
    )
    assert sl.setup == () and sl.extra_flags == ()
    assert config.base_dir == str(REPO)


@pytest.mark.parametrize(
    "section, name",
    [
        (None, "backend"),
        ("job", "script"),
        ("job", "args"),
        ("resources", "nodes"),
        ("distributed", "master_port"),
        ("storage", "keep"),
        ("restart", "backoff_s"),
        ("slurm", "setup"),
    ],
)
def test_config_is_frozen(section: str | None, name: str) -> None:
    config = load_config(str(DEFAULT))
    target = config if section is None else getattr(config, section)
    assert dataclasses.is_dataclass(target)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(target, name, getattr(target, name))


def test_env_mapping_and_lists_are_immutable() -> None:
    config = load_config(str(DEFAULT), ["job.env={A: '1'}"])
    with pytest.raises(TypeError):
        config.job.env["B"] = "2"  # type: ignore[index]
    assert isinstance(config.job.args, tuple)


def test_defaults_apply_for_missing_sections() -> None:
    config = parse_config({"job": {"module": "pkg.train"}}, check_files=False)
    assert config.resources.nodes == 1 and config.storage.keep == 2 and config.job.args == ()
    assert config.job_name == "train"


# ---------------------------------------------------------------------------- bad values

CONTROL = ["\n", "\r", "\t", "\x1b", "\x00", "\x7f", "\x85", "\u2028", "\ud800"]

BAD_VALUES = [
    # (dotted path to set, value, path in the message, regex on the problem)
    (
        "resources.ranks_per_nod",
        2,
        "resources.ranks_per_nod",
        r"^unknown key; did you mean 'ranks_per_node'\?$",
    ),
    ("backnd", "local", "backnd", r"^unknown key; did you mean 'backend'\?$"),
    (
        "storage.zzz",
        1,
        "storage.zzz",
        r"^unknown key; valid keys: async_save, checkpoint_interval, keep, root$",
    ),
    ("resources.nodes", "2", "resources.nodes", r"^expected an integer, got str '2'$"),
    ("resources.nodes", True, "resources.nodes", r"^expected an integer, got boolean true$"),
    ("resources.nodes", 2.0, "resources.nodes", r"^expected an integer, got float 2.0$"),
    ("resources.nodes", None, "resources.nodes", r"^expected an integer, got null$"),
    ("resources.nodes", 0, "resources.nodes", r"^must be >= 1, got 0$"),
    ("resources.nodes", -5, "resources.nodes", r"^must be >= 1, got -5$"),
    ("resources.nodes", 10**5000, "resources.nodes", r"^must be <= 65536, got <an integer of \d+ bits>$"),
    ("resources.ranks_per_node", 1025, "resources.ranks_per_node", r"^must be <= 1024, got 1025$"),
    ("storage.keep", 1, "storage.keep", r"^must be >= 2, got 1$"),
    ("storage.async_save", "yes", "storage.async_save", r"^expected true or false, got str 'yes'$"),
    ("distributed.master_port", 80, "distributed.master_port", r"^must be >= 1024, got 80$"),
    ("distributed.master_port", 70000, "distributed.master_port", r"^must be <= 65535, got 70000$"),
    (
        "distributed.master_port",
        "fixed",
        "distributed.master_port",
        r"^expected an integer or 'auto', got str 'fixed'$",
    ),
    (
        "distributed.master_port",
        True,
        "distributed.master_port",
        r"^expected an integer or 'auto', got boolean true$",
    ),
    (
        "distributed.backend",
        "mpi",
        "distributed.backend",
        r"^expected one of 'auto', 'gloo', 'nccl', got str 'mpi'$",
    ),
    ("backend", "kubernetes", "backend", r"^expected one of 'local', 'slurm', got str 'kubernetes'$"),
    ("restart.backoff_s", math.nan, "restart.backoff_s", r"^must be a finite number$"),
    ("restart.backoff_s", math.inf, "restart.backoff_s", r"^must be a finite number$"),
    ("restart.backoff_s", -0.5, "restart.backoff_s", r"^must be >= 0.0, got -0.5$"),
    ("restart.backoff_s", 10**400, "restart.backoff_s", r"^must be <= 3600.0, got <an integer of \d+ bits>$"),
    ("resources.memory", "16GB", "resources.memory", r"^'16GB' is not valid \(Memory per node"),
    ("resources.time_limit", "1h", "resources.time_limit", r"^'1h' is not valid"),
    ("resources.time_limit", 1.5, "resources.time_limit", r"^expected a string or null, got float 1.5$"),
    ("name", "my job", "name", r"^'my job' is not valid"),
    ("slurm.extra_flags", ["-x"], "slurm.extra_flags[0]", r"^'-x' is not valid"),
    ("job.args", "--steps 3", "job.args", r"^expected a list of strings, got str '--steps 3'$"),
    ("job.args", ["a", ["b"]], "job.args[1]", r"^expected a string, got a list$"),
    ("job.args", ["a", None], "job.args[1]", r"^expected a string, got null$"),
    ("job.args", [10**5000], "job.args[0]", r"^integer too long; quote it"),
    ("job.env", ["A=1"], "job.env", r"^expected a mapping of strings, got a list$"),
    ("job.env", {"1BAD": "x"}, "job.env.1BAD", r"^is not a valid environment variable name$"),
    ("job.env", {"A-B": "x"}, "job.env.A-B", r"^is not a valid environment variable name$"),
    ("job.env", {"": "x"}, "job.env.", r"^is not a valid environment variable name$"),
    ("job.env", {5: "x"}, "job.env.5", r"^is not a valid environment variable name$"),
    ("job.env", {"A\n": "x"}, "job.env.A\\n", r"^is not a valid environment variable name$"),
    ("job.env", {"A": {"b": 1}}, "job.env.A", r"^expected a string, got a mapping$"),
    ("job.env", {"A": True}, "job.env.A", r"^expected a string, got boolean true$"),
    ("job.env", {"RANK": "3"}, "job.env.RANK", r"^is set by the orchestrator \(env contract\); remove it$"),
    ("job.env", {"MASTER_PORT": "1"}, "job.env.MASTER_PORT", r"env contract"),
    ("job.env", {"ORCH_RUN_DIR": "/x"}, "job.env.ORCH_RUN_DIR", r"env contract"),
    (
        "job.env",
        {"OMP_NUM_THREADS": "4"},
        "job.env.OMP_NUM_THREADS",
        r"^is set by the orchestrator from resources.cpus_per_rank; remove it$",
    ),
    (
        "job.pass_env",
        ["WORLD_SIZE"],
        "job.pass_env[0]",
        r"^WORLD_SIZE is set by the orchestrator; remove it$",
    ),
    ("job.pass_env", ["OK", "BAD-NAME"], "job.pass_env[1]", r"^'BAD-NAME' is not valid"),
    ("job.module", "bad-module", "job.module", r"^'bad-module' is not valid"),
    ("resources", [1], "resources", r"^expected a mapping, got a list$"),
    ("job", "train.py", "job", r"^expected a mapping, got str 'train.py'$"),
]


@pytest.mark.parametrize(
    "set_path, value, path, problem", BAD_VALUES, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_VALUES)]
)
def test_bad_value_is_one_line_error(set_path: str, value: Any, path: str, problem: str) -> None:
    exc = parse_error(with_value(set_path, value))
    assert re.search(problem, assert_one_line(exc, "cluster.yaml", path)), str(exc)


def test_top_level_must_be_a_mapping() -> None:
    exc = parse_error(["a", "b"])
    assert assert_one_line(exc, "cluster.yaml", "<top>") == "expected a mapping, got a list"


def test_non_string_top_level_key() -> None:
    data = default_mapping()
    data[7] = "x"
    exc = parse_error(data)
    assert assert_one_line(exc, "cluster.yaml", "7").startswith("unknown key")


@pytest.mark.parametrize(
    "job, problem", [({"args": []}, "neither"), ({"script": "a.py", "module": "a"}, "both")]
)
def test_exactly_one_entrypoint(job: dict[str, Any], problem: str) -> None:
    exc = parse_error({"job": job})
    assert assert_one_line(exc, "cluster.yaml", "job") == "set exactly one of job.script or job.module"


def test_pass_env_and_env_overlap() -> None:
    data = with_value("job.env", {"FOO": "1"})
    exc = parse_error(with_value("job.pass_env", ["FOO"], data))
    assert (
        assert_one_line(exc, "cluster.yaml", "job.pass_env")
        == "FOO is also set in job.env; set it in one place"
    )


@pytest.mark.parametrize("char", CONTROL, ids=[ascii(c) for c in CONTROL])
@pytest.mark.parametrize(
    "set_path, make, path",
    [
        ("job.script", lambda s: f"train{s}.py", "job.script"),
        ("job.python", lambda s: f"/usr/bin/python{s}", "job.python"),
        ("storage.root", lambda s: f"./runs{s}", "storage.root"),
        ("name", lambda s: f"job{s}", "name"),
        ("resources.time_limit", lambda s: f"00:30:00{s}", "resources.time_limit"),
        ("slurm.partition", lambda s: f"gpu{s}", "slurm.partition"),
        ("job.args", lambda s: ["--ok", f"--bad{s}x"], "job.args[1]"),
        ("job.env", lambda s: {"GOOD": "v", "BAD": f"x{s}y"}, "job.env.BAD"),
        ("job.pass_env", lambda s: [f"HOME{s}"], "job.pass_env[0]"),
        ("slurm.setup", lambda s: ["module load cuda", f"echo hi{s}rm -rf /"], "slurm.setup[1]"),
        ("slurm.extra_flags", lambda s: [f"--constraint=a100{s}"], "slurm.extra_flags[0]"),
    ],
)
def test_control_characters_rejected(set_path: str, make: Any, path: str, char: str) -> None:
    exc = parse_error(with_value(set_path, make(char)))
    assert assert_one_line(exc, "cluster.yaml", path).startswith("contains a control character")


def test_key_with_newline_is_escaped_in_the_message() -> None:
    exc = parse_error(with_value("resources.a\nb\x1b", 1))
    msg = str(exc)
    assert msg.splitlines() == [msg] and "\x1b" not in msg
    assert msg.startswith("cluster.yaml: resources.a\\nb\\x1b: unknown key")


# ---------------------------------------------------------------------------- files


def write(tmp_path: Path, text: str | bytes, name: str = "cluster.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "text, where, problem",
    [
        (
            "backend: local\njob: [\n",
            "line 3, column 1",
            "expected the node content, but found '<stream end>'",
        ),
        ("a: b: c\n", "line 1, column 5", "mapping values are not allowed here"),
        (
            "backend: local\n\tjob: {}\n",
            "line 2, column 1",
            "found character '\\t' that cannot start any token",
        ),
        ("backend: local\nresources:\n  nodes: 1\n bad: 2\n", "line 4, column 2", "expected <block end>"),
        ("job:\n  script: x.py\n  args: [\x07]\n", "line 3, column 10", "unacceptable character #x0007"),
        ("backend: local\nbackend: slurm\n", "line 2, column 1", "duplicate key 'backend'"),
        ("job:\n  name: 2020-13-01\n", "line 2, column 9", "month must be in 1..12"),
        ("name: " + "1" * 5000 + "\n", "line 1, column 7", "Exceeds the limit"),
        ("x: !!int foo\n", "line 1, column 4", "invalid literal"),
        ("x: " + "[" * 600 + "]" * 600 + "\n", "<file>", "nested too deeply"),
    ],
    ids=[
        "eof",
        "mapping-values",
        "tab",
        "indent",
        "bell",
        "duplicate",
        "bad-date",
        "huge-int",
        "bad-tag",
        "deep",
    ],
)
def test_malformed_yaml_reports_line_and_column(tmp_path: Path, text: str, where: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    got = assert_one_line(info.value, path, where)
    assert got.startswith("malformed YAML: ") and problem in got, got


@pytest.mark.parametrize(
    "content, where, problem",
    [
        (b"\xff\xfe\x00garbage", "<file>", "cannot read: 'utf-8' codec can't decode"),
        (b"42\n", "<top>", "expected a mapping, got int 42"),
        (b"- a\n- b\n", "<top>", "expected a mapping, got a list"),
        (b"", "job", "set exactly one of job.script or job.module"),
        (b"x: &a [*a]\n", "x", "unknown key"),
    ],
)
def test_unreadable_or_wrong_shape(tmp_path: Path, content: bytes, where: str, problem: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert assert_one_line(info.value, path, where).startswith(problem)


@pytest.mark.parametrize("depth", [50, 250, 350, 450, 600])
def test_deep_nesting_is_a_config_error(tmp_path: Path, depth: int) -> None:
    """However deep the YAML nests, the answer is one line: either the parser's or the walker's."""
    path = write(tmp_path, "job:\n  module: m\n  args: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["job.env.A=1"])
    assert info.value.path in ("<file>", "job.args[0]")
    assert_one_line(info.value, path, info.value.path)


def test_aliases_stay_shared_but_overrides_do_not_leak(tmp_path: Path) -> None:
    # A billion-laughs file is cheap: aliases are not expanded into copies.
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1},"
        f" *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
        for i in range(1, 9)
    )
    path = write(tmp_path, laughs)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["job.module=m"])
    assert info.value.path == "a0"
    raw = {"a": {"k": 1}}
    raw["b"] = raw["a"]
    out = apply_overrides(raw, ["a.k=2"])
    assert out == {"a": {"k": 2}, "b": {"k": 1}} and raw == {"a": {"k": 1}, "b": {"k": 1}}


def test_missing_config_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.yaml"))
    assert assert_one_line(info.value, str(tmp_path / "nope.yaml"), "<file>") == "not found"
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert assert_one_line(info.value, str(tmp_path), "<file>").startswith("cannot read:")


def test_missing_entrypoint_file(tmp_path: Path) -> None:
    path = write(tmp_path, "job:\n  script: missing.py\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert assert_one_line(info.value, path, "job.script") == f"file not found: {tmp_path / 'missing.py'}"
    # check_files=False (status, ls) skips only that check.
    assert load_config(path, check_files=False).script_path == str(tmp_path / "missing.py")
    (tmp_path / "missing.py").write_text("print('hi')\n")
    assert load_config(path).script_path == str(tmp_path / "missing.py")


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.py").write_text("")
    path = write(tmp_path, "job: {script: sub/t.py}\nstorage: {root: out}\n")
    config = load_config(path)
    assert config.script_path == str(tmp_path / "sub" / "t.py")
    assert config.storage_root == str(tmp_path / "out")
    assert load_config(path, ["storage.root=s3://bucket/runs/"]).storage_root == "s3://bucket/runs"


# ---------------------------------------------------------------------------- overrides


def test_set_overrides() -> None:
    config = load_config(
        str(DEFAULT),
        [
            "resources.nodes=3",
            "job.args=[a,b]",
            "restart.backoff_s=2",
            "storage.async_save=true",
            "job.env.FOO=bar",
        ],
    )
    assert config.resources.nodes == 3 and type(config.resources.nodes) is int
    assert config.job.args == ("a", "b")
    assert config.restart.backoff_s == 2.0 and type(config.restart.backoff_s) is float
    assert config.storage.async_save is True
    assert dict(config.job.env) == {"FOO": "bar"}
    # Later overrides win; the file itself is untouched.
    assert load_config(str(DEFAULT), ["resources.nodes=3", "resources.nodes=5"]).resources.nodes == 5
    assert load_config(str(DEFAULT)).resources.nodes == 1


def test_set_switches_entrypoint_to_module() -> None:
    config = load_config(str(DEFAULT), ["job.script=null", "job.module=pkg.train"])
    assert config.job.script is None and config.job.module == "pkg.train" and config.job_name == "train"


def test_set_value_that_is_not_yaml_is_text() -> None:
    # A bad date is text, not a crash inside the YAML library.
    assert load_config(str(DEFAULT), ["name=2020-13-01"]).name == "2020-13-01"
    assert load_config(str(DEFAULT), ["job.args=[a, '2020-13-01']"]).job.args == ("a", "2020-13-01")
    assert load_config(str(DEFAULT), ["resources.memory=16G"]).resources.memory == "16G"


@pytest.mark.parametrize(
    "override, source, path, problem",
    [
        (
            "resources.ranks_per_nod=3",
            "cluster.yaml",
            "resources.ranks_per_nod",
            r"^unknown key; did you mean 'ranks_per_node'\?$",
        ),
        ("resourcez.nodes=3", "cluster.yaml", "resourcez", r"^unknown key; did you mean 'resources'\?$"),
        ("resources.nodes=0", "cluster.yaml", "resources.nodes", r"^must be >= 1, got 0$"),
        ("resources.nodes=two", "cluster.yaml", "resources.nodes", r"^expected an integer, got str 'two'$"),
        ('job.args=[a, "b\\nc"]', "cluster.yaml", "job.args[1]", r"^contains a control character"),
        ("job.args.x=1", "--set", "job.args", r"^is not a mapping$"),
        ("novalue", "--set", "novalue", r"^expected --set dotted.path=value$"),
        ("=3", "--set", "=3", r"^expected --set dotted.path=value$"),
        ("resources..nodes=3", "--set", "resources..nodes", r"^expected --set dotted.path=value$"),
        ("a\nb=1", "cluster.yaml", "a\\nb", r"^unknown key"),
    ],
)
def test_bad_set_override(override: str, source: str, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(DEFAULT), [override])
    src = str(DEFAULT) if source == "cluster.yaml" else source
    assert re.search(problem, assert_one_line(info.value, src, path)), str(info.value)


def test_apply_overrides_copies() -> None:
    raw = default_mapping()
    before = copy.deepcopy(raw)
    out = apply_overrides(raw, ["resources.nodes=4", "job.env.X=1", "new.deep.key=v"])
    assert raw == before
    assert (
        out["resources"]["nodes"] == 4
        and out["job"]["env"] == {"X": 1}
        and out["new"] == {"deep": {"key": "v"}}
    )


def test_backend_argument_overrides_file_and_set() -> None:
    assert load_config(str(DEFAULT), backend="slurm").backend == "slurm"
    assert load_config(str(DEFAULT), ["backend=slurm"], backend="local").backend == "local"
    with pytest.raises(ConfigError) as info:
        load_config(str(DEFAULT), backend="k8s")
    assert assert_one_line(info.value, str(DEFAULT), "backend").startswith("expected one of 'local', 'slurm'")


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_nccl_without_gpus_is_rejected_on_both_backends(backend: str) -> None:
    # The local backend gives each simulated node resources.gpus_per_node GPUs: 0 is a CPU node.
    with pytest.raises(ConfigError) as info:
        load_config(str(DEFAULT), ["distributed.backend=nccl"], backend=backend)
    assert (
        assert_one_line(info.value, str(DEFAULT), "distributed.backend")
        == "nccl needs GPUs: set resources.gpus_per_node >= 1 (or use gloo)"
    )


@pytest.mark.parametrize("backend", ["nccl", "auto"])
def test_more_ranks_than_gpus_per_node_is_rejected_unless_gloo(backend: str) -> None:
    over = ["resources.ranks_per_node=4", "resources.gpus_per_node=2", f"distributed.backend={backend}"]
    with pytest.raises(ConfigError) as info:
        load_config(str(DEFAULT), over)
    message = assert_one_line(info.value, str(DEFAULT), "resources.ranks_per_node")
    assert message.startswith("4 ranks per node with 2 GPU(s) per node:") and "a GPU per rank" in message
    # gloo may share GPUs (or not use them); as many GPUs as ranks, or more, is fine
    assert load_config(str(DEFAULT), [*over[:2], "distributed.backend=gloo"]).resources.ranks_per_node == 4
    assert (
        load_config(str(DEFAULT), [over[0], "resources.gpus_per_node=8", over[2]]).resources.gpus_per_node
        == 8
    )


# ---------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "name", ["WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "OPENAI_KEY", "my_token"]
)
def test_secret_in_job_env_is_refused_with_the_way_out(name: str) -> None:
    exc = parse_error(with_value("job.env", {"MODE": "fast", name: "s3cret-value"}))
    problem = assert_one_line(exc, "cluster.yaml", f"job.env.{name}")
    assert problem == (
        "looks like a secret and job.env is stored in clear in run.yaml;"
        f" export {name} and list it in job.pass_env instead"
    )
    assert "s3cret-value" not in str(exc)
    # The way out the message names is accepted.
    config = parse_config(with_value("job.pass_env", [name], with_value("job.env", {"MODE": "fast"})))
    assert config.job.pass_env == (name,) and dict(config.job.env) == {"MODE": "fast"}


def test_secret_in_job_env_is_refused_from_the_command_line_too() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(DEFAULT), ["job.env.HF_TOKEN=hf_abc"])
    assert assert_one_line(info.value, str(DEFAULT), "job.env.HF_TOKEN").startswith("looks like a secret")


@pytest.mark.parametrize(
    "args,index",
    [
        (["--steps", "10", "--api-key=sk-live"], 2),
        (["--hf_token", "hf_abc", "--steps", "10"], 0),
        (["-wandb-api-key", "x"], 0),
        (["--db-password=hunter2"], 0),
    ],
)
def test_a_secret_in_job_args_is_refused_without_echoing_it(args: list[str], index: int) -> None:
    exc = parse_error(with_value("job.args", args))
    problem = assert_one_line(exc, "cluster.yaml", f"job.args[{index}]")
    assert problem.endswith(
        "looks like it carries a secret and job.args is stored in clear in run.yaml;"
        " have the script read it from an environment variable listed in job.pass_env"
    )
    assert not any(secret in str(exc) for secret in ("sk-live", "hf_abc", "hunter2"))


def test_option_words_that_carry_no_secret_stay_allowed_in_job_args() -> None:
    args = [
        "--max-tokens",
        "2048",
        "--tokenizer",
        "gpt2",
        "--sort-key",
        "loss",
        "--api-key-file=/run/k",
        "--hf-token",
    ]
    # a flag without a value (the last) is a switch; `--api-key-file` names where a secret is kept
    assert parse_config(with_value("job.args", args), check_files=False).job.args == tuple(args)


def test_token_words_that_are_not_tokens_stay_allowed_in_job_env() -> None:
    env = {"TOKENIZERS_PARALLELISM": "false", "MAX_TOKENS": "2048", "KEYBOARD": "us"}
    assert dict(parse_config(with_value("job.env", env), check_files=False).job.env) == env


# ---------------------------------------------------------------------------- sbatch flags

GOOD_FLAGS = [
    "--exclusive",
    "--constraint=[rack1*2&rack2*2]|a100",
    "--nodelist=n[1-3],n7",
    "--mail-type=END,FAIL",
    "--mail-user=me@example.org",
    "--comment=two words --partition=other",  # one quoted value: sbatch reads no second option
    "--dependency=afterok:123:124",
    "--mem-per-cpu=2G",
    "--time-min=30",
    "--ntasks-per-core=1",
    "--hold",
]


def test_ordinary_sbatch_flags_are_accepted() -> None:
    config = parse_config(with_value("slurm.extra_flags", GOOD_FLAGS), check_files=False)
    assert config.slurm.extra_flags == tuple(GOOD_FLAGS)


@pytest.mark.parametrize("char", list("\\'\"`$;<>#"))
def test_sbatch_flag_value_with_a_shell_or_sbatch_metacharacter_is_refused(char: str) -> None:
    flag = f"--comment=a{char}b"
    exc = parse_error(with_value("slurm.extra_flags", ["--exclusive", flag]))
    problem = assert_one_line(exc, "cluster.yaml", "slurm.extra_flags[1]")
    assert problem == f"{flag!r} contains {char!r}; not allowed in an sbatch flag"


@pytest.mark.parametrize(
    "flag, problem",
    [
        ("--export=NONE", "--export is not allowed: ranks get the submitting environment"),
        ("--export-file=/tmp/env", "--export-file is not allowed: ranks get the submitting environment"),
        ("--wrap=hostname", "--wrap is not allowed: it would replace the batch script orch submits"),
        ("--output=/tmp/x.log", "--output is not allowed: orch keeps the batch log in the run directory"),
        ("--error=/tmp/x.log", "--error is not allowed: orch keeps the batch log in the run directory"),
        ("--open-mode=truncate", "--open-mode is not allowed: orch appends to the batch log"),
        ("--nodes=4", "--nodes is not allowed: set it with resources.nodes"),
        ("--time=10", "--time is not allowed: set it with resources.time_limit"),
        ("--partition=x", "--partition is not allowed: set it with slurm.partition"),
        ("--job-name=x", "--job-name is not allowed: set it with name"),
        ("--signal=USR1@10", "--signal is not allowed: set it with slurm.signal_lead_s"),
        ("--no-requeue", "--no-requeue is not allowed: orch requeues preempted jobs"),
        ("--array=0-3", "--array is not allowed: a run is one job"),
        ("--wait", "--wait is not allowed: orch submit would block"),
        # sbatch, like getopt_long, takes an unambiguous prefix of a long option.
        ("--expo=NONE", "--expo (short for --export) is not allowed"),
        ("--out=/tmp/x", "--out (short for --output) is not allowed"),
        ("--wra=id", "--wra (short for --wrap) is not allowed"),
        ("--part=x", "--part (short for --partition) is not allowed"),
        ("--comment=", "'--comment=' has an empty value; write --comment without '='"),
    ],
)
def test_sbatch_flags_that_would_undo_what_orch_sets_are_refused(flag: str, problem: str) -> None:
    exc = parse_error(with_value("slurm.extra_flags", ["--exclusive", flag]))
    assert assert_one_line(exc, "cluster.yaml", "slurm.extra_flags[1]").startswith(problem)


def test_sbatch_flag_given_twice_is_refused() -> None:
    exc = parse_error(with_value("slurm.extra_flags", ["--constraint=a", "--exclusive", "--constraint=b"]))
    assert assert_one_line(exc, "cluster.yaml", "slurm.extra_flags[2]") == "--constraint is given twice"


@pytest.mark.parametrize("line", ["#SBATCH --partition=x", "#PBS -N x", " # bsub -J x"])
def test_setup_lines_cannot_be_directives_sbatch_reads(line: str) -> None:
    exc = parse_error(with_value("slurm.setup", ["module load cuda", line]))
    assert assert_one_line(exc, "cluster.yaml", "slurm.setup[1]").startswith(f"{line!r} is not valid")


def test_backslash_in_storage_root_is_refused_on_slurm_only() -> None:
    data = with_value("storage.root", "/shared/a\\b")
    assert parse_config(data, check_files=False).storage.root == "/shared/a\\b"
    exc = parse_error(with_value("backend", "slurm", data))
    assert assert_one_line(exc, "cluster.yaml", "storage.root") == (
        "contains a backslash, which sbatch misreads; not allowed on slurm"
    )


# ---------------------------------------------------------------------------- property tests

_TRICKY_TEXT = [
    "",
    " ",
    "auto",
    "local",
    "slurm",
    "gloo",
    "nccl",
    "16G",
    "00:30:00",
    "1-00:00:00",
    "RANK",
    "OMP_NUM_THREADS",
    "pkg.train",
    "--flag=x",
    "a\nb",
    "\x1b[31m",
    "\x00",
    "\u2028",
    "\ud800",
    "\x85",
    "./runs",
    "s3://b/r",
]
_TRICKY_INT = [0, 1, -1, 2, 1023, 1024, 65535, 65536, 2**31, 2**63, -(2**63), 10**30]

scalars = st.one_of(
    st.text(max_size=20),
    st.sampled_from(_TRICKY_TEXT),
    st.integers(),
    st.sampled_from(_TRICKY_INT),
    # Past 4300 digits str() of an int raises; built lazily so hypothesis can repr the strategy.
    st.sampled_from([400, 5000]).flatmap(lambda e: st.sampled_from([10**e, -(10**e)])),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)
keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["nodes", "script", "module", "env", "RANK", "A", "job", "a\nb"]),
    st.integers(),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, prefix + (i,)))
    return out


def _containers(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if isinstance(node, (dict, list)) else []
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_containers(v, prefix + (k,)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_containers(v, prefix + (i,)))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    data = default_mapping()
    data["job"]["env"] = {"FOO": "bar"}
    data["slurm"]["setup"] = ["module load cuda"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "replace", "add", "delete"]))
        if op == "replace":
            path = draw(st.sampled_from(_paths(data)))
            _get(data, path[:-1])[path[-1]] = draw(values)
        elif op == "add":
            target = _get(data, draw(st.sampled_from(_containers(data))))
            if isinstance(target, dict):
                target[draw(keys)] = draw(values)
            else:
                target.append(draw(values))
        else:
            path = draw(st.sampled_from(_paths(data)))
            del _get(data, path[:-1])[path[-1]]
    return data


def _check_valid(config: ClusterConfig) -> None:
    """What a ClusterConfig that validated promises to the rest of the program."""
    assert 1 <= config.resources.world_size
    assert (config.job.script is None) != (config.job.module is None)
    strings = [
        *config.job.args,
        *config.job.env.keys(),
        *config.job.env.values(),
        *config.job.pass_env,
        *config.slurm.setup,
    ]
    strings += [
        s
        for s in (config.job.script, config.job.module, config.job.python, config.name, config.storage.root)
        if s is not None
    ]
    for s in strings:  # no control character, line/paragraph separator or lone surrogate survives
        assert isinstance(s, str) and not any(
            unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in s
        ), repr(s)
    for f in (config.restart.backoff_s, config.restart.backoff_max_s, config.restart.stop_grace_s):
        assert isinstance(f, float) and math.isfinite(f)
    assert config.job_name
    minutes = config.resources.time_limit_minutes
    assert minutes is None or minutes >= 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backend = "local"  # type: ignore[misc]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(mutated_configs())
def test_property_any_mutation_gives_config_or_one_line_error(data: dict[str, Any]) -> None:
    try:
        config = parse_config(data, check_files=False)
    except ConfigError as exc:
        event("ConfigError")
        msg = str(exc)
        assert msg.startswith("cluster.yaml: "), msg
        assert msg.splitlines() == [msg] and msg.isprintable(), repr(msg)
        assert msg == f"cluster.yaml: {exc.path}: {exc.problem}"
    else:
        event("valid")
        _check_valid(config)


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "train.py").write_text("print('hi')\n")
    return d


VALID_TEXT = DEFAULT.read_text(encoding="utf-8").replace("jobs/train_ddp.py", "train.py")
_FRAGMENTS = [
    "\n",
    ":",
    " ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    "&a",
    "*a",
    "!!int",
    "\t",
    "\x00",
    "\x1b",
    "#",
    "'",
    '"',
    "\\n",
    "\\u2028",
    "nodes: 0",
    "\n  bad: 1",
    "RANK: '1'",
    "99999999999999999999",
    "2020-13-01",
    "\nname: 2020-13-01\n",
    "\nx: !!int foo\n",
    "\nname: " + "7" * 4400 + "\n",
    ' "\\x85", ',
    "\nbackend: local\n",
    "\n  RANK: x\n",
    "\n  A\\n: x\n",
]


@st.composite
def config_texts(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.sampled_from(["bytes", "text", "edit", "edit", "edit"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200))
    text = VALID_TEXT
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        insert = draw(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=6)))
        text = text[:pos] + insert + text[pos + cut :]
    return text


def _render_in_process(
    path: Path, content: str | bytes, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
    capsys.readouterr()
    rc = main(["render", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(config_texts())
def test_property_render_exits_0_or_2_with_one_line(
    cli_dir: Path, capsys: pytest.CaptureFixture[str], content: str | bytes
) -> None:
    path = cli_dir / "cluster.yaml"
    rc, out, err = _render_in_process(path, content, capsys)
    event(f"exit {rc}")
    if rc == 0 and out.startswith("# orch render --backend slurm"):
        assert err == "" and "#SBATCH --nodes=" in out and "\nsrun " in out
        return
    if rc == 0:
        assert err == "" and out.startswith("# orch render: local launch spec")
        doc = yaml.safe_load(out)
        assert doc["backend"] == "local" and doc["world_size"] == sum(len(n["ranks"]) for n in doc["nodes"])
        return
    assert "Traceback" not in err and out == ""
    assert err.endswith("\n") and err[:-1].splitlines() == [err[:-1]], repr(err)
    assert rc == 2, (rc, err)
    assert err.startswith(f"{path}: "), err


def test_render_valid_text_exits_0(cli_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The fuzz above also reaches exit 0: the unedited text renders."""
    rc, out, err = _render_in_process(cli_dir / "cluster.yaml", VALID_TEXT, capsys)
    assert (rc, err) == (0, "") and "train.py" in out


BAD_FILES = {
    "garbage.yaml": b"\xff\xfe\x00\x01garbage",
    "malformed.yaml": b"backend: local\njob: [\n",
    "unknown.yaml": b"job: {script: t.py}\nresources: {ranks_per_nod: 2}\n",
    "control.yaml": b'job: {script: t.py, args: ["a\\nb"]}\n',
    "huge.yaml": b"job: {script: t.py}\nresources: {nodes: " + b"9" * 5000 + b"}\n",
    "missing-entrypoint.yaml": b"job: {script: nope.py}\n",
}


@pytest.mark.parametrize("name", [*BAD_FILES, "does-not-exist.yaml"])
def test_console_script_bad_file(tmp_path: Path, name: str) -> None:
    (tmp_path / "t.py").write_text("")
    if name in BAD_FILES:
        (tmp_path / name).write_bytes(BAD_FILES[name])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [str(ORCH), "render", name], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.endswith("\n") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"{name}: "), proc.stderr


def test_time_limit_accepts_plain_minutes_as_sbatch_does():
    config = parse_config({"job": {"module": "m"}, "resources": {"time_limit": 90}}, check_files=False)
    assert config.resources.time_limit == "90" and config.resources.time_limit_minutes == 90


def test_job_args_and_env_are_the_text_as_written(tmp_path: Path) -> None:
    # YAML 1.1 reads `on` as true and `0x10` as 16; the job must get what the user typed.
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "job:\n  script: train.py\n  args: [--amp, on, --lr, 1e3, --mask, 0x10, --n, 010, '--q', 1.50]\n"
        "  env: {FLAG: yes, NUM: 0x1}\n"
    )
    (tmp_path / "train.py").write_text("")
    config = load_config(str(path))
    assert config.job.args == ("--amp", "on", "--lr", "1e3", "--mask", "0x10", "--n", "010", "--q", "1.50")
    assert dict(config.job.env) == {"FLAG": "yes", "NUM": "0x1"}
    config = load_config(str(path), ["job.args=[--amp,on,--steps,10,0x10]"])
    assert config.job.args == ("--amp", "on", "--steps", "10", "0x10")
    # Everything else is still YAML: a number is a number.
    assert load_config(str(path), ["resources.nodes=0x2"]).resources.nodes == 2


@pytest.mark.parametrize(
    "written,minutes",
    [("12:00:00", 720), ("1:30:00", 90), ("00:30:00", 30), ("90", 90), ("1-00:00:00", 1440), ("45:00", 45)],
)
def test_a_time_limit_is_read_as_written_not_as_a_base_60_integer(
    tmp_path: Path, written: str, minutes: int
) -> None:
    # YAML 1.1 reads an unquoted 12:00:00 as 43200: 30 days of minutes instead of 12 hours.
    (tmp_path / "train.py").write_text("")
    path = write(tmp_path, f"job: {{script: train.py}}\nresources: {{time_limit: {written}}}\n")
    from_file = load_config(path, [])
    from_set = load_config(path, [f"resources.time_limit={written}"])
    assert from_file.resources.time_limit == from_set.resources.time_limit == written
    assert from_file.resources.time_limit_minutes == minutes
    assert load_config(path, ["resources.time_limit=null"]).resources.time_limit is None
