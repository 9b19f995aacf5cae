"""Stand-ins for srun and scontrol, so that the Slurm supervisor's own code runs on this machine
without a cluster: `srun` starts the step's tasks as local processes with the SLURM_* variables
a real step gives them; `scontrol requeue` does what Slurm does to the incarnation (SIGTERM to
the batch step, here the supervisor). Run as `fake_slurm.py srun|scontrol ARGS...`.

Only what the supervisor uses: srun --ntasks=N --ntasks-per-node=M --output=PATTERN ...
--kill-on-bad-exit=1 CMD...; its exit status is the first failed task's (128+N for a signal).
"""

import os
import signal
import subprocess
import sys
import time


def srun(args: list[str]) -> int:
    options = {}
    while args and args[0].startswith("--"):
        name, _, value = args.pop(0)[2:].partition("=")
        options[name] = value
    ntasks, per_node = int(options["ntasks"]), int(options["ntasks-per-node"])
    procs = []
    for task in range(ntasks):
        node = task // per_node
        env = {
            **os.environ,
            "SLURM_PROCID": str(task),
            "SLURM_LOCALID": str(task % per_node),
            "SLURM_NODEID": str(node),
            "SLURM_STEP_ID": "0",
        }
        output = options["output"].replace("%t", str(task)).replace("%n", str(node))
        with open(output, "ab") as log:
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL))
    first_failure = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and not first_failure:
            first_failure = failed[0]
            for p in procs:  # --kill-on-bad-exit
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.02)
    codes = [p.returncode for p in procs]
    first_failure = first_failure or next((c for c in codes if c != 0), 0)
    return 128 - first_failure if first_failure < 0 else first_failure


def scontrol(args: list[str]) -> int:
    if args[:1] == ["requeue"]:
        with open(os.environ["FAKE_SLURM_LOG"], "a") as fh:
            fh.write(f"requeue {args[1]}\n")
        os.kill(os.getppid(), signal.SIGTERM)  # Slurm ends the incarnation
        return 0
    return 1


if __name__ == "__main__":
    sys.exit({"srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:]))
