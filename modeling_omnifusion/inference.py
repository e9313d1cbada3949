"""The inference dtype for the machine at hand: bfloat16 where the CPU computes it natively, float32 elsewhere.

Not part of the remote code shipped in saved folders; the demos, the evaluation driver and the benchmarks use it.

    from modeling_omnifusion.inference import resolve_dtype
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=resolve_dtype("auto"))
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of the first CPU listed in `cpuinfo` (empty where the file does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bfloat16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU reports AVX-512 BF16 or AMX-BF16 (bfloat16 matmuls in hardware)."""
    return bool((cpu_flags() if flags is None else flags) & NATIVE_BFLOAT16_FLAGS)


def resolve_dtype(choice: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype to load a model in: `choice` is "auto", "float32" or "bfloat16".

    "auto" gives bfloat16 on a CUDA device that supports it and on a CPU with native bfloat16, float32 otherwise.
    """
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return getattr(torch, choice)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
