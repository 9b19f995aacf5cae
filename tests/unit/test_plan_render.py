"""The launch plan (who runs where, with which env contract) and its rendering.

Fast and pure: no torch; subprocesses only to check that two `orch render` runs agree byte for byte.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.contract import CONTRACT_VARS, PER_RANK_VARS, RUNTIME_VARS
from orchestrator.spec.config import ClusterConfig, load_config, parse_config
from orchestrator.spec.plan import (
    REDACTED,
    LaunchPlan,
    RankEnv,
    RankSpec,
    build_local_plan,
    contract_env,
    is_redacted,
    is_secret_name,
    redact,
    runtime_env,
)
from orchestrator.spec.render import render_local

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "cluster.yaml"
ORCH = REPO / ".venv" / "bin" / "orch"
PY = "/opt/py/bin/python3"


def config_2x2(*overrides: str) -> ClusterConfig:
    return load_config(str(DEFAULT), ["resources.nodes=2", "resources.ranks_per_node=2", *overrides])


def plan_of(config: ClusterConfig, **kw: Any) -> LaunchPlan:
    args: dict[str, Any] = dict(run_id="r-1", run_dir="/runs/r-1", attempt=3, master_port=29512, python=PY)
    args.update(kw)
    return build_local_plan(config, **args)


# ---------------------------------------------------------------------------- the plan


def test_two_nodes_by_two_ranks() -> None:
    config = config_2x2()
    plan = plan_of(config)
    assert (plan.nnodes, plan.ranks_per_node, plan.world_size) == (2, 2, 4)
    assert [s.rank for s in plan.ranks] == [0, 1, 2, 3]
    assert [(s.node_rank, s.local_rank) for s in plan.ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert (plan.run_id, plan.run_dir, plan.attempt, plan.master_addr, plan.master_port) == (
        "r-1",
        "/runs/r-1",
        3,
        "127.0.0.1",
        29512,
    )
    for spec in plan.ranks:
        assert spec.argv == (PY, str(REPO / "jobs" / "train_ddp.py"), *config.job.args)


@pytest.mark.parametrize("nodes, per_node", [(1, 1), (1, 3), (3, 1), (2, 2), (3, 4)])
def test_env_contract_of_every_rank(nodes: int, per_node: int) -> None:
    config = load_config(
        str(DEFAULT),
        [f"resources.nodes={nodes}", f"resources.ranks_per_node={per_node}", "job.env={EXTRA: 'x'}"],
    )
    plan = plan_of(config, attempt=2, master_addr="10.0.0.7")
    assert len(plan.ranks) == nodes * per_node
    for spec in plan.ranks:
        env = spec.env
        expected = {
            "RANK": str(spec.rank),
            "LOCAL_RANK": str(spec.local_rank),
            "WORLD_SIZE": str(nodes * per_node),
            "LOCAL_WORLD_SIZE": str(per_node),
            "NODE_RANK": str(spec.node_rank),
            "GROUP_RANK": str(spec.node_rank),
            "NNODES": str(nodes),
            "MASTER_ADDR": "10.0.0.7",
            "MASTER_PORT": "29512",
            "TORCHELASTIC_RESTART_COUNT": "2",
            "ROLE_RANK": str(spec.rank),
            "ROLE_NAME": "default",
            "ROLE_WORLD_SIZE": str(nodes * per_node),
            "GROUP_WORLD_SIZE": str(nodes),
            "TORCHELASTIC_RUN_ID": "r-1",
            "TORCHELASTIC_MAX_RESTARTS": str(config.restart.max_restarts),
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            "ORCH_RUN_ID": "r-1",
            "ORCH_RUN_DIR": "/runs/r-1",
            "ORCH_ATTEMPT": "2",
        }
        assert tuple(expected) == CONTRACT_VARS  # the test names every contract variable, no more
        assert {k: env[k] for k in CONTRACT_VARS} == expected
        assert spec.rank == spec.node_rank * per_node + spec.local_rank
        # Nothing besides the contract, the runtime settings, job.env and the node's GPUs
        # (none: gpus_per_node is 0, a CPU node).
        assert set(env) == set(CONTRACT_VARS) | set(runtime_env(config)) | {"EXTRA", "CUDA_VISIBLE_DEVICES"}
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["EXTRA"] == "x" and env["OMP_NUM_THREADS"] == "1" and env["PYTHONUNBUFFERED"] == "1"
        assert all(isinstance(v, str) for v in env.values())
    assert sorted(int(s.env["RANK"]) for s in plan.ranks) == list(range(nodes * per_node))


def test_contract_env_order_and_strings() -> None:
    env = contract_env(
        rank=5,
        local_rank=1,
        node_rank=2,
        nnodes=3,
        ranks_per_node=2,
        master_addr="h",
        master_port="<auto>",
        attempt=0,
        run_id="i",
        run_dir="d",
        max_restarts=3,
    )
    assert tuple(env) == CONTRACT_VARS
    assert (
        env["WORLD_SIZE"] == "6"
        and env["MASTER_PORT"] == "<auto>"
        and env["TORCHELASTIC_RESTART_COUNT"] == "0"
    )


def test_runtime_env_follows_config() -> None:
    config = config_2x2(
        "resources.cpus_per_rank=4",
        "storage.checkpoint_interval=7",
        "storage.keep=5",
        "storage.async_save=true",
        "distributed.backend=gloo",
        "distributed.timeout_s=90.5",
        "job.deterministic=true",
    )
    env = runtime_env(config)
    assert set(env) <= set(RUNTIME_VARS)
    assert env == {
        "ORCH_CKPT_INTERVAL": "7",
        "ORCH_CKPT_KEEP": "5",
        "ORCH_CKPT_ASYNC": "1",
        "ORCH_DIST_BACKEND": "gloo",
        "ORCH_COLLECTIVE_TIMEOUT_S": "90.5",
        "ORCH_DETERMINISTIC": "1",
        "OMP_NUM_THREADS": "4",
        "PYTHONUNBUFFERED": "1",
    }
    assert plan_of(config).ranks[3].env["OMP_NUM_THREADS"] == "4"


def test_extra_env_cannot_override_the_contract() -> None:
    plan = plan_of(config_2x2(), extra_env={"RANK": "99", "MASTER_PORT": "1", "ORCH_ERROR_FILE": "/e"})
    assert [s.env["RANK"] for s in plan.ranks] == ["0", "1", "2", "3"]
    assert {s.env["MASTER_PORT"] for s in plan.ranks} == {"29512"}
    assert {s.env["ORCH_ERROR_FILE"] for s in plan.ranks} == {"/e"}


def test_module_entrypoint() -> None:
    config = config_2x2("job.script=null", "job.module=pkg.train", "job.args=[--lr, '0.1']")
    plan = plan_of(config)
    assert {s.argv for s in plan.ranks} == {(PY, "-m", "pkg.train", "--lr", "0.1")}


def test_job_python_overrides_interpreter() -> None:
    plan = plan_of(config_2x2("job.python=/custom/python"))
    assert {s.argv[0] for s in plan.ranks} == {"/custom/python"}


def test_plan_is_pure_and_immutable(monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_2x2("job.pass_env=[MY_PASSED]", "job.env={A: '1'}")
    monkeypatch.delenv("MY_PASSED", raising=False)
    first = plan_of(config)
    monkeypatch.setenv("MY_PASSED", "value-from-environ")
    monkeypatch.setenv("RANK", "77")
    second = plan_of(config)
    assert first == second and first is not second
    assert first.ranks == second.ranks and first.ranks[0].env == second.ranks[0].env
    assert render_local(first) == render_local(second)
    # The launcher copies pass_env values at spawn time; the plan never holds them.
    assert first.pass_env == ("MY_PASSED",)
    assert all("MY_PASSED" not in s.env for s in first.ranks)
    assert plan_of(config, attempt=4) != first
    with pytest.raises(TypeError):
        first.ranks[0].env["RANK"] = "9"  # type: ignore[index]


def test_rank_env_is_the_shared_env_plus_the_ranks_own() -> None:
    plan = plan_of(config_2x2("job.env={EXTRA: 'x'}"))
    assert set(plan.shared_env).isdisjoint(PER_RANK_VARS) and plan.shared_env["EXTRA"] == "x"
    for spec in plan.ranks:
        env = spec.env
        # One shared env for the whole plan, not a copy per rank.
        assert isinstance(env, RankEnv) and env.shared is plan.shared_env
        assert tuple(env.own) == PER_RANK_VARS and env.own["RANK"] == str(spec.rank)
        full = {**plan.shared_env, **env.own}
        assert dict(env) == full and env == full and len(env) == len(full) and set(env) == set(full)
        assert dict(env.items()) == full and sorted(env.values()) == sorted(full.values())
        assert "RANK" in env and "EXTRA" in env and "NOPE" not in env and env.get("NOPE") is None
        # How the launcher merges it: the plan's values win over the environment's.
        assert {**{"RANK": "77", "HOME": "/h"}, **env}["RANK"] == str(spec.rank)
    env = plan.ranks[1].env
    with pytest.raises(AttributeError):
        env.own = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        env.own["RANK"] = "9"  # type: ignore[index]
    with pytest.raises(TypeError):
        plan.shared_env["EXTRA"] = "y"  # type: ignore[index]


def test_rank_env_own_values_win() -> None:
    env = RankEnv({"A": "1", "B": "2"}, {"A": "3", "C": "4"})
    assert dict(env) == {"A": "3", "B": "2", "C": "4"} and len(env) == 3 and list(env) == ["B", "A", "C"]
    assert env == {"B": "2", "C": "4", "A": "3"} and env != {"A": "1", "B": "2", "C": "4"}
    assert repr(env) == "RankEnv({'B': '2', 'A': '3', 'C': '4'})"


# ---------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    "name",
    [
        "WANDB_API_KEY",
        "MY_TOKEN",
        "HF_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "DB_PASSWORD",
        "OPENAI_KEY",
        "DB_PASS",
        "BASIC_AUTH",
        "github_token",
        "GCP_CREDENTIALS",
        "HFTOKEN",
        "GH_TOKEN_2",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "PATH",
        "HOME",
        "PYTHONPATH",
        "OMP_NUM_THREADS",
        "MONKEY",
        "KEYBOARD_LAYOUT",
        "AUTHOR",
        "PASSAGE",
        "RANK",
        "TOKENIZERS_PARALLELISM",
        "MAX_TOKENS",
    ],
)
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)


def test_redact() -> None:
    env = {"A": "1", "MY_TOKEN": "t", "PASSED": "p"}
    assert redact(env, ("PASSED",)) == {"A": "1", "MY_TOKEN": REDACTED, "PASSED": REDACTED}
    assert [is_redacted(k, ("PASSED",)) for k in env] == [False, True, True]
    assert env == {"A": "1", "MY_TOKEN": "t", "PASSED": "p"}


SECRETS = {
    "WANDB_API_KEY": "wandb-8f3a1c-secret",
    "MY_TOKEN": "tok-77d0e2-secret",
    "OPENAI_KEY": "sk-91be4a-secret",
}


def test_render_redacts_secrets_and_pass_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME_DIR", "passed-c0ffee-value")
    monkeypatch.setenv("HF_TOKEN", "hf-5eed5-secret")
    config = config_2x2("job.env={PLAIN_SETTING: 'visible-42abc'}", "job.pass_env=[HF_HOME_DIR, HF_TOKEN]")
    # job.env refuses secret-looking names (the config tests show it); a secret-looking variable
    # that reaches a plan another way (extra_env) is still redacted by name.
    plan = plan_of(config, extra_env=SECRETS)
    text = render_local(plan)
    for value in [*SECRETS.values(), "passed-c0ffee-value", "hf-5eed5-secret"]:
        assert value not in text
    assert "visible-42abc" in text  # redaction hides secrets, not everything
    doc = yaml.safe_load(text)
    assert doc["pass_env"] == ["HF_HOME_DIR", "HF_TOKEN"]
    envs = rank_envs(doc)
    assert sorted(envs) == [0, 1, 2, 3]
    for env in envs.values():
        for name in SECRETS:
            assert env[name] == REDACTED
        assert env["PLAIN_SETTING"] == "visible-42abc"
        assert "HF_HOME_DIR" not in env and "HF_TOKEN" not in env
    # The plan itself keeps the real value: the ranks need it.
    assert plan.ranks[0].env["MY_TOKEN"] == "tok-77d0e2-secret"


# ---------------------------------------------------------------------------- rendering


def rank_envs(doc: dict[str, Any]) -> dict[int, dict[str, str]]:
    """Every rank's full env as a reader of the rendered YAML gets it: `env`, then the rank's own."""
    envs = {r["rank"]: {**doc["env"], **r["env"]} for n in doc["nodes"] for r in n["ranks"]}
    assert len(envs) == sum(len(n["ranks"]) for n in doc["nodes"])  # no rank listed twice
    return envs


def test_render_local_structure_and_stability() -> None:
    plan = plan_of(config_2x2())
    text = render_local(plan)
    assert text == render_local(plan) == render_local(plan_of(config_2x2()))
    assert text.startswith("# orch render: local launch spec; nothing was started\n")
    doc = yaml.safe_load(text)
    assert list(doc) == [
        "backend",
        "run_id",
        "run_dir",
        "attempt",
        "world_size",
        "master",
        "pass_env",
        "argv",
        "env",
        "nodes",
    ]
    assert (
        doc["backend"],
        doc["run_id"],
        doc["run_dir"],
        doc["attempt"],
        doc["world_size"],
        doc["master"],
    ) == ("local", "r-1", "/runs/r-1", 3, 4, "127.0.0.1:29512")
    assert doc["argv"] == list(plan.ranks[0].argv)
    assert list(doc["env"]) == sorted(doc["env"]) and doc["env"] == dict(plan.shared_env)
    assert [n["node_rank"] for n in doc["nodes"]] == [0, 1]
    assert [[(r["rank"], r["local_rank"]) for r in n["ranks"]] for n in doc["nodes"]] == [
        [(0, 0), (1, 1)],
        [(2, 0), (3, 1)],
    ]
    for node in doc["nodes"]:
        for r in node["ranks"]:
            assert "argv" not in r  # the same for every rank: shown once
            assert list(r["env"]) == list(PER_RANK_VARS) and r["env"] == dict(plan.ranks[r["rank"]].env.own)
    # One line per rank, however large the plan.
    assert [line[:11] for line in text.splitlines() if line.startswith("  - ")] == ["  - {rank: "] * 4


@pytest.mark.parametrize("nodes, per_node", [(1, 1), (1, 2), (2, 2), (3, 4)])
def test_render_gives_every_rank_its_full_env_contract(nodes: int, per_node: int) -> None:
    config = load_config(
        str(DEFAULT),
        [
            f"resources.nodes={nodes}",
            f"resources.ranks_per_node={per_node}",
            "job.env={EXTRA: 'x'}",
        ],
    )
    plan = plan_of(config, attempt=2, master_addr="10.0.0.7", extra_env={"MY_TOKEN": "t0k3n"})
    envs = rank_envs(yaml.safe_load(render_local(plan)))
    assert sorted(envs) == list(range(nodes * per_node))
    for spec in plan.ranks:
        contract = contract_env(
            rank=spec.rank,
            local_rank=spec.local_rank,
            node_rank=spec.node_rank,
            nnodes=nodes,
            ranks_per_node=per_node,
            master_addr="10.0.0.7",
            master_port=29512,
            attempt=2,
            run_id="r-1",
            run_dir="/runs/r-1",
            max_restarts=config.restart.max_restarts,
        )
        assert envs[spec.rank] == {
            **contract,
            **runtime_env(config),
            "EXTRA": "x",
            "MY_TOKEN": REDACTED,
            "CUDA_VISIBLE_DEVICES": "",  # a CPU node
        }
        assert envs[spec.rank] == redact(spec.env)


ONE_BY_TWO = """\
# orch render: local launch spec; nothing was started
# Each rank runs `argv` with `env` (shared by all ranks) plus the `env` on its own line, and the
# `pass_env` variables, copied from the environment at launch.
backend: local
run_id: r-1
run_dir: /runs/r-1
attempt: 3
world_size: 2
master: 127.0.0.1:29512
pass_env:
- HF_TOKEN
- WANDB_API_KEY
argv:
- /opt/py/bin/python3
- -m
- pkg.train
- --lr
- '0.1'
env:
  CUDA_VISIBLE_DEVICES: ''
  GROUP_WORLD_SIZE: '1'
  LOCAL_WORLD_SIZE: '2'
  MASTER_ADDR: 127.0.0.1
  MASTER_PORT: '29512'
  MODE: fast
  NNODES: '1'
  OMP_NUM_THREADS: '1'
  ORCH_ATTEMPT: '3'
  ORCH_CKPT_ASYNC: '0'
  ORCH_CKPT_INTERVAL: '500'
  ORCH_CKPT_KEEP: '2'
  ORCH_COLLECTIVE_TIMEOUT_S: '600'
  ORCH_DETERMINISTIC: '0'
  ORCH_DIST_BACKEND: auto
  ORCH_MASKED_VARS: HF_TOKEN,WANDB_API_KEY
  ORCH_RUN_DIR: /runs/r-1
  ORCH_RUN_ID: r-1
  PYTHONUNBUFFERED: '1'
  ROLE_NAME: default
  ROLE_WORLD_SIZE: '2'
  TORCHELASTIC_MAX_RESTARTS: '3'
  TORCHELASTIC_RESTART_COUNT: '3'
  TORCHELASTIC_RUN_ID: r-1
  TORCHELASTIC_USE_AGENT_STORE: 'False'
  WORLD_SIZE: '2'
