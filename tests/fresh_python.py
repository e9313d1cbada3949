"""Runs a test script in a new Python process that cannot import this project: no PYTHONPATH, a cwd outside the
checkout, and transformers' remote-code module cache of its own."""

import os
import subprocess
import sys
from pathlib import Path


def run_fresh_python(script_text: str, tmp_path: Path, *args) -> str:
    """Writes `script_text` under `tmp_path`, runs it with `args`, asserts exit status 0, returns its stdout."""
    script = tmp_path / "fresh_load.py"
    script.write_text(script_text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
