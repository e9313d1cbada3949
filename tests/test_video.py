"""Video: config, frames through the vision side with pooling, placeholders per frame, generation with videos,
gradients, extending an image model, the video intake (sampling, PyAV decoding, bad videos), saved folders (also in a
fresh Python without this project), image-only and audio folders unchanged."""

import json

import numpy as np
import pytest
import torch
from fresh_python import run_fresh_python
from media_checks import (
    DATA,
    assert_batch_equals_rows_alone,
    assert_beams_keep_media_order,
    assert_cached_equals_uncached,
    assert_saves_recorded_files,
    encode,
    encoder_calls,
    fresh_load_script,
    save_with_reference,
)

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.processing.video_inputs_omnifusion import sample_frame_indices
from modeling_omnifusion.testing.tiny import (
    make_audio_model_and_processor,
    make_clip,
    make_image,
    make_model_and_processor,
    make_video,
    make_video_model_and_processor,
    video_chat,
)
from modeling_omnifusion.testing.videos import motion_clip, write_video
from modeling_omnifusion.video_omnifusion import add_video, pool_frames

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def tiny():
    return make_video_model_and_processor(audio=True, video_adapter="separate")


def rows():
    """Five chats: a video, an image and a video, sound and a video, two videos, text only."""
    return [
        video_chat("What moves?", videos=[make_video(0, 5)]),
        video_chat("Both?", videos=[make_video(1, 7)], images=[make_image(2)]),
        [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": make_clip(3, 0.5)},
                    {"type": "video", "video": make_video(4, 4)},
                    {"type": "text", "text": "Sound?"},
                ],
            }
        ],
        video_chat("Which first?", videos=[make_video(5, 4), make_video(6, 9)]),
        video_chat("Describe the image."),
    ]


def test_config_appends_video_marker_rows_after_the_image_and_audio_rows(tiny):
    model, processor = tiny
    fields = model.config.special_token_fields
    assert fields[-3:] == ("video_token_id", "video_start_token_id", "video_end_token_id")
    assert fields[5:8] == ("audio_token_id", "audio_start_token_id", "audio_end_token_id")
    assert model.config.special_token_ids == list(range(300, 311)) == list(processor.special_token_ids.values())
    assert model.config.num_video_frame_tokens == 4 and model.config.processor_kwargs["num_video_frame_tokens"] == 4
    assert model.get_input_embeddings().special_embeddings.weight.shape[0] == 11


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(video_num_frames=0), ValueError, "video_num_frames must be at least 1"),
        (dict(video_num_frames=4, video_pool_size=9), ValueError, "larger than the 4-patch side"),
        (dict(video_num_frames=4, vision_feature_select_strategy="full"), ValueError, "square grid"),
        (dict(video_num_frames=4, video_token_id=400), ValueError, "must be the smallest of the three video ids"),
    ],
)
def test_bad_video_config_is_a_clear_error(tiny, kwargs, error, message):
    config = tiny[0].config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        config.pop(key, None)
    with pytest.raises(error, match=message):
        OmniFusionConfig(**{**config, **kwargs})


def test_frame_sampling_takes_exact_indices():
    assert sample_frame_indices(10, 4).tolist() == [0, 2, 5, 7]
    assert sample_frame_indices(8, 8).tolist() == list(range(8))
    assert sample_frame_indices(3, 8).tolist() == [0, 1, 2]  # fewer frames than asked: all of them
    assert sample_frame_indices(60, fps=2, video_fps=30).tolist() == [0, 15, 30, 45]  # 2 s at 2 fps
    assert sample_frame_indices(10, fps=0.1, video_fps=30).tolist() == [0]
    with pytest.raises(ValueError, match="needs the video's frame rate"):
        sample_frame_indices(10, fps=2)


def test_processor_expands_each_video_by_its_frames_and_samples_arrays(tiny):
    _, processor = tiny
    video = make_video(0, 10)
    inputs = processor(text="<video>Hi", videos=[video], return_tensors="pt")
    assert (inputs["input_ids"] == processor.video_token_id).sum() == 4 * 4  # 4 frames x 4 positions
    assert inputs["pixel_values_videos"].shape == (4, 3, 32, 32)
    reference = processor.image_processor(list(video[[0, 2, 5, 7]]), return_tensors="pt")["pixel_values"]
    assert torch.equal(inputs["pixel_values_videos"], reference)
    two = processor(text="<video>Hi", videos=[video], num_frames=2, return_tensors="pt")
    assert torch.equal(two["pixel_values_videos"], reference[[0, 2]])
    by_rate = processor(text="<video>", videos=[video], fps=1, video_metadata={"fps": 5}, return_tensors="pt")
    assert by_rate["pixel_values_videos"].shape[0] == 2 and torch.equal(
        by_rate["pixel_values_videos"], reference[[0, 2]]
    )
    channels_first = processor(
        text="<video>", videos=[torch.from_numpy(video).permute(0, 3, 1, 2)], return_tensors="pt"
    )
    assert torch.equal(channels_first["pixel_values_videos"], reference)
    floats = processor(text="<video>", videos=[video / 255.0], return_tensors="pt")
    assert torch.equal(floats["pixel_values_videos"], reference)


