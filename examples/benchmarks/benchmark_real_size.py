#!/usr/bin/env python
"""
Real-size benchmark: the released OmniFusion layout at the release's shapes (random weights), converted, loaded and run
on this machine, against the hardware's limits measured in the same process and against transformers'
`LlavaForConditionalGeneration` with the same shapes and weights.

Stages (a progress line on stderr for each):

1. write a released-layout checkpoint (`modeling_omnifusion.testing.released_shapes`: Mistral-7B-v0.1 + CLIP
   ViT-L/14-336 + the transformer adapter for `--shape 7b`) shard by shard, never holding it all in memory;
2. convert it with `omnifusion-convert` in a subprocess, sampling the subprocess's memory every 50 ms from
   `/proc/<pid>/status` (`VmRSS`, `RssAnon`; the peak of each): the converter must stream the weights through
   memory-mapped files, so its anonymous memory stays far below the checkpoint's size;
3. measure the hardware limits: bfloat16 and float32 matmul throughput at the model's own shapes (the LM's
   projections over the prompt, the vision tower's) and the memory bandwidth (a sum over a buffer larger than the
   caches), all per CPU-second of this process (`time.process_time`) and per wall second;
4. load the converted folder in bfloat16 (`--dtype`, default `auto`: `modeling_omnifusion.inference.resolve_dtype`)
   and time greedy `generate` with one image and a short prompt: time to first token (TTFT, from the call to the start
   of the second LM forward) and decode time per token (the rest over the remaining tokens), in wall and process CPU
   seconds, and the peak resident set (`VmHWM`, reset before the call);
5. the same with `LlavaForConditionalGeneration` loaded from the same converted weights (vision tower, LM, LM head;
   LLaVA's MLP projector random, OmniFusion's transformer adapter unused), after OmniFusion is freed: never both at
   once. LLaVA's prompt is OmniFusion's without the two image marker tokens.

Ratios, all per CPU-second used, so that a machine loaded by other processes neither hides nor fakes a gap:

* `ttft_roofline` = TTFT CPU-seconds / (prefill FLOPs / matmul FLOP per CPU-second): the vision tower up to the
  feature layer, the adapter and the LM over the prompt (causal attention counted once), at the rates measured at
  those shapes;
* `decode_roofline` = decode CPU-seconds per token / (bytes read per token / bandwidth per CPU-second): every LM weight
  but the input embedding table, plus the KV cache, at the rate the model's own weights are read (a sum over them, in
  place, before and after the timed calls; the 1 GiB buffer's rate is reported beside it);
* OmniFusion / LLaVA on TTFT and on decode time per token.

The converted folder and the released checkpoint are deleted at the end (`--keep` keeps them); `results.json` stays in
`--output_dir`. It refuses to start without the free disk (both checkpoints at once) and available memory (one
model in `--dtype` plus activations) it needs, saying how much.

Run:  python examples/benchmarks/benchmark_real_size.py --output_dir /tmp/real7b               (7B: ~35 GB disk,
      ~16 GB memory, 20-30 min on 2 cores)
      python examples/benchmarks/benchmark_real_size.py --shape 1b --output_dir /tmp/real1b     (a few minutes)
      python examples/benchmarks/benchmark_real_size.py --shape tiny --output_dir /tmp/realtiny (seconds; tests)
The last line is `ttft_roofline=<ratio> decode_roofline=<ratio> convert_peak_anon_gb=<value>` (OmniFusion's ratios).
"""

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import common
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from modeling_omnifusion.inference import DTYPE_CHOICES, resolve_dtype
from modeling_omnifusion.testing.released_shapes import SHAPES, Shape, checkpoint_bytes, write_released_checkpoint

GB = 1e9
DEVICE = torch.device("cpu")
QUESTION = "Describe the image in detail."
START = time.perf_counter()


def progress(message: str):
    """One timestamped progress line on stderr."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- resources


def meminfo(field: str = "MemAvailable") -> int:
    """A `/proc/meminfo` field in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
    except OSError:
        pass
    return 0


