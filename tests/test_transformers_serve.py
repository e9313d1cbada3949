"""What docs/serving.md says of `transformers serve` / `transformers chat` (transformers 5.24 and 5.25): they do not run
remote-code models. The server's own loader, with `trust_remote_code=True`, fails on a saved OmniFusion folder: it
resolves the model class as `getattr(transformers, config.architectures[0])`, and it tells an LLM from a VLM by
transformers' built-in class names only. When this test fails, transformers learned to serve remote code: update the
docs (serving and usage pages, README) and replace this test with one that serves a folder."""

import pytest
from transformers import AutoConfig, AutoProcessor
from transformers.cli.serving import model_manager

from modeling_omnifusion.testing.tiny import make_model_and_processor


def test_transformers_serve_cannot_load_a_remote_code_model(tmp_path):
    model, processor = make_model_and_processor(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.architectures == ["OmniFusionForCausalLM"]

    # the server's loader: `ModelLoader` from transformers 5.25, `ModelManager` in 5.24 (the package's floor)
    loader_class = getattr(model_manager, "ModelLoader", None) or model_manager.ModelManager
    loader = loader_class(device="cpu", dtype="float32", trust_remote_code=True)
    with pytest.raises(AttributeError, match="OmniFusionForCausalLM"):
        loader.load_model_and_processor(str(tmp_path))
    saved_processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    if loader_class.__name__ == "ModelLoader":  # 5.25 reads the config: None is "Unknown modality" to the server
        assert loader_class.get_model_modality(config, saved_processor) is None
    else:  # 5.24 reads the model's class name and raises
        with pytest.raises(ValueError, match="Unknown modality"):
            loader_class.get_model_modality(model, saved_processor)
