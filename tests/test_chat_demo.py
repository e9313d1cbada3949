"""The chat demo's logic without a browser (`modeling_omnifusion.chat_demo`): gradio's history to chat messages with
every file kept in its turn, the files a model takes, the generation settings (always one beam), replies streamed
to HF `generate`'s greedy text and stopped when the reader goes away; and `examples/chat_demo.py` naming how to make
its default model. The demo in a real browser: tests_browser/ (`.ci/tier_browser.sh`)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import soundfile
import torch

from modeling_omnifusion.chat_demo import (
    beam_note,
    generation_settings,
    history_to_messages,
    media_kind,
    stream_reply,
    supported_media,
)
from modeling_omnifusion.testing.tiny import (
    make_audio_model_and_processor,
    make_clip,
    make_image,
    make_model_and_processor,
    make_video,
    make_video_model_and_processor,
)
from modeling_omnifusion.testing.videos import write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    model, processor = make_model_and_processor(seed=0)
    return model, processor


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("chat-files")
    paths = {"image": root / "shapes.png", "audio": root / "question.wav", "video": root / "clip.mp4"}
    make_image(seed=1).save(paths["image"])
    soundfile.write(paths["audio"], make_clip(seed=2, seconds=0.5), 16000)
    paths["video"].write_bytes(b"not decoded here")
    paths["text"] = root / "notes.txt"
    paths["text"].write_text("plain text")
    return {kind: str(path) for kind, path in paths.items()}


def greedy(model, processor, messages, max_new_tokens=24) -> str:
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# ------------------------------------------------------------------------------------ history to chat messages


FILE_SHAPES = {
    "gradio 6": lambda path: {"type": "file", "file": {"path": path, "mime_type": "image/png"}},
    "path dict": lambda path: {"path": path},
    "file string": lambda path: {"file": path},
    "tuple": lambda path: (path, "alt text"),
}


@pytest.mark.parametrize("shape", FILE_SHAPES)
def test_history_keeps_each_file_in_its_turn(shape, files):
    image = files["image"]
    history = [
        {"role": "user", "content": [FILE_SHAPES[shape](image), {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}], "metadata": None},
    ]
    assert history_to_messages(history, {"text": "What colour?", "files": []}) == [
        {"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
    ]


def test_new_message_files_come_before_its_text_and_strings_are_text(files):
    image = files["image"]
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    assert history_to_messages(history, {"text": "And this?", "files": [image, {"path": image}]}) == [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "path": image},
                {"type": "image", "path": image},
                {"type": "text", "text": "And this?"},
            ],
        },
    ]
    assert history_to_messages([], "Plain text") == [
        {"role": "user", "content": [{"type": "text", "text": "Plain text"}]}
    ]


def test_user_messages_with_no_reply_between_them_are_one_turn(tiny, files):
    """User messages with no reply between them (a file, then text) are one turn, rendered as if sent together
    (same prompt ids)."""
    _, processor = tiny
    image = files["image"]
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": image}}]},
        {"role": "user", "content": [{"type": "text", "text": "first line"}]},
    ]
    messages = history_to_messages(history, "second line")
    together = [
        {
            "role": "user",
            "content": [{"type": "image", "path": image}, {"type": "text", "text": "first line\nsecond line"}],
        }
    ]
    assert messages == together
    render = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(
        processor.apply_chat_template(messages, **render)["input_ids"],
        processor.apply_chat_template(together, **render)["input_ids"],
    )


def test_files_the_model_does_not_take_and_empty_messages_are_refused(files):
    with pytest.raises(ValueError, match=r"the new message: 'question.wav' is an audio file; this model takes image"):
        history_to_messages([], {"text": "Listen", "files": [files["audio"]]})
    with pytest.raises(ValueError, match=r"history\[0\]: 'clip.mp4' is a video file; this model takes image, audio"):
        history_to_messages([{"role": "user", "content": [{"path": files["video"]}]}], "Q", media=("image", "audio"))
    with pytest.raises(ValueError, match=r"'notes.txt' is not an image, sound or video file \(type text/plain\)"):
        history_to_messages([], {"text": "Read", "files": [files["text"]]})
    with pytest.raises(ValueError, match="the new message is empty"):
        history_to_messages([], {"text": "  ", "files": []})
    with pytest.raises(
        ValueError, match=r"history\[0\]: expected a role in \('system', 'user', 'assistant'\), got 'bot'"
    ):
        history_to_messages([{"role": "bot", "content": "hi"}], "Q")
    with pytest.raises(TypeError, match=r"history\[0\]: expected text or a file"):
        history_to_messages([{"role": "user", "content": [{"type": "component", "value": 3}]}], "Q")


def test_media_kinds_and_what_each_model_takes(tiny, files):
    assert [media_kind(files[kind]) for kind in ("image", "audio", "video")] == ["image", "audio", "video"]
    assert media_kind("/tmp/upload/clip.opus") == "audio"  # by suffix where the MIME table has none
    assert supported_media(tiny[1]) == ("image",)
    _, audio_processor = make_audio_model_and_processor()
    assert supported_media(audio_processor) == ("image", "audio")


# --------------------------------------------------------------------------------------- generation settings


def test_generation_settings_use_one_beam_greedy_at_temperature_zero():
    assert generation_settings(50, 0.0, 0.9) == {
        "max_new_tokens": 50, "num_beams": 1, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
    }  # fmt: skip
    assert generation_settings(8, 0.7, 0.9) == {
        "max_new_tokens": 8, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
    }  # fmt: skip
    for bad in [{"max_new_tokens": 0}, {"max_new_tokens": 2.5}, {"temperature": -1}, {"top_p": 0}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            generation_settings(**bad)


def test_beam_note_names_the_generation_configs_beams(tiny):
    model, _ = tiny
    assert beam_note(model) is None
    model.generation_config.num_beams = 3
    try:
        assert "num_beams=3" in beam_note(model) and "one beam" in beam_note(model)
    finally:
        model.generation_config.num_beams = 1


# ------------------------------------------------------------------------------------------- streamed replies


def test_streamed_reply_grows_to_generates_greedy_text_with_one_beam(tiny, files):
    """A two-turn chat with the image kept in the first turn, on a model whose generation config asks for 3 beams
    (as a converted release does): the stream runs one beam and ends on `generate`'s greedy text."""
    model, processor = tiny
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": files["image"]}}, "What is it?"]},
        {"role": "assistant", "content": [{"type": "text", "text": "A shape."}]},
    ]
    messages = history_to_messages(history, "What colour is it?")
    model.generation_config.num_beams = 3
    try:
        texts = list(stream_reply(model, processor, messages, max_new_tokens=24))
    finally:
        model.generation_config.num_beams = 1
    assert texts[-1] == greedy(model, processor, messages, max_new_tokens=24)
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))