def requirements(shape: Shape, dtype: torch.dtype) -> tuple[int, int]:
    """`(disk bytes, memory bytes)` a run needs: the released checkpoint and the converted folder side by side, and one
    model in `dtype` with 8 % + 1.5 GB for activations, the KV cache, the libraries and the hardware probes."""
    weights = checkpoint_bytes(shape, torch.bfloat16)
    model = checkpoint_bytes(shape, dtype)
    return int(2 * weights * 1.05 + 0.5 * GB), int(model * 1.08 + 1.5 * GB)


def check_resources(output_dir: Path, shape_name: str, shape: Shape, dtype: torch.dtype):
    """Refuse (SystemExit naming what is needed and what there is) without the disk and memory a run needs."""
    disk, memory = requirements(shape, dtype)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"--output_dir {output_dir} cannot be created: {error.strerror}; not starting") from None
    free = shutil.disk_usage(output_dir).free
    available = meminfo()
    problems = []
    if free < disk:
        problems.append(f"{disk / GB:.1f} GB free disk under {output_dir} (there is {free / GB:.1f} GB)")
    if available and available < memory:
        problems.append(f"{memory / GB:.1f} GB available memory (MemAvailable is {available / GB:.1f} GB)")
    if problems:
        raise SystemExit(f"--shape {shape_name} needs " + " and ".join(problems) + "; not starting")
    progress(
        f"--shape {shape_name}: needs {disk / GB:.1f} GB disk ({free / GB:.1f} free), "
        f"{memory / GB:.1f} GB memory ({available / GB:.1f} available)"
    )


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The `kB` fields of `/proc/<pid>/status` in bytes (empty once the process is gone)."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    except (OSError, ValueError):
        pass
    return fields


class MemorySampler:
    """Samples `/proc/<pid>/status` every `interval` s on a thread: the peaks of `VmRSS` and `RssAnon` (and the last
    `VmHWM` seen, the kernel's own peak RSS)."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_anon = self.hwm = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, status: dict[str, int]):
        if status:
            self.samples += 1
            self.peak_rss = max(self.peak_rss, status.get("VmRSS", 0))
            self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
            self.hwm = max(self.hwm, status.get("VmHWM", 0))

    def _run(self):
        while not self._stop.is_set():
            self.add(proc_status(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def reset_peak_rss():
    """Reset this process's `VmHWM` to its current RSS (Linux; ignored where not allowed)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------- conversion


def convert(input_dir: Path, vision_model: Path, output_dir: Path) -> dict:
    """`omnifusion-convert` in a subprocess, its memory sampled; raises RuntimeError with its stderr if it fails."""
    executable = shutil.which("omnifusion-convert") or str(Path(sys.executable).parent / "omnifusion-convert")
    command = [executable, "--input_dir", str(input_dir), "--vision_model", str(vision_model)]
    command += ["--output_dir", str(output_dir)]
    log = output_dir.parent / "convert.log"
    start = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=stderr, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with MemorySampler(process.pid) as sampler:
            code = process.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"omnifusion-convert exited with {code}:\n{log.read_text()[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss_gb": sampler.peak_rss / GB,
        "peak_anon_gb": sampler.peak_anon / GB,
        "vm_hwm_gb": sampler.hwm / GB,
        "samples": sampler.samples,
        "output_gb": sum(f.stat().st_size for f in output_dir.glob("*.safetensors")) / GB,
    }


# ------------------------------------------------------------------------------------------------- hardware limits


