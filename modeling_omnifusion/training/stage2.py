"""
OmniFusion stage 2 (supervised fine-tuning): starting from a stage-1 folder, train the adapter, the learned marker
embeddings and the language model on image-text dialogs. The LM is trained fully, or with `--lora_r N` through LoRA
on its attention and MLP projections; the vision encoder(s) are never trained. A folder with sound trains its audio
adapter too, on records that mix images, clips, both or neither; its audio encoder is never trained.

    omnifusion-train-stage2 \
        --model_name_or_path omnifusion-stage1 \
        --data_path llava_v1_5_mix665k.json --image_folder images/ \
        --output_dir omnifusion-sft --bf16 [--lora_r 64]

Defaults follow the released training code: Adafactor at lr 1e-4, cosine schedule with 1% warmup, 1 sequence per
device with 64 accumulation steps (x 8 GPUs = 512 per step), 2048 tokens. Every `TrainingArguments` flag works; see
docs/training.md for distributed launches. `--output_dir` ends up holding a Hub-format folder (model, processor,
remote code). With LoRA, the adapter is saved in `<output_dir>/lora_adapter` and merged into the saved model, or, with
`--save_lora_adapter_only`, saved alone in `--output_dir` (it loads on top of `--model_name_or_path`).

The vision encoders are the `--model_name_or_path` folder's (stage 1 froze them, so they are the ones it was built
from). `--vision_model_name_or_path clip_dir,dinov2_dir` (comma-separated, as in stage 1) loads them from those
folders or Hub ids instead, replacing the folder's towers, and takes each one's image processor (its resizing and
normalisation) when the folder has one. What it is for: naming the original encoders and their preprocessing
explicitly in the stage-2 command, rather than trusting what a stage-1 folder (perhaps made elsewhere) holds, and
checking that they fit: each must agree with the encoder the adapter was trained on in number and order and in
`model_type`, `hidden_size`, `num_hidden_layers`, `image_size`, `patch_size` and register tokens (what the adapter
and the number of image positions depend on), else a `ValueError` names the flag, the encoder, the folder and the
field. Other encoder weights than stage 1's give an adapter trained on features it never saw; stage 2 then trains
it further, but the encoders stay frozen.
"""

import os
from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import HfArgumentParser, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.hub_omnifusion import hub_model_id

from .arguments import DataArguments, OmniFusionTrainingArguments
from .checkpoints import save_final_output, train_or_resume
from .models import (
    adapter_names,
    fine_tuned_modules,
    install_vision_towers,
    load_replacement_vision_towers,
    log_trainable_parameters,
    parse_grid_pinpoints,
    set_image_grid_pinpoints,
    train_only,
)
from .trainer import check_omnifusion_folder, check_path_arguments, check_trained, make_trainer, setup_run

# The LM's attention and MLP projections (Llama/Mistral/Qwen naming); a full match, so the vision tower's own
# `q_proj`/`k_proj`/`v_proj` are never hit.
LANGUAGE_MODEL_PROJECTIONS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A stage-1 output folder (or any OmniFusion folder/Hub id)."})
    lora_r: int | None = field(default=None, metadata={"help": "Train the LM through LoRA of this rank, not fully."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (with --lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input (with --lora_r)."})
    save_lora_adapter_only: bool = field(
        default=False, metadata={"help": "With --lora_r: save only the LoRA adapter, unmerged."}
    )
    freeze_adapters: bool = field(
        default=False,
        metadata={
            "help": "Keep every adapter (image, audio, video) as the --model_name_or_path folder has it and train only "
            "the LM (LoRA or fully) with its marker rows, e.g. to keep an adapter aligned on little data from "
            "drifting toward the training voices."
        },
    )
    image_grid_pinpoints: str | None = field(
        default=None,
        metadata={
            "help": "Tiles for this stage: JSON list of [height, width] canvases, e.g. '[[672, 336], [336, 672], "
            "[672, 672]]' (default: as the --model_name_or_path folder)."
        },
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Vision encoder(s) to use instead of the --model_name_or_path folder's, comma-separated as in "
            "stage 1 (clip_dir,dinov2_dir), with their image processors; each must match the encoder the adapter "
            "was trained on (model_type, hidden_size, layers, image and patch size). Default: the folder's."
        },
    )


@dataclass
class Stage2TrainingArguments(OmniFusionTrainingArguments):
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (released stage 2: 1e-4)."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Sequences per device (released: 1)."})
    gradient_accumulation_steps: int = field(default=64, metadata={"help": "Accumulation steps (released: 64)."})


