"""
OmniFusion stage 1 (pre-training): build a new OmniFusion from a pretrained vision encoder and a pretrained LM, then
train only the adapter and the learned marker embeddings on image-text conversations (usually captions). The vision
encoder(s), the LM and its token embeddings stay frozen, bit for bit. Several encoders (comma-separated, e.g. CLIP and
DINOv2 with `--adapter_type mix_sum`: the mix adapter's per-layer maps and coefficients train here) and tiles
(`--image_grid_pinpoints '[[672, 336], [336, 672], [672, 672]]'`) are options.

    omnifusion-train-stage1 \
        --vision_model_name_or_path openai/clip-vit-large-patch14-336 \
        --language_model_name_or_path mistralai/Mistral-7B-v0.1 \
        --data_path blip_laion_cc_sbu_558k.json --image_folder images/ \
        --output_dir omnifusion-stage1 --bf16

Sound: `--audio_model_name_or_path` (a Whisper folder or Hub id: its encoder, frozen, and its feature extractor) adds
an audio encoder, a fresh audio adapter (`--audio_adapter_type`, `--audio_pool_stride`) and the audio markers, for
records with `audio` clips. With the vision and language flags it builds a new model with both encoders and trains
both adapters and every marker. With `--model_name_or_path` (an OmniFusion folder without sound) instead, it extends
that model with sound and trains only the audio adapter and the three audio markers: everything the image path uses
stays bit-identical, so the folder's image answers are unchanged. A `--model_name_or_path` folder that already has
sound trains its audio adapter and markers the same way, without `--audio_model_name_or_path`.

    omnifusion-train-stage1 --model_name_or_path omnifusion-sft --audio_model_name_or_path openai/whisper-base \
        --data_path speech.jsonl --audio_folder clips/ --output_dir omnifusion-audio-stage1

Defaults follow the released training code: Adafactor at lr 1e-2, cosine schedule with 1% warmup, 4 sequences per
device with 8 accumulation steps (x 8 GPUs = 256 per step), 2048 tokens. Every `TrainingArguments` flag works
(`--max_steps`, `--activation_checkpointing`, `--resume_from_checkpoint`, `--report_to`, ...); see docs/training.md
for `torchrun`, `accelerate launch`, DeepSpeed and FSDP. `--output_dir` ends up holding a Hub-format folder (model,
processor, remote code), the input of stage 2 (`omnifusion-train-stage2`, `stage2.py`).
"""

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import HfArgumentParser, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.hub_omnifusion import hub_model_id

from .arguments import DataArguments, OmniFusionTrainingArguments
from .checkpoints import save_final_output, train_or_resume
from .fsdp import fsdp_requested
from .models import (
    adapters,
    build_model_from_pretrained_parts,
    extend_with_sound,
    parse_grid_pinpoints,
    train_only,
    train_sound_side,
)
from .trainer import check_omnifusion_folder, check_path_arguments, check_trained, make_trainer, setup_run
from .video_records import extend_with_video, load_model_for_video, train_video_side, video_settings


