"""
The command-line arguments the two training stages share: `DataArguments` (the records and how they are read) and
`OmniFusionTrainingArguments` (`TrainingArguments` with the released code's optimizer and schedule as defaults).
Each stage adds its own model arguments and default learning rate and batch size (`stage1.py`, `stage2.py`).
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class DataArguments:
    data_path: str = field(
        metadata={
            "help": "Conversation records: a JSON list or a JSONL file (LLaVA format, with `image` and/or `audio`), "
            "or WebDataset .tar shards (a folder, a .tar or a {00000..00099} pattern)."
        }
    )
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder the records' `image` paths are relative to (default: the data file's folder)."},
    )
    audio_folder: str | None = field(
        default=None,
        metadata={"help": "Folder the records' `audio` paths are relative to (default: the data file's folder)."},
    )
    model_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest sequence in tokens, image and audio positions included (default: 2048 as released, or "
            "the language model's max_position_embeddings if fewer; more than those is refused before training)."
        },
    )
    skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "Skip (and count in the log) records with a missing or unreadable image or audio clip (also NaN, "
            "empty or too long sound) or malformed conversations, instead of stopping with an error that names the "
            "record. WebDataset shards: train on the samples of a truncated shard up to its cut (warned, counted)."
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
