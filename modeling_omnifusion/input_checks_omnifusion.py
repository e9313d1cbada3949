"""
Guards where input enters an OmniFusion model: the prompt of a forward call, the generation settings of a
`generate()` call or a loaded folder, and the weights of a loaded folder. Each fails with a clear error naming what
is wrong, before any work is done.
"""

import json
import numbers
import os

import torch

from .quantization_omnifusion import is_plain_float_tensor


def prompt_positions(text_config) -> tuple[int | None, str]:
    """
    The positions a prompt may reach in the language model, and how that follows from its config: its rotary
    parameters (`rope_parameters`, or `rope_scaling` on older configs) decide, not `max_position_embeddings` alone.
    - dynamic NTK scaling (`rope_type` "dynamic") recomputes the rotary frequencies for any length: no limit (`None`);
    - any other rope type: `factor` (1 when absent) x `original_max_position_embeddings` (defaulting to
      `max_position_embeddings`), or `max_position_embeddings` when that is larger: linear, YaRN, llama3 and longrope
      scaling stretch the original context by their factor, and an unscaled (default) rope declares its trained
      context as `original_max_position_embeddings`;
    - per-layer-type rope parameters (a dict of dicts): the smallest context over the layer types;
    - no `max_position_embeddings` and no rope context: no limit.
    """
    max_positions = getattr(text_config, "max_position_embeddings", None)
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    entries = [rope] if not rope or not all(isinstance(v, dict) or v is None for v in rope.values()) else rope.values()
    limits = []
    for entry in entries:
        entry = entry or {}
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type == "dynamic":
            return None, f"no position limit (rope_type {rope_type!r})"
        original = entry.get("original_max_position_embeddings") or max_positions
        if not original:
            continue
        factor = entry.get("factor") or 1.0
        scaled = int(factor * original)
        if max_positions and max_positions >= scaled:
            limits.append((max_positions, f"max_position_embeddings={max_positions}"))
        else:
            how = f"factor {factor:g} x " if factor != 1.0 else ""
            limits.append(
                (
                    scaled,
                    f"{scaled} positions (rope_type {rope_type!r}: {how}original_max_position_embeddings {original})",
                )
            )
    if not limits:
        return (max_positions, f"max_position_embeddings={max_positions}") if max_positions else (None, "no limit")
    return min(limits)


def check_prompt(
    input_ids, inputs_embeds, past_length: int, max_positions: int | None, position_ids=None, limit_name: str = ""
):
    """
    A `ValueError` for an empty prompt, or for one that does not fit the LM's positions (`max_positions`, from
    `prompt_positions`, described by `limit_name`; `None`: no limit): checked on every call that feeds more than one
    token (a prompt, or a chunk of one after cached tokens), before anything is allocated. Single-token decoding steps
    are not limited, as in transformers. When `position_ids` are given, the positions themselves are checked rather
    than the length: engines that run several sequences flattened into one row (vLLM, packed training batches) pass
    positions that restart per sequence.
    """
    shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape)
    name = "input_ids" if input_ids is not None else "inputs_embeds"
    if len(shape) < 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"The prompt is empty: {name} has shape {shape}; expected [batch, sequence] with both > 0.")
    length = shape[1]
    if not max_positions or length <= 1:
        return
    limit_name = limit_name or f"max_position_embeddings={max_positions}"
    if position_ids is not None:
        furthest = int(position_ids.max()) + 1
        if furthest > max_positions:
            raise ValueError(
                f"The prompt reaches position {furthest} (image and audio positions included), more than the language "
                f"model's {limit_name}; shorten it."
            )
        return
    if past_length + length > max_positions:
        cached = f" after {past_length} cached tokens" if past_length else ""
        raise ValueError(
            f"The prompt is {length} tokens long{cached} (image and audio positions included), more than the language "
            f"model's {limit_name}; shorten it to at most {max_positions - past_length} tokens."
        )


def check_prompt_ids(input_ids, num_embeddings: int | None, config) -> None:
    """
    A `ValueError` if a prompt (more than one token: decoding steps are not checked) holds an id that is neither in
    the LM's vocabulary (`0..num_embeddings - 1`) nor one of the config's marker ids: a processor whose marker ids
    disagree with `config.json`'s (`image_token_id`, ...) would otherwise end in an `IndexError` in the embedding.
    """
    if input_ids is None or num_embeddings is None or input_ids.ndim != 2 or input_ids.shape[1] <= 1:
        return
    outside = (input_ids < 0) | (input_ids >= num_embeddings)
    if not bool(outside.any()):
        return
    markers = dict(zip(config.special_token_fields, config.special_token_ids))
    unknown = sorted(set(input_ids[outside].tolist()) - set(markers.values()))
    if unknown:
        raise ValueError(
            f"input_ids hold ids {unknown[:8]} that are neither in the language model's vocabulary "
            f"(0..{num_embeddings - 1}) nor marker ids of this model's config {markers}: the processor's marker ids "
            "must equal the config's (save the processor and the model to the same folder, or fix config.json)."
        )


