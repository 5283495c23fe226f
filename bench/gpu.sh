#!/usr/bin/env bash
# The GPU figures of the README, each step bounded by a timeout so that a slow one cannot take
# the rest with it (all four take about 12 minutes on one H200; name some to run fewer):
#   tests        the CUDA tests (tests/test_devices.py: CUDA against CPU, bfloat16 training and
#                generation, the step replayed as a CUDA graph);
#   table4       the paper's Table 4 with LLaMA-2-7B's shape in bfloat16, random weights: base,
#                PARA, (IA)^3, unmerged LoRA, beams 1 and 3, eager;
#   compiled     the same at beam 1 with the compiled step (CUDA graphs), all four methods,
#                with torch.compile's hints on what kept it from CUDA graphs in the log;
#   transformers SmolLM2-135M's shape against transformers (float32), para compiled;
#   int8         the compiled step of `compiled` with weight-only int8 (--quantize int8), base
#                and PARA: against `compiled`'s bfloat16 figures, int8's speed-up;
#   serve        serve.py --compile under 64 clients over 64 adapters (bench_serve.py part 1),
#                SmolLM2-135M's shape with random weights and its tokenizer, which the device
#                cannot fetch: carry weights/SmolLM2-135M-Instruct/tokenizer*.json there.
# Needs torch with CUDA and, for the last, transformers in the same interpreter. Steps run in the
# order named; logs go to $OUT.
#     OUT=gpu-results bash bench/gpu.sh [tests] [table4] [compiled] [transformers] [int8] [serve]
set -u
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
STEPS=${*:-tests table4 compiled transformers}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
command_of() {  # the command of each step
    case $1 in
        tests) echo "$PY -m pytest -q -p no:cacheprovider tests/test_devices.py" ;;
        table4) echo "$PY bench/bench_methods.py --shape llama-2-7b --device cuda --dtype bfloat16 --runs 2" ;;
        compiled) echo "env TORCH_LOGS=perf_hints $PY bench/bench_methods.py --shape llama-2-7b --device cuda" \
                       "--dtype bfloat16 --runs 2 --compile --beams 1" ;;
        transformers) echo "$PY bench/bench_transformers.py --shape smollm2-135m --device cuda --hf-python $PY" \
                           "--runs 2 --compile" ;;
        int8) echo "$PY bench/bench_methods.py --shape llama-2-7b --device cuda --dtype bfloat16 --runs 2" \
                   "--compile --beams 1 --methods para --quantize int8" ;;
        serve) echo "$PY bench/bench_serve.py --shape smollm2-135m --tokenizer weights/SmolLM2-135M-Instruct" \
                    "--device cuda --compile --clients 64 --adapters 64 --requests 1 --tenants 0" ;;
        *) echo "unknown step $1" >&2; exit 2 ;;
    esac
}
declare -A SECONDS_OF=([tests]=150 [table4]=200 [compiled]=300 [transformers]=250 [int8]=300 [serve]=500)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
for name in $STEPS; do command_of "$name" > /dev/null || exit 2; done
for name in $STEPS; do   # in the order asked for
    command=$(command_of "$name")
    echo "== $name ($(date +%T)): $command"
    timeout "${SECONDS_OF[$name]}" $command > "$OUT/$name.txt" 2>&1
    echo "exit $?"; grep -v "^\s*$" "$OUT/$name.txt" | tail -n 14
done
