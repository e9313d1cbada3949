"""
Training code shared by the two OmniFusion stages (`train_stage1_pretrain.py`, `train_stage2_sft.py`).

Data is a JSON list or a JSONL file of LLaVA-style records, as in LLaVA and the released OmniFusion code:

    {"id": "000042", "image": "coco/000042.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A cup of tea."}]}

`image` (optional) is a path relative to `--image_folder`; the image is shown at the first human turn. LLaVA's
literal `<image>` (and the newline next to it) is removed from the text: where the image goes is decided by the chat
template, never by the text. Any other text is text: a `<user>`, `</s>` or `<s>` typed in a record is trained on as
those characters (the chat template escapes message text), never as a marker or EOS. The records are read with `json` into a `datasets.Dataset` (one JSON string per record,
so that a malformed record reaches validation instead of breaking Arrow's schema inference), checked once up front
(structure, image file present and decodable, tokenized length) and turned into model inputs lazily, per batch, by a
dataset transform: chat template -> token ids -> truncation -> labels, and the image through the image processor.
With `--skip_bad_records`, a record that still fails then (an image damaged after the check) is skipped, counted in
the log, and the next good record takes its place in the batch, so a run never dies hours in on one bad file.

Labels are -100 everywhere except the assistant text, EOS at the end of each assistant turn included, since the
processor is set to `end_assistant_turns_with_eos=True` so that trained models stop by themselves. A sequence longer
than `--model_max_length` is cut; a cut that would land inside an image block (`<image_start>` ... `<image_end>`)
is moved to before `<image_start>` and that image is dropped. A record with no answer token left after the cut is
left out of training, and how many were is logged.
"""

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from huggingface_hub import ModelCard, is_offline_mode, try_to_load_from_cache
from transformers.trainer import TRAINING_ARGS_NAME
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainingArguments,
)

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.conversion.convert_omnifusion_to_hf import vision_state_at_input_size
from modeling_omnifusion.processing.processing_omnifusion import image_processor_output_size
from modeling_omnifusion.modeling_omnifusion import build_vision_tower, hub_model_id
from modeling_omnifusion.processing.processing_omnifusion import (
    check_tokenizer_folder,
    rank_merges_by_sentencepiece_scores,
)
from omnifusion_checkpoints import AtomicCheckpointTrainer, check_output_dir, resolve_resume_checkpoint
from omnifusion_fsdp import (
    check_distributed_arguments,
    default_wrap_classes,
    enable_fsdp_on_cpu,
    plain_class,
    use_sharded_adafactor,
)


logger = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant"}
LLAVA_IMAGE_PATTERN = re.compile(r"<image>\n?|\n?<image>")


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "Conversation records: a JSON list or a JSONL file (LLaVA format)."})
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder the records' `image` paths are relative to (default: the data file's folder)."},
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest sequence in tokens, image positions included (released: 2048)."}
    )
    skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "Skip (and count in the log) records with a missing or unreadable image or malformed "
            "conversations, instead of stopping with an error that names the record."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for the one-off check of all records (about 1 ms a record)."}
    )
    check_images: str = field(
        default="header",
        metadata={
            "help": "What the up-front check does with each record's image: 'none' (structure and length only), "
            "'header' (the default: the header and the whole data stream, a JPEG decoded at 1/8 scale, so truncated "
            "files and corrupt pixel data are caught) or 'full' (decode the pixels at full size).",
            "choices": ["none", "header", "full"],
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "Batch records of similar token length together (lengths from the up-front check)."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack each batch's conversations into one unpadded row (position ids restart per one)."},
    )
    max_bad_samples: int = field(
        default=100, metadata={"help": "WebDataset streaming: bad samples skipped per process before stopping."}
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "WebDataset streaming: samples held in the shuffle buffer."}
    )


@dataclass
class OmniFusionTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the released code's optimizer and schedule: Adafactor, cosine, 1% warmup."""

    optim: str = field(default="adafactor", metadata={"help": "Optimizer (released: Adafactor, relative_step=False)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (released: cosine)."})
    warmup_steps: float = field(
        default=0.01, metadata={"help": "Warmup steps, or a fraction of all steps when < 1 (released: 0.01)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the records are turned into model inputs lazily."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the earlier run in a non-empty --output_dir (its checkpoints and model are deleted); "
            "without it such a folder is refused unless this run resumes from a checkpoint in it."
        },
    )


