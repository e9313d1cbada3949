"""Data at scale (modeling_omnifusion.training.data): WebDataset streaming, packing, length grouping, --check_images."""

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.trainer_pt_utils import LengthGroupedSampler

from modeling_omnifusion import OmniFusionForCausalLM
from modeling_omnifusion.testing.tiny import make_config, make_image, make_processor
from modeling_omnifusion.testing.training import (
    colour_records,
    save_language_model,
    save_vision_model,
    training_flags,
    write_dataset,
)
from modeling_omnifusion.testing.training import (
    write_shards as write_tar_shards,
)
from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.arguments import DataArguments, OmniFusionTrainingArguments
from modeling_omnifusion.training.conversation import OmniFusionDataCollator
from modeling_omnifusion.training.data import (
    PackedDataCollator,
    expand_shards,
    load_streaming_dataset,
    load_training_dataset,
)
from modeling_omnifusion.training.fsdp import check_distributed_arguments

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "examples"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return save_vision_model(root / "vision"), save_language_model(root / "language")


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    make_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, num_shards: int, per_shard: int, bad: dict | None = None) -> list[Path]:
    """img2dataset-style shards `00000.tar`...: `key.png` + `key.txt` (odd samples: `key.json` instead). `bad` maps
    a key to what is wrong with it: 'no-caption', 'broken-image', 'no-image', 'bad-json'."""
    bad = bad or {}

    def sample_fields(shard: int, index: int, key: str) -> dict[str, bytes]:
        caption = f"It is {['red', 'blue', 'green'][index % 3]}."
        fields = {"png": png_bytes(shard * 100 + index)}
        if index % 2:
            fields["json"] = json.dumps({"caption": caption, "key": key}).encode()
        else:
            fields["txt"] = caption.encode()
        problem = bad.get(key)
        if problem == "no-caption":
            fields.pop("txt", None), fields.pop("json", None)
        elif problem == "broken-image":
            fields["png"] = b"not a png"
        elif problem == "no-image":
            del fields["png"]
        elif problem == "bad-json":
            fields.pop("txt", None)
            fields["json"] = b"{broken"
        return fields

    return write_tar_shards(folder, num_shards, per_shard, sample_fields)


def stream(data_path, max_steps=5, **data_kwargs):
    data_args = DataArguments(data_path=str(data_path), **data_kwargs)
    training_args = OmniFusionTrainingArguments(output_dir="unused", max_steps=max_steps, report_to="none")
    return load_streaming_dataset(data_args, make_processor(end_assistant_turns_with_eos=True), training_args)


# --------------------------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------------------------


