#!/usr/bin/env bash
# The one-shot GPU check, in stages ordered by value: environment -> fastpeft._C for sm_90a -> GPU correctness
# tests -> decode timings -> the training-shape headline -> DoRA beside LoRA -> mixed batches -> (IA)³ -> QLoRA -> a
# decode step under CUDA graphs -> layer benchmark if time is left.
#
# Runs from the source tree on a CUDA machine that has torch, triton, peft, pytest, CMake, ninja and pybind11, with
# no network and no pip install (kernels/ is reached as fastpeft.kernels through a link, fastpeft._C is built with
# CMake into the tree). Every stage has its own time limit and appends to $OUT/summary.md as it goes, which is also
# copied to bench/results/<date>-<gpu>.md after each stage; the whole run ends within BUDGET seconds (default 290),
# so a cold rerun still fits a 15-minute device lease. Under $OUT: the summary, one log a stage, report/ (the scaling
# report's page and PNGs).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT=${OUT:-$(mktemp -d)}
BUDGET=${BUDGET:-290}
mkdir -p "$OUT" bench/results
start=$(date +%s)
summary="$OUT/summary.md"
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { echo "[gpu_check +$(elapsed)s] $*"; }
gpu=$(python -c 'import re, torch; n = torch.cuda.get_device_name(0).lower().replace("nvidia", ""); print(re.sub(r"[^a-z0-9]+", "-", n).strip("-"))') \
  || { echo "no CUDA GPU visible to torch" | tee "$summary"; exit 1; }
result="bench/results/$(date -u +%F)-${gpu}.md"
publish() { cp "$summary" "$result"; }
# stage NAME SECONDS COMMAND...: runs with a limit no larger than what is left, logs to $OUT/NAME.log.
stage() {
  local name=$1 limit=$2; shift 2
  local room=$(( $(left) - 5 ))
  if (( room < 10 )); then log "skip $name: $(left)s left"; echo "- $name: skipped, out of time" >> "$summary"; return 1; fi
  (( limit > room )) && limit=$room
  log "$name (limit ${limit}s)"
  if declare -F "$1" > /dev/null; then  # a shell function: timeout runs programs, so through bash
    export -f "$1"
    timeout "$limit" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  local rc=$?
  echo "- $name: exit $rc after $(elapsed)s$( ((rc == 124)) && echo ' (timed out)')" >> "$summary"
  return $rc
}

ln -sfn ../kernels fastpeft/kernels  # the installed layout, from the source tree
{
  echo "# GPU check, $(date -u '+%F %H:%M UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  echo '```'
  echo
  echo "## Stages"
  echo
} > "$summary"
publish

# fastpeft._C for Hopper only: one arch keeps the build to ~30 s on 16 cores. ptxas -v output is kept to check spills.
build_c() {
  cmake -S . -B build/gpu-check -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v python)" \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DFASTPEFT_CUDA_ARCHS=90a \
    -DCMAKE_CUDA_COMPILER="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}" \
    && cmake --build build/gpu-check --parallel \
    && cp build/gpu-check/_C*.so fastpeft/
}
stage build 120 build_c
spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/build.log" | sort -u | head -5)
{ echo "  fastpeft._C: $(grep -c 'Compiling entry' "$OUT/build.log") kernel builds; spills: ${spills:-none}"; } >> "$summary"
{ echo; echo '```'; python -m fastpeft info 2>&1; echo '```'; echo; } >> "$summary"
publish

# Correctness first, two pytest processes side by side, fixed kernel configs (autotuning every test shape would only
# add compile time): the GPU-only tests, and the ops on CUDA against float64.
gpu_tests() {
  FASTPEFT_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_extension.py \
    > "$OUT/tests-gpu.log" 2>&1 &
  local a=$!
  FASTPEFT_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -k "cuda or triton" tests/test_lora_linear.py \
    tests/test_dora.py tests/test_lora_linear_mixed.py tests/test_nf4.py tests/test_nf4_models.py \
    tests/test_adapter_bottleneck.py tests/test_compile.py tests/test_ia3_linear.py \
    > "$OUT/tests-ops.log" 2>&1
  local rb=$?
  wait $a; local ra=$?
  echo "gpu tests exit $ra, op tests exit $rb"
  return $(( ra || rb ))
}
stage tests 120 gpu_tests
{ echo; echo '```'; tail -4 "$OUT/tests-gpu.log"; tail -4 "$OUT/tests-ops.log"; echo '```'; echo; } >> "$summary"
publish

stage decode 60 env FASTPEFT_AUTOTUNE=0 python bench/gpu_kernels.py --part decode --markdown "$summary"
publish

stage headline 90 python bench/gpu_kernels.py --part gemm --shape 8192,4096,4096,16 --markdown "$summary"
grep "autotune winners" "$OUT/headline.log" | sed 's/^/    /' >> "$summary"
publish

# DoRA's target: fwd+bwd within 1.10x of fastpeft's LoRA on the same shape (both backends, PEFT's DoRA beside).
stage dora 60 python -m fastpeft bench --device cuda --only dora --shape 8192,4096,4096,16 --dropout 0 --rounds 5 \
  --markdown "$summary"
publish

# Mixed-adapter batches (the torch path on the GPU: batched GEMMs per sample), M=8192, K=N=4096, 64 adapters.
stage mixed 45 python -m fastpeft bench --device cuda --only mixed --quick --rounds 3 --markdown "$summary"
publish

# (IA)³: fastpeft's layer (triton: the fused GEMM's K-loop and epilogue scales) beside HF PEFT's IA3 Linear and the
# frozen base, output and input scales, M=8192; target: fwd+bwd time and saved bytes <= PEFT's.
stage ia3 45 python -m fastpeft bench --device cuda --only ia3 --rounds 5 --markdown "$summary"
publish

# QLoRA: the fused NF4 forward against torch.mm on the bf16 weight (target <= 1.15x), the NF4 decode's bandwidth
# (target >= 70% of copy), then fastpeft's QLoRA layer beside PEFT over bitsandbytes where bitsandbytes is installed.
stage qlora 75 python bench/gpu_kernels.py --part qlora --markdown "$summary"
publish

# The scaling report (quick sweeps at the GPU's sizes), its page and plots brought back under $OUT/report.
stage report 60 python -m fastpeft report --quick --device cuda --out "$OUT/report"
grep -A2 "limit (roofline" "$OUT/report/report.md" 2>/dev/null | head -3 | sed 's/^/    /' >> "$summary"
publish

stage graphs 45 env FASTPEFT_AUTOTUNE=0 python bench/gpu_kernels.py --part graphs --markdown "$summary"
publish

stage layers 90 python -m fastpeft bench --device cuda --only lora --shape 8192,4096,4096,16 --rounds 5 \
  --markdown "$summary"
publish

# A PeftModel's whole training step, fused against unfused: a 1B-shaped Llama (hidden 2048, 16 layers, seq 1024,
# batch 4) at bf16, LoRA r=16 on all seven projections.
stage peft-step 60 python -m fastpeft bench --device cuda --only peft-step --rounds 5 --markdown "$summary"
publish

# Merging adapters against PEFT's add_weighted_adapter at K=N=4096 (svd's low-rank path; ties_svd through the Triton
# kernel's element-wise pass; dare_ties_svd through the torch path).
stage merging 60 python -m fastpeft bench --device cuda --only merging --rounds 3 --markdown "$summary"
publish
log "done in $(elapsed)s: $result"
