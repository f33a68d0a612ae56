#!/usr/bin/env bash
# Stop the one-node SLURM cluster scripts/slurm/up.sh started and delete its state (configs,
# logs, the accounting database). Only the daemons whose PIDs up.sh recorded are stopped, and
# only while each PID still is that daemon; jobs still in the cluster are cancelled first, so
# no job outlives its slurmd. Idempotent: with nothing started it says so and exits 0.
# The packages stay installed (a later up.sh starts in seconds).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

T0=$(date +%s.%N)
# A closed stdout (down.sh piped into something that quit) must not stop it halfway.
trap '' PIPE
say() { echo "[slurm down] $*" 2>/dev/null || true; }

if [ ! -f "$MARKER" ]; then
    say "nothing to stop ($STATE was not made by up.sh)"
    exit 0
fi

declare -A pid_of=()
if [ -f "$PIDS" ]; then
    while read -r name pid; do pid_of[$name]=$pid; done <"$PIDS"
fi

# Jobs first, through the controller that runs them, while it is still up.
if is_ours slurmctld "${pid_of[slurmctld]:-}"; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs still in the cluster: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi

# stop <name>...: SIGTERM to each, up to 20 s for them to exit cleanly, then SIGKILL.
stop() {
    local name pid running=()
    for name in "$@"; do
        pid=${pid_of[$name]:-}
        if is_ours "$name" "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            running+=("$name")
        elif [ -n "$pid" ]; then
            say "$name (PID $pid) is not running"
        fi
    done
    for _ in $(seq 100); do
        local left=()
        for name in "${running[@]}"; do
            if is_ours "$name" "${pid_of[$name]}"; then
                left+=("$name")
            else
                say "stopped $name (PID ${pid_of[$name]})"
            fi
        done
        running=("${left[@]}")
        [ ${#running[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    for name in "${running[@]}"; do
        say "$name (PID ${pid_of[$name]}) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "${pid_of[$name]}" 2>/dev/null || true
    done
}
# The reverse of up.sh's start order, each daemon's dependencies outliving it: the SLURM
# daemons talk to slurmdbd as they stop, all three authenticate through munged, and
# slurmdbd writes to MariaDB.
stop slurmd slurmctld
stop slurmdbd
stop mariadbd munged

if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$SLURM_CONF" ]; then
    rm -f "$SYSTEM_CONF"
fi
# Only a directory up.sh made (it holds the marker), and never / or an empty path.
case $STATE in "" | / | /tmp | /tmp/) say "refusing to delete $STATE" ; exit 1 ;; esac
rm -rf "$STATE"
say "down in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s; deleted $STATE"
