"""jobs/train_ddp.py, unchanged, plus a storage fault that bench/chaos.py can arm while it runs.

ORCH_FAULT is read at every failpoint, but a running rank's environment cannot be changed from
outside. So a daemon thread polls CHAOS_ARM_FILE: when it names this rank's attempt, it sets
ORCH_FAULT (and ORCH_FAULT_RECORD, so the driver can see that the fault fired) in this process.
Attempts the file does not name never fail this way, so one injection is one fault.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "jobs" / "train_ddp.py"


def _arm_when_told(arm_file: str, attempt: str) -> None:
    while True:
        try:
            with open(arm_file, encoding="utf-8") as fh:
                armed = json.load(fh)
        except (OSError, ValueError):  # not armed yet, or being written
            armed = None
        if armed and str(armed["attempt"]) == attempt:
            os.environ["ORCH_FAULT_RECORD"] = armed["record"]
            os.environ["ORCH_FAULT"] = armed["fault"]
            return
        time.sleep(0.1)


def main() -> None:
    arm_file = os.environ.get("CHAOS_ARM_FILE")
    if arm_file:
        args = (arm_file, os.environ.get("ORCH_ATTEMPT", ""))
        threading.Thread(target=_arm_when_told, args=args, daemon=True, name="chaos-arm").start()
    sys.argv = [str(TRAIN), *sys.argv[1:]]
    sys.path[0] = str(TRAIN.parent)
    runpy.run_path(str(TRAIN), run_name="__main__")


if __name__ == "__main__":
    main()