def now() -> tuple[float, float]:
    """`(wall, CPU)` seconds: process CPU time on the CPU; on a CUDA device, wall time after synchronising for both
    (CPU time does not measure a GPU's work)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        wall = time.perf_counter()
        return wall, wall
    return time.perf_counter(), time.process_time()


def cpu_timed(function, min_cpu_seconds: float) -> tuple[float, float, int]:
    """Run `function()` (once to warm up, then until `min_cpu_seconds` of process CPU time); returns per-call
    `(wall seconds, CPU seconds, calls)` as the medians of 3 equal batches."""
    function()
    calls, start = 0, now()[1]
    while now()[1] - start < min_cpu_seconds / 3 or calls < 1:
        function()
        calls += 1
    walls, cpus = [], []
    for _ in range(3):
        wall, cpu = now()
        for _ in range(calls):
            function()
        end = now()
        walls.append((end[0] - wall) / calls)
        cpus.append((end[1] - cpu) / calls)
    return statistics.median(walls), statistics.median(cpus), calls


def matmul_rate(tokens: int, n_in: int, n_out: int, dtype: torch.dtype, min_cpu_seconds: float) -> dict:
    """FLOP per wall and per CPU second of `F.linear(x[tokens, n_in], W[n_out, n_in])` in `dtype`."""
    x = torch.randn(tokens, n_in).to(DEVICE, dtype)
    weight = (torch.randn(n_out, n_in) * 0.02).to(DEVICE, dtype)
    with torch.no_grad():
        wall, cpu, _ = cpu_timed(lambda: torch.nn.functional.linear(x, weight), min_cpu_seconds)
    flops = 2.0 * tokens * n_in * n_out
    return {"shape": [tokens, n_in, n_out], "flop_per_s": flops / wall, "flop_per_cpu_s": flops / cpu}


def bandwidth(nbytes: int, min_cpu_seconds: float) -> dict:
    """Read bandwidth: bytes per wall and per CPU second of `buffer.sum()` over an `nbytes` float32 buffer."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    with torch.no_grad():
        wall, cpu, _ = cpu_timed(lambda: buffer.sum(), min_cpu_seconds)
    return {"bytes": buffer.numel() * 4, "bytes_per_s": buffer.numel() * 4 / wall, "bytes_per_cpu_s": nbytes / cpu}


def decoded_weights(model) -> list[torch.Tensor]:
    """The weights a decode step reads, as they lie in memory: the LM's (its layers and final norm, not the input
    embedding table or the marker rows) and the LM head, in OmniFusion's and LLaVA's module names alike."""
    return [
        parameter
        for name, parameter in model.named_parameters()
        if ("language_model." in name and "embed_tokens" not in name) or name.startswith("lm_head.")
    ]


def weights_read_rate(model, repeats: int = 3) -> dict:
    """Read bandwidth over the model's own decoded weights (`decoded_weights`, summed in place): bytes per wall and
    per CPU second, the best of `repeats` passes. The weights' pages are where the decode step reads them from, and on
    a virtual machine the rate of those pages can differ from that of a fresh buffer by 1.7x, so the decode roofline
    is measured on them, just before and after the timed calls."""
    weights = decoded_weights(model)
    nbytes = sum(weight.numel() * weight.element_size() for weight in weights)
    best = (float("inf"), float("inf"))
    with torch.no_grad():
        for _ in range(repeats):
            start = now()
            for weight in weights:
                weight.sum()
            end = now()
            best = min(best, (end[0] - start[0], end[1] - start[1]))
    return {"bytes": nbytes, "bytes_per_s": nbytes / best[0], "bytes_per_cpu_s": nbytes / max(best[1], 1e-9)}


def hardware_limits(shape: Shape, prompt_length: int, dtype: torch.dtype, tiny: bool) -> dict:
    """Matmul rates (in `dtype` and float32) at the LM's and the vision tower's shapes, and the memory bandwidth."""
    seconds = 0.05 if tiny else 2.0
    vision_tokens = shape.num_image_tokens + 1
    shapes = {
        "lm_mlp": (prompt_length, shape.text_hidden, shape.text_intermediate),
        "lm_attention": (prompt_length, shape.text_hidden, shape.text_hidden),
        "vision_mlp": (vision_tokens, shape.vision_hidden, shape.vision_intermediate),
    }
    limits = {}
    for name, (tokens, n_in, n_out) in shapes.items():
        for label, kind in (("model", dtype), ("float32", torch.float32)):
            if label == "float32" and dtype == torch.float32:
                continue
            limits[f"{name}_{label}"] = matmul_rate(tokens, n_in, n_out, kind, seconds)
            progress(
                f"matmul {name} {str(kind).removeprefix('torch.')} {tokens}x{n_in}x{n_out}: "
                f"{limits[f'{name}_{label}']['flop_per_s'] / 1e9:.0f} GFLOP/s, "
                f"{limits[f'{name}_{label}']['flop_per_cpu_s'] / 1e9:.0f} GFLOP/CPU-s"
            )
    limits["bandwidth"] = bandwidth(64 * 2**20 if tiny else 2**30, seconds)
    progress(
        f"memory bandwidth: {limits['bandwidth']['bytes_per_s'] / GB:.1f} GB/s, "
        f"{limits['bandwidth']['bytes_per_cpu_s'] / GB:.1f} GB/CPU-s"
    )
    return limits


