"""Where input enters: images are what they look like, text cannot forge control tokens, bad input is a clear error."""

import json
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.testing.tiny import (
    chat,
    make_image,
    make_model_and_processor,
    make_processor,
    make_sentencepiece_tokenizer,
)

# Bounded (about a second a test) and reproducible; OMNIFUSION_FUZZ_EXAMPLES=5000 runs a longer, random search.
FUZZ_EXAMPLES = os.environ.get("OMNIFUSION_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(FUZZ_EXAMPLES or 300),
    derandomize=FUZZ_EXAMPLES is None,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=list(HealthCheck),
)
PROCESSOR = make_processor(end_assistant_turns_with_eos=True)
TYPED = ["<user>", "<assistant>", "<image_start>", "<image_end>", "<image>", "</s>", "<s>", "<unk>"]


def pixels(image) -> torch.Tensor:
    return PROCESSOR(images=image, text="<image>q", return_tensors="pt")["pixel_values"]


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------

RGB = np.asarray(make_image(5, size=40))
GRAY = RGB[..., 0]


@pytest.mark.parametrize(
    "image, same_as",
    [
        (RGB / 255.0, RGB),
        (RGB.astype(np.float32) / 255, RGB),
        (torch.tensor(RGB).permute(2, 0, 1) / 255.0, RGB),
        (torch.tensor(RGB).permute(2, 0, 1).to(torch.bfloat16) * 0 + 1, np.full_like(RGB, 255)),
        ((GRAY / 255.0)[None], GRAY),
        (GRAY / 255.0, GRAY),
        (PIL.Image.fromarray((GRAY / 255.0).astype(np.float32), "F"), GRAY),
        (RGB.astype(np.float32), RGB),
        (PIL.Image.fromarray(GRAY.astype(np.uint16) * 257), GRAY),
        (GRAY.astype(np.uint16) * 257, GRAY),
        (PIL.Image.fromarray(GRAY.astype(np.int32)), GRAY),
        (GRAY.astype(np.int64), GRAY),
        (GRAY > 127, (GRAY > 127).astype(np.uint8) * 255),
    ],
    ids=["np-hwc-f64", "np-hwc-f32", "torch-chw", "torch-bf16", "1xhxw", "hxw", "pil-F", "float-0-255", "pil-I;16",
         "np-uint16", "pil-I-8bit", "np-int64", "bool"],
)  # fmt: skip
def test_images_of_any_depth_give_the_pixels_of_the_same_8_bit_picture(image, same_as):
    expected = pixels(PIL.Image.fromarray(same_as).convert("RGB"))
    assert torch.equal(pixels(image), expected)


@pytest.mark.parametrize(
    "image, message",
    [
        (PIL.Image.new("RGB", (0, 0)), "Image 0 is empty: 0x0"),
        (np.zeros((0, 5, 3), np.uint8), "Image 0 is empty: 0x5"),
        (torch.zeros(3, 4, 0), "Image 0 is empty: 4x0"),
        (np.zeros((1, 1, 3, 8, 8), np.uint8), r"Image 0 has shape \(1, 1, 3, 8, 8\)"),
        (np.zeros(8, np.uint8), r"Image 0 has shape \(8,\)"),
        (np.full((8, 8, 3), np.nan, np.float32), "Image 0 holds NaN or infinite"),
        (np.full((8, 8), np.inf), "Image 0 holds NaN or infinite"),
        (np.full((8, 8), -0.5), r"float pixels must be in \[0, 1\]"),
        (np.full((8, 8), 300, np.int32), "integer pixels must be 0..255"),
        (PIL.Image.fromarray(np.full((8, 8), 65535, np.int32)), "int32 image with values 65535..65535"),
        (np.zeros((8, 8, 7), np.uint8), r"Image 0 has shape \(8, 8, 7\)"),
    ],
    ids=["pil-0x0", "np-0x5", "torch-4x0", "5-d", "1-d", "nan", "inf", "negative-float", "int-300", "pil-I-16bit",
         "7-channels"],
)  # fmt: skip
def test_bad_images_are_a_value_error_naming_the_image(image, message):
    with pytest.raises(ValueError, match=message):
        pixels(image)


