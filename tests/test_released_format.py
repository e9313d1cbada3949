"""Tests for the safe readers of AIRI's released OmniFusion checkpoint files."""

import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from modeling_omnifusion.conversion.released_format import (
    PROJECTION_KEYS,
    SPECIAL_EMBEDDING_KEYS,
    UnsafePickleError,
    find_released_layout,
    load_projection,
    read_projection,
    read_special_embeddings,
)
from modeling_omnifusion.testing.released import (
    PAYLOADS,
    declared_tensors_pickle,
    make_clip_vision_folder,
    make_deep_module_chain_projection,
    make_malicious_pickle,
    make_reduce_call_projection,
    make_released_checkpoint,
    patch_zip_entry,
    save_released_projection,
    save_special_embeddings,
    write_raw_torch_archive,
    write_zip_bomb_special_embeddings,
)


@pytest.fixture(scope="module")
def ckpt11(tmp_path_factory):
    return make_released_checkpoint(tmp_path_factory.mktemp("v11"), layout="1.1")


@pytest.fixture(scope="module")
def ckpt10(tmp_path_factory):
    return make_released_checkpoint(tmp_path_factory.mktemp("v10"), layout="1.0", tokenizer_files="full")


def assert_same_tensors(actual, expected):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert torch.equal(actual[key], value), key


# ---------------------------------------------------------------- layout


def test_layout_v11(ckpt11):
    layout = find_released_layout(ckpt11["input_dir"])
    assert layout.version == "1.1"
    assert layout.projection == ckpt11["projection"] and layout.projection.name == "projection.pt"
    assert layout.special_embeddings == ckpt11["special_embeddings"]
    assert layout.lm_dir.name == "tuned-model" and layout.tokenizer_dir.name == "tokenizer"
    assert layout.lm_weight_format == "safetensors"
    assert len(list(layout.lm_dir.glob("model-*-of-*.safetensors"))) > 1
    assert sorted(p.name for p in layout.tokenizer_dir.iterdir()) == ["tokenizer.model"]


def test_layout_v11_from_repo_root(ckpt11):
    layout = find_released_layout(ckpt11["root"])
    assert layout.version == "1.1" and layout.root == ckpt11["input_dir"]


def test_layout_v10(ckpt10):
    layout = find_released_layout(ckpt10["input_dir"])
    assert layout.version == "1.0"
    assert layout.projection.name == "projection" and layout.projection.suffix == ""
    assert layout.lm_dir.name == "OmniMistral-model" and layout.tokenizer_dir.name == "OmniMistral-tokenizer"
    assert layout.lm_weight_format == "bin"
    assert (layout.lm_dir / "pytorch_model.bin.index.json").is_file()
    assert len(list(layout.lm_dir.glob("pytorch_model-*-of-*.bin"))) > 1


def test_layout_repo_root_with_both_versions(tmp_path):
    make_released_checkpoint(tmp_path, layout="1.0")
    make_released_checkpoint(tmp_path, layout="1.1")
    assert find_released_layout(tmp_path).version == "1.0"
    layout = find_released_layout(tmp_path, version="1.1")
    assert layout.version == "1.1" and layout.root == tmp_path / "OmniMistral-v1_1"


def test_layout_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="projection.pt") as err:
        find_released_layout(tmp_path)
    assert "OmniMistral-model" in str(err.value) and str(tmp_path) in str(err.value)


def test_layout_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        find_released_layout(tmp_path / "nope")


@pytest.mark.parametrize(
    "remove, expected",
    [
        ("tokenizer", "tokenizer"),
        ("tokenizer/tokenizer.model", "tokenizer.model"),
        ("special_embeddings.pt", "special_embeddings.pt"),
        ("projection.pt", "projection.pt"),
        ("tuned-model/config.json", "config.json"),
        ("tuned-model/model-00002-of-00003.safetensors", "model-00002-of-00003.safetensors"),
    ],
)
def test_layout_missing_piece(tmp_path, remove, expected):
    info = make_released_checkpoint(tmp_path, layout="1.1")
    target = info["input_dir"] / remove
    assert target.exists()
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError) as err:
        find_released_layout(info["input_dir"], version="1.1")
    message = str(err.value)
    assert expected in message and str(info["input_dir"]) in message