# ------------------------------------------------------------------------------------------------- rooflines


def prefill_flops(shape: Shape, prompt_length: int, vision_feature_layer: int = -2) -> dict[str, float]:
    """Matmul FLOPs of one image + prompt prefill: the vision tower up to the feature layer, the adapter (a
    transformer layer and a Linear) and the LM over `prompt_length` positions (causal attention counted once, the LM
    head on the last position only)."""
    t, h, ffn = shape.num_image_tokens + 1, shape.vision_hidden, shape.vision_intermediate
    layers = shape.vision_layers + 1 + vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer
    patch = 2 * shape.num_image_tokens * 3 * shape.patch_size**2 * h
    vision = patch + layers * (2 * t * (4 * h * h + 2 * h * ffn) + 4 * t * t * h)
    n, adapter_ffn = shape.num_image_tokens, shape.adapter_ffn or 2048
    adapter = 2 * n * (4 * h * h + 2 * h * adapter_ffn) + 4 * n * n * h + 2 * n * h * shape.text_hidden
    d, head = shape.text_hidden, shape.text_hidden // shape.text_heads
    kv = shape.text_kv_heads * head
    per_layer = 2 * prompt_length * (2 * d * d + 2 * d * kv + 3 * d * shape.text_intermediate)
    per_layer += 2 * prompt_length * prompt_length * d  # QK^T and PV, causal: half of 4 T^2 d
    lm = shape.text_layers * per_layer + 2 * d * shape.vocab_size
    return {"vision": float(vision + adapter), "lm": float(lm)}


def decode_bytes(shape: Shape, context: int, itemsize: int) -> float:
    """Bytes one decode step must read: every LM weight but the input embedding table, and the KV cache of
    `context` positions."""
    d, head = shape.text_hidden, shape.text_hidden // shape.text_heads
    kv = shape.text_kv_heads * head
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * shape.text_intermediate + 2 * d
    weights = shape.text_layers * per_layer + d * shape.vocab_size + d
    cache = 2 * shape.text_layers * context * kv
    return float(itemsize * (weights + cache))


def roofline_ratios(measured: dict, flops: dict, bytes_per_token: float, limits: dict) -> dict:
    """TTFT and decode CPU-seconds over their rooflines (1.0: at the hardware limit).

    `measured` holds `ttft_cpu_s`, `decode_cpu_s_per_token` and `weights_bandwidth` (`weights_read_rate` of the
    model); `flops` the `prefill_flops` parts; `limits` the rates `lm_mlp_model` / `vision_mlp_model`
    (`flop_per_cpu_s`).
    """
    ttft_floor = flops["vision"] / limits["vision_mlp_model"]["flop_per_cpu_s"]
    ttft_floor += flops["lm"] / limits["lm_mlp_model"]["flop_per_cpu_s"]
    decode_floor = bytes_per_token / measured["weights_bandwidth"]["bytes_per_cpu_s"]
    return {
        "ttft_floor_cpu_s": ttft_floor,
        "decode_floor_cpu_s": decode_floor,
        "ttft_roofline": measured["ttft_cpu_s"] / ttft_floor,
        "decode_roofline": measured["decode_cpu_s_per_token"] / decode_floor,
    }


# ------------------------------------------------------------------------------------------------- models