def test_the_failing_image_is_named_by_its_position():
    with pytest.raises(ValueError, match="Image 2 is empty"):
        PROCESSOR(
            images=[[make_image(0)], [make_image(1), np.zeros((0, 0, 3), np.uint8)]], text=["<image>", "<image><image>"]
        )


def test_non_images_are_a_type_error_naming_the_image():
    with pytest.raises(TypeError, match="Image 1 is a dict"):
        PROCESSOR(images=[make_image(0), {"a": 1}], text="<image><image>")


def test_in_memory_decompression_bomb_is_refused_like_a_file(tmp_path, monkeypatch):
    """An in memory image beyond the decompression bomb limit is refused like a file."""
    make_image(0, size=20).save(tmp_path / "big.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # 20x20 = 400 pixels > 2 x 100
    with pytest.raises(PIL.Image.DecompressionBombError):
        PIL.Image.open(tmp_path / "big.png")
    with pytest.raises(ValueError, match="decompression bomb"):
        pixels(make_image(0, size=20))
    with pytest.raises(ValueError, match="decompression bomb"):
        pixels(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="Image 0: cannot read .*big.png"):
        pixels(str(tmp_path / "big.png"))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 300)  # between the limit and twice it: a warning, like PIL's
    with pytest.warns(PIL.Image.DecompressionBombWarning):
        pixels(make_image(0, size=20))


def test_a_16_bit_file_by_path_and_in_a_chat_is_the_same_picture(tmp_path):
    PIL.Image.fromarray(GRAY.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    expected = pixels(PIL.Image.fromarray(GRAY).convert("RGB"))
    assert torch.equal(pixels(str(tmp_path / "deep.png")), expected)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(tmp_path / "deep.png")}, {"type": "text", "text": "q"}],
        }
    ]
    out = PROCESSOR.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(out["pixel_values"], expected)


def test_prepare_images_is_the_same_intake():
    assert torch.equal(PROCESSOR.prepare_images([GRAY / 255.0], return_tensors="pt")["pixel_values"], pixels(GRAY))
    with pytest.raises(ValueError, match="Image 0 holds NaN"):
        PROCESSOR.prepare_images([np.full((4, 4), np.nan)])


# --------------------------------------------------------------------------------------------------------------------
# Text cannot forge control tokens
# --------------------------------------------------------------------------------------------------------------------


def control_ids(processor) -> dict[int, str]:
    tokenizer = processor.tokenizer
    return {tokenizer.convert_tokens_to_ids(token): token for token in tokenizer.added_tokens_encoder}


def control_counts(processor, ids) -> dict[str, int]:
    names = control_ids(processor)
    counts = {}
    for token_id in ids:
        if token_id in names:
            counts[names[token_id]] = counts.get(names[token_id], 0) + 1
    return counts


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def any_processor(request, tmp_path_factory):
    if request.param == "byte-level":
        return make_processor(end_assistant_turns_with_eos=True)
    tokenizer, _ = make_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm"))
    return make_processor(tokenizer=tokenizer, end_assistant_turns_with_eos=True)


def test_typed_markers_and_eos_in_any_message_are_ordinary_characters(any_processor):
    processor, tokenizer = any_processor, any_processor.tokenizer
    typed = " ".join(TYPED) + " <<user>> <\u2060user>"
    messages = [
        {"role": "system", "content": f"S {typed}\n"},
        {
            "role": "user",
            "content": [{"type": "image", "image": make_image(0)}, {"type": "text", "text": f"U {typed}"}],
        },
        {"role": "assistant", "content": f"A {typed}"},
    ]
    out = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
    ids = out["input_ids"][0]
    assert control_counts(processor, ids) == {
        "<user>": 1, "<assistant>": 1, "<image_start>": 1, "<image_end>": 1, "<image>": processor.num_image_tokens,
        "</s>": 1,
    }  # fmt: skip
    plain = lambda text: tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # noqa: E731
    user_at, assistant_at = ids.index(processor.user_token_id), ids.index(processor.assistant_token_id)
    assert ids[: ids.index(processor.image_start_token_id)] == plain(f"S {typed}\n".replace("\u2060", ""))
    assert ids[user_at + 1 : assistant_at] == plain(f"U {typed}".replace("\u2060", ""))
    assert ids[assistant_at + 1 : -1] == plain(f"A {typed}".replace("\u2060", ""))


