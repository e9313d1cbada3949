"""
The training data: records of a JSON or JSONL file, or captions streamed from WebDataset shards, and how a batch is
formed from them (padding, packing, length grouping).

JSON/JSONL records (the format is in `conversation.py`) are read with `json` into a `datasets.Dataset` (one JSON
string per record, so that a malformed record reaches validation instead of breaking Arrow's schema inference),
checked once up front (structure, image file present and decodable, tokenized length) and turned into model inputs
lazily, per batch, by a dataset transform (`ConversationEncoder`). With `--skip_bad_records`, a record that still
fails then (an image damaged after the check) is skipped, counted in the log, and the next good record takes its
place in the batch, so a run never dies hours in on one bad file. A record with no answer token left after
truncation is left out of training, and how many were is logged.

WebDataset shards (what `img2dataset` writes): `--data_path` is a folder of `*.tar` files or a brace pattern such as
`shards/{00000..00099}.tar`; each tar holds `key.jpg` (or `.png`/`.webp`/...) next to `key.txt` (the caption) and/or
`key.json` (its `caption` field). For a model with sound a sample may hold a clip instead of (or with) the image:
`key.wav`, `.flac`, `.mp3` or `.ogg`, read with soundfile; its caption (e.g. the transcript) answers a request about
the recording. They are read as a streaming `datasets.IterableDataset` made with
`IterableDataset.from_generator` over the shard list, so that `datasets` and accelerate give every process (and
every dataloader worker) its own shards; nothing but the shuffle buffer (`--shuffle_buffer_size`) is held in
memory. (`datasets`' own `webdataset` builder is not used: its decoders run inside the stream and one malformed
`.json` or non-UTF-8 `.txt` ends it without naming the sample, and it infers the columns from the first five
samples, refusing shards where some sample lacks a caption.) Each caption becomes the same conversation a caption
record of the JSON format gives (an image or clip, a caption request, the caption as the answer). A bad sample (image
or clip missing or unreadable, a clip with NaN samples or too long, caption missing or empty) is skipped and counted
in the log; past `--max_bad_samples` per process, training stops with a `ValueError` naming the shard and the key.

Packing (`--packing`): the collator concatenates a batch's conversations into one row without padding, with
`position_ids` restarting at 0 at each conversation and no `attention_mask`, the convention of transformers'
`DataCollatorWithFlattening`: transformers' masking utilities then build a block-diagonal causal mask for SDPA and
eager attention (and flash-attention reads the boundaries from the position ids), so no token attends across
conversations. That needs `use_cache=False` in the batch: transformers' Llama/Mistral create a cache when
`use_cache` is on, even in training, and then ignore the packed position ids. Images and clips keep their order,
so each lands where it would in the padded batch, and the loss (a mean over the same answer tokens) equals the
padded batch's.

Length grouping (`--group_by_length`): the lengths are the token counts the up-front check computes anyway (no image
is decoded for them), kept as a `length` column and handed to the Trainer's `LengthGroupedSampler`.
"""

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass

import datasets
import torch
from PIL import Image
from transformers.trainer_pt_utils import LengthGroupedSampler

from modeling_omnifusion import OmniFusionProcessor

from .arguments import DataArguments
from .conversation import (
    ConversationEncoder,
    assistant_labels,
    audio_items,
    decode_sound,
    record_to_messages,
    stack_media,
)
from .video_records import video_sample_example

# The names the log lines show: records log as "omnifusion_training", shards as its child; `setup_run` sets the level.
logger = logging.getLogger("omnifusion_training")
stream_logger = logging.getLogger("omnifusion_training.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg")
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What is in the picture?",
    "Write a caption for this image.",
)
AUDIO_CAPTION_PROMPTS = (
    "Transcribe the audio.",
    "What is said in the recording?",
    "Write down what you hear.",
    "What does the speaker say?",
)
BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
DEFAULT_MODEL_MAX_LENGTH = 2048  # the released training code's; `fit_model_max_length` lowers it to the LM's


# --------------------------------------------------------------------------------------------------------------------
# JSON / JSONL records
# --------------------------------------------------------------------------------------------------------------------


