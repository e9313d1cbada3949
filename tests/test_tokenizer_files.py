"""Tokenizer folders as they come from outside: the real released Mistral SentencePiece model (taken from the
`mistral-common` wheel, never committed), and the clear errors for a folder that cannot be read (a missing package,
a missing file)."""

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from transformers import AutoProcessor
from visdial_data import VISDIAL_DATA_DIR

from modeling_omnifusion import OmniFusionProcessor
from modeling_omnifusion.conversion import convert_omnifusion_to_hf as converter
from modeling_omnifusion.testing.released import (
    make_clip_vision_folder,
    make_released_checkpoint,
    write_tokenizer_folder,
)
from modeling_omnifusion.testing.tiny import make_image, make_model_and_processor

# Mistral-7B-v0.1's tokenizer.model, shipped by mistral-common; the same file as the released OmniMistral tokenizer.
MISTRAL_TOKENIZER = ("mistral_common", "data/tokenizer.model.v1")
MISTRAL_TOKENIZER_SIZE = 493_443
MISTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
# What the released README's `tokenizer(["\n", "</s>", ":"], add_special_tokens=False).input_ids + [[13]]` gives.
RELEASED_BAD_WORDS_IDS = [[28705, 13], [2], [714], [13]]


@pytest.fixture(scope="module")
def mistral_tokenizer_model() -> bytes:
    """The bytes of the real Mistral tokenizer.model, read from the installed mistral-common package."""
    spec = importlib.util.find_spec(MISTRAL_TOKENIZER[0])
    assert spec is not None, "mistral-common (a test dependency, pip install '.[test]') is not installed"
    path = Path(spec.origin).parent / MISTRAL_TOKENIZER[1]
    data = path.read_bytes()
    assert len(data) == MISTRAL_TOKENIZER_SIZE, f"{path}: {len(data)} bytes, expected {MISTRAL_TOKENIZER_SIZE}"
    assert hashlib.sha256(data).hexdigest() == MISTRAL_TOKENIZER_SHA256, f"{path}: not the Mistral-7B-v0.1 file"
    return data


@pytest.fixture(scope="module")
def sentencepiece(mistral_tokenizer_model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=mistral_tokenizer_model)


@pytest.fixture(scope="module")
def converted_mistral(tmp_path_factory, mistral_tokenizer_model):
    """A released v1.1 folder with the real tokenizer (its three files only) and a tiny LM of vocab 32000, converted."""
    root = tmp_path_factory.mktemp("real-tokenizer")
    info = make_released_checkpoint(
        root / "released",
        "1.1",
        vocab_size=32000,
        tokenizer_files="full",
        tokenizer_model=mistral_tokenizer_model,
    )
    assert sorted(p.name for p in info["tokenizer_dir"].iterdir()) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"
    ]  # fmt: skip
    clip_dir = make_clip_vision_folder(root)
    return converter.convert_omnifusion_to_hf(info["input_dir"], root / "converted", vision_model=clip_dir)


def _visdial(name: str) -> dict:
    return json.loads((VISDIAL_DATA_DIR / name).read_text())["data"]


@pytest.fixture(scope="module")
def visdial_dialogs():
    return _visdial("visdial_1.0_val_sample5.json")


def test_sentencepiece_and_protobuf_are_plain_install_requirements():
    requirements = importlib.metadata.requires("omnifusion-transformers")
    plain = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requirements if "extra ==" not in r}
    assert {"sentencepiece", "protobuf", "transformers", "torch"} <= plain


def test_converted_real_tokenizer_has_the_released_bad_words_ids(converted_mistral):
    generation_config = json.loads((converted_mistral / "generation_config.json").read_text())
    assert generation_config["bad_words_ids"] == RELEASED_BAD_WORDS_IDS


def test_converted_real_tokenizer_encodes_visdial_text_like_sentencepiece(converted_mistral, sentencepiece):
    """Every caption, question and answer string of the shipped VisDial val sample: 80,155 strings, 110 of which
    (double spaces) transformers' own conversion of `tokenizer.model` encodes differently from SentencePiece."""
    processor = AutoProcessor.from_pretrained(converted_mistral, trust_remote_code=True)
    assert len(processor.tokenizer) == 32000 + 5
    data = _visdial("visdial_1.0_val_crowdsourced.json")
    texts = [dialog["caption"] for dialog in data["dialogs"]] + data["questions"] + data["answers"]
    assert len(texts) == 97 + 45_237 + 34_821
    ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [(text, got) for text, got, want in zip(texts, ids, sentencepiece.encode(texts)) if got != want]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. {mismatches[:3]}"


