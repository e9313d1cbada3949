"""OmniFusionProcessor: the released sequence layout, segment-wise tokenization, padding, images, errors."""

import numpy as np
import pytest
import torch

from modeling_omnifusion.processing.processing_omnifusion import DEFAULT_SYSTEM_PROMPT
from modeling_omnifusion.testing.tiny import (
    chat,
    make_image,
    make_processor,
    make_sentencepiece_tokenizer,
    make_tokenizer,
)

PROMPT = "This is a dialog with AI assistant.\n"


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    return make_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm"))


def released_ids(encode, processor, turns, n_images=0):
    """The released code's sequence: prompt, image blocks, then marker + separately encoded text per turn."""
    ids = list(encode(PROMPT))
    for _ in range(n_images):
        ids += [processor.image_start_token_id] + [processor.image_token_id] * processor.num_image_tokens
        ids += [processor.image_end_token_id]
    for role, text in turns:
        ids += [processor.user_token_id if role == "user" else processor.assistant_token_id] + list(encode(text))
    return ids


def test_default_system_prompt_is_the_released_one():
    assert DEFAULT_SYSTEM_PROMPT == PROMPT


def test_chat_template_reproduces_released_sequence_with_sentencepiece(spm_tokenizer):
    tokenizer, sentencepiece = spm_tokenizer
    processor = make_processor(tokenizer=tokenizer)
    turns = [
        ("user", "What is the colour of the shape?"),
        ("assistant", " It is red."),
        ("user", "  two  spaces\nand 123"),
        ("assistant", "\nnew line first"),
    ]
    messages = chat(turns[0][1], images=[make_image(0)]) + [{"role": r, "content": t} for r, t in turns[1:]]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    expected = released_ids(sentencepiece.encode, processor, turns, n_images=1)
    assert out["input_ids"][0].tolist() == expected
    assert tokenizer.bos_token_id not in expected
    assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_chat_template_generation_prompt_ends_with_assistant_marker():
    processor = make_processor()
    encode = lambda text: processor.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    ids = processor.apply_chat_template(
        chat("What shape is it?", images=[make_image(0)]), add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = ids[0] if isinstance(ids[0], list) else ids
    expected = released_ids(encode, processor, [("user", "What shape is it?")], n_images=1)
    assert ids == expected + [processor.assistant_token_id]


def test_text_only_chat_has_no_image_block():
    processor = make_processor()
    out = processor.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    ids = out["input_ids"][0] if isinstance(out["input_ids"][0], list) else out["input_ids"]
    assert processor.image_start_token_id not in ids and processor.image_token_id not in ids
    assert "pixel_values" not in out


def test_multi_turn_has_nothing_between_turns_and_eos_is_a_setting():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    plain = make_processor().apply_chat_template(turns)
    assert plain == PROMPT + "<user>a<assistant>b<user>c"
    with_eos = make_processor(end_assistant_turns_with_eos=True)
    assert with_eos.apply_chat_template(turns) == PROMPT + "<user>a<assistant>b</s><user>c"
    assert make_processor().apply_chat_template(
        turns, end_assistant_turns_with_eos=True
    ) == with_eos.apply_chat_template(turns)


def test_system_message_replaces_the_default_prompt():
    messages = [{"role": "system", "content": "Sys.\n"}, {"role": "user", "content": "hi"}]
    assert make_processor().apply_chat_template(messages) == "Sys.\n<user>hi"


def test_images_follow_message_order_before_each_user_marker():
    messages = chat("first", n_images=2) + [
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "second"}]},
    ]
    assert (
        make_processor().apply_chat_template(messages)
        == PROMPT + "<image><image><user>first<assistant>ok<image><user>second"
    )