def _check_pretrained_argument(argument: str, value: str):
    """A `--*_name_or_path` value must be a local folder or a Hub id; a missing local path is named at once."""
    if os.path.isdir(value):
        return
    if os.path.exists(value):
        raise ValueError(f"--{argument} {value}: expected a model folder (or a Hub id), found a file.")
    first = value.split("/", 1)[0]
    if hub_model_id(value) is None or ("/" in value and os.path.isdir(first)):
        raise FileNotFoundError(f"--{argument} {value}: no such folder (and not a Hub model id).")
    if is_offline_mode() and not isinstance(try_to_load_from_cache(value, "config.json"), str):
        raise FileNotFoundError(
            f"--{argument} {value}: no such folder, and, offline (HF_HUB_OFFLINE=1), not a Hub model in the local cache."
        )


def check_path_arguments(data_args: DataArguments, **pretrained: str):
    """
    Check the path arguments before anything is loaded, naming a bad one: each `pretrained` argument (name -> value,
    e.g. `language_model_name_or_path`) must be a local folder or a Hub model id (a value written like a local path,
    or whose first folder exists here, must exist), `--data_path` a file and `--image_folder` a folder.
    """
    for argument, value in pretrained.items():
        # several vision encoders are comma-separated (`clip_dir,dinov2_dir`): each is checked
        for part in value.split(",") if argument == "vision_model_name_or_path" else [value]:
            _check_pretrained_argument(argument, part.strip())
    from omnifusion_data import expand_shards, is_webdataset

    if is_webdataset(data_args.data_path):  # WebDataset shards: each must exist (named if not)
        expand_shards(data_args.data_path)
    elif not os.path.isfile(data_args.data_path):
        raise FileNotFoundError(
            f"--data_path {data_args.data_path}: no such file (expected a JSON/JSONL file, a folder of .tar "
            "shards or a shard pattern)."
        )
    if data_args.image_folder is not None and not os.path.isdir(data_args.image_folder):
        raise FileNotFoundError(f"--image_folder {data_args.image_folder}: no such folder.")


