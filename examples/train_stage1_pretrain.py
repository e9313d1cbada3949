"""
OmniFusion stage 1 (pre-training): build a new OmniFusion from a pretrained vision encoder (or several,
comma-separated) and a pretrained LM, and train only the adapter and the learned marker embeddings on image-text
conversations (usually captions). The same program as the `omnifusion-train-stage1` command
(`modeling_omnifusion.training.stage1`); every `TrainingArguments` flag works.

    python examples/train_stage1_pretrain.py \
        --vision_model_name_or_path openai/clip-vit-large-patch14-336 \
        --language_model_name_or_path mistralai/Mistral-7B-v0.1 \
        --data_path blip_laion_cc_sbu_558k.json --image_folder images/ \
        --output_dir omnifusion-stage1 --bf16

`--output_dir` ends up holding a Hub-format folder (model, processor, remote code), the input of
`train_stage2_sft.py`.
"""

from modeling_omnifusion.training.stage1 import main

if __name__ == "__main__":
    raise SystemExit(main())
