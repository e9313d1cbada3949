"""
Fallbacks that let the remote code run on every transformers from 5.16 (the oldest that vLLM releases pin) to the
newest. Each name is the library's own where it exists and a local equivalent where an older release lacks it:

- `SubConfigSpec` (5.24+: composite configs declare `sub_configs_defaults`); older releases read the class attribute
  `sub_configs` and leave building the sub-configs to the config's `__post_init__` (`resolve_sub_configs`).
- `MultimodalBaseModelOutputWithPast` / `MultimodalCausalLMOutputWithPast` (5.24+, cache field `cache`); older
  releases get equivalents whose cache field is `past_key_values`, the name their `generate()` reads.
- `slice_logits_to_keep` (5.24+).
- The decoder's cache keyword: `cache` on 5.24+, `past_key_values` before (`cache_argument_name`).
- Asking a vision tower for one hidden layer (`output_hidden_states=[layer]`): 5.24 keeps just that layer, 5.16
  returns all of them, 5.19 misplaces the selected one (`[-2]` gives no layer at all); `hidden_states_request`
  asks for every layer on releases before 5.24.

The package itself requires transformers>=5.24; only the copies shipped in saved model folders meet older releases.
"""

import inspect
import re
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig
from transformers.modeling_outputs import ModelOutput

try:
    from transformers.configuration_utils import SubConfigSpec

    NATIVE_SUB_CONFIG_SPEC = True
except ImportError:  # transformers < 5.24
    NATIVE_SUB_CONFIG_SPEC = False

    class SubConfigSpec:
        """How to build one sub-config when a composite config gets a dict or nothing for it."""

        def __init__(
            self, config_class, model_type: str | None = None, init_kwargs: dict | None = None, optional=False
        ):
            if model_type is None and not hasattr(config_class, "model_type"):
                raise ValueError(f"SubConfigSpec needs a `model_type` for {config_class}")
            self.config_class = config_class
            self.model_type = model_type if model_type is not None else config_class.model_type
            self.init_kwargs = dict(init_kwargs or {})
            self.optional = optional

        def create_subconfig(self, key: str, subconfig=None):
            from transformers import PreTrainedConfig
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if isinstance(subconfig, PreTrainedConfig):
                return subconfig
            if subconfig is not None and not isinstance(subconfig, dict):
                raise TypeError(f"`{key}` must be a `dict`, `PreTrainedConfig`, or `None`, got `{type(subconfig)}`")
            values = dict(self.init_kwargs if subconfig is None else subconfig)
            if self.config_class is AutoConfig:
                model_type = values.get("model_type", self.model_type)
                if model_type not in CONFIG_MAPPING:
                    raise ValueError(f"Unrecognized model type for `{key}`: {model_type!r}")
                config_class = CONFIG_MAPPING[model_type]
            else:
                config_class = self.config_class
            values.pop("model_type", None)
            return config_class(**values)


def legacy_sub_configs(sub_configs_defaults: dict) -> dict:
    """The `sub_configs` class attribute older releases read (key -> config class), from `sub_configs_defaults`."""
    return {key: spec.config_class for key, spec in sub_configs_defaults.items()}


def resolve_sub_configs(config) -> None:
    """On releases without `SubConfigSpec`, turn each sub-config given as a dict or `None` into a config object.

    A no-op on 5.24+, where `PreTrainedConfig.__post_init__` does it from `sub_configs_defaults`.
    """
    if NATIVE_SUB_CONFIG_SPEC:
        return
    for key, spec in type(config).sub_configs_defaults.items():
        value = getattr(config, key)
        if value is None and spec.optional:
            continue
        setattr(config, key, spec.create_subconfig(key, value))


try:
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast, MultimodalCausalLMOutputWithPast
except ImportError:  # transformers < 5.24

    class _MultimodalModelOutput(ModelOutput):
        def to_tuple(self) -> tuple:
            return tuple(self[k] if k != "image_outputs" else self[k].to_tuple() for k in self.keys())

    @dataclass
    class MultimodalBaseModelOutputWithPast(_MultimodalModelOutput):
        """The decoder's outputs plus the image encoder's (`image_outputs`); the cache is `past_key_values`."""

        last_hidden_state: torch.FloatTensor | None = None
        past_key_values: object | None = None
        hidden_states: tuple | None = None
        attentions: tuple | None = None
        image_outputs: ModelOutput | None = None

    @dataclass
    class MultimodalCausalLMOutputWithPast(_MultimodalModelOutput):
        """Loss, logits, the decoder's outputs and the image encoder's (`image_outputs`)."""

        loss: torch.FloatTensor | None = None
        logits: torch.FloatTensor | None = None
        past_key_values: object | None = None
        hidden_states: tuple | None = None
        attentions: tuple | None = None
        image_outputs: ModelOutput | None = None


# The name of the cache field in the two output classes above: "cache" on 5.24+, "past_key_values" before.
OUTPUT_CACHE_FIELD = "cache" if "cache" in MultimodalBaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


TRANSFORMERS_VERSION = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())


def hidden_states_request(layers: list[int]):
    """The `output_hidden_states` value that makes `hidden_states[i]` the wanted layer for each i in `layers`."""
    return list(layers) if TRANSFORMERS_VERSION >= (5, 24) else True


def output_cache(outputs):
    """The cache a decoder's output carries, under either name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def cache_argument_name(module: torch.nn.Module) -> str:
    """The keyword `module.forward` takes its KV cache by: `cache` (5.24+) or `past_key_values` (older releases)."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.24

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep) -> torch.Tensor:
        """Keep the last `logits_to_keep` positions (0: all), or the given positions / boolean mask."""
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
            if logits_to_keep.dtype == torch.bool:
                return hidden_states[logits_to_keep]
            return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None)
        return hidden_states[:, logits_to_keep, :]


__all__ = [
    "NATIVE_SUB_CONFIG_SPEC",
    "OUTPUT_CACHE_FIELD",
    "MultimodalBaseModelOutputWithPast",
    "MultimodalCausalLMOutputWithPast",
    "SubConfigSpec",
    "cache_argument_name",
    "hidden_states_request",
    "legacy_sub_configs",
    "output_cache",
    "resolve_sub_configs",
    "slice_logits_to_keep",
]
