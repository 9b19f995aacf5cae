"""The fork server's parts without torch: what it preloads, when it refuses, and its protocol
with real forked processes (exit codes, signals, the server's death)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.launch.fork_launcher import (
    ForkServer,
    ForkServerError,
    first_use_imports,
    fork_refusal,
    job_imports,
    preload_list,
)
from orchestrator.launch.processes import MaskedOutput, SubprocessLauncher
from orchestrator.spec.config import parse_config
from orchestrator.spec.plan import RankSpec

from ..conftest import wait_for


def test_job_imports_are_the_top_level_imports_except_local_modules(tmp_path: Path) -> None:
    (tmp_path / "mylib.py").write_text("")
    (tmp_path / "mypkg").mkdir()
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        from __future__ import annotations
        import os, json as j
        import torch.nn.functional as F
        from torch.utils import data
        from . import sibling
        import mylib
        from mypkg.sub import thing
        try:
            import yaml
        except ImportError:
            yaml = None
        def main():
            import late_import  # not top level: not preloaded
    """)
    )
    assert job_imports(str(script)) == [
        "os",
        "json",
        "torch.nn.functional",
        "torch.utils",
        "torch.utils.data",
        "yaml",
    ]
    assert job_imports(str(tmp_path / "missing.py")) == []
    (tmp_path / "broken.py").write_text("import (")
    assert job_imports(str(tmp_path / "broken.py")) == []


