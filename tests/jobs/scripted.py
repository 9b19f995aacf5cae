"""A rank that follows a script instead of training: what each attempt does comes from
SCRIPT_TIMELINE (JSON, one entry per attempt; the last repeats). No torch, so an attempt takes
a fraction of a second under either backend's supervisor.

An entry: {"checkpoint": STEP or null,            rank 0 commits a (tiny) checkpoint at STEP
           "fail": {"rank": R, "type": T, "message": M} or null,   rank R records T: M, exits 1
           "preempt": true}                        every rank records a stop on request, exits 75
Every rank also writes the MASTER_PORT it saw to port-ATTEMPT-RANK in the run directory.
"""

import json
import os
import sys
import time

from orchestrator.contract import ENV_ERROR_FILE, PREEMPTED_EXIT_CODE, PREEMPTED_TYPE, error_record
from orchestrator.storage.ckpt_store import CheckpointStore, make_token
from orchestrator.storage.rundir import join_url

timeline = json.loads(os.environ["SCRIPT_TIMELINE"])
attempt, rank = int(os.environ["ORCH_ATTEMPT"]), int(os.environ["RANK"])
entry = timeline[min(attempt, len(timeline) - 1)]
run_dir = os.environ["ORCH_RUN_DIR"]
with open(os.path.join(run_dir, f"port-{attempt}-{rank}"), "w") as fh:
    fh.write(os.environ["MASTER_PORT"])


def record(kind: str, message: str) -> None:
    with open(os.environ[ENV_ERROR_FILE], "w") as fh:
        json.dump(error_record(kind, message, rank=rank, time=time.time(), pid=os.getpid()), fh)


if rank == 0 and entry.get("checkpoint") is not None:
    step = int(entry["checkpoint"])
    store = CheckpointStore(join_url(run_dir, "ckpt"))
    token = make_token(attempt)
    tmp = store.tmp_dir(step, token)
    store.commit(
        tmp, step, token, [store.write_file(tmp, "state.pt", b"x" * 64)], {"model_digest": f"d{step}"}
    )
    open(os.path.join(run_dir, f"committed-{attempt}"), "w").close()
if entry.get("preempt"):
    record(PREEMPTED_TYPE, f"checkpointed step {entry.get('checkpoint')} after SIGUSR2")
    sys.exit(PREEMPTED_EXIT_CODE)
fail = entry.get("fail")
if fail and fail["rank"] == rank:
    # Fail after this attempt's checkpoint (if any) is committed, as a real job fails after saving.
    deadline = time.monotonic() + 30
    while entry.get("checkpoint") is not None and not os.path.exists(
        os.path.join(run_dir, f"committed-{attempt}")
    ):
        assert time.monotonic() < deadline, "rank 0 never committed"
        time.sleep(0.01)
    # ... and after every rank of the attempt has said which MASTER_PORT it saw: a failure
    # ends the others, and a rank still starting (a fresh interpreter on a busy machine) would
    # be gone before it wrote its port file.
    world = int(os.environ["WORLD_SIZE"])
    while not all(os.path.exists(os.path.join(run_dir, f"port-{attempt}-{r}")) for r in range(world)):
        assert time.monotonic() < deadline, "a rank never started"
        time.sleep(0.01)
    record(fail["type"], fail["message"])
    print(f"{fail['type']}: {fail['message']}", file=sys.stderr)
    sys.exit(1)
