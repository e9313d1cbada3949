"""
A server process for tests: started on a free port of 127.0.0.1, waited for until a URL answers 200, and stopped by
its PID. Used by `tests_browser/` (the chat demo) and `tests_vllm/openai_server.py` (vLLM's OpenAI-compatible
server). The vLLM tier runs without this package importable, so this file depends on the standard library and
pytest only, and `tests_vllm/openai_server.py` loads it by its path in the checkout.
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(
    command: list[str],
    log: Path,
    ready_url: str,
    name: str,
    waits_until: str,
    start_seconds: int,
    poll_seconds: float,
    stop_seconds: int,
    **popen_kwargs,
):
    """
    Runs `command` (its output to `log`, in a session of its own) and yields once `ready_url` answers 200. The test
    fails if the process exits first, or (its process group killed) if it does not answer in `start_seconds`
    (`the {name} did not {waits_until} in {start_seconds} s`). On exit it is stopped with SIGTERM; if it ignores it
    for `stop_seconds`, its process group is killed and the test fails. Then `ready_url` must be gone.
    """
    import pytest

    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, **popen_kwargs
        )
    deadline = time.monotonic() + start_seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"the {name} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the {name} did not {waits_until} in {start_seconds} s:\n{log.read_text()[-4000:]}")
        time.sleep(poll_seconds)
    try:
        yield process
    finally:
        os.kill(process.pid, signal.SIGTERM)  # stopped by its PID
        try:
            process.wait(timeout=stop_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            pytest.fail(f"the {name} ignored SIGTERM for {stop_seconds} s")
    with pytest.raises(OSError):
        urllib.request.urlopen(ready_url, timeout=5)
