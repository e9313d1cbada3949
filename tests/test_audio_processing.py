"""The processor's sound intake, the chat template with audio items, and saved audio folders (also loaded in a fresh
Python without this project)."""

import base64
import io
import json
import os

import numpy as np
import pytest
import torch
from fresh_python import run_fresh_python
from media_checks import fresh_load_script, save_with_reference
from transformers import AutoProcessor

from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.processing.audio_inputs_omnifusion import _sinc_resample, resample
from modeling_omnifusion.testing.tiny import audio_chat, make_audio_model_and_processor, make_clip, make_image

soundfile = pytest.importorskip("soundfile")


@pytest.fixture(scope="module")
def tiny():
    return make_audio_model_and_processor()


def features(processor, clip, **kwargs):
    return processor(text="<audio>", audio=[clip], return_tensors="pt", **kwargs)


def test_integer_clips_are_scaled_to_unit_range(tiny):
    _, processor = tiny
    clip = make_clip(0, 0.5)
    reference = features(processor, clip)["input_features"]
    as_int16 = np.round(clip * 32767).astype(np.int16)
    as_int32 = as_int16.astype(np.int32) << 16
    as_uint8 = (np.round(clip * 127) + 128).astype(np.uint8)
    for converted, tolerance in ((as_int16, 1e-3), (as_int32, 1e-3), (as_uint8, 0.1)):
        torch.testing.assert_close(features(processor, converted)["input_features"], reference, atol=tolerance, rtol=0)


def test_stereo_is_mixed_to_mono_in_either_layout(tiny):
    _, processor = tiny
    left, right = make_clip(0, 0.5), make_clip(1, 0.5)
    mono = features(processor, (left + right) / 2)["input_features"]
    for stereo in (np.stack([left, right]), np.stack([left, right], axis=1), torch.from_numpy(np.stack([left, right]))):
        torch.testing.assert_close(features(processor, stereo)["input_features"], mono)


def test_other_sampling_rates_are_resampled_keeping_the_duration(tiny):
    _, processor = tiny
    clip_8k = make_clip(0, 0.5, sampling_rate=8000)
    inputs = features(processor, clip_8k, sampling_rate=8000)
    assert inputs["input_features_mask"].sum() == 50
    expected = features(processor, resample(clip_8k, 8000, 16000))["input_features"]
    torch.testing.assert_close(inputs["input_features"], expected)


def test_torch_resampler_matches_soxr():
    soxr = pytest.importorskip("soxr")
    for rate in (8000, 22050, 44100, 48000):
        times = np.arange(rate) / rate
        clip = (0.5 * np.sin(2 * np.pi * 440 * times) + 0.2 * np.sin(2 * np.pi * 2500 * times)).astype(np.float32)
        ours, theirs = _sinc_resample(clip, rate, 16000), soxr.resample(clip, rate, 16000, quality="HQ")
        assert len(ours) == len(theirs) == 16000
        assert np.abs(ours[200:-200] - theirs[200:-200]).max() < 0.01, rate


def wav_bytes(clip, rate):
    buffer = io.BytesIO()
    soundfile.write(buffer, clip, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_paths_and_base64_are_read_and_resampled(tiny, tmp_path):
    _, processor = tiny
    clip_8k = make_clip(3, 0.75, sampling_rate=8000)
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(clip_8k, 8000))
    from_path = features(processor, str(path))
    encoded = "data:audio/wav;base64," + base64.b64encode(wav_bytes(clip_8k, 8000)).decode()
    from_base64 = features(processor, encoded)
    assert from_path["input_features_mask"].sum() == 75
    torch.testing.assert_close(from_path["input_features"], from_base64["input_features"])
    chat = processor.apply_chat_template(
        audio_chat("What is said?", clips=[str(path)]), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert torch.tensor(chat["input_features"]).shape == (1, 80, 100)


@pytest.mark.parametrize(
    ("clip", "error", "message"),
    [
        (np.array([0.1, np.nan] * 4000, dtype=np.float32), ValueError, "Audio clip 0 holds NaN or infinite samples"),
        (np.full(8000, np.inf, dtype=np.float64), ValueError, "Audio clip 0 holds NaN or infinite samples"),
        (np.zeros(0, dtype=np.float32), ValueError, "Audio clip 0 is empty"),
        (np.zeros((0, 2), dtype=np.int16), ValueError, "Audio clip 0 is empty"),
        (np.zeros(16001, dtype=np.float32), ValueError, r"Audio clip 0 is 1.00 s long, over the 1 s the audio encoder"),
        (np.zeros(200, dtype=np.float32), ValueError, "too short for a single audio position"),
        (np.zeros((2, 3, 800), dtype=np.float32), ValueError, "Audio clip 0 has shape"),
        (np.zeros((40, 800), dtype=np.float32), ValueError, "more than 16 channels"),
        (np.zeros(800, dtype=bool), TypeError, "Audio clip 0 has sample type bool"),
        ([0.1] * 800, TypeError, "Audio clip 0 is a float"),
        ("/no/such/file.wav", ValueError, "Audio clip 0: cannot read '/no/such/file.wav' as sound"),
        ("bm90IHNvdW5k", ValueError, "Audio clip 0: cannot read 'bm90IHNvdW5k' as sound"),
    ],
)
def test_bad_clips_are_clear_errors_naming_the_clip(tiny, clip, error, message):
    _, processor = tiny
    with pytest.raises(error, match=message):
        processor(text="<audio>", audio=clip if isinstance(clip, list) else [clip])


def test_undecodable_file_in_a_chat_is_a_clear_error(tiny, tmp_path):
    _, processor = tiny
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(ValueError, match="conversation 0 message 0 content item 0: cannot read"):
        processor.apply_chat_template(audio_chat("hi", clips=[str(path)]), tokenize=True)


def test_bad_sampling_rate_is_a_clear_error(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="sampling_rate must be a positive int"):
        features(processor, make_clip(0), sampling_rate=0)


@pytest.mark.parametrize(
    ("text", "clips", "message"),
    [
        ("<audio><audio>", 1, "The prompt has 2 '<audio>' placeholders but 1 audio clip was given"),
        ("no placeholder", 1, "The prompt has 0 '<audio>' placeholders but 1 audio clip was given"),
        ("<audio>", 0, "audio"),
    ],
)
def test_placeholder_and_clip_counts_are_checked(tiny, text, clips, message):
    _, processor = tiny
    with pytest.raises(ValueError, match=message):
        processor(text=text, audio=[make_clip(i) for i in range(clips)] or None)


def test_chat_template_puts_images_and_clips_in_order_before_the_user_text(tiny):
    _, processor = tiny
    content = [
        {"type": "audio", "audio": make_clip(0)},
        {"type": "image", "image": make_image(0)},
        {"type": "audio", "audio": make_clip(1)},
        {"type": "text", "text": "Which?"},
    ]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert rendered == "This is a dialog with AI assistant.\n<audio><image><audio><user>Which?<assistant>"
    image_only = processor.apply_chat_template(audio_chat("Which?", images=[make_image(0)]), add_generation_prompt=True)
    assert image_only == "This is a dialog with AI assistant.\n<image><user>Which?<assistant>"


def test_audio_items_without_a_source_render_a_placeholder(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Hi"}]}]
    assert processor.apply_chat_template(messages).endswith("<audio><user>Hi")
    with pytest.raises(ValueError, match="takes one of 'audio', 'path' or 'url'"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": "a", "path": "b"}]}])


def test_audio_items_in_assistant_turns_are_refused(tiny):
    _, processor = tiny
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "audio", "audio": make_clip(0)}]},
    ]
    with pytest.raises(ValueError, match="is audio in a assistant message"):
        processor.apply_chat_template(messages)


