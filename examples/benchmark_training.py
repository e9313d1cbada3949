#!/usr/bin/env python
"""
Training benchmark: stage-2 tokens/s with padded, length-grouped and packed batches, side by side in one run.

The data is synthetic with a length mix shaped like LLaVA-v1.5-665k's (most records a short VQA exchange, a third
medium multi-turn dialogs, a tail of long ones; lengths scaled down by `--length_scale` to fit a CPU): 90 % of the
records carry an image. Every mode trains the same small OmniFusion (a tiny CLIP tower, a 4-layer Mistral LM) for one
epoch over the same records through `train_stage2_sft.py` (so the real collators, samplers and Trainer), and reports
real (non-padding) tokens per second of training time:

* padded: random order, each batch padded to its longest record (the default);
* grouped: `--group_by_length` (batches of similar lengths, still padded);
* packed: `--packing` (each batch's records in one row, no padding).

Run:  python examples/benchmark_training.py [--records 192] [--batch 8]
The last line is `packing_speedup=<packed / padded tokens/s>`.
"""

import argparse
import json
import os
import random
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_stage1_pretrain  # noqa: E402
import train_stage2_sft  # noqa: E402
from quickstart import train_tokenizer  # noqa: E402


WORDS = ("red blue green yellow circle square triangle left right top bottom one two three the a is are there "
         "what where how many shape colour image picture shows small large near far next to above below").split()
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
    tokenizer = train_tokenizer([" ".join(WORDS)] * 20 + ["This is a dialog with AI assistant."])
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4))
    vision.save_pretrained(f"{folder}/vision")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        f"{folder}/vision")
    lm = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                          num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    lm.save_pretrained(f"{folder}/language")
    tokenizer.save_pretrained(f"{folder}/language")
    return f"{folder}/vision", f"{folder}/language"


def flags(output_dir, data_path, batch, **extra):
    values = {"data_path": data_path, "output_dir": output_dir, "num_train_epochs": 1,
              "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "save_strategy": "no",
              "report_to": "none", "disable_tqdm": True, "logging_steps": 1000, "dataloader_num_workers": 0,
              "learning_rate": 1e-4, "seed": 0, "log_level": "error", **extra}
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--records", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length_scale", type=float, default=0.25, help="text lengths x this (CPU-sized)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="each mode runs this many times; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
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
    train_stage1_pretrain.main(
        ["--vision_model_name_or_path", vision, "--language_model_name_or_path", language, "--adapter_type", "mlp"]
        + flags(f"{work}/stage1", data_path, args.batch, max_steps=1)
    )

    modes = {"padded": {}, "grouped": {"group_by_length": True}, "packed": {"packing": True}}
    results = {}
    for round_index in range(args.rounds):
        for mode, extra in modes.items():
            trainer = train_stage2_sft.main(["--model_name_or_path", f"{work}/stage1"]
                                            + flags(f"{work}/{mode}", data_path, args.batch, **extra))
            runtime = trainer.state.log_history[-1]["train_runtime"]
            dataset = trainer.train_dataset
            lengths = [len(dataset[index]["input_ids"]) for index in range(len(dataset))]
            tokens, sampler = sum(lengths), trainer._get_train_sampler()
            order = list(iter(sampler))
            batches = [order[start:start + args.batch] for start in range(0, len(order), args.batch)]
            padded_tokens = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
            computed = tokens if mode == "packed" else padded_tokens
            best = results.get(mode)
            if best is None or runtime < best["runtime"]:
                results[mode] = {"runtime": runtime, "tokens": tokens, "computed": computed}
            print(f"round {round_index + 1} {mode}: {runtime:.1f} s", flush=True)

    lengths = sorted(lengths)
    print("=" * 90)
    print(f"Stage-2 training throughput, {len(lengths)} records (90% with an image of 16 tokens), 1 epoch, batch "
          f"{args.batch}; LM Mistral hidden {args.hidden}, {args.layers} layers; torch threads {args.threads}; "
          f"1-min load {os.getloadavg()[0]:.1f}")
    print(f"sequence lengths (tokens): min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
          f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}")
    print(f"{'mode':<10}{'time (s)':>10}{'real tokens/s':>16}{'computed/real':>16}{'vs padded':>12}")
    padded_rate = results["padded"]["tokens"] / results["padded"]["runtime"]
    for mode, result in results.items():
        rate = result["tokens"] / result["runtime"]
        print(f"{mode:<10}{result['runtime']:>10.1f}{rate:>16.0f}{result['computed'] / result['tokens']:>16.2f}"
              f"{rate / padded_rate:>12.2f}")
    speedup = (results["packed"]["tokens"] / results["packed"]["runtime"]) / padded_rate
    print(f"packing_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
