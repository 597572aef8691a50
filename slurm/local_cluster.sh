#!/usr/bin/env bash
# A real SLURM cluster on this machine, to try the sbatch scripts (and run the project's
# SLURM tests) before a real cluster: one node on the machine itself, or N nodes, each a
# slurmd in its own network namespace with its own hostname and address.
#
#   bash slurm/local_cluster.sh install            # Debian/Ubuntu packages (root; ~15 s)
#   bash slurm/local_cluster.sh start              # one node: munged + slurmctld + slurmd
#   bash slurm/local_cluster.sh start --nodes 2    # node1, node2 on their own addresses
#   bash slurm/local_cluster.sh status             # nodes and addresses; exit 0 when all idle
#   bash slurm/local_cluster.sh stop               # removes everything start made
#   bash slurm/local_cluster.sh crash-node 2       # node2 dies: kill -9 all that runs on it
#   bash slurm/local_cluster.sh revive-node 2      # node2 boots again: its slurmd restarts
#
# Everything lives under $SAPT_SLURM_DIR (default /tmp/sapt-slurm): slurm.conf, the
# daemons' logs, pid files and spool (per node: <dir>/nodeK/, slurmd-nodeK.log). Nothing
# in /etc/slurm is written, so a machine that is already a cluster client keeps its own
# config: the local cluster is reached only with
#   export SLURM_CONF=$SAPT_SLURM_DIR/slurm.conf
# Needs root (slurmd starts jobs as their user) and the slurmctld, slurmd, slurm-client
# and munge packages. Partition `debug`, JobRequeue=1 (what the preemption scripts rely on).
#
# Several nodes (--nodes N, N >= 2; also needs `ip`, `nsenter`, `unshare`):
#   - a bridge $SAPT_SLURM_BRIDGE (default saptbr0) with $SAPT_SLURM_SUBNET.1/24 (default
#     10.77.0.1), one network namespace per node (<bridge>-nodeK) joined to it by a veth
#     pair, its end named eth0 with .1K (node1 10.77.0.11, node2 .12, ...);
#   - no default route in the namespaces, IP forwarding untouched: traffic stays between
#     the nodes and the bridge address (slurmctld); the machine's own interfaces and routes
#     are not touched;
#   - /etc/netns/<ns>/hosts names every node, bind-mounted over /etc/hosts for its slurmd,
#     which also gets its own hostname (unshare --uts): MASTER_ADDR=node1 resolves on each
#     node, and gloo / NCCL find the node's own address;
#   - every node has every CPU of the machine (they share them); one munged serves all.
#   `stop` kills what is left in the namespaces, deletes them, the bridge and
#   /etc/netns/<ns>, from $SAPT_SLURM_DIR/cluster.env, written before anything is made,
#   so it cleans up after a start that failed half-way too.
#   SAPT_SLURMCTLD_PORT (default 6817) / SAPT_SLURMD_PORT (6818): ports, for a second
#   cluster beside another on the same machine.
set -euo pipefail

DIR=${SAPT_SLURM_DIR:-/tmp/sapt-slurm}
CONF=$DIR/slurm.conf
STATE=$DIR/cluster.env
export SLURM_CONF=$CONF
BRIDGE=${SAPT_SLURM_BRIDGE:-saptbr0}
SUBNET=${SAPT_SLURM_SUBNET:-10.77.0}
CTLD_PORT=${SAPT_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SAPT_SLURMD_PORT:-6818}
NODES=1
# a cluster already made: stop/status act on what start recorded, not on the environment
# shellcheck source=/dev/null
[ -f "$STATE" ] && . "$STATE"

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

# the CPUs this machine gives us: nproc, but not the OMP_NUM_THREADS it honours (a caller
# running one thread per process would otherwise make every node a 1-CPU node)
cpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

node_idle() { sinfo -h -o %t 2>/dev/null | grep -qx 'idle\|mix\|alloc'; }
# every one of the N nodes idle (or busy with a job), none down or unknown
all_nodes_up() {
    local up
    up=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' \(idle\|mix\|alloc\)$' || true)
    [ "$up" -ge "$NODES" ]
}
ns_name() { echo "$BRIDGE-node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

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
    if scontrol ping >/dev/null 2>&1 && all_nodes_up; then
        echo "local_cluster: up, $NODES node(s) (SLURM_CONF=$CONF)"
        if [ "$NODES" -gt 1 ]; then
            echo "controller $(hostname -s) $SUBNET.1 (bridge $BRIDGE)"
            for k in $(seq "$NODES"); do
                echo "node$k $(node_addr "$k") (namespace $(ns_name "$k"))"
            done
        fi
        sinfo -N -o '%N %t %c %o'
        return 0
    fi
    echo "local_cluster: down"
    return 1
}

start_munge() {
    # munge: the package made /etc/munge/munge.key; the daemon needs its run folder
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        [ -f /etc/munge/munge.key ] || die "/etc/munge/munge.key missing (reinstall munge)"
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
        wait_for 10 munged sh -c 'munge -n | unmunge'
    fi
}

