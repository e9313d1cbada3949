#!/usr/bin/env python
"""
CPU inference settings side by side on one random OmniFusion model: bfloat16 against float32, and the static KV cache
with a `torch.compile`d forward against the eager dynamic-cache path.

The model is `common.make_configs`' OmniFusion (a CLIP tower, the MLP adapter, a Llama/Mistral LM) at one of two LM
sizes: `--size smollm2` (SmolLM2-135M's shape: hidden 576, 30 layers, vocabulary 49,152) or `--size 1b` (a Mistral
LM of hidden 2048, 22 layers, vocabulary 32,000: 1.2 B parameters), one 224 px image and a short question.

`--mode dtype` (default): the float32 model and a bfloat16 copy of it, each timed on prefill (one forward over the
image + prompt) and on greedy decoding (time per token between the starts of consecutive LM forwards inside
`generate`), in wall and process CPU seconds (medians of `--repeats`), and the last-position logits of the two
compared (largest absolute difference, relative to the float32 logits' standard deviation, and whether the top
tokens agree). `modeling_omnifusion.inference.cpu_has_native_bfloat16()` is printed with them: without native
bfloat16 the bfloat16 path is emulated and slower.

`--mode static`: in `--dtype`, decoding with `cache_implementation="static"` eager, and static with the model's
forward compiled by `torch.compile` (the first call compiles; it is timed apart), against the default dynamic cache;
the generated tokens must be identical.

Run:  python examples/benchmarks/benchmark_cpu_dtype.py                      (SmolLM2 size, ~1 min on 2 cores)
      python examples/benchmarks/benchmark_cpu_dtype.py --size 1b            (~5 GB of memory, a few minutes)
      python examples/benchmarks/benchmark_cpu_dtype.py --mode static        (compiling takes minutes)
The last line is `bf16_prefill_speedup=<x> bf16_decode_speedup=<x> max_logit_diff=<x>` (dtype) or
`static_decode_speedup=<x> compiled_decode_speedup=<x> tokens_equal=<bool>` (static).
"""

import argparse
import copy
import statistics
import time
from types import SimpleNamespace

import common
import torch
from common import build_model, make_configs, make_processors, random_images

from modeling_omnifusion.inference import DTYPE_CHOICES, cpu_has_native_bfloat16, resolve_dtype

SIZES = {
    "smollm2": dict(text_hidden=576, text_layers=30, vocab_size=49152, smollm2=True),
    "1b": dict(text_hidden=2048, text_layers=22, vocab_size=32000, smollm2=False),
    "tiny": dict(text_hidden=64, text_layers=2, vocab_size=512, smollm2=False),
}
QUESTION = "Describe the image in detail. What objects are there?"


def make_inputs(size: str):
    args = SimpleNamespace(
        image_size=224 if size != "tiny" else 28, patch_size=14, vision_hidden=256 if size != "tiny" else 32,
        vision_layers=4 if size != "tiny" else 1, **SIZES[size],
    )  # fmt: skip
    omni_processor, llava_processor = make_processors(args)
    configs = make_configs(args, omni_processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = omni_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(omni_processor(images=random_images(1, args.image_size), text=[prompt], return_tensors="pt"))
    return configs, omni_processor.tokenizer.pad_token_id, inputs


def prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1).logits[0, -1].float()


def timed(function, repeats: int) -> tuple[float, float]:
    """Median wall and process CPU seconds of `function()` over `repeats` calls after one warm-up call."""
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def decode(model, inputs, new_tokens: int, **generate_kwargs) -> tuple[float, float, torch.Tensor]:
    """Wall and CPU seconds per decode step (between the starts of the 2nd and last LM forwards, over the steps) of
    one greedy `generate` of exactly `new_tokens` tokens, and the tokens."""
    stamps = []
    hook = model.register_forward_pre_hook(lambda *_: stamps.append((time.perf_counter(), time.process_time())))
    try:
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **generate_kwargs
            )
    finally:
        hook.remove()
    steps = len(stamps) - 2
    return (
        (stamps[-1][0] - stamps[1][0]) / steps,
        (stamps[-1][1] - stamps[1][1]) / steps,
        output[0, inputs["input_ids"].shape[1] :],
    )


