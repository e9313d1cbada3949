"""
A training run of either stage: its checks before anything loads (`check_path_arguments`, `setup_run`), the
`OmniFusionTrainer` and `make_trainer`, which puts the data, the collator and the checkpointing together.

`OmniFusionTrainer`'s checkpoints appear only when complete (`checkpoints.py`), its saved folders hold no pickle and
name no local path, and with `--fsdp` it runs FSDP2 on GPUs and on CPU (`fsdp.py`).
"""

import json
import logging
import os
import shutil
import sys

import datasets
import transformers
from huggingface_hub import ModelCard
from torch import nn
from transformers import PretrainedConfig, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from modeling_omnifusion import OmniFusionConfig, OmniFusionProcessor
from modeling_omnifusion.hub_omnifusion import is_hub_repo_id, missing_offline

from .arguments import DataArguments
from .checkpoints import AtomicCheckpointTrainer, check_output_dir, resolve_resume_checkpoint
from .conversation import OmniFusionDataCollator
from .data import (
    PackedDataCollator,
    expand_shards,
    fit_model_max_length,
    is_webdataset,
    length_grouped,
    load_streaming_dataset,
    load_training_dataset,
)
from .fsdp import (
    check_distributed_arguments,
    default_wrap_classes,
    enable_fsdp_on_cpu,
    plain_class,
    use_sharded_adafactor,
)

logger = logging.getLogger("omnifusion_training")  # the name the log lines show; `setup_run` sets its level


def _check_pretrained_argument(argument: str, value: str):
    """A `--*_name_or_path` value must be a local folder or a Hub id; a missing local path is named at once."""
    if os.path.isdir(value):
        return
    if os.path.exists(value):
        raise ValueError(f"--{argument} {value}: expected a model folder (or a Hub id), found a file.")
    if not is_hub_repo_id(value):
        raise FileNotFoundError(f"--{argument} {value}: no such folder (and not a Hub model id).")
    if missing_offline(value):
        raise FileNotFoundError(
            f"--{argument} {value}: no such folder, and, offline (HF_HUB_OFFLINE=1), not a Hub model in the local "
            "cache."
        )


def check_omnifusion_folder(argument: str, value: str, purpose: str):
    """
    `--<argument> <value>` must be an OmniFusion folder (or Hub id): its `config.json` is read, no weight, and any
    other `model_type` (a plain language model such as the quickstart's `language-model` folder, a CLIP, ...) is a
    `ValueError` saying what the folder is and where an OmniFusion folder comes from. `purpose`: what needs it.
    """
    try:
        config, _ = PretrainedConfig.get_config_dict(value)
    except OSError as error:
        raise FileNotFoundError(f"--{argument} {value}: no readable config.json ({error}).") from None
    model_type = config.get("model_type")
    if model_type != OmniFusionConfig.model_type:
        raise ValueError(
            f"--{argument} {value}: is a {model_type!r} model (config.json model_type), not an OmniFusion folder. "
            f"{purpose} needs an OmniFusion folder: the output of stage 1 (omnifusion-train-stage1 "
            "--vision_model_name_or_path ... --language_model_name_or_path <this folder>) or of the converter "
            "(omnifusion-convert)."
        )


def check_path_arguments(data_args: DataArguments, **pretrained: str):
    """
    Check the path arguments before anything is loaded, naming a bad one: each `pretrained` argument (name -> value,
    e.g. `language_model_name_or_path`) must be a local folder or a Hub model id (a value written like a local path,
    or whose first folder exists here, must exist), `--data_path` a file and `--image_folder`/`--audio_folder` folders.
    """
    for argument, value in pretrained.items():
        # several vision encoders are comma-separated (`clip_dir,dinov2_dir`): each is checked
        for part in value.split(",") if argument == "vision_model_name_or_path" else [value]:
            _check_pretrained_argument(argument, part.strip())
    if is_webdataset(data_args.data_path):  # WebDataset shards: each must exist (named if not)
        expand_shards(data_args.data_path)
    elif not os.path.isfile(data_args.data_path):
        raise FileNotFoundError(
            f"--data_path {data_args.data_path}: no such file (expected a JSON/JSONL file, a folder of .tar "
            "shards or a shard pattern)."
        )
    for flag in ("image_folder", "audio_folder"):
        folder = getattr(data_args, flag)
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"--{flag} {folder}: no such folder.")


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
    the final model whole whatever the FSDP state dict type (`fsdp.py`).
    """

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:  # accelerate leaves FSDP off on CPU
            enable_fsdp_on_cpu(self)

    no_decay_parameters: list[str] = []  # names that get no weight decay (`make_trainer`)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if name not in self.no_decay_parameters]

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
        self._save(
            output_dir if output_dir is not None else self.args.output_dir,
            state_dict=self.accelerator.get_state_dict(self.model),
        )

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


def check_trained(trainer: OmniFusionTrainer, data_args: DataArguments):
    """
    After `train_or_resume`, before the final output is saved: a run that trained no step (its data gave no usable
    sample: an empty shard, every sample bad under --max_bad_samples) is a `ValueError`, and an `--output_dir` this
    run created is removed again if the Trainer left nothing in it but empty folders, so the failed run writes
    nothing.
    """
    if trainer.state.global_step > 0:
        return
    output_dir = trainer.args.output_dir
    if trainer.created_output_dir and trainer.args.should_save and os.path.isdir(output_dir):
        if not any(files for _, _, files in os.walk(output_dir)):
            shutil.rmtree(output_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    raise ValueError(
        f"No training step ran: --data_path {data_args.data_path} gave no usable sample (see the warnings above for "
        f"skipped samples, records and shards), so nothing was saved to --output_dir {output_dir}."
    )


def make_trainer(
    model: nn.Module,
    processor: OmniFusionProcessor,
    data_args: DataArguments,
    training_args: TrainingArguments,
    no_decay_parameters: list[str] = (),
) -> OmniFusionTrainer:
    """
    A Trainer over the checked, lazily encoded records (or the streamed WebDataset shards); it saves the processor
    with every checkpoint, writes whole checkpoints only, and knows what to resume from (`--output_dir` is checked
    first: one run per folder). `no_decay_parameters` (names) get no weight decay whatever `--weight_decay` says.
    """
    resume_checkpoint = resolve_resume_checkpoint(training_args)
    check_output_dir(training_args, resume_checkpoint)
    fit_model_max_length(data_args, model.config)
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
    created_output_dir = not os.path.exists(training_args.output_dir)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
    )
    trainer.resume_checkpoint = resume_checkpoint
    trainer.created_output_dir = created_output_dir  # `check_trained` removes it again after a run with no step
    trainer.no_decay_parameters = list(no_decay_parameters)
    return trainer
