"""
OmniFusion stage 2 (supervised fine-tuning): starting from a stage-1 folder, train the adapter, the learned marker
embeddings and the language model (fully, or through LoRA with `--lora_r N`) on image-text dialogs. The same program
as the `omnifusion-train-stage2` command (`modeling_omnifusion.training.stage2`); every `TrainingArguments` flag works.

    python examples/train_stage2_sft.py \
        --model_name_or_path omnifusion-stage1 \
        --data_path llava_v1_5_mix665k.json --image_folder images/ \
        --output_dir omnifusion-sft --bf16 [--lora_r 64]

`--output_dir` ends up holding a Hub-format folder (model, processor, remote code).
"""

from modeling_omnifusion.training.stage2 import main

if __name__ == "__main__":
    raise SystemExit(main())
