#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, with accounting, for the real-SLURM tests
# (tests/integration/test_slurm.py) and for trying `--multirun hydra/launcher=slurm` locally.
#
#   bash scripts/slurm/up.sh     # install (apt, first time only), configure, start, wait until usable
#   bash scripts/slurm/down.sh   # stop exactly the daemons up.sh started and delete their data
#
# Both are idempotent: up.sh on a running cluster says so and exits 0; on a half-started or
# dead one it cleans up (down.sh) and starts again. Needs root on Debian 12. No systemd: every
# daemon is started here, in this order, each checked before the next:
#   munged     as the munge user, with its own key and socket in the state directory
#   mariadbd   bound to 127.0.0.1, its data in the state directory (down.sh deletes it)
#   slurmdbd   accounting. Without it `sacct` fails, and submitit, which polls job states
#              with sacct, then sees every job as UNKNOWN and waits forever on a cancelled one.
#   slurmctld  the controller: partition "debug" (the default) holding this one node
#   slurmd     this node, declared with its real CPUs and memory (`slurmd -C`)
# up.sh returns once `sinfo` shows the node idle and `sacct` answers. If a daemon does not
# start, it names it, prints the end of its log, stops what it had started and exits 1.
#
# State (configs, logs, PIDs, database): $SOUP_SLURM_STATE, default /tmp/soup-slurm.
# Clients (sbatch, sinfo, sacct, submitit) find the cluster through /etc/slurm/slurm.conf, a
# link up.sh makes when the system has none; where it has one, export
# SLURM_CONF=$SOUP_SLURM_STATE/etc/slurm.conf. Ports: slurmctld 6817, slurmd 6818,
# slurmdbd 6819, MariaDB $SOUP_SLURM_DB_PORT (default 13306, on 127.0.0.1 only).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

CLUSTER=soup
PARTITION=debug
DB_PORT=${SOUP_SLURM_DB_PORT:-13306}
WAIT_S=60  # the longest any one daemon may take to become ready
# The mariadb-server metapackage depends on gawk (which then takes over the awk alternative)
# and on perl; mariadbd, mariadb-install-db and the mariadb client come without either in
# the -core packages. slurm-wlm is slurmctld + slurmd + the client commands.
PACKAGES=(slurm-wlm munge slurmdbd slurm-wlm-mysql-plugin mariadb-server-core mariadb-client-core)

T0=$(date +%s.%N)
say() { echo "[slurm up] $*"; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# fail <what> <log file or ""> <reason>: report, stop what this run started, exit 1.
fail() {
    echo "[slurm up] error: $1: $3" >&2
    if [ -n "$2" ] && [ -s "$2" ]; then
        echo "[slurm up] last lines of $2:" >&2
        tail -n 30 "$2" | sed 's/^/    /' >&2
    fi
    if [ -f "$MARKER" ]; then
        echo "[slurm up] stopping the daemons this run started (scripts/slurm/down.sh)" >&2
        bash "$HERE/down.sh" >&2 || true
    fi
    exit 1
}

if [ "$(id -u)" != 0 ]; then
    echo "[slurm up] error: run as root (it installs packages and starts daemons as their users)" >&2
    exit 1
fi

# ---------------------------------------------------------------- already up?
cluster_answers() {
    case $(timeout 10 sinfo -h -N -o %t 2>/dev/null | head -n 1) in idle | mix | alloc) ;; *) return 1 ;; esac
    timeout 10 sacct -n -X -S now >/dev/null 2>&1
}
if [ -f "$PIDS" ]; then
    alive=1
    while read -r name pid; do is_ours "$name" "$pid" || alive=0; done <"$PIDS"
    if [ "$alive" = 1 ] && [ "$(wc -l <"$PIDS")" -eq 5 ] && cluster_answers; then
        say "already up (state in $STATE); nothing to do"
        exit 0
    fi
