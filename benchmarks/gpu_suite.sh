#!/usr/bin/env bash
# Every GPU measurement of megamm in one command, for a fresh GPU machine (<= 25 min on
# one H100/H200). Writes JSON (and logs) to benchmarks/results/ (or $OUT/results when
# $OUT is set, e.g. under the device tool, so they come back).
#
#   bash benchmarks/gpu_suite.sh
#
# GPU_SUITE_SECONDS (default 1500) caps the whole run: each step gets at most what is left,
# and a step with under 30 s left is recorded as skipped. The steps run most-wanted first,
# so a short lease still measures the kernels and the 8b memory. With this project's
# 15-minute device leases (a few minutes of which start the machine):
#   GPU_SUITE_SECONDS=540 bash benchmarks/gpu_suite.sh
#
# DeepSpeed is carried as wheels: on the CPU machine run
#   bash ../shared/device/make_wheels.sh liger-kernel==0.8.5
# and carry `.whl`; this script installs them when .whl/ exists. Steps (each has its own
# time limit, and a failed step is recorded without stopping the rest):
#   1. the bf16 kernel accuracy check                                           (kernels.py --check)
#   2. kernels vs torch eager / torch.compile / Liger-Kernel / copy bandwidth  (benchmarks/kernels.py)
#      (registers, spills and shared memory per kernel need no GPU: benchmarks/kernels_aot.py, on CPU)
#   3. 8b, several steps under zero3_offload, capped at 48 GB with
#      torch.cuda.set_per_process_memory_fraction, next to the estimator's prediction
#   4. 1b throughput / TFLOP/s / MFU vs transformers.LlamaForCausalLM, zero2, both loss
#      definitions (train_throughput.py)
#   5. memory baseline of a CUDA rank (process RSS, CUDA context)               (memory_baseline.py)
#   6. the training-quality cost of bf16 master weights + Adam states: `small`'s body on the
#      embedded data, fp32 vs bf16 states, same seed (bf16_states_quality.py; JSON + PNG)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
fi
res=${OUT:+$OUT/results}
res=${res:-$root/benchmarks/results}
mkdir -p "$res"
status="$res/gpu_suite-status.txt"
: > "$status"
total_gb=$(python3 -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 1e9)")
frac=$(python3 -c "print(min(1.0, 48 / $total_gb))")  # a 48 GB GPU on a bigger one
start=$(date +%s)

budget=${GPU_SUITE_SECONDS:-1500}

step() {  # step NAME LIMIT_S CMD...: run, log, record the exit status and the time taken
  local name=$1 limit=$2; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 30 ]; then
    echo "$name skipped (GPU_SUITE_SECONDS=$budget spent)" | tee -a "$status"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$res/gpu_suite-$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit" | tee -a "$status"
}

step kernels_check 180 python3 benchmarks/kernels.py --check
step kernels 240 python3 benchmarks/kernels.py
cp benchmarks/results/kernels-*.json "$res/" 2>/dev/null
step estimate_8b 30 python3 tools/estimate_memory.py --model 8b --ds_config zero3_offload.json --gpus 1 \
  --micro-batch 1 --seq-len 4096
cp "$res/gpu_suite-estimate_8b.log" "$res/estimate_memory-8b-zero3_offload.txt" 2>/dev/null
step throughput_8b 480 python3 benchmarks/train_throughput.py --model 8b --ds_config zero3_offload.json --gpus 1 \
  --seq-len 4096 --micro-batch 1 --grad-accum 1 --steps 4 --warmup-steps 1 --impls megamm --loss-scope modality \
  --memory-fraction "$frac" --out "$res/train_throughput-cuda-8b-zero3_offload.json"
step throughput_1b 480 python3 benchmarks/train_throughput.py --model 1b --ds_config zero2.json --gpus 1 \
  --seq-len 2048 --micro-batch 4 --grad-accum 1 --steps 10 --warmup-steps 3 \
  --out "$res/train_throughput-cuda-1b-zero2.json"
step memory_baseline 120 python3 benchmarks/memory_baseline.py --out "$res/memory_baseline-cuda.json"
step bf16_states 420 python3 benchmarks/bf16_states_quality.py --steps 150 --seq-len 512 --micro-batch 8 \
  --lr 1e-3 --warmup 15 --out "$res/bf16_states_quality-cuda.json"
echo "total seconds=$(( $(date +%s) - start )) (device $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))'))" \
  | tee -a "$status"