def check_finite_pixels(pixel_values) -> None:
    """A `ValueError` if `pixel_values` hold NaN or infinite values (the encoders would turn them into NaN features
    and the LM into meaningless tokens, without an error). Checked once per encoding, never per decoding step."""
    if pixel_values is None or not pixel_values.is_floating_point():
        return
    finite = torch.isfinite(pixel_values)
    if not bool(finite.all()):
        views = (~finite).flatten(1).any(-1).nonzero().flatten().tolist() if pixel_values.ndim > 1 else []
        raise ValueError(
            f"pixel_values hold {int((~finite).sum())} NaN or infinite values (views {views[:8]} of "
            f"{tuple(pixel_values.shape)}); build them with the model's OmniFusionProcessor from finite images."
        )


INT_FIELDS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "num_beam_groups", "top_k",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "num_return_sequences", "num_assistant_tokens",
    "prompt_lookup_num_tokens", "max_matching_ngram_size",
)  # fmt: skip
FLOAT_FIELDS = (
    "temperature", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "encoder_repetition_penalty", "length_penalty", "diversity_penalty", "penalty_alpha", "max_time",
    "guidance_scale", "assistant_confidence_threshold",
)  # fmt: skip
BOOL_FIELDS = (
    "do_sample", "use_cache", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "return_dict_in_generate", "renormalize_logits", "remove_invalid_values",
)  # fmt: skip
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id",
                   "forced_eos_token_id")  # fmt: skip
ID_LIST_FIELDS = ("suppress_tokens", "begin_suppress_tokens")
ID_LISTS_FIELDS = ("bad_words_ids",)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _type_problem(name: str, value) -> str | None:
    """What is wrong with the type of generation setting `name`, or `None` (unknown settings are not judged)."""
    if value is None:
        return None
    if name in INT_FIELDS and not _is_int(value):
        return "an int"
    if name in FLOAT_FIELDS and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        return "a number"
    if name in BOOL_FIELDS and not isinstance(value, bool):
        return "true or false"
    if name == "early_stopping" and not (isinstance(value, bool) or value == "never"):
        return 'true, false or "never"'
    if name in TOKEN_ID_FIELDS and not (_is_int(value) or (isinstance(value, list) and all(map(_is_int, value)))):
        return "a token id (int) or a list of them"
    if name in ID_LIST_FIELDS and not (isinstance(value, list) and all(map(_is_int, value))):
        return "a list of token ids (ints)"
    if name in ID_LISTS_FIELDS and not (
        isinstance(value, list) and all(isinstance(ids, list) and all(map(_is_int, ids)) for ids in value)
    ):
        return "a list of lists of token ids (ints)"
    return None


def check_generation_settings(settings: dict, source: str):
    """A `TypeError` naming `source` and the setting if a known generation setting has the wrong type."""
    for name, value in settings.items():
        expected = _type_problem(name, value)
        if expected:
            raise TypeError(f"{source}: generation setting {name!r} must be {expected}, got {value!r:.80}.")


def check_generation_config_file(pretrained_model_name_or_path, subfolder: str = ""):
    """Check the types in a local folder's `generation_config.json` before transformers reads it."""
    path = os.path.join(str(pretrained_model_name_or_path), subfolder or "", "generation_config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8-sig") as file:
            settings = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error}).") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object of generation settings, got {type(settings).__name__}.")
    check_generation_settings(settings, path)


def non_finite_weights(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, int]:
    """
    `{parameter name: number of NaN/Inf values}` over the parameters whose name starts with one of `names`. Only
    plain floating-point parameters are scanned: quantized ones (tensor subclasses, integer storage) are skipped.
    """
    found = {}
    for name, parameter in model.named_parameters():
        if not name.startswith(names) or parameter.device.type == "meta" or not is_plain_float_tensor(parameter):
            continue
        bad = int((~torch.isfinite(parameter.detach())).sum())
        if bad:
            found[name] = bad
    return found


__all__ = [
    "check_finite_pixels",
    "check_generation_config_file",
    "check_generation_settings",
    "check_prompt",
    "check_prompt_ids",
    "non_finite_weights",
]
