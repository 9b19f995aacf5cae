#!/usr/bin/env bash
# start.sh [STATE_DIR] -- idempotently bring up a private single-host Slurm cluster
#   munged + [mariadbd + slurmdbd] + slurmctld + one slurmd per simulated node n1..nN,
# all talking over 127.0.0.1, with every file (configs, munge key, sockets, DB, state, spool,
# logs, pidfiles) under STATE_DIR (default ${TMPDIR:-/tmp}/orch-slurm-cluster).  Root, no systemd, no cgroups.
# Prints `export SLURM_CONF=...` (the only thing clients need) and writes it to STATE_DIR/env.sh.
# Re-running is safe: live daemons are kept; if a generated config changed, the Slurm daemons are
# restarted (jobs survive in STATE_DIR).
#
# Knobs (environment):
#   SLURMLAB_NODES=2            simulated nodes n1..nN (multiple-slurmd: one slurmd -N nI each)
#   SLURMLAB_CPUS=<nproc>       CPUs advertised per node (may exceed the real count)
#   SLURMLAB_MEM_MB=<host RAM>  RealMemory advertised per node (memory is not a consumable)
#   SLURMLAB_GPUS=0             fake GPUs per node: gres/gpu backed by dummy char devices; jobs get
#                               CUDA_VISIBLE_DEVICES/SLURM_STEP_GPUS, nothing is isolated
#   SLURMLAB_ACCOUNTING=1       run MariaDB + slurmdbd so sacct works (0: none, sacct fails)
#   SLURMLAB_CTLD_PORT=16817    slurmctld port; slurmd nI = +I, slurmdbd = -1, mariadb = -2
#   SLURMLAB_CRED_EXPIRE=10     credential lifetime (s, min 5) = delay before a requeued job can
#                               start again (Slurm's default is 120)
#   SLURMLAB_GRACE=30           GraceTime (s) of partition 'debug' when preempted by 'urgent'
#   SLURMLAB_PROCTRACK=linuxproc  proctrack plugin: linuxproc | pgid
#   SLURMLAB_HOSTS=auto         make n1..nN resolve to 127.0.0.1 for job processes:
#                                 auto: each slurmd runs in a private mount namespace in which
#                                       /etc/hosts is a bind-mounted copy plus the node names (the
#                                       real /etc/hosts is untouched; needs CAP_SYS_ADMIN, else
#                                       falls back to none with a warning)
#                                 etc:  append one marked line to the real /etc/hosts (stop.sh
#                                       removes it)
#                                 none: names do not resolve (use SLURM_LAUNCH_NODE_IPADDR)
#                               with auto, each node also sees its own empty tmpfs at
#                               STATE/node-local (a node-local path; `orch doctor --probe` tests)
# Partitions: debug (default, preemptible by urgent), urgent, short (MaxTime 10 minutes).
#   SLURMLAB_TIMEOUT=60         seconds to wait for each daemon / for the nodes to become idle
set -euo pipefail

STATE=${1:-${SLURMLAB_STATE:-${TMPDIR:-/tmp}/orch-slurm-cluster}}
NODES=${SLURMLAB_NODES:-3}
CPUS=${SLURMLAB_CPUS:-$(nproc)}
MEM=${SLURMLAB_MEM_MB:-$(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)}
GPUS=${SLURMLAB_GPUS:-0}
ACCT=${SLURMLAB_ACCOUNTING:-1}
CTLD_PORT=${SLURMLAB_CTLD_PORT:-16817}
CRED_EXPIRE=${SLURMLAB_CRED_EXPIRE:-10}
GRACE=${SLURMLAB_GRACE:-30}
PROCTRACK=${SLURMLAB_PROCTRACK:-linuxproc}
HOSTS_MODE=${SLURMLAB_HOSTS:-auto}
TIMEOUT=${SLURMLAB_TIMEOUT:-60}
DBD_PORT=$((CTLD_PORT - 1))
DB_PORT=$((CTLD_PORT - 2))

die() { echo "start.sh: $*" >&2; exit 1; }
[[ $(id -u) = 0 ]] || die "must run as root"
need=(munged slurmctld slurmd scontrol sinfo)
(( ACCT )) && need+=(slurmdbd mariadbd mariadb-install-db mariadb sacctmgr)
for b in "${need[@]}"; do command -v "$b" >/dev/null || die "$b not found; run install.sh first"; done

mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd -P)
CONF=$STATE/etc/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF

chmod 755 "$STATE"   # munged wants the socket's directory chain world-searchable
mkdir -p "$STATE"/{etc,ctld,log,run,munge,munge-run}
for i in $(seq 1 "$NODES"); do mkdir -p "$STATE/spool/n$i"; done
chmod 700 "$STATE/munge"; chmod 755 "$STATE/munge-run"

