"""`orch render --backend slurm`: golden output, and hostile values rejected or inert: in bash
(stand-ins for srun and python) and in the real sbatch of the test cluster, which parses the
#SBATCH lines itself."""

from __future__ import annotations

import os
import re
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
                "env": {"MODE": "fast"},
                "pass_env": ["HF_TOKEN", "WANDB_API_KEY"],
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


def test_render_matches_golden_file(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cret")  # pass_env values are read at launch, never rendered
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


HOSTILE_TEMPLATES = [
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
HOSTILE = st.sampled_from(HOSTILE_TEMPLATES)
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


# ---------------------------------------------------------------------------- the real sbatch

# What differs between two held submissions of the same script.
_VOLATILE = re.compile(r"\b(JobId|SubmitTime|EligibleTime|AccrueTime|StartTime|EndTime|LastSchedEval)=\S+")


def _held_submission(config, work: Path, folder: str) -> str:
    """The batch script of `config` submitted held (it never runs), as `scontrol show job -o`
    shows what Slurm recorded, with the job's own id and times masked; the job is cancelled."""
    script = work / "batch.sh"
    script.write_text(batch_script(config, folder, "/opt/venv/bin/python"))
    proc = subprocess.run(
        ["sbatch", "--hold", "--parsable", str(script)], capture_output=True, text=True, timeout=60, cwd=work
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
    return _VOLATILE.sub(r"\1=*", shown.replace(f"/{job_id}_0_log.out", "/<id>_0_log.out"))


@pytest.mark.integration
def test_hostile_values_reach_the_real_sbatch_as_exactly_one_value(slurm_cluster, tmp_path):
    """sbatch reads every #SBATCH line with its own parser (words, quotes, backslash escapes, #
    comments), not bash. Each hostile value that the config accepts in a field that lands in an
    #SBATCH line (an extra flag's value, the batch log's path under storage.root) must be
    recorded by Slurm as exactly that text, with nothing else of the job changed: no option
    smuggled in, no option lost."""
    marker = tmp_path / "INJECTED"

    def config_with(comment: str, root: Path):
        data = {
            "backend": "slurm",
            "job": {"module": "pkg.train"},
            "resources": {"nodes": 1, "ranks_per_node": 1, "time_limit": "5"},
            "storage": {"root": str(root)},
            "slurm": {"partition": "debug", "extra_flags": ["--exclusive", f"--comment={comment}"]},
        }
        return parse_config(data, check_files=False, base_dir=str(tmp_path))

    def folder(root: Path) -> str:
        return f"{root}/r/slurm"

    base_root = tmp_path / "base"
    baseline = _held_submission(config_with("BASELINE", base_root), tmp_path, folder(base_root))
    assert " Comment=BASELINE " in f" {baseline} " and " Partition=debug " in f" {baseline} "
    assert f" StdOut={base_root}/r/slurm/<id>_0_log.out " in f" {baseline} "
    values = [t.format(m=marker) for t in HOSTILE_TEMPLATES] + [
        "two words --partition=urgent --nodes=3",  # quoted by submitit: one word for sbatch too
        "x,--wrap=id",
        "a #b --partition=urgent",  # quoted, a # starts no comment
        # sbatch reads a backslash as an escape even inside quotes: the quoting would come apart.
        "\\'x'y --partition=urgent",
    ]
    accepted = 0
    for value in values:
        for field in ("slurm.extra_flags", "storage.root"):
            root = tmp_path / value.replace("/", "_") if field == "storage.root" else base_root
            try:
                config = config_with(value if field == "slurm.extra_flags" else "BASELINE", root)
            except ConfigError as exc:
                assert "\n" not in str(exc) and field.split(".")[-1] in str(exc)
                continue
            accepted += 1
            shown = _held_submission(config, tmp_path, folder(root))
            expected = baseline.replace(str(base_root), str(root))
            if field == "slurm.extra_flags":
                expected = expected.replace("Comment=BASELINE", f"Comment={value}")
            assert shown == expected, f"{field}={value!r}"
    assert accepted >= 10  # most of the list reaches sbatch; the rest is refused by the config
    assert not marker.exists()
