"""jobs/train_ddp.py (same arguments, same weights), except that in an attempt below
HOLD_ATTEMPTS every rank holds at step HOLD_STEP (before that step's checkpoint logic) until it
is killed. A test that kills attempts from outside then never races their end: the attempt is
alive whenever the kill comes, however slow the machine."""

import os
import runpy
import sys
import time
from pathlib import Path

from orchestrator import runtime

HOLD_STEP = int(os.environ["HOLD_STEP"])
HOLD_ATTEMPTS = int(os.environ["HOLD_ATTEMPTS"])
TRAIN = Path(__file__).resolve().parents[2] / "jobs" / "train_ddp.py"

step_end = runtime.Checkpointer.step_end


def held_step_end(self, step, **kwargs):
    while self.ctx.attempt < HOLD_ATTEMPTS and step >= HOLD_STEP:
        time.sleep(1)  # until the test's SIGKILL (or the supervisor's stop)
    return step_end(self, step, **kwargs)


runtime.Checkpointer.step_end = held_step_end
sys.argv = [str(TRAIN), *sys.argv[1:]]
runpy.run_path(str(TRAIN), run_name="__main__")
