#!/usr/bin/env bash
# Install (if missing) and start a single-node SLURM on this machine, for the SLURM tests.
#
# Runs as root on a fresh Debian/Ubuntu CI machine; safe to run again (it returns at once when the
# node is already up). Daemons: munged (as user munge), slurmctld and slurmd (as root). There is no
# slurmdbd, so `sacct` does not work here — the toolkit never needs it.
#
# Environment: SLURM_START_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
TIMEOUT=${SLURM_START_TIMEOUT:-60}

log() { echo "[slurm/start.sh] $*" >&2; }

node_ready() {
    # the node of this host is up when sinfo lists it as idle/mixed/allocated (not down/drained)
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(sinfo -h -N -n "$(hostname -s)" -o '%t' 2>/dev/null | head -n1) || return 1
    [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]]
}

if node_ready; then
    log "SLURM is already running: $(sinfo -h -N -o '%N %t %c CPUs')"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (installs packages and starts daemons)"
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
fi

HOST=$(hostname -s)
CPUS=$(nproc)
# slurmd drains a node whose configured memory exceeds what it finds; leave a margin
MEM_MB=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')

# --- munge: shared secret for authentication (one host, so any key will do) ---
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --force --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! pgrep -u munge -x munged >/dev/null; then
    log "starting munged"
    if command -v runuser >/dev/null; then
        runuser -u munge -- munged
    else
        su -s /bin/sh munge -c munged
    fi
fi
for _ in $(seq 1 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
done
munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }

# --- slurm.conf for this one host (addresses given, so the host name need not resolve) ---
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
cat >"$CONF" <<EOF
# Written by .ci/slurm/start.sh: a single-node test cluster on $HOST.
ClusterName=soundstage-ci
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# finished jobs stay visible to squeue/scontrol for this many seconds
MinJobAge=300
# seconds between SIGTERM and SIGKILL when a job is cancelled or runs out of time
KillWait=30
MaxArraySize=1001
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# slurm 22+ wants a cgroup.conf even with proctrack/linuxproc on some builds; keep it inert
[[ -f $CONF_DIR/cgroup.conf ]] || echo "CgroupPlugin=autodetect" >"$CONF_DIR/cgroup.conf"

if ! pgrep -x slurmctld >/dev/null; then
    log "starting slurmctld"
    slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
    log "starting slurmd"
    slurmd
fi

deadline=$((SECONDS + TIMEOUT))
until node_ready; do
    if ((SECONDS > deadline)); then
        log "node did not become idle within ${TIMEOUT}s"
        sinfo -N -l >&2 || true
        tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
        exit 1
    fi
    # a node left down/drained by an earlier run of this script: bring it back
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    sleep 1
done
log "SLURM is up: $(sinfo -h -N -o '%N %t %c CPUs')"
