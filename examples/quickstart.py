"""
Train a small OmniFusion end to end on CPU, with nothing downloaded, and check that it answers questions about images.

    python examples/quickstart.py --output_dir quickstart-output

Steps, each with a progress bar:
  1. draw a synthetic dataset of coloured shapes (`synthetic_shapes.py`): caption records for stage 1 and multi-turn
     question-answer dialogs for stage 2, in the same LLaVA-style JSON as real data, plus held-out images;
  2. train a byte-level BPE tokenizer on the dataset's text and pre-train a small Mistral-architecture LM on it: a
     caption, then questions about it with their answers, so that the LM learns to answer from its context, as a
     pretrained LLM can;
  3. pre-train a small CLIP-architecture vision tower on a separate pool of drawn images (shared linear probes on every
     patch token of the hidden layer OmniFusion reads), standing in for a pretrained CLIP: a random frozen tower
     does not show the LM enough;
  4. stage 1 (`modeling_omnifusion.training.stage1`, as `train_stage1_pretrain.py` runs it: adapter and markers
     only; the MLP adapter, which trains far more reliably than the released transformer adapter at this tiny scale);
  5. stage 2 (`modeling_omnifusion.training.stage2`, as `train_stage2_sft.py` runs it: adapter, markers and the
     whole LM); both with the same flags as on the command line;
  6. reload the saved Hub-format folder with `AutoModelForImageTextToText` / `AutoProcessor`
     (`trust_remote_code=True`), ask one question per attribute about every held-out image, print a few answers and the
     exact-match accuracy of the greedy answers. The last line is `accuracy=<value>`.

About 2 minutes on 2 CPU cores, with a held-out accuracy of 0.99-1.0. `--quick` runs a few steps of everything, as
a smoke test (its accuracy means nothing).
"""

import os
import random
import time
from dataclasses import dataclass, field

import synthetic_shapes
import torch
from PIL import Image
from synthetic_shapes import (
    ATTRIBUTES,
    IMAGE_SIZE,
    QUESTIONS,
    START,
    evaluate,
    pretrain_vision_tower,
    step,
    trainer_flags,
)
from tqdm.auto import tqdm
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    MistralConfig,
    MistralForCausalLM,
)

from modeling_omnifusion.evaluation.visdial import results_table
from modeling_omnifusion.evaluation.visdial_scoring import evaluate_dialogs
from modeling_omnifusion.inference import resolve_dtype
from modeling_omnifusion.processing.processing_omnifusion import DEFAULT_SYSTEM_PROMPT
from modeling_omnifusion.testing.tiny import make_tokenizer
from modeling_omnifusion.training import stage1, stage2


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="quickstart-output", metadata={"help": "Where the data and models go."})
    quick: bool = field(default=False, metadata={"help": "A few steps of everything: a smoke test."})
    seed: int = field(default=0, metadata={"help": "Seed of the drawn data and of every training run."})