write_conf() {  # write_conf <controller> <node lines> <per-node paths>
    cat >"$CONF" <<EOF
# written by slurm/local_cluster.sh: $NODES node(s) on $(hostname -s)
ClusterName=sapt-local
SlurmctldHost=$1
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
StateSaveLocation=$DIR/ctld
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/slurmctld.log
$3
$2
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

make_node_net() {  # make_node_net <k>: namespace, veth into the bridge, address, hosts file
    local k=$1 ns addr j
    ns=$(ns_name "$k")
    addr=$(node_addr "$k")
    ip netns add "$ns"
    ip link add "${BRIDGE}v$k" type veth peer name eth0 netns "$ns"
    ip link set "${BRIDGE}v$k" master "$BRIDGE" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    mkdir -p "/etc/netns/$ns"
    {
        echo "127.0.0.1 localhost"
        echo "$SUBNET.1 $(hostname -s)"
        for j in $(seq "$NODES"); do echo "$(node_addr "$j") node$j"; done
    } >"/etc/netns/$ns/hosts"
}

start_node_slurmd() {  # start_node_slurmd <k>: slurmd -N nodeK inside its namespace
    local k=$1 ns
    ns=$(ns_name "$k")
    mkdir -p "$DIR/node$k"
    # not `ip netns exec`: it mounts a /sys without cgroups, and slurmd 22.05 stops there;
    # its own hostname (--uts) and /etc/hosts, so gloo / NCCL see the node's address
    nsenter --net="/run/netns/$ns" unshare --mount --uts --propagation private sh -c \
        "mount --bind /etc/netns/$ns/hosts /etc/hosts && hostname node$k && exec slurmd -f $CONF -N node$k"
}

cmd_start() {
    need_root
    local want=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) want=${2:-}; shift; [ $# -gt 0 ] && shift ;;
            --nodes=*) want=${1#--nodes=}; shift ;;
            *) die "start: unknown option $1 (start [--nodes N])" ;;
        esac
    done
    [[ "$want" =~ ^[1-9][0-9]*$ ]] || die "start: --nodes takes a positive count, not '$want'"
    [ "$want" -le 200 ] || die "start: --nodes $want: at most 200 (one /24 subnet)"
    for b in munged slurmctld slurmd sbatch scontrol; do
        command -v "$b" >/dev/null || die "$b not found: run 'bash slurm/local_cluster.sh install' first"
    done
    if [ -f "$CONF" ] && [ -f "$STATE" ] && scontrol ping >/dev/null 2>&1 && all_nodes_up; then
        [ "$NODES" = "$want" ] || die "a $NODES-node cluster is already up in $DIR: stop it first"
        echo "local_cluster: already up ($NODES node(s))"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    # what a half-made earlier start left (daemons, namespaces, bridge) goes first
    cmd_stop >/dev/null 2>&1 || true
    NODES=$want
    if [ "$NODES" -gt 1 ]; then
        for b in ip nsenter unshare; do
            command -v "$b" >/dev/null || die "--nodes $NODES needs '$b' (iproute2, util-linux)"
        done
        [ ${#BRIDGE} -le 12 ] || die "SAPT_SLURM_BRIDGE=$BRIDGE: at most 12 characters (its veths add 'vK')"
        [[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "SAPT_SLURM_SUBNET=$SUBNET: three octets, e.g. 10.77.0"
        if ip link show "$BRIDGE" >/dev/null 2>&1; then
            die "interface $BRIDGE exists already (another cluster? set SAPT_SLURM_BRIDGE)"
        fi
        if ip -br addr | grep -q " $SUBNET\."; then
            die "addresses in $SUBNET.0/24 are in use on this machine (set SAPT_SLURM_SUBNET)"
        fi
    fi
    mkdir -p "$DIR/ctld" "$DIR/d"
    # recorded before anything is made: stop removes it all even if this start fails
    printf 'NODES=%s\nBRIDGE=%s\nSUBNET=%s\nCTLD_PORT=%s\nSLURMD_PORT=%s\n' \
        "$NODES" "$BRIDGE" "$SUBNET" "$CTLD_PORT" "$SLURMD_PORT" >"$STATE"
    start_munge
    local host
    host=$(hostname -s)
    if [ "$NODES" = 1 ]; then
        # the node line as slurmd sees this machine (sockets, cores, memory)
        write_conf "$host" "$(slurmd -C | head -n1) State=UNKNOWN" \
            "SlurmdSpoolDir=$DIR/d
SlurmdPidFile=$DIR/slurmd.pid
SlurmdLogFile=$DIR/slurmd.log"
        echo "local_cluster: $(cpus) CPU(s) on $host, config $CONF"
        slurmctld -c -f "$CONF"
        wait_for 30 slurmctld scontrol ping
        slurmd -f "$CONF"
    else
        ip link add "$BRIDGE" type bridge
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
        local lines="" k
        for k in $(seq "$NODES"); do
            make_node_net "$k"
            lines+="NodeName=node$k NodeAddr=$(node_addr "$k") NodeHostname=node$k CPUs=$(cpus) State=UNKNOWN"$'\n'
        done
        write_conf "$host($SUBNET.1)" "$lines" "SlurmdSpoolDir=$DIR/%n
SlurmdPidFile=$DIR/%n/slurmd.pid
SlurmdLogFile=$DIR/slurmd-%n.log"
        echo "local_cluster: $NODES nodes on bridge $BRIDGE ($SUBNET.0/24), config $CONF"
        slurmctld -c -f "$CONF"
        wait_for 30 slurmctld scontrol ping
        for k in $(seq "$NODES"); do start_node_slurmd "$k"; done
    fi
    wait_for 60 "slurmd (all $NODES node(s) idle)" all_nodes_up
    echo "local_cluster: up; in your shell:"
    echo "export SLURM_CONF=$CONF"
}

need_node() {  # need_node <k>: k names a node of this multi-node cluster
    [ "$NODES" -gt 1 ] || die "crash-node / revive-node need a cluster of several nodes (start --nodes N)"
    [[ "${1:-}" =~ ^[1-9][0-9]*$ ]] && [ "$1" -le "$NODES" ] || die "no node '${1:-}': nodes are 1..$NODES"
    [ -e "/run/netns/$(ns_name "$1")" ] || die "node$1's namespace is gone (cluster stopped?)"
}

cmd_crash_node() {  # what a node that loses power does: everything on it ends at once
    need_root
    need_node "${1:-}"
    local ns pids left killed=""
    ns=$(ns_name "$1")
    # kill -9 is delivered at once but a big process takes a while to exit, and a process
    # forked meanwhile (slurmstepd spawning a task) was not in the first list: kill what the
    # namespace holds until it holds nothing (zombies are gone: they hold no namespace)
    for _ in $(seq 40); do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [ -n "${pids// /}" ] || break
        killed="$killed $pids"
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
        sleep 0.25
    done
    left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    rm -f "$DIR/node$1/slurmd.pid"
    [ -z "${left// /}" ] || die "node$1 did not die: still running after kill -9 for 10 s: $left"
    killed=$(echo "$killed" | tr ' ' '\n' | awk 'NF && !seen[$0]++' | tr '\n' ' ')
    echo "local_cluster: node$1 crashed: killed slurmd, its job steps and ranks (${killed:-nothing})"
}

cmd_revive_node() {  # the node is back: its slurmd again (slurmctld takes it back when it registers)
    need_root
    need_node "${1:-}"
    local pid
    pid=$(cat "$DIR/node$1/slurmd.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "local_cluster: node$1's slurmd is running ($pid)"
        return 0
    fi
    start_node_slurmd "$1"
    wait_for 30 "slurmd node$1" test -s "$DIR/node$1/slurmd.pid"
    echo "local_cluster: node$1's slurmd started; if SLURM marked it down: scontrol update nodename=node$1 state=resume"
}

stop_pid() {  # stop_pid <pidfile> <name>
    local f=$1 name=$2
    [ -f "$f" ] || return 0
    local pid
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        echo "local_cluster: stopped $name ($pid)"
    fi
    rm -f "$f"
}

cmd_stop() {
    # cancel what is still queued, so a later start does not resurrect it
    if [ -f "$CONF" ] && timeout 5 scontrol ping >/dev/null 2>&1; then
        timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    local k ns pids
    if [ "$NODES" = 1 ]; then
        stop_pid "$DIR/slurmd.pid" slurmd
    else
        for k in $(seq "$NODES"); do stop_pid "$DIR/node$k/slurmd.pid" "slurmd node$k"; done
    fi
    stop_pid "$DIR/slurmctld.pid" slurmctld
    if [ "$NODES" -gt 1 ]; then
        for k in $(seq "$NODES"); do
            ns=$(ns_name "$k")
            if [ -e "/run/netns/$ns" ]; then
                # job steps and ranks still running on that node (started by its slurmd)
                pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
                if [ -n "${pids// /}" ]; then
                    # shellcheck disable=SC2086
                    kill -9 $pids 2>/dev/null || true
                    echo "local_cluster: killed what was left on node$k: $pids"
                fi
                ip netns del "$ns"
            fi
            ip link del "${BRIDGE}v$k" 2>/dev/null || true
            rm -rf "/etc/netns/$ns"
        done
        if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
        echo "local_cluster: removed bridge $BRIDGE, $NODES namespace(s) and their /etc/netns entries"
    fi
    rm -f "$STATE"
    # munged is left running: other SLURM or munge users on the machine may need it
}

case "${1:-}" in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    crash-node) cmd_crash_node "${2:-}" ;;
    revive-node) cmd_revive_node "${2:-}" ;;
    *) echo "usage: $0 install | start [--nodes N] | stop | status | crash-node K | revive-node K   (state in \$SAPT_SLURM_DIR, default /tmp/sapt-slurm)" >&2; exit 2 ;;
esac
