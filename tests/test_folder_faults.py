"""
Saved folders that are damaged or inconsistent, saves that fail half-way, kills while a final output is moved into
place, NaN pixel values and file permissions: each ends OK or with a clear error naming the input, and nothing is
half-written.
"""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from fresh_python import run_fresh_python
from safetensors.torch import save_file

import modeling_omnifusion.modeling_omnifusion as modeling
from modeling_omnifusion import OmniFusionConfig
from modeling_omnifusion.hub_omnifusion import atomic_folder, default_modes
from modeling_omnifusion.testing.folder_faults import (
    FOLDER_FAULTS,
    FRESH_RUNNER,
    KILL_AT_MOVE,
    case_list,
    files_of,
    judge,
    make_fault_folders,
    staged_output,
)
from modeling_omnifusion.testing.tiny import chat, make_image, make_model_and_processor, vision_config
from modeling_omnifusion.training.checkpoints import FINAL_OUTPUT_COMMITTING, commit_files, finish_interrupted_commit


@pytest.fixture(scope="module")
def tiny():
    return make_model_and_processor()


@pytest.fixture(scope="module")
def good_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "model"
    model, processor = tiny
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fresh_results(good_folder, tmp_path_factory):
    """Every `FOLDER_FAULTS` case, and the good folder's processor load and generate, in one Python process that has
    not imported this project."""
    root = tmp_path_factory.mktemp("faults")
    image = root / "image.png"
    make_image(0).save(image)
    cases = case_list(make_fault_folders(good_folder, root), good_folder, image)
    good = {"folder": str(good_folder), "good": str(good_folder), "image": str(image)}
    cases += [{**good, "name": f"good folder ({action})", "action": action} for action in ("processor", "generate")]
    (root / "cases.json").write_text(json.dumps(cases))
    output = run_fresh_python(FRESH_RUNNER, root, root / "cases.json", 60)
    return {result["name"]: result for result in map(json.loads, output.splitlines()) if result}


@pytest.mark.parametrize("name", list(FOLDER_FAULTS))
def test_a_damaged_folder_is_refused_naming_the_file_and_field(name, fresh_results):
    result = fresh_results[name]
    assert judge(result, FOLDER_FAULTS[name][2]) == "ok", result
    assert result["seconds"] < 30, result


@pytest.mark.parametrize("action", ["processor", "generate"])
def test_the_good_folder_loads_and_generates_without_a_chat_template_warning(action, fresh_results):
    result = fresh_results[f"good folder ({action})"]
    assert result["outcome"] == "ok", result
    assert not [warning for warning in result["warnings"] if "chat_template" in warning], result


def test_sizes_in_a_config_are_checked_without_a_folder():
    text = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 0}
    with pytest.raises(ValueError, match=r"text_config\.num_key_value_heads must be a positive int, got 0"):
        OmniFusionConfig(vision_config=vision_config(), text_config=text)
    vision = vision_config().to_dict() | {"patch_size": 0}
    with pytest.raises(ValueError, match=r"vision_config\.patch_size must be a positive int"):
        OmniFusionConfig(vision_config=vision)
    with pytest.raises(ValueError, match="num_image_tokens=10 disagrees"):
        OmniFusionConfig(vision_config=vision_config(), num_image_tokens=10)
    assert OmniFusionConfig(vision_config=vision_config(), num_image_tokens=16).num_image_tokens == 16


# --------------------------------------------------------------------------------------------------------------------
# NaN pixel values
# --------------------------------------------------------------------------------------------------------------------


def test_nan_pixel_values_are_refused_once_per_generate(tiny, monkeypatch):
    model, processor = tiny
    inputs = processor.apply_chat_template(
        chat("What is it?", images=[make_image(0)]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    calls = []
    checked = modeling.check_finite_pixels
    monkeypatch.setattr(modeling, "check_finite_pixels", lambda pixels: calls.append(1) or checked(pixels))
    model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(calls) == 1  # the prompt's encoding only, never a decoding step
    inputs["pixel_values"][0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"pixel_values hold 1 NaN or infinite values \(views \[0\]"):
        model.generate(**inputs, max_new_tokens=2)


# --------------------------------------------------------------------------------------------------------------------
# Saves that fail half-way: nothing half-written
# --------------------------------------------------------------------------------------------------------------------


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def listing(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))} if folder.exists() else None


