"""
Quantized loading on CPU: per method, the memory it saves and the time it costs against float32 and bfloat16, and how
far its logits move from float32's, on an OmniFusion whose LM has SmolLM2-135M's shape (random weights; Llama, hidden
576, 30 layers, vocabulary 49,152, tied embeddings) with a small CLIP tower (224 px, 49 image tokens) and `mlp` adapter.

    python examples/benchmarks/benchmark_quantization.py           # the SmolLM2-135M-shaped LM, every method
    python examples/benchmarks/benchmark_quantization.py --quick   # a tiny model, one round (smoke test)

Methods: `float32` and `bfloat16` (unquantized), torchao `int8-weight-only` and `int8-dynamic` (int8 activations too),
bitsandbytes `bnb-8bit` (LLM.int8) and `bnb-4bit` (its default 4-bit type). Each loads one saved float32 folder with
`AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, ...)` and the model's own skip list (the
towers, adapters, marker table and `lm_head` stay unquantized), in a fresh process of its own; the methods run in
turn, `--passes` times (alternating order), and the medians over all rounds are reported. Per method:

- memory: the bytes the weights hold (torchao's inner tensors, bitsandbytes' packed data and scales), RSS growth
  over `from_pretrained` and peak RSS growth over loading, the timed forwards and `generate` calls (Linux:
  /proc/self/status; RSS includes the float32 file's pages the load touched);
- prefill: one forward over the prompt (an image and a question, ~`--prompt-tokens` positions); decode: the median
  time between the starts of consecutive greedy decoding steps (`--new-tokens`);
- logits: max and mean |difference| of the prompt's logits to float32's (the logits' own scale is printed), and the
  share of prompt positions whose top-1 token equals float32's.

Ratios are to float32 (bfloat16's own ratios are a row of their own). The last line is
`memory_vs_float32=<lowest>..<highest> decode_vs_float32=<lowest>..<highest>` over the four quantized methods (weight
bytes; decode step time).
"""

import common  # noqa: I001  (sets the benchmark environment before torch is imported)

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig

from modeling_omnifusion import OmniFusionForCausalLM
from modeling_omnifusion.testing import tiny

METHODS = ("float32", "bfloat16", "int8-weight-only", "int8-dynamic", "bnb-8bit", "bnb-4bit")
QUANTIZED = METHODS[2:]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds per method and pass.")
    parser.add_argument("--passes", type=int, default=1, help="Fresh processes per method (methods in turn).")
    parser.add_argument("--new-tokens", type=int, default=16, help="Greedy tokens per timed generate.")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="Prompt length to aim at (image included).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--quick", action="store_true", help="A tiny LM and tower, one pass of one round.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in args.methods if name not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; expected a comma-separated subset of {', '.join(METHODS)}")
    if "float32" not in args.methods:
        args.methods.insert(0, "float32")  # the reference of every ratio and logit difference
    for name in ("rounds", "passes", "new_tokens", "prompt_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at least 1")
    if args.quick:
        args.rounds, args.passes, args.new_tokens, args.prompt_tokens = 1, 1, 4, 48
    return args


# ------------------------------------------------------------------------------------------------ model and inputs


