#!/usr/bin/env bash
# The GPU figures of the README, each step bounded by a timeout so that a slow one cannot take
# the rest with it (all four take about 12 minutes on one H200; name some to run fewer):
#   tests        the CUDA tests (tests/test_devices.py: CUDA against CPU, bfloat16 training and
#                generation, the step replayed as a CUDA graph);
#   table4       the paper's Table 4 with LLaMA-2-7B's shape in bfloat16, random weights: base,
#                PARA, (IA)^3, unmerged LoRA, beams 1 and 3, eager;
#   compiled     the same at beam 1 with the compiled step (CUDA graphs), base, PARA and LoRA,
#                with torch.compile's hints on what kept it from CUDA graphs in the log;
#   transformers SmolLM2-135M's shape against transformers (float32), para eager.
# Needs torch with CUDA and, for the last, transformers in the same interpreter. Logs go to $OUT.
#     OUT=gpu-results bash bench/gpu.sh [tests] [table4] [compiled] [transformers]
set -u
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
STEPS=${*:-tests table4 compiled transformers}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run it if asked for, keep its log, print its end
    local name=$1 seconds=$2; shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "== $name ($(date +%T))"
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    echo "exit $?"; grep -v "^\s*$" "$OUT/$name.txt" | tail -n 14
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_devices.py
step table4 200 $PY bench/bench_methods.py --shape llama-2-7b --device cuda --dtype bfloat16 --runs 2
step compiled 240 env TORCH_LOGS=perf_hints $PY bench/bench_methods.py --shape llama-2-7b --device cuda \
    --dtype bfloat16 --runs 2 --compile --methods para lora --beams 1
step transformers 200 $PY bench/bench_transformers.py --shape smollm2-135m --device cuda --hf-python $PY --runs 2
