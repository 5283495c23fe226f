#!/usr/bin/env bash
# The GPU figures of the README in one run (under 10 minutes on one H100/H200), each step
# bounded by a timeout so that a slow one cannot take the rest with it:
#   1. the CUDA tests (tests/test_devices.py: CUDA against CPU, bfloat16 training and
#      generation, the step replayed as a CUDA graph);
#   2. the paper's Table 4 with LLaMA-2-7B's shape in bfloat16, random weights: base, PARA,
#      (IA)^3, unmerged LoRA, beams 1 and 3, eager; then base and PARA with the compiled step;
#   3. SmolLM2-135M's shape against transformers (float32), para eager.
# Needs torch with CUDA and, for step 3, transformers in the same interpreter. Logs go to $OUT.
#     OUT=gpu-results bash bench/gpu.sh
set -u
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() {  # step SECONDS NAME COMMAND...: run it, keep its log, print its end
    local seconds=$1 name=$2; shift 2
    echo "== $name ($(date +%T))"
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    echo "exit $?"; tail -n 14 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
step 100 tests $PY -m pytest -q -p no:cacheprovider tests/test_devices.py ${TESTS:-}
step 200 table4-eager $PY bench/bench_methods.py --shape llama-2-7b --device cuda --dtype bfloat16 --runs 2
step 150 smollm2-vs-transformers $PY bench/bench_transformers.py --shape smollm2-135m --device cuda --hf-python $PY --runs 2
step 170 table4-compiled $PY bench/bench_methods.py --shape llama-2-7b --device cuda --dtype bfloat16 --runs 2 \
    --compile --methods para --beams 1