def _released_ids(messages, processor, sentencepiece) -> list[int]:
    """The released code's sequence: each text segment `sentencepiece.encode`d on its own, markers and image blocks
    between them, no BOS."""
    ids = sentencepiece.encode("This is a dialog with AI assistant.\n")
    image_block = [processor.image_start_token_id] + [processor.image_token_id] * processor.num_image_tokens
    image_block.append(processor.image_end_token_id)
    for message in messages:
        ids += image_block * sum(item["type"] == "image" for item in message["content"])
        ids.append(processor.user_token_id if message["role"] == "user" else processor.assistant_token_id)
        ids += sentencepiece.encode("".join(item["text"] for item in message["content"] if item["type"] == "text"))
    return ids + [processor.assistant_token_id]


def test_converted_real_tokenizer_encodes_visdial_dialogs_like_the_released_code(
    converted_mistral, sentencepiece, visdial_dialogs
):
    processor = AutoProcessor.from_pretrained(converted_mistral, trust_remote_code=True)
    questions, answers = visdial_dialogs["questions"], visdial_dialogs["answers"]
    for index, dialog in enumerate(visdial_dialogs["dialogs"]):
        messages = [
            {"role": "user", "content": [{"type": "image", "image": make_image(index)},
                                         {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": dialog["caption"]}]},
        ]  # fmt: skip
        for turn in dialog["dialog"]:
            messages.append({"role": "user", "content": [{"type": "text", "text": questions[turn["question"]] + "?"}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[turn["answer"]]}]})
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert inputs["input_ids"][0] == _released_ids(messages, processor, sentencepiece), f"dialog {index}"


# ------------------------------------------------------------------- folders that cannot be read


@pytest.mark.parametrize(
    "blocked, named", [(["sentencepiece"], "sentencepiece package"), (["google.protobuf"], "protobuf package"),
                       (["sentencepiece", "google.protobuf"], "sentencepiece and protobuf packages")]
)  # fmt: skip
def test_converter_names_a_missing_tokenizer_package_before_any_work(tmp_path, monkeypatch, blocked, named):
    info = make_released_checkpoint(tmp_path / "released", "1.1", tokenizer_files="full")
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)

    def no_work(*args, **kwargs):
        raise AssertionError("the converter read the checkpoint before checking its tokenizer dependencies")

    monkeypatch.setattr(converter, "read_projection", no_work)
    with pytest.raises(ImportError, match=named) as error:
        converter.convert_omnifusion_to_hf(info["input_dir"], tmp_path / "out", vision_model=tmp_path / "no-clip")
    assert str(info["tokenizer_dir"] / "tokenizer.model") in str(error.value)
    assert "pip install" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_processor_folder_with_only_a_sentencepiece_model_names_the_missing_package(tmp_path, monkeypatch):
    model, processor = make_model_and_processor()
    processor.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    write_tokenizer_folder(tmp_path)  # a SentencePiece tokenizer.model in its place
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"needs the sentencepiece package.*pip install sentencepiece"):
        OmniFusionProcessor.from_pretrained(tmp_path)
    with pytest.raises(ImportError, match="sentencepiece"):
        AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)


def test_processor_folder_without_tokenizer_json_gives_the_real_reason(tmp_path):
    model, processor = make_model_and_processor()
    processor.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    assert importlib.util.find_spec("sentencepiece") is not None  # installed: it must not be blamed
    for load in (
        OmniFusionProcessor.from_pretrained,
        lambda p: AutoProcessor.from_pretrained(p, trust_remote_code=True),
    ):
        with pytest.raises(FileNotFoundError) as error:
            load(tmp_path)
        message = str(error.value)
        assert str(tmp_path) in message and "no tokenizer.json" in message
        assert "installed" not in message


def test_real_tokenizer_folder_with_packages_installed_loads(tmp_path, mistral_tokenizer_model, sentencepiece):
    """The check lets a loadable folder through: the real tokenizer.model alone becomes the released encoding."""
    model, processor = make_model_and_processor()
    processor.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    write_tokenizer_folder(tmp_path, tokenizer_files="full", tokenizer_model=mistral_tokenizer_model)
    loaded = OmniFusionProcessor.from_pretrained(tmp_path)
    text = "it  in a bright room"  # transformers alone: ▁it ▁▁ in ...; SentencePiece: ▁it ▁ ▁in ...
    assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == sentencepiece.encode(text)
    assert loaded(text=text)["input_ids"][0] == sentencepiece.encode(text)
