import pytest
import torch

from modeling_omnifusion import inference


def test_cpu_flags_are_read_from_the_first_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert inference.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert inference.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx2", "avx512_bf16"}, torch.bfloat16), ({"amx_bf16"}, torch.bfloat16), ({"avx2", "avx512f"}, torch.float32)],
)
def test_auto_dtype_follows_the_cpu_bfloat16_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset(flags))
    assert inference.resolve_dtype("auto") == expected


def test_an_explicit_dtype_wins_over_the_cpu(monkeypatch):
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert inference.resolve_dtype("float32") == torch.float32
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset())
    assert inference.resolve_dtype("bfloat16") == torch.bfloat16


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="float16"):
        inference.resolve_dtype("float16")