def test_pad_token_is_set_and_padding_is_on_the_left():
    tokenizer = make_tokenizer()
    assert tokenizer.pad_token is None
    processor = make_processor(tokenizer=tokenizer)
    assert processor.tokenizer.pad_token == "<unk>"
    batch = processor(text=["a much longer text than the other", "short"], return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1
    assert batch["input_ids"][1, 0] == processor.tokenizer.pad_token_id


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
def test_pil_images_of_any_mode(mode):
    processor = make_processor()
    out = processor(images=make_image(1, mode=mode), text="<image>What?", return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((20, 30, 3), dtype=np.uint8),
        np.zeros((20, 30), dtype=np.uint8),
        np.ones((20, 30, 3), dtype=np.float32) * 0.5,
        torch.zeros(3, 20, 30, dtype=torch.uint8),
        torch.zeros(20, 30, dtype=torch.uint8),
    ],
    ids=["np-hwc", "np-gray", "np-float", "torch-chw", "torch-gray"],
)
def test_numpy_arrays_and_tensors(image):
    out = make_processor()(images=image, text="<image>What?", return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_image_block_expansion():
    processor = make_processor()
    out = processor(images=[make_image(0), make_image(1)], text="<image>x<image>y", return_tensors="pt")
    ids = out["input_ids"][0]
    assert (ids == processor.image_token_id).sum() == 2 * processor.num_image_tokens
    assert (ids == processor.image_start_token_id).sum() == 2 and (ids == processor.image_end_token_id).sum() == 2
    assert processor.replace_image_token({}, 0) == "<image_start>" + "<image>" * 16 + "<image_end>"
    counts = processor._get_num_multimodal_tokens(image_sizes=[[40, 50], [32, 32]])
    assert counts.num_image_tokens == [16, 16] and counts.num_image_patches == [1, 1]


def test_text_replacement_offsets_for_serving_engines():
    processor = make_processor()
    out = processor(images=make_image(0), text="a<image>b", return_text_replacement_offsets=True)
    (offset,) = out["text_replacement_offsets"][0]
    assert offset["type"] == "image" and offset["span"] == (1, 8)


MISMATCHES = [
    ("<image>one<image>two", 1, "The prompt has 2 '<image>' placeholders but 1 image was given"),
    ("no placeholder", 1, "The prompt has 0 '<image>' placeholders but 1 image was given"),
    ("<image>one", 2, "The prompt has 1 '<image>' placeholder but 2 images were given"),
    ("<image>", 0, "The prompt has 1 '<image>' placeholder but 0 images were given"),
]


@pytest.mark.parametrize("text, n_images, message", MISMATCHES)
def test_placeholder_image_mismatch_is_a_clear_error(text, n_images, message):
    images = [make_image(i) for i in range(n_images)] or None
    with pytest.raises(ValueError, match=f"{message}: expected exactly one image per '<image>' placeholder"):
        make_processor()(images=images, text=text)


def test_placeholder_image_mismatch_in_a_batch_names_the_prompt():
    processor = make_processor()
    with pytest.raises(ValueError, match=r"text\[1\] has 0 '<image>' placeholders but 1 image was given for it"):
        processor(text=["<image>a", "b"], images=[[make_image(0)], [make_image(1)]])
    in_total = r"The 2 prompts have 2 '<image>' placeholders in total \(\[1, 1\]\) but 1 image"
    with pytest.raises(ValueError, match=in_total):
        processor(text=["<image>a", "<image>b"], images=[make_image(0)])


@pytest.mark.parametrize("text, n_images, message", MISMATCHES)
def test_vllm_inputs_refuses_a_placeholder_image_mismatch(text, n_images, message):
    with pytest.raises(ValueError, match=f"{message}: expected exactly one image per '<image>' placeholder"):
        make_processor().vllm_inputs(text, [make_image(i) for i in range(n_images)] or None)


def test_vllm_inputs_builds_the_vllm_prompt_from_checked_images():
    processor = make_processor()
    gray16 = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60
    prompt = processor.vllm_inputs("a<image>b<image>c", [make_image(0), gray16])
    assert sorted(prompt) == ["multi_modal_data", "prompt"] and prompt["prompt"] == "a<image>b<image>c"
    first, second = prompt["multi_modal_data"]["image"]
    assert first.mode == second.mode == "RGB" and second.size == (32, 32)
    assert np.array_equal(np.asarray(first), np.asarray(make_image(0).convert("RGB")))
    # the same pixels the processor itself reads from the 16-bit array
    assert torch.equal(
        processor(text="<image>", images=[second], return_tensors="pt")["pixel_values"],
        processor(text="<image>", images=[gray16], return_tensors="pt")["pixel_values"],
    )
    assert processor.vllm_inputs("text only") == {"prompt": "text only"}
    with pytest.raises(TypeError, match="text must be a string"):
        processor.vllm_inputs(["<image>"], [make_image(0)])
    with pytest.raises(ValueError, match="Image 1 is empty"):
        processor.vllm_inputs("<image><image>", [make_image(0), np.zeros((0, 4, 3), dtype=np.uint8)])


def test_non_image_input_is_a_type_or_value_error():
    with pytest.raises((TypeError, ValueError)):
        make_processor()(images=[object()], text="<image>hi")


def test_special_token_ids_match_the_tokenizer():
    processor = make_processor()
    for name, token in [
        ("image_token_id", "<image>"),
        ("user_token_id", "<user>"),
        ("assistant_token_id", "<assistant>"),
    ]:
        assert processor.special_token_ids[name] == processor.tokenizer.convert_tokens_to_ids(token)
    assert len(set(processor.special_token_ids.values())) == 5


def test_saved_tokenizer_adds_no_bos(tmp_path):
    """Saved tokenizer adds no bos so engines tokenizing the template get the released ids."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    from modeling_omnifusion.testing.released import write_tokenizer_folder

    folder = write_tokenizer_folder(tmp_path / "release", tokenizer_files="full")
    released = LlamaTokenizer.from_pretrained(folder)
    assert released("a").input_ids[0] == released.bos_token_id  # like Mistral's, the release adds BOS by default
    sentencepiece = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    processor = make_processor(tokenizer=released)
    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved", trust_remote_code=True)

    messages = chat("What is the colour of the shape?", images=[make_image(0)])
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = list(sentencepiece.encode(PROMPT)) + [processor.image_token_id, processor.user_token_id]
    expected += list(sentencepiece.encode("What is the colour of the shape?")) + [processor.assistant_token_id]
    assert reloaded(rendered).input_ids == expected
    assert reloaded.encode(rendered) == expected
    assert processor.tokenizer(rendered).input_ids == expected