def test_pool_frames_averages_2x2_windows_in_row_major_order():
    grid = torch.arange(16.0).reshape(1, 16, 1)
    assert pool_frames(grid, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert torch.equal(pool_frames(grid, 1), grid)


def test_video_features_are_frames_times_pooled_positions(tiny):
    model, processor = tiny
    inputs = processor(text="<video>", videos=[make_video(0, 6)], num_frames=3, return_tensors="pt")
    with torch.no_grad():
        output = model.get_video_features(inputs["pixel_values_videos"])
        image = model.get_image_features(inputs["pixel_values_videos"], adapter=model.model.video_adapter)
    assert output.pooler_output.shape == (3, 4, model.config.text_config.hidden_size)
    assert torch.equal(output.pooler_output, pool_frames(image.pooler_output, 2))


def test_batch_mixing_videos_images_sound_and_text_equals_its_rows_alone(tiny):
    model, processor = tiny
    assert_batch_equals_rows_alone(model, processor, rows(), new_tokens=4)


def test_cached_generation_equals_uncached(tiny):
    model, processor = tiny
    assert_cached_equals_uncached(model, encode(processor, rows()[1]))


@torch.no_grad()
def test_every_video_is_encoded_once_per_generate_beams_included(tiny, monkeypatch):
    model, processor = tiny
    inputs = encode(processor, rows()[3])
    count = lambda pixel_values_videos, **kwargs: pixel_values_videos.shape[0]  # noqa: E731
    calls = encoder_calls(monkeypatch, model, "get_video_features", count)
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    model.generate(**inputs, max_new_tokens=3, num_beams=3, do_sample=False)
    assert calls == [8, 8]


@torch.no_grad()
def test_beams_keep_two_videos_of_one_prompt_in_order(tiny):
    model, processor = tiny
    first, second = make_video(7, 4), make_video(8, 4)
    assert_beams_keep_media_order(
        model,
        processor,
        video_chat("Which first?", videos=[first, second]),
        video_chat("Which first?", videos=[second, first]),
    )
    chats = [rows()[3], rows()[0]]
    settings = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    together = model.generate(**encode(processor, chats), **settings)[:, -3:]
    for index, messages in enumerate(chats):
        assert torch.equal(
            together[2 * index : 2 * index + 2], model.generate(**encode(processor, messages), **settings)[:, -3:]
        )


def test_gradients_reach_only_the_video_adapter_and_video_marker_rows(tiny):
    model, processor = tiny
    model.requires_grad_(False)
    model.model.video_adapter.requires_grad_(True)
    table = model.get_input_embeddings().special_embeddings
    table.requires_grad_(True)
    ids = [processor.video_token_id, processor.video_start_token_id, processor.video_end_token_id]
    handle = model.get_input_embeddings().restrict_marker_gradient(ids)
    try:
        inputs = encode(processor, rows()[1])
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= model.config.text_config.vocab_size, -100)
        model.train()
        model(**inputs, labels=labels).loss.backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {name for name, _ in model.named_parameters() if "video_adapter" in name} | {
            "model.language_model.embed_tokens.special_embeddings.weight"
        }
        row_norms = table.weight.grad.norm(dim=-1)
        assert (row_norms[:9] == 0).all() and (row_norms[9:] > 0).all()  # the <video> row is overwritten
        assert all(p.grad.abs().sum() > 0 for p in model.model.video_adapter.parameters())
    finally:
        handle.remove()
        model.eval()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
        model.model.audio_tower.requires_grad_(False)


@pytest.mark.parametrize("video_adapter", ["shared", "separate"])
def test_adding_video_to_an_image_model_keeps_its_image_outputs_bit_identical(video_adapter):
    image_model, image_processor = make_model_and_processor()
    _, video_processor = make_video_model_and_processor()
    video_model = add_video(
        image_model, video_num_frames=4, video_adapter=video_adapter, **video_processor.special_token_ids
    )
    inputs = encode(image_processor, video_chat("What is it?", images=[make_image(0)]))
    with torch.no_grad():
        assert torch.equal(video_model(**inputs).logits, image_model(**inputs).logits)
        video = encode(video_processor, video_chat("What moves?", videos=[make_video(1)]))
        assert video_model(**video).logits.isfinite().all()
    with pytest.raises(ValueError, match="already takes video"):
        add_video(video_model, video_num_frames=4)


