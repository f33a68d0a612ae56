# shellcheck shell=bash disable=SC2034  # sourced by up.sh and down.sh, which use these names
# Shared by up.sh and down.sh (sourced, not run): where the cluster's state lives and how
# to tell the daemons up.sh started from any other process.

STATE=${SOUP_SLURM_STATE:-/tmp/soup-slurm}
# Written into the state directory by up.sh: down.sh deletes a directory only when it holds this.
MARKER=$STATE/.made-by-soup-slurm-up
# One line per daemon up.sh started, in start order: "<name> <pid>".
PIDS=$STATE/pids
# The link up.sh makes when the system has no slurm.conf, so `sinfo` and friends find the cluster
# without SLURM_CONF; down.sh removes it only while it still points at this state directory.
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$STATE/etc/slurm.conf

# is_ours <name> <pid>: the process <pid> is alive and is the daemon <name> (a PID the
# kernel reused for something else does not count).
is_ours() {
    local name=$1 pid=$2
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}
