#!/usr/bin/env python
"""
Training benchmark: stage-2 tokens/s with padded, length-grouped and packed batches, side by side in one run.

The data is synthetic with a length mix shaped like LLaVA-v1.5-665k's (most records a short VQA exchange, a third
medium multi-turn dialogs, a tail of long ones; lengths scaled down by `--length_scale` to fit a CPU): 90 % of the
records carry an image. Every mode trains the same small OmniFusion (a tiny CLIP tower, a 4-layer Mistral LM) for one
epoch over the same records through the stage-2 command (`modeling_omnifusion.training.stage2`, so the real
collators, samplers and Trainer), and reports real (non-padding) tokens per second of training time:

* padded: random order, each batch padded to its longest record (the default);
* grouped: `--group_by_length` (batches of similar lengths, still padded);
* packed: `--packing` (each batch's records in one row, no padding).

Then OmniFusion against transformers' `LlavaForConditionalGeneration` under the same `Trainer` at equal work: the
pair is built by `common.py`'s builder (same CLIP tower and Mistral LM configs, OmniFusion's `mlp`
adapter = LLaVA's projector, weights copied from OmniFusion into LLaVA, image features checked identical), both with
the vision tower frozen (stage 2). The same records (the first `--llava_steps x --batch` of the mix, in one fixed
order) are rendered by OmniFusion's chat template and tokenized by each model's own processor (LLaVA's `<image>`
expands to the same number of image tokens; OmniFusion adds its `<image_start>`/`<image_end>` markers, 2 positions
per image, counted in the table), padded batches, loss on every text token; `--llava_rounds` interleaved rounds
(alternating which model goes first) after an untimed warm-up step each, and the OmniFusion/LLaVA time ratio is the
median of the per-round ratios. The pair's tokenizer is `common.make_tokenizer` (a BPE trained on other sentences),
so the same records are longer in tokens there than in the padded/grouped/packed runs above.

Run:  python examples/benchmarks/benchmark_training.py [--records 192] [--batch 8]
The line before the last is `omnifusion_llava_time_ratio=<OmniFusion / LLaVA training time, same batches>`; the last
line is `packing_speedup=<packed / padded tokens/s>`.
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import types

import common
import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    MistralConfig,
    MistralForCausalLM,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from modeling_omnifusion.testing.tiny import make_tokenizer
from modeling_omnifusion.training import stage1, stage2

WORDS = (
    "red blue green yellow circle square triangle left right top bottom one two three the a is are there "
    "what where how many shape colour image picture shows small large near far next to above below"
).split()
# Share of records and text-length range (tokens, before --length_scale) per bucket, after LLaVA-665k's histogram:
# short single-turn VQA, medium multi-turn conversations, long detailed dialogs.
LENGTH_MIX = ((0.55, 20, 120), (0.33, 120, 600), (0.12, 600, 1800))


def synthetic_records(num_records: int, scale: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for index in range(num_records):
        share, low, high = rng.choices(LENGTH_MIX, weights=[bucket[0] for bucket in LENGTH_MIX])[0]
        words = max(4, int(rng.uniform(low, high) * scale))
        turns, conversations = max(1, words // 40), []
        for turn in range(turns):
            question = " ".join(rng.choices(WORDS, k=max(2, words // (4 * turns))))
            answer = " ".join(rng.choices(WORDS, k=max(2, 3 * words // (4 * turns))))
            conversations += [{"from": "human", "value": question + "?"}, {"from": "gpt", "value": answer + "."}]
        record = {"id": f"r{index}", "conversations": conversations}
        if rng.random() < 0.9:
            record["image"] = f"images/{index % 16}.png"
            conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
        records.append(record)
    return records


def build_parts(folder: str, hidden: int, layers: int):
    """A tiny CLIP tower and a Mistral LM (random weights, a BPE tokenizer on the words) as local folders."""
    tokenizer = make_tokenizer(512, [" ".join(WORDS)] * 20 + ["This is a dialog with AI assistant."], pad_token="<unk>")
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    vision.save_pretrained(f"{folder}/vision")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        f"{folder}/vision"
    )
    lm = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=max(1, hidden // 128),
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    lm.save_pretrained(f"{folder}/language")
    tokenizer.save_pretrained(f"{folder}/language")
    return f"{folder}/vision", f"{folder}/language"


def flags(output_dir, data_path, batch, **extra):
    values = {
        "data_path": data_path,
        "output_dir": output_dir,
        "num_train_epochs": 1,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 1000,
        "dataloader_num_workers": 0,
        "learning_rate": 1e-4,
        "seed": 0,
        "log_level": "error",
        **extra,
    }
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


def llava_pair_examples(records, omni_processor, llava_processor, image_folder):
    """Per model, one example per record from the same prompt text: ids, labels (text tokens only) and its image."""
    image_ids = {"OmniFusion": omni_processor.image_token_ids, "LLaVA": [llava_processor.image_token_id]}
    examples = {name: [] for name in common.NAMES}
    for record in records:
        messages = []
        for turn in record["conversations"]:
            text = turn["value"].replace("<image>\n", "")
            content = [{"type": "text", "text": text}]
            if turn["value"].startswith("<image>"):
                content.insert(0, {"type": "image"})
            messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
        prompt = omni_processor.apply_chat_template(messages, tokenize=False)
        images = [Image.open(f"{image_folder}/{record['image']}").convert("RGB")] if "image" in record else None
        for name, processor in zip(common.NAMES, (omni_processor, llava_processor)):
            encoded = processor(images=images, text=[prompt], return_tensors="pt")
            ids = encoded["input_ids"][0]
            labels = ids.clone()
            labels[torch.isin(ids, torch.tensor(image_ids[name]))] = -100
            example = {"input_ids": ids, "labels": labels}
            if images:
                example["pixel_values"] = encoded["pixel_values"]
            examples[name].append(example)
    return examples


def pad_collator(pad_token_id):
    def collate(features):
        width = max(len(feature["input_ids"]) for feature in features)
        batch = {
            "input_ids": torch.full((len(features), width), pad_token_id),
            "attention_mask": torch.zeros(len(features), width, dtype=torch.long),
            "labels": torch.full((len(features), width), -100),
        }
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            batch["input_ids"][row, :length] = feature["input_ids"]
            batch["attention_mask"][row, :length] = 1
            batch["labels"][row, :length] = feature["labels"]
        pixels = [feature["pixel_values"] for feature in features if "pixel_values" in feature]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch

    return collate


class InOrderTrainer(Trainer):
    """The Trainer with the dataset's own order, so that both models see exactly the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def compare_with_llava(args, work, records):
    """OmniFusion vs LlavaForConditionalGeneration, same Trainer, same records and batches; returns the table rows."""
    shape = types.SimpleNamespace(
        image_size=32,
        patch_size=8,
        vision_hidden=64,
        vision_layers=2,
        smollm2=False,
        text_hidden=args.hidden,
        text_layers=args.layers,
        vocab_size=1024,
    )
    omni_processor, llava_processor = common.make_processors(shape)
    for processor in (omni_processor, llava_processor):
        processor.tokenizer.padding_side = "right"
    configs = common.make_configs(shape, omni_processor)
    pad = omni_processor.tokenizer.pad_token_id
    models = {name: common.build_model(name, configs, pad) for name in common.NAMES}
    common.copy_weights(models["OmniFusion"], models["LLaVA"])
    for model in models.values():
        model.model.vision_tower.requires_grad_(False)
        model.train()
    chosen = records[: args.llava_steps * args.batch]
    examples = llava_pair_examples(chosen, omni_processor, llava_processor, f"{work}/data")
    with torch.no_grad():  # same image features: the towers and the adapter/projector really are the same
        pixels = next(example["pixel_values"] for example in examples["LLaVA"] if "pixel_values" in example)
        features = [
            torch.cat(list(models[name].model.get_image_features(pixels).pooler_output)) for name in common.NAMES
        ]
        torch.testing.assert_close(features[0], features[1])
    for omni, llava in zip(examples["OmniFusion"], examples["LLaVA"]):  # same text everywhere else
        keep = omni["labels"] != -100
        if not torch.equal(omni["input_ids"][keep], llava["input_ids"][llava["labels"] != -100]):
            raise AssertionError("OmniFusion's and LLaVA's examples differ outside the image block")
    positions = {}
    for name, items in examples.items():
        batches = [items[start : start + args.batch] for start in range(0, len(items), args.batch)]
        positions[name] = sum(max(len(item["input_ids"]) for item in batch) * len(batch) for batch in batches)
    text_tokens = sum(int((example["labels"] != -100).sum()) for example in examples["LLaVA"])

    def train(name, steps):
        training_args = TrainingArguments(
            output_dir=f"{work}/llava-pair-{name}",
            max_steps=steps,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-4,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=1000,
            dataloader_num_workers=0,
            seed=0,
            use_cpu=True,
            log_level="error",
            remove_unused_columns=False,
        )
        trainer = InOrderTrainer(
            model=models[name], args=training_args, train_dataset=examples[name], data_collator=pad_collator(pad)
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        return trainer.state.log_history[-1]["train_runtime"]

    for name in common.NAMES:  # untimed warm-up (first-call allocations and kernel choices)
        train(name, 1)
    times = {name: [] for name in common.NAMES}
    ratios = []
    for round_index in range(args.llava_rounds):
        order = common.NAMES if round_index % 2 == 0 else common.NAMES[::-1]
        for name in order:
            times[name].append(train(name, args.llava_steps))
        ratios.append(times["OmniFusion"][-1] / times["LLaVA"][-1])
        print(
            f"round {round_index + 1} OmniFusion {times['OmniFusion'][-1]:.1f} s, LLaVA {times['LLaVA'][-1]:.1f} s",
            flush=True,
        )
    return {
        "times": times,
        "ratio": statistics.median(ratios),
        "positions": positions,
        "text_tokens": text_tokens,
        "records": len(chosen),
        "images": sum("image" in record for record in chosen),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length_scale", type=float, default=0.25, help="text lengths x this (CPU-sized)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="each mode runs this many times; the best is kept")
    parser.add_argument(
        "--llava_steps",
        type=int,
        default=4,
        help="training steps per OmniFusion / LLaVA run (records used: this x --batch)",
    )
    parser.add_argument(
        "--llava_rounds",
        type=int,
        default=4,
        help="interleaved OmniFusion / LLaVA rounds; the median per-round time ratio is reported",
    )
    args = parser.parse_args()
    common.configure(args.threads)
    work = tempfile.mkdtemp(prefix="benchmark-training-")
    vision, language = build_parts(work, args.hidden, args.layers)
    os.makedirs(f"{work}/data/images")
    rng = np.random.default_rng(0)
    for index in range(16):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{work}/data/images/{index}.png")
    records = synthetic_records(args.records, args.length_scale, seed=0)
    data_path = f"{work}/data/train.json"
    with open(data_path, "w") as file:
        json.dump(records, file)
    stage1.main(
        ["--vision_model_name_or_path", vision, "--language_model_name_or_path", language, "--adapter_type", "mlp"]
        + flags(f"{work}/stage1", data_path, args.batch, max_steps=1)
    )

    modes = {"padded": {}, "grouped": {"group_by_length": True}, "packed": {"packing": True}}
    results = {}
    for round_index in range(args.rounds):
        for mode, extra in modes.items():
            trainer = stage2.train(
                ["--model_name_or_path", f"{work}/stage1"]
                + flags(f"{work}/{mode}-{round_index + 1}", data_path, args.batch, **extra)
            )  # a folder per run: the stage commands refuse a used one
            runtime = trainer.state.log_history[-1]["train_runtime"]
            dataset = trainer.train_dataset
            lengths = [len(dataset[index]["input_ids"]) for index in range(len(dataset))]
            tokens, sampler = sum(lengths), trainer._get_train_sampler()
            order = list(iter(sampler))
            batches = [order[start : start + args.batch] for start in range(0, len(order), args.batch)]
            padded_tokens = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
            computed = tokens if mode == "packed" else padded_tokens
            best = results.get(mode)
            if best is None or runtime < best["runtime"]:
                results[mode] = {"runtime": runtime, "tokens": tokens, "computed": computed}
            print(f"round {round_index + 1} {mode}: {runtime:.1f} s", flush=True)

    lengths = sorted(lengths)
    print("=" * 90)
    print(common.cpu_description())
    print(
        f"Stage-2 training throughput, {len(lengths)} records (90% with an image of 16 tokens), 1 epoch, batch "
        f"{args.batch}; LM Mistral hidden {args.hidden}, {args.layers} layers; torch threads {args.threads}; "
        f"1-min load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"sequence lengths (tokens): min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
        f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}"
    )
    print(f"{'mode':<10}{'time (s)':>10}{'real tokens/s':>16}{'computed/real':>16}{'vs padded':>12}")
    padded_rate = results["padded"]["tokens"] / results["padded"]["runtime"]
    for mode, result in results.items():
        rate = result["tokens"] / result["runtime"]
        print(
            f"{mode:<10}{result['runtime']:>10.1f}{rate:>16.0f}{result['computed'] / result['tokens']:>16.2f}"
            f"{rate / padded_rate:>12.2f}"
        )
    pair = compare_with_llava(args, work, records)
    print("-" * 90)
    print(
        f"OmniFusion vs LlavaForConditionalGeneration, same Trainer, {pair['records']} records "
        f"({pair['images']} with an image of 16 tokens), {args.llava_steps} padded batches of {args.batch}, vision "
        f"tower frozen, {args.llava_rounds} interleaved rounds; 1-min load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'model':<12}{'median time (s)':>16}{'computed positions':>20}{'text tokens/s':>16}")
    for name in common.NAMES:
        runtime = statistics.median(pair["times"][name])
        print(f"{name:<12}{runtime:>16.2f}{pair['positions'][name]:>20}{pair['text_tokens'] / runtime:>16.0f}")
    print(
        f"OmniFusion computes {pair['positions']['OmniFusion'] / pair['positions']['LLaVA']:.3f}x LLaVA's positions "
        "(its 2 image markers per image); the ratio below is of the time for the same batches"
    )
    print(f"omnifusion_llava_time_ratio={pair['ratio']:.3f}")
    speedup = (results["packed"]["tokens"] / results["packed"]["runtime"]) / padded_rate
    print(f"packing_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
