"""Test-wide settings: never reach the Hub, and run the tiny models on one thread (faster than two for them)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


# transformers' own common tests (tests/transformers_common) import the mixins from transformers' sdist, which
# .ci/tier_transformers_common.sh downloads and names in TRANSFORMERS_TESTS_DIR; without it they are not collected.
if not os.environ.get("TRANSFORMERS_TESTS_DIR"):
    collect_ignore = ["transformers_common"]


import pytest  # noqa: E402
import transformers  # noqa: E402


@pytest.fixture(autouse=True)
def warning_level_for_log_assertions(request):
    """
    A test that reads the log (`caplog`) sees warnings whatever TRANSFORMERS_VERBOSITY says: the training commands
    hand transformers' verbosity to their own loggers (`setup_run`, `--log_level passive`), so it is set to WARNING
    for the test and put back afterwards. Other tests run at the level the environment gives.
    """
    if "caplog" not in request.fixturenames:
        yield
        return
    previous = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(previous)
