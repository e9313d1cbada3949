"""
CPU kernel choice for one-position steps, in two parts.

Matrix products. For a bfloat16 `Linear` over one row, the step of single-sequence decoding
and the LM head over the last position, torch on the CPU calls oneDNN, which reads the weight at about half the
memory bandwidth; ATen's own matrix-vector kernel reads it at close to the full bandwidth. Measured with torch 2.13
on 2 cores with AVX-512 BF16: a 4096 x 14336 weight read 1.5x faster, 2048 x 5632 1.7x, 576 x 1536 the same, and
decode of a 1B LM 1.7x faster per token with the same greedy tokens. From two rows on oneDNN is faster (0.8x at two
rows, 0.13x at 64), so only single-position calls switch.

Attention. With no mask, transformers' `sdpa` runs a grouped-query decode step through torch's `enable_gqa`, whose
CPU flash kernel takes one bfloat16 query row per head at about a tenth of the speed of the same attention with the
query heads of each key/value head packed as rows (transformers' own `pack_gqa`, which it takes only when a mask is
given): 2.9 ms against 0.23 ms per layer at Mistral-7B's heads over 617 positions, 13 % of a 7B decode step. So a
single bfloat16 position on the CPU gets its padding mask as an explicit 4D boolean mask (`decode_attention_mask`),
which transformers uses as given and which sends `sdpa` to the packed path; the result is the same attention.
"""

import contextlib

import torch
from transformers.integrations import sdpa_attention

# Whether this transformers' `sdpa` packs a single query's heads when given a mask (5.24 does, 5.22 not): older
# releases repeat the keys and values instead, no faster than `enable_gqa`.
SDPA_PACKS_GQA = hasattr(sdpa_attention, "pack_gqa")


def single_position_on_cpu(hidden: torch.Tensor) -> bool:
    """Whether `hidden` (`[..., hidden size]`) holds exactly one position of bfloat16 on the CPU, outside
    `torch.compile` (whose graphs choose their own kernels)."""
    return (
        hidden.device.type == "cpu"
        and hidden.dtype == torch.bfloat16
        and hidden.shape[:-1].numel() == 1
        and not torch.compiler.is_compiling()
    )


@contextlib.contextmanager
def single_position_kernels(hidden: torch.Tensor):
    """
    Within the block, torch's matrix products skip oneDNN when `single_position_on_cpu(hidden)` (see the module
    docstring); otherwise nothing changes. The switch is torch's process-wide `torch.backends.mkldnn.enabled`,
    restored on exit: another thread computing meanwhile gets ATen's kernels too (slower for it, not wrong).
    """
    if not single_position_on_cpu(hidden) or not torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


def decode_attention_mask(attention_mask, hidden: torch.Tensor, past_length: int, text_config):
    """
    The mask to give the LM for this call: `attention_mask` unchanged, except for one bfloat16 position on the CPU
    (`single_position_on_cpu`) of a grouped-query LM under `sdpa` whose every layer attends to all earlier positions
    (no sliding window in reach, no other layer types), where it is the same mask as a `[batch, 1, 1, past + 1]`
    boolean tensor (all True without `attention_mask`): see the module docstring. A mask that is not `[batch, past
    + 1]` is left alone.
    """
    if not SDPA_PACKS_GQA or not single_position_on_cpu(hidden):
        return attention_mask
    if getattr(text_config, "_attn_implementation", None) != "sdpa":
        return attention_mask
    heads = text_config.num_attention_heads
    if getattr(text_config, "num_key_value_heads", heads) in (None, heads):
        return attention_mask
    kv_length = past_length + 1
    window = getattr(text_config, "sliding_window", None)
    layer_types = set(getattr(text_config, "layer_types", None) or ())
    if (window is not None and kv_length > window) or layer_types - {"full_attention"}:
        return attention_mask
    if attention_mask is None:
        return torch.ones(1, 1, 1, kv_length, dtype=torch.bool, device=hidden.device)
    if attention_mask.ndim != 2 or attention_mask.shape[-1] != kv_length:
        return attention_mask
    return attention_mask[:, None, None, :].to(torch.bool)


__all__ = ["decode_attention_mask", "single_position_kernels", "single_position_on_cpu"]