@dataclass
class ModelArguments:
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Vision encoder (a CLIP/SigLIP/DINOv2 folder or Hub id, full CLIP models included), or several "
            "comma-separated (clip_dir,dinov2_dir) for a mix adapter. Required unless --model_name_or_path is given."
        },
    )
    language_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Decoder LM with its tokenizer (folder or Hub id). Required with --vision_model_name_or_path."
        },
    )
    adapter_type: Literal["transformer", "mlp", "linear", "mix_sum", "mix_concat"] = field(
        default="transformer",
        metadata={"help": "Adapter between the two (released: transformer; two encoders: mix_sum or mix_concat)."},
    )
    image_grid_pinpoints: str | None = field(
        default=None,
        metadata={"help": "Tiles: JSON list of [height, width] canvases, e.g. '[[672, 336], [336, 672], [672, 672]]'."},
    )
    audio_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Whisper folder or Hub id (WhisperForConditionalGeneration, WhisperModel or a WhisperEncoder "
            "alone, with its feature extractor): adds sound; its encoder stays frozen."
        },
    )
    audio_adapter_type: Literal["mlp", "linear"] | None = field(
        default=None, metadata={"help": "Audio adapter with --audio_model_name_or_path (default: mlp)."}
    )
    audio_pool_stride: int | None = field(
        default=None,
        metadata={
            "help": "Average-pool this many Whisper frames into one position with --audio_model_name_or_path "
            "(default: 2, 25 positions per second)."
        },
    )
    video_num_frames: int | None = field(
        default=None,
        metadata={
            "help": "Adds video (frames sampled per video; frames share the vision tower): with the vision and "
            "language flags a new model with video, with --model_name_or_path that model extended with video, whose "
            "video markers (and separate video adapter) alone train."
        },
    )
    video_pool_size: int | None = field(
        default=None, metadata={"help": "Per-frame average pooling with --video_num_frames (default: 2, i.e. 2x2)."}
    )
    video_adapter: Literal["shared", "separate"] | None = field(
        default=None,
        metadata={"help": "With --video_num_frames: the image adapter for frames (shared, default) or a copy of it."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "An OmniFusion folder (or Hub id) to train the sound side of, instead of building a new model: "
            "with --audio_model_name_or_path a folder without sound is extended with it; only the audio adapter and "
            "the audio markers train."
        },
    )


@dataclass
class Stage1TrainingArguments(OmniFusionTrainingArguments):
    learning_rate: float = field(default=1e-2, metadata={"help": "Peak learning rate (released stage 1: 1e-2)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per device (released: 4)."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "Accumulation steps (released: 8)."})


def check_model_arguments(parser: HfArgumentParser, model_args: ModelArguments):
    """Which model stage 1 trains: new (vision + language [+ audio] flags) or a folder's sound side; a parser error
    for any other combination."""
    building = model_args.vision_model_name_or_path is not None or model_args.language_model_name_or_path is not None
    if model_args.model_name_or_path is not None:
        if building or model_args.image_grid_pinpoints is not None:
            parser.error(
                "--model_name_or_path trains the sound side of an existing model: give it without "
                "--vision_model_name_or_path, --language_model_name_or_path and --image_grid_pinpoints (those build a "
                "new model)."
            )
    elif model_args.vision_model_name_or_path is None or model_args.language_model_name_or_path is None:
        parser.error(
            "stage 1 needs --vision_model_name_or_path and --language_model_name_or_path (a new model, with "
            "--audio_model_name_or_path for sound), or --model_name_or_path with --audio_model_name_or_path (an "
            "existing image model extended with sound)."
        )
    if model_args.audio_model_name_or_path is None:
        audio_options = [
            flag for flag in ("audio_adapter_type", "audio_pool_stride") if getattr(model_args, flag) is not None
        ]
        if audio_options:
            parser.error(f"--{audio_options[0]} needs --audio_model_name_or_path.")
    if model_args.video_num_frames is None:
        video_options = [flag for flag in ("video_pool_size", "video_adapter") if getattr(model_args, flag) is not None]
        if video_options:
            parser.error(f"--{video_options[0]} needs --video_num_frames.")
    elif model_args.model_name_or_path is not None and model_args.audio_model_name_or_path is not None:
        parser.error("--model_name_or_path extends a model with sound or with video in one run, not both.")


def audio_settings(model_args: ModelArguments) -> dict:
    """The config's audio adapter and pooling from the flags (default: mlp, stride 2)."""
    return {
        "audio_adapter_type": model_args.audio_adapter_type or "mlp",
        "audio_pool_stride": 2 if model_args.audio_pool_stride is None else model_args.audio_pool_stride,
    }