def read_records(data_path: str) -> datasets.Dataset:
    """
    One row per record of a JSON list or JSONL file: `name` (its `id`, or `#<index>` without one) and `record`,
    the record as JSON text. A JSONL line that does not parse is kept as it is and reported by validation.
    """
    with open(data_path, encoding="utf-8-sig") as file:  # -sig: a UTF-8 byte order mark is skipped
        text = file.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{data_path}: not a valid JSON list of records ({error}).") from None
        records = [json.dumps(record) for record in data]
    else:
        records = [line for line in text.splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{data_path}: no records (the file is empty); expected a JSON list or JSONL records.")
    names = []
    for index, record in enumerate(records):
        try:
            record_id = json.loads(record).get("id")
        except (json.JSONDecodeError, AttributeError):
            record_id = None
        names.append(str(record_id) if record_id is not None else f"#{index}")
    return datasets.Dataset.from_dict({"name": names, "record": records})


def fit_model_max_length(data_args: DataArguments, config) -> int:
    """
    `--model_max_length` checked against the language model of `config` (its `max_position_embeddings`) before
    anything trains, and set in `data_args`: unset, it is 2048 (as released) or the LM's positions if fewer; more
    positions than the LM has are refused with a `ValueError` (a longer record would stop the run at its batch,
    padded or packed alike).
    """
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    length = data_args.model_max_length
    if length is None:
        length = min(DEFAULT_MODEL_MAX_LENGTH, positions) if positions else DEFAULT_MODEL_MAX_LENGTH
    elif length < 1:
        raise ValueError(f"--model_max_length must be a positive number of tokens, got {length}.")
    elif positions and length > positions:
        raise ValueError(
            f"--model_max_length {length} is longer than the language model takes: its max_position_embeddings is "
            f"{positions}, so the first record longer than that would stop training at its batch. Give "
            f"--model_max_length {positions} or less (longer records are then cut to it), or leave it out."
        )
    data_args.model_max_length = length
    return length


def load_training_dataset(data_args: DataArguments, processor: OmniFusionProcessor) -> datasets.Dataset:
    """The checked records of `data_args.data_path`, turned into model inputs lazily by a `ConversationEncoder`."""
    data_folder = os.path.dirname(os.path.abspath(data_args.data_path))
    max_length = data_args.model_max_length or DEFAULT_MODEL_MAX_LENGTH
    encoder = ConversationEncoder(
        processor,
        data_args.image_folder or data_folder,
        max_length,
        data_args.skip_bad_records,
        audio_folder=data_args.audio_folder or data_folder,
    )
    encoder.check_images = data_args.check_images
    records = read_records(data_args.data_path)
    checks = records.map(
        encoder.check,
        remove_columns=records.column_names,
        num_proc=data_args.preprocessing_num_workers,
        desc="Checking records",
    )
    errors, error_types, has_answer = checks["error"], checks["error_type"], checks["has_answer"]
    bad = [index for index, error in enumerate(errors) if error]
    if bad and not data_args.skip_bad_records:
        error_class = FileNotFoundError if error_types[bad[0]] == "FileNotFoundError" else ValueError
        raise error_class(f"{errors[bad[0]]} ({len(bad)} bad records in all; --skip_bad_records skips them.)")
    if bad:
        logger.warning(
            "Skipped %d bad records of %d in %s, for example: %s",
            len(bad),
            len(records),
            data_args.data_path,
            errors[bad[0]],
        )
    answerless = [index for index, error in enumerate(errors) if not error and not has_answer[index]]
    if answerless:
        logger.warning(
            "Left out %d records with no answer token within model_max_length=%d, for example %s.",
            len(answerless),
            max_length,
            records[answerless[0]]["name"],
        )
    kept = [index for index, error in enumerate(errors) if not error and has_answer[index]]
    if not kept:
        raise ValueError(f"No usable training records in {data_args.data_path}.")
    logger.info("Training on %d records from %s.", len(kept), data_args.data_path)
    records = records.select(kept)
    if data_args.group_by_length:  # the token counts just computed, for `--group_by_length`
        lengths = checks["length"]
        records = records.add_column("length", [lengths[index] for index in kept])
    encoder.records = records.add_column("position", list(range(len(kept))))
    return encoder.records.with_transform(encoder)


# --------------------------------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------------------------------


def is_webdataset(data_path: str) -> bool:
    """Whether `--data_path` names WebDataset shards: a folder, a `.tar` file or a brace pattern."""
    return os.path.isdir(data_path) or data_path.endswith(".tar") or bool(BRACE_RANGE.search(data_path))


def expand_shards(data_path: str) -> list[str]:
    """The shard files of a folder (its `*.tar`, sorted), a single `.tar` or a pattern with `{first..last}` ranges
    (zero padding kept, several ranges allowed); `FileNotFoundError` naming what is missing."""
    if os.path.isdir(data_path):
        shards = sorted(glob.glob(os.path.join(data_path, "*.tar")))
        if not shards:
            raise FileNotFoundError(
                f"--data_path {data_path}: is a folder without any .tar shard in it (expected a JSON or JSONL file, "
                "or WebDataset .tar shards)."
            )
        return shards
    paths = [data_path]
    while BRACE_RANGE.search(paths[0]):
        expanded = []
        for path in paths:
            match = BRACE_RANGE.search(path)
            first, last = match.group(1), match.group(2)
            if int(last) < int(first):
                raise ValueError(f"--data_path {data_path}: empty range {{{first}..{last}}}.")
            width = len(first)
            expanded += [
                path[: match.start()] + f"{n:0{width}d}" + path[match.end() :] for n in range(int(first), int(last) + 1)
            ]
        paths = expanded
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"--data_path {data_path}: {len(missing)} of {len(paths)} shards not found, for example {missing[0]}"
        )
    return paths


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member as WebDataset splits it: the key is everything up to the first dot of the
    file name (folders included), the extension the rest, lower-cased."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, extension = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class TruncatedShardError(ValueError):
    """A shard whose tar archive stops early: its samples up to the cut were read, the rest is lost."""


