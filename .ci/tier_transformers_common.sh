#!/usr/bin/env bash
# CI tier: transformers' own common test mixins (ModelTesterMixin, ConfigTester, ProcessorTesterMixin) run against
# OmniFusion. transformers' wheel has no tests; its PyPI sdist has the top-level tests/test_*.py. This downloads the
# sdist of the installed transformers version into a cache (never committed), extracts tests/ and runs our tester
# (tests/transformers_common). Any failure to get the sdist fails the tier: the tests never skip for lack of it.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

# The main tier's venv (the README's install) when it is there; a fresh one otherwise.
venv=.venv
cache="${CI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/omnifusion-ci}/transformers-sdist"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q torch==2.13.0
    "$venv/bin/python" -m pip install -q ".[test]"
fi
. "$venv/bin/activate"
python -m pip install -q parameterized

version=$(python -c "import transformers; print(transformers.__version__)")
folder="$cache/transformers-$version"
if [ ! -f "$folder/tests/test_modeling_common.py" ]; then
    mkdir -p "$cache"
    rm -rf "$folder" "$folder.partial"
    mkdir -p "$folder.partial"
    python -m pip download -q --no-binary :all: --no-deps "transformers==$version" -d "$folder.partial"
    tarball=$(ls "$folder.partial"/transformers-"$version".tar.gz)
    tar -xzf "$tarball" -C "$folder.partial" --strip-components=1 "transformers-$version/tests"
    rm -f "$tarball"
    mv "$folder.partial" "$folder"
fi
# upstream's checkout has an empty tests/__init__.py that the sdist leaves out; test_configuration_common.py reads it
touch "$folder/tests/__init__.py"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
export TRANSFORMERS_TESTS_DIR="$folder/tests"
timeout 1800 pytest tests/transformers_common -q -p no:cacheprovider -rs
echo "tier_transformers_common: transformers $version, $(( $(date +%s) - started )) s"
