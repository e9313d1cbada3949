"""The CPU kernel switch for one-position steps (`kernels_omnifusion`): oneDNN off exactly while a bfloat16 model
computes one position on the CPU (the decode step of one sequence, the LM head over the last position), on again
for everything else and after."""

import pytest
import torch

from modeling_omnifusion.kernels_omnifusion import single_position_kernels, single_position_on_cpu
from modeling_omnifusion.testing.tiny import chat, make_image, make_model_and_processor


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
    inputs = processor.apply_chat_template(
        chat("What is this?", images=[make_image(0)]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
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
