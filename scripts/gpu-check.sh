#!/usr/bin/env bash
# The prepared GPU check, in one go (under 8 minutes on an H100/H200):
#   1. the device-generic tests (tests/kernels.rs) with PEFTBENCH_TEST_DEVICE set: every method's
#      composite losses and gradients against the CPU's fused kernels, and bf16 training;
#   2. the step table for every method at the MiniLM shape (random weights), f32 and bf16,
#      beside PyTorch + PEFT on the same device when this Python has torch, transformers, peft;
#   3. the same for TinyLlama-1.1B's shape (random weights), bf16, batch 4 x 512;
#   4. the embedded default suite (needs no files), its scores beside the committed CPU report.
# Everything lands in one folder (at most 8 files, as the device tool returns them).
#
#   bash scripts/gpu-check.sh --device cpu            # dry run here: tiny shapes, CPU binaries
#   bash scripts/gpu-check.sh --bin target-cuda/gpu-check --out "$OUT"   # on the GPU machine
#
# --bin names a folder holding peftbench, kernels-test and step-table (or their .xz, as
# scripts/build-cuda.sh leaves them). Without it the CPU build's binaries are built and used.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda out=gpu-check-out bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "gpu-check: unknown argument $1 (--device, --out, --bin)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu-check.log"
: > "$log"
say() { echo "== $*" | tee -a "$log"; }

if [ -z "$bin" ]; then
  # The CPU build's binaries (a dry run); a GPU run carries scripts/build-cuda.sh's.
  bin=$(mktemp -d)
  cargo build --release --bin peftbench 2>>"$log"
  cp "${CARGO_TARGET_DIR:-target}/release/peftbench" "$bin/peftbench"
  cp "$(cargo test --release --no-run --test kernels 2>&1 | grep -o '[^ (]*/deps/kernels-[0-9a-f]*' | tail -n 1)" "$bin/kernels-test"
  cp "$(cargo bench --no-run --bench step_table 2>&1 | grep -o '[^ (]*/deps/step_table-[0-9a-f]*' | tail -n 1)" "$bin/step-table"
fi
# Carried binaries come xz-compressed (scripts/build-cuda.sh): unpack them beside the check.
unpacked=$(mktemp -d)
for b in peftbench kernels-test step-table; do
  if [ -x "$bin/$b" ]; then
    ln -s "$(cd "$bin" && pwd)/$b" "$unpacked/$b"
  elif [ -f "$bin/$b.xz" ]; then
    xz -dc "$bin/$b.xz" > "$unpacked/$b" && chmod +x "$unpacked/$b"
  else
    echo "gpu-check: no $b or $b.xz in $bin" >&2; exit 2
  fi
done
PEFTBENCH=$unpacked/peftbench KERNELS_TEST=$unpacked/kernels-test STEP_TABLE=$unpacked/step-table

python=${PEFTBENCH_PYTHON:-python3}
if [ "$device" != cpu ]; then
  # The CUDA 13 libraries of torch's nvidia-* wheels, for cudarc's dynamic loading.
  libs=$("$python" - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += glob.glob(os.path.join(sp, "nvidia", "*", "lib")) + glob.glob(os.path.join(sp, "nvidia", "cu13", "lib"))
print(":".join(sorted(set(dirs))))
PY
)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$log"
fi
# PyTorch + PEFT side by side when this Python has them.
if "$python" -c 'import torch, transformers, peft' 2>/dev/null; then
  export PEFTBENCH_PYTHON=$python
  "$python" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' | tee -a "$log"
else
  unset PEFTBENCH_PYTHON
  say "no torch + transformers + peft in $python: the step tables give peftbench's side only"
fi

if [ "$device" = cpu ]; then
  shape=tiny llama_shape=tiny seq=32 llama_seq=32 llama_batch=2
else
  shape=minilm llama_shape=llama-1b seq=64 llama_seq=512 llama_batch=4
fi
start=$(date +%s)

say "1. device-generic tests on $device"
# Each stage goes on past another's failure: device minutes are too dear to stop at the first.
failed=0
PEFTBENCH_TEST_DEVICE=$device "$KERNELS_TEST" --nocapture > "$out/kernels.log" 2>&1 || { tail -n 30 "$out/kernels.log"; say "FAILED: device-generic tests"; failed=1; }
grep -E "largest|test result" "$out/kernels.log" | tee -a "$log"

step_table() { # name shape dtype batch seq
  say "step table: $2 $3 ${4}x$5 on $device"
  PEFTBENCH_MINILM=/nonexistent PEFTBENCH_BENCH_DEVICE=$device PEFTBENCH_BENCH_SHAPE=$2 \
    PEFTBENCH_BENCH_DTYPE=$3 PEFTBENCH_BENCH_BATCH=$4 PEFTBENCH_BENCH_SEQ=$5 \
    PEFTBENCH_STEP_TABLE_OUT="$out/tmp-$1" "$STEP_TABLE" --bench >>"$log" 2>&1 \
    && mv "$out/tmp-$1/step_table.md" "$out/$1.md" || { say "FAILED: step table $1"; failed=1; }
  rm -rf "$out/tmp-$1"
}
step_table step_minilm_f32 "$shape" f32 16 "$seq"
step_table step_minilm_bf16 "$shape" bf16 16 "$seq"
step_table step_llama_bf16 "$llama_shape" bf16 "$llama_batch" "$llama_seq"

say "4. the default suite on $device"
results=$(mktemp -d)
"$PEFTBENCH" run --device "$device" --results "$results" >>"$log" 2>&1 || { say "FAILED: default suite"; failed=1; }
[ -f "$results/default/report/runs.csv" ] && "$python" - "$results/default/report/runs.csv" reports/results/default/runs.csv > "$out/default_vs_cpu.md" <<'PY'
import csv, sys
def scores(path):
    return {r["run_id"]: (r["primary_metric"], r["primary_reported"]) for r in csv.DictReader(open(path))}
dev, cpu = scores(sys.argv[1]), scores(sys.argv[2])
print("# The default suite on the device beside the committed CPU report\n")
print("| run | metric | device | CPU | difference |\n|---|---|---:|---:|---:|")
for run in sorted(dev):
    metric, v = dev[run]
    c = cpu.get(run, (metric, ""))[1]
    diff = f"{float(v) - float(c):+.4f}" if v and c else ""
    print(f"| {run} | {metric} | {v} | {c} | {diff} |")
PY
say "done in $(( $(date +%s) - start )) s; tables in $out"
ls -l "$out" | tee -a "$log"
exit "$failed"
