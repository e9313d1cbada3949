"""What docs/serving.md says of `transformers serve` / `transformers chat` (transformers 5.25): they do not run
remote-code models. The server's own loader, with `trust_remote_code=True`, fails on a saved OmniFusion folder: it
resolves the model class as `getattr(transformers, config.architectures[0])`, and it tells an LLM from a VLM by
transformers' built-in class names only. When this test fails, transformers learned to serve remote code: update the
docs (serving and usage pages, README) and replace this test with one that serves a folder."""

import pytest
from transformers import AutoConfig, AutoProcessor
from transformers.cli.serving.model_manager import ModelLoader

from modeling_omnifusion.testing.tiny import make_model_and_processor


def test_transformers_serve_cannot_load_a_remote_code_model(tmp_path):
    model, processor = make_model_and_processor(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.architectures == ["OmniFusionForCausalLM"]

    loader = ModelLoader(device="cpu", dtype="float32", trust_remote_code=True)
    with pytest.raises(AttributeError, match="OmniFusionForCausalLM"):
        loader.load_model_and_processor(str(tmp_path))
    saved_processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert ModelLoader.get_model_modality(config, saved_processor) is None  # "Unknown modality" to the server
