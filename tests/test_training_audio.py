"""Tests for training with sound (modeling_omnifusion.training): audio records and shards, the collator, which
parameters each stage trains, extending an image model with sound, resume, and bad clips."""

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, WhisperModel, set_seed
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from modeling_omnifusion.testing.tiny import (
    audio_chat,
    audio_config,
    make_audio_model_and_processor,
    make_clip,
    make_image,
)
from modeling_omnifusion.testing.training import (
    colour_records,
    image_logits,
    run_stage1_subprocess,
    save_language_model,
    save_vision_model,
    save_whisper_model,
    speech_records,
    train_image_model,
    training_flags,
    write_audio_shards,
    write_clip,
    write_dataset,
)
from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.arguments import DataArguments
from modeling_omnifusion.training.conversation import (
    ConversationEncoder,
    OmniFusionDataCollator,
    assistant_labels,
    record_to_messages,
)
from modeling_omnifusion.training.data import PackedDataCollator, load_training_dataset
from modeling_omnifusion.training.models import (
    fine_tuned_modules,
    load_audio_encoder,
    train_only,
    train_sound_side,
)

soundfile = pytest.importorskip("soundfile")

QUESTION = [{"from": "human", "value": "<audio>\nWhat is said?"}, {"from": "gpt", "value": "It is red."}]
AUDIO_ROWS = slice(5, 8)  # the <audio>, <audio_start>, <audio_end> rows of the marker table
MARKER_TABLE = "model.language_model.embed_tokens.special_embeddings.weight"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    return {
        "vision": save_vision_model(root / "vision"),
        "language": save_language_model(root / "language"),
        "whisper": save_whisper_model(root / "whisper"),
        "whisper_encoder": save_whisper_model(root / "whisper_encoder", encoder_only=True),
    }


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("speech"), speech_records(8))


@pytest.fixture(scope="module")
def image_model_dir(tmp_path_factory, parts) -> Path:
    output_dir, data_dir = tmp_path_factory.mktemp("image_stage1"), tmp_path_factory.mktemp("images")
    return train_image_model(output_dir, data_dir, parts["vision"], parts["language"])


@pytest.fixture(scope="module")
def extended_dir(tmp_path_factory, parts, image_model_dir, speech_data) -> Path:
    """`image_model_dir` extended with sound by audio stage 1 (weight decay asked for: the marker table gets none)."""
    output_dir = tmp_path_factory.mktemp("audio_stage1")
    stage1.train(
        ["--model_name_or_path", str(image_model_dir), "--audio_model_name_or_path", str(parts["whisper"])]
        + ["--weight_decay", "0.1"]
        + training_flags(output_dir, speech_data, max_steps=3, warmup_steps=0)
    )
    return output_dir


def audio_encoder(processor=None, folder: str = "", **kwargs) -> ConversationEncoder:
    if processor is None:
        processor = make_audio_model_and_processor()[1]
    processor.end_assistant_turns_with_eos = True
    return ConversationEncoder(processor, folder, kwargs.pop("max_length", 2048), **kwargs)


def record(conversations=QUESTION, audio="clip.wav", image=None, record_id="r1") -> str:
    fields = {"id": record_id, "conversations": conversations}
    fields.update({"audio": audio} if audio is not None else {})
    fields.update({"image": image} if image is not None else {})
    return json.dumps(fields)


def load(data_path: Path, processor=None, **kwargs):
    """`load_training_dataset` with the tiny audio processor; `kwargs` go to `DataArguments`."""
    if processor is None:
        processor = make_audio_model_and_processor()[1]
    processor.end_assistant_turns_with_eos = True
    return load_training_dataset(DataArguments(data_path=str(data_path), **kwargs), processor)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# --------------------------------------------------------------------------------------------------------------------
# Records -> model inputs
# --------------------------------------------------------------------------------------------------------------------


