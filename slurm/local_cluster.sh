#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, to try the sbatch scripts (and run the
# project's SLURM tests) before a real cluster.
#
#   bash slurm/local_cluster.sh install   # Debian/Ubuntu packages (root; ~15 s)
#   bash slurm/local_cluster.sh start     # munged + slurmctld + slurmd; prints the SLURM_CONF to export
#   bash slurm/local_cluster.sh status    # exit 0 when the node is up
#   bash slurm/local_cluster.sh stop      # stops the daemons this script started (by their pid files)
#
# Everything lives under $SAPT_SLURM_DIR (default /tmp/sapt-slurm): slurm.conf, the
# daemons' logs, pid files and spool. Nothing in /etc is written, so a machine that is
# already a cluster client keeps its own config: the local cluster is reached only with
#   export SLURM_CONF=$SAPT_SLURM_DIR/slurm.conf
# Needs root (slurmd starts jobs as their user) and the slurmctld, slurmd, slurm-client
# and munge packages. Partition `debug`, one node with every CPU of this machine,
# JobRequeue=1 (what the preemption scripts rely on).
set -euo pipefail

DIR=${SAPT_SLURM_DIR:-/tmp/sapt-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "local_cluster: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (slurmd launches jobs as their user); run it with sudo"; }

wait_for() {  # wait_for <seconds> <what> <command...>
    local n=$1 what=$2; shift 2
    for _ in $(seq "$n"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    die "$what did not come up within ${n}s (logs in $DIR)"
}

node_idle() { sinfo -h -o %t 2>/dev/null | grep -qx 'idle\|mix\|alloc'; }

cmd_install() {
    need_root
    command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, slurm-client and munge with your package manager"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
    echo "local_cluster: installed $(slurmctld -V)"
}

cmd_status() {
    [ -f "$CONF" ] || { echo "local_cluster: not configured ($CONF absent)"; return 1; }
    if scontrol ping >/dev/null 2>&1 && node_idle; then
        echo "local_cluster: up (SLURM_CONF=$CONF)"
        sinfo
        return 0
    fi
    echo "local_cluster: down"
    return 1
}

cmd_start() {
    need_root
    for b in munged slurmctld slurmd sbatch scontrol; do
        command -v "$b" >/dev/null || die "$b not found: run 'bash slurm/local_cluster.sh install' first"
    done
    if [ -f "$CONF" ] && scontrol ping >/dev/null 2>&1 && node_idle; then
        echo "local_cluster: already up"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    mkdir -p "$DIR/ctld" "$DIR/d"
    # munge: the package made /etc/munge/munge.key; the daemon needs its run folder
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        [ -f /etc/munge/munge.key ] || die "/etc/munge/munge.key missing (reinstall munge)"
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
        wait_for 10 munged sh -c 'munge -n | unmunge'
    fi
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # the node line as slurmd sees this machine (sockets, cores, memory)
    local node
    node=$(slurmd -C | head -n1)
    cat >"$CONF" <<EOF
# written by slurm/local_cluster.sh: a one-node cluster on $host
ClusterName=sapt-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "local_cluster: $cpus CPU(s) on $host, config $CONF"
    slurmctld -c -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$CONF"
    wait_for 60 "slurmd (node idle)" node_idle
    echo "local_cluster: up; in your shell:"
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid <pidfile> <name>
    local f=$1 name=$2
    [ -f "$f" ] || return 0
    local pid
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        echo "local_cluster: stopped $name ($pid)"
    fi
    rm -f "$f"
}

cmd_stop() {
    # cancel what is still queued, so a later start does not resurrect it
    if [ -f "$CONF" ] && scontrol ping >/dev/null 2>&1; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pid "$DIR/slurmd.pid" slurmd
    stop_pid "$DIR/slurmctld.pid" slurmctld
    # munged is left running: other SLURM or munge users on the machine may need it
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status   (state in \$SAPT_SLURM_DIR, default /tmp/sapt-slurm)" >&2; exit 2 ;;
esac
