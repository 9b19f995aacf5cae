#!/usr/bin/env bash
# stop.sh [STATE_DIR] [--wipe] -- stop the cluster that start.sh started with the same STATE_DIR.
# Cancels all jobs of this private cluster, then stops slurmd(s), slurmctld, slurmdbd, mariadbd and
# munged via the PIDs in their pidfiles (nothing is killed by name).  --wipe deletes STATE_DIR.
set -uo pipefail

STATE=${SLURMLAB_STATE:-${TMPDIR:-/tmp}/orch-slurm-cluster}; WIPE=0
for a in "$@"; do
  case $a in --wipe) WIPE=1 ;; *) STATE=$a ;; esac
done
[[ -d $STATE ]] || { echo "stop.sh: no state dir $STATE"; exit 0; }
STATE=$(cd "$STATE" && pwd -P)
export SLURM_CONF=$STATE/etc/slurm.conf

alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$2" ]]
}
stop_pids() {  # stop_pids PIDFILE:COMM...: SIGTERM all at once, wait up to 20 s, then SIGKILL
  local spec f c pid pids=()
  for spec in "$@"; do
    f=${spec%:*}; c=${spec##*:}
    if alive "$f" "$c"; then pid=$(<"$f"); kill "$pid" 2>/dev/null && pids+=("$pid"); fi
    rm -f "$f"
  done
  for _ in $(seq 200); do
    local left=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
    (( ${#left[@]} )) || return 0
    pids=("${left[@]}"); sleep 0.1
  done
  echo "stop.sh: ${pids[*]} ignored SIGTERM, sending SIGKILL" >&2
  kill -9 "${pids[@]}" 2>/dev/null
}

# 1. cancel every job, so that no slurmstepd or job process outlives the daemons
if [[ -f $SLURM_CONF ]] && alive "$STATE/run/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | paste -sd' ' -)
  if [[ -n $jobs ]]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 150); do   # up to 30 s (KillWait is 10 s)
      [[ -z $(squeue -h -t R,CG,S,CF -o %A 2>/dev/null) ]] && break; sleep 0.2
    done
  fi
fi

# 2. daemons, by pidfile: slurmd(s)+slurmctld, then slurmdbd, then mariadbd+munged
specs=()
for f in "$STATE"/run/slurmd-*.pid; do [[ -e $f ]] && specs+=("$f:slurmd"); done
stop_pids "${specs[@]}" "$STATE/run/slurmctld.pid:slurmctld"
stop_pids "$STATE/run/slurmdbd.pid:slurmdbd"
stop_pids "$STATE/run/mariadbd.pid:mariadbd" "$STATE/munge-run/munged.pid:munged"

# 3. SLURMLAB_HOSTS=etc: drop our line from /etc/hosts (rewritten in place)
if grep -qF "# slurmlab:$STATE" /etc/hosts 2>/dev/null; then
  tmp=$(grep -vF "# slurmlab:$STATE" /etc/hosts); printf '%s\n' "$tmp" > /etc/hosts
fi

if (( WIPE )); then rm -rf "$STATE"; echo "stop.sh: stopped, wiped $STATE"; else echo "stop.sh: stopped"; fi