def test_an_audio_record_gives_the_ids_and_features_of_a_processor_call_with_the_clip(tmp_path):
    path = write_clip(tmp_path / "clip.wav", seed=3, seconds=0.7)
    enc = audio_encoder(folder=str(tmp_path))
    example = enc.encode("r1", record())
    chat = [
        {"role": "user", "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": "What is said?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
    ]
    inputs = enc.processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
    assert example["input_ids"].tolist() == inputs["input_ids"][0].tolist()
    assert (example["input_ids"] == enc.processor.audio_token_id).sum() == 17  # 0.7 s: 17 positions
    assert torch.equal(example["input_features"], inputs["input_features"])
    assert torch.equal(example["input_features_mask"], inputs["input_features_mask"])
    assert example["pixel_values"] is None
    answer = enc.processor.tokenizer.decode(example["labels"][example["labels"] != -100])
    assert answer == "It is red.</s>"


def test_clips_are_heard_at_the_human_turn_of_their_placeholder():
    conversations = [
        {"from": "human", "value": "<audio>\nFirst?"},
        {"from": "gpt", "value": "One."},
        {"from": "human", "value": "And this?\n<audio>"},
        {"from": "gpt", "value": "Two."},
    ]
    messages, image = record_to_messages("r1", record(conversations, audio=["a.wav", "b.flac"]), with_audio=True)
    assert image is None
    assert messages[0]["content"] == [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "First?"}]
    assert messages[2]["content"] == [{"type": "audio", "path": "b.flac"}, {"type": "text", "text": "And this?"}]


@pytest.mark.parametrize(
    "conversations, audio, message",
    [
        ([{"from": "human", "value": "What?"}, QUESTION[1]], "a.wav", r"1 audio clip\(s\) but 0 <audio>"),
        (QUESTION, ["a.wav", "b.wav"], r"2 audio clip\(s\) but 1 <audio>"),
        (QUESTION, None, r"0 audio clip\(s\) but 1 <audio>"),
        ([QUESTION[0], {"from": "gpt", "value": "<audio>"}], "a.wav", r"turn 1 \('gpt'\) has <audio>"),
        (QUESTION, 7, "'audio' must be a path string or a non-empty list"),
        (QUESTION, [], "'audio' must be a path string or a non-empty list"),
    ],
)
def test_audio_placeholders_must_match_the_clips_naming_the_record(conversations, audio, message):
    with pytest.raises(ValueError, match=f"Record r1: {message}"):
        record_to_messages("r1", record(conversations, audio=audio), with_audio=True)


def test_a_model_without_sound_refuses_audio_records_and_keeps_audio_text_as_text():
    with pytest.raises(ValueError, match="Record r1: has 'audio', but this model has no audio encoder"):
        record_to_messages("r1", record())
    messages, _ = record_to_messages("r1", record(audio=None))
    assert messages[0]["content"] == [{"type": "text", "text": "<audio>\nWhat is said?"}]


def test_truncation_drops_a_cut_audio_block_and_its_clip(tmp_path):
    for name in ("a.wav", "b.wav"):
        write_clip(tmp_path / name, seed=len(name), seconds=0.5)
    conversations = [{"from": "human", "value": "<audio><audio>What?"}, {"from": "gpt", "value": "It is red."}]
    row = record(conversations, audio=["a.wav", "b.wav"])
    full = audio_encoder(folder=str(tmp_path)).encode("r1", row)
    assert full["input_features"].shape[0] == 2
    processor = make_audio_model_and_processor()[1]
    second_start = int((full["input_ids"] == processor.audio_start_token_id).nonzero()[1])
    cut = audio_encoder(processor, str(tmp_path), max_length=second_start + 3).encode("r1", row)
    assert cut["input_ids"].tolist() == full["input_ids"][:second_start].tolist()
    assert cut["input_features"].shape[0] == 1
    assert torch.equal(cut["input_features"], full["input_features"][:1])


