#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (Debian's slurm-wlm and munge),
# for testing the Slurm profile against a real scheduler, not a mock.
# The node offers 16 CPUs whatever the machine has (config_overrides: the
# profile's cpus_per_gpu then schedule as they would on a GPU node), 80% of its
# memory and two GPUs (gres backed by /dev/null and /dev/zero, so jobs that ask for
# --gpus=1 schedule, two at once), in the two partitions that profiles/slurm
# names: gpu (the default) and cpu.
# Usage (as root): bash tests/slurm/start_local_cluster.sh [--install]
set -euo pipefail

if [[ "${1:-}" == "--install" ]] && ! command -v slurmctld >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

if ! pgrep -x munged >/dev/null; then
  [[ -s /etc/munge/munge.key ]] || (dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null && chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key)
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
fi

memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
# Without slurmdbd there is no sacct: keep finished jobs visible to squeue.
MinJobAge=86400
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localnode NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=16 RealMemory=$memory Gres=gpu:2 State=UNKNOWN
PartitionName=gpu Nodes=localnode Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=localnode MaxTime=INFINITE State=UP
CONF
printf "Name=gpu File=/dev/null AutoDetect=off\nName=gpu File=/dev/zero AutoDetect=off\n" > /etc/slurm/gres.conf

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd -N localnode
for _ in $(seq 30); do
  # A node drained under an earlier configuration (e.g. fewer GPUs) stays drained across restarts.
  sinfo -h -o "%T" 2>/dev/null | grep -q "^drain" && scontrol update nodename=localnode state=resume
  if sinfo -h -o "%T" 2>/dev/null | grep -qE "^idle|^mix|^alloc"; then
    sinfo
    exit 0
  fi
  sleep 1
done
echo "Slurm did not come up; logs in /var/log/slurm" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