def build(quick: bool):
    """The random model in eval mode (float32) and its processor."""
    image_size, patch = (32, 8) if quick else (224, 32)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = tiny.make_processor(tokenizer=common.make_tokenizer())
    processor.image_processor = image_processor
    width, layers = (32, 2) if quick else (256, 4)
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        projection_dim=width,
    )
    lm = dict(common.SMOLLM2_SHAPE, hidden_size=576, num_hidden_layers=30, vocab_size=49152)
    if quick:
        lm = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
        lm.update(num_hidden_layers=2, vocab_size=1024)
    text = LlamaConfig(**lm, max_position_embeddings=2048, tie_word_embeddings=True)
    config = tiny.make_config(processor, vision=vision, adapter_type="mlp")
    config.text_config = text
    config.tie_word_embeddings = True  # as SmolLM2: `lm_head` is the token embedding table
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    torch.manual_seed(0)
    model = OmniFusionForCausalLM(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def make_inputs(processor, prompt_tokens: int) -> dict:
    """An image and a question, the question's text repeated until the prompt has about `prompt_tokens` positions."""
    sentence = common.PAIR_CORPUS[1] + " "
    text, inputs = sentence, None
    while inputs is None or inputs["input_ids"].shape[1] < prompt_tokens:
        inputs = processor.apply_chat_template(
            tiny.chat(text, images=common.random_images(1, processor.image_processor.crop_size["height"])),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        text += sentence
    return dict(inputs)


# -------------------------------------------------------------------------------------------------- one method


def rss_kib() -> dict:
    """Current and peak resident set size of this process in KiB (Linux)."""
    with open("/proc/self/status") as file:
        status = file.read()
    return {key: int(re.search(key + r":\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def tensor_bytes(tensor) -> int:
    """Bytes `tensor` holds: a torchao tensor subclass, its inner tensors; a bitsandbytes parameter, its packed data
    plus its scales (`SCB`, `quant_state`); any other tensor, its storage."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        inner = [getattr(tensor, name) for name in names]
        if not any(item is tensor for item in inner):
            return sum(tensor_bytes(item) for item in inner if isinstance(item, torch.Tensor))
    total = tensor.untyped_storage().nbytes()
    if isinstance(getattr(tensor, "SCB", None), torch.Tensor):
        total += tensor.SCB.untyped_storage().nbytes()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        packed = state.as_dict(packed=True).values()
        total += sum(value.untyped_storage().nbytes() for value in packed if isinstance(value, torch.Tensor))
    return total


def weights_mib(model) -> float:
    """What the model's parameters and buffers hold, each storage once (tied weights share one), in MiB."""
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        key = (
            type(tensor).__name__,
            tensor.data_ptr() if type(tensor) in (torch.Tensor, torch.nn.Parameter) else id(tensor),
        )
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(tensor)
    return total / 2**20


def load(folder: str, method: str):
    """`method`'s model from the float32 `folder`."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, TorchAoConfig

    kwargs = {"dtype": torch.bfloat16} if method == "bfloat16" else {"dtype": torch.float32}
    if method.startswith("int8"):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

        quant_type = Int8WeightOnlyConfig() if method == "int8-weight-only" else Int8DynamicActivationInt8WeightConfig()
        kwargs["quantization_config"] = TorchAoConfig(quant_type)
    elif method.startswith("bnb"):
        bits = {"bnb-8bit": {"load_in_8bit": True}, "bnb-4bit": {"load_in_4bit": True}}[method]
        kwargs["quantization_config"] = BitsAndBytesConfig(**bits)
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


def generate(model, inputs: dict, new_tokens: int):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def worker(args) -> dict:
    """Run in a fresh process: load `args.worker`'s model, time it, compare its logits to the saved float32 ones."""
    import bitsandbytes  # noqa: F401  (imported before memory is measured, like every library the methods use)
    import torchao.quantization  # noqa: F401
    import transformers  # noqa: F401

    common.configure(args.threads)
    inputs = torch.load(os.path.join(args.folder, "bench_inputs.pt"))
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset the peak RSS to the current RSS
    before = rss_kib()["VmRSS"]
    start = time.perf_counter()
    model = load(args.folder, args.worker)
    load_s = time.perf_counter() - start
    loaded = rss_kib()["VmRSS"]
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    stamps = []
    model.register_forward_pre_hook(lambda module, hook_args: stamps.append(time.perf_counter()))
    generate(model, inputs, 2)  # warm-up
    prefill, decode = [], []
    for _ in range(args.rounds):
        prefill.append(common.timed(lambda: model(**inputs, logits_to_keep=1))[0])
        stamps.clear()
        generate(model, inputs, args.new_tokens)
        decode += [later - earlier for earlier, later in zip(stamps[1:], stamps[2:])]
    result = {
        "weights_mib": weights_mib(model),
        "loaded_mib": (loaded - before) / 1024,
        "peak_mib": (rss_kib()["VmHWM"] - before) / 1024,
        "load_s": load_s,
        "prefill_s": prefill,
        "decode_s": decode,
    }
    reference_path = os.path.join(args.folder, "bench_float32_logits.pt")
    if args.worker == "float32" and not os.path.exists(reference_path):
        torch.save(logits, reference_path)
    reference = torch.load(reference_path)
    difference = (logits - reference).abs()
    result.update(
        max_diff=float(difference.max()),
        mean_diff=float(difference.mean()),
        top1_agree=float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        logit_scale=float(reference.abs().max()),
    )
    return result


def run_worker(args, method: str, folder: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--folder", folder]
    command += ["--rounds", str(args.rounds), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if process.returncode != 0:
        raise RuntimeError(f"the {method} worker failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------- report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("benchmark_quantization measures memory through Linux's /proc/self/clear_refs")
    common.configure(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model, processor = build(args.quick)
        inputs = make_inputs(processor, args.prompt_tokens)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        torch.save(inputs, os.path.join(folder, "bench_inputs.pt"))
        config, n_prompt = model.config, inputs["input_ids"].shape[1]
        del model
        gc.collect()
        runs = {method: [] for method in args.methods}
        for index in range(args.passes):
            order = args.methods if index % 2 == 0 else args.methods[::-1]
            for method in order:
                runs[method].append(run_worker(args, method, folder))
                print(f"pass {index + 1}/{args.passes}: {method} done", file=sys.stderr, flush=True)

    def median(method, key, scale=1.0):
        values = [run[key] for run in runs[method]]
        values = [value for run_values in values for value in run_values] if isinstance(values[0], list) else values
        return scale * statistics.median(values)

    rows = {
        method: {
            "weights_mib": median(method, "weights_mib"),
            "loaded_mib": median(method, "loaded_mib"),
            "peak_mib": median(method, "peak_mib"),
            "load_s": median(method, "load_s"),
            "prefill_ms": median(method, "prefill_s", 1000),
            "decode_ms": median(method, "decode_s", 1000),
            **{key: median(method, key) for key in ("max_diff", "mean_diff", "top1_agree", "logit_scale")},
        }
        for method in args.methods
    }
    spread = max(
        (max(values) - min(values)) / statistics.median(values)
        for method in args.methods
        for key in ("prefill_s", "decode_s")
        for values in [[value for run in runs[method] for value in run[key]]]
    )
    text, vision = config.text_config, config.vision_config
    print("=" * 118)
    print("Quantized loading on CPU: memory, prefill and decode time, logits against float32 (one saved folder)")
    print(common.cpu_description())
    print(
        f"torch {torch.__version__}; LM Llama hidden {text.hidden_size}, {text.num_hidden_layers} layers, vocabulary "
        f"{text.vocab_size}; CLIP tower {vision.hidden_size} wide, {vision.num_hidden_layers} layers,"
        f" {config.num_image_tokens} image tokens; prompt {n_prompt} positions, {args.new_tokens} new tokens; "
        f"{args.threads} threads, {args.passes} passes x {args.rounds} rounds"
    )
    print("-" * 118)
    header = (
        f"{'method':18s}{'weights':>8s}{'RSS loaded':>11s}{'peak RSS':>10s}{'load':>7s}{'prefill':>9s}{'decode':>9s}"
        f"{'mem/f32':>8s}{'mem/bf16':>9s}{'prefill/f32':>12s}{'decode/f32':>11s}{'max|dlogit|':>12s}{'top1':>7s}"
    )
    print(header)
    print(f"{'':18s}{'MiB':>8s}{'MiB':>11s}{'MiB':>10s}{'s':>7s}{'ms':>9s}{'ms/tok':>9s}")
    f32, bf16 = rows["float32"], rows.get("bfloat16")
    for method, row in rows.items():
        bf16_ratio = f"{row['weights_mib'] / bf16['weights_mib']:.2f}" if bf16 else "-"
        print(
            f"{method:18s}{row['weights_mib']:8.0f}{row['loaded_mib']:11.0f}{row['peak_mib']:10.0f}"
            f"{row['load_s']:7.1f}{row['prefill_ms']:9.1f}{row['decode_ms']:9.1f}"
            f"{row['weights_mib'] / f32['weights_mib']:8.2f}{bf16_ratio:>9s}"
            f"{row['prefill_ms'] / f32['prefill_ms']:12.2f}{row['decode_ms'] / f32['decode_ms']:11.2f}"
            f"{row['max_diff']:12.4f}{row['top1_agree']:7.3f}"
        )
    print("-" * 118)
    print(
        f"float32 logits: max |logit| {f32['logit_scale']:.3f}; mean |dlogit| per method: "
        + ", ".join(f"{method} {row['mean_diff']:.5f}" for method, row in rows.items() if method != "float32")
    )
    print(f"(largest spread (max-min)/median of any timed cell: {spread:.0%})")
    quantized = [method for method in args.methods if method in QUANTIZED] or args.methods
    memory = [rows[method]["weights_mib"] / f32["weights_mib"] for method in quantized]
    decode = [rows[method]["decode_ms"] / f32["decode_ms"] for method in quantized]
    print(
        f"memory_vs_float32={min(memory):.2f}..{max(memory):.2f} decode_vs_float32={min(decode):.2f}..{max(decode):.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
