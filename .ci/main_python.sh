# Sourced by the tiers that need the project's own install (run in the clone's root, ROOT set): MAIN_PYTHON is the
# main tier's venv python (the README's install), or OMNIFUSION_MAIN_PYTHON, or a venv made here if neither exists.
MAIN_PYTHON=${OMNIFUSION_MAIN_PYTHON:-$ROOT/.venv/bin/python}
if [ ! -x "$MAIN_PYTHON" ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q ".[test]"
    MAIN_PYTHON=$ROOT/.venv/bin/python
fi