def setup_run(training_args: TrainingArguments):
    """Logging, a check that all launched processes train together, and the seed (before any model is built)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if training_args.world_size != launched:
        raise ValueError(
            f"Launched as {launched} processes, but each would train alone (the Trainer's world size is "
            f"{training_args.world_size}). On CPU, add --use_cpu so that they train together over gloo."
        )
    check_distributed_arguments(training_args, launched)  # --fsdp in one process, DeepSpeed on CPU, ...
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    logging.getLogger("omnifusion_fsdp").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.set_seed(training_args.seed)


# --------------------------------------------------------------------------------------------------------------------
# Data
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


def record_to_messages(name: str, record_json: str) -> tuple[list[dict], str | None]:
    """Chat messages (processor format) and the image path of one record; `ValueError` naming the record if it is
    malformed."""
    try:
        record = json.loads(record_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"Record {name}: not valid JSON ({error}).") from None
    if not isinstance(record, dict):
        raise ValueError(f"Record {name}: expected a JSON object, got {type(record).__name__}.")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"Record {name}: 'conversations' must be a non-empty list of turns, got {conversations!r:.50}")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"Record {name}: 'image' must be a path string, got {image!r:.80}.")

    messages = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            found = turn.get("from") if isinstance(turn, dict) else turn
            raise ValueError(f"Record {name}: turn {index} needs 'from': 'human' or 'gpt', got {found!r:.80}.")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"Record {name}: turn {index} needs a string 'value', got {value!r:.80}.")
        text = LLAVA_IMAGE_PATTERN.sub("", value)
        messages.append({"role": ROLES[turn["from"]], "content": [{"type": "text", "text": text}]})
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"Record {name}: the conversation has no 'gpt' turn, so nothing to learn from.")
    if image is not None:
        first_user = next((message for message in messages if message["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"Record {name}: has an image but no 'human' turn to show it at.")
        first_user["content"].insert(0, {"type": "image"})
    return messages, image


def assistant_labels(input_ids: torch.LongTensor, processor: OmniFusionProcessor) -> torch.LongTensor:
    """
    `input_ids` (`[..., seq]`) with -100 everywhere except assistant text: a token is a target iff the most recent
    `<user>`/`<assistant>`/`<image_start>` marker before it is `<assistant>` and it is not itself a special token.
    """
    special = torch.tensor(list(processor.special_token_ids.values()))
    boundaries = torch.tensor([processor.user_token_id, processor.assistant_token_id, processor.image_start_token_id])
    positions = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
    last_boundary = torch.where(torch.isin(input_ids, boundaries), positions, -1).cummax(-1).values
    last_marker = input_ids.gather(-1, last_boundary.clamp(min=0))
    in_answer = (last_boundary >= 0) & (last_marker == processor.assistant_token_id)
    return input_ids.masked_fill(~in_answer | torch.isin(input_ids, special), -100)


def truncate(input_ids: torch.LongTensor, max_length: int, processor: OmniFusionProcessor) -> torch.LongTensor:
    """The first `max_length` ids of a 1-D sequence, cut earlier if needed so that no image block is split."""
    if input_ids.shape[0] <= max_length:
        return input_ids
    head = input_ids[:max_length]
    starts = (head == processor.image_start_token_id).nonzero().flatten()
    if len(starts) > int((head == processor.image_end_token_id).sum()):
        return input_ids[: int(starts[-1])]
    return head


class ConversationEncoder:
    """
    Turns stored records into model inputs. Called on a batch of rows it is the dataset transform; `check` runs
    every step except decoding the pixels, for the up-front validation.
    """

    check_images = "header"  # what `check` does with the image: "none", "header" or "full" (decode)

    def __init__(
        self, processor: OmniFusionProcessor, image_folder: str, max_length: int, skip_bad_records: bool = False
    ):
        self.processor = processor
        self.image_folder = image_folder
        self.max_length = max_length
        self.skip_bad_records = skip_bad_records
        self.records: datasets.Dataset | None = None  # the checked rows, where a skipped record's stand-in comes from
        self.skipped: list[str] = []  # records skipped at run time (in this process)

    def tokenize(self, messages: list[dict], image_size: tuple[int, int] | None = None) -> torch.LongTensor:
        """Token ids exactly as `processor(images=..., text=chat)` gives them, without decoding any image (with
        tiles the image block's length depends on the image's `(height, width)`, read from its header)."""
        processor = self.processor
        chat = processor.apply_chat_template(messages, tokenize=False)
        num_images = sum(item["type"] == "image" for message in messages for item in message["content"])
        num_views = processor.num_image_views(*image_size) if image_size is not None else 1
        blocks = [processor.image_block(num_views) for _ in range(num_images)]
        (text,), _ = processor.get_text_with_replacements([chat], images_replacements=blocks)
        input_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return truncate(torch.tensor(input_ids, dtype=torch.long), self.max_length, processor)

    def tokenize_record(
        self, name: str, messages: list[dict], image_size: tuple[int, int] | None = None
    ) -> torch.LongTensor:
        """`tokenize`, with what the processor refuses (e.g. a lone surrogate in the text) named by the record."""
        try:
            return self.tokenize(messages, image_size)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Record {name}: {error}") from error

    def read_image(self, name: str, image: str, decode: bool = True) -> Image.Image | None:
        """
        The record's image, decoded in its own mode (`decode=False`: only check that it decodes, a JPEG at 1/8 scale,
        which still reads its whole data stream: a truncated file or corrupt pixel data fails here, as in training).
        """
        path = os.path.join(self.image_folder, image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Record {name}: image file not found: {path}")
        try:
            with Image.open(path) as file:
                if not decode:
                    file.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, in its own mode
                    file.load()
                    return None
                file.load()
                return file
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on bad files
            raise ValueError(f"Record {name}: cannot read image {path} ({type(error).__name__}: {error}).") from error

    def image_size(self, name: str, image: str | None) -> tuple[int, int] | None:
        """`(height, width)` of the record's image when the processor tiles (its block length depends on it)."""
        if image is None or self.processor.image_grid_pinpoints is None:
            return None
        path = os.path.join(self.image_folder, image)
        try:
            with Image.open(path) as file:
                width, height = file.size
        except Exception as error:
            raise ValueError(f"Record {name}: cannot read image {path} ({type(error).__name__}: {error}).") from error
        return height, width

    def check(self, row: dict) -> dict:
        """`error` (message, empty if fine), `error_type` and `has_answer` for one stored row."""
        try:
            messages, image = record_to_messages(row["name"], row["record"])
            if image is not None and self.check_images != "none":
                self.read_image(row["name"], image, decode=self.check_images == "full")
            image_size = self.image_size(row["name"], image)
            input_ids = self.tokenize_record(row["name"], messages, image_size)
            labels = assistant_labels(input_ids, self.processor)
        except (FileNotFoundError, ValueError) as error:
            return {"error": str(error), "error_type": type(error).__name__, "has_answer": False, "length": 0}
        return {"error": "", "error_type": "", "has_answer": bool((labels != -100).any()), "length": len(input_ids)}

    def encode(self, name: str, record: str) -> dict:
        messages, image = record_to_messages(name, record)
        input_ids = self.tokenize_record(name, messages, self.image_size(name, image))
        pixel_values = None
        if image is not None and (input_ids == self.processor.image_end_token_id).any():
            try:
                image_inputs = self.processor.prepare_images([self.read_image(name, image)], return_tensors="pt")
            except (TypeError, ValueError) as error:
                raise ValueError(f"Record {name}: image {os.path.join(self.image_folder, image)}: {error}") from error
            pixel_values = image_inputs["pixel_values"]
        return {
            "input_ids": input_ids,
            "labels": assistant_labels(input_ids, self.processor),
            "pixel_values": pixel_values,
        }

    def encode_or_skip(self, position: int, name: str, record: str) -> dict:
        """
        `encode`; under `skip_bad_records`, a record that fails is skipped and counted, and the next record of
        `self.records` that encodes (from `position` on) takes its place, so that the batch keeps its size.
        """
        for offset in range(len(self.records) if self.skip_bad_records and self.records is not None else 1):
            if offset:
                row = self.records[(position + offset) % len(self.records)]
                name, record = row["name"], row["record"]
            try:
                return self.encode(name, record)
            except (FileNotFoundError, ValueError, OSError) as error:
                if not self.skip_bad_records or self.records is None:
                    raise
                self.skipped.append(name)
                logger.warning(
                    "Skipped record %s during training (%s); %d skipped so far, the next record takes its place.",
                    name,
                    error,
                    len(self.skipped),
                )
        raise ValueError(f"No record of {len(self.records)} could be read during training (see the log).")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        positions = batch.get("position", [0] * len(batch["name"]))
        examples = [self.encode_or_skip(*row) for row in zip(positions, batch["name"], batch["record"])]
        return {key: [example[key] for example in examples] for key in ("input_ids", "labels", "pixel_values")}


