"""
Checks of the sizes an OmniFusion config gives, and of a saved folder's config against its weights file, so that a
wrong or hostile `config.json` is refused when it is read (a `ValueError`/`TypeError` naming the field and the file)
instead of hanging, running out of memory or failing deep inside a forward pass.

- `check_sub_config_sizes`: every size field of the text, vision and audio configs a positive int (a 0 ends in a
  `ZeroDivisionError` otherwise), and the attention heads a multiple of the key/value heads.
- `check_image_positions`: one image on the largest tile canvas must fit the language model's positions.
- `config_file_named`: errors raised while a local `config.json` is read name that file.
- `check_config_against_weights`: a config asking for more layers, or another vocabulary or width, than the folder's
  weights file holds is refused before the model is built (a million-layer config would take minutes to build).
"""

import contextlib
import json
import os
import re
import struct

# Size fields of the sub-configs; each must be a positive int where the sub-config has it.
SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "image_size", "patch_size", "num_channels",
    "encoder_layers", "encoder_attention_heads", "d_model", "num_mel_bins", "max_source_positions",
)  # fmt: skip
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# `<group>.layers.<n>.` / `<group>.layer.<n>.`: the repeated blocks of a tower or LM in a weights file.
LAYER_KEY = re.compile(r"^(.*?\.layers?)\.(\d+)\.")
HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on a header


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sub_config_sizes(config) -> None:
    """`check_sizes` of the text config, every vision config and the audio config of an `OmniFusionConfig`."""
    named = [("text_config", config.text_config), ("audio_config", config.audio_config)]
    named += [("vision_config", config.vision_config)]
    named += [(f"additional_vision_configs[{i}]", v) for i, v in enumerate(config.additional_vision_configs or [])]
    for name, sub_config in named:
        if sub_config is not None:
            check_sizes(name, sub_config)


def check_sizes(name: str, sub_config) -> None:
    """A `ValueError`/`TypeError` naming `name.<field>` unless each of its `SIZE_FIELDS` is a positive int (or `None`
    where the sub-config allows it) and `num_attention_heads` is a multiple of `num_key_value_heads`."""
    for field in SIZE_FIELDS:
        value = getattr(sub_config, field, None)
        if value is None or isinstance(value, (list, tuple)):  # per-layer sizes (some LMs) are not judged here
            continue
        if not _is_int(value):
            raise TypeError(f"{name}.{field} must be a positive int, got {value!r:.80}")
        if value < 1:
            raise ValueError(f"{name}.{field} must be a positive int, got {value}")
    heads, kv_heads = getattr(sub_config, "num_attention_heads", None), getattr(sub_config, "num_key_value_heads", None)
    if _is_int(heads) and _is_int(kv_heads) and heads % kv_heads:
        raise ValueError(
            f"{name}.num_attention_heads={heads} is not a multiple of {name}.num_key_value_heads={kv_heads}"
        )


def language_model_positions(text_config) -> int | None:
    """The positions the LM takes: `max_position_embeddings`, times the rope scaling `factor` when it has one."""
    positions = getattr(text_config, "max_position_embeddings", None)
    if not _is_int(positions):
        return None
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1:
        positions = int(positions * factor)
    return positions


