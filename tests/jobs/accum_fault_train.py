"""jobs/train_ddp.py (same arguments, same weights), except that in attempt 0 rank FAULT_RANK
(default 1), at its micro-batch FAULT_MICRO (1-based, counted over the attempt), either dies
at once (FAULT=kill: os._exit(86), like a SIGKILL) or gets a preemption signal (FAULT=preempt:
SIGUSR2), in the middle of an optimizer step's accumulation. It prints `fault: ...` first, so a
test can tell that the fault fired where it meant it to."""

import contextlib
import os
import runpy
import signal
import sys
from pathlib import Path

from orchestrator import runtime

FAULT = os.environ["FAULT"]
FAULT_MICRO = int(os.environ["FAULT_MICRO"])
FAULT_RANK = int(os.environ.get("FAULT_RANK", "1"))
TRAIN = Path(__file__).resolve().parents[2] / "jobs" / "train_ddp.py"

micro_step = runtime.GradientAccumulation.micro_step
seen = 0


@contextlib.contextmanager
def faulty_micro_step(self):
    global seen
    seen += 1
    here = os.environ.get("ORCH_ATTEMPT") == "0" and int(os.environ.get("RANK", "0")) == FAULT_RANK
    if here and seen == FAULT_MICRO:
        where = "mid-accumulation" if not self.boundary else "at a step boundary"
        print(f"fault: {FAULT} at micro-batch {seen} ({where})", flush=True)
        if FAULT == "kill":
            os._exit(86)
        os.kill(os.getpid(), signal.SIGUSR2)
    with micro_step(self):
        yield


runtime.GradientAccumulation.micro_step = faulty_micro_step
sys.argv = [str(TRAIN), *sys.argv[1:]]
runpy.run_path(str(TRAIN), run_name="__main__")