def median_decode(model, inputs, new_tokens, repeats, **kwargs):
    runs = [decode(model, inputs, new_tokens, **kwargs) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2]


def run_dtype(args, model, inputs):
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    rows, logits, tokens = {}, {}, {}
    for name, m in models.items():
        prefill_wall, prefill_cpu = timed(lambda m=m: prefill(m, inputs), args.repeats)
        logits[name] = prefill(m, inputs)
        decode(m, inputs, 4)  # warm-up
        decode_wall, decode_cpu, tokens[name] = median_decode(m, inputs, args.new_tokens, args.repeats)
        rows[name] = (prefill_wall, prefill_cpu, decode_wall, decode_cpu)
        print(
            f"{name:9s} prefill {prefill_wall * 1e3:8.1f} ms ({prefill_cpu * 1e3:8.1f} CPU-ms)  decode "
            f"{decode_wall * 1e3:7.1f} ms/token ({decode_cpu * 1e3:7.1f} CPU-ms)",
            flush=True,
        )
    difference = (logits["bfloat16"] - logits["float32"]).abs().max().item()
    relative = difference / logits["float32"].std().item()
    same_top = bool(logits["bfloat16"].argmax() == logits["float32"].argmax())
    agree = (tokens["bfloat16"] == tokens["float32"]).float().mean().item()
    print(
        f"last-position logits: max |bf16 - fp32| {difference:.4f} ({relative:.3f} of the fp32 logits' std); "
        f"same top token {same_top}; greedy tokens equal at {agree:.0%} of {args.new_tokens} positions"
    )
    prefill_speedup = rows["float32"][1] / rows["bfloat16"][1]
    decode_speedup = rows["float32"][3] / rows["bfloat16"][3]
    print(f"bfloat16 over float32, per CPU-second: prefill {prefill_speedup:.2f}x, decode {decode_speedup:.2f}x")
    print(
        f"bf16_prefill_speedup={prefill_speedup:.3f} bf16_decode_speedup={decode_speedup:.3f} "
        f"max_logit_diff={difference:.4f}"
    )


def run_static(args, model, inputs):
    model = model.to(resolve_dtype(args.dtype))
    decode(model, inputs, 4)
    dynamic = median_decode(model, inputs, args.new_tokens, args.repeats)
    decode(model, inputs, 4, cache_implementation="static")
    static = median_decode(model, inputs, args.new_tokens, args.repeats, cache_implementation="static")
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, dynamic=False)
    start = time.perf_counter()
    decode(model, inputs, args.new_tokens, cache_implementation="static")
    compile_s = time.perf_counter() - start
    compiled = median_decode(model, inputs, args.new_tokens, args.repeats, cache_implementation="static")
    model.forward = eager_forward
    for name, (wall, cpu, _) in (("dynamic", dynamic), ("static", static), ("static+compile", compiled)):
        print(f"{name:15s} decode {wall * 1e3:7.1f} ms/token ({cpu * 1e3:7.1f} CPU-ms)")
    print(f"first compiled generate (compiling): {compile_s:.1f} s")
    equal = bool(torch.equal(dynamic[2], static[2]) and torch.equal(dynamic[2], compiled[2]))
    print(
        f"static_decode_speedup={dynamic[1] / static[1]:.3f} compiled_decode_speedup={dynamic[1] / compiled[1]:.3f} "
        f"tokens_equal={equal}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="smollm2")
    parser.add_argument("--mode", choices=("dtype", "static"), default="dtype")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="--mode static: the model's dtype")
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.new_tokens < 4:
        parser.error("--new_tokens must be at least 4")
    common.configure(args.threads)
    print(common.cpu_description())
    print(f"native bfloat16: {cpu_has_native_bfloat16()}; size {args.size}; {args.threads} threads")
    configs, pad_token_id, inputs = make_inputs(args.size)
    model = build_model("OmniFusion", configs, pad_token_id)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, {inputs['input_ids'].shape[1]} "
          "prompt positions")  # fmt: skip
    (run_dtype if args.mode == "dtype" else run_static)(args, model, inputs)


if __name__ == "__main__":
    main()