def test_a_render_then_tokenize_engine_sees_no_forged_marker(any_processor):
    """What vLLM does: render the template to text, then run the processor's plain-text call on that text."""
    processor = any_processor
    messages = chat(" ".join(TYPED), images=[make_image(0)])
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    direct = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    engine = processor(images=[make_image(0)], text=rendered)
    assert engine["input_ids"] == direct["input_ids"]
    assert processor.tokenizer(rendered, add_special_tokens=False)["input_ids"].count(processor.user_token_id) == 1


def test_the_plain_text_api_reads_its_prompt_markers_and_placeholder():
    ids = PROCESSOR(images=[make_image(0)], text="<image><user>hi<assistant>")["input_ids"][0]
    assert control_counts(PROCESSOR, ids) == {
        "<image_start>": 1,
        "<image>": 16,
        "<image_end>": 1,
        "<user>": 1,
        "<assistant>": 1,
    }


MESSAGE_TEXT = st.lists(
    st.sampled_from(TYPED + ["<", ">", "/", "s", "user", " ", "\u2060", "a", "\n", "<image"]), max_size=12
).map("".join)


@FUZZ
@given(
    turns=st.lists(st.tuples(MESSAGE_TEXT, MESSAGE_TEXT, st.integers(0, 2)), min_size=1, max_size=3),
    system=st.one_of(st.none(), MESSAGE_TEXT),
    add_generation_prompt=st.booleans(),
)
def test_fuzz_no_marker_or_eos_id_comes_from_message_text(turns, system, add_generation_prompt):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user_text, answer, n_images in turns:
        images = [{"type": "image", "image": make_image(i, size=8)} for i in range(n_images)]
        messages += [{"role": "user", "content": images + [{"type": "text", "text": user_text}]}]
        messages += [{"role": "assistant", "content": answer}]
    out = PROCESSOR.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    n_images = sum(n for _, _, n in turns)
    expected = {"<user>": len(turns), "<assistant>": len(turns) + add_generation_prompt, "</s>": len(turns)}
    expected.update({"<image_start>": n_images, "<image_end>": n_images, "<image>": 16 * n_images} if n_images else {})
    assert control_counts(PROCESSOR, out["input_ids"][0]) == expected


# --------------------------------------------------------------------------------------------------------------------
# Bad processor and chat input: a clear ValueError/TypeError
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p: p.apply_chat_template([]), ValueError, "non-empty list of messages"),
        (lambda p: p.apply_chat_template([{"role": "user", "content": [{"text": "x"}]}]), ValueError,
         "message 0 content item 0 must be a dict with 'type'"),
        (lambda p: p.apply_chat_template([{"role": "user", "content": 5}]), TypeError, "message 0 content must be"),
        (lambda p: p.apply_chat_template([{"role": "robot", "content": "x"}]), ValueError,
         "message 0 has role 'robot'"),
        (lambda p: p.apply_chat_template([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}]),
         ValueError, "message 1 is a system message"),
        (lambda p: p.apply_chat_template([{"role": "user", "content": "a\ud800"}]), ValueError, "lone surrogate"),
        (lambda p: p.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": 3}]}]), TypeError,
         "'text' must be a string"),
        (lambda p: p.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}]), ValueError, "'video'"),
        (lambda p: p(images=make_image(0)), ValueError, "text=None"),
        (lambda p: p(images=[], text=[]), ValueError, "text is an empty list"),
        (lambda p: p(text="a\udc80"), ValueError, "text holds a lone surrogate"),
        (lambda p: p(text=["ok", 7]), TypeError, r"text\[1\] must be a string"),
        (lambda p: p(text=5), TypeError, "text must be a string or a list"),
    ],
    ids=["empty-chat", "no-type", "number-content", "unknown-role", "second-system", "surrogate-chat", "number-text",
         "video", "text-none", "empty-lists", "surrogate-text", "number-in-list", "number-text-arg"],
)  # fmt: skip
def test_bad_processor_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(PROCESSOR)


