"""The stage scripts with several vision encoders (mix_sum) and tiles."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Dinov2Model, set_seed

from modeling_omnifusion import OmniFusionForCausalLM
from omnifusion_fixtures import chat, encoder_image_processor, make_image, vision_config
from training_fixtures import colour_records, save_language_model, save_vision_model, training_flags, write_dataset

import train_stage1_pretrain
import train_stage2_sft
from omnifusion_training import build_model_from_pretrained_parts, parse_grid_pinpoints


PINPOINTS = "[[64, 32], [32, 64], [64, 64]]"


def save_dinov2_model(folder: Path, seed: int = 1) -> Path:
    """A random 2-layer DINOv2 built for 24 px with its own (ImageNet-normalising) image processor."""
    torch.manual_seed(seed)
    Dinov2Model(vision_config("dinov2", image_size=24)).save_pretrained(folder)
    encoder_image_processor("dinov2", 24).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return save_vision_model(root / "clip"), save_dinov2_model(root / "dinov2"), save_language_model(root / "lm")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    records = colour_records(6)
    path = write_dataset(tmp_path_factory.mktemp("data"), records)
    for index in range(0, 6, 2):  # images of several sizes, so the tiles differ per record
        make_image(index, size=48).resize((48, 24)).save(path.parent / records[index]["image"])
    return path


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory, parts, data_path):
    clip, dinov2, language = parts
    output_dir = tmp_path_factory.mktemp("stage1-mix")
    train_stage1_pretrain.main(
        ["--vision_model_name_or_path", f"{clip},{dinov2}", "--language_model_name_or_path", str(language),
         "--adapter_type", "mix_sum", "--image_grid_pinpoints", PINPOINTS]
        + training_flags(output_dir, data_path, max_steps=2, save_strategy="no")
    )
    return output_dir


def test_stage1_with_two_encoders_and_tiles_trains_the_mix_adapter_and_markers_only(parts, stage1_dir):
    clip, dinov2, language = parts
    # loaded, not read from the file: transformers saves DINOv2 under its legacy key names
    trained = OmniFusionForCausalLM.from_pretrained(stage1_dir).state_dict()
    set_seed(42)  # the scripts' default seed: the fresh adapter and markers the run started from
    initial, _ = build_model_from_pretrained_parts(
        f"{clip},{dinov2}", str(language), adapter_type="mix_sum", image_grid_pinpoints=parse_grid_pinpoints(PINPOINTS)
    )
    initial = initial.state_dict()
    assert trained.keys() == initial.keys()
    changed = {key for key in trained if not torch.equal(trained[key], initial[key])}
    trainable = {key for key in trained if key.startswith("model.adapter.") or "special_embeddings" in key}
    assert changed == trainable
    assert {"model.adapter.encoder_mixes.0.layer_weights", "model.adapter.encoder_mixes.1.layer_weights",
            "model.adapter.encoder_mixes.1.layer_projections.2.weight"} <= changed
    config = json.loads((stage1_dir / "config.json").read_text())
    assert config["adapter_type"] == "mix_sum" and config["image_grid_pinpoints"] == json.loads(PINPOINTS)
    # DINOv2 runs on the tiles' 32 px, its 24 px position table interpolated with its own code
    assert config["additional_vision_configs"][0]["image_size"] == 32


def test_stage1_folder_reloads_and_answers_with_tiles(stage1_dir):
    model = AutoModelForImageTextToText.from_pretrained(stage1_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(stage1_dir, trust_remote_code=True)
    assert processor.image_grid_pinpoints == json.loads(PINPOINTS)
    assert [type(p).__name__ for p in processor.image_processors] == ["CLIPImageProcessorPil", "BitImageProcessorPil"]
    inputs = processor.apply_chat_template(chat("Colour?", images=[make_image(1, size=48)]), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (5, 2, 3, 32, 32)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_stage2_can_switch_tiles_off(stage1_dir, data_path, tmp_path):
    train_stage2_sft.main(
        ["--model_name_or_path", str(stage1_dir), "--image_grid_pinpoints", "none"]
        + training_flags(tmp_path, data_path, max_steps=2)
    )
    config = json.loads((tmp_path / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert config["image_grid_pinpoints"] is None and processor.image_grid_pinpoints is None


@pytest.mark.parametrize("value", ["[[64, 32]", "{\"a\": 1}"])
def test_bad_grid_pinpoints_flag_is_a_value_error(value):
    with pytest.raises(ValueError, match="--image_grid_pinpoints"):
        parse_grid_pinpoints(value)