def test_a_model_save_on_a_full_disk_leaves_no_folder_and_an_earlier_save_as_it_was(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "earlier")
    before = listing(tmp_path / "earlier")
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "earlier")
    assert listing(tmp_path / "earlier") == before
    assert os.listdir(tmp_path) == ["earlier"]


def test_a_processor_save_on_a_full_disk_leaves_no_folder(tiny, tmp_path, monkeypatch):
    _, processor = tiny
    monkeypatch.setattr(type(processor.image_processor), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        processor.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_saves_into_one_folder_keep_each_other_and_drop_stale_shards(tiny, tmp_path):
    model, processor = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    names = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md"} <= names
    assert not [name for name in names if name.startswith("model-") or name.endswith(".index.json")]
    assert os.listdir(tmp_path) == ["model"]
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")  # a link to an empty folder stays a link, its folder filled
    model.save_pretrained(tmp_path / "link")
    processor.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and {"config.json", "processor_config.json"} <= set(
        os.listdir(tmp_path / "real")
    )


# --------------------------------------------------------------------------------------------------------------------
# A kill while the final training output is moved into --output_dir
# --------------------------------------------------------------------------------------------------------------------


def test_a_kill_while_the_final_output_moves_in_leaves_it_whole_or_finishable(tmp_path):
    runs = {}
    for kill_signal in (signal.SIGKILL, signal.SIGTERM):  # both processes at once: each takes the imports' time
        output_dir, staging, files = staged_output(tmp_path / kill_signal.name)
        command = [sys.executable, "-c", KILL_AT_MOVE, str(staging), str(output_dir), str(int(kill_signal))]
        # from the temporary folder: a checkout as the working directory would shadow the installed package
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        runs[kill_signal] = output_dir, process
    for kill_signal, (output_dir, process) in runs.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == -kill_signal, stderr[-2000:]
        loose = set(os.listdir(output_dir)) - {"checkpoint-2"}
        if kill_signal == signal.SIGTERM:  # handled once the move is done
            assert loose == set(files)
        else:  # killed mid-move: the journal holds the rest, config.json among it, and the next start moves it in
            assert FINAL_OUTPUT_COMMITTING in loose and "config.json" not in loose
            assert finish_interrupted_commit(str(output_dir))
        assert files_of(output_dir) == files
        assert set(os.listdir(output_dir)) == set(files) | {"checkpoint-2"}
        assert not finish_interrupted_commit(str(output_dir))


# --------------------------------------------------------------------------------------------------------------------
# Permissions: those of a new file under the umask
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(folder):
    return {name: os.stat(folder / name).st_mode & 0o777 for name in os.listdir(folder)}


def test_saved_folders_get_the_modes_of_new_files_under_the_umask(tiny, tmp_path, umask):
    model, processor = tiny
    file_mode, folder_mode = default_modes()
    assert (file_mode, folder_mode) == (0o666 & ~umask, 0o777 & ~umask)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert set(modes(tmp_path / "model").values()) == {file_mode}
    assert os.stat(tmp_path / "model").st_mode & 0o777 == folder_mode
    with atomic_folder(tmp_path / "converted", ".convert-") as folder:
        save_file({"weight": torch.zeros(2)}, folder / "model.safetensors")
    assert modes(tmp_path / "converted") == {"model.safetensors": file_mode}
    assert os.stat(tmp_path / "converted").st_mode & 0o777 == folder_mode
    staging = tmp_path / "run" / ".final-output.partial"
    staging.mkdir(parents=True)
    save_file({"weight": torch.zeros(2)}, staging / "adapter_model.safetensors")
    commit_files(str(staging), str(tmp_path / "run"))
    assert modes(tmp_path / "run") == {"adapter_model.safetensors": file_mode}
