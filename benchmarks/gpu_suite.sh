#!/usr/bin/env bash
# Every GPU measurement of megamm in one command, for a fresh GPU machine: within 15
# minutes on one H100/H200 by default (GPU_SUITE_SECONDS=840 plus the install). Writes JSON
# (and logs) to benchmarks/results/ (or $OUT/results when $OUT is set, e.g. under the device
# tool, so they come back).
#
#   bash benchmarks/gpu_suite.sh
#
# GPU_SUITE_SECONDS (default 840) caps the whole run: each step gets at most what is left,
# and a step with under 30 s left is recorded as skipped. The steps run most-wanted first,
# so a short lease still measures the kernels, the head and the 8b memory. Under the
# device tool's 15-minute leases (a few minutes of which start the machine):
#   GPU_SUITE_SECONDS=540 bash benchmarks/gpu_suite.sh
#
# DeepSpeed is carried as wheels: on the CPU machine run
#   bash ../shared/device/make_wheels.sh liger-kernel==0.8.5
# and carry `.whl`; this script installs them when .whl/ exists. Steps (each has its own
# time limit, and a failed step is recorded without stopping the rest):
#   1. the bf16 kernel accuracy check                                           (kernel_speed.py --check)
#   2. the loss head's peak torch.cuda.max_memory_allocated, forward + backward, at the 8b
#      vocabulary and d_model in bf16, chunked head vs the previous one  (head_memory.py --device cuda)
#   3. 8b, several steps under zero3_offload, capped at 48 GB with
#      torch.cuda.set_per_process_memory_fraction, next to the estimator's prediction
#   4. kernels vs torch eager / torch.compile / Liger-Kernel / copy bandwidth  (benchmarks/kernel_speed.py)
#      (registers, spills and shared memory per kernel need no GPU: benchmarks/kernels_aot.py, on CPU)
#   5. 1b throughput / TFLOP/s / MFU vs transformers.LlamaForCausalLM, zero2, both loss
#      definitions, eager and --compile side by side (train_throughput.py --compile both)
#   6. memory baseline of a CUDA rank (process RSS, CUDA context)               (memory_baseline.py)
#   7. the training-quality cost of bf16 master weights + Adam states: `small`'s body on the
#      embedded data, fp32 vs bf16 states, same seed (bf16_states_quality.py; JSON + PNG;
#      runs only when a longer GPU_SUITE_SECONDS leaves it time)
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

budget=${GPU_SUITE_SECONDS:-840}

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

step kernels_check 120 python3 benchmarks/kernel_speed.py --check
step head_memory 120 python3 benchmarks/head_memory.py --device cuda --out "$res/head_memory-cuda.json"
step estimate_8b 30 python3 tools/estimate_memory.py --model 8b --ds_config zero3_offload.json --gpus 1 \
  --micro-batch 1 --seq-len 4096
cp "$res/gpu_suite-estimate_8b.log" "$res/estimate_memory-8b-zero3_offload.txt" 2>/dev/null
step throughput_8b 240 python3 benchmarks/train_throughput.py --model 8b --ds_config zero3_offload.json --gpus 1 \
  --seq-len 4096 --micro-batch 1 --grad-accum 1 --steps 4 --warmup-steps 1 --impls megamm --loss-scope modality \
  --memory-fraction "$frac" --out "$res/train_throughput-cuda-8b-zero3_offload.json"
step kernels 150 python3 benchmarks/kernel_speed.py
cp benchmarks/results/kernels-*.json "$res/" 2>/dev/null
step throughput_1b 240 python3 benchmarks/train_throughput.py --model 1b --ds_config zero2.json --gpus 1 \
  --seq-len 2048 --micro-batch 4 --grad-accum 1 --steps 10 --warmup-steps 3 --compile both \
  --out "$res/train_throughput-cuda-1b-zero2-compile_both.json"
step memory_baseline 60 python3 benchmarks/memory_baseline.py --out "$res/memory_baseline-cuda.json"
step bf16_states 420 python3 benchmarks/bf16_states_quality.py --steps 150 --seq-len 512 --micro-batch 8 \
  --lr 1e-3 --warmup 15 --out "$res/bf16_states_quality-cuda.json"
echo "total seconds=$(( $(date +%s) - start )) (device $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))'))" \
  | tee -a "$status"
