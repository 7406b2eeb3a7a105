#!/bin/bash
# A one-node Slurm on this Debian machine, for testing mp.method=slurm.
#
#   sudo bash scripts/slurm_one_node.sh up       # install if needed, start; ~10 s
#   sudo bash scripts/slurm_one_node.sh status
#   sudo bash scripts/slurm_one_node.sh down     # stop what `up` started (by pid)
#
# Debian 12 packages munge, slurmctld, slurmd, slurm-client (installed with
# apt-get when missing).  No systemd: /run/munge is made and munged started as
# the munge user (unless a munged already answers, which is then used and left
# alone), then slurmctld and slurmd as root, with ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none and JobCompType=jobcomp/filetxt (a record of every job
# that ends, without a database: `slurm_one_node.sh jobcomp` prints its path).
#
# Everything lives under $SLURM_ONE_NODE_DIR (default /var/tmp/dials-gapfill-slurm):
# the configuration, state, logs, the job record and the pids of what `up`
# started.  /etc/slurm/slurm.conf (where Slurm's client commands look) is
# written only if there is none, and removed by `down` only if `up` wrote it.
# `down` cancels the jobs of this Slurm, then stops only the daemons whose
# pids `up` recorded.
set -euo pipefail

DIR=${SLURM_ONE_NODE_DIR:-/var/tmp/dials-gapfill-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by dials-gapfill scripts/slurm_one_node.sh"
PARTITION=${SLURM_ONE_NODE_PARTITION:-debug}

die() { echo "slurm_one_node.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it starts munged, slurmctld and slurmd)"; }

install_packages() {
    local missing=()
    for p in munge slurmctld slurmd slurm-client; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi
    # the packages' own services are not wanted (no systemd here anyway)
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

pid_of() { [ -f "$DIR/$1.pid" ] && cat "$DIR/$1.pid" || true; }

munge_answers() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

write_conf() {
    local node cpus mem
    node=$(hostname -s)
    # the node's real CPUs and memory, as slurmd sees them
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    mkdir -p "$DIR/ctld" "$DIR/d"
    cat > "$DIR/slurm.conf" <<EOF
$MARK
ClusterName=gapfill
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPort=6817
SlurmdPort=6818
InactiveLimit=0
KillWait=5
MinJobAge=30
Waittime=0
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and is not ours: not touching a Slurm that is already configured"
    fi
    mkdir -p /etc/slurm
    cp "$DIR/slurm.conf" "$CONF"
}

up() {
    need_root
    install_packages
    mkdir -p "$DIR"
    if alive "$(pid_of slurmctld)" && alive "$(pid_of slurmd)"; then
        echo "already up (slurmctld $(pid_of slurmctld), slurmd $(pid_of slurmd))"
        return 0
    fi
    # a Slurm this script did not start (e.g. left by another checkout) holds
    # the ports: say so instead of starting daemons that cannot bind
    if command -v ss >/dev/null 2>&1 && ss -ltn 2>/dev/null | grep -qE ':(6817|6818)[[:space:]]'; then
        die "another Slurm listens on port 6817 or 6818 (not started from $DIR): stop it first"
    fi
    write_conf
    # munge: use one that answers, else start our own
    if munge_answers; then
        echo "munged already running: using it"
    else
        [ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
        chown munge:munge /etc/munge/munge.key
        install -d -o munge -g munge -m 0755 /run/munge
        install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
        runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
        for _ in $(seq 50); do munge_answers && break; sleep 0.2; done
        munge_answers || die "munged did not start (see /var/log/munge/munged.log)"
        cp /run/munge/munged.pid "$DIR/munged.pid"
    fi
    /usr/sbin/slurmctld -f "$CONF"
    for _ in $(seq 50); do [ -s "$DIR/slurmctld.daemon.pid" ] && break; sleep 0.2; done
    cp "$DIR/slurmctld.daemon.pid" "$DIR/slurmctld.pid"
    /usr/sbin/slurmd -f "$CONF"
    for _ in $(seq 50); do [ -s "$DIR/slurmd.daemon.pid" ] && break; sleep 0.2; done
    cp "$DIR/slurmd.daemon.pid" "$DIR/slurmd.pid"
    # wait until the node takes jobs
    for _ in $(seq 150); do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
        case "$state" in idle|mix|alloc) break ;; esac
        sleep 0.4
    done
    case "${state:-}" in
        idle|mix|alloc) ;;
        *) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
           sleep 1; state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true) ;;
    esac
    case "${state:-}" in
        idle|mix|alloc) echo "up: partition $PARTITION, node $(hostname -s) $state; job record $DIR/jobcomp.log" ;;
        *) die "the node is not ready (state '${state:-none}'): see $DIR/slurmctld.log and $DIR/slurmd.log" ;;
    esac
}

stop_pid() {  # stop_pid name: TERM the recorded pid, wait, then KILL
    local pid
    pid=$(pid_of "$1")
    if alive "$pid"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
        alive "$pid" && kill -9 "$pid" 2>/dev/null || true
        echo "stopped $1 ($pid)"
    fi
    rm -f "$DIR/$1.pid"
}

down() {
    need_root
    if alive "$(pid_of slurmctld)"; then
        # the jobs of this Slurm (all of them: it is ours), then wait for them
        scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF"; fi
    echo "down"
}

status() {
    for n in munged slurmctld slurmd; do
        pid=$(pid_of $n)
        if alive "$pid"; then echo "$n: running ($pid)"; else echo "$n: not started here"; fi
    done
    sinfo 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    jobcomp) echo "$DIR/jobcomp.log" ;;
    *) echo "usage: $0 up|down|status|jobcomp" >&2; exit 2 ;;
esac
