#!/usr/bin/env bash
# Submits a peftbench grid as a Slurm job array of SHARDS tasks, plus a report job that runs
# once every task has ended (afterany: a failed task still gets a report of what was recorded).
# Prints the two job ids as `array_job=ID` and `report_job=ID`.
#
# Usage: submit.sh SHARDS
# Environment (all exported to the jobs with --export=ALL):
#   SUITE          suite file (relative paths are made absolute), or
#   SUITE_NAME     a committed suite name; exactly one of the two
#   RESULTS        shared results folder (default: ./results, made absolute)
#   PEFTBENCH_BIN  the binary (default: peftbench on PATH; a relative path is made absolute)
#   CPUS_PER_TASK  cores per array task (default: the script's #SBATCH value, 1)
#   MAX_PARALLEL   at most this many tasks at once (the array's %N throttle; default: no limit)
#   LOG_DIR        where slurm-*.out files go (default: the current folder)
# Anything else sbatch reads from SBATCH_* (SBATCH_PARTITION, SBATCH_TIMELIMIT, ...) applies.
set -euo pipefail

usage() { echo "usage: SUITE=suite.toml|SUITE_NAME=name RESULTS=dir $0 SHARDS" >&2; exit 2; }
[ $# -eq 1 ] || usage
shards=$1
case "$shards" in ''|*[!0-9]*|0) usage ;; esac

here=$(cd "$(dirname "$0")" && pwd)

if [ -n "${SUITE:-}" ] && [ -n "${SUITE_NAME:-}" ]; then
  echo "submit.sh: set SUITE or SUITE_NAME, not both" >&2; exit 2
elif [ -n "${SUITE:-}" ]; then
  [ -f "$SUITE" ] || { echo "submit.sh: no suite file $SUITE" >&2; exit 2; }
  # Jobs may start in another folder (--chdir, a different node's cwd): pass absolute paths.
  SUITE=$(cd "$(dirname "$SUITE")" && pwd)/$(basename "$SUITE")
  export SUITE
elif [ -z "${SUITE_NAME:-}" ]; then
  usage
fi

RESULTS=${RESULTS:-results}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
export RESULTS

PEFTBENCH_BIN=${PEFTBENCH_BIN:-peftbench}
case "$PEFTBENCH_BIN" in
  */*) PEFTBENCH_BIN=$(cd "$(dirname "$PEFTBENCH_BIN")" && pwd)/$(basename "$PEFTBENCH_BIN") ;;
esac
export PEFTBENCH_BIN

log_dir=${LOG_DIR:-.}
mkdir -p "$log_dir"
log_dir=$(cd "$log_dir" && pwd)

array_args=(--array="0-$((shards - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}")
[ -z "${CPUS_PER_TASK:-}" ] || array_args+=(--cpus-per-task="$CPUS_PER_TASK")

# --parsable prints `id` or `id;cluster`; keep the id.
array_job=$(sbatch --parsable --export=ALL "${array_args[@]}" \
  --output="$log_dir/slurm-%A_%a.out" "$here/peftbench-array.sbatch")
array_job=${array_job%%;*}
# Printed now, so a failed report submission still leaves the array's id on screen.
echo "array_job=$array_job"

report_job=$(sbatch --parsable --export=ALL --dependency="afterany:$array_job" \
  --output="$log_dir/slurm-%j-report.out" "$here/peftbench-report.sbatch")
report_job=${report_job%%;*}
echo "report_job=$report_job"
