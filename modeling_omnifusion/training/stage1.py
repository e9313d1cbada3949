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

Defaults follow the released training code: Adafactor at lr 1e-2, cosine schedule with 1% warmup, 4 sequences per
device with 8 accumulation steps (x 8 GPUs = 256 per step), 2048 tokens. Every `TrainingArguments` flag works
(`--max_steps`, `--activation_checkpointing`, `--resume_from_checkpoint`, `--report_to`, ...); see docs/training.md
for `torchrun`, `accelerate launch`, DeepSpeed and FSDP. `--output_dir` ends up holding a Hub-format folder (model,
processor, remote code), the input of stage 2 (`omnifusion-train-stage2`, `stage2.py`).
"""

from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from .arguments import DataArguments, OmniFusionTrainingArguments
from .checkpoints import save_final_output, train_or_resume
from .models import build_model_from_pretrained_parts, parse_grid_pinpoints, train_only
from .trainer import check_path_arguments, make_trainer, setup_run


@dataclass
class ModelArguments:
    vision_model_name_or_path: str = field(
        metadata={
            "help": "Vision encoder (a CLIP/SigLIP/DINOv2 folder or Hub id, full CLIP models included), or several "
            "comma-separated (clip_dir,dinov2_dir) for a mix adapter."
        }
    )
    language_model_name_or_path: str = field(metadata={"help": "Decoder LM with its tokenizer (folder or Hub id)."})
    adapter_type: Literal["transformer", "mlp", "linear", "mix_sum", "mix_concat"] = field(
        default="transformer",
        metadata={"help": "Adapter between the two (released: transformer; two encoders: mix_sum or mix_concat)."},
    )
    image_grid_pinpoints: str | None = field(
        default=None,
        metadata={"help": "Tiles: JSON list of [height, width] canvases, e.g. '[[672, 336], [336, 672], [672, 672]]'."},
    )


@dataclass
class Stage1TrainingArguments(OmniFusionTrainingArguments):
    learning_rate: float = field(default=1e-2, metadata={"help": "Peak learning rate (released stage 1: 1e-2)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per device (released: 4)."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "Accumulation steps (released: 8)."})


def train(args: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, Stage1TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args)
    check_path_arguments(
        data_args,
        vision_model_name_or_path=model_args.vision_model_name_or_path,
        language_model_name_or_path=model_args.language_model_name_or_path,
    )
    if is_deepspeed_zero3_enabled():
        parser.error(
            "Stage 1 copies two checkpoints' weights into a new model, which ZeRO-3 partitions as they load. It trains "
            "only the adapter and markers: use ZeRO-2 (examples/configs/deepspeed_zero2.json) or FSDP."
        )
    setup_run(training_args)

    model, processor = build_model_from_pretrained_parts(
        model_args.vision_model_name_or_path,
        model_args.language_model_name_or_path,
        adapter_type=model_args.adapter_type,
        image_grid_pinpoints=parse_grid_pinpoints(model_args.image_grid_pinpoints),
    )
    train_only(model, [model.model.adapter, model.get_input_embeddings().special_embeddings])

    trainer = make_trainer(model, processor, data_args, training_args)
    train_or_resume(trainer)
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
