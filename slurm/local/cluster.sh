#!/bin/bash
# A real one-node SLURM cluster on 127.0.0.1, for tests that submit slurm/*.sbatch for real.
#
#   slurm/local/cluster.sh install       # apt-get install slurm-wlm munge (skipped if present)
#   slurm/local/cluster.sh start DIR     # munged + slurmctld + slurmd, all state under DIR
#   eval "$(slurm/local/cluster.sh env DIR)"   # or: source DIR/env.sh (SLURM_CONF=DIR/slurm.conf)
#   sbatch --wrap 'srun -n2 hostname'
#   slurm/local/cluster.sh stop DIR      # stops the daemons started for DIR
#
# No systemd, no cgroups: proctrack/linuxproc and task/none; the daemons run as root (this is
# meant for containers and CI machines, not for anything shared). `start` prints the line
# `export SLURM_CONF=DIR/slurm.conf` on stdout (everything else goes to stderr), so
# `eval "$(slurm/local/cluster.sh start DIR)"` starts the cluster and points the SLURM commands
# at it in one go.
#
# Requeue delay: a requeued job (`scontrol requeue ID`) keeps its id, gets SLURM_RESTART_COUNT
# + 1, and waits pending (Reason=BeginTime) until now + the job credential lifetime + 1 s
# (AuthInfo cred_expire; SLURM's default is 120 s, its minimum 5 s), so that the old run's
# credentials have expired. This configuration sets cred_expire=CRED_EXPIRE (default 10), so a
# requeued job runs again about 12 s after the requeue. Faster still, from outside the job:
# `scontrol update JobId=ID StartTime=now` on the pending requeued job clears the begin time
# and it starts within a second (inside the batch script it comes too late: the requeue kills
# the script right away). `scontrol release ID` does not clear a begin time.
#
# Time limits and --signal: slurmctld checks them every 30 s, so a job runs up to 30 s past
# its --time, and --signal=SIG@N arrives between N and N + 30 s before the nominal end
# (SLURM's documentation says up to 60 s early); with --time=1 it came 33-34 s before the end
# (N = 10 and 30) and 60 s before the SIGTERM. Without "B:" it goes to the tasks of the job
# steps only, not to the batch shell. At the limit, and on scancel, every task of every step
# and the batch shell get SIGCONT + SIGTERM (tasks under srun may get SIGTERM twice: srun
# forwards its own), then SIGKILL KILL_WAIT s later. For a preemption without waiting for a
# time limit, `scancel --signal=USR1 ID` sends SIGUSR1 to the steps' tasks at once (not to the
# batch shell).
#
# Environment: SLURM_LOCAL_CPUS (default: the CPUs this process may use), SLURM_LOCAL_MEMORY_MB
# (default 1024), KILL_WAIT (SIGTERM -> SIGKILL delay, default 10 s), CRED_EXPIRE (default 10 s, minimum 5),
# START_TIMEOUT (seconds to wait for the node to be idle, default 60), FIRST_JOB_ID (default 1:
# train.sbatch derives its rendezvous port from the job id, 20000 + id % 20000).
set -euo pipefail