alive() {  # alive PIDFILE COMM: the pidfile names a live process whose comm is COMM
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$2" ]]
}
stop_pid() {  # stop_pid PIDFILE COMM: SIGTERM, wait up to 10 s, then SIGKILL
  alive "$1" "$2" || return 0
  local pid; pid=$(<"$1"); kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
wait_for() {  # wait_for WHAT CMD...: poll CMD every 0.2 s for up to TIMEOUT s
  local what=$1; shift
  for _ in $(seq $((TIMEOUT * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out waiting for $what (logs in $STATE/log)"
}
port_open() { (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

# ------------------------------------------------------------------ munge
MUNGE_SOCK=$STATE/munge-run/munge.socket
if [[ ! -s $STATE/munge/munge.key ]]; then
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$STATE/munge/munge.key"
fi
if ! alive "$STATE/munge-run/munged.pid" munged; then
  # --force: tolerate a stale socket and parent dirs that are not world-searchable (mktemp -d)
  munged --force --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCK" \
    --pid-file="$STATE/munge-run/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
fi
wait_for munged test -S "$MUNGE_SOCK"

# ------------------------------------------------------------------ generated configs
gen() {  # gen FILE MODE: install stdin as FILE if it differs; remember that something changed
  local tmp; tmp=$(mktemp "$1.XXXX"); cat > "$tmp"; chmod "$2" "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; CHANGED=1; fi
}
CHANGED=0

NODELIST="n[1-$NODES]"; NODE_PORTS="[$((CTLD_PORT + 1))-$((CTLD_PORT + NODES))]"
[[ $NODES = 1 ]] && { NODELIST=n1; NODE_PORTS=$((CTLD_PORT + 1)); }

GRES_TYPES="# no GPUs (SLURMLAB_GPUS=0)"; NODE_GRES=""
if (( GPUS > 0 )); then
  mkdir -p "$STATE/dev"   # dummy GPU "devices": char devices with /dev/null's major/minor
  for g in $(seq 0 $((GPUS - 1))); do
    [[ -c $STATE/dev/fakegpu$g ]] || mknod "$STATE/dev/fakegpu$g" c 1 3
  done
  GRES_TYPES="GresTypes=gpu"; NODE_GRES=" Gres=gpu:$GPUS"
  files="$STATE/dev/fakegpu[0-$((GPUS - 1))]"; [[ $GPUS = 1 ]] && files=$STATE/dev/fakegpu0
  gen "$STATE/etc/gres.conf" 644 < <(printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s\n' "$NODELIST" "$files")
else
  gen "$STATE/etc/gres.conf" 644 </dev/null
fi

if (( ACCT )); then
  ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections the munge socket is taken from here, not from AuthInfo
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux"
  gen "$STATE/etc/slurmdbd.conf" 600 <<EOF
# Generated by start.sh (slurmdbd finds it next to \$SLURM_CONF; must be mode 600)
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmlab
StorageLoc=slurm_acct_db
EOF
else
  ACCT_CONF="# no slurmdbd: sacct does not work (finished jobs are still logged to jobcomp.log)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  rm -f "$STATE/etc/slurmdbd.conf"
fi

gen "$CONF" 644 <<EOF
# Generated by start.sh -- private single-host Slurm cluster, all state under $STATE
ClusterName=slurmlab
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munged socket; cred_expire is also the requeue-to-restart delay (min 5, default 120)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: processes are tracked through /proc, no CPU/memory binding or limits
ProctrackType=proctrack/$PROCTRACK
TaskPlugin=task/none
$ACCT_CONF
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look at pending (e.g. requeued) jobs every 1-2 s instead of every 30-60 s
SchedulerParameters=sched_interval=2,bf_interval=1
# nodes advertise the CPUs/RealMemory configured below, not the probed hardware
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# finished jobs stay visible to squeue -t all / scontrol show job for 1 h
MinJobAge=3600
InactiveLimit=0
KillWait=10
# real preemption: a job in 'urgent' requeues running 'debug' jobs; these first get their
# --signal (or SIGTERM) right away, then after GraceTime SIGCONT+SIGTERM, KillWait, SIGKILL
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$GRES_TYPES
NodeName=$NODELIST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE_PORTS CPUs=$CPUS RealMemory=$MEM$NODE_GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$GRACE
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
PartitionName=short Nodes=ALL MaxTime=00:10:00 State=UP PriorityTier=1
EOF

if (( CHANGED )); then   # configs changed under live daemons: restart the Slurm ones
  for f in "$STATE"/run/slurmd-*.pid; do [[ -e $f ]] && stop_pid "$f" slurmd; done
  stop_pid "$STATE/run/slurmctld.pid" slurmctld
  stop_pid "$STATE/run/slurmdbd.pid" slurmdbd
fi

# ------------------------------------------------------------------ MariaDB + slurmdbd
if (( ACCT )); then
  DB_SOCK=$STATE/db/mysqld.sock
  if [[ ! -d $STATE/db/data/mysql ]]; then
    mkdir -p "$STATE/db"
    mariadb-install-db --no-defaults --datadir="$STATE/db/data" --user=root \
      --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed, see $STATE/log/mariadb-install.log"
  fi
  if ! alive "$STATE/run/mariadbd.pid" mariadbd; then
    setsid mariadbd --no-defaults --user=root --datadir="$STATE/db/data" --socket="$DB_SOCK" \
      --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$STATE/run/mariadbd.pid" \
      --log-error="$STATE/log/mariadb.log" --skip-name-resolve --performance-schema=OFF \
      --innodb-buffer-pool-size=32M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
      --aria-pagecache-buffer-size=8M --key-buffer-size=1M --max-connections=50 \
      </dev/null >>"$STATE/log/mariadb.log" 2>&1 &
  fi
  wait_for mariadbd mariadb --no-defaults -S "$DB_SOCK" -u root -e 'SELECT 1'
  mariadb --no-defaults -S "$DB_SOCK" -u root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmlab';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  if ! alive "$STATE/run/slurmdbd.pid" slurmdbd; then
    slurmdbd   # no -f option: reads slurmdbd.conf from the directory of $SLURM_CONF
  fi
  wait_for slurmdbd port_open "$DBD_PORT"
fi

# ------------------------------------------------------------------ slurmctld
alive "$STATE/run/slurmctld.pid" slurmctld || slurmctld -f "$CONF"
wait_for slurmctld sh -c 'scontrol ping | grep -q "is UP"'

# ------------------------------------------------------------------ node-name resolution
NAMES=$(for i in $(seq 1 "$NODES"); do printf 'n%s ' "$i"; done)
HOSTS_LINE="127.0.0.1 ${NAMES% } # slurmlab:$STATE"
LAUNCH=()
case $HOSTS_MODE in
  auto)
    # rewritten in place (same inode) so a running bind mount sees updates
    { grep -v '# slurmlab:' /etc/hosts; echo "$HOSTS_LINE"; } > "$STATE/etc/hosts"
    if unshare -m --propagation slave true 2>/dev/null; then
      # Each node also gets its own empty tmpfs at $STATE/node-local: a node-local path (like /tmp
      # or /scratch on a real cluster) that the login node (this host) sees as another folder.
      mkdir -p "$STATE/node-local"
      LAUNCH=(unshare -m --propagation slave sh -c 'mount --bind "$0" /etc/hosts && mount -t tmpfs -o size=16m,mode=1777 orch-node-local "$1" && shift && exec "$@"' "$STATE/etc/hosts" "$STATE/node-local")
    else
      echo "start.sh: warning: no mount namespace possible, n1..n$NODES will not resolve (SLURMLAB_HOSTS=etc?)" >&2
    fi ;;
  etc)
    if ! grep -qxF "$HOSTS_LINE" /etc/hosts; then
      tmp=$(grep -vF "# slurmlab:$STATE" /etc/hosts || true)
      printf '%s\n%s\n' "$tmp" "$HOSTS_LINE" > /etc/hosts   # in place: may be a bind mount
    fi ;;
  none) ;;
  *) die "SLURMLAB_HOSTS must be auto, etc or none" ;;
esac

# ------------------------------------------------------------------ one slurmd per node
for i in $(seq 1 "$NODES"); do
  alive "$STATE/run/slurmd-n$i.pid" slurmd || "${LAUNCH[@]}" slurmd -f "$CONF" -N "n$i"
done

# ------------------------------------------------------------------ wait until usable
nodes_ready() {
  local states bad
  states=$(sinfo -h -N -o '%N %T' | sort -u)
  bad=$(awk '$2 ~ /^(drain|drained|draining|down)$/ {print $1}' <<<"$states" | paste -sd, -)
  [[ -n $bad ]] && scontrol update NodeName="$bad" State=RESUME >/dev/null 2>&1
  (( $(awk '$2 ~ /^(idle|mixed|allocated|completing)$/' <<<"$states" | wc -l) == NODES ))
}
wait_for "nodes n1..n$NODES to be idle" nodes_ready
(( ACCT )) && wait_for "cluster registration in slurmdbd" \
  sh -c 'sacctmgr -n -P show cluster format=cluster | grep -qx slurmlab'

echo "export SLURM_CONF=$CONF" > "$STATE/env.sh"
sinfo >&2
echo "export SLURM_CONF=$CONF"
