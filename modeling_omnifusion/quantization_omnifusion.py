"""
What quantization leaves alone, and the dtype a module computes in whatever its weights became. transformers'
quantizers (torchao, bitsandbytes, and the others that call `HfQuantizer.get_modules_to_not_convert`) skip the
model's `_keep_in_fp32_modules` besides their own defaults (the LM head and the weights tied to it). The OmniFusion
models declare there the parts that are small, precision-sensitive or not plain decoder layers: the vision and audio
towers, the adapters (image, sound, video) and the marker table (and `lm_head` on the model with the head). The
names are prefixes of module names from the declaring model's root, matched at module boundaries by the quantizers.
Declaring them does not upcast anything: `keep_requested_dtype` removes them from the float16 dtype plan that
`_keep_in_fp32_modules` otherwise makes.
"""

import re

import torch
from torch import nn

# Module-name prefixes under `OmniFusionModel`; `OmniFusionForCausalLM` holds them under "model." and adds "lm_head".
NOT_QUANTIZED_MODULES = (
    "vision_tower",
    "adapter",
    "audio_tower",
    "audio_adapter",
    "video_adapter",
    "language_model.embed_tokens.special_embeddings",
)


def not_quantized_modules(prefix: str = "", head: str | None = None) -> list[str]:
    """`NOT_QUANTIZED_MODULES` under `prefix` (e.g. "model."), plus the LM head's name `head` when given."""
    return [prefix + name for name in NOT_QUANTIZED_MODULES] + ([head] if head else [])


def keep_requested_dtype(dtype_plan: dict) -> dict:
    """`dtype_plan` without entries for the modules of `not_quantized_modules` (as declared by either model, and as
    `OmniFusionForCausalLM` collects them unprefixed from its `OmniFusionModel`): they load in the requested dtype."""
    declared = set(not_quantized_modules()) | set(not_quantized_modules("model.", head="lm_head"))
    return {name: dtype for name, dtype in dtype_plan.items() if name not in declared}


def is_plain_float_tensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an ordinary floating-point tensor or parameter: not a quantized tensor subclass (torchao's
    `Int8Tensor`, bitsandbytes' `Int8Params`/`Params4bit`) and not integer storage."""
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.dtype.is_floating_point


def compute_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """
    The dtype `module` takes its input in: that of its first plain floating-point parameter, else of its first
    floating-point buffer, else `default`. A module whose weights all became packed quantized ones (e.g. after
    `torch.ao.quantization.quantize_dynamic`, which takes float input) has neither.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if is_plain_float_tensor(tensor):
            return tensor.dtype
    return default


__all__ = [
    "NOT_QUANTIZED_MODULES",
    "compute_dtype",
    "is_plain_float_tensor",
    "keep_requested_dtype",
    "not_quantized_modules",
]


def declared_modules_present(model: nn.Module, declared) -> set[str]:
    """The names of `declared` that name a module of `model` (matched, as transformers matches them, at dot
    boundaries of its parameter and buffer names): a model without sound or video declares no audio or video part."""
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    return {module for module in declared if any(re.search(rf"(?:^|\.){re.escape(module)}(?:\.|$)", n) for n in names)}