def load_model_for_sound(model_args: ModelArguments) -> tuple[OmniFusionForCausalLM, OmniFusionProcessor]:
    """The `--model_name_or_path` model in float32 with its processor, extended with the `--audio_model_name_or_path`
    encoder when it has no sound yet; a `ValueError` if it has none and no encoder is given, or already has one."""
    name = model_args.model_name_or_path
    model = OmniFusionForCausalLM.from_pretrained(name, dtype=torch.float32)
    processor = OmniFusionProcessor.from_pretrained(name)
    processor.end_assistant_turns_with_eos = True
    has_sound = model.config.audio_config is not None
    if has_sound and model_args.audio_model_name_or_path is not None:
        raise ValueError(
            f"--model_name_or_path {name} already has an audio encoder: drop --audio_model_name_or_path (its audio "
            "adapter and markers train on)."
        )
    if not has_sound and model_args.audio_model_name_or_path is None:
        raise ValueError(
            f"--model_name_or_path {name} has no audio encoder: give --audio_model_name_or_path (a Whisper folder) "
            "to extend it with sound."
        )
    if not has_sound:
        model, processor = extend_with_sound(
            model, processor, model_args.audio_model_name_or_path, **audio_settings(model_args)
        )
    # What the saved folder names as its base model: a Hub id, never a local path.
    model.config._name_or_path = hub_model_id(name) or ""
    return model, processor


def train(args: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, Stage1TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args)
    check_model_arguments(parser, model_args)
    fsdp = fsdp_requested(training_args) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if model_args.model_name_or_path is not None and fsdp:
        parser.error(
            "Training the sound side of --model_name_or_path keeps the image and turn markers fixed through a "
            "gradient hook that FSDP's sharded parameters would not carry. It trains only the audio adapter and "
            "markers: use DDP or ZeRO-2."
        )
    paths = {
        flag: getattr(model_args, flag)
        for flag in (
            "vision_model_name_or_path",
            "language_model_name_or_path",
            "model_name_or_path",
            "audio_model_name_or_path",
        )
        if getattr(model_args, flag) is not None
    }
    check_path_arguments(data_args, **paths)
    if model_args.model_name_or_path is not None:
        check_omnifusion_folder("model_name_or_path", model_args.model_name_or_path, "Training the sound side")
    if is_deepspeed_zero3_enabled():
        parser.error(
            "Stage 1 copies two checkpoints' weights into a new model, which ZeRO-3 partitions as they load. It trains "
            "only the adapter and markers: use ZeRO-2 (examples/configs/deepspeed_zero2.json) or FSDP."
        )
    setup_run(training_args)

    no_decay = []
    if model_args.model_name_or_path is not None and model_args.video_num_frames is not None:
        model, processor = load_model_for_video(model_args.model_name_or_path, **video_settings(model_args))
        no_decay = train_video_side(model)
    elif model_args.model_name_or_path is not None:
        model, processor = load_model_for_sound(model_args)
        no_decay = train_sound_side(model)
    else:
        sound = {}
        if model_args.audio_model_name_or_path is not None:
            sound = {"audio_model_name_or_path": model_args.audio_model_name_or_path, **audio_settings(model_args)}
        model, processor = build_model_from_pretrained_parts(
            model_args.vision_model_name_or_path,
            model_args.language_model_name_or_path,
            adapter_type=model_args.adapter_type,
            image_grid_pinpoints=parse_grid_pinpoints(model_args.image_grid_pinpoints),
            **sound,
        )
        if model_args.video_num_frames is not None:
            model, processor = extend_with_video(model, processor, **video_settings(model_args))
        train_only(model, adapters(model) + [model.get_input_embeddings().special_embeddings])

    trainer = make_trainer(model, processor, data_args, training_args, no_decay_parameters=no_decay)
    train_or_resume(trainer)
    check_trained(trainer, data_args)
    save_final_output(trainer, training_args.output_dir)
    return trainer


def main(args: list[str] | None = None) -> int:
    """
    The `omnifusion-train-stage1` command (also `python examples/train_stage1_pretrain.py`): `train` with `args`
    (default: the command line); 0 once the output folder is complete. A bad flag exits with status 2; a failed check
    raises.
    """
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
