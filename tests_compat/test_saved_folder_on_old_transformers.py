"""
Folders saved by this project under transformers 5.24+ load with `trust_remote_code` on every transformers a user of
the folder may have (5.16, the oldest vLLM accepts, to the newest release) and reproduce the recorded inputs, logits
and greedy tokens exactly.

Run in a venv WITHOUT this package: `OMNIFUSION_REFERENCE_DIR=<make_reference.py output> pytest tests_compat -q`
(`.ci/tier_old_transformers.sh` does it).
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from reference_chats import resolve as resolve_in
from reference_chats import resolve_media
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

REFERENCE = Path(os.environ.get("OMNIFUSION_REFERENCE_DIR", "")).resolve()
if not os.environ.get("OMNIFUSION_REFERENCE_DIR") or not (REFERENCE / "manifest.json").is_file():
    raise RuntimeError(
        "set OMNIFUSION_REFERENCE_DIR to the folder written by `python tests_compat/make_reference.py DIR` "
        f"(no manifest.json in {REFERENCE})"
    )
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())
CHATS = json.loads((REFERENCE / "chats.json").read_text())


def resolve(messages):
    return resolve_in(messages, REFERENCE)


@pytest.fixture(scope="module", params=MANIFEST["folders"])
def loaded(request):
    folder = REFERENCE / request.param
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    reference = torch.load(REFERENCE / f"{request.param}.reference.pt", weights_only=True)
    return folder, model, processor, reference


def test_runs_without_the_package_on_the_transformers_under_test():
    """On the version the tier names (`OMNIFUSION_COMPAT_TRANSFORMERS`, which may be the reference's own: the newest
    release), else on another transformers than the one that saved the reference."""
    assert importlib.util.find_spec("modeling_omnifusion") is None, "the package must not be importable here"
    expected = os.environ.get("OMNIFUSION_COMPAT_TRANSFORMERS")
    if expected:
        assert transformers.__version__ == expected, f"the tier asked for transformers {expected}"
    else:
        assert transformers.__version__ != MANIFEST["transformers"], "reference and check ran on the same transformers"


def encode(processor, name):
    messages = [resolve(m) for m in CHATS.values()] if name == "batch" else resolve(CHATS[name])
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@pytest.mark.parametrize("name", [*CHATS, "batch"])
def test_processor_gives_the_recorded_inputs(loaded, name):
    _, _, processor, reference = loaded
    inputs = encode(processor, name)
    assert sorted(inputs) == sorted(reference[name]["inputs"])
    for key, value in reference[name]["inputs"].items():
        assert torch.equal(inputs[key], value), key


@pytest.mark.parametrize("name", [*CHATS, "batch"])
@torch.no_grad()
def test_logits_and_greedy_tokens_are_identical(loaded, name):
    _, model, _, reference = loaded
    inputs = reference[name]["inputs"]
    logits = model(**inputs).logits
    assert logits.shape == reference[name]["logits"].shape
    assert torch.equal(logits, reference[name]["logits"]), (
        f"max |diff| {(logits - reference[name]['logits']).abs().max()}"
    )
    tokens = model.generate(
        **inputs, max_new_tokens=reference[name]["tokens"].shape[1] - inputs["input_ids"].shape[1], do_sample=False
    )
    assert torch.equal(tokens, reference[name]["tokens"])


@torch.no_grad()
def test_generation_without_cache_matches_with_cache(loaded):
    _, model, _, reference = loaded
    inputs = reference["batch"]["inputs"]
    new = reference["batch"]["tokens"].shape[1] - inputs["input_ids"].shape[1]
    tokens = model.generate(**inputs, max_new_tokens=new, do_sample=False, use_cache=False)
    assert torch.equal(tokens, reference["batch"]["tokens"])


def test_every_auto_class_loads(loaded):
    folder, model, _, _ = loaded
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "OmniFusionModel"
    assert type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__ == type(model).__name__
    assert base.config.text_config.model_type == model.config.text_config.model_type


def test_tokenizer_alone_adds_no_bos_to_the_rendered_template(loaded):
    folder, _, processor, reference = loaded
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    rendered = processor.apply_chat_template(resolve(CHATS["text_only"]), add_generation_prompt=True)
    assert tokenizer(rendered).input_ids == reference["text_only"]["inputs"]["input_ids"][0].tolist()


@pytest.mark.parametrize(
    "text, n_images, counts",
    [
        ("<image>a<image>b", 1, "2 '<image>' placeholders but 1 image was"),
        ("<image>a", 2, "1 '<image>' placeholder but 2 images"),
        ("<image>a", 0, "1 '<image>' placeholder but 0 images"),
        ("a", 1, "0 '<image>' placeholders but 1 image"),
    ],
)
def test_image_count_mismatch_is_a_clear_value_error(loaded, text, n_images, counts):
    # Older releases do not count placeholders in ProcessorMixin (5.16 and 5.19 raise StopIteration for too few
    # images and ignore extra ones); the shipped processor does, in a call and in `vllm_inputs` alike.
    _, _, processor, _ = loaded
    image = Image.open(REFERENCE / "image_0.png").convert("RGB")
    images = [image] * n_images or None
    for build in (lambda: processor(text=text, images=images), lambda: processor.vllm_inputs(text, images)):
        with pytest.raises(ValueError, match=rf"{counts}.*expected exactly one image per '<image>' placeholder"):
            build()


def load_media(modality: str, name: str):
    """The model and processor of folder `name`, its `{modality}_reference.pt`, and the chats of
    `{modality}_chats.json` (clips or videos loaded as arrays: no audio or video decoder is installed here) with all
    of them as one `batch`."""
    folder = REFERENCE / name
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    reference = torch.load(REFERENCE / f"{name}.{modality}_reference.pt", weights_only=True)
    recorded = json.loads((REFERENCE / f"{modality}_chats.json").read_text())
    chats = {chat: resolve_media(messages, REFERENCE) for chat, messages in recorded.items()}
    return model, processor, reference, {**chats, "batch": list(chats.values())}


@torch.no_grad()
def check_recorded(loaded, name: str, without_cache: bool):
    """The chat `name` of a folder from `load_media` gives the recorded inputs, logits, greedy and beam-search tokens
    (and, with `without_cache`, the greedy tokens again without the KV cache)."""
    model, processor, reference, chats = loaded
    expected = reference[name]
    inputs = processor.apply_chat_template(
        chats[name], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert sorted(inputs) == sorted(expected["inputs"])
    for key, value in expected["inputs"].items():
        assert torch.equal(inputs[key], value), key
    assert torch.equal(model(**inputs).logits, expected["logits"])
    new_tokens = expected["tokens"].shape[1] - inputs["input_ids"].shape[1]
    assert torch.equal(model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False), expected["tokens"])
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False), expected["beams"])
    if without_cache:
        uncached = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
        assert torch.equal(uncached, expected["tokens"])


@pytest.fixture(scope="module", params=MANIFEST.get("audio_folders", []))
def loaded_audio(request):
    return load_media("audio", request.param)


@pytest.mark.parametrize("name", ["one_clip", "image_and_two_clips", "batch"])
def test_audio_folder_gives_the_recorded_inputs_logits_and_tokens(loaded_audio, name):
    """A folder with sound: the same inputs, logits, greedy (with and without the cache) and beam-search tokens on
    the older transformers."""
    check_recorded(loaded_audio, name, without_cache=True)


@pytest.fixture(scope="module", params=MANIFEST.get("video_folders", []))
def loaded_video(request):
    return load_media("video", request.param)


@pytest.mark.parametrize("name", ["one_video", "image_and_two_videos", "batch"])
def test_video_folder_gives_the_recorded_inputs_logits_and_tokens(loaded_video, name):
    """A folder with video: the same inputs, logits, greedy and beam-search tokens on the older transformers."""
    check_recorded(loaded_video, name, without_cache=False)
