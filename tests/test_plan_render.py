"""The launch plan (who runs where, with which env contract) and its rendering.

Fast and pure: no torch; subprocesses only to check that two `orch render` runs agree byte for byte.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ClusterConfig, load_config
from orchestrator.plan import (
    CONTRACT_VARS,
    PER_RANK_VARS,
    REDACTED,
    RUNTIME_VARS,
    LaunchPlan,
    RankEnv,
    build_local_plan,
    contract_env,
    is_redacted,
    is_secret_name,
    redact,
    runtime_env,
)
from orchestrator.render import render_local

REPO = Path(__file__).resolve().parents[1]
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
    assert (plan.run_id, plan.run_dir, plan.attempt, plan.master_addr, plan.master_port) == ("r-1", "/runs/r-1", 3, "127.0.0.1", 29512)
    for spec in plan.ranks:
        assert spec.argv == (PY, str(REPO / "jobs" / "train_ddp.py"), *config.job.args)


@pytest.mark.parametrize("nodes, per_node", [(1, 1), (1, 3), (3, 1), (2, 2), (3, 4)])
def test_env_contract_of_every_rank(nodes: int, per_node: int) -> None:
    config = load_config(str(DEFAULT), [f"resources.nodes={nodes}", f"resources.ranks_per_node={per_node}", "job.env={EXTRA: 'x'}"])
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
            "ORCH_RUN_ID": "r-1",
            "ORCH_RUN_DIR": "/runs/r-1",
            "ORCH_ATTEMPT": "2",
        }
        assert tuple(expected) == CONTRACT_VARS  # the test names every contract variable, no more
        assert {k: env[k] for k in CONTRACT_VARS} == expected
        assert spec.rank == spec.node_rank * per_node + spec.local_rank
        # Nothing besides the contract, the runtime settings and job.env.
        assert set(env) == set(CONTRACT_VARS) | set(runtime_env(config)) | {"EXTRA"}
        assert env["EXTRA"] == "x" and env["OMP_NUM_THREADS"] == "1" and env["PYTHONUNBUFFERED"] == "1"
        assert all(isinstance(v, str) for v in env.values())
    assert sorted(int(s.env["RANK"]) for s in plan.ranks) == list(range(nodes * per_node))


def test_contract_env_order_and_strings() -> None:
    env = contract_env(rank=5, local_rank=1, node_rank=2, nnodes=3, ranks_per_node=2, master_addr="h", master_port="<auto>", attempt=0, run_id="i", run_dir="d")
    assert tuple(env) == CONTRACT_VARS
    assert env["WORLD_SIZE"] == "6" and env["MASTER_PORT"] == "<auto>" and env["TORCHELASTIC_RESTART_COUNT"] == "0"


def test_runtime_env_follows_config() -> None:
    config = config_2x2("resources.cpus_per_rank=4", "storage.checkpoint_interval=7", "storage.keep=5", "storage.async_save=true", "distributed.backend=gloo")
    env = runtime_env(config)
    assert set(env) <= set(RUNTIME_VARS)
    assert env == {
        "ORCH_CKPT_INTERVAL": "7",
        "ORCH_CKPT_KEEP": "5",
        "ORCH_CKPT_ASYNC": "1",
        "ORCH_DIST_BACKEND": "gloo",
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

@pytest.mark.parametrize("name", ["WANDB_API_KEY", "MY_TOKEN", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "OPENAI_KEY", "DB_PASS", "BASIC_AUTH", "github_token", "GCP_CREDENTIALS"])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["PATH", "HOME", "PYTHONPATH", "OMP_NUM_THREADS", "MONKEY", "KEYBOARD_LAYOUT", "AUTHOR", "PASSAGE", "RANK"])
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)


def test_redact() -> None:
    env = {"A": "1", "MY_TOKEN": "t", "PASSED": "p"}
    assert redact(env, ("PASSED",)) == {"A": "1", "MY_TOKEN": REDACTED, "PASSED": REDACTED}
    assert [is_redacted(k, ("PASSED",)) for k in env] == [False, True, True]
    assert env == {"A": "1", "MY_TOKEN": "t", "PASSED": "p"}


SECRETS = {"WANDB_API_KEY": "wandb-8f3a1c-secret", "MY_TOKEN": "tok-77d0e2-secret", "OPENAI_KEY": "sk-91be4a-secret"}


def test_render_redacts_secrets_and_pass_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME_DIR", "passed-c0ffee-value")
    monkeypatch.setenv("HF_TOKEN", "hf-5eed5-secret")
    env_yaml = "{" + ", ".join(f"{k}: '{v}'" for k, v in SECRETS.items()) + ", PLAIN_SETTING: 'visible-42abc'}"
    config = config_2x2(f"job.env={env_yaml}", "job.pass_env=[HF_HOME_DIR, HF_TOKEN]")
    text = render_local(plan_of(config))
    for value in [*SECRETS.values(), "passed-c0ffee-value", "hf-5eed5-secret"]:
        assert value not in text
    assert "visible-42abc" in text  # redaction hides secrets, not everything
    doc = yaml.safe_load(text)
    assert doc["pass_env"] == ["HF_HOME_DIR", "HF_TOKEN"]
    for node in doc["nodes"]:
        for rank in node["ranks"]:
            for name in SECRETS:
                assert rank["env"][name] == REDACTED
            assert rank["env"]["PLAIN_SETTING"] == "visible-42abc"
            assert "HF_HOME_DIR" not in rank["env"] and "HF_TOKEN" not in rank["env"]
    # The plan itself keeps the real job.env value: the ranks need it.
    assert plan_of(config).ranks[0].env["MY_TOKEN"] == "tok-77d0e2-secret"


# ---------------------------------------------------------------------------- rendering

def test_render_local_structure_and_stability() -> None:
    plan = plan_of(config_2x2())
    text = render_local(plan)
    assert text == render_local(plan) == render_local(plan_of(config_2x2()))
    assert text.startswith("# orch render: local launch spec; nothing was started\n")
    doc = yaml.safe_load(text)
    assert list(doc) == ["backend", "run_id", "run_dir", "attempt", "world_size", "master", "pass_env", "nodes"]
    assert (doc["backend"], doc["run_id"], doc["run_dir"], doc["attempt"], doc["world_size"], doc["master"]) == ("local", "r-1", "/runs/r-1", 3, 4, "127.0.0.1:29512")
    assert [n["node_rank"] for n in doc["nodes"]] == [0, 1]
    assert [[(r["rank"], r["local_rank"]) for r in n["ranks"]] for n in doc["nodes"]] == [[(0, 0), (1, 1)], [(2, 0), (3, 1)]]
    for node in doc["nodes"]:
        for r in node["ranks"]:
            assert list(r["env"]) == sorted(r["env"])
            assert r["env"] == {k: str(v) for k, v in plan.ranks[r["rank"]].env.items()}
            assert r["argv"] == list(plan.ranks[r["rank"]].argv)


def test_render_quotes_awkward_strings() -> None:
    config = config_2x2("job.args=['yes', '0x10', 'a: b', '#c', '- d', 'é']", "job.env={X: 'null'}")
    doc = yaml.safe_load(render_local(plan_of(config)))
    rank = doc["nodes"][0]["ranks"][0]
    assert rank["argv"][2:] == ["yes", "0x10", "a: b", "#c", "- d", "é"]
    assert rank["env"]["X"] == "null"


def _orch_render(cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(ORCH), "render", str(DEFAULT), *args], cwd=cwd, capture_output=True, timeout=60, env=env)


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
    assert {r["env"]["MASTER_PORT"] for n in doc["nodes"] for r in n["ranks"]} == {"<auto>"}


def test_cli_render_placeholders_and_fixed_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(DEFAULT)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "run_id: <run-id>" in out and "master: 127.0.0.1:<auto>" in out
    assert main(["render", str(DEFAULT), "--run-id", "exp-1", "--set", "distributed.master_port=29555", "--set", "resources.nodes=2"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["run_id"] == "exp-1" and doc["master"] == "127.0.0.1:29555" and doc["world_size"] == 4
    assert "<run-id>" not in str(doc) and "<auto>" not in str(doc)
    assert {r["env"]["ORCH_RUN_ID"] for n in doc["nodes"] for r in n["ranks"]} == {"exp-1"}


def test_cli_render_slurm_prints_the_batch_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(DEFAULT), "--backend", "slurm"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "#SBATCH --requeue" in out and "#SBATCH --signal=USR2@120" in out
