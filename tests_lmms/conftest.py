"""Shared pieces of the lmms-eval tier: a tiny saved OmniFusion and tiny local task files (all made here)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import pytest  # noqa: E402

from modeling_omnifusion.testing.tiny import make_model_and_processor  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny OmniFusion saved as a Hub folder (remote code, processor, chat template)."""
    folder = tmp_path_factory.mktemp("model") / "omnifusion-tiny"
    model, processor = make_model_and_processor(seed=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
