#!/usr/bin/env bash
# The one-shot GPU check: install (with fastpeft._C), GPU tests, decode/kernel/layer timings
# -> bench/results/<date>-<gpu>.md
#
# Run from the repository root on a CUDA machine that already has torch, triton, peft and pytest (no network
# is needed). Each step has its own time limit and a failing step does not stop the later ones, so one run
# always brings back what it measured. Logs and a copy of the results go to $OUT (default: a temp folder).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT" bench/results
start=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

gpu=$(python -c 'import re, torch; n = torch.cuda.get_device_name(0).lower().replace("nvidia", ""); print(re.sub(r"[^a-z0-9]+", "-", n).strip("-"))') \
  || { echo "no CUDA GPU visible to torch"; exit 1; }
result="bench/results/$(date -u +%F)-${gpu}.md"

log "install and build fastpeft._C (no build isolation, no dependencies: everything is preinstalled here)"
FASTPEFT_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 \
  || { tail -30 "$OUT/install.log"; exit 1; }

{
  echo "# GPU check, $(date -u '+%F %H:%M UTC')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  python -m fastpeft info
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  echo '```'
} > "$result"

log "GPU tests (fixed kernel configs: autotuning every test shape would only add compile time)"
FASTPEFT_AUTOTUNE=0 timeout 240 python -m pytest tests -q -x -p no:cacheprovider \
  --ignore=tests/test_aot.py > "$OUT/tests.log" 2>&1
echo "tests exit code: $?" >> "$OUT/tests.log"
{ echo; echo "## Tests"; echo; echo '```'; tail -15 "$OUT/tests.log"; echo '```'; } >> "$result"

log "decode kernel timings (fastpeft._C vs torch.mm, unfused torch, HF PEFT, Triton)"
timeout 90 python bench/gpu_kernels.py --part decode --markdown "$result" > "$OUT/decode.log" 2>&1
echo "decode exit code: $?" >> "$OUT/decode.log"

log "training-shape kernel timings (autotuned)"
timeout 180 python bench/gpu_kernels.py --part gemm --markdown "$result" > "$OUT/kernels.log" 2>&1
echo "kernels exit code: $?" >> "$OUT/kernels.log"

log "layer timings: LoRA (nn.Linear, fastpeft torch/triton, HF PEFT) and adapters (AdapterHub way, fastpeft)"
timeout 180 python -m fastpeft bench --device cuda --shape 8192,4096,4096,16 --shape 8192,4096,14336,16 \
  --markdown "$result" > "$OUT/bench.log" 2>&1
echo "bench exit code: $?" >> "$OUT/bench.log"

cp "$result" "$OUT/"
log "done: $result"
tail -3 "$OUT/tests.log" "$OUT/decode.log" "$OUT/kernels.log" "$OUT/bench.log"
