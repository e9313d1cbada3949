"""Training with video (modeling_omnifusion.training): records with a `video` field and WebDataset `.mp4` members,
stage 1 building a model with video or extending an image model with it (image logits bit-identical), stage 2 on
mixed records."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_omnifusion.testing.training import (
    colour_records,
    image_logits,
    save_language_model,
    save_vision_model,
    train_image_model,
    training_flags,
    write_dataset,
    write_shards,
)
from modeling_omnifusion.testing.videos import MOTIONS, motion_clip, write_video
from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.conversation import record_to_messages

av = pytest.importorskip("av")
MARKER_TABLE = "model.language_model.embed_tokens.special_embeddings.weight"


def video_records(folder: Path, count: int) -> list[dict]:
    """`count` records asking which way the shape moves, each with its clip written as `clips/<i>.mp4`."""
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        motion = MOTIONS[index % len(MOTIONS)]
        write_video(folder / f"clips/{index}.mp4", motion_clip(motion, seed=index, frames=8), fps=8)
        question = [{"from": "human", "value": "<video>\nHow does the shape move?"}, {"from": "gpt", "value": motion}]
        records.append({"id": str(index), "video": f"clips/{index}.mp4", "conversations": question})
    return records


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    return {"vision": save_vision_model(root / "vision"), "language": save_language_model(root / "language")}


@pytest.fixture(scope="module")
def video_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    return write_dataset(folder, video_records(folder, 6), jsonl=True)


@pytest.fixture(scope="module")
def image_model_dir(tmp_path_factory, parts) -> Path:
    output_dir, data_dir = tmp_path_factory.mktemp("image_stage1"), tmp_path_factory.mktemp("images")
    return train_image_model(output_dir, data_dir, parts["vision"], parts["language"])


@pytest.fixture(scope="module")
def extended_dir(tmp_path_factory, image_model_dir, video_data) -> Path:
    """`image_model_dir` extended with video (a separate video adapter) by stage 1, weight decay asked for."""
    output_dir = tmp_path_factory.mktemp("video_stage1")
    stage1.train(
        ["--model_name_or_path", str(image_model_dir), "--video_num_frames", "4", "--video_adapter", "separate"]
        + ["--weight_decay", "0.1"]
        + training_flags(output_dir, video_data, max_steps=3, warmup_steps=0, learning_rate=0.05)
    )
    return output_dir


def test_records_put_videos_at_the_first_human_turn_after_the_image():
    record = {
        "image": "a.png",
        "video": ["v1.mp4", "v2.mp4"],
        "conversations": [
            {"from": "human", "value": "<image>\n<video>\n<video>\nSame?"},
            {"from": "gpt", "value": "no"},
        ],
    }
    messages, image = record_to_messages("r", json.dumps(record), with_video=True)
    assert image == "a.png" and [item["type"] for item in messages[0]["content"]] == ["image", "video", "video", "text"]
    assert messages[0]["content"][3]["text"] == "Same?"
    with pytest.raises(ValueError, match="Record r: has 'video', but this model takes no video"):
        record_to_messages("r", json.dumps(record))
    with pytest.raises(ValueError, match="'video' must be a path string or a non-empty list"):
        record_to_messages("r", json.dumps({**record, "video": []}), with_video=True)


def test_extending_an_image_model_with_video_keeps_its_image_logits_bit_identical(image_model_dir, extended_dir):
    assert torch.equal(image_logits(image_model_dir), image_logits(extended_dir))
    before, after = load_file(image_model_dir / "model.safetensors"), load_file(extended_dir / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before if key != MARKER_TABLE)
    assert torch.equal(before[MARKER_TABLE], after[MARKER_TABLE][:5])
    assert not torch.equal(after[MARKER_TABLE][6:], after[MARKER_TABLE][6:] * 0)
    assert {key.split(".")[1] for key in after.keys() - before.keys()} == {"video_adapter"}
    config = json.loads((extended_dir / "config.json").read_text())
    assert config["video_num_frames"] == 4 and config["video_adapter"] == "separate"
    assert json.loads((extended_dir / "processor_config.json").read_text())["video_preprocessor"]["num_frames"] == 4


def test_stage1_builds_a_model_with_video_from_parts(parts, video_data, tmp_path):
    trainer = stage1.train(
        ["--vision_model_name_or_path", str(parts["vision"]), "--language_model_name_or_path", str(parts["language"])]
        + ["--video_num_frames", "4"]
        + training_flags(tmp_path / "out", video_data, max_steps=2)
    )
    assert trainer.state.global_step == 2
    assert json.loads((tmp_path / "out/config.json").read_text())["video_adapter"] == "shared"


def test_stage1_streams_webdataset_shards_with_mp4_members(image_model_dir, tmp_path):
    def fields(shard, index, key):
        path = write_video(tmp_path / f"{key}.mp4", motion_clip("up", seed=index), fps=8)
        return {"mp4": Path(path).read_bytes(), "txt": b"the shape moves up"}

    shards = tmp_path / "shards"
    write_shards(shards, 1, 4, fields)
    trainer = stage1.train(
        ["--model_name_or_path", str(image_model_dir), "--video_num_frames", "4"]
        + training_flags(tmp_path / "out", shards, max_steps=2)
    )
    assert trainer.state.global_step == 2


def test_stage2_trains_on_mixed_video_and_image_records(extended_dir, video_data, tmp_path):
    folder = video_data.parent
    records = [json.loads(line) for line in video_data.read_text().splitlines()] + colour_records(2)
    data_path = write_dataset(folder, records)
    stage2.train(["--model_name_or_path", str(extended_dir)] + training_flags(tmp_path / "out", data_path, max_steps=2))
    before, after = load_file(extended_dir / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    changed = {re.sub(r"^model\.", "", key).split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"adapter", "video_adapter", "language_model", "lm_head"}
