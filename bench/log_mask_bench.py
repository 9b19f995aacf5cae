"""A rank's log through the masker (job.pass_env has a value to mask) against straight to its
file, as the launchers do without one.

    .venv/bin/python bench/log_mask_bench.py [--mb 200] [--rounds 3] [--width 120]

The writer is a fresh interpreter that writes --mb MB of --width-byte lines, one line in 1000
holding the secret, in two ways:
- print: one print() per line with PYTHONUNBUFFERED=1, as every rank runs (orch sets it), so
  each line is its own write: the masker's most reads per byte;
- bulk: the same bytes in writes of 1000 lines (a job that buffers its output).
Sides, measured in the same run and alternating (the order reversed every other round):
- baseline: the writer's stdout and stderr are the log file, opened as SubprocessLauncher does;
- masked: processes.MaskedOutput, the launchers' own path: a pipe to the masker process, which
  writes the file.
Time: from the writer's start until its log is complete (the writer has exited, and on the
masked side the masker has written everything and left, its start-up included). The median
of --rounds per side; `masked / baseline` above 1 is what masking costs in time. CPU: the
children's user + sys time (writer, and the masker on the masked side). The masked log is
checked: no secret in it, one `<redacted>` per leaking line.
Figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.contract import REDACTED
from orchestrator.launch.processes import MaskedOutput

NAME = "ORCH_BENCH_TOKEN"
SECRET = "hf_bench0123456789abcdefXYZ"
LEAK_EVERY = 1000

WRITER = """\
import os, sys
total, width, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
plain = "x" * (width - 1)
leaky = ("token=" + os.environ["ORCH_BENCH_TOKEN"]).ljust(width - 1, "x")
lines = [leaky if i % 1000 == 0 else plain for i in range(1000)]
rounds = total // (width * 1000)
if mode == "print":
    for _ in range(rounds):
        for line in lines:
            print(line)
else:
    block = "".join(line + "\\n" for line in lines).encode()
    for _ in range(rounds):
        os.write(1, block)
"""


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def writer_cmd(script: Path, total: int, width: int, mode: str) -> list[str]:
    return [sys.executable, str(script), str(total), str(width), mode]


def run_baseline(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(cmd, stdout=fd, stderr=fd, stdin=subprocess.DEVNULL, env=env)
    finally:
        os.close(fd)
    proc.wait()
    return time.perf_counter()


def run_masked(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    output = MaskedOutput.start([NAME], [str(log)])
    assert output is not None, "nothing to mask: the bench's secret is not set"
    try:
        end = output.rank_ends[0]
        proc = subprocess.Popen(cmd, stdout=end, stderr=end, stdin=subprocess.DEVNULL, env=env)
    finally:
        output.hand_over()
    proc.wait()
    output.finish(timeout=600)
    return time.perf_counter()


def check_masked(log: Path, total: int, width: int) -> None:
    data = log.read_bytes()
    leaks = total // (width * LEAK_EVERY)
    assert SECRET.encode() not in data, "the secret reached the log"
    assert data.count(REDACTED.encode()) == leaks, "a leaking line lost its mark"


def measure(side: str, cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, children's CPU seconds) of one side, its log removed afterwards."""
    log.unlink(missing_ok=True)
    cpu0, t0 = children_cpu(), time.perf_counter()
    t1 = (run_masked if side == "masked" else run_baseline)(cmd, log, env)
    return t1 - t0, children_cpu() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=200, help="MB of log lines per writer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=120, help="bytes per line, newline included")
    args = parser.parse_args()
    os.environ[NAME] = SECRET  # the launcher's environment: where job.pass_env values come from
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    total = args.mb * 1_000_000
    with tempfile.TemporaryDirectory(prefix="orch-mask-bench-") as tmp:
        script = Path(tmp) / "writer.py"
        script.write_text(WRITER)
        log = Path(tmp) / "rank-0.log"
        python = sys.version.split()[0]
        print(f"{args.mb} MB of {args.width}-byte lines, {args.rounds} round(s), python {python}")
        print("| writes | baseline | masked | masked / baseline | CPU baseline | CPU masked |")
        print("| --- | --- | --- | --- | --- | --- |")
        for mode in ("print", "bulk"):
            cmd = writer_cmd(script, total, args.width, mode)
            walls: dict[str, list[float]] = {"baseline": [], "masked": []}
            cpus: dict[str, list[float]] = {"baseline": [], "masked": []}
            for i in range(args.rounds):
                order = ("baseline", "masked") if i % 2 == 0 else ("masked", "baseline")
                for side in order:
                    wall, cpu = measure(side, cmd, log, env)
                    if side == "masked":
                        check_masked(log, total, args.width)
                    walls[side].append(wall)
                    cpus[side].append(cpu)
            log.unlink(missing_ok=True)
            base, masked = (statistics.median(walls[s]) for s in ("baseline", "masked"))
            cpu_base, cpu_masked = (statistics.median(cpus[s]) for s in ("baseline", "masked"))
            print(
                f"| {mode} | {base:.2f} s | {masked:.2f} s | **{masked / base:.2f}x** |"
                f" {cpu_base:.2f} s | {cpu_masked:.2f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
