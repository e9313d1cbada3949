"""What the `omnifusion` lmms-eval model takes from a task's messages: images, sound where the model has an audio
tower (lmms-eval's HF `Audio` dicts, resampled), videos where the model has video (a file decoded with PyAV), and a
clear refusal of video elsewhere."""

import numpy as np
import pytest
import torch

from modeling_omnifusion.evaluation.lmms.model import OmniFusionLMMs
from modeling_omnifusion.testing.tiny import (
    make_audio_model_and_processor,
    make_clip,
    make_image,
    make_video,
    make_video_model_and_processor,
)
from modeling_omnifusion.testing.videos import write_video


@pytest.fixture(scope="module")
def audio_model_dir(save_tiny):
    return save_tiny("omnifusion-audio-tiny", make_audio_model_and_processor, seed=2)


def _load(folder):
    return OmniFusionLMMs(pretrained=str(folder), device="cpu", dtype="float32")


def test_sound_items_become_clips_at_the_processors_rate_and_generate_like_hf(audio_model_dir):
    lmm = _load(audio_model_dir)
    clip = make_clip(seed=3, seconds=0.5, sampling_rate=8000)
    # lmms-eval's auto messages type an HF Audio dict as "video"; "audio" items carry it the same way
    for kind in ("video", "audio"):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": kind, "url": {"array": clip, "sampling_rate": 8000, "path": None}},
                    {"type": "text", "text": "What is the colour of the shape?"},
                ],
            }
        ]
        (turn,) = lmm.to_chat(messages)
        sound = turn["content"][0]
        assert sound["type"] == "audio" and sound["audio"].shape == (8000,)  # 0.5 s at 16 kHz
    answer = lmm._generate([[turn]], {"max_new_tokens": 4})[0]

    inputs = lmm.processor.apply_chat_template(
        [turn], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = lmm.model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=1)
    expected = lmm.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == expected


def test_a_video_file_becomes_a_video_item_and_generates_like_hf(tmp_path):
    folder = tmp_path / "omnifusion-video-tiny"
    model, processor = make_video_model_and_processor(seed=5)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    lmm = _load(folder)
    video = write_video(tmp_path / "clip.mp4", make_video(seed=6, frames=6))
    (turn,) = lmm.to_chat(
        [{"role": "user", "content": [{"type": "video", "url": video}, {"type": "text", "text": "What moves?"}]}]
    )
    assert turn["content"][0] == {"type": "video", "path": video}
    answer = lmm._generate([[turn]], {"max_new_tokens": 4})[0]
    inputs = lmm.processor.apply_chat_template(
        [turn], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = lmm.model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=1)
    assert answer == lmm.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_images_by_path_and_object_give_the_same_chat(tiny_model_dir, tmp_path):
    lmm = _load(tiny_model_dir)
    image = make_image(seed=4, size=40)
    image.save(tmp_path / "image.png")
    by_path = lmm.to_chat([{"role": "user", "content": [{"type": "image", "url": str(tmp_path / "image.png")}]}])
    by_object = lmm.to_chat([{"role": "user", "content": [{"type": "image", "url": image}]}])
    assert np.array_equal(np.asarray(by_path[0]["content"][0]["image"]), np.asarray(image))
    assert np.array_equal(np.asarray(by_object[0]["content"][0]["image"]), np.asarray(image))


def test_video_and_sound_without_an_audio_tower_are_refused_by_name(tiny_model_dir):
    lmm = _load(tiny_model_dir)
    with pytest.raises(ValueError, match="not video"):
        lmm.to_chat([{"role": "user", "content": [{"type": "video", "url": "clip.mp4"}]}])
    with pytest.raises(ValueError, match="no audio tower"):
        lmm.to_chat([{"role": "user", "content": [{"type": "audio", "url": "clip.wav"}]}])


def test_unknown_model_args_are_refused_by_name(tiny_model_dir):
    with pytest.raises(TypeError, match="temperature"):
        OmniFusionLMMs(pretrained=str(tiny_model_dir), temperature=0.5)
