"""The CPU kernel switch for one-position steps (`kernels_omnifusion`): oneDNN off exactly while a bfloat16 model
computes one position on the CPU (the decode step of one sequence, the LM head over the last position), on again
for everything else and after."""

import pytest
import torch

from modeling_omnifusion.kernels_omnifusion import (
    decode_attention_mask,
    single_position_kernels,
    single_position_on_cpu,
)
from modeling_omnifusion.testing.tiny import chat, make_image, make_model_and_processor


def bfloat16_image_chat(processor, left_pads: int = 0) -> dict:
    """The tiny processor's inputs for one image and a question, `pixel_values` in bfloat16, the row left-padded with
    `left_pads` pad tokens (masked out)."""
    inputs = processor.apply_chat_template(
        chat("What is this?", images=[make_image(0)]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    pads = torch.full((1, left_pads), processor.tokenizer.pad_token_id)
    inputs["input_ids"] = torch.cat([pads, inputs["input_ids"]], 1)
    inputs["attention_mask"] = torch.cat([torch.zeros_like(pads), inputs["attention_mask"]], 1)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    return inputs


@pytest.mark.parametrize(
    ("shape", "dtype", "switches"),
    [
        ((1, 1, 8), torch.bfloat16, True),
        ((1, 8), torch.bfloat16, True),
        ((2, 1, 8), torch.bfloat16, False),
        ((1, 2, 8), torch.bfloat16, False),
        ((1, 1, 8), torch.float32, False),
        ((1, 1, 8), torch.float16, False),
    ],
)
def test_only_one_bfloat16_position_switches_onednn_off(shape, dtype, switches):
    hidden = torch.zeros(shape, dtype=dtype)
    assert single_position_on_cpu(hidden) == switches
    with single_position_kernels(hidden):
        assert torch.backends.mkldnn.enabled == (not switches)
    assert torch.backends.mkldnn.enabled


def test_the_switch_is_restored_after_an_error():
    with pytest.raises(RuntimeError, match="inside"):
        with single_position_kernels(torch.zeros(1, 1, 8, dtype=torch.bfloat16)):
            raise RuntimeError("inside")
    assert torch.backends.mkldnn.enabled


def test_a_switch_made_by_the_caller_is_left_as_it_was():
    torch.backends.mkldnn.enabled = False
    try:
        with single_position_kernels(torch.zeros(1, 1, 8, dtype=torch.bfloat16)):
            assert not torch.backends.mkldnn.enabled
        assert not torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True


def test_bfloat16_generate_decodes_without_onednn_and_prefills_with_it():
    model, processor = make_model_and_processor()
    model = model.to(torch.bfloat16).eval()
    seen = []  # (positions given to the LM, oneDNN on) per LM and head call
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            ("lm", kwargs["inputs_embeds"].shape[1], torch.backends.mkldnn.enabled)
        ),
        with_kwargs=True,
    )
    model.lm_head.register_forward_pre_hook(
        lambda module, args: seen.append(("head", args[0].shape[1], torch.backends.mkldnn.enabled))
    )
    inputs = bfloat16_image_chat(processor)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=1)
    prompt = inputs["input_ids"].shape[1]
    assert seen == [
        ("lm", prompt, True),
        ("head", 1, False),
        ("lm", 1, False),
        ("head", 1, False),
        ("lm", 1, False),
        ("head", 1, False),
    ]
    assert torch.backends.mkldnn.enabled


class TextConfig:
    """The fields `decode_attention_mask` reads, with a grouped-query LM under `sdpa` by default."""

    def __init__(self, **fields):
        self._attn_implementation = "sdpa"
        self.num_attention_heads, self.num_key_value_heads = 4, 2
        self.sliding_window, self.layer_types = None, None
        self.__dict__.update(fields)


ONE_BF16 = torch.zeros(1, 1, 8, dtype=torch.bfloat16)


def test_a_decode_step_gets_its_padding_mask_as_a_4d_boolean_mask():
    padding = torch.tensor([[0, 1, 1, 1, 1]])
    mask = decode_attention_mask(padding, ONE_BF16, 4, TextConfig())
    assert mask.shape == (1, 1, 1, 5) and mask.dtype == torch.bool
    assert mask.flatten().tolist() == [False, True, True, True, True]
    assert decode_attention_mask(None, ONE_BF16, 4, TextConfig()).flatten().tolist() == [True] * 5


@pytest.mark.parametrize(
    ("hidden", "past", "config"),
    [
        (torch.zeros(1, 1, 8), 4, TextConfig()),  # float32
        (torch.zeros(1, 2, 8, dtype=torch.bfloat16), 3, TextConfig()),  # two positions
        (ONE_BF16, 4, TextConfig(num_key_value_heads=4)),  # no grouped query heads
        (ONE_BF16, 4, TextConfig(_attn_implementation="eager")),
        (ONE_BF16, 4, TextConfig(sliding_window=4)),  # the window no longer covers every position
        (ONE_BF16, 4, TextConfig(layer_types=["full_attention", "sliding_attention"])),
    ],
)
def test_other_calls_keep_their_mask(hidden, past, config):
    padding = torch.ones(1, past + hidden.shape[1], dtype=torch.long)
    assert decode_attention_mask(padding, hidden, past, config) is padding
    assert decode_attention_mask(None, hidden, past, config) is None


def test_the_4d_decode_mask_gives_the_tokens_and_logits_of_the_plain_mask(monkeypatch):
    """bfloat16 greedy decoding with a row left-padded by 8: every step's logits as with transformers' own mask, the
    same tokens, and the LM did get the 4D mask on its decode steps."""
    from modeling_omnifusion import kernels_omnifusion

    assert kernels_omnifusion.SDPA_PACKS_GQA, "this transformers has no pack_gqa: the packed path is not tested"
    model, processor = make_model_and_processor()
    model = model.to(torch.bfloat16).eval()
    masks = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"].ndim), with_kwargs=True
    )
    inputs = bfloat16_image_chat(processor, left_pads=8)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
    settings.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        packed = model.generate(**inputs, **settings)
        assert masks == [2] + [4] * 5
        monkeypatch.setattr(kernels_omnifusion, "SDPA_PACKS_GQA", False)
        masks.clear()
        plain = model.generate(**inputs, **settings)
        assert masks == [2] * 6
    assert packed.sequences.tolist() == plain.sequences.tolist()
    for step, (a, b) in enumerate(zip(packed.logits, plain.logits)):
        # equal here; 2e-3 leaves room for another CPU's rounding, while a mask that lets the 8 pads in moves them 0.02
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=0, msg=f"step {step}")
