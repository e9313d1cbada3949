"""Training data that would be lost or wasted without a word: truncated and empty WebDataset shards, runs that train
no step, records the conversation format refuses, `--model_max_length` beyond the LM's positions, and a plain LM
folder given to stage 2."""

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from modeling_omnifusion.testing.tiny import make_config, make_image, make_processor
from modeling_omnifusion.testing.training import (
    colour_records,
    save_language_model,
    save_vision_model,
    training_flags,
    write_dataset,
    write_shards,
)
from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.arguments import DataArguments, OmniFusionTrainingArguments
from modeling_omnifusion.training.conversation import record_to_messages
from modeling_omnifusion.training.data import (
    fit_model_max_length,
    iter_shard,
    load_streaming_dataset,
    load_training_dataset,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return save_vision_model(root / "vision"), save_language_model(root / "language")


def caption_shards(folder: Path, num_shards: int = 1, per_shard: int = 8, broken: bool = False) -> list[Path]:
    """Shards of `key.png` + `key.txt` samples (`broken`: every image unreadable)."""

    def fields(shard: int, index: int, key: str) -> dict[str, bytes]:
        buffer = io.BytesIO()
        make_image(index).save(buffer, format="PNG")
        return {"png": b"not a png" if broken else buffer.getvalue(), "txt": f"It is number {index}.".encode()}

    return write_shards(folder, num_shards, per_shard, fields)


def truncate_after(shard: Path, samples: int, extra: int = 0):
    """Cut `shard` right after the members of its first `samples` samples, plus `extra` bytes of what follows (a
    partial download)."""
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    keys = sorted({member.name.split(".")[0] for member in members})
    last = max((member for member in members if member.name.split(".")[0] in keys[:samples]), key=lambda m: m.offset)
    end = last.offset_data + (last.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
    shard.write_bytes(shard.read_bytes()[: end + extra])


def stream(data_path, **data_kwargs):
    data_args = DataArguments(data_path=str(data_path), **data_kwargs)
    training_args = OmniFusionTrainingArguments(output_dir="unused", max_steps=5, report_to="none")
    return load_streaming_dataset(data_args, make_processor(end_assistant_turns_with_eos=True), training_args)


# --------------------------------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, read, cut",
    [(0, 4, 4), (tarfile.BLOCKSIZE + 100, 5, 5)],  # after 5 samples; inside the data of the 6th's first member
    ids=["at-a-sample-boundary", "inside-a-member"],
)
def test_a_truncated_shard_is_an_error_naming_it_and_how_much_was_read(tmp_path, extra, read, cut):
    (shard,) = caption_shards(tmp_path)
    truncate_after(shard, 5, extra)
    message = (
        rf"Shard {shard}: truncated .*only {read} samples were read before the cut "
        rf"\(the last one '00000000{read - 1}'\), sample '00000000{cut}' at the cut is left out"
    )
    with pytest.raises(ValueError, match=message):
        list(iter_shard(str(shard)))
    with pytest.raises(ValueError, match=rf"Shard {shard}: truncated .*--skip_bad_records trains on the part"):
        list(stream(tmp_path))


def test_skip_bad_records_trains_on_a_truncated_shards_part_and_counts_it(tmp_path, caplog):
    shards = caption_shards(tmp_path, num_shards=2)
    truncate_after(shards[0], 5)
    with caplog.at_level(logging.WARNING, logger="omnifusion_training.data"):
        examples = list(stream(tmp_path, skip_bad_records=True))
    assert len(examples) == 4 + 8
    assert f"Shard {shards[0]}: truncated (at byte" in caplog.text and "1 truncated shards so far" in caplog.text


def test_a_complete_shard_and_an_empty_one_read_without_complaint(tmp_path):
    (shard,) = caption_shards(tmp_path, per_shard=3)
    assert [key for key, _ in iter_shard(str(shard))] == ["000000000", "000000001", "000000002"]
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert list(iter_shard(str(tmp_path / "empty.tar"))) == []


@pytest.mark.parametrize("data", ["empty-shard", "every-sample-bad"])
def test_a_run_that_consumes_no_sample_fails_and_writes_nothing(parts, tmp_path, data):
    vision, language = parts
    shards = tmp_path / "shards"
    if data == "empty-shard":
        shards.mkdir()
        with tarfile.open(shards / "00000.tar", "w"):
            pass
    else:
        caption_shards(shards, per_shard=3, broken=True)
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"No training step ran: --data_path {shards} gave no usable sample"):
        stage1.train(
            ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
            + training_flags(output_dir, shards, max_steps=2, max_bad_samples=10)
        )
    assert not output_dir.exists()


