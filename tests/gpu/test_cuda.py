"""On a CUDA device: bfloat16 and float16 generation against the CPU, `device_map="auto"`, and the attention paths
(SDPA, flash-attention 2 where `flash_attn` is installed). Marked `gpu`; without CUDA every test is skipped with that
reason. `tests/gpu/run_gpu_checks.sh` runs them with the real-size checks."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForImageTextToText

from modeling_omnifusion.testing.tiny import make_image, make_model_and_processor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]


def _inputs(processor, device):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=[make_image(3)], text=[prompt], return_tensors="pt").to(device)


def _sharpened():
    """The tiny model with a scaled LM head, so that greedy choices are not near-ties that rounding could flip."""
    model, processor = make_model_and_processor(seed=4)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model, processor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_generate_on_cuda_matches_the_cpu_within_the_dtype_tolerance(dtype):
    model, processor = _sharpened()
    with torch.no_grad():
        reference = model(**_inputs(processor, "cpu")).logits[0, -1]
        expected = model.generate(**_inputs(processor, "cpu"), max_new_tokens=6, do_sample=False)
    model = model.to("cuda", dtype)
    inputs = _inputs(processor, "cuda")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float().cpu()
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False).cpu()
    assert (logits - reference).abs().max() <= 0.1 * reference.std()
    assert torch.equal(output, expected)


def test_device_map_auto_loads_on_the_gpu_and_generates(tmp_path):
    model, processor = _sharpened()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        expected = model.generate(**_inputs(processor, "cpu"), max_new_tokens=6, do_sample=False)
    loaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "m", trust_remote_code=True, device_map="auto", dtype=torch.float32
    )
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    with torch.no_grad():
        output = loaded.generate(**_inputs(processor, loaded.device), max_new_tokens=6, do_sample=False).cpu()
    assert torch.equal(output, expected)


ATTENTION = ["sdpa", "flash_attention_2"]


@pytest.mark.parametrize("implementation", ATTENTION)
def test_attention_paths_on_cuda_match_eager(implementation):
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attention 2 is not installed (pip install flash-attn)")
    model, processor = _sharpened()
    model = model.to("cuda", torch.bfloat16)
    inputs = _inputs(processor, "cuda")
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**inputs).logits.float()
        model.set_attn_implementation(implementation)
        other = model(**inputs).logits.float()
    assert (other - eager).abs().max() <= 0.1 * eager.std()