def test_layout_v10_missing_shard(tmp_path):
    info = make_released_checkpoint(tmp_path, layout="1.0")
    shard = sorted(info["lm_dir"].glob("pytorch_model-*.bin"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        find_released_layout(info["input_dir"])


def test_layout_unknown_version(tmp_path):
    with pytest.raises(ValueError, match="2.0"):
        find_released_layout(tmp_path, version="2.0")


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["1.0", "1.1"])
def test_projection_matches_fixture_module(tmp_path, layout, dtype):
    info = make_released_checkpoint(tmp_path, layout=layout, dtype=dtype)
    state_dict = load_projection(info["projection"])
    assert set(state_dict) == set(PROJECTION_KEYS)
    assert_same_tensors(state_dict, info["expected_projection"])
    assert not any(t.requires_grad for t in state_dict.values())


def test_projection_pickled_from_main(tmp_path, ckpt11):
    path = tmp_path / "projection.pt"
    with zipfile.ZipFile(ckpt11["projection"]) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                assert b"cmodels\nVisualToGPTMapping\n" in data
                data = data.replace(b"cmodels\nVisualToGPTMapping\n", b"c__main__\nVisualToGPTMapping\n")
            dst.writestr(item, data)
    assert_same_tensors(load_projection(path), ckpt11["expected_projection"])


def test_projection_metadata(ckpt11):
    proj = read_projection(ckpt11["projection"])
    assert proj.vision_hidden_size == 32
    assert proj.text_hidden_size == 64
    assert proj.num_heads == 4
    assert proj.ffn_dim == 64
    assert proj.dropout == pytest.approx(0.1)
    assert proj.activation_name == "relu"
    assert proj.layer_norm_eps == pytest.approx(1e-5)
    assert proj.norm_first is False
    assert proj.batch_first is True
    assert proj.dtype == torch.bfloat16
    assert proj.num_image_tokens == 4
    assert proj.state_dict["linear.weight"].shape == (64, 32)


def test_projection_torch_defaults(tmp_path):
    path = tmp_path / "projection.pt"
    expected = save_released_projection(path, vision_hidden=16, text_hidden=24, num_image_tokens=9, ffn_dim=None)
    proj = read_projection(path)
    assert proj.ffn_dim == 2048 and proj.num_image_tokens == 9 and proj.text_hidden_size == 24
    assert_same_tensors(proj.state_dict, expected)


def test_projection_missing_keys(tmp_path):
    path = tmp_path / "projection.pt"
    save_released_projection(path, mutate=lambda m: delattr(m, "linear"))
    with pytest.raises(ValueError, match="missing keys") as err:
        read_projection(path)
    assert str(path) in str(err.value) and "linear.weight" in str(err.value) and "linear.bias" in str(err.value)


def test_projection_unexpected_keys(tmp_path):
    path = tmp_path / "projection.pt"
    save_released_projection(path, mutate=lambda m: m.register_buffer("pos", torch.zeros(3, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="unexpected keys.*pos") as err:
        read_projection(path)
    assert str(path) in str(err.value)


def test_projection_plain_state_dict_rejected(tmp_path, ckpt11):
    path = tmp_path / "projection.pt"
    torch.save(ckpt11["expected_projection"], path)
    with pytest.raises(ValueError, match="VisualToGPTMapping") as err:
        read_projection(path)
    assert str(path) in str(err.value)


def test_projection_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="projection.pt"):
        read_projection(tmp_path / "projection.pt")


# ---------------------------------------------------------------- special embeddings


def test_special_embeddings_by_name(ckpt11):
    embs = read_special_embeddings(ckpt11["special_embeddings"], hidden_size=64)
    assert list(embs) == list(SPECIAL_EMBEDDING_KEYS)
    assert_same_tensors(embs, ckpt11["expected_special_embeddings"])
    assert not any(t.requires_grad for t in embs.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_special_embeddings_key_order_irrelevant(tmp_path, dtype):
    path = tmp_path / "special_embeddings.pt"
    expected = save_special_embeddings(path, 48, dtype, seed=3, key_order=("EOI", "SOI", "BOT", "USER"))
    assert list(torch.load(path, weights_only=True)) == ["EOI", "SOI", "BOT", "USER"]
    embs = read_special_embeddings(path)
    for key in SPECIAL_EMBEDDING_KEYS:
        assert embs[key].dtype == dtype
        assert torch.equal(embs[key], expected[key]), key
    assert not torch.equal(embs["USER"], embs["EOI"])


def test_special_embeddings_wrong_hidden_size(ckpt11):
    path = ckpt11["special_embeddings"]
    with pytest.raises(ValueError) as err:
        read_special_embeddings(path, hidden_size=4096)
    message = str(err.value)
    assert str(path) in message and "'USER'" in message and "(64,)" in message and "(4096,)" in message


def test_special_embeddings_wrong_shape(tmp_path):
    path = tmp_path / "special_embeddings.pt"
    data = {k: torch.zeros(8, dtype=torch.bfloat16) for k in SPECIAL_EMBEDDING_KEYS}
    data["SOI"] = torch.zeros(2, 4, dtype=torch.bfloat16)
    torch.save(data, path)
    with pytest.raises(ValueError, match=r"'SOI' has shape \(2, 4\)") as err:
        read_special_embeddings(path)
    assert str(path) in str(err.value)


def test_special_embeddings_missing_key(tmp_path):
    path = tmp_path / "special_embeddings.pt"
    torch.save({k: torch.zeros(8) for k in ("USER", "BOT", "SOI")}, path)
    with pytest.raises(ValueError, match="EOI") as err:
        read_special_embeddings(path, hidden_size=8)
    assert str(path) in str(err.value)


def test_special_embeddings_extra_key(tmp_path):
    path = tmp_path / "special_embeddings.pt"
    torch.save({k: torch.zeros(8) for k in (*SPECIAL_EMBEDDING_KEYS, "IMG")}, path)
    with pytest.raises(ValueError, match="IMG"):
        read_special_embeddings(path)


def test_special_embeddings_parameters_not_allowed(tmp_path):
    path = tmp_path / "special_embeddings.pt"
    torch.save({k: torch.nn.Parameter(torch.zeros(8)) for k in SPECIAL_EMBEDDING_KEYS}, path)
    with pytest.raises(UnsafePickleError, match="torch._utils._rebuild_parameter"):
        read_special_embeddings(path)


# ---------------------------------------------------------------- hostile files


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("kind", ["top_level", "nested"])
def test_malicious_projection_is_refused(tmp_path, kind, payload):
    """torch.save writes protocol 2, so the pickle names globals with Python 2 module names."""
    path = tmp_path / "projection.pt"
    marker = make_malicious_pickle(path, kind=kind, payload=payload)
    forbidden = {
        "os.system": f"{os.system.__module__}.system",
        "builtins.exec": "__builtin__.exec",
        "subprocess.run": "commands.run",
    }[payload]
    with pytest.raises(UnsafePickleError) as err:
        read_projection(path)
    assert str(path) in str(err.value) and f"'{forbidden}'" in str(err.value)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        read_special_embeddings(path)
    assert not marker.exists()


def test_malicious_fixture_really_runs_payload(tmp_path):
    path = tmp_path / "evil.pt"
    marker = make_malicious_pickle(path, kind="top_level", payload="builtins.exec")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "data_pkl, forbidden",
    [
        (pickle.dumps(getattr, protocol=4), "builtins.getattr"),
        (pickle.dumps(eval, protocol=2), "__builtin__.eval"),
        (b"\x80\x02cevil\nTransformerEncoderLayer\n.", "evil.TransformerEncoderLayer"),
        (b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.", "posix.system"),
        (b"\x80\x02ctorch\nDoubleStorage\n.", "torch.DoubleStorage"),
        (b"\x80\x02ctorch.serialization\nload\n.", "torch.serialization.load"),
    ],
)
def test_forbidden_globals(tmp_path, data_pkl, forbidden):
    path = write_raw_torch_archive(tmp_path / "projection.pt", data_pkl)
    with pytest.raises(UnsafePickleError, match=forbidden.replace(".", r"\.")) as err:
        read_projection(path)
    assert str(path) in str(err.value)


def test_legacy_format_rejected(tmp_path):
    path = tmp_path / "special_embeddings.pt"
    torch.save({k: torch.zeros(4) for k in SPECIAL_EMBEDDING_KEYS}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not a torch zip archive") as err:
        read_special_embeddings(path)
    assert str(path) in str(err.value)


def test_torchscript_archive_rejected(tmp_path):
    path = write_raw_torch_archive(tmp_path / "projection", pickle.dumps({}, protocol=2), {"constants.pkl": b""})
    with pytest.raises(ValueError, match="TorchScript"):
        read_projection(path)


def test_truncated_storage_rejected(tmp_path, ckpt11):
    path = tmp_path / "special_embeddings.pt"
    with zipfile.ZipFile(ckpt11["special_embeddings"]) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:-2] if item.filename.endswith("/data/0") else data)
    with pytest.raises(ValueError, match="bytes, expected") as err:
        read_special_embeddings(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- fixtures themselves


def test_fixture_lm_and_tokenizer_load(ckpt10, ckpt11):
    import sentencepiece as spm
    from transformers import MistralForCausalLM

    for info in (ckpt10, ckpt11):
        model = MistralForCausalLM.from_pretrained(info["lm_dir"])
        assert model.config.vocab_size == info["vocab_size"] and model.config.hidden_size == 64
        assert model.dtype == torch.bfloat16
        sp = spm.SentencePieceProcessor(model_file=str(info["tokenizer_model"]))
        assert sp.get_piece_size() == info["vocab_size"]
        assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (ckpt10["tokenizer_dir"] / "tokenizer_config.json").is_file()


def test_fixture_clip_folder(tmp_path):
    from transformers import AutoImageProcessor, CLIPVisionModel

    folder = make_clip_vision_folder(tmp_path)
    model = CLIPVisionModel.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=torch.zeros(3, 40, 50, dtype=torch.uint8), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 28, 28)
    out = model(pixel_values=pixels, output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 5, 32)


# ---------------------------------------------------------------- hostile files within the allow-list: size and shape


def test_a_pickle_calling_a_module_class_is_refused_before_its_init_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda self, *args: calls.append(args))
    path = make_reduce_call_projection(tmp_path / "projection.pt", args=(2000, 2000))
    with pytest.raises(UnsafePickleError, match=r"refusing to call torch\.nn\.Linear\(\.\.\.\) from a pickle") as err:
        read_projection(path)
    assert str(path) in str(err.value) and calls == []


def test_released_modules_are_rebuilt_from_stored_state_without_any_module_code(ckpt11, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} code ran")

    for module_class in (
        torch.nn.Module,
        torch.nn.Linear,
        torch.nn.TransformerEncoderLayer,
        torch.nn.MultiheadAttention,
    ):
        monkeypatch.setattr(module_class, "__init__", refuse)
        monkeypatch.setattr(module_class, "__setstate__", refuse)
    assert_same_tensors(load_projection(ckpt11["projection"]), ckpt11["expected_projection"])


def test_a_storage_declared_larger_than_its_tensors_is_refused_before_it_is_read(tmp_path):
    tensors = {key: (str(index), 8, (8,)) for index, key in enumerate(SPECIAL_EMBEDDING_KEYS)}
    tensors["USER"] = ("0", 2**20, (8,))  # 4 MiB declared (and stored) behind an 8-element tensor
    records = {f"data/{index}": bytes(32) for index in range(1, 4)} | {"data/0": bytes(2**22)}
    path = write_raw_torch_archive(tmp_path / "special_embeddings.pt", declared_tensors_pickle(tensors), records)
    with pytest.raises(ValueError, match=f"{path}: storage '0' declares {2**20} elements but its tensors use only 8"):
        read_special_embeddings(path)


def test_shapes_other_than_the_expected_ones_are_refused_before_any_weight_is_read(ckpt11, tmp_path):
    with pytest.raises(ValueError, match=rf"{ckpt11['projection']}: adapter 'linear.weight' has shape \(64, 32\), "
                       r"expected \(4096, 1024\)"):  # fmt: skip
        read_projection(ckpt11["projection"], vision_hidden_size=1024, text_hidden_size=4096)
    bomb = write_zip_bomb_special_embeddings(tmp_path / "special_embeddings.pt")
    with pytest.raises(ValueError, match=rf"{bomb}: special embedding 'USER' has shape \({2**29},\), expected \(64,\)"):
        read_special_embeddings(bomb, hidden_size=64)


def test_a_zip_entry_inflating_a_thousandfold_is_refused_without_inflating_it(tmp_path):
    bomb = write_zip_bomb_special_embeddings(tmp_path / "special_embeddings.pt")
    assert bomb.stat().st_size < 2.2e6
    with pytest.raises(ValueError, match=f"{bomb}: record 'archive/data/0' inflates 2123778 compressed bytes to "
                       f"{2**31} .*refused as a decompression bomb"):  # fmt: skip
        read_special_embeddings(bomb)


def test_a_deep_module_chain_is_a_value_error_naming_the_file(tmp_path):
    path = make_deep_module_chain_projection(tmp_path / "projection.pt", depth=3000)
    with pytest.raises(ValueError, match=f"{path}: modules nested more than 8 deep, at 'transformer_layer.deep.inner"):
        read_projection(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (dict(flip_data_byte=True), "BadZipFile: Bad CRC-32 for file 'special_embeddings/data/0'"),
        (dict(method=99), "NotImplementedError: That compression method is not supported"),
    ],
)
def test_a_damaged_zip_entry_is_a_value_error_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "special_embeddings.pt"
    save_special_embeddings(path, 16)
    patch_zip_entry(path, "special_embeddings/data/0", **damage)
    with pytest.raises(ValueError, match=re.escape(f"{path}: could not read tensor data: {message}")):
        read_special_embeddings(path)


