#!/usr/bin/env bash
# CI tier: a folder saved by this project (main venv, transformers 5.24+) loads with trust_remote_code on the
# oldest transformers vLLM releases pin (5.16), in a venv without this package, with identical inputs, logits and
# greedy tokens. The old venv is cached under $CI_CACHE_DIR (default ~/.cache/omnifusion-ci/), keyed by a hash of its requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OLD_REQUIREMENTS="torch==2.13.0 transformers==5.16.0 huggingface_hub>=1.0 tokenizers safetensors pillow numpy sentencepiece protobuf pytest"
. .ci/main_python.sh
KEY=$(echo "$(python3 --version) $OLD_REQUIREMENTS" | sha256sum | cut -c1-16)
OLD_VENV=${CI_CACHE_DIR:-$HOME/.cache/omnifusion-ci}/old-transformers-$KEY
if [ ! -f "$OLD_VENV/.complete" ]; then
    rm -rf "$OLD_VENV"
    python3 -m venv "$OLD_VENV"
    # shellcheck disable=SC2086
    "$OLD_VENV/bin/python" -m pip install -q $OLD_REQUIREMENTS
    touch "$OLD_VENV/.complete"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
timeout 600 "$MAIN_PYTHON" tests_compat/make_reference.py "$WORK/reference"
# Run from an empty folder so neither this checkout nor an installed package can be imported.
cd "$WORK"
OMNIFUSION_REFERENCE_DIR="$WORK/reference" timeout 900 "$OLD_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests_compat/test_saved_folder_on_old_transformers.py"