def test_the_collators_stack_the_clips_of_rows_with_sound_only_and_the_batch_runs(tmp_path):
    model, processor = make_audio_model_and_processor()
    write_clip(tmp_path / "a.wav", seed=1, seconds=0.5)
    write_clip(tmp_path / "b.flac", seed=2, seconds=0.8)
    write_clip(tmp_path / "c.wav", seed=3, seconds=0.3)
    enc = audio_encoder(processor, str(tmp_path))
    two = [{"from": "human", "value": "<audio><audio>Which?"}, QUESTION[1]]
    examples = [
        enc.encode("r1", record(audio="a.wav")),
        enc.encode("r2", record([{"from": "human", "value": "Hello?"}, QUESTION[1]], audio=None)),
        enc.encode("r3", record(two, audio=["b.flac", "c.wav"])),
    ]
    batch = OmniFusionDataCollator(processor.tokenizer.pad_token_id)(examples)
    assert batch["input_features"].shape == (3, 80, 100) and batch["input_features_mask"].shape == (3, 100)
    assert batch["input_features_mask"].sum(-1).tolist() == [50, 80, 30]
    assert "pixel_values" not in batch
    packed = PackedDataCollator()(examples)
    assert torch.equal(packed["input_features"], batch["input_features"])
    model.train()
    padded_loss = model(**batch).loss
    packed_loss = model(**packed).loss
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    without = OmniFusionDataCollator(processor.tokenizer.pad_token_id)(examples[1:2])
    assert "input_features" not in without and "input_features_mask" not in without


def test_length_grouping_counts_audio_positions(tmp_path):
    records = speech_records(2)
    records[1]["conversations"] = records[0]["conversations"]
    write_clip(tmp_path / "clips/0.wav", seconds=0.2)
    write_clip(tmp_path / "clips/1.wav", seconds=1.0)
    dataset = load(write_dataset(tmp_path, records), group_by_length=True)
    lengths = list(dataset.with_format(None)["length"])
    assert lengths[1] - lengths[0] == 25 - 5  # 1 s: 25 positions, 0.2 s: 5


# --------------------------------------------------------------------------------------------------------------------
# Bad clips
# --------------------------------------------------------------------------------------------------------------------


def write_bad_clip(path: Path, problem: str):
    if problem == "undecodable":
        path.write_bytes(b"RIFF but not really a wave file")
    elif problem == "nan":
        clip = make_clip(0, 0.5)
        clip[100] = np.nan
        soundfile.write(path, clip, 16000, subtype="FLOAT")
    elif problem == "too-long":
        write_clip(path, seconds=1.5)  # the tiny encoder's window is 1 s
    elif problem == "empty":
        soundfile.write(path, np.zeros(0, np.float32), 16000)


BAD_CLIPS = {
    "undecodable": "cannot read it as sound",
    "nan": "holds NaN or infinite samples",
    "too-long": "is 1.50 s long, over the 1 s the audio encoder takes",
    "empty": "is empty",
}


@pytest.mark.parametrize("problem", BAD_CLIPS)
def test_a_bad_clip_is_a_value_error_naming_the_record_and_file_or_skipped(tmp_path, problem, caplog):
    records = speech_records(3)
    write_dataset(tmp_path, records)
    write_bad_clip(tmp_path / "clips/1.wav", problem)
    data_path = tmp_path / "data.json"
    path = re.escape(f"{tmp_path}/clips/1.wav")
    with pytest.raises(ValueError, match=rf"Record speech-1: audio {path}:? {BAD_CLIPS[problem]}"):
        load(data_path)
    with caplog.at_level(logging.WARNING, logger="omnifusion_training"):
        assert len(load(data_path, skip_bad_records=True)) == 2
    assert "Skipped 1 bad records of 3" in caplog.text


def test_a_missing_clip_is_a_file_not_found_error_naming_record_and_path(tmp_path):
    data_path = write_dataset(tmp_path, speech_records(2))
    (tmp_path / "clips/0.wav").unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"Record speech-0: audio file not found: {tmp_path}/clips/0")
    ):
        load(data_path)


def test_audio_folder_is_where_clip_paths_are_read_from(tmp_path):
    data_path = write_dataset(tmp_path / "data", speech_records(2))
    (tmp_path / "sound").mkdir()
    shutil.move(tmp_path / "data/clips", tmp_path / "sound/clips")
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        load(data_path)
    assert len(load(data_path, audio_folder=str(tmp_path / "sound"))) == 2


