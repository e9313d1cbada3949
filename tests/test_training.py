"""Tests for modeling_omnifusion.training (records, labels, the collator, the two stages) and the quickstart demo."""

import codecs
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    MistralForCausalLM,
    set_seed,
)

import modeling_omnifusion.training.trainer as trainer_module
from modeling_omnifusion import OmniFusionForCausalLM
from modeling_omnifusion.testing.tiny import make_config, make_image, make_processor
from modeling_omnifusion.testing.training import (
    colour_records,
    jpeg_truncated,
    png_with_corrupt_pixel_data,
    save_language_model,
    save_vision_model,
    training_flags,
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
from modeling_omnifusion.training.data import load_training_dataset
from modeling_omnifusion.training.models import build_model_from_pretrained_parts

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parts")
    return save_vision_model(root / "vision"), save_language_model(root / "language")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), colour_records(8))


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory, parts, data_path) -> Path:
    output_dir = tmp_path_factory.mktemp("stage1")
    vision, language = parts
    stage1.train(
        ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
        + training_flags(output_dir, data_path, max_steps=2)
    )
    return output_dir


def encoder(max_length: int = 2048, image_folder: str = "") -> ConversationEncoder:
    return ConversationEncoder(make_processor(end_assistant_turns_with_eos=True), image_folder, max_length)


def record(conversations, image="img.png", record_id="r1") -> str:
    return json.dumps({"id": record_id, "image": image, "conversations": conversations})


def load(data_path: Path, **kwargs):
    """`load_training_dataset` with the fixtures' processor; `kwargs` go to `DataArguments`."""
    data_args = DataArguments(data_path=str(data_path), **kwargs)
    return load_training_dataset(data_args, make_processor(end_assistant_turns_with_eos=True))


def logits(model, processor, image_seed: int = 0) -> torch.Tensor:
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the colour?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=[make_image(image_seed)], text=[text], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).logits


# --------------------------------------------------------------------------------------------------------------------
# Records -> model inputs
# --------------------------------------------------------------------------------------------------------------------


def test_labels_are_the_assistant_text_and_its_eos_only():
    enc = encoder()
    tokenizer = enc.processor.tokenizer
    conversations = [
        {"from": "human", "value": "<image>\nWhat is the colour?"},
        {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "two"},
    ]
    messages, _ = record_to_messages("r1", record(conversations))
    input_ids = enc.tokenize(messages)
    labels = assistant_labels(input_ids, enc.processor)

    expected = tokenizer("It is red.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected += tokenizer("two", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels[labels != -100].tolist() == expected


def test_tokenize_gives_the_ids_of_a_processor_call_with_the_image():
    enc = encoder()
    processor = enc.processor
    messages, _ = record_to_messages(
        "r1", record([{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}])
    )
    chat = processor.apply_chat_template(messages)
    expected = processor(images=[make_image()], text=[chat])["input_ids"][0]
    assert enc.tokenize(messages).tolist() == list(expected)


def test_llava_image_literal_is_removed_and_the_image_shown_at_the_first_human_turn():
    conversations = [
        {"from": "human", "value": "Describe this.\n<image>"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "<image>\nAnd now?"},
        {"from": "gpt", "value": "Still a cat."},
    ]
    messages, image = record_to_messages("r1", record(conversations, image="cat.jpg"))
    assert image == "cat.jpg"
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe this."}]
    assert messages[2]["content"] == [{"type": "text", "text": "And now?"}]
    assert [message["role"] for message in messages] == ["user", "assistant", "user", "assistant"]


def test_record_text_cannot_write_markers_or_eos():
    enc = encoder()
    processor, tokenizer = enc.processor, enc.processor.tokenizer
    typed = "<user> <assistant> <image_start> <image_end> </s> <s> <unk>"  # (LLaVA's <image> is removed by design)
    conversations = [{"from": "human", "value": f"Q {typed}"}, {"from": "gpt", "value": f"A {typed} end"}]
    input_ids = enc.tokenize(record_to_messages("r1", record(conversations, image=None))[0])
    control = [*processor.special_token_ids.values(), tokenizer.bos_token_id, tokenizer.unk_token_id]
    # Only the template's own: one <user>, one <assistant>, one EOS closing the answer.
    assert {i: int((input_ids == i).sum()) for i in control if (input_ids == i).any()} == {
        processor.user_token_id: 1,
        processor.assistant_token_id: 1,
    }
    assert int((input_ids == tokenizer.eos_token_id).sum()) == 1 and input_ids[-1] == tokenizer.eos_token_id
    labels = assistant_labels(input_ids, processor)
    as_text = tokenizer(f"A {typed} end", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert labels[labels != -100].tolist() == as_text + [tokenizer.eos_token_id]


def test_a_16_bit_image_trains_as_the_same_picture_in_8_bits(tmp_path):
    pixels = np.asarray(make_image(3).convert("L"))
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(pixels).save(tmp_path / "flat.png")
    enc = encoder(image_folder=str(tmp_path))
    conversations = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "grey"}]
    deep = enc.encode("r1", record(conversations, image="deep.png"))["pixel_values"]
    flat = enc.encode("r2", record(conversations, image="flat.png"))["pixel_values"]
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert torch.equal(deep, flat)


