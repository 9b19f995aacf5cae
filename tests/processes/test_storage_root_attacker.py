"""A storage root that other users can write (issue 28, point 3). In a folder writable by others
without the sticky bit, another user can rename a pending run's directory aside and put one of
their own in its place, whose Slurm pickle (or run.yaml) then runs as the victim: `orch run`,
`orch sweep`, `orch submit` and `orch doctor` refuse such a root in one line naming the folder
and the fix, a sticky one (1777) is fine, and a batch step whose pickle was swapped in after the
submission refuses to load it. The attacker is a second Unix user (tests/attacker.py)."""

from __future__ import annotations

import grp
import os
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from submitit.core.utils import DelayedSubmission

from orchestrator import api

from ..attacker import ATTACKER, as_attacker, attacker_uid, needs_root
from ..conftest import JOBS, orch_cmd, run_orch, write_config

pytestmark = needs_root

GROUP = "orch-shared"  # a group the attacker is a member of
SWEEP = ("--set", "job.args=[--steps,{steps}]", "--grid", "steps=3")


def attacker_group() -> int:
    """The gid of a group with the attacker in it (made on first use)."""
    attacker_uid()
    made = subprocess.run(["groupadd", GROUP], capture_output=True, text=True)
    assert made.returncode in (0, 9), made.stderr  # 9: it exists
    added = subprocess.run(["gpasswd", "-a", ATTACKER, GROUP], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    return grp.getgrnam(GROUP).gr_gid


@pytest.fixture
def shared():
    """A folder in /tmp that the attacker can reach (pytest's tmp_path is closed to others)."""
    folder = Path(tempfile.mkdtemp(prefix="orch-root-attack-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def open_root(shared: Path, mode: int, group: int | None = None) -> Path:
    root = shared / "runs"
    root.mkdir()
    if group is not None:
        os.chown(root, -1, group)
    root.chmod(mode)
    return root


def stand_in_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with an sbatch that notes it was called and answers job 4242 (nothing runs), and
    a scheduler that knows nothing; the note's path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "sbatch-called"
    tools = {"sbatch": f'touch "{called}"; echo "Submitted batch job 4242"', "scancel": "exit 0"}
    tools.update({name: "exit 1" for name in ("sacct", "squeue", "scontrol", "sinfo")})
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, called


def config(tmp_path: Path, root: Path, **sections) -> Path:
    return write_config(
        tmp_path, JOBS / "train_ddp.py", args=["--steps", "3"], storage={"root": str(root)}, **sections
    )


def swap_as_attacker(root: Path, run_id: str) -> None:
    """The attack: the victim's run directory renamed aside, one of the attacker's in its place."""
    as_attacker(f"cd '{root}'; mv '{run_id}' aside; mkdir -m 777 '{run_id}'")
    assert (root / "aside").stat().st_uid == 0, "the victim's run directory was moved aside"
    assert (root / run_id).stat().st_uid == attacker_uid(), "the attacker's stands in its place"


def run_batch_step(batch: str, cwd: Path) -> subprocess.CompletedProcess:
    """The batch script as Slurm's batch step of job 4242 runs it (as the victim)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    return subprocess.run(
        ["bash", "-c", batch],
        env={**env, "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_refusal(proc: subprocess.CompletedProcess, folder: Path, fix: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = lines[0]
    assert f"storage.root: {folder} has mode" in line and f"fix: {fix} {folder}" in line, line
    return line


@pytest.mark.parametrize("opened", ["world", "group"])
def test_a_root_others_can_write_is_refused_by_every_verb(tmp_path, shared, opened):
    if opened == "world":
        root, fix = open_root(shared, 0o777), "chmod o-w"
    else:  # 0775, and the attacker is in its group
        root, fix = open_root(shared, 0o775, attacker_group()), "chmod g-w"
    cfg = config(tmp_path, root)
    # What the refusal prevents: a run directory made there (as the old code did) is swapped.
    pending = api.create_run(api.load_config(str(cfg)), run_id="pending")
    swap_as_attacker(root, pending.run_id)

    one_line_refusal(run_orch("run", str(cfg)), root, fix)
    one_line_refusal(run_orch("sweep", str(cfg), *SWEEP), root, fix)
    env, sbatch_called = stand_in_slurm(tmp_path)
    one_line_refusal(run_orch("submit", str(cfg), "--backend", "slurm", env=env), root, fix)
    assert not sbatch_called.exists(), "nothing was submitted"
    assert sorted(p.name for p in root.iterdir()) == ["aside", "pending"], "nothing was created"

    doctor = run_orch("doctor", str(cfg))
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    fails = [line for line in doctor.stdout.splitlines() if line.startswith("fail")]
    assert len(fails) == 1 and fails[0].startswith(f"fail  storage     folder modes: {root} has mode"), fails
    assert f"fix: {fix} {root}, or chmod +t {root}" in doctor.stdout


def test_a_folder_above_the_root_others_can_write_is_refused(tmp_path, shared):
    above = open_root(shared, 0o777)
    root = above / "alice"
    root.mkdir(mode=0o700)  # private, but its parent lets others rename it
    cfg = config(tmp_path, root)
    line = run_orch("run", str(cfg)).stderr.strip()
    assert line.startswith(f"storage.root: {above} (above {root}) has mode 0777: others can write"), line
    assert f"fix: chmod o-w {above}, or chmod +t {above}" in line
    as_attacker(f"mv '{root}' '{above}/moved'")  # what it prevents: the root itself renamed
    assert (above / "moved").stat().st_uid == 0


def run_orch_in_group(gid: int, *args: str) -> subprocess.CompletedProcess:
    """`orch ARGS` as a user of a shared primary group (a team's, not a user-private one) whose
    umask lets the group write: folders made as the umask says are then the team's to write."""
    return subprocess.run(
        orch_cmd(*args), capture_output=True, text=True, timeout=240, group=gid, umask=0o002
    )


def test_a_root_the_first_run_makes_under_umask_002_is_closed_and_the_next_run_goes_on(tmp_path, shared):
    # Before: the root and the folder above it were made as the umask says (0775) with the
    # team's group: the first run went on (nothing there to check yet), every later one refused.
    group = attacker_group()
    above, root = shared / "team", shared / "team" / "runs"
    cfg = config(tmp_path, root)
    first = run_orch_in_group(group, "run", str(cfg), "--run-id", "first")
    assert first.returncode == 0, first.stderr
    second = run_orch_in_group(group, "run", str(cfg), "--run-id", "second")
    assert second.returncode == 0, second.stderr
    for folder in (above, root):
        info = folder.stat()
        assert info.st_gid == group, "made with the team's group, which the attacker is in"
        assert not info.st_mode & 0o022, f"{folder} has mode {info.st_mode & 0o7777:04o}"
    # What the closed modes are for: the attacker, in the team's group, cannot rename a run.
    refused = subprocess.run(
        ["runuser", "-u", ATTACKER, "--", "mv", str(root / "first"), str(root / "aside")],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused.stderr


def test_a_sticky_root_goes_on_and_others_cannot_rename_in_it(tmp_path, shared):
    root = open_root(shared, 0o1777)
    cfg = config(tmp_path, root)
    ran = run_orch("run", str(cfg), "--run-id", "mine")
    assert ran.returncode == 0, ran.stderr
    swept = run_orch("sweep", str(cfg), *SWEEP, "--sweep-id", "sw")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    env, sbatch_called = stand_in_slurm(tmp_path)
    submitted = run_orch("submit", str(cfg), "--backend", "slurm", "--no-check", "--run-id", "sub", env=env)
    assert submitted.returncode == 0 and sbatch_called.exists(), submitted.stderr
    doctor = run_orch("doctor", str(cfg))
    assert doctor.returncode == 0, doctor.stdout
    assert f"ok    storage     folder modes: {root} and every folder above it" in doctor.stdout
    # The sticky bit is what makes it safe: the attacker may not rename the victim's run.
    refused = subprocess.run(
        ["runuser", "-u", ATTACKER, "--", "mv", str(root / "mine"), str(root / "aside")],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr, refused.stderr


def test_a_pickle_swapped_in_after_the_submission_is_not_loaded_by_the_batch_step(tmp_path, shared):
    root = open_root(shared, 0o755)
    cfg = config(tmp_path, root, backend="slurm")
    env, _ = stand_in_slurm(tmp_path)
    submitted = run_orch("submit", str(cfg), "--no-check", "--run-id", "pending", env=env)
    assert submitted.returncode == 0, submitted.stderr
    slurm = root / "pending" / "slurm"
    batch = (slurm / "4242_submission.sh").read_text()  # what Slurm keeps and runs
    assert (slurm / "4242_submitted.pkl").is_file()
    # Later the root is opened to others (a `chmod -R a+w` of a project), and the job still waits.
    root.chmod(0o777)
    swap_as_attacker(root, "pending")
    marker = shared / "PWNED"
    planted = slurm / "4242_submitted.pkl"
    # A pickle that runs a shell command when loaded (protocol 0: os.system("touch MARKER")).
    as_attacker(f"mkdir -m 777 '{slurm}'; printf \"cos\\nsystem\\n(S'touch {marker}'\\ntR.\" > '{planted}'")
    assert planted.stat().st_uid == attacker_uid()

    step = run_batch_step(batch, tmp_path)
    assert not marker.exists(), "the attacker's pickle ran as the victim"
    assert step.returncode == 1, step.stderr
    assert step.stderr.strip().splitlines()[-1] == (
        f"orch: refusing to load the submitted job: {planted} belongs to user {ATTACKER},"
        " not to this user (user root)"
    ), step.stderr


def test_the_batch_step_loads_its_own_pickle(tmp_path, shared):
    """The guard lets an untouched submission through to submitit's loader: the batch script as
    Slurm runs it, on a job of the victim's own that only measures a file (not the supervisor)."""
    root = open_root(shared, 0o755)
    cfg = config(tmp_path, root, backend="slurm")
    env, _ = stand_in_slurm(tmp_path)
    assert run_orch("submit", str(cfg), "--no-check", "--run-id", "mine", env=env).returncode == 0
    slurm = root / "mine" / "slurm"
    batch = (slurm / "4242_submission.sh").read_text()
    assert "-m orchestrator.backends.slurm.batch_guard" in batch
    DelayedSubmission(os.path.getsize, str(slurm / "4242_submission.sh")).dump(slurm / "4242_submitted.pkl")
    step = run_batch_step(batch, tmp_path)
    assert step.returncode == 0, step.stderr
    with open(slurm / "4242_0_result.pkl", "rb") as fh:
        assert pickle.load(fh) == ("success", len(batch))