def test_skip_bad_records_skips_a_clip_broken_after_the_check(tmp_path, caplog):
    data_path = write_dataset(tmp_path, speech_records(3))
    dataset = load(data_path, skip_bad_records=True)
    write_bad_clip(tmp_path / "clips/1.wav", "undecodable")
    with caplog.at_level(logging.WARNING, logger="omnifusion_training"):
        examples = [dataset[index] for index in range(3)]
    assert "Skipped record speech-1 during training" in caplog.text and "cannot read it as sound" in caplog.text
    assert all(example["input_features"].shape == (1, 80, 100) for example in examples)


# --------------------------------------------------------------------------------------------------------------------
# Which parameters each stage trains
# --------------------------------------------------------------------------------------------------------------------


def mixed_batch(processor) -> dict:
    """Two rows: an image and a clip; text only."""
    chats = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": make_image(0)}, {"type": "audio", "audio": make_clip(0)}]
                + [{"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": "It is red."},
        ],
        [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "It is blue."}],
    ]
    batch = processor.apply_chat_template(chats, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    batch["labels"] = assistant_labels(batch["input_ids"], processor).masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model(**batch).loss.backward()
    return {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}


def test_audio_stage1_gradients_reach_only_the_audio_adapter_and_the_audio_marker_rows():
    model, processor = make_audio_model_and_processor(seed=1)
    no_decay = train_sound_side(model)
    assert no_decay == [MARKER_TABLE]
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if name.startswith("model.audio_adapter.")} | {
        MARKER_TABLE
    }
    grads = gradients(model, mixed_batch(processor))
    assert set(grads) == trainable
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if name != MARKER_TABLE)
    rows = grads[MARKER_TABLE].abs().sum(-1)
    assert rows[:5].tolist() == [0] * 5  # image and turn markers: nothing
    assert rows[5] == 0 and (rows[6:] > 0).all()  # <audio> is overwritten by the clip; its start and end learn


def test_stage2_gradients_reach_the_adapters_and_the_lm_never_an_encoder():
    model, processor = make_audio_model_and_processor(seed=1)
    train_only(model, fine_tuned_modules(model))
    grads = gradients(model, mixed_batch(processor))
    frozen = ("model.vision_tower.", "model.audio_tower.")
    expected = {name for name, _ in model.named_parameters() if not name.startswith(frozen)}
    assert set(grads) == expected
    assert all(grad.abs().sum() > 0 for grad in grads.values())


# --------------------------------------------------------------------------------------------------------------------
# The stages with sound
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["whisper", "whisper_encoder"])
def test_a_whisper_folder_gives_its_encoder_weights_and_feature_extractor(parts, folder, tmp_path):
    config, feature_extractor, state = load_audio_encoder(str(parts[folder]))
    reference = WhisperEncoder.from_pretrained(parts["whisper_encoder"]).state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[key], reference[key]) for key in state)
    assert feature_extractor.nb_max_frames == 100 and config.d_model == audio_config().d_model
    torch.manual_seed(0)
    WhisperModel(audio_config()).save_pretrained(tmp_path)  # no feature extractor: Whisper's for the window
    _, feature_extractor, _ = load_audio_encoder(str(tmp_path))
    assert feature_extractor.nb_max_frames == 100 and feature_extractor.feature_size == 80


def test_a_non_whisper_audio_folder_is_refused_naming_it(parts):
    with pytest.raises(ValueError, match=f"--audio_model_name_or_path {parts['vision']}: expected a Whisper model"):
        load_audio_encoder(str(parts["vision"]))


