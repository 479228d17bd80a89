#!/usr/bin/env bash
# Every GPU check of the project in one run, for a GPU machine lent for a few minutes (offline there: SmolLM2's config
# and tokenizer travel in build/gpu-cache, its weights are random, which speed does not depend on):
#   1. tests/test_gpu.py: CUDA parity with transformers, bf16, nccl + FSDP2 training (eager and --compile), packed
#      varlen attention, compiled steps against eager ones;
#   2. bench/train_7b.py: the paper's 7B shapes (Mistral-7B, random weights) on rows of 16K tokens, ecellm eager and
#      compiled against transformers + peft: tokens/s, peak memory, MFU;
#   3. bench/packing.py in bf16 on CUDA: packed vs micro-batch 1, random padded, length-grouped, transformers + peft.
# Each stage has its own time limit (about 9 minutes in all, on an H200), so a hang costs only that stage. Logs go to
# the folder given (default /tmp/ecellm-gpu); copy them into bench/results/ and the figures into BENCHMARKS.md.
#
#   mkdir -p build/gpu-cache/SmolLM2-135M-Instruct
#   cp ~/.cache/ecellm/SmolLM2-135M-Instruct/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} \
#      build/gpu-cache/SmolLM2-135M-Instruct/
#   bash bench/gpu_checks.sh "$OUT"        # on the GPU machine
#   DRY_RUN=1 bash bench/gpu_checks.sh /tmp/x   # here, on the CPU: the same stages on tiny shapes (tests skip)
set -u
out=${1:-/tmp/ecellm-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -n "${DRY_RUN:-}" ]; then  # tiny shapes on the CPU, the cached SmolLM2's tokenizer, generous limits
    seven_b=(--tiny --warmup 1 --steps 1 --timeout 600 --compile-timeout 900)
    packing=(--models tiny --threads 2 --global-batch 8 --n-per-task 8)
else
    export ECELLM_CACHE=$PWD/build/gpu-cache
    seven_b=(--device cuda --random-weights --timeout 70 --compile-timeout 120)
    packing=(--models smollm2 --random-weights --device cuda --dtype bf16 --threads 4 --global-batch 32 --n-per-task 64)
fi
{ date -u; nvidia-smi -L; python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$out/machine.txt"
timeout "${TEST_LIMIT:-160}" python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_gpu.py 2>&1 \
    | tee "$out/test_gpu.log"
timeout "${TRAIN_7B_LIMIT:-265}" python3 bench/train_7b.py "${seven_b[@]}" 2>&1 | tee "$out/train_7b.log"
timeout "${BENCH_LIMIT:-100}" python3 bench/packing.py "${packing[@]}" --reps 1 --steps 2 2>&1 | tee "$out/packing.log"