def test_brace_patterns_and_folders_expand_to_shards(tmp_path):
    shards = write_shards(tmp_path, 3, 1)
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == [str(path) for path in shards]
    assert expand_shards(str(tmp_path)) == [str(path) for path in shards]
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards not found, for example .*00003.tar"):
        expand_shards(str(tmp_path / "{00000..00003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder without any .tar shard"):
        expand_shards(str(tmp_path / "empty"))


def test_streamed_captions_become_conversations_bad_ones_counted(tmp_path, caplog):
    """Streamed captions become caption conversations and bad samples are skipped and counted."""
    bad = {"000000001": "no-caption", "000000002": "broken-image", "000010000": "no-image", "000010001": "bad-json"}
    write_shards(tmp_path, 2, 4, bad)
    with caplog.at_level(logging.WARNING, logger="omnifusion_training.data"):
        examples = list(stream(tmp_path))
    assert len(examples) == 4  # 8 samples, 4 bad
    assert "Skipped bad sample 000000002 in shard" in caplog.text and "(4 bad so far)" in caplog.text
    assert "cannot read the .png image" in caplog.text and "no caption" in caplog.text
    assert "the .json is not a JSON object" in caplog.text and "no image" in caplog.text
    processor = make_processor(end_assistant_turns_with_eos=True)
    for example in examples:
        assert example["pixel_values"].shape == (1, 3, 32, 32)
        answer = processor.tokenizer.decode(example["labels"][example["labels"] != -100])
        assert re.fullmatch(r"It is (red|blue|green)\.</s>", answer), answer
        assert (example["input_ids"] == processor.image_start_token_id).sum() == 1


def test_too_many_bad_samples_stop_with_an_error_naming_shard_and_key(tmp_path):
    shards = write_shards(tmp_path, 1, 4, {"000000001": "broken-image", "000000003": "no-caption"})
    expected = rf"Shard {shards[0]}, key 000000003: no caption .* more than --max_bad_samples 1"
    with pytest.raises(ValueError, match=expected):
        list(stream(tmp_path, max_bad_samples=1))


def test_streaming_needs_max_steps(tmp_path):
    write_shards(tmp_path, 1, 1)
    with pytest.raises(ValueError, match="give --max_steps"):
        stream(tmp_path, max_steps=-1)


def test_two_processes_stream_disjoint_shards_through_stage1(parts, tmp_path):
    vision, language = parts
    write_shards(tmp_path / "shards", 4, 6, {"000020003": "broken-image"})
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(EXAMPLES_DIR, "train_stage1_pretrain.py"),
        "--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language),
        *training_flags(tmp_path / "out", str(tmp_path / "shards" / "{00000..00003}.tar"), max_steps=3,
                        log_level="info", log_level_replica="info", use_cpu=True, shuffle_buffer_size=4),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    read = {}
    for shard, rank in re.findall(r"Reading shard \S*/(\d{5})\.tar \(process (\d)\)", log):
        read.setdefault(shard, set()).add(rank)
    read = {rank: {shard for shard, ranks in read.items() if rank in ranks} for rank in ("0", "1")}
    assert read["0"] and read["1"] and not read["0"] & read["1"], read
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True)


# --------------------------------------------------------------------------------------------------------------------
# Packing and length grouping
# --------------------------------------------------------------------------------------------------------------------


def mixed_examples(tmp_path):
    records = colour_records(3) + colour_records(2, with_images=False)
    records[1]["conversations"] += [
        {"from": "human", "value": "And how many shapes are there in the whole image, do you think?"},
        {"from": "gpt", "value": "There are two."},
    ]
    dataset = load_training_dataset(
        DataArguments(data_path=str(write_dataset(tmp_path, records))),
        make_processor(end_assistant_turns_with_eos=True),
    )
    return [dataset[index] for index in range(len(dataset))]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batch_gives_the_padded_batchs_loss_and_logits(tmp_path, attn_implementation):
    examples = mixed_examples(tmp_path)
    processor = make_processor()
    torch.manual_seed(0)
    model = OmniFusionForCausalLM(make_config(processor, attn_implementation=attn_implementation, adapter_dropout=0.0))
    padded = OmniFusionDataCollator(processor.tokenizer.pad_token_id)(examples)
    packed = PackedDataCollator()(examples)
    assert packed["input_ids"].shape == (1, sum(len(example["input_ids"]) for example in examples))
    assert packed["input_ids"].shape[1] < padded["input_ids"].numel()  # no padding
    torch.testing.assert_close(packed["pixel_values"], padded["pixel_values"], rtol=0, atol=0)
    model.train()  # as in training (the LMs make a cache in eval and train alike unless use_cache=False)
    padded_out, packed_out = model(**padded), model(**packed)
    assert abs(padded_out.loss.item() - packed_out.loss.item()) < 1e-5
    offset = 0
    for row, example in enumerate(examples):  # attention stays within each conversation
        length = len(example["input_ids"])
        torch.testing.assert_close(
            packed_out.logits[0, offset : offset + length], padded_out.logits[row, :length], rtol=1e-5, atol=1e-5
        )
        offset += length
    packed_out.loss.backward()  # and it trains


