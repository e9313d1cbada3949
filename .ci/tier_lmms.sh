#!/usr/bin/env bash
# CI tier: lmms-eval. The `omnifusion` model registered through the `lmms_eval.models` entry point, every offline
# task config (TextVQA, ScienceQA-IMG, POPE, GQA, OK-VQA) on a tiny model and tiny local parquet files, and
# `visdial_val` on the repository's VisDial sample with the same metrics as `omnifusion-evaluate-visdial`
# (tests_lmms/). lmms-eval 0.7.3 lives in its own venv, cached under $CI_CACHE_DIR and keyed by a hash of its
# requirements and of the project's requirements; the project itself is installed from a fresh wheel on each run
# into a folder of its own (the cached venv stays as it was built).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LMMS_REQUIREMENTS='torch==2.13.0 torchvision==0.28.0 lmms-eval==0.7.3 filelock<4'
# the project's install_requires and its lmms extra (the other extras do not reach this venv)
PROJECT_REQUIREMENTS=$(sed -n -e '/^install_requires/,/^$/p' -e '/^lmms =/,/^[a-z]/p' setup.cfg)
KEY=$(echo "$(python3 --version) $LMMS_REQUIREMENTS $PROJECT_REQUIREMENTS" | sha256sum | cut -c1-16)
# OMNIFUSION_LMMS_VENV: use an existing venv with lmms-eval and the project's dependencies (nothing is installed).
LMMS_VENV=${OMNIFUSION_LMMS_VENV:-${CI_CACHE_DIR:-$HOME/.cache/omnifusion-ci}/lmms-$KEY}
if [ -z "${OMNIFUSION_LMMS_VENV:-}" ] && [ ! -f "$LMMS_VENV/.complete" ]; then
    rm -rf "$LMMS_VENV"
    python3 -m venv "$LMMS_VENV"
    # shellcheck disable=SC2086
    "$LMMS_VENV/bin/python" -m pip install -q $LMMS_REQUIREMENTS
    # PyPI's torchvision is a CUDA build: next to torch+cpu it breaks `import transformers`.
    "$LMMS_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    # the project's own dependencies (with the lmms extra) and pytest, then the project itself out again
    "$LMMS_VENV/bin/python" -m pip install -q "$ROOT[lmms]" pytest
    "$LMMS_VENV/bin/python" -m pip uninstall -q -y omnifusion-transformers
    "$LMMS_VENV/bin/python" -c "import lmms_eval, transformers; from transformers import PreTrainedModel"
    touch "$LMMS_VENV/.complete"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$LMMS_VENV/bin/python" -m pip wheel -q --no-deps "$ROOT" -w "$WORK/wheel"
"$LMMS_VENV/bin/python" -m pip install -q --no-deps --target "$WORK/site" "$WORK"/wheel/*.whl
# Run from an empty folder so that the checkout's folders cannot shadow the installed package.
mkdir "$WORK/run" && cd "$WORK/run"
PYTHONPATH="$WORK/site" timeout 900 "$LMMS_VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests_lmms"
