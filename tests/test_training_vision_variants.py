"""The stage scripts with several vision encoders (mix_sum) and tiles."""

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitImageProcessorPil,
    CLIPVisionModel,
    Dinov2Model,
    set_seed,
)

from modeling_omnifusion import OmniFusionForCausalLM
from modeling_omnifusion.conversion.convert_omnifusion_to_hf import vision_state_at_input_size
from modeling_omnifusion.testing.tiny import chat, encoder_image_processor, make_image, vision_config
from modeling_omnifusion.testing.training import (
    colour_records,
    save_language_model,
    save_vision_model,
    training_flags,
    write_dataset,
)
from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.models import build_model_from_pretrained_parts, parse_grid_pinpoints

PINPOINTS = "[[64, 32], [32, 64], [64, 64]]"


def save_dinov2_model(folder: Path, seed: int = 1, image_processor=None, **config) -> Path:
    """A random 2-layer DINOv2 built for 24 px with its own (ImageNet-normalising) image processor."""
    torch.manual_seed(seed)
    Dinov2Model(vision_config("dinov2", image_size=24, **config)).save_pretrained(folder)
    (image_processor or encoder_image_processor("dinov2", 24)).save_pretrained(folder)
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
    stage1.train(
        [
            "--vision_model_name_or_path",
            f"{clip},{dinov2}",
            "--language_model_name_or_path",
            str(language),
            "--adapter_type",
            "mix_sum",
            "--image_grid_pinpoints",
            PINPOINTS,
        ]
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
    assert {
        "model.adapter.encoder_mixes.0.layer_weights",
        "model.adapter.encoder_mixes.1.layer_weights",
        "model.adapter.encoder_mixes.1.layer_projections.2.weight",
    } <= changed
    config = json.loads((stage1_dir / "config.json").read_text())
    assert config["adapter_type"] == "mix_sum" and config["image_grid_pinpoints"] == json.loads(PINPOINTS)
    # DINOv2 runs on the tiles' 32 px, its 24 px position table interpolated with its own code
    assert config["additional_vision_configs"][0]["image_size"] == 32


def test_stage1_folder_reloads_and_answers_with_tiles(stage1_dir):
    model = AutoModelForImageTextToText.from_pretrained(stage1_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(stage1_dir, trust_remote_code=True)
    assert processor.image_grid_pinpoints == json.loads(PINPOINTS)
    assert [type(p).__name__ for p in processor.image_processors] == ["CLIPImageProcessorPil", "BitImageProcessorPil"]
    inputs = processor.apply_chat_template(
        chat("Colour?", images=[make_image(1, size=48)]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape == (5, 2, 3, 32, 32)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_stage2_can_switch_tiles_off(stage1_dir, data_path, tmp_path):
    stage2.train(
        ["--model_name_or_path", str(stage1_dir), "--image_grid_pinpoints", "none"]
        + training_flags(tmp_path, data_path, max_steps=2)
    )
    config = json.loads((tmp_path / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert config["image_grid_pinpoints"] is None and processor.image_grid_pinpoints is None


@pytest.fixture(scope="module")
def other_encoders(tmp_path_factory):
    """CLIP and DINOv2 of the stage-1 parts' architecture with other weights: the CLIP folder without an image
    processor, the DINOv2 one with an image processor that normalises differently from the stage-1 one."""
    root = tmp_path_factory.mktemp("other-encoders")
    torch.manual_seed(7)
    CLIPVisionModel(vision_config("clip")).save_pretrained(root / "clip")
    dinov2_processor = BitImageProcessorPil(
        size={"shortest_edge": 27}, crop_size={"height": 24, "width": 24}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    return root / "clip", save_dinov2_model(root / "dinov2", seed=8, image_processor=dinov2_processor)


def tower_states(clip, dinov2) -> dict[str, torch.Tensor]:
    """The `model.vision_tower.*` weights stage 1 builds from these folders (DINOv2 interpolated to the 32 px tiles)."""
    states = [
        CLIPVisionModel.from_pretrained(clip).state_dict(),
        vision_state_at_input_size(Dinov2Model.from_pretrained(dinov2), 32),
    ]
    return {f"model.vision_tower.{i}.{key}": value for i, state in enumerate(states) for key, value in state.items()}


def test_stage2_vision_models_replace_the_towers_and_train_what_stage2_trains(
    stage1_dir, other_encoders, data_path, tmp_path
):
    clip, dinov2 = other_encoders
    stage2.train(
        ["--model_name_or_path", str(stage1_dir), "--vision_model_name_or_path", f"{clip},{dinov2}"]
        + training_flags(tmp_path, data_path, max_steps=2)
    )
    trained = OmniFusionForCausalLM.from_pretrained(tmp_path).state_dict()  # loaded: DINOv2's legacy key names
    stage1 = OmniFusionForCausalLM.from_pretrained(stage1_dir).state_dict()
    given = tower_states(clip, dinov2)
    towers = {key for key in trained if key.startswith("model.vision_tower.")}
    assert towers == given.keys()
    assert all(torch.equal(trained[key], given[key]) for key in towers)  # the given weights, untouched by training
    assert not all(torch.equal(stage1[key], given[key]) for key in towers)  # and not the stage-1 folder's
    # every other weight as in the stage-2 tests: the adapter, the markers, the LM and its head trained, nothing else
    changed = {key for key in trained.keys() - towers if not torch.equal(trained[key], stage1[key])}
    trained_parts = {"model.adapter", "model.language_model", "lm_head.weight"}
    assert {".".join(key.split(".")[:2]) for key in changed} == trained_parts
    assert {
        "model.language_model.embed_tokens.special_embeddings.weight",
        "model.adapter.encoder_mixes.1.layer_weights",
    } <= changed
    assert trained.keys() == stage1.keys()

    # The image processors come from the encoder folders where they have one: DINOv2's normalisation is the given
    # folder's (at the tiles' 32 px, as stage 1 sets it); the CLIP folder has none, so the stage-1 one stays.
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    stage1_processor = AutoProcessor.from_pretrained(stage1_dir, trust_remote_code=True)
    clip_processor, dinov2_processor = processor.image_processors
    assert clip_processor.to_dict() == stage1_processor.image_processors[0].to_dict()
    assert list(dinov2_processor.image_mean) == [0.5] * 3 and list(dinov2_processor.image_std) == [0.25] * 3
    assert list(stage1_processor.image_processors[1].image_mean) != [0.5] * 3
    assert dinov2_processor.crop_size == {"height": 32, "width": 32}
    assert processor.image_grid_pinpoints == json.loads(PINPOINTS)


def test_stage2_lora_merge_keeps_the_given_towers_and_tiles(stage1_dir, other_encoders, data_path, tmp_path):
    clip, dinov2 = other_encoders
    stage2.train(
        [
            "--model_name_or_path",
            str(stage1_dir),
            "--vision_model_name_or_path",
            f"{clip},{dinov2}",
            "--image_grid_pinpoints",
            "none",
        ]
        + training_flags(tmp_path, data_path, max_steps=1, lora_r=2)
    )
    merged = OmniFusionForCausalLM.from_pretrained(tmp_path)
    given = tower_states(clip, dinov2)
    assert all(torch.equal(merged.state_dict()[key], given[key]) for key in given)
    # the merged model is rebuilt from the stage-1 folder: it gets this stage's tiles (off) too, as the processor
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert merged.config.image_grid_pinpoints is None and processor.image_grid_pinpoints is None


def test_stage2_vision_model_replaces_a_single_tower(parts, other_encoders, data_path, tmp_path):
    clip, _, language = parts
    other_clip, _ = other_encoders
    stage1.train(
        ["--vision_model_name_or_path", str(clip), "--language_model_name_or_path", str(language)]
        + training_flags(tmp_path / "stage1", data_path, max_steps=1)
    )
    stage2.train(
        ["--model_name_or_path", str(tmp_path / "stage1"), "--vision_model_name_or_path", str(other_clip)]
        + training_flags(tmp_path / "stage2", data_path, max_steps=1)
    )
    trained = OmniFusionForCausalLM.from_pretrained(tmp_path / "stage2").state_dict()
    given = {f"model.vision_tower.{k}": v for k, v in CLIPVisionModel.from_pretrained(other_clip).state_dict().items()}
    assert {key for key in trained if key.startswith("model.vision_tower.")} == given.keys()
    assert all(torch.equal(trained[key], given[key]) for key in given)


def encoder_mismatch(tmp_path, data_path, stage1_dir, vision_models: str, save_lora_adapter_only=False):
    flags = training_flags(tmp_path / "out", data_path, max_steps=1)
    if save_lora_adapter_only:
        flags += ["--lora_r", "2", "--save_lora_adapter_only", "true"]
    stage2.train(["--model_name_or_path", str(stage1_dir), "--vision_model_name_or_path", vision_models] + flags)


def test_stage2_vision_models_that_do_not_fit_the_adapter_are_a_value_error(parts, stage1_dir, data_path, tmp_path):
    clip, _, _ = parts
    deeper = save_dinov2_model(tmp_path / "dinov2-3-layers", num_layers=3)
    with pytest.raises(ValueError) as error:
        encoder_mismatch(tmp_path, data_path, stage1_dir, f"{clip},{deeper}")
    message = str(error.value)
    assert message.startswith("--vision_model_name_or_path: encoder 1 (")
    assert str(deeper) in message and "num_hidden_layers is 3 in" in message and "but 2 in" in message
    wider = save_dinov2_model(tmp_path / "dinov2-wide", hidden=48)
    with pytest.raises(ValueError, match=r"encoder 1 \(.*dinov2-wide\).*hidden_size is 48 .* but 32 in"):
        encoder_mismatch(tmp_path, data_path, stage1_dir, f"{clip},{wider}")
    with pytest.raises(ValueError, match=r"encoder 0 \(.*dinov2-wide\).*model_type is 'dinov2' .* but 'clip_vision"):
        encoder_mismatch(tmp_path, data_path, stage1_dir, f"{wider},{clip}")
    torch.manual_seed(0)
    CLIPVisionModel(vision_config("clip", image_size=48)).save_pretrained(tmp_path / "clip-48")
    with pytest.raises(ValueError, match=r"encoder 0 \(.*clip-48\).*image_size is 48 .* but 32 in"):
        encoder_mismatch(tmp_path, data_path, stage1_dir, f"{tmp_path / 'clip-48'},{clip}")
    with pytest.raises(ValueError, match=r"--vision_model_name_or_path .*: 1 vision encoder\(s\), but .* on 2"):
        encoder_mismatch(tmp_path, data_path, stage1_dir, str(clip))
    with pytest.raises(FileNotFoundError, match="--vision_model_name_or_path .*missing"):
        encoder_mismatch(tmp_path, data_path, stage1_dir, f"{clip},{tmp_path / 'missing'}")
    assert not (tmp_path / "out").exists()


def test_stage2_vision_models_with_an_adapter_only_save_are_refused(parts, stage1_dir, data_path, tmp_path, capsys):
    clip, dinov2, _ = parts
    with pytest.raises(SystemExit):
        encoder_mismatch(tmp_path, data_path, stage1_dir, f"{clip},{dinov2}", save_lora_adapter_only=True)
    assert "--save_lora_adapter_only saves no vision encoder" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["[[64, 32]", '{"a": 1}'])
def test_bad_grid_pinpoints_flag_is_a_value_error(value):
    with pytest.raises(ValueError, match="--image_grid_pinpoints"):
        parse_grid_pinpoints(value)
