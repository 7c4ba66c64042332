#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine, for kiln's Slurm tests (`make slurm-up` / `make slurm-down`).
#
#   slurm/local_cluster.sh up   [DIR]   install slurm-wlm if missing, write DIR/slurm.conf, start
#                                       slurmctld + slurmd, wait until the node is idle
#   slurm/local_cluster.sh down [DIR]   stop both daemons (the DIR stays, with their logs)
#
# DIR defaults to $KILN_SLURM_DIR or /tmp/kiln-slurm. Point the Slurm commands at the cluster with
# `export SLURM_CONF=DIR/slurm.conf`. `up` prints one line starting "skip:" and exits 3 when Slurm
# cannot be had here (not root, no apt); any other failure exits 1 with the daemon's log tail.
#
# auth/none and cred/none: no munge daemon, and anyone on this host may submit as anyone: for a
# test machine only. With KILN_SLURM_NODES=2 the node line becomes two nodes on this one host, each
# its own slurmd (that needs a slurmd built with multiple-slurmd support; `up` says if it is not).
set -uo pipefail

cmd=${1:-}
dir=${2:-${KILN_SLURM_DIR:-/tmp/kiln-slurm}}
nodes=${KILN_SLURM_NODES:-1}
conf=$dir/slurm.conf
export SLURM_CONF=$conf

die() { echo "local_cluster: $*" >&2; exit 1; }

stop() {
    for f in "$dir"/slurmd*.pid "$dir"/slurmctld.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        # only a daemon this script started: its pid file names it, and it is a slurm daemon
        if [ -n "$pid" ] && grep -qs slurm "/proc/$pid/comm"; then
            kill "$pid" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null
        fi
        rm -f "$f"
    done
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "skip: Slurm is not installed and cannot be installed here (needs root and apt-get: apt-get install slurm-wlm)"
        exit 3
    fi
    echo "local_cluster: installing slurm-wlm (about 20 s)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm >"$dir/apt.log" 2>&1 \
        || { (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm) \
                >>"$dir/apt.log" 2>&1 || { echo "skip: apt-get install slurm-wlm failed: $(tail -1 "$dir/apt.log")"; exit 3; }; }
    # Debian starts nothing without systemd; if it did, those daemons would use /etc/slurm, not ours
}

write_conf() {
    local host cpus=2 plugins
    host=$(hostname -s)
    plugins=$(dirname "$(find /usr/lib -name auth_none.so -path '*slurm*' 2>/dev/null | head -1)")
    mkdir -p "$dir/state" "$dir/spool"
    {
        echo "ClusterName=kiln-test"
        echo "SlurmctldHost=$host"
        echo "SlurmUser=root"
        echo "AuthType=auth/none"
        # how long a requeued job waits before it may start again (120 s by default)
        echo "AuthInfo=cred_expire=${KILN_SLURM_REQUEUE_DELAY:-5}"
        echo "CredType=cred/none"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SchedulerType=sched/backfill"
        echo "PluginDir=$plugins"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool/%n"
        echo "SlurmctldPidFile=$dir/slurmctld.pid"
        echo "SlurmdPidFile=$dir/slurmd-%n.pid"
        echo "SlurmctldLogFile=$dir/slurmctld.log"
        echo "SlurmdLogFile=$dir/slurmd-%n.log"
        echo "SlurmctldPort=${KILN_SLURM_PORT:-16817}"
        echo "ReturnToService=2"
        echo "MpiDefault=none"
        echo "MailProg=/bin/true"
        echo "JobCompType=jobcomp/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        # a requeued job may start again at once (the default holds it back for minutes), and the
        # daemons answer fast: the tests wait on them
        echo "SchedulerParameters=bf_interval=1,sched_min_interval=0"
        echo "MinJobAge=600"
        echo "KillWait=10"
        echo "InactiveLimit=0"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=30"
        if [ "$nodes" = 1 ]; then
            echo "NodeName=$host CPUs=$cpus State=UNKNOWN Port=${KILN_SLURMD_PORT:-16818}"
            echo "PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
        else
            for i in $(seq "$nodes"); do
                echo "NodeName=${host}$i NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN Port=$((${KILN_SLURMD_PORT:-16818} + i))"
            done
            echo "PartitionName=debug Nodes=${host}[1-$nodes] Default=YES MaxTime=INFINITE State=UP"
        fi
    } >"$conf"
}

up() {
    mkdir -p "$dir"
    stop  # a cluster an earlier `up` left running
    install
    write_conf
    rm -rf "$dir/state"/* 2>/dev/null
    slurmctld -f "$conf" -i || die "slurmctld did not start: $(tail -3 "$dir/slurmctld.log" 2>/dev/null)"
    local names
    if [ "$nodes" = 1 ]; then names=$(hostname -s); else names=$(for i in $(seq "$nodes"); do echo "$(hostname -s)$i"; done); fi
    for n in $names; do
        if [ "$nodes" = 1 ]; then slurmd -f "$conf"; else slurmd -f "$conf" -N "$n"; fi \
            || { stop; die "slurmd for $n did not start: $(tail -3 "$dir/slurmd-$n.log" 2>/dev/null)"; }
    done
    for _ in $(seq 150); do  # the node registers within a few seconds
        idle=$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle')
        [ "$idle" = "$nodes" ] && { echo "local_cluster: up, $nodes node(s) idle; export SLURM_CONF=$conf"; return 0; }
        sleep 0.2
    done
    sinfo -N >&2
    tail -5 "$dir"/slurmd*.log "$dir/slurmctld.log" >&2
    stop
    die "the node did not become idle within 30 s"
}

case "$cmd" in
    up) up ;;
    down) stop; echo "local_cluster: down" ;;
    *) echo "usage: $0 up|down [DIR]" >&2; exit 2 ;;
esac