def test_the_template_itself_refuses_unknown_roles_for_other_engines():
    from jinja2.exceptions import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    with pytest.raises(TemplateError, match="got robot"):
        render_jinja_template(
            conversations=[[{"role": "robot", "content": "x"}]], chat_template=PROCESSOR.chat_template
        )


ANY_TEXT = st.one_of(st.text(max_size=10), st.sampled_from(TYPED + ["a\ud800", ""]), st.integers(), st.none())


def filled_array(shape, dtype, value) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaN or Inf cast to an integer type: any value will do
        return np.full(shape, value).astype(dtype)


SMALL_ARRAY = st.tuples(
    st.lists(st.integers(0, 5), min_size=0, max_size=5),
    st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
    st.sampled_from([0.0, 0.5, 1.0, 255.0, 300.0, -1.0, np.nan, np.inf]),
).map(lambda spec: filled_array(*spec))
ANY_IMAGE = st.one_of(
    SMALL_ARRAY,
    SMALL_ARRAY.map(torch.from_numpy),
    st.sampled_from(["RGB", "L", "I;16", "I", "F", "1", "P", "RGBA", "CMYK", "LA"]).flatmap(
        lambda mode: st.tuples(st.integers(0, 6), st.integers(0, 6)).map(lambda size: PIL.Image.new(mode, size))
    ),
    ANY_TEXT,
    st.just({"image": 1}),
)
ANY_IMAGES = st.one_of(
    st.none(), ANY_IMAGE, st.lists(ANY_IMAGE, max_size=3), st.lists(st.lists(ANY_IMAGE, max_size=2), max_size=2)
)
ANY_PROMPTS = st.one_of(
    ANY_TEXT,
    st.lists(st.lists(st.sampled_from(TYPED + ["x", " ", "<image>"]), max_size=4).map("".join), max_size=3),
    st.lists(ANY_TEXT, max_size=3),
)


def clear_error_or_result(call):
    try:
        return call()
    except (ValueError, TypeError) as error:
        assert str(error).strip(), f"{type(error).__name__} without a message"
        return None


@FUZZ
@given(images=ANY_IMAGES, text=ANY_PROMPTS)
def test_fuzz_processor_call_gives_a_result_or_a_clear_error(images, text):
    out = clear_error_or_result(lambda: PROCESSOR(images=images, text=text))
    if out is not None and "pixel_values" in out:
        assert np.isfinite(np.asarray(out["pixel_values"])).all()


ANY_ITEM = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": ANY_TEXT}),
    st.fixed_dictionaries({"type": st.just("image")}, optional={"image": ANY_IMAGE}),
    st.dictionaries(st.sampled_from(["type", "text", "image"]), ANY_TEXT, max_size=2),
    ANY_TEXT,
)
ANY_MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "robot", "tool"]) | ANY_TEXT},
        optional={"content": st.one_of(ANY_TEXT, st.lists(ANY_ITEM, max_size=3))},
    ),
    ANY_TEXT,
)


@FUZZ
@given(
    conversation=st.one_of(
        st.lists(ANY_MESSAGE, max_size=4), st.lists(st.lists(ANY_MESSAGE, max_size=3), max_size=2), ANY_TEXT
    ),
    tokenize=st.booleans(),
)
def test_fuzz_chat_template_gives_a_result_or_a_clear_error(conversation, tokenize):
    clear_error_or_result(lambda: PROCESSOR.apply_chat_template(conversation, tokenize=tokenize, return_dict=tokenize))


# --------------------------------------------------------------------------------------------------------------------
# Model input and loading
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_processor():
    return make_model_and_processor()


def test_an_empty_prompt_is_a_value_error(model_and_processor):
    model, _ = model_and_processor
    for call in (lambda: model(input_ids=torch.zeros(1, 0, dtype=torch.long)),
                 lambda: model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2),
                 lambda: model(inputs_embeds=torch.zeros(0, 3, 64))):  # fmt: skip
        with pytest.raises(ValueError, match="The prompt is empty"):
            call()


