#!/usr/bin/env bash
# Start a single-node SLURM on this machine (munged, slurmctld, slurmd) for the tests marked
# `slurm`; stop it with scripts/slurm_down.sh. Needs root (Debian packages slurmctld, slurmd,
# slurm-client and munge are installed with apt-get when missing).
#
# Everything (config, state, logs, pid files) lives in one folder: $VLFRAME_SLURM_DIR, default
# .cache/slurm/ in the repository. The ports are free ones chosen at start (or
# $VLFRAME_SLURM_PORT and the next one), and munged listens on its own socket in that folder, so
# this cluster does not disturb (nor depend on) a system one. Clients reach it through
# SLURM_CONF: `source "$VLFRAME_SLURM_DIR/env"` (also printed on the last line).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${VLFRAME_SLURM_DIR:-$ROOT/.cache/slurm}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

if [ "$(id -u)" != 0 ]; then
    echo "slurm_up.sh: needs root (slurmd runs jobs as their user, munged as user munge)" >&2
    exit 1
fi
if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    echo "slurm_up.sh: already running from $DIR (scripts/slurm_down.sh stops it)" >&2
    echo "export SLURM_CONF=$DIR/slurm.conf"
    exit 0
fi

missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "slurm_up.sh: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$DIR/apt.log" 2>&1 \
        || { apt-get update -q >>"$DIR/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$DIR/apt.log" 2>&1; } \
        || { echo "slurm_up.sh: apt-get install failed, see $DIR/apt.log" >&2; exit 1; }
fi
export PATH="/usr/sbin:$PATH"

free_port() {  # a TCP port nobody listens on now (bash only: /dev/tcp connect fails = free)
    local p
    for p in $(shuf -i 20000-60000 -n 200); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    return 1
}
CTLD_PORT="${VLFRAME_SLURM_PORT:-$(free_port)}"
SLURMD_PORT=$((CTLD_PORT + 1))

[ -L "$DIR/munge" ] && rm -rf "$(readlink "$DIR/munge")"
rm -rf "$DIR/state" "$DIR/munge"
mkdir -p "$DIR/state/ctld" "$DIR/state/d" "$DIR/log" "$DIR/munge"

# munged: as user munge, with its own socket, pid, seed and log under $DIR/munge.
if [ ! -f /etc/munge/munge.key ]; then
    (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null)
    chown munge:munge /etc/munge/munge.key
fi
chown munge:munge "$DIR/munge"
chmod 0755 "$DIR/munge"
MDIR="$DIR/munge"
if ! runuser -u munge -- test -w "$MDIR"; then
    # A folder above $DIR is closed to user munge (e.g. under /root): munged's files live in /run
    # instead, linked from $DIR/munge (slurm_down.sh removes both).
    rm -rf "$DIR/munge"
    MDIR="$(mktemp -d /run/vlframe-munge.XXXXXX)"
    chown munge:munge "$MDIR"
    chmod 0755 "$MDIR"
    ln -s "$MDIR" "$DIR/munge"
fi
SOCK="$MDIR/munge.socket"
runuser -u munge -- /usr/sbin/munged --socket="$SOCK" --pid-file="$MDIR/munged.pid" \
    --log-file="$MDIR/munged.log" --seed-file="$MDIR/munged.seed" --key-file=/etc/munge/munge.key
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "slurm_up.sh: munged did not start, see $MDIR/munged.log" >&2; exit 1; }
cp "$MDIR/munged.pid" "$DIR/munged.pid"

# The node as slurmd sees it (CPUs, boards, sockets, cores, threads), with ~90% of its memory
# (a node that reports less memory than configured is drained).
read -r -a NODE <<<"$(slurmd -C | head -n1)"
LAYOUT=""
MEM=1000
for kv in "${NODE[@]}"; do
    case "$kv" in
        CPUs=* | Boards=* | SocketsPerBoard=* | CoresPerSocket=* | ThreadsPerCore=*) LAYOUT="$LAYOUT $kv" ;;
        RealMemory=*) MEM=$(( ${kv#RealMemory=} * 9 / 10 )) ;;
    esac
done

cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/slurm_up.sh: a one-node cluster for tests (no cgroups, no accounting).
ClusterName=vlframe
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after 10 s instead of the default 120 s
AuthInfo=socket=$SOCK,cred_expire=10
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1$LAYOUT RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localhost
for _ in $(seq 100); do
    if [ -f "$DIR/slurmctld.pid" ] && [ -f "$DIR/slurmd.pid" ] && sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        break
    fi
    sleep 0.2
done
if ! sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    echo "slurm_up.sh: the node did not become idle; logs in $DIR/log" >&2
    sinfo -N -l >&2 || true
    exit 1
fi
echo "export SLURM_CONF=$SLURM_CONF" >"$DIR/env"
echo "slurm_up.sh: SLURM up from $DIR (slurmctld port $CTLD_PORT); stop: scripts/slurm_down.sh" >&2
echo "export SLURM_CONF=$SLURM_CONF"
