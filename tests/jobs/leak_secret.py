"""Leaks the value of a job.pass_env variable in every way a job can (tests/integration/
test_secrets.py checks that none of it reaches a file of the run directory or the console):

    leak_secret.py NAME [--runtime-hook]

Rank 0 prints it whole, in two writes with a pause between them, on stderr, then dies of an
exception whose message holds it (recorded by the launcher's entry, or with --runtime-hook by
orchestrator.runtime's own hook, which writes first). Rank 1 writes the start of it without a
newline and is killed in the middle, once rank 0's error record exists (so rank 0 is the root
cause): its log must still get everything it wrote, that start redacted.
"""

import os
import signal
import sys
import time

name = sys.argv[1]
value = os.environ[name]
rank = int(os.environ["RANK"])
if "--runtime-hook" in sys.argv:
    from orchestrator.runtime import install_excepthook

    install_excepthook()

if rank == 0:
    print(f"rank 0 prints token={value}", flush=True)
    half = len(value) // 2
    sys.stdout.write(f"rank 0 writes token={value[:half]}")
    sys.stdout.flush()
    time.sleep(0.5)  # the masker has read the first half long before the second comes
    sys.stdout.write(f"{value[half:]} in two writes\n")
    sys.stdout.flush()
    print(f"rank 0 on stderr token={value}", file=sys.stderr, flush=True)
    raise RuntimeError(f"could not log in with token={value}")

sys.stdout.write(f"rank 1 dies writing token={value[:6]}")
sys.stdout.flush()
rank0_record = os.path.join(os.path.dirname(os.environ["ORCH_ERROR_FILE"]), "rank-0.error.json")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        if os.path.getsize(rank0_record) > 0 and open(rank0_record).read().strip():
            break
    except OSError:
        pass
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