def make_inputs(folder: Path, image_size: int) -> tuple[dict, dict, object]:
    """OmniFusion's inputs for one random image + `QUESTION`, and LLaVA's: the same ids without the image markers."""
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    omni = dict(processor(images=common.random_images(1, image_size), text=[prompt], return_tensors="pt"))
    ids = omni["input_ids"]
    keep = ~torch.isin(ids[0], torch.tensor([processor.image_start_token_id, processor.image_end_token_id]))
    llava = {"input_ids": ids[:, keep], "attention_mask": omni["attention_mask"][:, keep]}
    llava["pixel_values"] = omni["pixel_values"]
    return omni, llava, processor


def llava_config(config) -> LlavaConfig:
    """LLaVA over OmniFusion's vision tower and LM configs, its projector at OmniFusion's widths."""
    llava = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    for sub in (llava, llava.vision_config, llava.text_config):
        sub._attn_implementation = "sdpa"
    return llava


def load(name: str, folder: Path, dtype: torch.dtype):
    """OmniFusion from the converted folder, or LLaVA from the same safetensors (its projector initialised)."""
    if name == "OmniFusion":
        model = AutoModelForImageTextToText.from_pretrained(
            folder, trust_remote_code=True, dtype=dtype, device_map=DEVICE
        )
    else:
        config = llava_config(AutoConfig.from_pretrained(folder, trust_remote_code=True))
        model = LlavaForConditionalGeneration.from_pretrained(folder, config=config, dtype=dtype, device_map=DEVICE)
    return model.eval()


@dataclasses.dataclass
class Timing:
    ttft_s: float
    ttft_cpu_s: float
    decode_s_per_token: float
    decode_cpu_s_per_token: float
    new_tokens: int
    peak_rss_gb: float
    load_s: float
    weights_bandwidth: dict


def timed_generate(model, inputs: dict, new_tokens: int) -> tuple[float, float, float, float, int]:
    """Plain greedy `generate` (one row, one beam) of exactly `new_tokens` tokens with the LM forward starts
    timestamped; returns (TTFT wall, TTFT CPU, decode wall per token, decode CPU per token, tokens made).

    The folder's own generation config is set aside for the call: transformers fills every field a passed
    `GenerationConfig` leaves unset from it, and a converted release asks for 3 beams, `no_repeat_ngram_size=4` and
    bad words, which would triple the prefill's rows and add the beam bookkeeping to every step. A forward with more
    than one row is an error, so no such setting can slip into the timings."""
    stamps, rows = [], []

    def stamp(module, args, kwargs):
        stamps.append(now())
        batch = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        rows.append(batch.shape[0] if batch is not None else args[0].shape[0])

    hook = model.register_forward_pre_hook(stamp, with_kwargs=True)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=model.config.text_config.eos_token_id,
        eos_token_id=model.config.text_config.eos_token_id,
    )
    folder_config, model.generation_config = model.generation_config, GenerationConfig()
    try:
        start = now()
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=config)
        end = now()
    finally:
        hook.remove()
        model.generation_config = folder_config
    if set(rows) != {1}:
        raise RuntimeError(f"generate ran forwards of {sorted(set(rows))} rows, expected 1 (plain greedy)")
    made = output.shape[1] - inputs["input_ids"].shape[1]
    if made != new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"generate made {made} tokens in {len(stamps)} forwards, expected {new_tokens}")
    first = stamps[1] if new_tokens > 1 else end
    steps = max(1, new_tokens - 1)
    return (
        first[0] - start[0],
        first[1] - start[1],
        (end[0] - first[0]) / steps,
        (end[1] - first[1]) / steps,
        made,
    )