def test_stage1_builds_a_model_with_sound_and_trains_its_adapters_and_markers_only(parts, speech_data, tmp_path):
    trainer = stage1.train(
        ["--vision_model_name_or_path", str(parts["vision"]), "--language_model_name_or_path", str(parts["language"])]
        + ["--audio_model_name_or_path", str(parts["whisper"]), "--audio_adapter_type", "linear"]
        + training_flags(tmp_path, speech_data, max_steps=2, warmup_steps=0)
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["audio_adapter_type"] == "linear" and config["audio_pool_stride"] == 2
    trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert trainable == {
        name
        for name, _ in trainer.model.named_parameters()
        if name.startswith(("model.adapter.", "model.audio_adapter.")) or name == MARKER_TABLE
    }
    saved = weights(tmp_path)
    encoder = WhisperEncoder.from_pretrained(parts["whisper_encoder"]).state_dict()
    assert all(torch.equal(saved[f"model.audio_tower.{key}"], value) for key, value in encoder.items())
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert processor.feature_extractor.nb_max_frames == 100


def test_extending_an_image_model_with_sound_keeps_its_image_logits_bit_identical(image_model_dir, extended_dir):
    assert torch.equal(image_logits(image_model_dir), image_logits(extended_dir))
    before, after = weights(image_model_dir), weights(extended_dir)
    assert all(torch.equal(before[key], after[key]) for key in before if key != MARKER_TABLE)
    assert torch.equal(before[MARKER_TABLE], after[MARKER_TABLE][:5])  # weight decay 0.1 asked: none on the table
    assert {key.split(".")[1] for key in after.keys() - before.keys()} == {"audio_tower", "audio_adapter"}


def test_audio_stage1_changes_only_the_audio_adapter_and_the_audio_start_and_end_rows(
    parts, image_model_dir, extended_dir
):
    set_seed(42)  # as the run did before building its model: the same fresh audio adapter and rows
    model_args = stage1.ModelArguments(
        model_name_or_path=str(image_model_dir), audio_model_name_or_path=str(parts["whisper"])
    )
    initial = stage1.load_model_for_sound(model_args)[0].state_dict()
    trained = weights(extended_dir)
    changed = {key for key in trained if not torch.equal(initial[key], trained[key])}
    assert changed == {key for key in trained if key.startswith("model.audio_adapter.")} | {MARKER_TABLE}
    rows_changed = (initial[MARKER_TABLE] != trained[MARKER_TABLE]).any(-1)
    assert rows_changed.tolist() == [False] * 5 + [False, True, True]
    config = json.loads((extended_dir / "config.json").read_text())
    assert [config[f"audio{kind}_token_id"] for kind in ("", "_start", "_end")] == [305, 306, 307]


def test_the_extended_folder_loads_with_remote_code_and_answers_a_clip(extended_dir):
    model = AutoModelForImageTextToText.from_pretrained(extended_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(extended_dir, trust_remote_code=True)
    inputs = processor.apply_chat_template(
        audio_chat("What is said?", clips=[make_clip(5)]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_stage1_streams_webdataset_shards_with_wav_flac_and_mp3_clips(parts, image_model_dir, tmp_path, caplog):
    shards = tmp_path / "shards"
    write_audio_shards(shards, 2, 3, extensions=("wav", "flac", "mp3"), bad={"000010001": b"not sound"})
    with caplog.at_level(logging.WARNING, logger="omnifusion_training.data"):
        trainer = stage1.train(
            ["--model_name_or_path", str(image_model_dir)]
            + ["--audio_model_name_or_path", str(parts["whisper_encoder"])]
            + training_flags(tmp_path / "out", shards, max_steps=2, per_device_train_batch_size=2)
        )
    assert trainer.state.global_step == 2
    assert "Skipped bad sample 000010001" in caplog.text and "the .flac clip: cannot read it as sound" in caplog.text
    assert (tmp_path / "out/config.json").is_file()


def test_stage2_trains_on_mixed_records_and_never_the_encoders(extended_dir, tmp_path):
    records = speech_records(4, with_images=True) + colour_records(2) + colour_records(2, with_images=False)
    data_path = write_dataset(tmp_path / "data", records)
    stage2.train(["--model_name_or_path", str(extended_dir)] + training_flags(tmp_path / "out", data_path, max_steps=3))
    before, after = weights(extended_dir), weights(tmp_path / "out")
    changed = {re.sub(r"^model\.", "", key).split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"adapter", "audio_adapter", "language_model", "lm_head"}
    assert all(torch.equal(before[key], after[key]) for key in before if "_tower." in key)


@pytest.mark.parametrize("lora", [False, True])
def test_stage2_freeze_adapters_trains_the_lm_alone(extended_dir, speech_data, tmp_path, lora):
    flags = ["--model_name_or_path", str(extended_dir), "--freeze_adapters"] + (["--lora_r", "2"] if lora else [])
    stage2.train(flags + training_flags(tmp_path, speech_data, max_steps=2, warmup_steps=0))
    before, after = weights(extended_dir), weights(tmp_path)
    changed = {re.sub(r"^model\.", "", key).split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"language_model"} | (set() if lora else {"lm_head"})


def test_stage2_lora_saves_the_audio_adapter(extended_dir, speech_data, tmp_path):
    stage2.train(
        ["--model_name_or_path", str(extended_dir), "--lora_r", "2"]
        + training_flags(tmp_path, speech_data, max_steps=2, warmup_steps=0)
    )
    before, after = weights(extended_dir), weights(tmp_path)
    assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith("model.audio_adapter."))


def test_an_audio_run_killed_mid_checkpoint_resumes_to_the_uninterrupted_weights(
    parts, image_model_dir, speech_data, tmp_path
):
    flags = ["--model_name_or_path", str(image_model_dir), "--audio_model_name_or_path", str(parts["whisper"])]
    run = dict(max_steps=4, save_strategy="steps", save_steps=2, warmup_steps=0)
    stage1.train(flags + training_flags(tmp_path / "whole", speech_data, **run))
    killed = run_stage1_subprocess(flags + training_flags(tmp_path / "resumed", speech_data, **run), kill_at_step=4)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "resumed").iterdir() if path.name[0] != ".") == ["checkpoint-2"]
    resumed = stage1.train(
        flags + training_flags(tmp_path / "resumed", speech_data, resume_from_checkpoint="latest", **run)
    )
    assert resumed.state.global_step == 4
    expected, actual = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[key], actual[key]) for key in expected)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_name_or_path", "x", "--vision_model_name_or_path", "v"], "--model_name_or_path trains the sound"),
        (["--audio_model_name_or_path", "w"], "stage 1 needs --vision_model_name_or_path"),
        (
            ["--model_name_or_path", "x", "--image_grid_pinpoints", "[[64, 64]]"],
            "--model_name_or_path trains the sound",
        ),
        (
            ["--vision_model_name_or_path", "v", "--language_model_name_or_path", "l", "--audio_pool_stride", "3"],
            "--audio_pool_stride needs --audio_model_name_or_path",
        ),
    ],
)
def test_stage1_model_flags_that_do_not_combine_are_refused(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stage1.train(flags + ["--data_path", "d.json", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_image_folder_without_an_audio_encoder_is_refused(image_model_dir, speech_data, tmp_path):
    with pytest.raises(ValueError, match="has no audio encoder: give --audio_model_name_or_path"):
        stage1.train(["--model_name_or_path", str(image_model_dir)] + training_flags(tmp_path, speech_data))


def test_stage1_help_lists_the_sound_flags(capsys):
    with pytest.raises(SystemExit):
        stage1.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--audio_model_name_or_path", "--audio_adapter_type", "--audio_pool_stride", "--model_name_or_path"):
        assert flag in help_text
    assert "--audio_folder" in help_text


def test_packing_and_length_grouping_train_on_audio_records(image_model_dir, parts, speech_data, tmp_path):
    trainer = stage1.train(
        ["--model_name_or_path", str(image_model_dir), "--audio_model_name_or_path", str(parts["whisper"])]
        + training_flags(tmp_path, speech_data, max_steps=2, packing=True, group_by_length=True)
    )
    assert trainer.state.global_step == 2 and (tmp_path / "config.json").is_file()


def test_training_the_sound_side_of_a_folder_under_fsdp_is_refused(image_model_dir, parts, tmp_path, capsys):
    flags = ["--model_name_or_path", str(image_model_dir), "--audio_model_name_or_path", str(parts["whisper"])]
    with pytest.raises(SystemExit) as exit_info:
        stage1.train(
            flags + ["--fsdp", "full_shard", "--use_cpu", "--data_path", "d.json", "--output_dir", str(tmp_path)]
        )
    assert exit_info.value.code == 2 and "use DDP or ZeRO-2" in capsys.readouterr().err
