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


@pytest.mark.parametrize(("flags", "expected"), [({"avx512_bf16"}, "bfloat16"), ({"avx2", "avx512f"}, "float32")])
def test_evaluate_visdial_loads_in_the_dtype_the_cpu_computes_natively(tmp_path, monkeypatch, flags, expected):
    """`--dtype auto` (the default) on a CPU: bfloat16 where the CPU reports it natively, float32 elsewhere."""
    import json

    from visdial_data import VISDIAL_DATA_DIR

    from modeling_omnifusion.evaluation import visdial
    from modeling_omnifusion.testing.tiny import make_image, make_model_and_processor

    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset(flags))
    model, processor = make_model_and_processor(seed=1)
    model.save_pretrained(tmp_path / "omnifusion")
    processor.save_pretrained(tmp_path / "omnifusion")
    visdial_json = VISDIAL_DATA_DIR / "visdial_1.0_val_sample5.json"
    image_id = json.loads(visdial_json.read_text())["data"]["dialogs"][0]["image_id"]
    (tmp_path / "images").mkdir()
    make_image(1, size=48).save(tmp_path / "images" / f"VisualDialog_val2018_{image_id:012d}.jpg")
    output = tmp_path / "result.json"
    visdial.main(
        ["--model", str(tmp_path / "omnifusion"), "--visdial_json", str(visdial_json), "--images_dir",
         str(tmp_path / "images"), "--output", str(output), "--max_dialogs", "1", "--device", "cpu"]
    )  # fmt: skip
    assert json.loads(output.read_text())["settings"]["dtype"] == expected
