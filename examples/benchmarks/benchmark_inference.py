#!/usr/bin/env python
"""
Inference benchmark: OmniFusion against transformers' `LlavaForConditionalGeneration`, side by side in one process.

Both models are built here from the *same* random-initialised sub-configs (a CLIP vision tower, a Mistral LM) and the
MLP adapter, which is the same Linear-GELU-Linear as LLaVA's projector; the vision tower, adapter/projector, LM and
LM-head weights are copied from OmniFusion into LLaVA, so both do the same work wherever they overlap (the image
features of the two models are checked to be identical). The only architectural differences left are OmniFusion's:

* learned input-only marker embeddings (`OmniFusionTokenEmbedding`, a few extra elementwise ops per forward), and
* the two extra positions per image (`<image_start>`, `<image_end>` around the image block), so its prompts are
  two tokens longer per image than LLaVA's for the same text and image.

Measured (greedy `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`, so both produce exactly N tokens):

* prefill: `generate(max_new_tokens=1)` (vision tower + adapter + one LM forward over the prompt + first token);
* generate: `generate(max_new_tokens=N)` at batch 1 and batch `--batch` (8; one image per sample);
* decode per token, with an image in context and for a text-only prompt of the same total length (the image block's
  ids replaced by ordinary text tokens), for each model, two ways: [diff] `(generate(N) - generate(1)) / (N - 1)`
  from the medians, and [step] the median time between the starts of consecutive decode forwards inside
  `generate(N)` (a forward pre-hook timestamps them; N-2 samples per run, so much less noisy than [diff]);
* process CPU time (`time.process_time`) next to wall time, as a cross-check that is less sensitive to other
  processes competing for the cores;
* the cost of `OmniFusionTokenEmbedding` (marker lookup) against a plain `nn.Embedding` lookup of the same ids, per
  decode step;
* peak memory (unless `--no-memory`; Linux only): every model / batch runs `generate(N)` once in a fresh subprocess;
  the number is the growth of the process's peak resident set size (`VmHWM`, reset via `/proc/self/clear_refs` right
  before the call) over its resident size before the call: activations, KV cache and image features, not weights;
* the size of what `get_image_features` returns, which generate() holds for the whole call (deterministic).

Every timing is the median of `--repeats` runs after `--warmup` runs; OmniFusion and LLaVA run back to back (in
alternating order) so that drift of a noisy machine affects both equally, and the OmniFusion/LLaVA ratio of a prefill
or generate measurement is the median of the per-pair ratios (`common.py` sets `OMP_WAIT_POLICY=PASSIVE` unless it
is set). It asserts that OmniFusion's vision tower runs exactly once per `generate()` call, with all of a batch's
images in that one call, and never for a text-only prompt.

Run:  python examples/benchmarks/benchmark_inference.py               (2-4 minutes on 2 CPU cores)
      python examples/benchmarks/benchmark_inference.py --repeats 10  (steadier medians, about twice as long)
      python examples/benchmarks/benchmark_inference.py --quick       (smoke run: small sizes, no memory subprocesses)
On a machine shared with other work the timings are noisy (the header prints the load average): compare the
OmniFusion/LLaVA ratios, which come from back-to-back runs, rather than absolute times.
The last line is `ratio=<OmniFusion/LLaVA generate time>` (geometric mean of the batch-1 and batch-8 ratios).
"""

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

import common
import numpy as np
import torch
from common import NAMES, build_model, copy_weights, make_configs, make_processors, random_images

QUESTION = "Describe the image in detail. What objects are there, what colour are they and where are they?"
FILLER_TEXT = " the quick brown fox jumps over the lazy dog"
SMOLLM2_SIZE = common.SMOLLM2_SIZE


# ----------------------------------------------------------------------------------------------------------- setup


