"""Sound: config, the audio path of the model, placeholders per clip, generation with clips, gradients, image-only
folders unchanged."""

import pytest
import torch
from media_checks import (
    DATA,
    assert_batch_equals_rows_alone,
    assert_beams_keep_media_order,
    assert_cached_equals_uncached,
    assert_saves_recorded_files,
    encode,
    encoder_calls,
)

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM
from modeling_omnifusion.audio_omnifusion import audio_position_mask, expand_groups
from modeling_omnifusion.processing.audio_inputs_omnifusion import num_audio_positions
from modeling_omnifusion.testing.tiny import (
    audio_chat,
    audio_config,
    make_audio_model_and_processor,
    make_clip,
    make_image,
    make_model_and_processor,
)


@pytest.fixture(scope="module")
def tiny():
    return make_audio_model_and_processor()


def test_positions_per_clip_are_the_formula_in_processor_and_model():
    """The model's cut of the pooled frames keeps exactly `num_audio_positions` positions, for every length."""
    lengths = torch.arange(1, 3001)
    mask = (torch.arange(3000)[None, :] < lengths[:, None]).long()
    for pool in (1, 2, 3, 4):
        kept = audio_position_mask(mask, frame_stride=2, pool_stride=pool).sum(-1)
        assert torch.equal(kept, num_audio_positions(lengths, pool).clamp(min=0)), pool
    assert num_audio_positions(100, 2) == 25 and num_audio_positions(3000, 2) == 750  # 25 per second


def test_config_appends_audio_marker_rows_after_the_image_rows():
    config = OmniFusionConfig(audio_config=audio_config())
    assert config.special_token_ids == [32000, 32001, 32002, 32003, 32004, 32005, 32006, 32007]
    assert OmniFusionConfig().special_token_ids == [32000, 32001, 32002, 32003, 32004]
    assert config.processor_kwargs["audio_pool_stride"] == 2
    assert "audio_pool_stride" not in OmniFusionConfig().processor_kwargs


def test_config_round_trips_with_sound(tmp_path):
    config = OmniFusionConfig(audio_config=audio_config().to_dict(), audio_adapter_type="linear", audio_pool_stride=3)
    config.save_pretrained(tmp_path)
    loaded = OmniFusionConfig.from_pretrained(tmp_path)
    assert loaded.audio_config.model_type == "whisper" and loaded.audio_config.d_model == 32
    assert (loaded.audio_adapter_type, loaded.audio_pool_stride) == ("linear", 3)
    assert loaded.special_token_ids == config.special_token_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audio_adapter_type": "transformer"}, "audio_adapter_type"),
        ({"audio_pool_stride": 0}, "audio_pool_stride must be at least 1"),
        ({"audio_token_id": 32009}, "must be the smallest of the three audio ids"),
        ({"audio_config": {"model_type": "clip_vision_model"}}, "encoders are not supported"),
    ],
)
def test_bad_audio_config_is_a_clear_error(kwargs, message):
    kwargs = {"audio_config": audio_config(), **kwargs}
    with pytest.raises(Exception, match=message):  # ValueError, or the strict dataclass's error for a field's type
        OmniFusionConfig(**kwargs)


def test_model_has_a_frozen_audio_tower_found_by_get_encoder(tiny):
    model, _ = tiny
    base = model.model
    assert base.get_encoder(modality="audio") is base.audio_tower
    assert not any(parameter.requires_grad for parameter in base.audio_tower.parameters())
    assert all(parameter.requires_grad for parameter in base.audio_adapter.parameters())
    assert base.get_input_embeddings().special_embeddings.weight.shape[0] == 8


def test_processor_expands_each_clip_by_its_duration(tiny):
    _, processor = tiny
    clips = [make_clip(0, 0.5), make_clip(1, 1.0), make_clip(2, 0.21)]
    inputs = processor(text="<audio><audio> and <audio>", audio=clips, return_tensors="pt")
    assert inputs["input_features"].shape == (3, 80, 100)
    assert inputs["input_features_mask"].sum(-1).tolist() == [50, 100, 21]
    expected = [num_audio_positions(frames, 2) for frames in (50, 100, 21)]
    assert expected == [12, 25, 5]
    ids = inputs["input_ids"][0].tolist()
    starts = [i for i, token in enumerate(ids) if token == processor.audio_start_token_id]
    ends = [i for i, token in enumerate(ids) if token == processor.audio_end_token_id]
    assert [end - start - 1 for start, end in zip(starts, ends)] == expected
    assert ids.count(processor.audio_token_id) == sum(expected)
    lengths = [clip.size for clip in clips]
    assert processor._get_num_multimodal_tokens(audio_lengths=lengths)["num_audio_tokens"] == expected