def train(args: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, Stage2TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args)
    if model_args.save_lora_adapter_only and not model_args.lora_r:
        parser.error("--save_lora_adapter_only needs --lora_r.")
    if model_args.save_lora_adapter_only and model_args.vision_model_name_or_path:
        parser.error(
            "--save_lora_adapter_only saves no vision encoder: the adapter would load on top of --model_name_or_path "
            "with that folder's encoders, not the --vision_model_name_or_path ones. Drop one of the two."
        )
    if model_args.vision_model_name_or_path and is_deepspeed_zero3_enabled():
        parser.error(
            "--vision_model_name_or_path builds the encoders after the model has loaded, which ZeRO-3 partitions as it "
            "loads: use ZeRO-2 (examples/configs/deepspeed_zero2.json) or FSDP, or a folder that holds the encoders."
        )
    paths = {"model_name_or_path": model_args.model_name_or_path}
    if model_args.vision_model_name_or_path is not None:
        paths["vision_model_name_or_path"] = model_args.vision_model_name_or_path
    check_path_arguments(data_args, **paths)
    check_omnifusion_folder("model_name_or_path", model_args.model_name_or_path, "Stage 2 (supervised fine-tuning)")
    setup_run(training_args)

    model = OmniFusionForCausalLM.from_pretrained(model_args.model_name_or_path)
    processor = OmniFusionProcessor.from_pretrained(model_args.model_name_or_path)
    processor.end_assistant_turns_with_eos = True
    vision_towers = None
    if model_args.vision_model_name_or_path is not None:
        configs, image_processors, states = load_replacement_vision_towers(
            model.config, processor, model_args.vision_model_name_or_path, model_args.model_name_or_path
        )
        vision_towers = (configs, states)
        install_vision_towers(model, *vision_towers)
        processor.image_processor, *processor.extra_encoder_preprocessors = image_processors
    if model_args.image_grid_pinpoints is not None:
        set_image_grid_pinpoints(model, processor, parse_grid_pinpoints(model_args.image_grid_pinpoints))
    # What a LoRA adapter's config and card name as their base model: its Hub id, never a local path.
    model.name_or_path = hub_model_id(model_args.model_name_or_path)
    model.config._name_or_path = model.name_or_path or ""
    if model_args.lora_r:  # get_peft_model freezes everything but the LoRA weights and the modules to save
        lora_config = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=LANGUAGE_MODEL_PROJECTIONS,
            modules_to_save=["special_embeddings"] + ([] if model_args.freeze_adapters else adapter_names(model)),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
        log_trainable_parameters(model)
    else:
        train_only(model, fine_tuned_modules(model, with_adapters=not model_args.freeze_adapters))

    trainer = make_trainer(model, processor, data_args, training_args)
    train_or_resume(trainer)
    check_trained(trainer, data_args)

    if not model_args.lora_r or model_args.save_lora_adapter_only:
        save_final_output(trainer, training_args.output_dir)
        return trainer
    # Merge from the saved adapter, which `save_model` gathers from every process (DDP, ZeRO-3, FSDP alike).
    adapter_dir = os.path.join(training_args.output_dir, "lora_adapter")
    save_final_output(trainer, adapter_dir)
    if trainer.is_world_process_zero():
        base = OmniFusionForCausalLM.from_pretrained(model_args.model_name_or_path)
        if vision_towers is not None:
            install_vision_towers(base, *vision_towers)
        if model_args.image_grid_pinpoints is not None:  # the saved config must agree with the saved processor
            set_image_grid_pinpoints(base, processor, parse_grid_pinpoints(model_args.image_grid_pinpoints))
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()

        def save_merged(folder: str):
            merged.save_pretrained(folder)
            processor.save_pretrained(folder)

        save_final_output(trainer, training_args.output_dir, save=save_merged, on_every_process=False)
    trainer.accelerator.wait_for_everyone()
    return trainer


def main(args: list[str] | None = None) -> int:
    """
    The `omnifusion-train-stage2` command (also `python examples/train_stage2_sft.py`): `train` with `args` (default:
    the command line); 0 once the output folder is complete. A bad flag exits with status 2; a failed check raises.
    """
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
