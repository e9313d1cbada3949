#!/usr/bin/env python
"""
Vision-side variants of OmniFusion side by side in one process: prefill and generate time of

* `one_encoder`: one CLIP-architecture tower, the MLP adapter (576 image positions at 336 px);
* `mix_sum`: the same CLIP tower plus a DINOv2-architecture tower of the same size, the report's projection &
  summation adapter (`adapter_type="mix_sum"`): still 576 positions, one more tower forward and every hidden state
  through a LayerNorm + Linear;
* `tiles`: the one-encoder model with `image_grid_pinpoints=[[672, 672]]` (2x2 tiles + the global view: 5 x 576 =
  2880 positions for a 672 px image).

All three share the random LM (Mistral architecture) and the CLIP tower weights; the image is the same 672 x 672
picture. Timed: `vision` (`get_image_features`), `prefill` (`generate(max_new_tokens=1)`: towers + adapter + one LM
forward over the prompt) and `generate` (`generate(max_new_tokens=N, min_new_tokens=N)`), each the median of
`--repeats` runs after a warm-up, the variants interleaved so that drift of a shared machine hits all equally; the
ratios to `one_encoder` are medians of per-round ratios, of wall time and (`cpu`) of process CPU time. Expected: the
mix costs about one more tower forward and no more LM time; tiles cost about 5x the image positions (5 tower forwards
and a 5x longer prompt).

Run:  python examples/benchmarks/benchmark_vision_variants.py              (about 1-3 minutes on 2 CPU cores)
      python examples/benchmarks/benchmark_vision_variants.py --quick      (smoke run, small sizes, seconds)
The last line is `mix_sum_prefill_ratio=<x> tiles_prefill_ratio=<y>`.
"""

import os
import statistics
from dataclasses import dataclass, field

import common
import numpy as np
import torch
from common import make_tokenizer, timed
from PIL import Image
from transformers import (
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Dinov2Config,
    HfArgumentParser,
    MistralConfig,
)

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor

VARIANTS = ("one_encoder", "mix_sum", "tiles")


@dataclass
class BenchmarkArguments:
    image_size: int = field(default=336, metadata={"help": "Encoder input size (the tile size)."})
    patch_size: int = field(default=14, metadata={"help": "Encoder patch size (336/14: 576 positions per view)."})
    vision_hidden: int = field(default=256, metadata={"help": "Width of both towers."})
    vision_layers: int = field(default=6, metadata={"help": "Layers of each tower."})
    text_hidden: int = field(default=256, metadata={"help": "LM width."})
    text_layers: int = field(default=4, metadata={"help": "LM layers."})
    new_tokens: int = field(default=16, metadata={"help": "Tokens generated in the `generate` measurement."})
    repeats: int = field(default=5, metadata={"help": "Timed rounds (medians are reported)."})
    threads: int = field(default=2, metadata={"help": "torch threads."})
    quick: bool = field(default=False, metadata={"help": "Smoke run: 112 px, 2 layers, 2 rounds."})