fi
if [ -f "$MARKER" ]; then
    say "a previous start in $STATE is incomplete or has stopped: cleaning it up first"
    bash "$HERE/down.sh"
fi

# ---------------------------------------------------------------- install
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=()
for pkg in "${PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || fail install "" "apt-get not found; install ${missing[*]} yourself"
    T_INSTALL=$(date +%s.%N)
    say "installing ${missing[*]} (apt, --no-install-recommends)"
    mkdir -p "$STATE"
    apt_log=$STATE/apt.log
    awk_before=$(readlink -f /etc/alternatives/awk 2>/dev/null || true)
    # Packages' scripts start their daemons when installed (invoke-rc.d); up.sh starts its own.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# added by soup scripts/slurm/up.sh for the install, then removed\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when up.sh is interrupted during the install
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_ok=1
    if ! apt-cache show slurmctld >/dev/null 2>&1; then
        apt-get update -q >"$apt_log" 2>&1 || apt_ok=0
    fi
    if [ "$apt_ok" = 1 ] && ! apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1; then
        # Stale package lists (a mirror that moved on) are the usual cause: refresh once.
        { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >>"$apt_log" 2>&1 ||
            apt_ok=0
    fi
    if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    [ "$apt_ok" = 1 ] || fail "apt-get install" "$apt_log" "could not install ${missing[*]}"
    awk_after=$(readlink -f /etc/alternatives/awk 2>/dev/null || true)
    if [ -n "$awk_before" ] && [ "$awk_after" != "$awk_before" ]; then
        update-alternatives --quiet --set awk "$awk_before"
        say "the install switched awk to $awk_after; set it back to $awk_before"
    fi
    say "installed in $(elapsed "$T_INSTALL") s"
fi
for cmd in /usr/sbin/munged /usr/sbin/mariadbd /usr/bin/mariadb-install-db /usr/bin/mariadb /usr/sbin/slurmdbd \
           /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sinfo /usr/bin/sacct /usr/bin/sacctmgr; do
    [ -x "$cmd" ] || fail install "" "$cmd is missing after installing ${PACKAGES[*]}"
done
id munge >/dev/null 2>&1 || fail install "" "the munge user is missing (the munge package creates it)"
id slurm >/dev/null 2>&1 || fail install "" "the slurm user is missing (slurm-wlm-basic-plugins creates it)"

# ---------------------------------------------------------------- ports free?
# (Answered through bash's /dev/tcp: a connection that opens means another program listens.)
for port in 6817 6818 6819 "$DB_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port" "" "something else listens on 127.0.0.1:$port
    (SLURM's daemons use 6817-6819; pick another port for MariaDB with SOUP_SLURM_DB_PORT)"
    fi
done

# ---------------------------------------------------------------- configure
mkdir -p "$STATE"
touch "$MARKER"
: >"$PIDS"
mkdir -p "$STATE/etc" "$STATE/log" "$STATE/run" "$STATE/munge" "$STATE/mariadb" "$STATE/slurmctld" "$STATE/slurmd"
chown slurm:slurm "$STATE/log" "$STATE/run" "$STATE/mariadb" "$STATE/slurmctld"
chmod 755 "$STATE" "$STATE/etc" "$STATE/log" "$STATE/run"
# munged refuses a key others can read and a socket directory others can write.
chown munge:munge "$STATE/munge"
chmod 755 "$STATE/munge"
head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
chown munge:munge "$STATE/munge/munge.key"
chmod 400 "$STATE/munge/munge.key"
SOCKET=$STATE/munge/munge.socket

NODE=$(hostname -s)
# This machine as slurmd sees it: CPUs, sockets, cores, threads, RealMemory in MB.
hardware=$(/usr/sbin/slurmd -C 2>/dev/null | head -n 1 | sed 's/^NodeName=[^ ]* //')
[[ $hardware == CPUs=* ]] ||
    fail slurmd "" "\`slurmd -C\` did not describe this machine: $(/usr/sbin/slurmd -C 2>&1 | head -n 3)"

cat >"$SLURM_CONF" <<EOF
# Written by soup scripts/slurm/up.sh: a one-node cluster; down.sh deletes it.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups needed: processes are tracked through /proc, tasks are not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
# Accounting through slurmdbd, so sacct answers.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# Slurm's commands and daemons (all but slurmdbd) take the MUNGE socket for their messages
# from this field, not from AuthInfo: without it they look for munged at the default
# /run/munge/munge.socket.2 ("Munge encode failed" from sacctmgr).
AccountingStoragePass=$SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# Cores and memory are the consumable resources: two 1-CPU jobs share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
ReturnToService=2
# The node is what this file says (from slurmd -C), even if a VM reports a few MB less later.
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=10
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
chmod 644 "$SLURM_CONF"

DB_PASS=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat >"$STATE/etc/slurmdbd.conf" <<EOF
# Written by soup scripts/slurm/up.sh; down.sh deletes it.
AuthType=auth/munge
AuthInfo=socket=$SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
# slurmdbd refuses a config that is not its user's alone (it holds the database password).
chown slurm:slurm "$STATE/etc/slurmdbd.conf"
chmod 600 "$STATE/etc/slurmdbd.conf"

# Run by mariadbd at every start: the account slurmdbd uses, over TCP from 127.0.0.1.
cat >"$STATE/etc/mariadb-init.sql" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
chown root:slurm "$STATE/etc/mariadb-init.sql"
chmod 640 "$STATE/etc/mariadb-init.sql"

# ---------------------------------------------------------------- start
# record <name> <pid>: append to the PID list down.sh stops.
record() { echo "$1 $2" >>"$PIDS"; }

# wait_for <name> <pid or pidfile> <log> <description> <command...>: poll <command> until it
# succeeds, failing when the daemon dies or WAIT_S passes.
wait_for() {
    local name=$1 pid=$2 log=$3 what=$4 deadline=$((SECONDS + WAIT_S))
    shift 4
    # Each probe is bounded: a client can hang on a port that something else answers.
    until timeout 10 "$@" >/dev/null 2>&1; do
        # kill -0, not is_ours: a process just started may not have exec'd into <name> yet.
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then fail "$name" "$log" "exited before $what"; fi
        [ $SECONDS -lt $deadline ] || fail "$name" "$log" "not $what after ${WAIT_S} s"
        sleep 0.2
    done
}

# pid_from <name> <pidfile> <log>: the PID a daemon that detaches wrote, once it is there.
pid_from() {
    local name=$1 file=$2 log=$3 deadline=$((SECONDS + WAIT_S)) pid
    while :; do
        pid=$(cat "$file" 2>/dev/null || true)
        is_ours "$name" "$pid" && { echo "$pid"; return; }
        [ $SECONDS -lt $deadline ] || fail "$name" "$log" "no running $name with the PID in $file after ${WAIT_S} s"
        sleep 0.2
    done
}

# munged detaches once its socket is ready.
runuser -u munge -- /usr/sbin/munged --socket="$SOCKET" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
    --seed-file="$STATE/munge/munged.seed" >"$STATE/log/munged.out" 2>&1 ||
    fail munged "$STATE/munge/munged.log" "did not start ($(tail -n 3 "$STATE/log/munged.out" | tr '\n' ' '))"
# (pid_from in an assignment: when it fails, set -e stops up.sh here too.)
MUNGED_PID=$(pid_from munged "$STATE/munge/munged.pid" "$STATE/munge/munged.log")
record munged "$MUNGED_PID"
say "munged up ($(elapsed "$T0") s)"

mariadb-install-db --no-defaults --user=slurm --datadir="$STATE/mariadb" --auth-root-authentication-method=normal \
    --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 ||
    fail mariadb-install-db "$STATE/log/mariadb-install.log" "could not create the database directory"
# mariadbd stays in the foreground: start it in its own session, in the background.
setsid /usr/sbin/mariadbd --no-defaults --user=slurm --datadir="$STATE/mariadb" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$STATE/run/mariadb.sock" --pid-file="$STATE/run/mariadb.pid" \
    --skip-name-resolve --log-error="$STATE/log/mariadb.log" --init-file="$STATE/etc/mariadb-init.sql" \
    --innodb-buffer-pool-size=32M </dev/null >/dev/null 2>&1 &
MARIADB_PID=$!
record mariadbd "$MARIADB_PID"
wait_for mariadbd "$MARIADB_PID" "$STATE/log/mariadb.log" "accepting slurmdbd's login on 127.0.0.1:$DB_PORT" \
    mariadb --no-defaults --connect-timeout=3 -h 127.0.0.1 -P "$DB_PORT" -u slurm "-p$DB_PASS" -e 'SELECT 1' slurm_acct_db
say "mariadbd up ($(elapsed "$T0") s)"

/usr/sbin/slurmdbd >"$STATE/log/slurmdbd.out" 2>&1 || fail slurmdbd "$STATE/log/slurmdbd.log" "did not start"
SLURMDBD_PID=$(pid_from slurmdbd "$STATE/run/slurmdbd.pid" "$STATE/log/slurmdbd.log")
record slurmdbd "$SLURMDBD_PID"
wait_for slurmdbd "$SLURMDBD_PID" "$STATE/log/slurmdbd.log" "answering sacctmgr" sacctmgr -n list cluster
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true  # fails only when it is there already
wait_for slurmdbd "$SLURMDBD_PID" "$STATE/log/slurmdbd.log" "listing cluster $CLUSTER" \
    bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
say "slurmdbd up ($(elapsed "$T0") s)"

/usr/sbin/slurmctld >"$STATE/log/slurmctld.out" 2>&1 || fail slurmctld "$STATE/log/slurmctld.log" "did not start"
SLURMCTLD_PID=$(pid_from slurmctld "$STATE/run/slurmctld.pid" "$STATE/log/slurmctld.log")
record slurmctld "$SLURMCTLD_PID"
wait_for slurmctld "$SLURMCTLD_PID" "$STATE/log/slurmctld.log" "answering scontrol ping" \
    bash -c "scontrol ping | grep -q UP"
say "slurmctld up ($(elapsed "$T0") s)"

/usr/sbin/slurmd -N "$NODE" >"$STATE/log/slurmd.out" 2>&1 || fail slurmd "$STATE/log/slurmd.log" "did not start"
SLURMD_PID=$(pid_from slurmd "$STATE/run/slurmd.pid" "$STATE/log/slurmd.log")
record slurmd "$SLURMD_PID"
wait_for slurmd "$SLURMD_PID" "$STATE/log/slurmd.log" "idle in sinfo" \
    bash -c "[ \"\$(sinfo -h -n $NODE -o %t)\" = idle ]"
say "slurmd up ($(elapsed "$T0") s)"
wait_for slurmdbd "$SLURMDBD_PID" "$STATE/log/slurmdbd.log" "answering sacct" sacct -n -X -S now

# ---------------------------------------------------------------- clients find it
if [ ! -e "$SYSTEM_CONF" ] && [ ! -L "$SYSTEM_CONF" ]; then
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$SLURM_CONF" "$SYSTEM_CONF"
    where="sinfo, sbatch and sacct find it through $SYSTEM_CONF -> $SLURM_CONF"
elif [ "$(readlink "$SYSTEM_CONF")" = "$SLURM_CONF" ]; then
    where="sinfo, sbatch and sacct find it through $SYSTEM_CONF -> $SLURM_CONF"
else
    where="$SYSTEM_CONF belongs to another cluster: export SLURM_CONF=$SLURM_CONF to use this one"
fi
say "up in $(elapsed "$T0") s: node $NODE ($hardware) idle in partition $PARTITION, accounting on"
say "$where; state and logs in $STATE; stop with: bash scripts/slurm/down.sh"
