#!/bin/bash
# Step launcher: `srun` runs this once per rank. It maps Slurm's task variables onto the env
# contract (orchestrator/spec/plan.py: CONTRACT_VARS), then execs the job, so Slurm's signals
# (--signal warnings, preemption, requeue) reach the job process itself.
# The values shared by every rank (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, NNODES,
# LOCAL_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT, ORCH_*) come from the supervisor through
# srun's environment. Nothing from cluster.yaml is substituted into this file.
set -eu
# A --signal warning (SIGUSR2) that lands while the job is still importing must neither kill
# it nor be lost: the job is exec'd with SIGUSR2 blocked, so the signal stays pending until
# orchestrator.runtime installs its handler and unblocks it (a blocked signal survives exec;
# an ignored one would be discarded). The shell ignores it for the few ms before that.
trap '' USR2
export RANK="$SLURM_PROCID"
export LOCAL_RANK="$SLURM_LOCALID"
export NODE_RANK="$SLURM_NODEID"
export GROUP_RANK="$SLURM_NODEID"
export ROLE_RANK="$SLURM_PROCID"
export ORCH_ERROR_FILE="$ORCH_LOG_DIR/rank-$SLURM_PROCID.error.json"
export TORCHELASTIC_ERROR_FILE="$ORCH_ERROR_FILE"
export ORCH_HEARTBEAT_FILE="$ORCH_LOG_DIR/rank-$SLURM_PROCID.heartbeat"
# "$1" is the job's Python; -I -S keeps this hop to one bare interpreter start.
exec "$1" -I -S -c 'import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
signal.signal(signal.SIGUSR2, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@"