nodes:
- node_rank: 0
  ranks:
  - {rank: 0, local_rank: 0, env: {RANK: '0', LOCAL_RANK: '0', NODE_RANK: '0', GROUP_RANK: '0', ROLE_RANK: '0'}}
  - {rank: 1, local_rank: 1, env: {RANK: '1', LOCAL_RANK: '1', NODE_RANK: '0', GROUP_RANK: '0', ROLE_RANK: '1'}}
"""  # noqa: E501 - the rendered text, as is


def test_render_of_a_small_plan_reads_plainly() -> None:
    # The whole text, so that a change to the format shows here as a diff a person can judge.
    raw = {
        "job": {
            "module": "pkg.train",
            "args": ["--lr", "0.1"],
            "env": {"MODE": "fast"},
            "pass_env": ["HF_TOKEN", "WANDB_API_KEY"],
        },
        "resources": {"nodes": 1, "ranks_per_node": 2},
        "storage": {"checkpoint_interval": 500},
    }
    assert render_local(plan_of(parse_config(raw, check_files=False))) == ONE_BY_TWO


def test_render_quotes_awkward_strings() -> None:
    config = config_2x2("job.args=['yes', '0x10', 'a: b', '#c', '- d', 'é']", "job.env={X: 'null'}")
    doc = yaml.safe_load(render_local(plan_of(config)))
    assert doc["argv"][2:] == ["yes", "0x10", "a: b", "#c", "- d", "é"]
    assert doc["env"]["X"] == "null"


AWKWARD = [
    "null",
    "yes",
    "0x10",
    "012",
    "a: b",
    "#c",
    "- d",
    "{x}",
    "a,b",
    "é",
    "a\nb",
    "a\n\nb  ",
    " x",
    "",
    "'q'",
    '"d"',
    "\x7f",
    "\u2028",
]


@pytest.mark.parametrize("view", [True, False])
def test_render_of_ranks_that_differ_in_more_than_the_contract(view: bool) -> None:
    # Plans from build_local_plan differ per rank only in PER_RANK_VARS; render shows any other
    # plan correctly too: per-rank argv, per-rank variables with any value, secrets, overrides.
    shared = {"A": "1", "MODE": "fast"}
    own_envs = [
        {"R": "0", "DB_PASS": "7"},
        {"R": "1", "MODE": "slow", "PASSED": "p-value", **{f"W{i}": v for i, v in enumerate(AWKWARD)}},
        {"R": "2", "P%s": "5"},
    ]
    ranks = tuple(
        RankSpec(
            rank=i,
            local_rank=i % 2,
            node_rank=i // 2,
            argv=("py", "b: c" if i == 1 else "a"),
            env=RankEnv(shared, own) if view else {**shared, **own},
        )
        for i, own in enumerate(own_envs)
    )
    plan = LaunchPlan(
        run_id="r",
        run_dir="/d",
        attempt=0,
        nnodes=2,
        ranks_per_node=2,
        master_addr="h",
        master_port=1,
        pass_env=("PASSED",),
        shared_env=shared,
        ranks=ranks,
    )
    text = render_local(plan)
    assert "p-value" not in text
    doc = yaml.safe_load(text)
    assert doc["argv"] == ["py", "a"]
    node0, node1 = doc["nodes"]
    assert (
        "argv" not in node0["ranks"][0]
        and node0["ranks"][1]["argv"] == ["py", "b: c"]
        and "argv" not in node1["ranks"][0]
    )
    assert rank_envs(doc) == {
        0: {"A": "1", "MODE": "fast", "R": "0", "DB_PASS": REDACTED},
        1: {
            "A": "1",
            "MODE": "slow",
            "R": "1",
            "PASSED": REDACTED,
            **{f"W{i}": v for i, v in enumerate(AWKWARD)},
        },
        2: {"A": "1", "MODE": "fast", "R": "2", "P%s": "5"},
    }
    assert len([line for line in text.splitlines() if line.startswith("  - ")]) == 3


def test_render_of_a_plan_with_an_empty_node() -> None:
    plan = plan_of(config_2x2())
    doc = yaml.safe_load(render_local(dataclasses.replace(plan, ranks=plan.ranks[:2])))
    assert doc["nodes"] == [
        {"node_rank": 0, "ranks": doc["nodes"][0]["ranks"]},
        {"node_rank": 1, "ranks": []},
    ]
    assert sorted(rank_envs(doc)) == [0, 1]


def test_render_is_the_same_for_a_view_and_a_plain_env() -> None:
    plan = plan_of(config_2x2(), extra_env={"MY_TOKEN": "t"})
    plain = dataclasses.replace(
        plan, ranks=tuple(dataclasses.replace(s, env=dict(s.env)) for s in plan.ranks)
    )
    assert render_local(plain) == render_local(plan)


def test_render_refuses_a_rank_without_a_shared_variable() -> None:
    plan = plan_of(config_2x2())
    env = {k: v for k, v in plan.ranks[1].env.items() if k != "NNODES"}
    broken = dataclasses.replace(plan, ranks=(plan.ranks[0], dataclasses.replace(plan.ranks[1], env=env)))
    with pytest.raises(ValueError, match="NNODES"):
        render_local(broken)


def _orch_render(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [str(ORCH), "render", str(DEFAULT), *args], cwd=cwd, capture_output=True, timeout=60, env=env
    )


def test_orch_render_is_byte_identical_across_processes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _orch_render(tmp_path / "a"), _orch_render(tmp_path / "b", "--set", "resources.nodes=1")
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    assert first.stderr == second.stderr == b""
    assert first.stdout == second.stdout
    text = first.stdout.decode()
    assert "<run-id>" in text and "<auto>" in text
    doc = yaml.safe_load(text)
    assert doc["run_id"] == "<run-id>" and doc["master"] == "127.0.0.1:<auto>"
    assert doc["run_dir"] == str(REPO / "runs" / "<run-id>")
    assert {env["MASTER_PORT"] for env in rank_envs(doc).values()} == {"<auto>"}


def test_cli_render_placeholders_and_fixed_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(DEFAULT)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "run_id: <run-id>" in out and "master: 127.0.0.1:<auto>" in out
    assert (
        main(
            [
                "render",
                str(DEFAULT),
                "--run-id",
                "exp-1",
                "--set",
                "distributed.master_port=29555",
                "--set",
                "resources.nodes=2",
            ]
        )
        == 0
    )
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["run_id"] == "exp-1" and doc["master"] == "127.0.0.1:29555" and doc["world_size"] == 4
    assert "<run-id>" not in str(doc) and "<auto>" not in str(doc)
    assert {env["ORCH_RUN_ID"] for env in rank_envs(doc).values()} == {"exp-1"}


def test_cli_render_slurm_prints_the_batch_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(DEFAULT), "--backend", "slurm"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "#SBATCH --requeue" in out and "#SBATCH --signal=USR2@120" in out
