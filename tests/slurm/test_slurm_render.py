"""`orch render --backend slurm`: golden output, and hostile values rejected or inert."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.backends.slurm.render import TEMPLATES, batch_script, render_slurm, step_argv
from orchestrator.errors import ConfigError
from orchestrator.spec.config import parse_config

GOLDEN = Path(__file__).with_name("golden_render.txt")


def golden_config():
    return parse_config(
        {
            "backend": "slurm",
            "name": "golden",
            "job": {
                "module": "pkg.train",
                "args": ["--lr", "3e-4", "two words"],
                "env": {"WANDB_API_KEY": "s3cret", "MODE": "fast"},
                "pass_env": ["HF_TOKEN"],
            },
            "resources": {
                "nodes": 3,
                "ranks_per_node": 2,
                "cpus_per_rank": 4,
                "gpus_per_node": 2,
                "memory": "64G",
                "time_limit": "02:00:00",
            },
            "storage": {"root": "/shared/runs"},
            "slurm": {
                "partition": "debug",
                "account": "ml",
                "qos": "high",
                "signal_lead_s": 180,
                "setup": ["module load cuda/12"],
                "extra_flags": ["--constraint=a100", "--exclusive"],
            },
        },
        check_files=False,
        base_dir="/shared/project",
    )


def test_render_matches_golden_file():
    text = render_slurm(
        golden_config(),
        run_id="golden-run",
        run_dir="/shared/runs/golden-run",
        folder="/shared/runs/golden-run/slurm",
        python="/opt/venv/bin/python",
    )
    text = text.replace(str(TEMPLATES), "<checkout>/templates")  # the one path that depends on the clone
    if os.environ.get("ORCH_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), (
        "rendering changed; if intended: ORCH_UPDATE_GOLDEN=1 pytest tests/slurm/test_slurm_render.py"
    )
    for line in (
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --mem=64G",
        "#SBATCH --time=120",
        "#SBATCH --partition=debug",
        "#SBATCH --account=ml",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --open-mode=append",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclusive",
        "module load cuda/12",
    ):
        assert line in text.splitlines(), line
    assert "s3cret" not in text and "WANDB_API_KEY=<redacted>" in text and "HF_TOKEN=<redacted>" in text


HOSTILE = st.sampled_from(
    [
        "$(touch {m})",
        "`touch {m}`",
        "'; touch {m}; '",
        '"; touch {m}; "',
        "a;touch {m}",
        "x\ntouch {m}",
        "x\rtouch {m}",
        "$(touch {m})\n#SBATCH --x",
        "${{IFS}}touch${{IFS}}{m}",
        "|touch {m}",
        "&& touch {m}",
    ]
)
FIELDS = st.sampled_from(
    [
        "name",
        "job.args",
        "slurm.partition",
        "slurm.account",
        "slurm.qos",
        "slurm.extra_flags",
        "resources.memory",
        "job.env",
        "storage.root",
    ]
)


def _set(data, field, value):
    if field == "job.args":
        data["job"]["args"] = ["--ok", value]
    elif field == "slurm.extra_flags":
        data["slurm"]["extra_flags"] = [f"--comment={value}"]
    elif field == "job.env":
        data["job"]["env"] = {"HOSTILE": value}
    else:
        section, _, key = field.rpartition(".")
        (data[section] if section else data)[key] = value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=HOSTILE, field=FIELDS, mode=st.sampled_from(["auto", "subprocess"]))
def test_hostile_values_are_rejected_or_inert(tmp_path_factory, template, field, mode):
    work = tmp_path_factory.mktemp("inject")
    marker = work / "INJECTED"
    value = template.format(m=marker)
    data = {
        "backend": "slurm",
        "job": {"module": "pkg.train", "args": []},
        "resources": {"nodes": 2, "ranks_per_node": 2},
        "storage": {"root": str(work / "runs")},
        "slurm": {},
        "launch": {"mode": mode},
    }
    _set(data, field, value)
    try:
        config = parse_config(data, check_files=False, base_dir=str(work))
    except ConfigError as exc:
        assert "\n" not in str(exc) and field.split(".")[-1] in str(exc)
        return
    # Accepted: run the exact batch script and the step command in bash, with stand-ins for
    # python and srun that only record their argv. No injected command may run.
    bin_dir = work / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "python-stub"):
        (bin_dir / tool).write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{work}/{tool}.argv"\n')
        (bin_dir / tool).chmod(0o755)
    # srun's stand-in also runs its task command (the first argument after its options), so
    # the node or task script runs on the values too, down to the job's python.
    with open(bin_dir / "srun", "a") as fh:
        fh.write('while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    script = work / "batch.sh"
    script.write_text(batch_script(config, str(work / "slurm"), str(bin_dir / "python-stub")))
    step = shlex.join(
        step_argv(config, log_dir=str(work / "logs"), attempt=0, python=str(bin_dir / "python-stub"))
    )
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(work),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "ORCH_LOG_DIR": str(work),
    }
    subprocess.run(["bash", str(script)], env=env, capture_output=True, timeout=30, cwd=work)
    subprocess.run(["bash", "-c", step], env=env, capture_output=True, timeout=30, cwd=work)
    assert not marker.exists(), f"{field}={value!r} ran a command"
    # And the values arrive intact, as one argument each.
    argv = step_argv(config, log_dir=str(work / "logs"), attempt=0, python=str(bin_dir / "python-stub"))
    recorded = (work / "srun.argv").read_text().split("\n")[:-1]
    assert recorded == argv[1:]
    # The job's command line reaches the job's python (here the python stub) unchanged.
    job_python = (work / "python-stub.argv").read_text().split("\n")[:-1]
    assert job_python[-len(config.job.args) - 2 :] == ["-m", "pkg.train", *config.job.args]


def test_setup_lines_cannot_smuggle_sbatch_directives():
    with pytest.raises(ConfigError, match="slurm.setup"):
        parse_config(
            {"job": {"module": "m"}, "slurm": {"setup": ["#SBATCH --partition=other"]}}, check_files=False
        )
