#!/usr/bin/env bash
# Start a one-node Slurm cluster (munge + slurmctld + slurmd) on this machine, for tests.
#
#   apt-get update && apt-get install -y slurm-wlm munge     # once (CI: .ci/run does it)
#   bash tests/launchers/setup_slurm.sh [ETC_DIR]            # idempotent; default /tmp/scaletrain-slurm
#   export SLURM_CONF=/tmp/scaletrain-slurm/slurm.conf        # then sbatch/squeue/sinfo use it
#   bash tests/launchers/setup_slurm.sh --stop [ETC_DIR]      # stop the daemons it started
#
# Running it again with a healthy cluster changes nothing, so a test fixture and CI can both
# call it. Everything (config, state, logs, pid files) lives in ETC_DIR; the munge key is
# the system one (/etc/munge/munge.key), created if the package did not. Needs root.
set -euo pipefail

stop=0
if [[ "${1:-}" == "--stop" ]]; then stop=1; shift; fi
dir="${1:-/tmp/scaletrain-slurm}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

stop_daemons() {
  local pids=() daemon pid
  # Cancel this cluster's jobs first, so no slurmstepd is left waiting for a slurmd that is gone.
  if [[ -f "$conf" ]] && scontrol ping 2>/dev/null | grep -q "is UP"; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 100); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.1; done
  fi
  for daemon in slurmd slurmctld; do
    if [[ -f "$dir/$daemon.pid" ]]; then
      pid=$(cat "$dir/$daemon.pid")
      kill "$pid" 2>/dev/null && pids+=("$pid")
    fi
  done
  # Wait for them to exit, so a restart does not find the ports still taken; slurmd can wait on
  # a stuck slurmstepd, so after 30 s it is killed.
  for _ in $(seq 300); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

if [[ $stop == 1 ]]; then
  stop_daemons
  exit 0
fi

for bin in munged slurmctld slurmd sbatch scontrol; do
  command -v "$bin" >/dev/null || { echo "setup_slurm: $bin not found; apt-get install -y slurm-wlm munge" >&2; exit 3; }
done
[[ $(id -u) == 0 ]] || { echo "setup_slurm: needs root (daemons, /etc/munge)" >&2; exit 3; }

# --- munge: Slurm's daemons and clients authenticate every message with it.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
  else
    /usr/sbin/munged --force   # no munge user: run as root (munged refuses without --force)
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# --- slurm.conf: one node with this machine's cores and memory, one default partition.
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
wanted=$(cat <<EOF
ClusterName=scaletrain
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Short waits so tests (requeue, cancel) do not sit idle; keep finished jobs visible for 10 min.
KillWait=5
# A requeued job may start again only after the job credential expires (default 120 s).
AuthInfo=cred_expire=10
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)

# Same config and a healthy cluster? Then there is nothing to do.
if [[ -f "$conf" && "$(cat "$conf")" == "$wanted" ]] && scontrol ping 2>/dev/null | grep -q "is UP" \
   && sinfo -h -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
  echo "setup_slurm: cluster already up ($conf)"
  exit 0
fi
printf '%s\n' "$wanted" > "$conf"

# --- daemons: restart from a clean state so a stale node/job table cannot wedge the tests.
stop_daemons
slurmctld -c -f "$conf"
slurmd -f "$conf"
for _ in $(seq 100); do
  if sinfo -h -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
    echo "setup_slurm: cluster up ($conf, node $host, $cpus CPUs)"
    exit 0
  fi
  sleep 0.2
done
scontrol update nodename="$host" state=resume 2>/dev/null || true
sinfo -h -o "%T" | grep -qE "^(idle|mixed|allocated)" && { echo "setup_slurm: cluster up ($conf)"; exit 0; }
echo "setup_slurm: the node did not come up; see $dir/log/" >&2
sinfo >&2 || true
tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
exit 1
