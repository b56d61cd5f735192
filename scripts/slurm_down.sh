#!/usr/bin/env bash
# Stop the SLURM that scripts/slurm_up.sh started: each daemon by the pid it recorded in
# $VLFRAME_SLURM_DIR (default .cache/slurm/), never by name; jobs still running are cancelled first.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${VLFRAME_SLURM_DIR:-$ROOT/.cache/slurm}"
[ -d "$DIR" ] || exit 0
export PATH="/usr/sbin:$PATH"

if [ -f "$DIR/slurm.conf" ] && [ -f "$DIR/slurmctld.pid" ]; then
    export SLURM_CONF="$DIR/slurm.conf"
    timeout 10 scancel --quiet --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 30); do  # let the cancelled jobs end (at most ~15 s)
        [ -z "$(timeout 5 squeue -h -t PD,R,CG,S 2>/dev/null)" ] && break
        sleep 0.5
    done
fi

stop_pid() {  # TERM, wait up to 10 s, then KILL; only the recorded pid
    local name="$1" file="$DIR/$1.pid" pid
    [ -f "$file" ] || return 0
    pid="$(cat "$file")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { echo "slurm_down.sh: $name ($pid) ignored TERM, killing" >&2; kill -KILL "$pid"; }
    fi
    rm -f "$file"
}
stop_pid slurmd
stop_pid slurmctld
stop_pid munged
rm -f "$DIR/env"
[ -L "$DIR/munge" ] && rm -rf "$(readlink "$DIR/munge")" "$DIR/munge"
echo "slurm_down.sh: stopped SLURM of $DIR" >&2
