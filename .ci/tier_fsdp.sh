#!/usr/bin/env bash
# CI tier: FSDP2 on CPU, 2 processes over gloo (torchrun), through modeling_omnifusion.training.stage2: full and
# LoRA stage 2, sharded for real (each process holds half of every LM parameter; fails on a fallback to DDP),
# checkpoints holding the FSDP state (full and sharded state dicts), resumed runs bit-identical to uninterrupted ones,
# FSDP's final weights equal to DDP's, and ShardedAdafactor equal to Adafactor on whole tensors. Main venv only
# (nothing to install beyond the README's); durations in tests/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. .ci/main_python.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest's own script, not `python -m pytest`: the checkout's folders must not shadow the installed package
timeout 1200 "$(dirname "$MAIN_PYTHON")/pytest" -q -p no:cacheprovider "$ROOT/tests_fsdp"
