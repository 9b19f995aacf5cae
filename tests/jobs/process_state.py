"""Records what a rank's process looks like from the inside, so a test can compare a forked
rank with a fresh interpreter: argv, __name__, sys.path[0], thread settings, RNG freshness,
the signal mask, and how its exit is reported (PROCESS_EXIT: code | raise | atexit)."""

import atexit
import json
import os
import signal
import sys

import local_helper
import numpy
import torch

rank = os.environ["RANK"]
record = {
    "name": __name__,
    "argv": sys.argv,
    "path0": sys.path[0],
    "local": local_helper.VALUE,
    "torch_threads": torch.get_num_threads(),
    "numpy_random": float(numpy.random.random()),
    "usr2_blocked": signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, []),
    "sigint_handler": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "stdin_empty": sys.stdin.read() == "",
    "secret_seen": os.environ.get("PROCESS_SECRET"),
    "pgid_is_own": os.getpgid(0) == os.getpid(),
}
out = os.path.join(os.environ["ORCH_RUN_DIR"], f"state-{rank}-{os.environ['ORCH_ATTEMPT']}.json")
with open(out, "w") as fh:
    json.dump(record, fh)

how = os.environ.get("PROCESS_EXIT", "code")
if how == "atexit":
    atexit.register(lambda: print(f"atexit ran on rank {rank}", flush=True))
print(f"unflushed line from rank {rank}", end="")  # must still reach the log at exit
if how == "raise" and rank == "1":
    raise RuntimeError("raised on purpose")
sys.exit(int(os.environ.get("PROCESS_CODE", "0")) if rank == "1" else 0)
