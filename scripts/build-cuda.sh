#!/usr/bin/env bash
# Builds peftbench with `--features cuda` on a machine without a GPU (compile only): a CUDA 13.0
# toolkit assembled from PyPI wheels, kernels for compute capability 9.0 (H100 / H200).
#
#   bash scripts/build-cuda.sh              # release binary and the GPU check's test binary
#   CUDA_COMPUTE_CAP=80 bash scripts/build-cuda.sh   # another architecture
#
# Output: target-cuda/release/peftbench (and a stripped, xz-compressed copy beside it for the
# GPU machine) plus target-cuda/gpu-check/ with the test binaries scripts/gpu-check.sh runs.
# At run time the binary needs libcudart.so.13 (linked by candle-kernels' MoE library) and
# loads libcuda (the driver), libcublas(Lt).so.13, libcurand.so.10 and libnvrtc.so.13 through
# cudarc's dynamic loading: point LD_LIBRARY_PATH at them (on a machine with torch's cu13
# wheels, site-packages/nvidia/cu13/lib; scripts/gpu-check.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
W=${CUDA_WORK:-$HOME/.cache/cuda-13.0}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$root/target-cuda}
mkdir -p "$W"

# 1. The toolkit. Debian's sources carry no CUDA; PyPI's nvidia-* wheels do. nvcc is pinned to
#    13.0.x: cudarc 0.19's version detection rejects newer ones.
if [ ! -x "$W/cuda/bin/nvcc" ]; then
  python3 -m pip download --no-deps -q -d "$W/whl" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3
  rm -rf "$W/pyroot" "$W/cuda"
  for w in "$W"/whl/*.whl; do unzip -q -o "$w" -d "$W/pyroot"; done
  cp -a "$W/pyroot/nvidia/cu13" "$W/cuda"
  rm -rf "$W/pyroot"
  ln -sfn lib "$W/cuda/lib64"
  # nvcc looks for its headers and libraries under targets/x86_64-linux.
  mkdir -p "$W/cuda/targets/x86_64-linux"
  ln -sfn ../../include "$W/cuda/targets/x86_64-linux/include"
  ln -sfn ../../lib "$W/cuda/targets/x86_64-linux/lib"
  for l in cudart.so.13 nvrtc.so.13 curand.so.10 cublas.so.13 cublasLt.so.13; do
    ln -sf "lib$l" "$W/cuda/lib/lib${l%.*}"
  done
fi
export CUDA_ROOT="$W/cuda" CUDA_HOME="$W/cuda" CUDA_PATH="$W/cuda" PATH="$W/cuda/bin:$PATH"
# candle-kernels' static MoE library links libcudart dynamically: the linker finds it here.
export LIBRARY_PATH="$W/cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
# sm_90a for Hopper; one nvcc at a time, since two starve the Rust compiler on 2 cores.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-1}
nvcc --version | tail -n 2

# 2. The build. The vendored candle-core loads the CUDA libraries at run time (cudarc's
#    dynamic loading), so nothing here links against a driver this machine lacks.
start=$(date +%s)
cargo build --release --features cuda --bin peftbench
# The GPU check's other binaries, against the same candle: the device-generic tests and the
# step table.
kernels_test=$(cargo test --release --features cuda --no-run --test kernels 2>&1 | tee -a "$CARGO_TARGET_DIR/test-build.log" \
  | grep -o '[^ (]*/deps/kernels-[0-9a-f]*' | tail -n 1)
step_table=$(cargo bench --features cuda --no-run --bench step_table 2>&1 | tee -a "$CARGO_TARGET_DIR/test-build.log" \
  | grep -o '[^ (]*/deps/step_table-[0-9a-f]*' | tail -n 1)
echo "built in $(( $(date +%s) - start )) s"

# 3. What the GPU machine gets: stripped and xz-compressed (the embedded kernels compress well).
out="$CARGO_TARGET_DIR/gpu-check"
mkdir -p "$out"
strip -o "$out/peftbench" "$CARGO_TARGET_DIR/release/peftbench"
strip -o "$out/kernels-test" "$kernels_test"
strip -o "$out/step-table" "$step_table"
for b in peftbench kernels-test step-table; do xz -T1 -6 -f -k "$out/$b"; done
ls -l "$CARGO_TARGET_DIR/release/peftbench" "$out"/