def test_a_prompt_longer_than_the_positions_is_refused_before_any_work(model_and_processor, monkeypatch):
    model, _ = model_and_processor
    embeddings = model.get_input_embeddings()
    monkeypatch.setattr(embeddings, "forward", lambda *a: pytest.fail("embedded a prompt that cannot fit"))
    long_prompt = torch.ones(1, 75_000, dtype=torch.long)
    with pytest.raises(ValueError, match="75000 tokens long .*max_position_embeddings=512"):
        model(input_ids=long_prompt)
    with pytest.raises(ValueError, match="reaches position 75000 .*max_position_embeddings=512"):
        model.generate(input_ids=long_prompt, max_new_tokens=1)
    with pytest.raises(ValueError, match="reaches position 600 .*max_position_embeddings=512"):
        model(input_ids=torch.ones(1, 600, dtype=torch.long), position_ids=torch.arange(600)[None])


@pytest.mark.parametrize(
    "rope, expected",
    [
        ({"rope_type": "default", "rope_theta": 1e4}, 512),
        ({"rope_type": "default", "original_max_position_embeddings": 16384}, 16384),
        ({"rope_type": "linear", "factor": 4.0}, 2048),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, 1024),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}, 512),
        ({"rope_type": "dynamic", "factor": 4.0}, None),
        (
            {"full_attention": {"rope_type": "linear", "factor": 2.0}, "sliding_attention": {"rope_type": "default"}},
            512,
        ),
    ],
)
def test_the_prompt_limit_follows_the_rope_parameters(rope, expected):
    """Rope scaling stretches the positions a prompt may reach: factor x original context; dynamic has no limit."""
    from transformers import MistralConfig

    from modeling_omnifusion.input_checks_omnifusion import prompt_positions

    config = MistralConfig(max_position_embeddings=512)
    config.rope_parameters = rope
    limit, name = prompt_positions(config)
    assert limit == expected
    assert (limit is None) == ("no position limit" in name)


def test_a_prompt_that_rope_scaling_makes_valid_runs_and_one_beyond_it_is_refused():
    model, _ = make_model_and_processor()
    model.config.text_config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    model.model.language_model.rotary_emb.__init__(model.config.text_config)
    assert model(input_ids=torch.ones(1, 600, dtype=torch.long)).logits.shape[1] == 600
    with pytest.raises(ValueError, match="1100 tokens long .*1024 positions \\(rope_type 'linear': factor 2 x"):
        model(input_ids=torch.ones(1, 1100, dtype=torch.long))


def test_a_prompt_that_fits_and_decoding_past_it_still_work(model_and_processor):
    model, processor = model_and_processor
    prompt = torch.ones(1, 510, dtype=torch.long)
    assert model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False).shape == (1, 514)


def test_flattened_sequences_are_judged_by_their_positions_not_the_row_length(model_and_processor):
    """vLLM and packed batches run several sequences in one row, with positions restarting per sequence."""
    model, _ = model_and_processor
    input_ids = torch.randint(3, 100, (1, 900))
    position_ids = torch.cat([torch.arange(450), torch.arange(450)])[None]
    logits = model(input_ids=input_ids, position_ids=position_ids).logits
    assert logits.shape == (1, 900, model.config.text_config.vocab_size)


def test_vision_feature_layer_out_of_range_is_refused_at_config_and_call(model_and_processor):
    model, processor = model_and_processor
    config = model.config.to_dict()
    for layer in (3, -4):
        with pytest.raises(ValueError, match=f"vision_feature_layer={layer} is out of range .* 2 layers"):
            OmniFusionConfig(**{**config, "vision_feature_layer": layer})
    pixel_values = processor(images=make_image(0), text="<image>", return_tensors="pt")["pixel_values"]
    with pytest.raises(ValueError, match="vision_feature_layer=7 is out of range"):
        model.get_image_features(pixel_values, vision_feature_layer=7)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (0, ValueError), ("16", TypeError), (2.0, TypeError)])
def test_a_bad_num_image_tokens_is_refused_at_load(tmp_path, value, error):
    PROCESSOR.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({**config, "num_image_tokens": value}))
    with pytest.raises(error, match="num_image_tokens must be a positive int"):
        OmniFusionProcessor.from_pretrained(tmp_path)