def test_streamed_reply_with_sound_equals_generate(files):
    model, processor = make_audio_model_and_processor(seed=3)
    messages = history_to_messages([], {"text": "Answer.", "files": [files["audio"]]}, supported_media(processor))
    assert messages[0]["content"][0] == {"type": "audio", "path": files["audio"]}
    texts = list(stream_reply(model, processor, messages, max_new_tokens=12))
    assert texts and texts[-1] == greedy(model, processor, messages, max_new_tokens=12)


def test_streamed_reply_with_a_video_file_equals_generate(tmp_path):
    model, processor = make_video_model_and_processor(seed=4)
    assert supported_media(processor) == ("image", "video")
    video = write_video(tmp_path / "upload.mp4", make_video(seed=5, frames=6))
    messages = history_to_messages([], {"text": "What moves?", "files": [video]}, supported_media(processor))
    assert messages[0]["content"][0] == {"type": "video", "path": video}
    texts = list(stream_reply(model, processor, messages, max_new_tokens=12))
    assert texts and texts[-1] == greedy(model, processor, messages, max_new_tokens=12)


def test_closing_the_stream_stops_generate(tiny, files, monkeypatch):
    """The stop button closes the stream: `generate()` ends at its next token instead of running to its cap."""
    model, processor = tiny
    steps = []
    hook = model.register_forward_pre_hook(lambda module, args: steps.append(1))
    monkeypatch.setattr(model.generation_config, "min_new_tokens", 400)  # no EOS before the cap
    try:
        stream = stream_reply(model, processor, history_to_messages([], "Tell a long story."), max_new_tokens=400)
        first = next(stream)
        stream.close()
    finally:
        hook.remove()
    assert first and len(steps) < 100, len(steps)
    assert not any(thread.name == "omnifusion-generate" for thread in threading.enumerate())


def test_an_error_in_generate_is_raised_by_the_stream(tiny, monkeypatch):
    model, processor = tiny

    def failing_generate(**kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(model, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="simulated"):
        list(stream_reply(model, processor, history_to_messages([], "Hi"), max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(stream_reply(model, processor, history_to_messages([], "Hi"), max_new_tokens=0))


# ------------------------------------------------------------------------------------------------- the script


def test_chat_demo_says_how_to_make_its_default_model(tmp_path):
    """Run where there is no quickstart-output/: exit status 2 and the command that makes the model (gradio need
    not be installed to get this far)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "chat_demo.py")], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no model folder at quickstart-output/omnifusion" in result.stderr
    assert "python examples/quickstart.py" in result.stderr and "Traceback" not in result.stderr