def test_group_by_length_uses_the_checked_token_counts(parts, tmp_path):
    vision, language = parts
    records = colour_records(6)
    for index in (1, 4):
        records[index]["conversations"][0]["value"] += " Please look carefully at every corner of the picture."
    data_path = write_dataset(tmp_path / "data", records)
    trainer = stage1.train(
        ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
        + training_flags(tmp_path / "out", data_path, max_steps=1, group_by_length=True)
    )
    dataset = trainer.train_dataset
    lengths = list(dataset.with_format(None)["length"])
    assert lengths == [len(dataset[index]["input_ids"]) for index in range(len(dataset))]
    assert min(lengths[1], lengths[4]) > max(lengths[i] for i in (0, 2, 3, 5)) + 20  # the two long records
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == lengths


def test_stage2_trains_with_packing(parts, tmp_path):
    vision, language = parts
    data_path = write_dataset(tmp_path / "data", colour_records(4) + colour_records(2, with_images=False))
    stage1.train(
        ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
        + training_flags(tmp_path / "stage1", data_path, max_steps=1)
    )
    trainer = stage2.train(
        ["--model_name_or_path", str(tmp_path / "stage1")]
        + training_flags(tmp_path / "out", data_path, max_steps=6, packing=True, per_device_train_batch_size=3,
                         learning_rate=1e-3, lr_scheduler_type="constant")
    )  # fmt: skip
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


# --------------------------------------------------------------------------------------------------------------------
# --check_images
# --------------------------------------------------------------------------------------------------------------------


def test_check_images_none_header_full(tmp_path):
    path = write_dataset(tmp_path, colour_records(3))
    (tmp_path / "images" / "0.png").unlink()
    for mode in ("header", "full"):
        with pytest.raises(FileNotFoundError, match="Record sample-0: image file not found"):
            load_training_dataset(DataArguments(data_path=str(path), check_images=mode), make_processor())
    assert len(load_training_dataset(DataArguments(data_path=str(path), check_images="none"), make_processor())) == 3
    # a JPEG cut short keeps a readable header: the default check reads its data stream too (at 1/8 scale), as a full
    # decode does; only the structure-only check lets it through
    jpeg = io.BytesIO()
    make_image(5, size=64).save(jpeg, format="JPEG")
    (tmp_path / "images" / "0.png").write_bytes(png_bytes(0))
    (tmp_path / "images" / "1.png").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    assert len(load_training_dataset(DataArguments(data_path=str(path), check_images="none"), make_processor())) == 3
    for mode in ("header", "full"):
        with pytest.raises(ValueError, match="Record sample-1: cannot read image"):
            load_training_dataset(DataArguments(data_path=str(path), check_images=mode), make_processor())


def test_fsdp_in_one_process_and_deepspeed_on_cpu_are_refused(parts, tmp_path):
    """Fsdp in one process and deepspeed on cpu are refused with what to use instead."""
    # FSDP on CPU runs with several processes (tests_fsdp/, the CI's fsdp tier); in one there is nothing to shard
    vision, language = parts
    data_path = write_dataset(tmp_path / "data", colour_records(2))
    expected = r"--fsdp shards the model across processes, but this run is one process.*torchrun"
    with pytest.raises(ValueError, match=expected):
        stage1.train(
            ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
            + training_flags(tmp_path / "out", data_path, max_steps=1, use_cpu=True, fsdp="full_shard")
        )
    assert not (tmp_path / "out").exists()
    args = OmniFusionTrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, fsdp="full_shard", fsdp_config={"version": 1}
    )
    with pytest.raises(ValueError, match="--fsdp_config version 1: only FSDP2"):
        check_distributed_arguments(args, launched=2)
    args = OmniFusionTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True)
    args.deepspeed = "examples/configs/deepspeed_zero2.json"  # (parsing it needs deepspeed installed; it is not here)
    with pytest.raises(ValueError, match="--deepspeed examples/configs/deepspeed_zero2.json: DeepSpeed needs GPUs"):
        check_distributed_arguments(args, launched=2)
