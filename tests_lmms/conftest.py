"""Shared pieces of the lmms-eval tier: a tiny saved OmniFusion and tiny local task files (all made here)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import pytest  # noqa: E402

from modeling_omnifusion.testing.tiny import make_model_and_processor  # noqa: E402


@pytest.fixture(scope="session")
def save_tiny(tmp_path_factory):
    """`save_tiny(name, make, seed)`: the model and processor of `make(seed=seed)` (a `make_*model_and_processor` of
    `modeling_omnifusion.testing.tiny`) saved as a Hub folder `name` (remote code, processor, chat template)."""

    def save(name: str, make, seed: int):
        folder = tmp_path_factory.mktemp("model") / name
        model, processor = make(seed=seed)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder

    return save


@pytest.fixture(scope="session")
def tiny_model_dir(save_tiny):
    """A random tiny OmniFusion saved as a Hub folder (remote code, processor, chat template)."""
    return save_tiny("omnifusion-tiny", make_model_and_processor, seed=1)