def load_training_dataset(data_args: DataArguments, processor: OmniFusionProcessor) -> datasets.Dataset:
    """The checked records of `data_args.data_path`, turned into model inputs lazily by a `ConversationEncoder`."""
    image_folder = data_args.image_folder or os.path.dirname(os.path.abspath(data_args.data_path))
    encoder = ConversationEncoder(processor, image_folder, data_args.model_max_length, data_args.skip_bad_records)
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
            data_args.model_max_length,
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


@dataclass
class OmniFusionDataCollator:
    """Pads `input_ids` (with `pad_token_id`), `labels` (with -100) and `attention_mask` on the right; stacks images."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = [example["input_ids"] for example in examples]
        batch = {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence(
                [torch.ones_like(ids) for ids in input_ids], batch_first=True, padding_value=0
            ),
            "labels": pad_sequence([example["labels"] for example in examples], batch_first=True, padding_value=-100),
        }
        images = [example["pixel_values"] for example in examples if example["pixel_values"] is not None]
        if images:
            batch["pixel_values"] = torch.cat(images)
        return batch


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def load_vision_tower(name_or_path: str) -> nn.Module:
    """A pretrained vision encoder in float32; for a full CLIP/SigLIP checkpoint, only its vision model."""
    config = AutoConfig.from_pretrained(name_or_path)
    return AutoModel.from_pretrained(name_or_path, config=getattr(config, "vision_config", config), dtype=torch.float32)


def parse_vision_models(value: str) -> list[str]:
    """`--vision_model_name_or_path`: one folder/Hub id, or several comma-separated (`clip_dir,dinov2_dir`)."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--vision_model_name_or_path names no vision model: {value!r}")
    return names


def parse_grid_pinpoints(value: str | None) -> list[list[int]] | None:
    """`--image_grid_pinpoints` as JSON, e.g. '[[672, 336], [336, 672], [672, 672]]' (None: no tiles)."""
    if value is None or value.strip().lower() in ("", "none", "null"):
        return None
    try:
        pinpoints = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"--image_grid_pinpoints must be JSON like '[[672, 336], [672, 672]]', got {value!r}") from exc
    if not isinstance(pinpoints, list):
        raise ValueError(f"--image_grid_pinpoints must be a JSON list of [height, width] pairs, got {value!r}")
    return pinpoints