def test_audio_processor_saves_and_loads_its_feature_extractor(tiny, tmp_path):
    _, processor = tiny
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["audio_preprocessor"]["feature_extractor_type"] == "WhisperFeatureExtractor"
    assert saved["audio_pool_stride"] == 2 and saved["audio_token"] == "<audio>"
    assert "audio_inputs_omnifusion.py" in os.listdir(tmp_path)
    loaded = OmniFusionProcessor.from_pretrained(tmp_path)
    assert type(loaded.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert loaded.feature_extractor.chunk_length == 1 and loaded.special_token_ids == processor.special_token_ids
    clip = make_clip(2)
    for key, value in features(processor, clip).items():
        assert torch.equal(features(loaded, clip)[key], value), key
    assert type(AutoProcessor.from_pretrained(tmp_path)) is OmniFusionProcessor


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    model, processor = tiny
    folder = tmp_path_factory.mktemp("omnifusion-audio")
    reference = tmp_path_factory.mktemp("reference")
    (reference / "clip0.wav").write_bytes(wav_bytes(make_clip(0, 0.6, sampling_rate=8000), 8000))
    (reference / "clip1.wav").write_bytes(wav_bytes(make_clip(1, 0.9), 16000))
    make_image(0).save(reference / "image0.png")
    messages = audio_chat("What is said?", clips=[str(reference / "clip0.wav"), str(reference / "clip1.wav")])
    messages[0]["content"].insert(0, {"type": "image", "path": str(reference / "image0.png")})
    save_with_reference(model, processor, folder, reference, messages)
    return folder, reference


def test_saved_audio_folder_loads_with_the_same_outputs(saved):
    folder, reference = saved
    expected = torch.load(reference / "ref.pt")
    model = OmniFusionForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(model(**expected["inputs"]).logits, expected["logits"])
    assert model.config.audio_config.max_source_positions == 50


FRESH_PROCESS_SCRIPT = fresh_load_script(
    'assert type(processor.feature_extractor).__name__ == "WhisperFeatureExtractor"',
    'assert model.model.get_encoder(modality="audio") is model.model.audio_tower',
)


def test_audio_folder_loads_in_a_fresh_python_without_this_project(saved, tmp_path):
    folder, reference = saved
    assert "FRESH-LOAD-OK" in run_fresh_python(FRESH_PROCESS_SCRIPT, tmp_path, folder, reference)


def test_vllm_inputs_carry_checked_clips_at_the_feature_extractor_rate(tiny):
    _, processor = tiny
    clip = make_clip(0, 0.5, sampling_rate=8000)
    prompt = processor.vllm_inputs("<image><audio>Hi", images=[make_image(0)], audio=[clip], sampling_rate=8000)
    ((waveform, rate),) = prompt["multi_modal_data"]["audio"]
    assert rate == 16000 and waveform.shape == (8000,) and len(prompt["multi_modal_data"]["image"]) == 1
    with pytest.raises(ValueError, match="1 '<audio>' placeholder but 0 audio clips"):
        processor.vllm_inputs("<audio>Hi")
    assert processor.vllm_inputs("Hi") == {"prompt": "Hi"}
