#!/usr/bin/env bash
# CI tier: the chat demo (examples/chat_demo.py) in a real browser. Debian's chromium and chromium-driver (installed
# here when missing: CI runs as root) driven by playwright from PyPI, which never downloads a browser of its own
# (tests_browser/ launches /usr/bin/chromium). The venv (the project's dependencies with its [demo] and [audio]
# extras, playwright and pytest) is cached under $CI_CACHE_DIR, keyed by a hash of its requirements; the project
# itself is installed fresh from this checkout into a folder of its own. The screenshots of the page (a two-turn
# chat with an image, and a model with sound answering a clip) are the tier's artefacts, in
# $CI_CACHE_DIR/artifacts/browser/ (their paths are printed last).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE=${CI_CACHE_DIR:-$HOME/.cache/omnifusion-ci}
BROWSER_REQUIREMENTS="torch==2.13.0 gradio==6.31.0 playwright==1.65.3 pytest"

. .ci/debian_packages.sh
ensure_debian_packages chromium chromium-driver
/usr/bin/chromium --version

PYTHON=$(command -v python3.11 || command -v python3)
# the project's own requirements (install_requires, the demo and audio extras) are part of the key
PROJECT_REQUIREMENTS=$("$PYTHON" -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
extras = c['options.extras_require']; print(c['options']['install_requires'], extras['demo'], extras['audio'])")
KEY=$(echo "$("$PYTHON" --version) $BROWSER_REQUIREMENTS $PROJECT_REQUIREMENTS" | sha256sum | cut -c1-16)
VENV=$CACHE/browser-$KEY
if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q ".[demo,audio]" $BROWSER_REQUIREMENTS
    "$VENV/bin/python" -m pip uninstall -q -y omnifusion-transformers
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: next to torch+cpu they break `import transformers`.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    "$VENV/bin/python" -c "import gradio, playwright, transformers; from transformers import PreTrainedModel"
    touch "$VENV/.complete"
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
export OMNIFUSION_BROWSER_ARTIFACTS="$CACHE/artifacts/browser"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" -m pip install -q --no-deps --target "$WORK/site" "$ROOT"
rm -f "$OMNIFUSION_BROWSER_ARTIFACTS"/chat_demo*.png
# pytest's own script, not `python -m pytest`: the checkout's folders must not shadow the installed package
PYTHONPATH="$WORK/site" timeout 900 "$VENV/bin/pytest" -q -p no:cacheprovider "$ROOT/tests_browser"
for screenshot in chat_demo.png chat_demo_sound.png; do
    test -s "$OMNIFUSION_BROWSER_ARTIFACTS/$screenshot"
    echo "tier browser: screenshot $OMNIFUSION_BROWSER_ARTIFACTS/$screenshot"
done