def iter_shard(shard: str):
    """
    (key, {extension: bytes}) for every sample of one tar shard, in order. A tar that cannot be read is a
    `ValueError` naming the shard; one that stops early (cut inside a member, or no end-of-archive marker after its
    last member: what a partial download or a full disk leaves) is a `TruncatedShardError` naming the shard, the
    byte where it stops and how many samples were read before.
    """
    key, fields, samples, last = None, {}, 0, None
    where = ""
    try:
        with tarfile.open(shard, mode="r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = split_member(member.name)
                if parts is None:
                    continue
                if parts[0] != key and key is not None:
                    samples, last = samples + 1, key
                    yield key, fields
                    fields = {}
                key = parts[0]
                fields[parts[1]] = archive.extractfile(member).read()
            # a complete archive ends with zero blocks; a cut at a member boundary ends the member loop silently
            archive.fileobj.seek(archive.offset)
            end = archive.fileobj.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                where = f"at byte {archive.offset} with no end-of-archive marker"
                raise tarfile.ReadError("unexpected end of data")
    except (tarfile.TarError, OSError, EOFError) as error:
        if isinstance(error, tarfile.ReadError) and "unexpected end of data" in str(error):
            where = where or f"inside the data of sample {key!r}"
            raise TruncatedShardError(
                f"Shard {shard}: truncated ({where}): only {samples} samples were read before the cut"
                + (f" (the last one {last!r})" if last is not None else "")
                + (f", sample {key!r} at the cut is left out" if key is not None else "")
                + " and the rest of the shard is lost (re-create or re-download it)."
            ) from error
        raise ValueError(f"Shard {shard}: not a readable tar archive after key {key!r} ({error}).") from error
    if key is not None:
        yield key, fields


def sample_caption(fields: dict[str, bytes]) -> str:
    """The caption of a sample: its `.txt`, else the `caption` of its `.json`; `ValueError` if there is none."""
    if "txt" in fields:
        try:
            caption = fields["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise ValueError(f"the .txt caption is not UTF-8 ({error})") from None
    elif "json" in fields:
        try:
            caption = json.loads(fields["json"]).get("caption")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise ValueError(f"the .json is not a JSON object ({error})") from None
        caption = caption.strip() if isinstance(caption, str) else ""
    else:
        raise ValueError("no caption (.txt or .json)")
    if not caption:
        raise ValueError("the caption is empty")
    return caption


def sample_image(fields: dict[str, bytes]) -> Image.Image:
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in fields), None)
    if extension is None:
        raise ValueError(f"no image (one of .{', .'.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(fields[extension])) as file:
            return file.convert("RGB")
    except Exception as error:  # PIL raises many types on bad files
        raise ValueError(f"cannot read the .{extension} image ({type(error).__name__}: {error})") from None


def caption_conversation(key: str, caption: str, image: bool = True, audio: bool = False) -> str:
    """The record (JSON text) a caption becomes: the same shape as a stage-1 caption record of the JSON format, with
    an image, a clip or both (an image caption request then)."""
    prompts = CAPTION_PROMPTS if image else AUDIO_CAPTION_PROMPTS
    prompt = prompts[int(hashlib.md5(key.encode()).hexdigest(), 16) % len(prompts)]
    record = {"id": key} | ({"image": key} if image else {}) | ({"audio": key} if audio else {})
    placeholders = ("<image>\n" if image else "") + ("<audio>\n" if audio else "")
    record["conversations"] = [{"from": "human", "value": placeholders + prompt}, {"from": "gpt", "value": caption}]
    return json.dumps(record)


def sample_example(key: str, fields: dict[str, bytes], encoder: ConversationEncoder) -> dict:
    """
    The model inputs of one sample: its caption (`sample_caption`) as the answer to a caption request about its image
    and, for a model with sound, its clip (`.wav`, `.flac`, `.mp3`, `.ogg`), for a model with video about its `.mp4`
    (`video_sample_example`); a `ValueError` saying what is wrong.
    """
    caption = sample_caption(fields)
    if encoder.with_video and "mp4" in fields:
        return video_sample_example(key, caption, fields["mp4"], encoder)
    audio = next((ext for ext in AUDIO_EXTENSIONS if ext in fields), None) if encoder.with_audio else None
    has_image = any(ext in fields for ext in IMAGE_EXTENSIONS)
    if encoder.with_audio and not has_image and audio is None:
        raise ValueError(f"no image or clip (one of .{', .'.join(IMAGE_EXTENSIONS + AUDIO_EXTENSIONS)})")
    image = sample_image(fields) if has_image or audio is None else None  # no image, no clip: `sample_image` says so
    has_image = image is not None
    messages, _ = record_to_messages(
        key, caption_conversation(key, caption, has_image, audio is not None), encoder.with_audio
    )
    waveforms = []
    if audio is not None:
        (item,) = audio_items(messages)
        del item["path"]
        item["audio"] = decode_sound(io.BytesIO(fields[audio]), encoder.processor, f"the .{audio} clip")
        waveforms.append(item["audio"])
    tiled = getattr(encoder.processor, "image_grid_pinpoints", None) is not None
    input_ids = encoder.tokenize_record(key, messages, (image.height, image.width) if tiled and image else None)
    pixel_values = None
    if image is not None and (input_ids == encoder.processor.image_end_token_id).any():
        try:
            pixel_values = encoder.processor.prepare_images([image], return_tensors="pt")["pixel_values"]
        except TypeError as error:
            raise ValueError(str(error)) from None
    labels = assistant_labels(input_ids, encoder.processor)
    example = {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}
    return example | encoder.audio_features(input_ids, waveforms)


class BadSampleCount:
    """The bad samples (and truncated shards) met so far by one process (or dataloader worker): `datasets` calls the
    generator once per shard, with the same object. `skip_truncated` (`--skip_bad_records`): a truncated shard's
    samples up to the cut are used and the shard is counted, instead of stopping the run."""

    def __init__(self, limit: int, skip_truncated: bool = False):
        self.limit = limit
        self.count = 0
        self.skip_truncated = skip_truncated
        self.truncated_shards = 0


def generate_examples(shards: list[str], encoder: ConversationEncoder, bad_samples: BadSampleCount):
    """Model inputs of every good sample of `shards` (this process's and worker's share); bad ones skipped and
    counted, with a `ValueError` naming the shard and key once more than `bad_samples.limit` were bad. A truncated
    shard (`iter_shard`) stops the run with its `TruncatedShardError`, or with `bad_samples.skip_truncated` is
    logged as a warning naming it and how much of it was read, and counted."""
    for shard in shards:
        stream_logger.info("Reading shard %s (process %s)", shard, os.environ.get("RANK", "0"))
        try:
            yield from shard_examples(shard, encoder, bad_samples)
        except TruncatedShardError as error:
            if not bad_samples.skip_truncated:
                raise ValueError(f"{error} --skip_bad_records trains on the part that was read.") from None
            bad_samples.truncated_shards += 1
            stream_logger.warning(
                "%s Its samples up to the cut were used (--skip_bad_records); %d truncated shards so far.",
                error,
                bad_samples.truncated_shards,
            )


def shard_examples(shard: str, encoder: ConversationEncoder, bad_samples: BadSampleCount):
    """`generate_examples` for one shard."""
    for key, fields in iter_shard(shard):
        try:
            example = sample_example(key, fields, encoder)
        except ValueError as error:
            bad_samples.count += 1
            bad = bad_samples.count
            stream_logger.warning("Skipped bad sample %s in shard %s: %s (%d bad so far)", key, shard, error, bad)
            if bad > bad_samples.limit:
                raise ValueError(
                    f"Shard {shard}, key {key}: {error}. That is {bad} bad samples in this process, more than "
                    f"--max_bad_samples {bad_samples.limit}: stopping."
                ) from None
            continue
        if not (example["labels"] != -100).any():
            stream_logger.warning("Skipped sample %s in shard %s: no caption token within model_max_length", key, shard)
            continue
        yield example


def load_streaming_dataset(data_args, processor, training_args) -> datasets.IterableDataset:
    """The shards of `data_args.data_path` as a shuffled streaming dataset of model inputs (see the module doc)."""
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError(
            f"--data_path {data_args.data_path} is streamed (WebDataset shards), so the number of steps cannot be "
            "derived from its length: give --max_steps."
        )
    shards = expand_shards(data_args.data_path)
    world = training_args.world_size
    if world > 1 and len(shards) % world:
        raise ValueError(
            f"--data_path {data_args.data_path}: {len(shards)} shards cannot be shared evenly by {world} processes, "
            "each reading its own; use a multiple of the process count."
        )
    # Every process reads its own shards: accelerate shards a `datasets.IterableDataset` by node when it does not
    # dispatch batches from process 0.
    training_args.accelerator_config.dispatch_batches = False
    encoder = ConversationEncoder(processor, "", data_args.model_max_length or DEFAULT_MODEL_MAX_LENGTH)
    stream = datasets.IterableDataset.from_generator(
        generate_examples,
        gen_kwargs={
            "shards": shards,
            "encoder": encoder,
            "bad_samples": BadSampleCount(data_args.max_bad_samples, data_args.skip_bad_records),
        },
    )
    stream_logger.info("Streaming %d shards from %s.", len(shards), data_args.data_path)
    return stream.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)


