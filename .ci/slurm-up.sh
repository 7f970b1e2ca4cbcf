#!/usr/bin/env bash
# Bring up a real one-node SLURM (Debian's slurm-wlm + munge) on this machine, as root, without
# systemd: install, munge key, slurm.conf for this host, daemons, wait until the node is idle.
# CI runs it every time (nothing survives between machines); a developer may run it once.
# Re-running restarts the daemons with a clean job state.  `slurm-up.sh down` stops them.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm-up.sh: needs root (installs packages, starts daemons)" >&2; exit 1; }

stop_daemons() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.2; done
}
if [ "${1:-}" = down ]; then stop_daemons; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # The packages' maintainer scripts try to start services; there is no init system to do it.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

host=$(hostname -s)
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts

# munge
install -d -m 0700 -o munge -g munge /etc/munge /var/log/munge
install -d -m 0711 -o munge -g munge /var/lib/munge
install -d -m 0755 -o munge -g munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
fi
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null

# slurm.conf from what slurmd sees of this machine
stop_daemons
cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
install -d -o slurm -g slurm /var/log/slurm /var/spool/slurmctld /run/slurm
install -d /var/spool/slurmd /etc/slurm
# A clean slate: no jobs left from an earlier bring-up.
rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
# Job ids start again at 1, and the sacct wrapper below reads finished jobs from the jobcomp log:
# an earlier bring-up's "job 5 COMPLETED" there would be read as this one's job 5 while it still runs
# (submitit then gives up on a running job: seen in CI). Keep the old log aside, start a new one.
[ -s /var/log/slurm/jobcomp.log ] && mv /var/log/slurm/jobcomp.log "/var/log/slurm/jobcomp.log.$(date +%s)"
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=retina-dist-ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
SchedulerParameters=sched_interval=5
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MinJobAge=300
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF

# Without slurmdbd, sacct only reads the jobcomp log through --completion; submitit needs a
# working sacct to learn a job's state, so put a wrapper first on PATH.
if [ ! -e /usr/local/bin/sacct ]; then
    printf '#!/bin/sh\n# retina-dist .ci/slurm-up.sh: no slurmdbd here, read the jobcomp log\nexec /usr/bin/sacct --completion "$@"\n' \
        > /usr/local/bin/sacct
    chmod +x /usr/local/bin/sacct
fi

started=$(date +%s)
/usr/sbin/slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
/usr/sbin/slurmd

logs() { tail -n 30 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true; }
for _ in $(seq 150); do
    if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null \
        && [ "$(sinfo -h -N -o %T 2>/dev/null | head -1)" = idle ]; then
        # A dead slurmd still shows idle for a while: the node must have registered after our start.
        boot=$(scontrol show node "$host" | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
        if [ -n "$boot" ] && [ "$(date -d "$boot" +%s)" -ge "$((started - 1))" ]; then
            echo "slurm-up.sh: node $host idle ($cpus CPUs, ${mem} MB) after $(( $(date +%s) - started )) s"
            exit 0
        fi
    fi
    sleep 0.2
done
echo "slurm-up.sh: node did not become idle in 30 s" >&2
logs
exit 1