# --------------------------------------------------------------------------------------------------------------------
# JSON records
# --------------------------------------------------------------------------------------------------------------------


REFUSED_RECORDS = {
    "answer-first": (
        {"image": "a.png", "conversations": [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "<image>"}]},
        "turn 0 is a 'gpt' turn; a conversation starts with a 'human' turn",
    ),
    "image-placeholder-without-image": (
        {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."}]},
        "turn 0 has <image> but the record has no 'image' field",
    ),
}


@pytest.mark.parametrize("with_audio", [False, True])
@pytest.mark.parametrize("case", sorted(REFUSED_RECORDS))
def test_records_that_would_train_on_nothing_real_are_refused_naming_them(case, with_audio):
    record, message = REFUSED_RECORDS[case]
    with pytest.raises(ValueError, match=f"Record {case}: {message}"):
        record_to_messages(case, json.dumps(record), with_audio)


def test_skip_bad_records_counts_them_with_the_others(tmp_path, caplog):
    records = colour_records(3) + [dict(record, id=case) for case, (record, _) in sorted(REFUSED_RECORDS.items())]
    path = write_dataset(tmp_path, records)
    data_args = DataArguments(data_path=str(path), skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="omnifusion_training"):
        dataset = load_training_dataset(data_args, make_processor(end_assistant_turns_with_eos=True))
    assert len(dataset) == 3
    assert f"Skipped 2 bad records of 5 in {path}, for example: Record answer-first: turn 0" in caplog.text


# --------------------------------------------------------------------------------------------------------------------
# --model_max_length and the LM's positions
# --------------------------------------------------------------------------------------------------------------------


def test_model_max_length_defaults_to_what_the_lm_takes_and_more_is_refused():
    config = make_config(make_processor())
    positions = config.text_config.max_position_embeddings
    unset = DataArguments(data_path="unused")
    assert fit_model_max_length(unset, config) == min(2048, positions) == unset.model_max_length
    assert fit_model_max_length(DataArguments(data_path="unused", model_max_length=100), config) == 100
    with pytest.raises(ValueError, match=f"--model_max_length {positions + 1} is longer .* max_position_embeddings"):
        fit_model_max_length(DataArguments(data_path="unused", model_max_length=positions + 1), config)


@pytest.mark.parametrize("packing", [False, True])
def test_a_model_max_length_beyond_the_lms_positions_is_refused_before_step_1(parts, tmp_path, packing):
    vision, language = parts
    data_path = write_dataset(tmp_path / "data", colour_records(2))
    with pytest.raises(ValueError, match="--model_max_length 100000 is longer than the language model takes"):
        stage1.train(
            ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
            + training_flags(tmp_path / "out", data_path, model_max_length=100000, packing=packing or None)
        )
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# Stage 2 from a folder that is not OmniFusion
# --------------------------------------------------------------------------------------------------------------------


def test_stage2_refuses_a_plain_language_model_folder_before_loading_it(parts, tmp_path, monkeypatch):
    _, language = parts
    data_path = write_dataset(tmp_path / "data", colour_records(2))
    loaded = []
    monkeypatch.setattr(stage2.OmniFusionForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match=rf"--model_name_or_path {language}: is a 'mistral' model .*not an OmniFusion"):
        stage2.train(["--model_name_or_path", str(language)] + training_flags(tmp_path / "out", data_path))
    assert not loaded and not (tmp_path / "out").exists()