def test_a_num_image_tokens_disagreeing_with_the_model_names_the_setting(model_and_processor):
    model, _ = model_and_processor
    processor = make_processor()
    processor.num_image_tokens = 8
    inputs = processor(images=make_image(0), text="<image>hi", return_tensors="pt")
    with pytest.raises(
        ValueError, match=r"processor's num_image_tokens must equal this model's config.num_image_tokens \(16\)"
    ):
        model.generate(**inputs, max_new_tokens=1)


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, model_and_processor):
    model, processor = model_and_processor
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "key, value", [("max_new_tokens", "5"), ("do_sample", "false"), ("num_beams", 2.5), ("eos_token_id", "2"),
                   ("bad_words_ids", [2]), ("temperature", "0.7")]
)  # fmt: skip
def test_a_mistyped_generation_config_is_a_type_error_naming_file_and_setting(saved_folder, tmp_path, key, value):
    folder = tmp_path / "model"
    shutil.copytree(saved_folder, folder)
    settings_path = folder / "generation_config.json"
    settings_path.write_text(json.dumps({**json.loads(settings_path.read_text()), key: value}))
    with pytest.raises(TypeError, match=f"generation_config.json: generation setting '{key}' must be"):
        OmniFusionForCausalLM.from_pretrained(folder)


def test_a_mistyped_generation_setting_is_a_type_error_at_generate(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(text="hello", return_tensors="pt")
    with pytest.raises(TypeError, match="generate\\(\\): generation setting 'max_new_tokens' must be an int"):
        model.generate(**inputs, max_new_tokens="3")
    original = model.generation_config.do_sample
    model.generation_config.do_sample = "false"
    try:
        with pytest.raises(TypeError, match="generation setting 'do_sample' must be true or false"):
            model.generate(**inputs, max_new_tokens=1)
    finally:
        model.generation_config.do_sample = original


@pytest.mark.parametrize("tensor", ["lm_head.weight", "model.language_model.embed_tokens.special_embeddings.weight"])
def test_nan_or_inf_weights_in_a_loaded_folder_are_refused(saved_folder, tmp_path, tensor):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(saved_folder, folder)
    weights = load_file(folder / "model.safetensors")
    weights[tensor][0, 0] = float("nan")
    weights[tensor][1, 1] = float("inf")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"NaN or Inf values .*'{tensor}': 2"):
        OmniFusionForCausalLM.from_pretrained(folder)


def test_a_clean_folder_loads_and_generates(saved_folder, model_and_processor):
    _, processor = model_and_processor
    model = OmniFusionForCausalLM.from_pretrained(saved_folder)
    inputs = processor(images=make_image(0), text="<image>hi", return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2


def test_the_saved_folder_escapes_for_a_loader_that_knows_nothing_of_omnifusion(tmp_path, any_processor):
    """vLLM renders `chat_template.jinja` itself and tokenizes the text: no typed marker may survive that either."""
    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import render_jinja_template

    any_processor.save_pretrained(tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    (rendered,), _ = render_jinja_template(
        conversations=[[{"role": "user", "content": " ".join(TYPED)}]],
        chat_template=template,
        add_generation_prompt=True,
    )
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = plain_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert control_counts(any_processor, ids) == {"<user>": 1, "<assistant>": 1}
    # With the processor built around that tokenizer (as vLLM's multimodal path does), the ids are the processor's.
    rebuilt = OmniFusionProcessor(any_processor.image_processor, plain_tokenizer, num_image_tokens=16)
    assert rebuilt(text=rendered)["input_ids"][0] == any_processor(text=rendered)["input_ids"][0]


def test_control_tokens_the_escape_cannot_cover_are_reported(any_processor):
    from modeling_omnifusion.processing.tokenizer_setup_omnifusion import tokens_text_can_spell
    from modeling_omnifusion.testing.tiny import make_tokenizer

    assert tokens_text_can_spell(any_processor.tokenizer) == []
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[INST]"]})
    assert tokens_text_can_spell(make_processor(tokenizer=tokenizer).tokenizer) == ["[INST]"]


def test_numpy_numbers_are_valid_generation_settings(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(text="hello", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=np.int64(2), temperature=np.float32(1.0), do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