def test_an_unusable_image_is_a_value_error_naming_the_record_and_file(tmp_path):
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "wide.tiff")
    enc = encoder(image_folder=str(tmp_path))
    conversations = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "grey"}]
    with pytest.raises(ValueError, match=r"Record r9: image .*wide\.tiff: Image 0 is a int32 image with values"):
        enc.encode("r9", record(conversations, image="wide.tiff"))


def test_truncation_moves_a_cut_inside_an_image_block_before_it_and_drops_the_image(tmp_path):
    make_image().save(tmp_path / "img.png")
    full = encoder(image_folder=str(tmp_path))
    processor = full.processor
    row = record([{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}])
    input_ids = full.encode("r1", row)["input_ids"]
    image_start = int((input_ids == processor.image_start_token_id).nonzero())
    image_end = int((input_ids == processor.image_end_token_id).nonzero())

    for max_length in (image_start + 1, image_start + 5, image_end):  # cuts inside the block, up to its end marker
        example = encoder(max_length, str(tmp_path)).encode("r1", row)
        assert example["input_ids"].tolist() == input_ids[:image_start].tolist()
        assert example["pixel_values"] is None
        assert (example["labels"] == -100).all()
    example = encoder(image_end + 1, str(tmp_path)).encode("r1", row)  # the whole block fits
    assert example["input_ids"].tolist() == input_ids[: image_end + 1].tolist()
    assert example["pixel_values"].shape == (1, 3, 32, 32)


def test_records_without_an_answer_left_after_truncation_are_left_out(tmp_path, caplog):
    records = colour_records(3)
    records[1]["conversations"][0]["value"] = "<image>\n" + "What is the colour of the shape? " * 30
    with caplog.at_level(logging.WARNING, logger="omnifusion_training"):
        dataset = load(write_dataset(tmp_path, records), model_max_length=100)
    assert len(dataset) == 2
    assert "Left out 1 records with no answer token within model_max_length=100, for example sample-1" in caplog.text
    assert all((example["labels"] != -100).any() and len(example["input_ids"]) <= 100 for example in dataset)


def test_collated_batch_of_image_and_text_only_records_runs_through_the_model(tmp_path):
    records = colour_records(2) + colour_records(1, with_images=False)
    dataset = load(write_dataset(tmp_path, records))
    processor = make_processor()
    batch = OmniFusionDataCollator(processor.tokenizer.pad_token_id)([dataset[index] for index in range(3)])

    assert batch["pixel_values"].shape[0] == 2
    lengths = batch["attention_mask"].sum(-1)
    for row, length in enumerate(lengths):  # right padding: real tokens first, then pad ids with label -100
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        assert (batch["labels"][row, length:] == -100).all()
    model = OmniFusionForCausalLM(make_config(processor))
    assert torch.isfinite(model(**batch).loss)