def load_vision_towers(
    names: list[str], one_input_size: bool, image_processors: list | None = None
) -> tuple[list, list, list[dict]]:
    """
    The pretrained encoders, their image processors (`image_processors`, default: each folder's own) and their
    weights. With several encoders and tiles every processor outputs the first's size (tiles are one size); DINOv2's
    position table is then interpolated to its processor's size with its own code (`vision_state_at_input_size`), as
    DINOv2 does at run time.
    """
    towers = [load_vision_tower(name) for name in names]
    if image_processors is None:
        image_processors = [AutoImageProcessor.from_pretrained(name) for name in names]
    if len(names) == 1:
        return [towers[0].config], image_processors, [towers[0].state_dict()]
    if one_input_size:
        size = image_processor_output_size(image_processors[0])
        for image_processor in image_processors[1:]:
            image_processor.size = {"shortest_edge": size}
            image_processor.crop_size = {"height": size, "width": size}
    configs, states = [], []
    for tower, image_processor in zip(towers, image_processors):
        size = image_processor_output_size(image_processor)
        states.append(vision_state_at_input_size(tower, size))
        configs.append(type(tower.config).from_dict({**tower.config.to_dict(), "image_size": size}))
    return configs, image_processors, states


def build_model_from_pretrained_parts(
    vision_model_name_or_path: str, language_model_name_or_path: str, **config_kwargs
) -> tuple[OmniFusionForCausalLM, OmniFusionProcessor]:
    """
    A new OmniFusion around pretrained vision encoder(s) (comma-separated for several) and a pretrained decoder LM
    (whose tokenizer it takes), with a freshly initialised adapter and markers, and its processor. `config_kwargs`
    go to `OmniFusionConfig` (`adapter_type`, `image_grid_pinpoints`, ...). All of it is float32 (the Trainer's
    `--bf16`/`--fp16` run autocast over float32 weights), whatever dtype the parts were saved in: loading a bfloat16
    LM as saved would give a model of mixed dtypes.
    """
    sentencepiece_model = check_tokenizer_folder(language_model_name_or_path)
    names = parse_vision_models(vision_model_name_or_path)
    vision_configs, image_processors, vision_states = load_vision_towers(
        names, one_input_size=config_kwargs.get("image_grid_pinpoints") is not None
    )
    language_model = AutoModelForCausalLM.from_pretrained(language_model_name_or_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(language_model_name_or_path)
    if sentencepiece_model is not None:
        rank_merges_by_sentencepiece_scores(tokenizer, sentencepiece_model)
    processor = OmniFusionProcessor(
        image_processors[0],
        tokenizer,
        end_assistant_turns_with_eos=True,
        extra_encoder_preprocessors=image_processors[1:],
    )
    config = OmniFusionConfig(
        vision_config=vision_configs if len(names) > 1 else vision_configs[0],
        text_config=language_model.config,
        **processor.special_token_ids,
        **config_kwargs,
    )
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    # What the saved folder names as its base models: the Hub ids, never a local path.
    for vision, name in zip(config.vision_configs, names):
        vision._name_or_path = hub_model_id(name) or ""
    config.text_config._name_or_path = hub_model_id(language_model_name_or_path) or ""

    model = OmniFusionForCausalLM(config)
    towers = model.model.vision_tower if len(names) > 1 else [model.model.vision_tower]
    for tower, state in zip(towers, vision_states):
        tower.load_state_dict(state)
    missing, unexpected = model.model.language_model.load_state_dict(
        language_model.base_model.state_dict(), strict=False
    )
    if missing != ["embed_tokens.special_embeddings.weight"] or unexpected:
        raise ValueError(
            f"The language model's weights do not fit OmniFusion's: missing {missing}, unexpected {unexpected}."
        )
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.generation_config = language_model.generation_config
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


# What the adapter and the number of image positions depend on, per encoder: a replacement must agree on all of them.
ENCODER_FIELDS_THE_ADAPTER_READS = (
    "model_type", "hidden_size", "num_hidden_layers", "image_size", "patch_size", "num_register_tokens"
)


def _own_image_processor(name_or_path: str):
    """The image processor a vision encoder folder/Hub id ships, or None if it has none."""
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except OSError:  # no preprocessor_config.json (nor processor_config.json) there
        return None


def load_replacement_vision_towers(
    config: OmniFusionConfig,
    processor: OmniFusionProcessor,
    vision_model_name_or_path: str,
    model_name_or_path: str,
    flag: str = "--vision_model_name_or_path",
) -> tuple[list, list, list[dict]]:
    """
    Stage 2's `--vision_model_name_or_path`: pretrained encoders (comma-separated, as in stage 1) to put in place of
    the towers of a model whose adapter was trained on `config`'s encoders. Returns their configs, image processors
    and weights (`install_vision_towers` puts them in). Each encoder comes at the size the model runs it at, exactly as
    stage 1 builds it (`load_vision_towers`: with several encoders of one size, every image processor outputs the
    first's and DINOv2's position table is interpolated). The image processor is the folder's own (it defines the
    encoder's resizing and normalisation), or, for a folder without one, `processor`'s for that encoder.

    A `ValueError` naming `flag`, the encoder index, the folder and the field unless there are as many encoders as
    the adapter reads and each agrees with the one it replaces on everything the adapter and the number of image
    positions depend on (`ENCODER_FIELDS_THE_ADAPTER_READS`, and its image processor's output size).
    """
    names = parse_vision_models(vision_model_name_or_path)
    expected = config.vision_configs
    if len(names) != len(expected):
        raise ValueError(
            f"{flag} {vision_model_name_or_path}: {len(names)} vision encoder(s), but the adapter of "
            f"{model_name_or_path} was trained on {len(expected)} ({', '.join(v.model_type for v in expected)}); "
            "give one folder or Hub id per encoder, comma-separated, in the same order."
        )

    def check(index: int, name: str, found: dict, wanted: dict):
        mismatch = [(field, found[field], wanted[field]) for field in wanted if found[field] != wanted[field]]
        if mismatch:
            field, value, trained = mismatch[0]
            raise ValueError(
                f"{flag}: encoder {index} ({name}) does not match the one the adapter of {model_name_or_path} was "
                f"trained on: {field} is {value!r} in {name} but {trained!r} in {model_name_or_path}"
                + "".join(f"; {f} {v!r} vs {t!r}" for f, v, t in mismatch[1:])
            )

    def fields(vision_config, names) -> dict:
        return {field: getattr(vision_config, field, None) for field in names}

    # The architecture first, before any weight loads. The size a DINOv2 runs at is settled with its image
    # processor below (its position table is interpolated, as in stage 1); any other encoder has one size.
    for index, (name, wanted) in enumerate(zip(names, expected)):
        found = AutoConfig.from_pretrained(name)
        found = getattr(found, "vision_config", found)
        architecture = [
            field for field in ENCODER_FIELDS_THE_ADAPTER_READS if field != "image_size" or found.model_type != "dinov2"
        ]
        check(index, name, fields(found, architecture), fields(wanted, architecture))
    image_processors = [
        _own_image_processor(name) or current for name, current in zip(names, processor.image_processors)
    ]
    one_input_size = len(names) > 1 and len({vision.image_size for vision in expected}) == 1
    try:
        configs, image_processors, states = load_vision_towers(names, one_input_size, image_processors)
    except ValueError as error:  # an encoder that cannot run at the size its processor outputs
        raise ValueError(f"{flag} {vision_model_name_or_path}: {error}") from None
    for index, (name, found, wanted, image_processor) in enumerate(zip(names, configs, expected, image_processors)):
        size = "image processor output size"
        check(
            index,
            name,
            {"image_size": found.image_size, size: image_processor_output_size(image_processor)},
            {"image_size": wanted.image_size, size: wanted.image_size},
        )
        found._name_or_path = hub_model_id(name) or ""
    return configs, image_processors, states


def install_vision_towers(model: OmniFusionForCausalLM, configs: list, states: list[dict]):
    """Replace `model`'s vision towers (modules and configs) by encoders built from `configs` holding `states`, in
    the dtype of the towers they replace."""
    dtype = next(model.model.vision_tower.parameters()).dtype
    model.config.vision_config, *additional = configs
    model.config.additional_vision_configs = additional or None
    vision_tower = build_vision_tower(model.config).to(dtype)  # the model's own layout for one or several encoders
    for tower, state in zip(vision_tower if additional else [vision_tower], states):
        tower.load_state_dict(state)
    model.model.vision_tower = vision_tower.requires_grad_(False)


def set_image_grid_pinpoints(model: OmniFusionForCausalLM, processor: OmniFusionProcessor, pinpoints):
    """Switch tiles on (or change them) for an existing model and its processor; the weights are unchanged."""
    config = model.config
    config.image_grid_pinpoints = pinpoints
    config.check_image_grid_pinpoints()
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)


