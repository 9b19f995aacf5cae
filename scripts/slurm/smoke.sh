#!/usr/bin/env bash
# smoke.sh [STATE_DIR] -- quick acceptance test of a cluster started by start.sh (about 20 s).
set -euo pipefail
STATE=${1:-${SLURMLAB_STATE:-${TMPDIR:-/tmp}/orch-slurm-cluster}}
source "$STATE/env.sh"
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT; cd "$W"
ok() { echo "ok   $*"; }
state() { squeue -h -t all -j "$1" -o %T; }
wait_state() {  # wait_state JOB STATE SECONDS
  for _ in $(seq $(($3 * 10))); do [[ $(state "$1") == "$2" ]] && return 0; sleep 0.1; done
  echo "FAIL job $1 is $(state "$1"), wanted $2" >&2; exit 1
}

[[ $(sinfo -h -p debug -o %T | sort -u) == idle ]] && ok "all nodes idle"
t0=$(date +%s%N); j=$(sbatch --parsable -o out.txt --wrap hostname); wait_state "$j" COMPLETED 30
ok "sbatch --wrap hostname -> COMPLETED in $(( ($(date +%s%N) - t0) / 1000000 )) ms ($(cat out.txt))"
[[ $(srun -n 2 hostname | wc -l) == 2 ]] && ok "srun -n 2 hostname"
N=$(sinfo -h -p debug -o %D)
[[ $(srun -N "$N" --ntasks-per-node=1 bash -c 'echo $SLURMD_NODENAME' | sort -u | wc -l) == "$N" ]] \
  && ok "srun -N $N runs one task on each of $N nodes"
if grep -q slurmdbd "$SLURM_CONF"; then
  sleep 1; [[ $(sacct -n -X -j "$j" -o State | tr -d ' ') == COMPLETED ]] && ok "sacct sees job $j"
fi
# requeue: restart count increments, job reruns after cred_expire+1 s
j=$(sbatch --parsable -o req.txt --open-mode=append --wrap 'echo run restart=${SLURM_RESTART_COUNT:-0}; sleep 300')
wait_state "$j" RUNNING 30; scontrol requeue "$j"; sleep 2; wait_state "$j" RUNNING 60
sleep 1; grep -q 'restart=1' req.txt && ok "scontrol requeue -> rerun with SLURM_RESTART_COUNT=1"
scancel "$j"
echo "smoke: all good"
