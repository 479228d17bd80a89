#!/usr/bin/env bash
# Every GPU check of the project in one run, for a GPU machine lent for a few minutes (offline there: SmolLM2's config
# and tokenizer travel in build/gpu-cache, its weights are random, which speed does not depend on):
#   1. tests/test_gpu.py: CUDA parity with transformers, bf16, nccl + FSDP2 training, packed varlen attention;
#   2. bench/packing.py in bf16 on CUDA: packed vs micro-batch 1, random padded, length-grouped, transformers + peft.
# Each stage has its own time limit, so a hang costs only that stage. Logs go to the folder given (default
# /tmp/ecellm-gpu); copy them into bench/results/ and the figures into BENCHMARKS.md.
#
#   mkdir -p build/gpu-cache/SmolLM2-135M-Instruct
#   cp ~/.cache/ecellm/SmolLM2-135M-Instruct/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} \
#      build/gpu-cache/SmolLM2-135M-Instruct/
#   bash bench/gpu_checks.sh "$OUT"        # on the GPU machine: about 6 minutes on an H200
set -u
out=${1:-/tmp/ecellm-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ECELLM_CACHE=$PWD/build/gpu-cache
{ date -u; nvidia-smi -L; python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$out/machine.txt"
timeout "${TEST_LIMIT:-180}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
timeout "${BENCH_LIMIT:-330}" python3 bench/packing.py --models smollm2 --random-weights --device cuda --dtype bf16 \
    --threads 4 --reps 2 --steps 3 --global-batch 32 --n-per-task 64 2>&1 | tee "$out/packing.log"