def test_audio_features_hold_each_clip_cut_to_its_duration(tiny):
    model, processor = tiny
    inputs = processor(text="<audio><audio>", audio=[make_clip(0, 0.5), make_clip(1, 1.0)], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
        alone = model.model.get_audio_features(inputs["input_features"][:1], inputs["input_features_mask"][:1])
    assert features.pooler_output.shape == (12 + 25, model.config.text_config.hidden_size)
    torch.testing.assert_close(features.pooler_output[:12], alone.pooler_output)
    assert features.last_hidden_state.shape == (2, 50, 32)
    assert type(features).__name__ == "BaseModelOutputWithPooling"


def test_placeholder_count_and_features_disagreeing_is_a_clear_error(tiny):
    model, processor = tiny
    inputs = processor(text="<audio>", audio=[make_clip(0, 0.5)], return_tensors="pt")
    ids = inputs["input_ids"]
    ids[ids == processor.audio_token_id] = torch.where(
        torch.arange(12) == 0, processor.audio_start_token_id, processor.audio_token_id
    )
    with pytest.raises(ValueError, match="11 placeholder positions in the input but 12 audio feature vectors"):
        model(**inputs)


def test_wrong_window_length_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"input_features must be \[clips, mel bins, 100\]"):
        model.model.get_audio_features(torch.zeros(1, 80, 3000))


def rows():
    """Four chats: an image, sound, both (two clips), neither."""
    return [
        audio_chat("What is it?", images=[make_image(0)]),
        audio_chat("What is said?", clips=[make_clip(1, 0.7)]),
        audio_chat("Both?", clips=[make_clip(2, 0.4), make_clip(3, 1.0)], images=[make_image(4)]),
        audio_chat("Describe the image."),
    ]


def test_batch_mixing_images_sound_both_and_neither_equals_its_rows_alone(tiny):
    model, processor = tiny
    assert_batch_equals_rows_alone(model, processor, rows(), new_tokens=5)


def test_cached_generation_equals_uncached(tiny):
    model, processor = tiny
    assert_cached_equals_uncached(model, encode(processor, rows()[2]))


@torch.no_grad()
def test_every_clip_is_encoded_once_per_generate(tiny, monkeypatch):
    model, processor = tiny
    inputs = encode(processor, rows()[2])
    calls = encoder_calls(
        monkeypatch,
        model,
        "get_audio_features",
        lambda *args, **kwargs: args[0].shape[0] if args else kwargs["input_features"].shape[0],
    )
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert calls == [2, 2]


def test_beams_keep_two_clips_of_one_prompt_in_order(tiny):
    """Every beam starts from the same prompt: with the clips misordered across beams, their first logits differ."""
    model, processor = tiny
    first, second = make_clip(5, 0.3), make_clip(6, 0.9)
    assert_beams_keep_media_order(
        model,
        processor,
        audio_chat("Which came first?", clips=[first, second]),
        audio_chat("Which came first?", clips=[second, first]),
    )


@torch.no_grad()
def test_beams_over_a_batch_with_different_clip_counts_match_each_prompt_alone(tiny):
    model, processor = tiny
    chats = [rows()[2], rows()[1], rows()[0]]
    batch = encode(processor, chats)
    settings = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    together = model.generate(**batch, **settings)[:, -4:]
    for index, messages in enumerate(chats):
        alone = model.generate(**encode(processor, messages), **settings)[:, -4:]
        assert torch.equal(together[2 * index : 2 * index + 2], alone)


def test_expand_groups_repeats_whole_groups():
    rows_ = torch.arange(5)
    assert expand_groups(rows_, torch.tensor([2, 0, 3]), 2).tolist() == [0, 1, 0, 1, 2, 3, 4, 2, 3, 4]
    with pytest.raises(ValueError, match="has 5 rows but the prompts call for 4"):
        expand_groups(rows_, torch.tensor([2, 2]), 2)


def test_gradients_reach_only_the_audio_adapter_and_audio_marker_rows(tiny):
    model, processor = tiny
    model.requires_grad_(False)
    model.model.audio_adapter.requires_grad_(True)
    table = model.get_input_embeddings().special_embeddings
    table.requires_grad_(True)
    handle = model.get_input_embeddings().restrict_marker_gradient(
        [processor.audio_token_id, processor.audio_start_token_id, processor.audio_end_token_id]
    )
    try:
        inputs = encode(processor, rows()[2])
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= model.config.text_config.vocab_size, -100)
        model(**inputs, labels=labels).loss.backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {name for name, _ in model.named_parameters() if "audio_adapter" in name} | {
            "model.language_model.embed_tokens.special_embeddings.weight"
        }
        row_norms = table.weight.grad.norm(dim=-1)
        assert (row_norms[:5] == 0).all() and (row_norms[6:] > 0).all()  # <audio> rows are overwritten by features
        assert all(p.grad.abs().sum() > 0 for p in model.model.audio_adapter.parameters())
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
        model.model.audio_tower.requires_grad_(False)


def test_restricting_marker_gradient_to_unknown_ids_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="are not marker ids"):
        model.get_input_embeddings().restrict_marker_gradient([7])


