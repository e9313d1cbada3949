"""
What the sound and video vLLM tests share: the reference of `tests_compat/make_reference.py` (named by
`OMNIFUSION_REFERENCE_DIR`), the folders and chats of one modality, the offline engine and the server on a folder (as
fixtures), chat items with their media loaded, and the checks that vLLM's greedy tokens, offline and served, are HF
`generate`'s.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from openai_server import chat_completion, openai_server
from PIL import Image
from transformers import AutoProcessor

REFERENCE = Path(os.environ.get("OMNIFUSION_REFERENCE_DIR", "")).resolve()
if not os.environ.get("OMNIFUSION_REFERENCE_DIR") or not (REFERENCE / "manifest.json").is_file():
    raise RuntimeError(f"set OMNIFUSION_REFERENCE_DIR to a tests_compat/make_reference.py output (got {REFERENCE})")
# the keyword of `processor.vllm_inputs` that takes each modality's items
VLLM_INPUTS_KEYWORD = {"audio": "audio", "video": "videos"}


def folders_and_chats(modality: str) -> tuple[list[str], dict]:
    """The reference's folders with `modality` (`audio` or `video`) and their chats (none where it has none)."""
    folders = json.loads((REFERENCE / "manifest.json").read_text()).get(f"{modality}_folders", [])
    chats_file = REFERENCE / f"{modality}_chats.json"
    return folders, json.loads(chats_file.read_text()) if chats_file.is_file() else {}


def load_engine(name: str, modality: str, limits: dict):
    """vLLM's offline engine on folder `name` (Transformers backend, float32, eager), its processor, and its
    `{modality}_reference.pt`."""
    from vllm import LLM

    folder = REFERENCE / name
    llm = LLM(
        model=str(folder),
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        limit_mm_per_prompt=limits,
        seed=0,
    )
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return llm, processor, torch.load(REFERENCE / f"{name}.{modality}_reference.pt", weights_only=True)


def engine_fixture(modality: str, limits: dict):
    """A module fixture, one per folder with `modality`: `load_engine`'s engine, processor and reference."""

    @pytest.fixture(scope="module", params=folders_and_chats(modality)[0])
    def engine(request):
        llm, processor, reference = load_engine(request.param, modality, limits)
        yield llm, processor, reference
        del llm

    return engine


def server_fixture(modality: str, limits: dict):
    """A module fixture: the OpenAI-compatible server on 127.0.0.1 serving the first folder with `modality`, as
    `(base URL, folder)`."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        folder = REFERENCE / folders_and_chats(modality)[0][0]
        log = tmp_path_factory.mktemp("server") / "server.log"
        with openai_server(folder, limits, log) as base:
            yield base, folder

    return server


def with_media(item: dict) -> dict:
    """A chat item with its image, clip or video (`[frames, H, W, 3]` uint8) loaded from the reference folder."""
    if item["type"] == "image":
        return {"type": "image", "image": Image.open(REFERENCE / item["path"]).convert("RGB")}
    if item["type"] in VLLM_INPUTS_KEYWORD:
        return {"type": item["type"], item["type"]: np.load(REFERENCE / item[item["type"]])}
    return item


def vllm_prompt(processor, messages: list[dict], modality: str) -> tuple[dict, list]:
    """`processor.vllm_inputs` for the one-turn chat `messages` with its media loaded, and its `modality` items."""
    content = [with_media(item) for item in messages[0]["content"]]
    images = [item["image"] for item in content if item["type"] == "image"]
    media = [item[modality] for item in content if item["type"] == modality]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor.vllm_inputs(text, images=images or None, **{VLLM_INPUTS_KEYWORD[modality]: media}), media


def assert_greedy_tokens_are_hf(llm, prompt: dict, expected: dict):
    """vLLM's 8 greedy tokens for `prompt` are those HF `generate` recorded (`expected`: one chat's reference)."""
    from vllm import SamplingParams

    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].token_ids
    prompt_length = expected["inputs"]["input_ids"].shape[1]
    assert list(output) == expected["tokens"][0, prompt_length:].tolist()


def assert_served_like_hf(base: str, content: list[dict], expected: dict):
    """A chat completion of one user turn `content` from the server at `base`: HF's prompt ids and greedy tokens
    (`expected`: one chat's reference)."""
    prompt_ids = expected["inputs"]["input_ids"][0].tolist()
    tokens = expected["tokens"][0, len(prompt_ids) :].tolist()
    status, response = chat_completion(base, content, max_tokens=len(tokens))
    assert status == 200, response
    assert response["prompt_token_ids"] == prompt_ids
    assert response["choices"][0]["token_ids"] == tokens
