"""examples/video_demo.py's pieces: the clips (what one frame shows), their records and the flags it gives the stage
commands; the whole run is the video CI tier's."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import HfArgumentParser

from modeling_omnifusion.testing.videos import MOTIONS, motion_clip
from modeling_omnifusion.training import stage1
from modeling_omnifusion.training.arguments import DataArguments

av = pytest.importorskip("av")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("video_demo", EXAMPLES / "video_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["video_demo"] = module
    spec.loader.exec_module(module)
    return module


def square_boxes(frame: np.ndarray) -> tuple | None:
    """(top, left, height, width) of the bright square in a frame, or None."""
    bright = frame.max(-1) >= 150
    if not bright.any():
        return None
    rows, columns = np.nonzero(bright.any(1))[0], np.nonzero(bright.any(0))[0]
    return rows[0], columns[0], rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1


@pytest.mark.parametrize("motion", MOTIONS)
def test_clips_move_the_square_as_named(motion):
    boxes = [square_boxes(frame) for frame in motion_clip(motion, seed=3)]
    if motion in ("appearing", "vanishing"):
        shown = [box is not None for box in boxes]
        assert shown == [motion == "vanishing"] * 4 + [motion == "appearing"] * 4
        assert len({box for box in boxes if box is not None}) == 1  # in place
        return
    assert all(box is not None and box[2:] == (8, 8) for box in boxes)
    axis = 1 if motion in ("left", "right") else 0
    positions = [box[axis] for box in boxes]
    assert positions == sorted(positions, reverse=motion in ("left", "up")) and positions[0] != positions[-1]
    assert len({box[1 - axis] for box in boxes}) == 1


@pytest.mark.parametrize("motion", MOTIONS)
def test_clips_with_a_distance_start_alike_and_move_that_far(motion):
    for seed in range(20):
        boxes = [square_boxes(frame) for frame in motion_clip(motion, seed=seed, frames=4, distance=8)]
        if motion == "appearing":
            assert boxes[0] is None and boxes[-1] is not None
            continue
        # every first frame but appearing's: the square somewhere in [8, 16] on both axes
        assert boxes[0][2:] == (8, 8) and 8 <= boxes[0][0] <= 16 and 8 <= boxes[0][1] <= 16
        if motion == "vanishing":
            assert boxes[-1] is None
            continue
        axis = 1 if motion in ("left", "right") else 0
        sign = 1 if motion in ("right", "down") else -1
        assert boxes[-1][axis] - boxes[0][axis] == sign * 8 and boxes[-1][1 - axis] == boxes[0][1 - axis]
    with pytest.raises(ValueError, match="distance"):
        motion_clip(motion, distance=13)


def test_records_point_at_decodable_mp4s_and_answer_the_motion(demo, tmp_path):
    records = demo.write_clips(tmp_path, 1, seed_base=0)
    assert [record["conversations"][1]["value"] for record in records] == list(MOTIONS)
    assert all(record["conversations"][0]["value"] == "<video>\n" + demo.QUESTION for record in records)
    with av.open(str(tmp_path / records[0]["video"])) as container:
        assert container.streams.video[0].frames == demo.FRAMES


def test_quick_defaults_and_the_stage_flags_parse_as_the_library_commands(demo, tmp_path):
    args = demo.parse_args(["--output_dir", str(tmp_path), "--quick"])
    assert (args.train_per_motion, args.test_per_motion, args.stage1_steps, args.stage2_steps) == (10, 4, 10, 100)
    flags = demo.common_flags(tmp_path / "out", tmp_path / "train.json", 5, 1e-3)
    parser = HfArgumentParser((stage1.ModelArguments, DataArguments, stage1.Stage1TrainingArguments))
    _, data_args, training_args = parser.parse_args_into_dataclasses(
        flags + ["--video_num_frames", "8"], look_for_args_file=False
    )
    assert training_args.max_steps == 5 and data_args.image_folder == str(tmp_path)
    with pytest.raises(SystemExit):
        demo.parse_args(["--output_dir", str(tmp_path), "--stage2_steps", "0"])
    json.dumps(flags)