PROG=${0##*/}

log() { echo "$PROG: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

have_all() {
    local cmd
    for cmd in slurmctld slurmd munged sbatch; do
        command -v "$cmd" >/dev/null 2>&1 || return 1
    done
}

slurm_version() {
    dpkg-query -W -f '${Package} ${Version}' slurm-wlm 2>/dev/null || echo "slurm"
}

cmd_install() {
    local t0=$SECONDS
    # Debian puts the daemons in /usr/sbin, which a non-login root shell may lack.
    export PATH="$PATH:/usr/sbin:/sbin"
    if have_all; then
        log "slurm-wlm and munge already installed ($(slurm_version))"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "install needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurm-wlm munge)
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2; then
        log "apt-get install failed; running apt-get update and trying again"
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
    fi
    have_all || die "installed, but slurmctld/slurmd/munged/sbatch are still not on PATH"
    log "installed $(slurm_version) and munge in $((SECONDS - t0)) s"
}

# A TCP port nobody listens on, in 61000-64999: above Linux's ephemeral range (32768-60999, so
# no outgoing connection holds it) and outside 20000-39999, where train.sbatch and
# vlds.distributed put the rendezvous port (20000 + job id % 20000).
free_port() {
    local avoid=${1:-0} port i
    port=$((61000 + RANDOM % 4000))
    for ((i = 0; i < 4000; i++)); do
        if [ "$port" -ne "$avoid" ] && [ -z "$(ss -Hltn "sport = :$port")" ]; then
            echo "$port"
            return 0
        fi
        port=$((port + 1))
        [ "$port" -lt 65000 ] || port=61000
    done
    die "no free TCP port in 61000-64999"
}

abs_dir() {
    [ -n "${1:-}" ] || die "usage: $PROG {start|stop|env|status} DIR"
    mkdir -p "$1"
    (cd "$1" && pwd -P)
}

# Tails of the daemons' logs, for error messages.
show_logs() {
    local dir=$1 f
    for f in "$dir"/log/*.log; do
        [ -f "$f" ] || continue
        echo "---- tail $f" >&2
        tail -n 25 "$f" >&2
    done
}

# Whether PID runs (a zombie does not count: the container's PID 1 may be slow to reap).
alive() {
    local state
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

pid_alive() {
    [ -s "$1" ] && alive "$(<"$1")"
}

write_conf() {
    local dir=$1 host=$2 cpus=$3 mem=$4 ctld_port=$5 slurmd_port=$6
    cat >"$dir/slurm.conf" <<EOF
# Generated by $PROG start $dir
ClusterName=vldslocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# socket: our munged; cred_expire: also the delay before a requeued job may start again.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=${CRED_EXPIRE:-10}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Containers: no cgroups, no systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Quick turnaround: short SIGTERM -> SIGKILL delay, finished jobs forgotten soon, requeue on.
KillWait=${KILL_WAIT:-10}
MinJobAge=5
FirstJobId=${FIRST_JOB_ID:-1}
JobRequeue=1
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
OverTimeLimit=0
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env.sh"
}

cmd_start() {
    local dir host cpus mem ctld_port slurmd_port t0=$SECONDS i
    export PATH="$PATH:/usr/sbin:/sbin"
    have_all || die "SLURM or munge missing: run '$PROG install' first"
    [ "$(id -u)" -eq 0 ] || die "start runs the daemons as root"
    dir=$(abs_dir "${1:-}")
    if pid_alive "$dir/run/slurmctld.pid" || pid_alive "$dir/run/slurmd.pid"; then
        die "a cluster is already running for $dir (stop it first)"
    fi
    host=$(hostname -s)
    mkdir -p "$dir"/{munge,state,run,log} "$dir/spool/slurmd-$host"
    # munged refuses group/world-writable directories on the socket's path, and clients need
    # to reach the socket; the key itself is 0400.
    chmod 0755 "$dir" "$dir/munge"

    # GNU nproc answers OMP_NUM_THREADS when it is set (a shell with OMP_NUM_THREADS=1 would
    # get a 1-CPU node on which no 2-task job ever starts): count the CPUs without it.
    cpus=${SLURM_LOCAL_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
    mem=${SLURM_LOCAL_MEMORY_MB:-1024}
    ctld_port=$(free_port)
    slurmd_port=$(free_port "$ctld_port")
    write_conf "$dir" "$host" "$cpus" "$mem" "$ctld_port" "$slurmd_port"
    export SLURM_CONF=$dir/slurm.conf

    # munge: a fresh key, our own socket, run as root.
    if [ ! -s "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$dir/munge/munge.key"
    munged --force \
        --key-file="$dir/munge/munge.key" \
        --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/run/munged.pid" \
        --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" ||
        {
            show_logs "$dir"
            die "munged did not start"
        }
    for ((i = 0; i < 50; i++)); do
        [ -S "$dir/munge/munge.socket" ] && break
        sleep 0.1
    done
    if ! munge -n --socket="$dir/munge/munge.socket" |
        unmunge --socket="$dir/munge/munge.socket" >/dev/null; then
        show_logs "$dir"
        die "munge does not work (socket $dir/munge/munge.socket)"
    fi

    # slurmctld and slurmd daemonize themselves and write their pid files. -c: fresh state.
    slurmctld -c -f "$SLURM_CONF" || {
        show_logs "$dir"
        die "slurmctld did not start"
    }
    slurmd -f "$SLURM_CONF" -N "$host" || {
        show_logs "$dir"
        die "slurmd did not start"
    }

    local timeout=${START_TIMEOUT:-60} state=""
    for ((i = 0; i < timeout * 2; i++)); do
        state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        show_logs "$dir"
        sinfo -N -l >&2 || true
        die "node $host not idle after ${timeout} s (state: '${state:-no answer}'); logs above"
    fi
    log "cluster up in $((SECONDS - t0)) s: node $host ($cpus CPUs), slurmctld port $ctld_port," \
        "slurmd port $slurmd_port, state in $dir"
    echo "export SLURM_CONF=$dir/slurm.conf"
}

# Stops the named daemons of DIR (pid files DIR/run/NAME.pid) together: SIGTERM, then SIGKILL
# for any still running 10 s later.
stop_daemons() {
    local dir=$1 name pid i
    shift
    local -A pids=()
    for name in "$@"; do
        if pid_alive "$dir/run/$name.pid"; then
            pids[$name]=$(<"$dir/run/$name.pid")
            kill -TERM "${pids[$name]}" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 100; i++)); do
        for name in "${!pids[@]}"; do
            alive "${pids[$name]}" || unset "pids[$name]"
        done
        [ "${#pids[@]}" -eq 0 ] && break
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        log "$name (${pids[$name]}) still running after 10 s: SIGKILL"
        kill -KILL "${pids[$name]}" 2>/dev/null || true
    done
    for name in "$@"; do
        rm -f "$dir/run/$name.pid"
    done
}

# SIGKILLs a process and all its descendants (the children first).
kill_tree() {
    local pid=$1 child
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        kill_tree "$child"
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    local dir i pid
    export PATH="$PATH:/usr/sbin:/sbin"
    dir=$(abs_dir "${1:-}")
    export SLURM_CONF=$dir/slurm.conf
    # Jobs first: scancel sends SIGTERM, and SIGKILL KillWait seconds later.
    if [ -f "$SLURM_CONF" ] && pid_alive "$dir/run/slurmctld.pid"; then
        scancel --user=root >/dev/null 2>&1 || true
        for ((i = 0; i < 2 * (${KILL_WAIT:-10} + 10); i++)); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    stop_daemons "$dir" slurmd slurmctld
    # Step daemons slurmd leaves behind (they log to this cluster's slurmd.log), with their
    # tasks.
    local fd
    for pid in $(pgrep -x slurmstepd || true); do
        for fd in "/proc/$pid/fd/"*; do
            if [[ "$(readlink "$fd" 2>/dev/null)" == "$dir/"* ]]; then
                log "slurmstepd $pid still running: killing it and its tasks"
                kill_tree "$pid"
                break
            fi
        done
    done
    stop_daemons "$dir" munged
    log "stopped the cluster of $dir"
}

cmd_env() {
    local dir
    dir=$(abs_dir "${1:-}")
    echo "export SLURM_CONF=$dir/slurm.conf"
}

cmd_status() {
    local dir d
    dir=$(abs_dir "${1:-}")
    for d in munged slurmctld slurmd; do
        if pid_alive "$dir/run/$d.pid"; then
            echo "$d: running (pid $(<"$dir/run/$d.pid"))"
        else
            echo "$d: not running"
        fi
    done
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start "${2:-}" ;;
stop) cmd_stop "${2:-}" ;;
env) cmd_env "${2:-}" ;;
status) cmd_status "${2:-}" ;;
*)
    echo "usage: $PROG install | start DIR | stop DIR | env DIR | status DIR" >&2
    exit 2
    ;;
esac