@pytest.mark.parametrize("adapter", ["linear", "mlp"])
def test_audio_adapter_types_and_pool_strides(adapter):
    model, processor = make_audio_model_and_processor(audio_adapter_type=adapter, audio_pool_stride=4)
    inputs = encode(processor, audio_chat("Hi", clips=[make_clip(0, 1.0)]))
    assert (inputs["input_ids"] == processor.audio_token_id).sum() == num_audio_positions(100, 4) == 12
    with torch.no_grad():
        assert model(**inputs).logits.isfinite().all()


def test_image_only_model_is_unchanged_and_refuses_sound():
    model, processor = make_model_and_processor()
    assert not hasattr(model.model, "audio_tower") and processor.feature_extractor is None
    assert processor.audio_token is None and model.config.audio_config is None
    with pytest.raises(ValueError, match="has no audio encoder"):
        processor(text="hi", audio=[make_clip(0)])
    with pytest.raises(ValueError, match="this model has no audio encoder"):
        encode(processor, audio_chat("hi", clips=[make_clip(0)]))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("clip_transformer", {}),
        (
            "mix_tiles",
            dict(
                vision=["clip", "dinov2"], adapter_type="mix_sum", image_grid_pinpoints=[[64, 32], [32, 64], [64, 64]]
            ),
        ),
    ],
)
def test_image_only_folders_save_the_files_they_always_did(name, kwargs, tmp_path):
    """config.json, the processor files and the weight names of image-only folders as recorded before sound."""
    model, processor = make_model_and_processor(**kwargs)
    assert_saves_recorded_files(model, processor, tmp_path, DATA / "image_only_saves" / name)
    assert OmniFusionForCausalLM.from_pretrained(tmp_path).config.special_token_ids == list(range(300, 305))


def test_prompt_longer_than_the_lm_positions_is_refused_with_sound_counted(tiny):
    model, processor = tiny
    inputs = encode(processor, audio_chat("Hi " * 20, clips=[make_clip(0, 1.0), make_clip(1, 1.0)]))
    limit = inputs["input_ids"].shape[1] - 1
    original = model.config.text_config.max_position_embeddings
    model.config.text_config.max_position_embeddings = limit
    try:
        with pytest.raises(ValueError, match=rf"image and audio positions included.*max_position_embeddings={limit}"):
            model(**inputs)
    finally:
        model.config.text_config.max_position_embeddings = original


def test_audio_markers_are_input_only(tiny):
    model, processor = tiny
    vocab = model.get_output_embeddings().out_features
    assert vocab == model.config.text_config.vocab_size
    assert min(processor.audio_token_id, processor.audio_start_token_id, processor.audio_end_token_id) >= vocab


@torch.no_grad()
def test_adding_sound_to_an_image_model_keeps_its_image_outputs_bit_identical():
    from transformers import WhisperFeatureExtractor

    from modeling_omnifusion import OmniFusionProcessor, add_sound

    image_model, image_processor = make_model_and_processor()
    processor = OmniFusionProcessor(
        image_processor.image_processor,
        image_processor.tokenizer,
        **image_model.config.processor_kwargs,
        audio_preprocessor=WhisperFeatureExtractor(chunk_length=1),
    )
    audio_ids = {k: v for k, v in processor.special_token_ids.items() if k.startswith("audio")}
    model = add_sound(image_model, audio_config(), audio_pool_stride=2, **audio_ids)
    assert model.config.special_token_ids == image_model.config.special_token_ids + list(audio_ids.values())
    image_inputs = encode(image_processor, audio_chat("What is it?", images=[make_image(0)]))
    assert torch.equal(model(**image_inputs).logits, image_model(**image_inputs).logits)
    both = encode(processor, audio_chat("And this?", clips=[make_clip(0)], images=[make_image(1)]))
    assert model(**both).logits.isfinite().all()
    with pytest.raises(ValueError, match="already has sound"):
        add_sound(model, audio_config())


@torch.no_grad()
def test_beams_from_inputs_embeds_and_pre_encoded_audio_keep_clip_order(tiny):
    model, processor = tiny
    inputs = encode(processor, audio_chat("Which came first?", clips=[make_clip(5, 0.3), make_clip(6, 0.9)]))
    settings = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    reference = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1] :]
    audio = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    pre_encoded = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        mm_encoder_outputs={"audio": audio},
        **settings,
    )
    assert torch.equal(pre_encoded[:, inputs["input_ids"].shape[1] :], reference)
    embeds = model.model.merge_features(
        inputs["input_ids"], model.model.embed_ids(inputs["input_ids"]), {"audio": audio}
    )
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **settings)
    assert torch.equal(from_embeds, reference)


def test_model_card_describes_the_sound_side_only_when_there_is_one():
    from modeling_omnifusion.hub_omnifusion import build_model_card

    audio_model, _ = make_audio_model_and_processor()
    card = str(build_model_card(audio_model.config))
    assert "It also hears: a frozen whisper encoder, 2x average pooling" in card and "`mlp` audio adapter" in card
    assert {"audio", "speech"} <= set(build_model_card(audio_model.config).data.tags)
    image_card = str(build_model_card(OmniFusionConfig()))
    assert "hears" not in image_card and "speech" not in image_card