def pretrain_language_model(tokenizer, texts: list[str], steps: int, folder: str) -> None:
    """A 2-layer Mistral-architecture LM trained on `texts`, each closed by EOS; saved with its tokenizer."""
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,  # head_dim 32: one vLLM's CPU attention accepts, so the demo folder serves
        num_key_value_heads=1,
        # room for whole real VisDial dialogs (10 rounds, `examples/evaluate_visdial.py` on this folder); the
        # rotary positions make it cost nothing here
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = MistralForCausalLM(config)
    encoded = tokenizer([text + tokenizer.eos_token for text in texts], add_special_tokens=False)["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="Pre-training the LM"):
        batch = tokenizer.pad({"input_ids": random.choices(encoded, k=32)}, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    print(f"LM loss {loss.item():.3f}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def synthetic_visdial(samples, seed: int) -> tuple[dict, list[dict]]:
    """
    Held-out images as Visual Dialog data: caption, one round per attribute, every answer the dataset has as the
    candidate options, and dense relevance (1 for the right answer, 0.5 for other values of the asked attribute,
    0 for answers to other questions) on the first round, as in VisDial's single dense round per dialog.
    """
    rng = random.Random(seed)
    answers = [value for values in ATTRIBUTES.values() for value in values]
    questions, dialogs, dense = [], [], []
    for image_id, (_, scene) in enumerate(samples):
        rounds = []
        for attribute in ATTRIBUTES:
            questions.append(rng.choice(QUESTIONS[attribute]).rstrip("?"))
            answer = answers.index(scene.answer(attribute))
            rounds.append(
                {
                    "question": len(questions) - 1,
                    "answer": answer,
                    "gt_index": answer,
                    "answer_options": list(range(len(answers))),
                }
            )
        dialogs.append({"image_id": image_id, "caption": scene.caption(), "dialog": rounds})
        first = next(iter(ATTRIBUTES))
        relevance = [
            1.0 if value == scene.answer(first) else 0.5 if value in ATTRIBUTES[first] else 0.0 for value in answers
        ]
        dense.append({"image_id": image_id, "round_id": 1, "gt_relevance": relevance})
    return {"questions": questions, "answers": answers, "dialogs": dialogs}, dense


def main(args: list[str] | None = None):
    (args,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # The matrices here are tiny: one compute thread is as fast as two, and far faster when the cores are shared;
    # the second core prepares batches (`--dataloader_num_workers 1`).
    torch.set_num_threads(1)
    quick = args.quick
    sizes = {
        "train_images": 64 if quick else 2000,
        "test_images": 8 if quick else 100,
        "lm_steps": 5 if quick else 300,
        "vision_images": 256 if quick else 8000,
        "vision_steps": 5 if quick else 600,
        "stage1_steps": 4 if quick else 100,
        "stage2_steps": 4 if quick else 200,
    }
    data_dir = os.path.join(args.output_dir, "data")
    vision_dir = os.path.join(args.output_dir, "vision-tower")
    language_dir = os.path.join(args.output_dir, "language-model")
    stage1_dir = os.path.join(args.output_dir, "omnifusion-stage1")
    final_dir = os.path.join(args.output_dir, "omnifusion")

    step("1/6 Drawing the synthetic shapes dataset")
    train = synthetic_shapes.write_split(data_dir, "train", sizes["train_images"], args.seed, IMAGE_SIZE)
    test = synthetic_shapes.write_split(data_dir, "test", sizes["test_images"], args.seed + 1, IMAGE_SIZE)
    print(f"{len(train)} training images, {len(test)} held-out images in {data_dir}")

    step("2/6 Tokenizer and language model")
    texts = synthetic_shapes.reading_texts(train, args.seed)
    # Byte-level BPE with <unk> (also padding), <s> and </s>; every word of the synthetic text becomes one token.
    tokenizer = make_tokenizer(
        512, [DEFAULT_SYSTEM_PROMPT, *synthetic_shapes.CAPTION_PROMPTS, *texts], pad_token="<unk>"
    )
    pretrain_language_model(tokenizer, texts, sizes["lm_steps"], language_dir)

    step("3/6 Vision tower")
    images, scenes = synthetic_shapes.draw_scenes(sizes["vision_images"], args.seed + 2, IMAGE_SIZE, "Drawing images")
    pretrain_vision_tower(images, scenes, sizes["vision_steps"], vision_dir)

    step("4/6 Stage 1: adapter and markers (examples/train_stage1_pretrain.py)")
    stage1.train(
        ["--vision_model_name_or_path", vision_dir, "--language_model_name_or_path", language_dir]
        + ["--adapter_type", "mlp"]
        + trainer_flags(
            stage1_dir, os.path.join(data_dir, "train_captions.json"), data_dir, max_steps=sizes["stage1_steps"]
        )
    )

    step("5/6 Stage 2: adapter, markers and LM (examples/train_stage2_sft.py)")
    stage2.train(
        ["--model_name_or_path", stage1_dir]
        + trainer_flags(
            final_dir,
            os.path.join(data_dir, "train_dialogs.json"),
            data_dir,
            max_steps=sizes["stage2_steps"],
            learning_rate=1e-3,
        )
    )

    step(f"6/6 Reloading {final_dir} with the Auto classes; held-out questions and VisDial-style ranking")
    # bfloat16 on a CPU with native bfloat16 (AVX-512 BF16, AMX), float32 elsewhere
    model = AutoModelForImageTextToText.from_pretrained(final_dir, trust_remote_code=True, dtype=resolve_dtype())
    model.eval()
    processor = AutoProcessor.from_pretrained(final_dir, trust_remote_code=True)
    results = evaluate(model, processor, data_dir, test, args.seed)
    for item in results[:8]:
        print(f"{item['image']}  Q: {item['question']}  A: {item['answer']!r}  (expected {item['expected']!r})")
    per_attribute = {
        attribute: sum(item["correct"] for item in results if item["attribute"] == attribute) / len(test)
        for attribute in ATTRIBUTES
    }
    print("Accuracy per attribute: " + ", ".join(f"{name} {value:.2f}" for name, value in per_attribute.items()))

    visdial_data, dense = synthetic_visdial(test, args.seed)
    images = {
        image_id: Image.open(os.path.join(data_dir, name)).convert("RGB") for image_id, (name, _) in enumerate(test)
    }
    metrics, _ = evaluate_dialogs(model, processor, visdial_data, images, dense_annotations=dense)
    print(f"Visual Dialog ranking on synthetic dialogs ({len(visdial_data['answers'])} candidates per round):")
    print(results_table([{"model": "quickstart OmniFusion", "metrics": metrics}]))

    accuracy = sum(item["correct"] for item in results) / len(results)
    print(f"Total time {time.time() - START:.0f} s")
    print(f"accuracy={accuracy:.3f}")


if __name__ == "__main__":
    main()
