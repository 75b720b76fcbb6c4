#!/usr/bin/env bash
# End-to-end test of the Slurm templates on one real Slurm: starts a private one-node cluster
# (slurmctld + slurmd + munged) on this machine, submits SUITE's grid with submit.sh as a
# 3-task array plus its report job, waits, and checks every run was recorded exactly once
# and REPORT.md was written. Needs root (it may apt-get install slurm-wlm and munge).
#
# Usage: test-slurm.sh SUITE.toml [RESULTS_DIR]
#   RESULTS_DIR    default: a fresh temp folder (must not already hold this suite's records,
#                  or the "exactly once" checks mean nothing)
# Environment:
#   PEFTBENCH_BIN  the binary (default: peftbench on PATH)
#   SHARDS         array size (default 3)
#   CPUS_PER_TASK  cores per task (default 1, so 2-core machines still run tasks in parallel)
#   EXPECTED_RUNS  the grid's size; default: N from `peftbench plan`'s "grid: N runs, ..." line
#   WAIT_SECS      give up waiting for the jobs after this long (default 1200)
#   KEEP_SLURM=1   leave the daemons running on exit (they are stopped otherwise)
#   SLURM_TEST_DIR where config, state, logs and job output go (default: a fresh temp folder)
set -euo pipefail

usage() { echo "usage: $0 SUITE.toml [RESULTS_DIR]" >&2; exit 2; }
{ [ $# -ge 1 ] && [ $# -le 2 ]; } || usage
[ -f "$1" ] || { echo "test-slurm: no suite file $1" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
suite_file=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
shards=${SHARDS:-3}
wait_secs=${WAIT_SECS:-1200}
started_at=$(date +%s)

work=${SLURM_TEST_DIR:-$(mktemp -d /tmp/peftbench-slurm.XXXXXX)}
mkdir -p "$work"/{etc,state,spool,log,out}
work=$(cd "$work" && pwd)
results=${2:-$work/results}
mkdir -p "$results"
results=$(cd "$results" && pwd)

bin=${PEFTBENCH_BIN:-peftbench}
bin_path=$(command -v "$bin") || { echo "test-slurm: PEFTBENCH_BIN $bin not found" >&2; exit 2; }
case "$bin_path" in /*) ;; *) bin_path=$(pwd)/$bin_path ;; esac
export PEFTBENCH_BIN=$bin_path

say() { echo "test-slurm: $*"; }
die() { echo "test-slurm: FAIL: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (to install Slurm and run its daemons)"

# The suite's records live under its `name`, not its file name.
suite_name=$(sed -n -e '/^[[:space:]]*\[/q' \
  -e 's/^[[:space:]]*name[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' \
  -e "s/^[[:space:]]*name[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" "$suite_file")
[ -n "$suite_name" ] || die "no top-level name = \"...\" in $suite_file"
runs_dir=$results/$suite_name/runs
if [ -d "$runs_dir" ] && [ -n "$(ls -A "$runs_dir" 2>/dev/null)" ]; then
  die "$runs_dir already holds files; give a fresh RESULTS_DIR"
fi

# ---- install ------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null 2>&1; then
  say "installing slurm-wlm and munge"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
fi
for c in slurmctld slurmd sbatch squeue sinfo scontrol munged munge unmunge; do
  command -v "$c" >/dev/null 2>&1 || die "$c missing after install"
done

# ---- daemons ------------------------------------------------------------------------------
started_munged=0
cleanup() {
  rc=$?
  if [ "${KEEP_SLURM:-0}" = 1 ]; then
    say "KEEP_SLURM=1: daemons left running; export SLURM_CONF=$work/etc/slurm.conf"
    exit "$rc"
  fi
  # Stop only what this script started, by the pids it recorded.
  for pidfile in "$work/slurmd.pid" "$work/slurmctld.pid"; do
    if [ -s "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  if [ "$started_munged" = 1 ] && [ -s /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

node=$(hostname -s)
# slurmctld and slurmd find each other by this name.
if ! getent hosts "$node" >/dev/null; then
  say "adding $node to /etc/hosts"
  echo "127.0.0.1 $node" >> /etc/hosts
fi

# munged refuses keys readable by others or owned by a different user than it runs as.
munge_user=root
id munge >/dev/null 2>&1 && munge_user=munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "using the munged already running"
else
  key=/etc/munge/munge.key
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s "$key" ]; then
    say "creating $key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile="$key"
    else dd if=/dev/urandom of="$key" bs=1 count=1024 status=none; fi
  fi
  chown "$munge_user:" "$key" /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0400 "$key"
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  # Debian's package creates the munge user; running as root (with --force, which lets munged
  # start past its non-fatal safety checks) is only a fallback.
  if [ "$munge_user" = root ]; then /usr/sbin/munged --force
  else runuser -u "$munge_user" -- /usr/sbin/munged; fi
  started_munged=1
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# `slurmd -C` prints this machine's NodeName line (CPUs, sockets, cores, RealMemory).
node_line=$(slurmd -C | grep '^NodeName=')
[ -n "$node_line" ] || die "slurmd -C printed no NodeName line"
export SLURM_CONF=$work/etc/slurm.conf
# A private config (SLURM_CONF, honoured by daemons and clients alike) leaves /etc/slurm alone.
# No cgroup plugins (containers rarely allow them), no accounting; MinJobAge keeps finished
# jobs visible to scontrol so their exit codes can be checked.
cat > "$SLURM_CONF" <<CONF
ClusterName=peftbench-test
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
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=3600
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$node_line State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
say "slurm.conf at $SLURM_CONF: $node_line"

show_logs() {
  for f in "$work"/log/*.log; do echo "--- $f"; tail -n 30 "$f"; done >&2
}

slurmctld || { show_logs; die "slurmctld did not start"; }
slurmd || { show_logs; die "slurmd did not start"; }

# Wait for the node to come up idle; one still "down" or "drained" after a few seconds (say,
# from a stale registration) is resumed.
state=
for i in $(seq 60); do
  state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle*) break ;;
    down*|drain*) [ "$i" -lt 5 ] || scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
[ "${state%%[*~#]}" = idle ] || { show_logs; die "node $node is '${state:-unknown}', not idle"; }
say "node $node idle"

# ---- expected grid size ------------------------------------------------------------------
expected=${EXPECTED_RUNS:-}
if [ -z "$expected" ]; then
  # Taken before any run, so it counts the whole grid. plan's totals line reads
  # "grid: N runs, ..."; failing that, the first "N runs" anywhere is taken.
  plan_out=$("$PEFTBENCH_BIN" plan --config "$suite_file" --results "$results" 2>&1) ||
    die "peftbench plan failed: $plan_out"
  expected=$({ printf '%s\n' "$plan_out" | grep -oE '^grid: [0-9][0-9,]* runs?\b' ||
    printf '%s\n' "$plan_out" | grep -oE '[0-9][0-9,]* runs?\b' || true; } |
    head -n 1 | grep -oE '[0-9][0-9,]*' | tr -d , || true)
  [ -n "$expected" ] ||
    die "no 'N runs' in peftbench plan output (set EXPECTED_RUNS): $plan_out"
fi
say "expecting $expected runs of suite $suite_name in $shards shards"

# ---- submit and wait ---------------------------------------------------------------------
t_submit=$(date +%s)
ids=$(cd "$work/out" && SUITE=$suite_file SUITE_NAME='' RESULTS=$results LOG_DIR=$work/out \
  CPUS_PER_TASK=${CPUS_PER_TASK:-1} "$here/submit.sh" "$shards")
echo "$ids"
array_job=$(printf '%s\n' "$ids" | sed -n 's/^array_job=//p')
report_job=$(printf '%s\n' "$ids" | sed -n 's/^report_job=//p')
{ [ -n "$array_job" ] && [ -n "$report_job" ]; } || die "submit.sh printed no job ids"

deadline=$(( $(date +%s) + wait_secs ))
while :; do
  # Finished jobs drop out of squeue's default (active) states.
  left=$(squeue -h -o %i 2>/dev/null | grep -cE "^($array_job|$report_job)(_|\$)" || true)
  [ "$left" -gt 0 ] || break
  [ "$(date +%s)" -lt "$deadline" ] || {
    squeue; show_logs; die "jobs still queued after ${wait_secs}s"; }
  sleep 2
done
t_done=$(date +%s)
say "all jobs finished in $(( t_done - t_submit ))s"

# ---- job output --------------------------------------------------------------------------
for f in "$work"/out/slurm-*.out; do
  [ -e "$f" ] || continue
  echo "----- tail $f"
  tail -n 20 "$f"
done

# ---- checks ------------------------------------------------------------------------------
failures=()
fail() { failures+=("$*"); echo "test-slurm: check failed: $*" >&2; }

# Every task and the report job ended COMPLETED with exit 0.
jobs_out=$(scontrol -o show job "$array_job"; scontrol -o show job "$report_job")
n_tasks=0
while read -r line; do
  [ -n "$line" ] || continue
  jid=$(printf '%s\n' "$line" | grep -oE '\bJobId=[0-9]+' | cut -d= -f2 || true)
  task=$(printf '%s\n' "$line" | grep -oE '\bArrayTaskId=[^ ]+' | cut -d= -f2 || true)
  # Array tasks get their own JobIds; name them the way Slurm's output files do.
  [ -z "$task" ] || jid=${array_job}_$task
  st=$(printf '%s\n' "$line" | grep -oE '\bJobState=[A-Z_]+' | cut -d= -f2 || true)
  ec=$(printf '%s\n' "$line" | grep -oE '\bExitCode=[0-9:]+' | cut -d= -f2 || true)
  say "job $jid: $st exit $ec"
  [ -z "$task" ] || n_tasks=$((n_tasks + 1))
  { [ "$st" = COMPLETED ] && [ "$ec" = 0:0 ]; } || fail "job $jid ended $st $ec"
done <<<"$jobs_out"
[ "$n_tasks" -eq "$shards" ] || fail "$n_tasks array tasks seen, expected $shards"

# Records: one per run, each named after the run_id inside it, nothing half-written or
# still claimed.
records=0
declare -A seen=()
if [ -d "$runs_dir" ]; then
  for f in "$runs_dir"/*.json; do
    [ -e "$f" ] || continue
    records=$((records + 1))
    id=$(sed -n 's/^[[:space:]]*"run_id":[[:space:]]*"\([^"]*\)".*/\1/p' "$f" | head -n 1)
    [ "$id" = "$(basename "$f" .json)" ] || fail "$f holds run_id '${id}'"
    [ -z "${seen[$id]:-}" ] || fail "run_id $id recorded twice"
    seen[$id]=1
  done
else
  fail "no runs folder $runs_dir"
fi
[ "$records" -eq "$expected" ] || fail "$records records, plan has $expected runs"
leftover=$(find "$results/$suite_name" \( -name '*.claim' -o -name '*.tmp' \) 2>/dev/null)
[ -z "$leftover" ] || fail "leftover claim/temp files: $leftover"

# Each run started once across all tasks (the grid's "[i/n] run_id" progress lines).
dups=$(cat "$work"/out/slurm-*_*.out 2>/dev/null |
  sed -n 's/^.*\[[0-9]*\/[0-9?]*\] \([^ ]*\) (ETA.*/\1/p' | sort | uniq -d)
[ -z "$dups" ] || fail "runs started more than once: $dups"

report=$results/$suite_name/report/REPORT.md
[ -s "$report" ] || fail "no $report"

elapsed=$(( $(date +%s) - started_at ))
if [ ${#failures[@]} -eq 0 ]; then
  echo "test-slurm: PASS: suite $suite_name, $records/$expected runs recorded once by" \
    "$shards array tasks (job $array_job), report job $report_job wrote $report; ${elapsed}s"
else
  show_logs
  echo "test-slurm: FAIL: ${#failures[@]} check(s) failed (suite $suite_name, $records/$expected" \
    "records, results $results, logs $work); ${elapsed}s" >&2
  exit 1
fi