def test_preload_list_starts_with_torch_then_config_then_job(tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text("import numpy\nimport torch\n")
    config = parse_config(
        {"job": {"script": str(script)}, "launch": {"preload": ["transformers"]}}, check_files=False
    )
    assert preload_list(config) == ["torch", "transformers", "numpy"]


def test_modules_torch_imports_on_first_use_are_preloaded_when_the_job_will_use_them(tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text(
        "import torch\n"
        "from orchestrator import runtime\n"
        "def main(model):\n"
        "    opt = torch.optim.AdamW(model.parameters())\n"
        "    m = runtime.Metrics(None)\n"
    )
    assert first_use_imports(str(script)) == ["torch._dynamo", "torch.utils.tensorboard"]
    script.write_text("import torch.distributed as dist\ndist.init_process_group('gloo')\n")
    assert first_use_imports(str(script)) == []
    script.write_text("from torch import optim\n")
    assert first_use_imports(str(script)) == ["torch._dynamo"]
    # DistributedDataParallel's constructor imports torch._dynamo as well
    script.write_text("from orchestrator import runtime\nddp = runtime.wrap_ddp(model, ctx)\n")
    assert first_use_imports(str(script)) == ["torch._dynamo"]


def test_fork_refusals() -> None:
    base = {"job": {"module": "pkg.train"}}
    assert fork_refusal(parse_config(base, check_files=False), sys.executable) is None
    assert (
        fork_refusal(
            parse_config({**base, "launch": {"mode": "subprocess"}}, check_files=False), sys.executable
        )
        == "launch.mode is subprocess"
    )
    other = parse_config({"job": {"module": "pkg.train", "python": "/usr/bin/python3"}}, check_files=False)
    assert "is not the interpreter the fork server runs" in fork_refusal(other, "/venv/bin/python")
    same = parse_config({"job": {"module": "pkg.train", "python": sys.executable}}, check_files=False)
    assert fork_refusal(same, sys.executable) is None


def _server(tmp_path: Path, modules: list[str]) -> ForkServer:
    server = ForkServer(
        sys.executable,
        modules,
        {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        str(tmp_path / "server.log"),
    )
    return server


def _request(tmp_path: Path, name: str, code: str, pgid: int) -> dict:
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    return {
        "argv": [sys.executable, str(script)],
        "env": {**os.environ, "PYTHONUNBUFFERED": "1"},
        "cwd": str(tmp_path),
        "log": str(tmp_path / f"{name}.log"),
        "pgid": pgid,
    }


def test_server_forks_and_reports_exit_codes_and_signals(tmp_path: Path) -> None:
    server = _server(tmp_path, ["json", "no_such_module_here"])
    try:
        hello = server.wait_ready(60)
        assert hello["ready"] and hello["preloaded"] == ["json"]  # a failing import is skipped
        pgid = os.getpgid(0)
        pids = server.spawn_all(
            [
                _request(tmp_path, "ok", "print('hello from', __name__)", pgid),
                _request(tmp_path, "three", "import sys; sys.exit(3)", pgid),
                _request(tmp_path, "boom", "raise ValueError('boom')", pgid),
                _request(tmp_path, "sleeper", "import time; time.sleep(60)", pgid),
            ]
        )
        ok, three, boom, sleeper = (server.handles[p] for p in pids)
        assert ok.wait(30) == 0 and three.wait(30) == 3 and boom.wait(30) == 1
        assert ok.exit_time is not None and ok.exit_time <= time.time()  # when the server reaped it
        assert (tmp_path / "ok.log").read_text() == "hello from __main__\n"
        assert "ValueError: boom" in (tmp_path / "boom.log").read_text()
        assert sleeper.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            sleeper.wait(0.2)
        os.kill(sleeper.pid, signal.SIGKILL)
        assert sleeper.wait(30) == -signal.SIGKILL
        assert oct((tmp_path / "ok.log").stat().st_mode & 0o777) == "0o600"
    finally:
        server.close()


def test_ranks_die_with_the_server(tmp_path: Path) -> None:
    server = _server(tmp_path, [])
    try:
        server.wait_ready(60)
        pid = server.spawn_all([_request(tmp_path, "sleeper", "import time; time.sleep(60)", os.getpgid(0))])[
            0
        ]
        assert psutil.pid_exists(pid)
        server.proc.kill()
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "a rank outlived its fork server"
            time.sleep(0.05)
        assert server.handles[pid].wait(10) == -signal.SIGKILL  # what the client reports for a lost server
        assert not server.alive
        with pytest.raises(ForkServerError):
            server.spawn_all([_request(tmp_path, "late", "pass", os.getpgid(0))])
    finally:
        server.close()


def test_server_outlives_the_signals_meant_for_its_ranks(tmp_path: Path) -> None:
    # Under Slurm (proctrack linuxproc or cgroup) a step's signals reach every process of the
    # step, the fork server too: it must survive them, and the ranks still act on them.
    server = _server(tmp_path, [])
    try:
        server.wait_ready(60)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT):
            server.proc.send_signal(sig)
        time.sleep(0.3)
        assert server.proc.poll() is None
        state = (
            "import signal, time; print(signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, []),"
            " signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []), flush=True); time.sleep(60)"
        )
        pid = server.spawn_all([_request(tmp_path, "rank", state, os.getpgid(0))])[0]
        deadline = time.monotonic() + 30
        while not (tmp_path / "rank.log").exists() or not (tmp_path / "rank.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (tmp_path / "rank.log").read_text() == "True False\n"  # USR2 held for the runtime; TERM not
        os.kill(pid, signal.SIGTERM)
        assert server.handles[pid].wait(30) == -signal.SIGTERM
        assert server.proc.poll() is None
    finally:
        server.close()


def test_server_refuses_to_fork_after_an_import_that_starts_a_thread(tmp_path: Path) -> None:
    (tmp_path / "threadstarter.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,), name='poller', daemon=True).start()\n"
    )
    server = ForkServer(
        sys.executable,
        ["json", "threadstarter"],
        {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
        str(tmp_path / "server.log"),
    )
    try:
        hello = server.wait_ready(60)
        assert hello == {
            "ready": False,
            "reason": "after importing threadstarter: Python threads are running (poller)",
            "module": "threadstarter",
            "preloaded": ["json"],
        }
    finally:
        server.close()


def test_forked_ranks_write_through_the_masker_and_lose_nothing_when_killed(tmp_path, monkeypatch) -> None:
    # With a job.pass_env value to mask, each rank's stdout and stderr are a pipe (sent to the
    # server with the spawn request) that the masker copies to its log with the value replaced.
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("ORCH_TEST_TOKEN", secret)
    read = "import os, sys, time; v = os.environ['ORCH_TEST_TOKEN']; "
    server = _server(tmp_path, [])
    try:
        server.wait_ready(60)
        pgid = os.getpgid(0)
        requests = [
            _request(tmp_path, "sleeper", "import time; time.sleep(60)", pgid),
            _request(
                tmp_path,
                "split",
                read + "sys.stdout.write('token=' + v[:5]); sys.stdout.flush(); time.sleep(0.3); "
                "print(v[5:] + ' end'); print('err ' + v, file=sys.stderr)",
                pgid,
            ),
            _request(
                tmp_path,
                "killed",
                read
                + "sys.stdout.write('dying token=' + v[:6]); sys.stdout.flush(); os.kill(os.getpid(), 9)",
                pgid,
            ),
        ]
        output = MaskedOutput.start(["ORCH_TEST_TOKEN"], [r["log"] for r in requests])
        assert output is not None
        try:
            pids = server.spawn_all(requests, output.rank_ends)
        finally:
            output.hand_over()
        sleeper, split, killed = (server.handles[p] for p in pids)
        assert split.wait(30) == 0 and killed.wait(30) == -signal.SIGKILL
        # Each log is whole once its rank has exited, while another rank still runs: no rank
        # holds another's pipe. The killed rank's last, unfinished write is there, redacted.
        logs = {name: tmp_path / f"{name}.log" for name in ("split", "killed")}
        wait_for(lambda: logs["killed"].read_text() == "dying token=<redacted>", 10, "the killed rank's log")
        wait_for(lambda: logs["split"].read_text() == "token=<redacted> end\nerr <redacted>\n", 10, "split")
        assert sleeper.poll() is None and output.process.poll() is None
        os.kill(sleeper.pid, signal.SIGKILL)
        assert sleeper.wait(30) == -signal.SIGKILL
        output.finish(10)
        assert output.process.returncode == 0  # it left on its own: every pipe had ended
        assert oct(logs["split"].stat().st_mode & 0o777) == "0o600"
    finally:
        server.close()


# A process the rank starts in a session of its own (wandb's service does) escapes the attempt's
# group, and holds the rank's stdout: the pipe to the masker never ends while it lives.
STRAGGLER = """
import os, sys, time
for i in range(120):
    print(f"straggler {i} token={os.environ['ORCH_TEST_TOKEN']}", flush=True)
    time.sleep(1)
"""
RANK_WITH_STRAGGLER = f"""
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {STRAGGLER!r}], start_new_session=True)
with open(sys.argv[1], "w") as fh:
    fh.write(str(child.pid))
v = os.environ["ORCH_TEST_TOKEN"]
for i in range(3):
    print(f"rank line {{i}} token={{v}}", flush=True)
print(f"rank on stderr token={{v}}", file=sys.stderr, flush=True)
"""


def test_an_attempt_ends_at_once_when_a_detached_child_holds_the_ranks_output(tmp_path, monkeypatch) -> None:
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("ORCH_TEST_TOKEN", secret)
    script, pid_file, log = tmp_path / "rank.py", tmp_path / "straggler.pid", tmp_path / "rank-0.log"
    script.write_text(RANK_WITH_STRAGGLER)
    spec = RankSpec(
        rank=0,
        local_rank=0,
        node_rank=0,
        argv=(sys.executable, str(script), str(pid_file)),
        env={"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    group = SubprocessLauncher(pass_env=["ORCH_TEST_TOKEN"]).start_attempt([spec], [str(log)], [{}])
    straggler = None
    try:
        assert group.output is not None
        masker = group.output.process
        assert group.ranks[0].popen.wait(30) == 0
        straggler = int(wait_for(lambda: pid_file.read_text(), 10, "the straggler's pid"))
        wait_for(lambda: "straggler 0 " in log.read_text(), 10, "the straggler's first line")
        started = time.monotonic()
        group.close()
        took = time.monotonic() - started
        # The fault happened: the straggler outlived the attempt's group, still holding the pipe.
        assert psutil.pid_exists(straggler) and os.getsid(straggler) == straggler
        assert took < 1.0, f"the attempt's close took {took:.2f}s"
        text = log.read_text()
        rank_lines = {f"rank line {i} token=<redacted>" for i in range(3)}
        rank_lines.add("rank on stderr token=<redacted>")
        assert rank_lines <= set(text.splitlines()), text
        assert secret not in text
        # The straggler is not cut off (no EPIPE): its later lines still reach the log, masked.
        last = max(int(line.split()[1]) for line in text.splitlines() if line.startswith("straggler "))
        wait_for(lambda: f"straggler {last + 1} token=<redacted>" in log.read_text(), 10, "a later line")
        assert psutil.pid_exists(straggler)
        staying = _writers_of(log)
        assert len(staying) == 1 and staying[0].pid != masker.pid  # a copy of the masker stays for it
        os.kill(straggler, signal.SIGKILL)
        wait_for(lambda: not _writers_of(log), 10, "the masker's copy to leave with the straggler")
    finally:
        if straggler is not None and psutil.pid_exists(straggler):
            os.kill(straggler, signal.SIGKILL)
        group.close()
    assert secret not in log.read_text()


def _writers_of(log: Path) -> list[psutil.Process]:
    """The maskers that have `log` open."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "orchestrator.launch.masking" in (proc.info["cmdline"] or []) and any(
                f.path == str(log) for f in proc.open_files()
            ):
                found.append(proc)
        except psutil.Error:
            pass  # gone meanwhile
    return found
