#!/bin/bash
# A throw-away one-node Slurm cluster for the requeue test (Debian 12, slurm-wlm 22.05, root).
#   cluster.sh up DIR     start munged, slurmctld and slurmd with state and logs under DIR
#   cluster.sh down DIR   stop them and remove DIR
# After "up", point the clients at it with SLURM_CONF=DIR/slurm.conf.
# Installs slurmctld, slurmd, slurm-client and munge from Debian when they are missing (.ci/run
# installs them up front).
set -euo pipefail
cmd=${1:?usage: cluster.sh up|down DIR}
dir=${2:?usage: cluster.sh up|down DIR}
export SLURM_CONF="$dir/slurm.conf"

stop_pids() {  # stop the given pids, politely then firmly
  [ $# -gt 0 ] || return 0
  kill "$@" 2>/dev/null || true
  for _ in $(seq 50); do
    alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  kill -9 "$@" 2>/dev/null || true
}

case "$cmd" in
up)
  if ! command -v slurmctld >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  fi
  rm -rf "$dir"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  host=$(hostname -s)
  node=$(slurmd -C | head -n 1)
  cat >"$SLURM_CONF" <<CONF
ClusterName=ntrkci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey -c -f
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge
  chown munge:munge /run/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  slurmctld
  slurmd
  for _ in $(seq 60); do
    if [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; then exit 0; fi
    sleep 1
  done
  echo "the slurm node never became idle" >&2
  sinfo -N -l >&2 || true
  tail -n 20 "$dir"/log/*.log >&2 || true
  exit 1
  ;;
down)
  if [ -f "$SLURM_CONF" ]; then scancel --partition=ci 2>/dev/null && sleep 1 || true; fi
  # shellcheck disable=SC2046
  stop_pids $(cat "$dir/slurmd.pid" "$dir/slurmctld.pid" 2>/dev/null || true)
  rm -rf "$dir"
  ;;
*)
  echo "usage: cluster.sh up|down DIR" >&2
  exit 2
  ;;
esac