def train_only(model: nn.Module, modules: list[nn.Module]):
    """Freeze `model` except `modules`, and log what is trained."""
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    log_trainable_parameters(model)


def log_trainable_parameters(model: nn.Module):
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    logger.info("Training %d of %d parameters (%.2f%%).", trainable, total, 100 * trainable / total)


def _without_local_paths(value):
    """`value` with every local path (absolute, or existing here) cut to its last component, recursively."""
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    if isinstance(value, str) and value and (os.path.isabs(value) or os.path.exists(value)):
        return os.path.basename(os.path.normpath(value))
    return value


class OmniFusionTrainer(AtomicCheckpointTrainer):
    """
    A `Trainer` whose checkpoints appear only when complete (`AtomicCheckpointTrainer`) and whose saved folders hold
    no pickle and name no local path: the arguments go to `training_args.json`
    (local paths cut to their last component) instead of the pickled `training_args.bin`, which nothing reads back
    (checkpoints keep the optimizer, scheduler and RNG states `--resume_from_checkpoint` needs), and a PEFT adapter's
    model card names no unknown base model. With `--fsdp` it also runs FSDP2 on CPU and with Adafactor, and saves
    the final model whole whatever the FSDP state dict type (`omnifusion_fsdp.py`).
    """

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:  # accelerate leaves FSDP off on CPU
            enable_fsdp_on_cpu(self)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.is_fsdp_enabled:
            self.optimizer = optimizer = use_sharded_adafactor(optimizer)
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        state_dict_type = str(self.accelerator.state.fsdp_plugin.state_dict_type) if self.is_fsdp_enabled else ""
        sharded = self.is_fsdp_enabled and "FULL_STATE_DICT" not in state_dict_type
        if not sharded or _internal_call:  # checkpoints keep the sharded FSDP state as the Trainer writes it
            return super().save_model(output_dir, _internal_call)
        # the final model: gathered whole from every process, as with FULL_STATE_DICT
        self._save(output_dir if output_dir is not None else self.args.output_dir,
                   state_dict=self.accelerator.get_state_dict(self.model))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        with plain_class(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)):
            super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if os.path.exists(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as file:
            json.dump(_without_local_paths(json.loads(self.args.to_json_string())), file, indent=2, sort_keys=True)
        card_path = os.path.join(output_dir, "README.md")
        if os.path.isfile(card_path):  # PEFT's card names the base model even when it is unknown: as '' and None
            card = ModelCard.load(card_path)
            if "base_model" in card.data.to_dict() and not card.data.base_model:
                card.data.base_model = None
                card.data.tags = [tag for tag in card.data.tags or [] if tag != "base_model:adapter:None"] or None
                card.save(card_path)


def make_trainer(
    model: nn.Module,
    processor: OmniFusionProcessor,
    data_args: DataArguments,
    training_args: TrainingArguments,
) -> OmniFusionTrainer:
    """
    A Trainer over the checked, lazily encoded records (or the streamed WebDataset shards); it saves the processor
    with every checkpoint, writes whole checkpoints only, and knows what to resume from (`--output_dir` is checked
    first: one run per folder).
    """
    from omnifusion_data import PackedDataCollator, is_webdataset, length_grouped, load_streaming_dataset

    resume_checkpoint = resolve_resume_checkpoint(training_args)
    check_output_dir(training_args, resume_checkpoint)
    trainer_class = OmniFusionTrainer
    if is_webdataset(data_args.data_path):
        if data_args.group_by_length:
            raise ValueError("--group_by_length needs the lengths of all records: not with streamed WebDataset shards.")
        train_dataset = load_streaming_dataset(data_args, processor, training_args)
    else:
        train_dataset = load_training_dataset(data_args, processor)
        if data_args.group_by_length:
            trainer_class = length_grouped(OmniFusionTrainer, list(train_dataset.with_format(None)["length"]))
    default_wrap_classes(model, training_args)  # with --fsdp: which layers each get their FSDP unit
    if data_args.packing:
        collator = PackedDataCollator()
    else:
        collator = OmniFusionDataCollator(processor.tokenizer.pad_token_id)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
    )
    trainer.resume_checkpoint = resume_checkpoint
    return trainer
