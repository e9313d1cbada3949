"""
Quantized loading on CPU with the model's own skip list: torchao int8 (weight-only and dynamic activations) and
bitsandbytes 8-bit and 4-bit load a saved folder with sound and video through `AutoModelForImageTextToText` and
generate, quantizing the decoder's linear layers only; torch's `quantize_dynamic` runs a model whose adapters it
emptied.
"""

import bitsandbytes  # noqa: F401  (the `quant` extra; transformers' bitsandbytes quantizer needs it installed)
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, TorchAoConfig

from modeling_omnifusion.input_checks_omnifusion import non_finite_weights
from modeling_omnifusion.quantization_omnifusion import is_plain_float_tensor, not_quantized_modules
from modeling_omnifusion.testing.tiny import (
    audio_chat,
    make_audio_model_and_processor,
    make_clip,
    make_image,
    make_video_model_and_processor,
)

METHODS = {
    "torchao-int8-weight-only": lambda: TorchAoConfig(Int8WeightOnlyConfig()),
    "torchao-int8-dynamic": lambda: TorchAoConfig(Int8DynamicActivationInt8WeightConfig()),
    "bnb-8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "bnb-4bit": lambda: BitsAndBytesConfig(load_in_4bit=True),
}
# Cosine similarity of the prompt's last logits to float32's, at least (int8 keeps them close; 4-bit less so).
MIN_COSINE = {
    "torchao-int8-weight-only": 0.999,
    "torchao-int8-dynamic": 0.999,
    "bnb-8bit": 0.999,
    "bnb-4bit": 0.99,
}
NOT_QUANTIZED = tuple(not_quantized_modules("model.", head="lm_head"))
NEW_TOKENS = 4


def load(folder, quantization_config, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, quantization_config=quantization_config, **kwargs
    )


def last_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[0, -1].float()


def under(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model with sound and a separate video adapter (every declared module exists), a chat with an image
    and a clip, and float32's logits and greedy tokens."""
    model, processor = make_video_model_and_processor(video_adapter="separate", audio=True)
    folder = tmp_path_factory.mktemp("quantization") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    chat = audio_chat("What do you see and hear?", clips=[make_clip()], images=[make_image()])
    inputs = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return folder, inputs, last_logits(model, inputs)


@pytest.fixture(scope="module", params=list(METHODS))
def quantized(request, saved):
    folder = saved[0]
    return request.param, load(folder, METHODS[request.param]())


def test_decoder_linear_layers_are_quantized(quantized):
    method, model = quantized
    layers = {
        name: module
        for name, module in model.named_modules()
        if name.startswith("model.language_model.layers.") and hasattr(module, "weight") and "proj" in name
    }
    assert layers, "the decoder has no projection layers"
    plain = [name for name, module in layers.items() if is_plain_float_tensor(module.weight)]
    assert not plain, f"{method} left decoder layers unquantized: {plain}"


def test_default_skip_list_keeps_towers_adapters_markers_and_head(quantized):
    method, model = quantized
    kept = {name: parameter for name, parameter in model.named_parameters() if under(name, NOT_QUANTIZED)}
    for prefix in NOT_QUANTIZED:
        assert any(under(name, [prefix]) for name in kept), f"no parameters under {prefix}"
    quantized_there = [name for name, parameter in kept.items() if not is_plain_float_tensor(parameter)]
    assert not quantized_there, f"{method} quantized {quantized_there}"
    replaced = [
        name
        for name, module in model.named_modules()
        if under(name, NOT_QUANTIZED) and isinstance(module, nn.Linear) and type(module) is not nn.Linear
    ]
    assert not replaced, f"{method} replaced {replaced} by quantized linear layers"


def test_greedy_generation_and_logits_close_to_float32(quantized, saved):
    method, model = quantized
    _, inputs, reference = saved
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert int(output[:, inputs["input_ids"].shape[1] :].max()) < model.config.text_config.vocab_size
    cosine = float(nn.functional.cosine_similarity(last_logits(model, inputs), reference, dim=0))
    assert cosine >= MIN_COSINE[method], f"{method}: cosine similarity {cosine:.4f} to float32's logits"


def test_own_skip_list_adds_to_the_models(saved):
    """A user's `modules_to_not_convert` replaces transformers' defaults, not the model's declared modules."""
    model = load(
        saved[0], TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["model.language_model.layers.1"])
    )
    assert is_plain_float_tensor(model.model.adapter.linear.weight)
    assert is_plain_float_tensor(model.model.audio_tower.layers[0].fc1.weight)
    assert is_plain_float_tensor(model.model.language_model.layers[1].mlp.up_proj.weight)
    assert not is_plain_float_tensor(model.model.language_model.layers[0].mlp.up_proj.weight)


def test_declared_modules_are_not_upcast_in_float16(saved):
    model = AutoModelForImageTextToText.from_pretrained(saved[0], trust_remote_code=True, dtype=torch.float16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float16}


def test_non_finite_check_skips_quantized_tensors_and_still_guards_the_kept_ones(saved, tmp_path):
    folder, inputs, _ = saved
    model = load(folder, METHODS["torchao-int8-weight-only"]())
    assert non_finite_weights(model, ("model.language_model.layers.",)) == {}
    # A NaN in the (unquantized) adapter is still refused when the folder is loaded quantized.
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in folder.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    state = load_file(broken / "model.safetensors")
    state["model.adapter.linear.weight"][0, 0] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.adapter\.linear\.weight"):
        load(broken, METHODS["torchao-int8-weight-only"]())


def test_quantize_dynamic_with_parameterless_adapters():
    model, processor = make_audio_model_and_processor(adapter_type="mlp", audio_adapter_type="mlp")
    chat = audio_chat("What do you see and hear?", clips=[make_clip()], images=[make_image()])
    inputs = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    reference = last_logits(model, inputs)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert list(quantized.model.adapter.parameters()) == []
    assert list(quantized.model.audio_adapter.parameters()) == []
    output = quantized.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + NEW_TOKENS)
    cosine = float(nn.functional.cosine_similarity(last_logits(quantized, inputs), reference, dim=0))
    assert cosine >= 0.99, f"quantize_dynamic: cosine similarity {cosine:.4f} to float32's logits"