# --------------------------------------------------------------------------------------------------------------------
# Length grouping and packing
# --------------------------------------------------------------------------------------------------------------------


def length_grouped(trainer_class: type, lengths: list[int]) -> type:
    """`trainer_class` with the Trainer's `LengthGroupedSampler` over the given `lengths` (the up-front check's token
    counts). The Trainer's own `group_by_length` would read them through the dataset's transform, encoding every
    record and decoding its image just to count its tokens."""

    class LengthGroupedTrainer(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            if train_dataset is not None and train_dataset is not self.train_dataset:
                return super()._get_train_sampler(train_dataset)
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=lengths)

    return LengthGroupedTrainer


@dataclass
class PackedDataCollator:
    """
    All of a batch's conversations in one row, no padding: `input_ids` and `labels` concatenated (the first label of
    each conversation set to -100, so no token learns to predict the next conversation), `position_ids` restarting
    at 0 at each conversation, no `attention_mask` (transformers' flattening convention), images and clips stacked in
    order.
    """

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        labels = []
        for example in examples:
            example_labels = example["labels"].clone()
            example_labels[0] = -100
            labels.append(example_labels)
        batch = {
            "input_ids": torch.cat([example["input_ids"] for example in examples])[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(len(example["input_ids"])) for example in examples])[None],
            # transformers derives the block-diagonal mask from packed position ids only without a 2-D mask and
            # without a cache, and its LMs make a cache whenever `use_cache` is on (the config default, also in
            # training): without this, every conversation would attend to the ones before it in the row.
            "use_cache": False,
        }
        return batch | stack_media(examples)
