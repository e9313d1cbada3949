"""
CPU kernel choice for one-position steps. For a bfloat16 `Linear` over one row, the step of single-sequence decoding
and the LM head over the last position, torch on the CPU calls oneDNN, which reads the weight at about half the
memory bandwidth; ATen's own matrix-vector kernel reads it at close to the full bandwidth. Measured with torch 2.13
on 2 cores with AVX-512 BF16: a 4096 x 14336 weight read 1.5x faster, 2048 x 5632 1.7x, 576 x 1536 the same, and
decode of a 1B LM 1.7x faster per token with the same greedy tokens. From two rows on oneDNN is faster (0.8x at two
rows, 0.13x at 64), so only single-position calls switch.
"""

import contextlib

import torch


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


__all__ = ["single_position_kernels", "single_position_on_cpu"]