# --------------------------------------------------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------------------------------------------------


BAD_CONVERSATIONS = {
    "not-a-list": ("oops", "'conversations' must be a non-empty list"),
    "wrong-role": ([{"from": "system", "value": "hi"}, {"from": "gpt", "value": "x"}], "turn 0 needs 'from'"),
    "no-answer": ([{"from": "human", "value": "<image>\nhi"}], "has no 'gpt' turn"),
    "not-a-string": ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": ["x"]}], "turn 1 needs a string"),
    "lone-surrogate": ([{"from": "human", "value": "hi \ud800"}, {"from": "gpt", "value": "x"}], "lone surrogate"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_malformed_conversations_are_a_value_error_naming_the_record(tmp_path, case):
    conversations, message = BAD_CONVERSATIONS[case]
    records = colour_records(2) + [{"id": case, "image": "images/0.png", "conversations": conversations}]
    path = write_dataset(tmp_path, records)
    with pytest.raises(ValueError, match=f"Record {case}: .*{message}"):
        load(path)


def test_missing_image_is_a_file_not_found_error_naming_the_record_and_path(tmp_path):
    records = colour_records(2)
    records[1]["image"] = "images/nowhere.png"
    path = write_dataset(tmp_path, records)
    missing = tmp_path / "images" / "nowhere.png"
    missing.unlink()  # write_dataset drew it
    with pytest.raises(FileNotFoundError, match=f"Record sample-1: image file not found: {missing}"):
        load(path)


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_unreadable_image_is_a_value_error_naming_the_record_and_path(tmp_path, content):
    path = write_dataset(tmp_path, colour_records(2))
    image = tmp_path / "images" / "1.png"
    image.write_bytes(b"not an image" if content == "garbage" else image.read_bytes()[:60])
    with pytest.raises(ValueError, match=f"Record sample-1: cannot read image {image}"):
        load(path)


def test_image_broken_after_the_check_fails_lazily_naming_the_record_and_path(tmp_path):
    dataset = load(write_dataset(tmp_path, colour_records(2)))
    (tmp_path / "images" / "1.png").write_bytes(b"broken later")
    with pytest.raises(ValueError, match=f"Record sample-1: cannot read image {tmp_path}/images/1.png"):
        dataset[1]


@pytest.mark.parametrize("damage", [jpeg_truncated, png_with_corrupt_pixel_data])
def test_images_that_only_fail_to_decode_are_caught_by_the_up_front_check(tmp_path, damage):
    path = write_dataset(tmp_path, colour_records(2))
    image = tmp_path / "images" / "1.png"
    image.write_bytes(damage(image.read_bytes()))
    with Image.open(image) as file:
        file.verify()  # the old check passed these
    with pytest.raises(ValueError, match=f"Record sample-1: cannot read image {image} .*OSError"):
        load(path)
    assert len(load(path, skip_bad_records=True)) == 1


def test_skip_bad_records_skips_an_image_broken_during_training(tmp_path, caplog):
    """Skip bad records skips an image broken during training and keeps the batch size."""
    dataset = load(write_dataset(tmp_path, colour_records(4)), skip_bad_records=True)
    expected = [dataset[index]["input_ids"] for index in range(4)]
    for index in (1, 2):  # two neighbours broken after the check: one batch of two bad records
        image = tmp_path / "images" / f"{index}.png"
        image.write_bytes(png_with_corrupt_pixel_data(image.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="omnifusion_training"):
        batch = dataset.__getitems__([1, 2])  # what the Trainer's data loader calls
    assert [torch.equal(example["input_ids"], expected[3]) for example in batch] == [True, True]
    assert all(example["pixel_values"].shape == (1, 3, 32, 32) for example in batch)
    assert "Skipped record sample-1 during training (Record sample-1: " in caplog.text
    assert f"{tmp_path}/images/1.png" in caplog.text
    assert "Skipped record sample-2 during training" in caplog.text and "; 3 skipped so far" in caplog.text

    collated = OmniFusionDataCollator(make_processor().tokenizer.pad_token_id)(batch)
    assert collated["input_ids"].shape[0] == 2


def test_a_run_with_skip_bad_records_survives_an_image_broken_after_the_check(parts, tmp_path, monkeypatch, caplog):
    vision, language = parts
    path = write_dataset(tmp_path / "data", colour_records(4))
    image = tmp_path / "data" / "images" / "1.png"
    load_checked = trainer_module.load_training_dataset

    def load_then_break_an_image(*args):
        dataset = load_checked(*args)
        image.write_bytes(png_with_corrupt_pixel_data(image.read_bytes()))
        return dataset

    monkeypatch.setattr(trainer_module, "load_training_dataset", load_then_break_an_image)
    with caplog.at_level(logging.WARNING, logger="omnifusion_training"):
        trainer = stage1.train(
            ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
            + training_flags(tmp_path / "out", path, max_steps=4, skip_bad_records=True)
        )
    assert trainer.state.global_step == 4  # two epochs of two batches: sample-1 met twice
    assert "Skipped record sample-1 during training" in caplog.text and "; 2 skipped so far" in caplog.text


@pytest.mark.parametrize("content", ["", "\n  \n", "[]"])
def test_an_empty_data_file_is_a_value_error_naming_it(tmp_path, content):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}: no records \\(the file is empty\\)"):
        load(path)


def test_a_broken_json_list_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"id": 1}, ')
    with pytest.raises(ValueError, match=f"{path}: not a valid JSON list of records"):
        load(path)


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_data_file_with_a_utf8_byte_order_mark_is_read(tmp_path, jsonl):
    path = write_dataset(tmp_path, colour_records(3), jsonl=jsonl)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    dataset = load(path)
    assert len(dataset) == 3 and dataset[0]["pixel_values"].shape[0] == 1


def test_skip_bad_records_skips_and_counts_them(tmp_path, caplog):
    records = colour_records(4)
    records[0]["image"] = "images/missing.png"
    records[2]["conversations"] = [{"from": "human", "value": "no answer"}]
    path = write_dataset(tmp_path, records, jsonl=True)
    (tmp_path / "images" / "missing.png").unlink()
    with open(path, "a") as file:
        file.write("{not json\n")
    (tmp_path / "images" / "3.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="omnifusion_training"):
        dataset = load(path, skip_bad_records=True)
    assert len(dataset) == 1 and dataset[0]["pixel_values"].shape[0] == 1
    assert f"Skipped 4 bad records of 5 in {path}" in caplog.text

    with pytest.raises(FileNotFoundError, match=r"Record sample-0: .*\(4 bad records in all; --skip_bad_records"):
        load(path)


# --------------------------------------------------------------------------------------------------------------------
# Stage 1 and stage 2
# --------------------------------------------------------------------------------------------------------------------


def test_stage1_changes_only_the_adapter_and_the_special_embeddings(parts, stage1_dir):
    vision, language = parts
    trained = load_file(stage1_dir / "model.safetensors")
    set_seed(42)  # the scripts' default seed: the same fresh adapter and markers as the run started from
    initial, _ = build_model_from_pretrained_parts(str(vision), str(language))
    initial = initial.state_dict()
    vision_tower = CLIPVisionModel.from_pretrained(vision)
    source = {f"model.vision_tower.{key}": value for key, value in vision_tower.state_dict().items()}
    language_model = MistralForCausalLM.from_pretrained(language)
    source |= {f"model.language_model.{key}": value for key, value in language_model.model.state_dict().items()}
    source["lm_head.weight"] = language_model.lm_head.weight

    assert trained.keys() == initial.keys()
    changed = {key for key in trained if not torch.equal(trained[key], initial[key])}
    trainable = {key for key in trained if key.startswith("model.adapter.") or "special_embeddings" in key}
    assert changed == trainable
    assert trained.keys() - trainable == source.keys()
    assert all(torch.equal(trained[key], source[key]) for key in source)


def test_stage2_full_fine_tuning_lowers_the_loss_and_saves_a_loadable_folder(stage1_dir, data_path, tmp_path):
    trainer = stage2.train(
        ["--model_name_or_path", str(stage1_dir)]
        + training_flags(tmp_path, data_path, max_steps=12, learning_rate=1e-3, lr_scheduler_type="constant")
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses

    model = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert processor.end_assistant_turns_with_eos
    torch.testing.assert_close(logits(model, processor), logits(trainer.model, processor))
    before, after = load_file(stage1_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    changed_modules = {".".join(key.split(".")[:2]) for key in changed}
    assert changed_modules == {"model.adapter", "model.language_model", "lm_head.weight"}
    assert "model.language_model.embed_tokens.special_embeddings.weight" in changed


def test_stage2_lora_merges_into_a_loadable_folder(stage1_dir, data_path, tmp_path):
    trainer = stage2.train(
        ["--model_name_or_path", str(stage1_dir)]
        + training_flags(tmp_path, data_path, max_steps=4, lora_r=4, learning_rate=1e-2)
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, processor), logits(trainer.model, processor), rtol=1e-4, atol=1e-5)

    before, after = load_file(stage1_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert "model.language_model.embed_tokens.special_embeddings.weight" in changed
    assert any(key.startswith("model.adapter.") for key in changed)
    assert any(".self_attn.q_proj" in key for key in changed) and any(".mlp.down_proj" in key for key in changed)
    frozen = (
        "model.vision_tower.",
        "lm_head.",
        "model.language_model.embed_tokens.weight",
        "model.language_model.norm",
    )
    assert not any(key.startswith(frozen) for key in changed)


def test_stage2_lora_adapter_only_loads_on_top_of_the_stage1_folder(stage1_dir, data_path, tmp_path):
    trainer = stage2.train(
        ["--model_name_or_path", str(stage1_dir)]
        + training_flags(tmp_path, data_path, max_steps=3, lora_r=4, learning_rate=1e-2, save_lora_adapter_only=True)
    )
    assert (tmp_path / "adapter_config.json").exists() and not (tmp_path / "model.safetensors").exists()
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    base = AutoModelForImageTextToText.from_pretrained(stage1_dir, trust_remote_code=True)
    reference = logits(trainer.model, processor)
    assert not torch.allclose(logits(base, processor), reference)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, tmp_path), processor), reference)


# --------------------------------------------------------------------------------------------------------------------
# Distributed and the demo
# --------------------------------------------------------------------------------------------------------------------


def test_two_process_ddp_training_on_cpu(parts, data_path, tmp_path):
    vision, language = parts
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(EXAMPLES_DIR, "train_stage1_pretrain.py"),
        "--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language),
        *training_flags(tmp_path, data_path, max_steps=3, save_strategy="steps", save_steps=2, log_level="info",
                        use_cpu=True),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in log  # 2 processes x 2
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert model.config.model_type == "omnifusion"
    # both processes' parts of the checkpoint, renamed into place together; no staging folder left
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(os.listdir(tmp_path / "checkpoint-2"))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_quickstart_quick_mode_runs_end_to_end(tmp_path):
    command = [sys.executable, os.path.join(EXAMPLES_DIR, "quickstart.py"), "--quick", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("accuracy=") and 0 <= float(last_line.removeprefix("accuracy=")) <= 1
    assert (tmp_path / "omnifusion" / "config.json").exists()
    # the demo's final folder: safetensors and JSON only, and its card names none of the demo's local folders
    final = tmp_path / "omnifusion"
    assert not [p.name for p in final.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert (final / "training_args.json").is_file()
    for name in ("README.md", "config.json", "training_args.json"):
        text = (final / name).read_text()
        assert str(tmp_path) not in text and "language-model" not in text and "vision-tower" not in text, name