def test_image_only_model_refuses_videos():
    model, processor = make_model_and_processor()
    assert processor.video_processor is None and processor.video_token is None
    assert "video_num_frames" not in model.config.to_dict() and not hasattr(model.model, "video_adapter")
    with pytest.raises(ValueError, match="takes no video"):
        processor(text="hi", videos=[make_video(0)])
    with pytest.raises(ValueError, match="'video'"):
        encode(processor, video_chat("hi", videos=[make_video(0)]))
    with pytest.raises(ValueError, match="takes no video"):
        model.get_video_features(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(
    ("video", "error", "message"),
    [
        (np.zeros((0, 32, 32, 3), np.uint8), ValueError, "Video 0 has no frames"),
        (np.full((2, 32, 32, 3), np.nan, np.float32), ValueError, "Video 0 holds NaN"),
        (np.zeros((2, 9000, 32, 3), np.uint8), ValueError, "each side must be 1 to 8192"),
        (np.zeros((1_000_001, 1, 1, 1), np.uint8), ValueError, "1000001 frames, over the 1000000"),
        (np.zeros((2, 32, 32), np.uint8), ValueError, "Video 0 has shape \\(1, 2, 32, 32\\): no axis of 1, 3 or 4"),
        (np.zeros((2, 2, 32, 32, 3), np.uint8), ValueError, "expected \\[frames, height, width, channels\\]"),
        (np.zeros((2, 32, 32, 3), np.int32), TypeError, "pixel type int32"),
        (np.full((2, 32, 32, 3), 2.0, np.float32), ValueError, "outside \\[0, 1\\]"),
        ("/nonexistent/clip.mp4", ValueError, "Video 0: cannot read '/nonexistent/clip.mp4' as a video"),
        (3, TypeError, "Video 0 is a int"),
    ],
)
def test_bad_videos_are_clear_errors_naming_the_video(tiny, video, error, message):
    _, processor = tiny
    with pytest.raises(error, match=message):
        processor(text="<video>", videos=video if isinstance(video, list) else [video])


def test_unreadable_file_and_placeholder_counts_are_clear_errors(tiny, tmp_path):
    _, processor = tiny
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="Video 1: cannot read .*broken.mp4"):
        encode(processor, video_chat("hi", videos=[make_video(0), str(broken)]))
    with pytest.raises(ValueError, match="1 '<video>' placeholder but 2 videos"):
        processor(text="<video>hi", videos=[make_video(0), make_video(1)])
    with pytest.raises(ValueError, match="num_frames must be an int from 1 to 256"):
        processor(text="<video>hi", videos=[make_video(0)], num_frames=0)


def test_a_real_mp4_is_decoded_and_sampled_like_its_frames(tiny, tmp_path):
    _, processor = tiny
    frames = motion_clip("right", seed=3, frames=12, size=32)
    path = write_video(tmp_path / "right.mp4", frames, fps=6)
    from modeling_omnifusion.processing.video_inputs_omnifusion import decode_video

    decoded = decode_video(path, "clip", num_frames=12)
    assert decoded.shape == (12, 32, 32, 3) and np.abs(decoded.astype(int) - frames).mean() < 6  # lossy codec
    sampled = decode_video(path, "clip", num_frames=4)
    assert np.array_equal(sampled, decoded[[0, 3, 6, 9]])
    assert np.array_equal(decode_video(path, "clip", fps=1), decoded[[0, 6]])  # 2 s at 1 fps
    by_path = encode(processor, video_chat("What moves?", videos=[path]))
    by_frames = encode(processor, video_chat("What moves?", videos=[decoded[[0, 3, 6, 9]]]))
    for key, value in by_frames.items():
        assert torch.equal(by_path[key], value), key


@pytest.mark.parametrize(
    ("kind", "name", "build"),
    [
        ("image_only_saves", "clip_transformer", make_model_and_processor),
        ("audio_saves", "whisper_mlp", make_audio_model_and_processor),
    ],
)
def test_image_only_and_audio_folders_save_the_files_they_did_before_video(kind, name, build, tmp_path):
    model, processor = build()
    assert_saves_recorded_files(model, processor, tmp_path, DATA / kind / name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    model, processor = tiny
    folder = tmp_path_factory.mktemp("omnifusion-video")
    reference = tmp_path_factory.mktemp("reference")
    path = write_video(reference / "clip.mp4", motion_clip("up", seed=1, frames=8), fps=8)
    save_with_reference(model, processor, folder, reference, video_chat("What moves?", videos=[path]))
    return folder, reference


def test_video_processor_is_saved_and_the_folder_loads_with_the_same_outputs(saved):
    folder, reference = saved
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["video_preprocessor"] == {
        "fps": None,
        "num_frames": 4,
        "video_processor_type": "OmniFusionVideoProcessor",
    }
    assert (folder / "video_inputs_omnifusion.py").exists() and (folder / "video_omnifusion.py").exists()
    expected = torch.load(reference / "ref.pt")
    processor = OmniFusionProcessor.from_pretrained(folder)
    assert processor.video_processor.num_frames == 4 and processor.num_video_frame_tokens == 4
    inputs = encode(processor, json.loads((reference / "chat.json").read_text()))
    for key, value in expected["inputs"].items():
        assert torch.equal(inputs[key], value), key
    model = OmniFusionForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected["logits"])


FRESH_PROCESS_SCRIPT = fresh_load_script(
    'assert type(processor.video_processor).__name__ == "OmniFusionVideoProcessor"'
)


def test_video_folder_loads_in_a_fresh_python_without_this_project(saved, tmp_path):
    folder, reference = saved
    assert "FRESH-LOAD-OK" in run_fresh_python(FRESH_PROCESS_SCRIPT, tmp_path, folder, reference)
