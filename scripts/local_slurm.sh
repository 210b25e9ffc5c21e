#!/usr/bin/env bash
# Start a real one-node Slurm on this machine (controller + compute node on localhost), for the cluster tests
# and for trying the jureca profile without a cluster:
#
#   sudo scripts/local_slurm.sh          # or as root; a second call returns at once when Slurm is already up
#   scripts/local_slurm.sh --stop        # stop the daemons this script started
#
# What it does: installs Debian's slurm-wlm (22.05 on bookworm) and munge when missing, writes a minimal
# /etc/slurm/slurm.conf for one node named after this host with this machine's CPUs and memory, in one
# partition `debug` (the CPU test partition the test profile selects), starts munged, slurmctld and slurmd as
# root and waits until `sinfo` shows the node idle.
#
# Choices, and why:
#   - no accounting (AccountingStorageType=none, no slurmdbd): Snakemake's SLURM executor then polls job state
#     with `squeue` (profile key slurm-status-command: squeue);
#   - MinJobAge=3600: finished jobs stay visible to `squeue`/`scontrol show job` for an hour, so the executor
#     sees them finish and tests can read each job's record afterwards;
#   - proctrack/linuxproc and task/none: they need no cgroup or systemd set-up, so they work inside containers;
#   - SelectType=select/cons_tres with CR_Core_Memory: several jobs share the node, each gets its cores/memory.
# Environment: SLURM_CONF_DIR (default /etc/slurm), LOCAL_SLURM_PARTITION (default debug),
# LOCAL_SLURM_MEM_FRACTION (default 0.85 of MemTotal offered to jobs).
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
MEM_FRACTION=${LOCAL_SLURM_MEM_FRACTION:-0.85}
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
NODE=$(hostname -s)

log() { echo "local_slurm: $*" >&2; }

if [[ ${1:-} == --stop ]]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (it installs packages and starts the Slurm daemons)"
    exit 2
fi

node_idle() {
    # "idle" or "mix"/"alloc" once the node serves jobs; a fast re-run accepts any of these.
    local state
    state=$(sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n1) || return 1
    [[ $state == idle* || $state == mix* || $state == alloc* ]]
}

# Quick path: already running with our config.
if command -v sinfo >/dev/null 2>&1 && [[ -f $CONF_DIR/slurm.conf ]] && pgrep -x slurmctld >/dev/null \
        && pgrep -x slurmd >/dev/null && node_idle; then
    log "Slurm already up: $(sinfo -h -o '%P %D %t' | tr '\n' ' ')"
    exit 0
fi

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || { log "apt-get not found: install slurm-wlm and munge yourself"; exit 3; }
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    fi
fi

# 2. Munge (authentication between the Slurm commands and daemons).
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null 2>&1 || true; fi
    [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge /var/lib/munge /var/log/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force 2>/dev/null || /usr/sbin/munged --force
    else
        /usr/sbin/munged --force
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# 3. slurm.conf for this machine: slurmd -C prints the node's real CPUs/sockets/cores/threads and memory.
CPUS=$(nproc --all)
MEM_MB=$(awk -v f="$MEM_FRACTION" '/^MemTotal:/ {printf "%d", $2 / 1024 * f}' /proc/meminfo)
HW=$(slurmd -C 2>/dev/null | head -n1 | grep -o 'CPUs=.*ThreadsPerCore=[0-9]*' || echo "CPUs=$CPUS")
mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
NEW_CONF=$(cat <<EOF
# Written by scripts/local_slurm.sh: one node on localhost for the CytoNet cluster tests.
ClusterName=cytonet-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# Containers: no cgroups/systemd needed.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: Snakemake polls with squeue, and finished jobs stay listed for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 $HW RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
changed=0
if [[ ! -f $CONF_DIR/slurm.conf ]] || [[ $(cat "$CONF_DIR/slurm.conf") != "$NEW_CONF" ]]; then
    printf '%s\n' "$NEW_CONF" > "$CONF_DIR/slurm.conf"
    changed=1
fi
# Debian's 22.05 also looks in /etc/slurm-llnl on some set-ups.
[[ $CONF_DIR == /etc/slurm && -d /etc/slurm-llnl && ! -e /etc/slurm-llnl/slurm.conf ]] \
    && ln -s /etc/slurm/slurm.conf /etc/slurm-llnl/slurm.conf || true
export SLURM_CONF=$CONF_DIR/slurm.conf

# 4. Daemons (restarted when the config changed).
if [[ $changed == 1 ]]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
fi
if ! pgrep -x slurmctld >/dev/null; then
    log "starting slurmctld"
    slurmctld -c -i
fi
if ! pgrep -x slurmd >/dev/null; then
    log "starting slurmd"
    slurmd
fi

# 5. Wait for the node to serve jobs; a node left DOWN/DRAIN by an earlier run is resumed.
for i in $(seq 120); do
    if node_idle; then
        log "Slurm up: $(sinfo -h -o '%P %D %t %c CPUs' | tr '\n' ' ')"
        exit 0
    fi
    if (( i % 10 == 0 )); then
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
done
log "node $NODE did not become idle; sinfo says:"
sinfo -N -l >&2 || true
tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
exit 1
