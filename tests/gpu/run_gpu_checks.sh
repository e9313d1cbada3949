#!/usr/bin/env bash
# The GPU checks, on one CUDA device, in under 10 minutes (every step bounded by `timeout`):
#   1. the gpu-marked tests (tests/gpu: bfloat16/float16 generate vs CPU, device_map="auto", SDPA and flash-attention);
#   2. the real-size benchmark at 7B in bfloat16 against LLaVA (examples/benchmarks/benchmark_real_size.py --device cuda);
#   3. one stage-2 LoRA step on the converted 7B folder.
# Results (each step's status and the benchmark's last lines) go to $RESULTS (default: gpu_results.txt in the checkout).
#
# Usage:  tests/gpu/run_gpu_checks.sh [RESULTS]
# Environment: OMNIFUSION_GPU_PYTHON  a Python that already has CUDA torch and this checkout installed (skips the build);
#              otherwise a venv is built in $GPU_CHECKS_WORK/venv from PyPI (torch's default Linux wheel is the CUDA one).
#              GPU_CHECKS_WORK  working folder (default: a new /tmp folder; the 7B checkpoints need ~35 GB there).
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS=${1:-$ROOT/gpu_results.txt}
WORK=${GPU_CHECKS_WORK:-$(mktemp -d /tmp/omnifusion-gpu.XXXXXX)}
START=$(date +%s)
BUDGET=${GPU_CHECKS_BUDGET_S:-580}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"
: > "$RESULTS"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
record() { echo "$*" | tee -a "$RESULTS"; }
step() {  # step NAME MAX_SECONDS COMMAND...: runs COMMAND under timeout min(MAX_SECONDS, time left), records the status
    local name=$1 max=$2; shift 2
    local limit; limit=$(left); (( limit > max )) && limit=$max
    if (( limit < 10 )); then record "$name: SKIPPED (time budget spent)"; return 1; fi
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local code=$?
    record "$name: $([ $code -eq 0 ] && echo PASSED || echo "FAILED (exit $code)") in $(( $(date +%s) - t0 )) s; log $WORK/$name.log"
    return $code
}

record "OmniFusion GPU checks, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
record "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"

if [ -n "${OMNIFUSION_GPU_PYTHON:-}" ]; then
    PY=$OMNIFUSION_GPU_PYTHON
else
    python3 -m venv "$WORK/venv" && PY=$WORK/venv/bin/python
    step build_env 300 bash -c "'$PY' -m pip install -q --upgrade pip && '$PY' -m pip install -q torch && \
        '$PY' -m pip install -q -e '$ROOT[train,test]'" || { record "environment build failed"; exit 1; }
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { record "torch.cuda.is_available() is False with $PY: no CUDA device or a CPU-only torch"; exit 1; }
record "torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'), transformers $("$PY" -c 'import transformers; print(transformers.__version__)')"

cd "$ROOT" || exit 1
step gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/gpu
tail -n 5 "$WORK/gpu_tests.log" | sed 's/^/  /' | tee -a "$RESULTS"

step benchmark_7b 330 "$PY" examples/benchmarks/benchmark_real_size.py --shape 7b --device cuda --dtype bfloat16 \
    --repeats 3 --threads 8 --keep --output_dir "$WORK/real7b"
grep -E "^(OmniFusion|LLaVA|OmniFusion/LLaVA|convert|limit|ttft_roofline)" "$WORK/benchmark_7b.log" | sed 's/^/  /' \
    | tee -a "$RESULTS"

if [ -d "$WORK/real7b/converted" ]; then
    "$PY" - "$WORK/data" <<'PY'
import sys
from pathlib import Path
from modeling_omnifusion.testing.training import colour_records, write_dataset
write_dataset(Path(sys.argv[1]), colour_records(4))
PY
    step lora_step_7b 150 "$PY" -m modeling_omnifusion.training.stage2 --model_name_or_path "$WORK/real7b/converted" \
        --data_path "$WORK/data/data.json" --output_dir "$WORK/lora7b" --lora_r 8 --save_lora_adapter_only --bf16 \
        --max_steps 1 --per_device_train_batch_size 1 --save_strategy no --logging_steps 1 --report_to none \
        --dataloader_num_workers 0
    grep -E "'loss'|train_runtime" "$WORK/lora_step_7b.log" | tail -n 2 | sed 's/^/  /' | tee -a "$RESULTS"
else
    record "lora_step_7b: SKIPPED (no converted 7B folder)"
fi
rm -rf "$WORK/real7b/converted" "$WORK/real7b/released"
record "total $(( $(date +%s) - START )) s"