def build_variants(args: BenchmarkArguments) -> dict[str, tuple[OmniFusionForCausalLM, OmniFusionProcessor]]:
    size = args.image_size
    clip_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    dinov2_processor = BitImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
    )
    tower = dict(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        image_size=size,
        patch_size=args.patch_size,
    )
    clip = CLIPVisionConfig(projection_dim=args.vision_hidden, **tower)
    dinov2 = Dinov2Config(mlp_ratio=4, **tower)
    tokenizer = make_tokenizer()
    base = OmniFusionProcessor(clip_processor, tokenizer)
    text = MistralConfig(
        vocab_size=len(tokenizer) - 5,
        hidden_size=args.text_hidden,
        intermediate_size=4 * args.text_hidden,
        num_hidden_layers=args.text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings = {
        "one_encoder": dict(vision_config=clip, adapter_type="mlp"),
        "mix_sum": dict(vision_config=[clip, dinov2], adapter_type="mix_sum"),
        "tiles": dict(vision_config=clip, adapter_type="mlp", image_grid_pinpoints=[[2 * size, 2 * size]]),
    }
    variants = {}
    for name, options in settings.items():
        torch.manual_seed(0)
        config = OmniFusionConfig(text_config=text, **base.special_token_ids, **options)
        model = OmniFusionForCausalLM(config).eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        processor = OmniFusionProcessor(
            clip_processor,
            tokenizer,
            extra_encoder_preprocessors=[dinov2_processor] if name == "mix_sum" else None,
            **config.processor_kwargs,
        )
        variants[name] = (model, processor)
    # the same LM and CLIP tower everywhere, so only the vision side differs
    reference = variants["one_encoder"][0]
    for name in ("mix_sum", "tiles"):
        model = variants[name][0]
        model.model.language_model.load_state_dict(reference.model.language_model.state_dict())
        model.lm_head.load_state_dict(reference.lm_head.state_dict())
        clip_tower = model.model.vision_tower[0] if name == "mix_sum" else model.model.vision_tower
        clip_tower.load_state_dict(reference.model.vision_tower.state_dict())
    return variants


def main():
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.quick:
        args.image_size, args.vision_layers, args.text_layers, args.repeats, args.new_tokens = 112, 2, 2, 2, 4
    common.configure(args.threads)
    variants = build_variants(args)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (2 * args.image_size, 2 * args.image_size, 3), dtype=np.uint8))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image in detail."}],
        }
    ]
    inputs = {
        name: processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        for name, (_, processor) in variants.items()
    }
    positions = {
        name: int((inputs[name]["input_ids"] == processor.image_token_id).sum())
        for name, (_, processor) in variants.items()
    }

    def generate(name, new_tokens):
        model = variants[name][0]
        return model.generate(**inputs[name], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    measures = {
        "vision": lambda name: variants[name][0].get_image_features(inputs[name]["pixel_values"]),
        "prefill": lambda name: generate(name, 1),
        "generate": lambda name: generate(name, args.new_tokens),
    }
    times = {measure: {name: [] for name in VARIANTS} for measure in measures}
    cpu_times = {measure: {name: [] for name in VARIANTS} for measure in measures}
    for round_index in range(args.repeats + 1):  # round 0 is the warm-up
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for measure, function in measures.items():
            for name in order:
                elapsed, cpu = timed(lambda: function(name))
                if round_index:
                    times[measure][name].append(elapsed)
                    cpu_times[measure][name].append(cpu)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(common.cpu_description())
    print(
        f"OmniFusion vision variants: {args.threads} threads, load average {load:.1f}, {args.repeats} rounds, "
        f"towers {args.vision_layers}x{args.vision_hidden} at {args.image_size}px/{args.patch_size}, "
        f"LM {args.text_layers}x{args.text_hidden}, {args.new_tokens} new tokens"
    )
    print(f"{'variant':<12} {'positions':>9} " + " ".join(f"{m + ' ms':>12} {'ratio':>6} {'cpu':>5}" for m in measures))
    ratios = {}
    for name in VARIANTS:
        cells = []
        for measure in measures:
            median = statistics.median(times[measure][name])
            ratio = statistics.median(a / b for a, b in zip(times[measure][name], times[measure]["one_encoder"]))
            cpu_ratio = statistics.median(
                a / b for a, b in zip(cpu_times[measure][name], cpu_times[measure]["one_encoder"])
            )
            ratios[(name, measure)] = ratio
            cells.append(f"{1000 * median:>12.1f} {ratio:>6.2f} {cpu_ratio:>5.2f}")
        print(f"{name:<12} {positions[name]:>9} " + " ".join(cells))
    print(
        f"positions ratio: mix_sum {positions['mix_sum'] / positions['one_encoder']:.2f}, "
        f"tiles {positions['tiles'] / positions['one_encoder']:.2f}"
    )
    print(
        f"mix_sum_prefill_ratio={ratios[('mix_sum', 'prefill')]:.2f} "
        f"tiles_prefill_ratio={ratios[('tiles', 'prefill')]:.2f}"
    )


if __name__ == "__main__":
    main()
