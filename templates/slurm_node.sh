#!/bin/bash
# Node step launcher: with launch.mode auto, `srun` runs this once per node. It starts the node
# agent (orchestrator/backends/slurm/node_agent.py), which forks the node's ranks and maps Slurm's task
# variables onto the env contract for each of them. Nothing from cluster.yaml is substituted
# into this file; "$1" is the supervisor's Python, the rest the job's command line.
set -eu
# Slurm's signals (a --signal warning, SIGTERM of a preemption, SIGUSR1 of the hang watchdog)
# may land before the agent's handlers exist. Held blocked until then (a blocked signal survives
# exec and stays pending; an ignored one would be lost), the agent receives them and passes
# them on to its ranks. The shell ignores the first two for the few ms before that. A
# persistent agent takes SIGTERM (and SIGINT) while it joins its supervisor's hub: before any
# rank exists, a stop ends it there (node_agent.LeaveOnSignal).
trap '' USR1 USR2
exec "$1" -I -S -c 'import os, signal, sys
held = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, held)
for sig in held:
    signal.signal(sig, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$1" -m orchestrator.backends.slurm.node_agent "${@:2}"