def measure(name: str, folder: Path, dtype: torch.dtype, inputs: dict, new_tokens: int, repeats: int) -> Timing:
    """Load `name`, warm up on a short text prompt, then `repeats` timed generate calls (medians); frees nothing."""
    progress(f"{name}: loading {folder.name} in {str(dtype).removeprefix('torch.')}")
    start = time.perf_counter()
    model = load(name, folder, dtype)
    load_s = time.perf_counter() - start
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    progress(f"{name}: loaded in {load_s:.1f} s; warming up")
    with torch.no_grad():
        model.generate(input_ids=inputs["input_ids"][:, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
    reset_peak_rss()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    runs, probes = [], [weights_read_rate(model)]
    for index in range(repeats):
        progress(
            f"{name}: generate {new_tokens} tokens, {inputs['input_ids'].shape[1]} positions ({index + 1}/{repeats})"
        )
        runs.append(timed_generate(model, inputs, new_tokens))
        probes.append(weights_read_rate(model))
        progress(f"{name}: TTFT {runs[-1][0]:.2f} s ({runs[-1][1]:.2f} CPU-s), decode {runs[-1][2]:.3f} s/token")
    peak = proc_status().get("VmHWM", 0) / GB
    if DEVICE.type == "cuda":
        peak = torch.cuda.max_memory_allocated(DEVICE) / GB
    medians = [statistics.median(run[i] for run in runs) for i in range(4)]
    del model
    rates = {key: statistics.median(probe[key] for probe in probes) for key in ("bytes_per_s", "bytes_per_cpu_s")}
    bandwidth = {"bytes": probes[0]["bytes"], **rates, "probes_gb_per_s": [p["bytes_per_s"] / GB for p in probes]}
    progress(f"{name}: its decoded weights read at {rates['bytes_per_s'] / GB:.1f} GB/s (median of {len(probes)})")
    return Timing(*medians, new_tokens=new_tokens, peak_rss_gb=peak, load_s=load_s, weights_bandwidth=bandwidth)


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="7b", help="released shape (default: 7b)")
    parser.add_argument("--output_dir", required=True, help="working folder (checkpoints, results.json)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="load dtype (auto: bfloat16 on CPUs "
                        "with native bfloat16, float32 elsewhere)")  # fmt: skip
    parser.add_argument("--new_tokens", type=int, default=None, help="tokens per generate (default: 8, tiny 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generate calls per model (7b: 1, else 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (on CUDA the ratios use wall time)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints after the run")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    common.configure(args.threads)
    shape, tiny = SHAPES[args.shape], args.shape == "tiny"
    dtype = resolve_dtype(args.dtype, DEVICE)
    new_tokens = args.new_tokens or (4 if tiny else 8)
    repeats = args.repeats or (1 if args.shape == "7b" else 3)
    if new_tokens < 2:
        raise SystemExit("--new_tokens must be at least 2 (one prefill token and one decode step)")
    output_dir = Path(args.output_dir).absolute()
    check_resources(output_dir, args.shape, shape, dtype)
    released, converted = output_dir / "released", output_dir / "converted"
    for folder in (released, converted):
        if folder.exists():
            shutil.rmtree(folder)
    results = {"shape": args.shape, "dtype": str(dtype).removeprefix("torch."), "cpu": common.cpu_description()}
    results["threads"], results["new_tokens"], results["repeats"] = args.threads, new_tokens, repeats
    results["device"] = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    try:
        progress(f"writing the released {args.shape} checkpoint under {released}")
        paths = write_released_checkpoint(
            released, shape, on_shard=lambda part, done, total: progress(f"  {part} shard {done}/{total} written")
        )
        progress("converting with omnifusion-convert (memory sampled every 50 ms)")
        results["convert"] = convert(paths["input_dir"], paths["vision_model"], converted)
        progress(
            "converted in {seconds:.1f} s: peak RSS {peak_rss_gb:.2f} GB, peak anonymous {peak_anon_gb:.2f} GB, "
            "{output_gb:.2f} GB written".format(**results["convert"])
        )
        shutil.rmtree(released)
        omni_inputs, llava_inputs, _ = make_inputs(converted, shape.image_size)
        prompt_length = omni_inputs["input_ids"].shape[1]
        results["prompt_positions"] = {"OmniFusion": prompt_length, "LLaVA": llava_inputs["input_ids"].shape[1]}
        results["limits"] = hardware_limits(shape, prompt_length, dtype, tiny)
        timings = {}
        for name, inputs in (("OmniFusion", omni_inputs), ("LLaVA", llava_inputs)):
            timings[name] = measure(name, converted, dtype, inputs, new_tokens, repeats)
            gc.collect()
        itemsize = torch.empty((), dtype=dtype).element_size()
        results["models"] = {}
        for name, timing in timings.items():
            length = results["prompt_positions"][name]
            flops = prefill_flops(shape, length)
            bytes_per_token = decode_bytes(shape, length + new_tokens // 2, itemsize)
            entry = dataclasses.asdict(timing)
            entry.update(prefill_flops=flops, decode_bytes_per_token=bytes_per_token)
            entry.update(roofline_ratios(entry, flops, bytes_per_token, results["limits"]))
            results["models"][name] = entry
        omni, llava = results["models"]["OmniFusion"], results["models"]["LLaVA"]
        results["omnifusion_over_llava"] = {
            "ttft": omni["ttft_s"] / llava["ttft_s"],
            "ttft_cpu": omni["ttft_cpu_s"] / llava["ttft_cpu_s"],
            "decode": omni["decode_s_per_token"] / llava["decode_s_per_token"],
            "decode_cpu": omni["decode_cpu_s_per_token"] / llava["decode_cpu_s_per_token"],
        }
    finally:
        if not args.keep:
            for folder in (released, converted):
                shutil.rmtree(folder, ignore_errors=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print_report(results)
    return results


def print_report(results: dict):
    print(results["cpu"])
    print(f"shape {results['shape']}, {results['dtype']}, {results['threads']} threads, {results['new_tokens']} tokens")
    c = results["convert"]
    print(
        f"convert: {c['seconds']:.1f} s, peak RSS {c['peak_rss_gb']:.2f} GB, peak anonymous {c['peak_anon_gb']:.2f} GB"
        f" ({c['samples']} samples), {c['output_gb']:.2f} GB written"
    )
    limits = results["limits"]
    for name, value in limits.items():
        if "flop_per_s" in value:
            print(
                f"limit {name:22s} {value['flop_per_s'] / 1e9:8.1f} GFLOP/s {value['flop_per_cpu_s'] / 1e9:8.1f} "
                f"GFLOP/CPU-s"
            )
    bw = limits["bandwidth"]
    print(f"limit {'bandwidth':22s} {bw['bytes_per_s'] / GB:8.1f} GB/s    {bw['bytes_per_cpu_s'] / GB:8.1f} GB/CPU-s")
    header = f"{'model':10s} {'positions':>9s} {'TTFT s':>8s} {'TTFT CPU-s':>10s} {'x roofline':>10s} "
    header += f"{'decode s/tok':>12s} {'CPU-s/tok':>9s} {'x roofline':>10s} {'weights GB/CPU-s':>16s} "
    header += f"{'peak RSS GB':>11s} {'load s':>7s}"
    print(header)
    for name, m in results["models"].items():
        print(
            f"{name:10s} {results['prompt_positions'][name]:9d} {m['ttft_s']:8.2f} {m['ttft_cpu_s']:10.2f} "
            f"{m['ttft_roofline']:10.2f} {m['decode_s_per_token']:12.3f} {m['decode_cpu_s_per_token']:9.3f} "
            f"{m['decode_roofline']:10.2f} {m['weights_bandwidth']['bytes_per_cpu_s'] / GB:16.1f} "
            f"{m['peak_rss_gb']:11.2f} {m['load_s']:7.1f}"
        )
    ratio = results["omnifusion_over_llava"]
    print(
        f"OmniFusion/LLaVA: TTFT {ratio['ttft']:.3f} (CPU {ratio['ttft_cpu']:.3f}), decode {ratio['decode']:.3f} "
        f"(CPU {ratio['decode_cpu']:.3f})"
    )
    omni = results["models"]["OmniFusion"]
    print(
        f"ttft_roofline={omni['ttft_roofline']:.3f} decode_roofline={omni['decode_roofline']:.3f} "
        f"convert_peak_anon_gb={c['peak_anon_gb']:.3f}"
    )


if __name__ == "__main__":
    main()