def check_image_positions(pinpoints: list, tile: int, num_image_tokens: int, text_config) -> None:
    """A `ValueError` naming `image_grid_pinpoints` when one image on the largest canvas (its tiles and the global
    view, `num_image_tokens` positions each) takes more positions than the language model has."""
    positions = language_model_positions(text_config)
    if positions is None:
        return
    height, width = max(pinpoints, key=lambda canvas: (canvas[0] // tile) * (canvas[1] // tile))
    views = (height // tile) * (width // tile) + 1
    if views * num_image_tokens > positions:
        raise ValueError(
            f"image_grid_pinpoints: the canvas [{height}, {width}] makes one image {views} views x {num_image_tokens} "
            f"positions = {views * num_image_tokens} positions, more than the language model's {positions} "
            f"(text_config.max_position_embeddings); use smaller canvases"
        )


@contextlib.contextmanager
def config_file_named(pretrained_model_name_or_path, subfolder: str | None = None):
    """Re-raise a `ValueError`/`TypeError` from reading a local folder's `config.json` with the file's path in front
    (an error that already names the folder is left as it is)."""
    try:
        yield
    except (ValueError, TypeError) as error:
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or "")
        if not os.path.isdir(folder) or os.fspath(pretrained_model_name_or_path) in str(error):
            raise
        kind = ValueError if isinstance(error, ValueError) else TypeError
        raise kind(f"{os.path.join(folder, 'config.json')}: {error}") from error


def read_safetensors_header(path: str) -> dict:
    """`{tensor name: shape}` from a safetensors file's header (its data is not read), or a `ValueError` naming it."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > HEADER_LIMIT:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(file.read(length))
        return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, struct.error, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None


def weight_shapes(folder: str) -> tuple[str, dict] | None:
    """`(weights file, {tensor name: shape or None})` of a local folder, or `None` without a safetensors file. A
    sharded folder's names come from its index, with the shapes of the first shard's tensors only."""
    index_path = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as file:
                weight_map = json.load(file)["weight_map"]
            shapes = dict.fromkeys(weight_map)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path}: not a readable weights index ({type(error).__name__}: {error})") from None
        return index_path, shapes
    path = os.path.join(folder, WEIGHTS_FILE)
    return (path, read_safetensors_header(path)) if os.path.isfile(path) else None


def _layer_groups(names) -> dict[str, int]:
    """`{group prefix (`...layers`): number of layers}` of the layer-numbered tensors in `names` (highest index + 1)."""
    groups = {}
    for name in names:
        match = LAYER_KEY.match(name)
        if match:
            groups[match.group(1)] = max(groups.get(match.group(1), 0), int(match.group(2)) + 1)
    return groups


def _sub_config_of(prefix: str, config):
    """`(field name, sub-config)` a weight-group prefix belongs to, or `None` (the adapters)."""
    parts = prefix.split(".")[:-1]
    if "language_model" in parts:
        return "text_config", config.text_config
    if "audio_tower" in parts:
        return "audio_config", config.audio_config
    if "vision_tower" in parts:
        after = parts[parts.index("vision_tower") + 1 :]
        index = int(after[0]) if after and after[0].isdigit() else 0
        if index < len(config.vision_configs):
            return (
                "vision_config" if index == 0 else f"additional_vision_configs[{index - 1}]"
            ), config.vision_configs[index]
    return None


def check_config_against_weights(config, folder: str) -> None:
    """
    A `ValueError` naming the field, `config.json` and the weights file when a local folder's config asks for more
    layers than its weights file holds for the language model or a tower, or for another vocabulary or width than
    its token embeddings have. A folder without a safetensors file is not checked.
    """
    found = weight_shapes(folder)
    if found is None or config is None:
        return
    weights_path, shapes = found
    config_path = os.path.join(folder, "config.json")
    for prefix, held in _layer_groups(shapes).items():
        owner = _sub_config_of(prefix, config)
        if owner is None or owner[1] is None:
            continue
        name, sub_config = owner
        wanted = getattr(sub_config, "num_hidden_layers", None) or getattr(sub_config, "encoder_layers", None)
        if _is_int(wanted) and wanted > held:
            raise ValueError(
                f"{config_path}: {name}.num_hidden_layers={wanted}, but {weights_path} holds {held} layers for it "
                f"({prefix}.0 .. {held - 1}): the config and the weights disagree."
            )
    text = config.text_config
    for name, shape in shapes.items():
        if shape is not None and name.endswith("language_model.embed_tokens.weight") and len(shape) == 2:
            expected = [getattr(text, "vocab_size", None), getattr(text, "hidden_size", None)]
            if list(shape) != expected:
                raise ValueError(
                    f"{config_path}: text_config.vocab_size={expected[0]} and text_config.hidden_size={expected[1]}, "
                    f"but {weights_path} holds {name} of shape {list(shape)}: the config and the weights disagree."
                )


__all__ = [
    "check_config_against_weights",
    "check_image_positions",
    "check_sizes",
    "check_sub_config_sizes",
    "config_file_named",
    "language_model_positions",
]