def make_inputs(omni_processor, llava_processor, batch, image_size):
    """Per model: the image prompt (one image per sample) and a text-only prompt of the same total length."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = omni_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = random_images(batch, image_size)
    inputs = {}
    for name, processor in zip(NAMES, (omni_processor, llava_processor)):
        with_image = dict(processor(images=images, text=[prompt] * batch, return_tensors="pt"))
        ids = with_image["input_ids"]
        image_ids = torch.tensor(getattr(processor, "image_token_ids", [processor.image_token_id]))
        in_image_block = torch.isin(ids, image_ids)
        filler = processor.tokenizer(FILLER_TEXT, add_special_tokens=False)["input_ids"]
        filler = torch.tensor(filler).repeat(int(in_image_block[0].sum()) // len(filler) + 1)
        text_ids = ids.clone()
        for row in range(batch):
            text_ids[row, in_image_block[row]] = filler[: int(in_image_block[row].sum())]
        text_only = {"input_ids": text_ids, "attention_mask": with_image["attention_mask"].clone()}
        inputs[name] = {"image": with_image, "text": text_only}
    return prompt, inputs


# -------------------------------------------------------------------------------------------------------- measuring


def rss_kib():
    """Current and peak resident set size of this process (Linux)."""
    with open("/proc/self/status") as f:
        status = f.read()
    return {key: int(re.search(key + r":\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def generate(model, inputs, new_tokens):
    return model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True
    )


@contextlib.contextmanager
def count_calls(module):
    """Counts forward calls of `module` and records the batch size of each."""
    batches = []
    handle = module.register_forward_hook(
        lambda mod, args, kwargs, out: batches.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True,
    )
    try:
        yield batches
    finally:
        handle.remove()


def check_single_vision_call(model, name, inputs, new_tokens, batch):
    """The vision tower must run once per generate(), with the whole batch's images in that one call."""
    with count_calls(model.model.vision_tower) as calls:
        out = generate(model, inputs, new_tokens)
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens, out.shape
    if name == "OmniFusion":
        assert calls == [batch], (
            f"OmniFusion's vision tower ran {len(calls)} times (batches {calls}) in one generate() of {new_tokens} "
            f"tokens at batch {batch}; expected exactly one call on all {batch} images"
        )
    return calls