MEMORY_PROBE = """
import resource, sys
from pathlib import Path
from modeling_omnifusion.conversion.released_format import read_projection, read_special_embeddings

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

baseline = peak_mib()
for reader, path in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        (read_projection if reader == "projection" else read_special_embeddings)(Path(path))
    except ValueError as error:
        print(f"{Path(path).name}: refused, peak +{peak_mib() - baseline:.1f} MiB ({str(error)[:120]})")
    else:
        print(f"{Path(path).name}: READ")
print(f"peak_growth_mib={peak_mib() - baseline:.1f}")
"""


def test_hostile_files_are_refused_in_bounded_memory(tmp_path):
    """Each of these took main to 1.5-4.4 GB: a 2 MB zip bomb, nn.Linear(20000, 20000) called by a 400-byte pickle."""
    cases = {
        "special": write_zip_bomb_special_embeddings(tmp_path / "bomb.pt"),
        "projection": make_reduce_call_projection(tmp_path / "linear.pt", args=(20000, 20000)),
    }
    deep = make_deep_module_chain_projection(tmp_path / "deep.pt", depth=3000)
    arguments = [str(item) for pair in cases.items() for item in pair] + ["projection", str(deep)]
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *arguments], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all(": refused, peak" in line for line in lines[:3]), result.stdout
    assert float(lines[-1].removeprefix("peak_growth_mib=")) < 64, result.stdout