def memory_worker(args):
    """Run in a fresh process: peak RSS growth of one generate(N) call of one model at one batch size."""
    omni_processor, llava_processor = make_processors(args)
    configs = make_configs(args, omni_processor)
    model = build_model(args.memory_worker, configs, omni_processor.tokenizer.pad_token_id)
    _, inputs = make_inputs(omni_processor, llava_processor, args.memory_batch, args.image_size)
    inputs = inputs[args.memory_worker]["image"]
    # Load lazily imported code paths with a tiny call, so their import is not counted as the model's memory.
    tiny = {k: v[:1, -4:] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    tiny["input_ids"] = tiny["input_ids"].clone().fill_(omni_processor.tokenizer.eos_token_id)
    generate(model, tiny, 2)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    before = rss_kib()
    generate(model, inputs, args.new_tokens)
    after = rss_kib()
    print(json.dumps({"peak_growth_mib": (after["VmHWM"] - before["VmRSS"]) / 1024, "weights_mib": weights_mib}))


def measure_memory(args):
    """Peak-RSS growth during generate(N), each model and batch size in its own fresh subprocess."""
    forwarded = []
    for key in (
        "image_size",
        "patch_size",
        "vision_hidden",
        "vision_layers",
        "text_hidden",
        "text_layers",
        "vocab_size",
        "new_tokens",
        "threads",
    ):
        forwarded += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    forwarded += ["--smollm2"] if args.smollm2 else []
    results = {}
    for batch in (1, args.batch):
        for name in NAMES:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", name, "--memory-batch", str(batch)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            proc = subprocess.run(cmd + forwarded, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"memory worker {name} b{batch} failed:\n{proc.stderr[-3000:]}")
            results[name, batch] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


class StepTimer:
    """Timestamps every forward call of a model (prefill, then one per decoded token) inside generate()."""

    def __init__(self, model):
        self.stamps = []
        self.handle = model.register_forward_pre_hook(lambda module, args: self.stamps.append(time.perf_counter()))

    def run(self, model, inputs, new_tokens):
        """
        Returns (wall seconds, process CPU seconds, per-token decode intervals). An interval is the time between the
        starts of two consecutive decode forwards: one full decoding step (forward, logits processing, greedy pick,
        cache and mask bookkeeping).
        """
        self.stamps.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        generate(model, inputs, new_tokens)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        assert len(self.stamps) == new_tokens, (len(self.stamps), new_tokens)
        return total, cpu, list(np.diff(self.stamps[1:]))


def encoder_output_mib(model, pixel_values):
    """
    MiB of the tensors in what `get_image_features` returns, the object generate() keeps in `mm_encoder_outputs`
    for the whole call (called exactly as generate() calls it). Tensors sharing storage are counted once.
    """
    with torch.no_grad():
        output = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    tensors = []
    for value in output.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        tensors += [item for item in items if isinstance(item, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    hidden_states = output.hidden_states or ()
    kept = sum(item is not None for item in hidden_states)
    return sum(storages.values()) / 2**20, kept, len(hidden_states)


def embedding_cost(model, batch, repeats=300):
    """Median seconds of OmniFusionTokenEmbedding and of a plain nn.Embedding lookup on one decode step's ids."""
    embedding = model.get_input_embeddings()
    ids = torch.randint(0, 100, (batch, 1))
    ids[0, 0] = model.config.user_token_id  # one marker id in the batch, so the special path is exercised
    marker, plain = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            embedding(ids)
            t1 = time.perf_counter()
            torch.nn.functional.embedding(ids, embedding.weight)
            t2 = time.perf_counter()
            marker.append(t1 - t0)
            plain.append(t2 - t1)
    return statistics.median(marker), statistics.median(plain)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few tokens and repeats: a <30 s smoke run")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-hidden", type=int, default=512)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per generate() call (N)")
    parser.add_argument("--batch", type=int, default=8, help="the large batch size (the small one is always 1)")
    parser.add_argument("--repeats", type=int, default=4, help="timed runs per measurement (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per measurement before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="the LM at SmolLM2-135M's size and shape (Llama, hidden 576, 30 layers, 9/3 heads, vocab "
        "49152; random weights), instead of --text-hidden/--text-layers/--vocab-size",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory", action="store_true", help="measure peak memory with --quick too")
    parser.add_argument("--memory-worker", choices=NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--memory-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.vision_hidden, args.vision_layers = 112, 256, 2
        args.text_hidden, args.text_layers, args.vocab_size = 256, 2, 8000
        args.new_tokens, args.repeats, args.warmup, args.batch = 8, 3, 1, 4
        args.no_memory = not args.memory
    if args.smollm2:
        args.text_hidden, args.text_layers, args.vocab_size = (SMOLLM2_SIZE[key] for key in SMOLLM2_SIZE)
    assert args.new_tokens >= 2, "--new-tokens must be at least 2 to measure decoding"

    warnings.filterwarnings("ignore")
    common.configure(args.threads)
    if args.memory_worker:
        return memory_worker(args)

    start = time.perf_counter()
    load_before = os.getloadavg()
    omni_processor, llava_processor = make_processors(args)
    configs = make_configs(args, omni_processor)
    omni_config = configs[0]
    pad = omni_processor.tokenizer.pad_token_id
    models = {name: build_model(name, configs, pad) for name in NAMES}
    copy_weights(models["OmniFusion"], models["LLaVA"])

    prompt, inputs_b1 = make_inputs(omni_processor, llava_processor, 1, args.image_size)
    _, inputs_bn = make_inputs(omni_processor, llava_processor, args.batch, args.image_size)
    inputs = {1: inputs_b1, args.batch: inputs_bn}

    # Same work where the models overlap: identical image features, identical text ids outside the image block.
    with torch.no_grad():
        pixels = inputs_b1["OmniFusion"]["image"]["pixel_values"]
        assert torch.equal(pixels, inputs_b1["LLaVA"]["image"]["pixel_values"])
        feats = [torch.cat(list(models[n].model.get_image_features(pixels).pooler_output)) for n in NAMES]
        torch.testing.assert_close(feats[0], feats[1])
    omni_ids, llava_ids = inputs_b1["OmniFusion"]["image"]["input_ids"][0], inputs_b1["LLaVA"]["image"]["input_ids"][0]
    keep = ~torch.isin(omni_ids, torch.tensor([omni_processor.image_start_token_id, omni_processor.image_end_token_id]))
    assert torch.equal(omni_ids[keep], llava_ids), "the two prompts differ outside OmniFusion's image markers"
    seq_len = {name: inputs_b1[name]["image"]["input_ids"].shape[1] for name in NAMES}

    # OmniFusion's vision tower runs exactly once per generate(), on all images of the batch (asserted).
    vision_calls = {}
    for batch in (1, args.batch):
        for name in NAMES:
            vision_calls[name, batch] = check_single_vision_call(
                models[name], name, inputs[batch][name]["image"], args.new_tokens, batch
            )
    # Text-only prompts must not touch the vision tower at all.
    with count_calls(models["OmniFusion"].model.vision_tower) as calls:
        generate(models["OmniFusion"], inputs_b1["OmniFusion"]["text"], 2)
    assert calls == [], calls

    # Timings: every repetition runs every case for both models, back to back, in alternating order.
    cases = [(batch, kind, n) for batch in (1, args.batch) for kind in ("image", "text") for n in (1, args.new_tokens)]
    times = {(name, *case): [] for name in NAMES for case in cases}
    cpu_times = {(name, *case): [] for name in NAMES for case in cases}
    steps = {(name, batch, kind): [] for name in NAMES for batch in (1, args.batch) for kind in ("image", "text")}
    timers = {name: StepTimer(models[name]) for name in NAMES}
    for rep in range(args.warmup + args.repeats):
        for index, case in enumerate(cases):
            batch, kind, n = case
            for name in NAMES if (rep + index) % 2 == 0 else NAMES[::-1]:
                total, cpu, intervals = timers[name].run(models[name], inputs[batch][name][kind], n)
                if rep >= args.warmup:
                    times[(name, *case)].append(total)
                    cpu_times[(name, *case)].append(cpu)
                    steps[name, batch, kind] += intervals
    med = {key: statistics.median(value) for key, value in times.items()}
    spread = {key: (max(v) - min(v)) / statistics.median(v) for key, v in times.items()}
    step_med = {key: statistics.median(value) for key, value in steps.items()}
    # OmniFusion/LLaVA per case: the median over repetitions of the ratio of the two back-to-back runs, which cancels
    # load changes slower than one pair of runs better than the ratio of the two medians does.
    paired = {
        case: statistics.median(o / v for o, v in zip(times[("OmniFusion", *case)], times[("LLaVA", *case)]))
        for case in cases
    }
    cpu_paired = {
        case: statistics.median(o / v for o, v in zip(cpu_times[("OmniFusion", *case)], cpu_times[("LLaVA", *case)]))
        for case in cases
    }
    for timer in timers.values():
        timer.handle.remove()
    embed_cost = {batch: embedding_cost(models["OmniFusion"], batch) for batch in (1, args.batch)}
    held = {name: encoder_output_mib(models[name], inputs_bn[name]["image"]["pixel_values"]) for name in NAMES}
    load_after = os.getloadavg()

    memory = None
    if not args.no_memory and os.access("/proc/self/clear_refs", os.W_OK):
        memory = measure_memory(args)
    elif not args.no_memory:
        print("peak memory skipped: it needs Linux's /proc/self/clear_refs", file=sys.stderr)
    total = time.perf_counter() - start

    # ---------------------------------------------------------------------------------------------------- report
    n, big = args.new_tokens, args.batch
    batches = (1, big)
    nparams = {name: sum(p.numel() for p in models[name].parameters()) for name in NAMES}
    print("=" * 100)
    print("OmniFusion vs LLaVA (transformers LlavaForConditionalGeneration) inference benchmark, one process, CPU")
    print(common.cpu_description())
    print(
        f"torch {torch.__version__}, float32, sdpa attention, torch.set_num_threads({args.threads}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {os.cpu_count()} CPUs, 1-min load average "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after timing (above the CPU count = other processes "
        "competed for the cores: expect noise)"
    )
    print(
        f"vision: CLIP {args.image_size}px, patch {args.patch_size}, hidden {args.vision_hidden}, "
        f"{args.vision_layers} layers -> {omni_config.num_image_tokens} image tokens per image "
        "(layer -2, CLS dropped)"
    )
    print(
        f"adapter: Linear({args.vision_hidden}->{args.text_hidden})-GELU-Linear({args.text_hidden}->"
        f"{args.text_hidden}): OmniFusion adapter_type='mlp' = LLaVA's projector"
    )
    lm_kind = "Llama (SmolLM2-135M shape)" if args.smollm2 else "Mistral"
    print(
        f"LM: {lm_kind} hidden {args.text_hidden}, {args.text_layers} layers, vocab {args.vocab_size}; parameters "
        f"OmniFusion {nparams['OmniFusion'] / 1e6:.3f}M, LLaVA {nparams['LLaVA'] / 1e6:.3f}M (+ the "
        f"{len(omni_config.special_token_ids)} learned marker rows)"
    )
    print(
        "weights: vision tower, adapter = projector, LM and LM head copied OmniFusion -> LLaVA (image features equal)"
    )
    print(
        f"prompt: {prompt!r} -> {seq_len['OmniFusion']} tokens for OmniFusion, {seq_len['LLaVA']} for LLaVA "
        f"(OmniFusion puts <image_start>/<image_end> around each image block); batch {big}: {big} such prompts and "
        f"{big} images"
    )
    print("text-only prompts: the same ids with the image block replaced by ordinary text ids (same length, no pixels)")
    print(
        f"timing: greedy generate(max_new_tokens=N, min_new_tokens=N), N={n}; median of {args.repeats} runs after "
        f"{args.warmup} warm-up, the two models back to back in alternating order; prefill = generate(N=1)"
    )
    print(
        "decode/token: [diff] = (generate(N) - generate(1)) / (N-1); [step] = median time between the starts of "
        "consecutive decode forwards inside generate(N) (N-2 samples per run: the robust one)"
    )
    if memory is not None:
        print(
            "peak memory: generate(N) once per model and batch, each in a fresh subprocess: growth of the peak "
            "resident set (VmHWM, reset just before the call) over the resident set before it = activations, KV "
            "cache, image features (not weights); allocator-dependent, +-10% between runs"
        )
    for batch in batches:
        calls = ", ".join(
            f"{name} {len(vision_calls[name, batch])} call(s) with {vision_calls[name, batch]} images" for name in NAMES
        )
        print(f"vision tower per generate(N={n}) at batch {batch}: {calls}")
    print("-" * 100)

    rows = []

    def row(label, values, fmt, ratio=None):
        ratio = values[0] / values[1] if ratio is None else ratio
        rows.append((label, [fmt(v) for v in values], f"{ratio:.3f}"))

    decode = {  # the brief's definition, from the medians
        (name, batch, kind): (med[name, batch, kind, n] - med[name, batch, kind, 1]) / (n - 1)
        for name in NAMES
        for batch in batches
        for kind in ("image", "text")
    }
    ms = lambda v: f"{v * 1e3:9.1f} ms"  # noqa: E731
    mib = lambda v: f"{v:8.1f} MiB"  # noqa: E731
    for batch in batches:
        for kind, label in (("image", "image"), ("text", "text-only")):
            row(f"prefill b{batch} ({label})", [med[x, batch, kind, 1] for x in NAMES], ms, paired[batch, kind, 1])
        for kind, label in (("image", "image"), ("text", "text-only")):
            row(
                f"generate N={n} b{batch} ({label})",
                [med[x, batch, kind, n] for x in NAMES],
                ms,
                paired[batch, kind, n],
            )
        for how, values in (("diff", decode), ("step", step_med)):
            for kind, label in (("image", "image"), ("text", "text-only")):
                row(f"decode/token b{batch} ({label}) [{how}]", [values[x, batch, kind] for x in NAMES], ms)
        row(
            f"decode tokens/s b{batch} (image) [step]",
            [batch / step_med[x, batch, "image"] for x in NAMES],
            lambda v: f"{v:9.1f} t/s",
        )
    if memory is not None:
        for batch in batches:
            row(f"peak memory growth b{batch}", [memory[x, batch]["peak_growth_mib"] for x in NAMES], mib)
        row("weights", [memory[x, 1]["weights_mib"] for x in NAMES], mib)
    row(f"image-encoder output held b{big}", [held[x][0] for x in NAMES], mib)

    print(
        "Omni/LLaVA: prefill and generate rows: median over the repetitions of each back-to-back pair's ratio; "
        "other rows: ratio of the two columns"
    )
    print(f"{'measurement':36s}{'OmniFusion':>16s}{'LLaVA':>16s}{'Omni/LLaVA':>12s}")
    for label, values, ratio in rows:
        print(f"{label:36s}{values[0]:>16s}{values[1]:>16s}{ratio:>12s}")
    print(
        f"(image-encoder output held = the tensors get_image_features returns, which generate() keeps in "
        f"mm_encoder_outputs for the whole call; vision hidden states among them: OmniFusion {held['OmniFusion'][1]}"
        f", LLaVA {held['LLaVA'][1]}, of {held['OmniFusion'][2]})"
    )
    print(f"(largest spread (max-min)/median of any timed cell: {max(spread.values()):.0%})")
    print("-" * 100)

    gen_ratio = {b: paired[b, "image", n] for b in batches}
    geo = math.sqrt(gen_ratio[1] * gen_ratio[big])
    print(
        "OmniFusion/LLaVA wall time: "
        + ", ".join(
            [f"prefill b{b} {paired[b, 'image', 1]:.3f}" for b in batches]
            + [f"generate b{b} {gen_ratio[b]:.3f}" for b in batches]
        )
    )
    print(
        "OmniFusion/LLaVA CPU time (process_time, cross-check): "
        + ", ".join(
            [f"prefill b{b} {cpu_paired[b, 'image', 1]:.3f}" for b in batches]
            + [f"generate b{b} {cpu_paired[b, 'image', n]:.3f}" for b in batches]
        )
    )
    print(
        "marker embedding, OmniFusionTokenEmbedding vs a plain embedding lookup, per decode step: "
        + ", ".join(
            f"b{b} {embed_cost[b][0] * 1e6:.0f} us vs {embed_cost[b][1] * 1e6:.0f} us "
            f"(+{100 * (embed_cost[b][0] - embed_cost[b][1]) / step_med['OmniFusion', b, 'image']:.2f}% of a step)"
            for b in batches
        )
    )
    img_txt = {
        (name, b, how): values[name, b, "image"] / values[name, b, "text"]
        for name in NAMES
        for b in batches
        for how, values in (("diff", decode), ("step", step_med))
    }
    for name in NAMES:
        print(
            f"decode/token with image / text-only, {name}: "
            + ", ".join(
                f"b{b} {img_txt[name, b, 'step']:.3f} [step] {img_txt[name, b, 'diff']:.3f} [diff]" for b in batches
            )
        )
    decode_ok = all(img_txt["OmniFusion", b, "step"] <= 1.2 for b in batches)
    print(
        f"expected: OmniFusion/LLaVA generate <= 1.05: {'ok' if geo <= 1.05 else 'EXCEEDED'}; OmniFusion decode "
        f"with image / text-only [step] <= 1.2: {'ok' if decode_ok else 'EXCEEDED'}"
    )
    print(f"benchmark time {total:.0f} s")
    print(f"ratio = geometric mean of the batch-1 and batch-{big} OmniFusion/LLaVA generate(N={n}) time ratios")
    print(f"ratio={geo:.3f}")


if __name__ == "__main__":
    main()
