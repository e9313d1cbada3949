"""The example scripts as a user meets them: `--help` of every script, path arguments checked (and named) before
anything loads, and training output folders that hold no pickle and name no local path."""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from transformers import AutoModelForImageTextToText

import modeling_omnifusion.training.trainer as trainer_module
from modeling_omnifusion.testing.training import (
    colour_records,
    save_language_model,
    save_vision_model,
    training_flags,
    write_dataset,
)
from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.arguments import DataArguments

ROOT = Path(__file__).resolve().parents[1]
MAIN_GUARD = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)


def example_scripts() -> list[str]:
    """Every program under examples/: a file with a `__main__` guard."""
    scripts = []
    for path in sorted((ROOT / "examples").rglob("*.py")):
        if MAIN_GUARD.search(path.read_text(encoding="utf-8")):
            scripts.append(str(path.relative_to(ROOT)))
    return scripts


def test_the_script_discovery_finds_the_known_scripts():
    assert {
        "examples/train_stage1_pretrain.py", "examples/train_stage2_sft.py", "examples/evaluate_visdial.py",
        "examples/quickstart.py", "examples/benchmarks/benchmark_inference.py",
        "examples/benchmarks/benchmark_visdial.py", "examples/benchmarks/fault_injection.py",
    } <= set(example_scripts())  # fmt: skip
    assert "examples/synthetic_shapes.py" not in example_scripts()  # the demos' data builder, not a program


COMMANDS = {
    "omnifusion-train-stage1": "--output_dir",
    "omnifusion-train-stage2": "--output_dir",
    "omnifusion-evaluate-visdial": "--visdial_json",
}


@pytest.mark.parametrize("command", COMMANDS)
def test_console_commands_print_their_help(command, tmp_path):
    """The installed commands, run outside the checkout: the same flags as the example scripts."""
    executable = shutil.which(command) or os.path.join(os.path.dirname(sys.executable), command)
    result = subprocess.run(
        [executable, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: {command}") and COMMANDS[command] in result.stdout


def test_stage1_console_command_trains_outside_the_checkout(tmp_path):
    """`omnifusion-train-stage1` from a folder with no checkout: a tiny local LM and encoder, two steps, a Hub
    folder that loads."""
    save_vision_model(tmp_path / "vision")
    save_language_model(tmp_path / "lm")
    write_dataset(tmp_path / "data", colour_records(4))
    executable = shutil.which("omnifusion-train-stage1") or os.path.join(
        os.path.dirname(sys.executable), "omnifusion-train-stage1"
    )
    flags = ["--vision_model_name_or_path", "vision", "--language_model_name_or_path", "lm"]
    flags += [str(flag) for flag in training_flags(Path("out"), Path("data/data.json"), max_steps=2)]
    result = subprocess.run(
        [executable, *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert model.config.model_type == "omnifusion" and model.config.text_config.model_type == "mistral"


def _help(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def help_runs():
    """`python <script> --help` of every script, each in its own process, a few at a time (most of each run is
    importing torch and transformers)."""
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        yield {script: pool.submit(_help, script) for script in example_scripts()}


@pytest.mark.parametrize("script", example_scripts())
def test_every_example_script_prints_its_help(script, help_runs):
    result = help_runs[script].result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:") and "--help" in result.stdout
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------- path arguments


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """A local vision folder laid out as in the Hub cache (so its Hub id is known), a plain local LM folder and data."""
    root = tmp_path_factory.mktemp("parts")
    vision = save_vision_model(root / "hub" / "models--acme--tiny-clip" / "snapshots" / "0123abcd")
    language = save_language_model(root / "my-local-language-model")
    data_path = write_dataset(root / "data", colour_records(4))
    return {"root": root, "vision": vision, "language": language, "data_path": data_path}


def _no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the path arguments were checked")

    monkeypatch.setattr(stage1, "build_model_from_pretrained_parts", fail)
    monkeypatch.setattr(stage2.OmniFusionForCausalLM, "from_pretrained", fail)


STAGE1_PATHS = ("vision_model_name_or_path", "language_model_name_or_path", "data_path", "image_folder")


@pytest.mark.parametrize("argument", STAGE1_PATHS)
@pytest.mark.parametrize("typo", ["relative", "absolute", "under_existing"])
def test_stage1_names_a_mistyped_local_path_before_loading(argument, typo, parts, tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    monkeypatch.chdir(parts["root"])
    bad = {
        "relative": "./my-local-languag-model",
        "absolute": str(tmp_path / "nowhere" / "model"),
        "under_existing": "data/no-such-thing",  # `data/` exists here, so this is a local path, not a Hub id
    }[typo]
    args = {
        "vision_model_name_or_path": str(parts["vision"]),
        "language_model_name_or_path": str(parts["language"]),
        "data_path": str(parts["data_path"]),
        "image_folder": str(parts["data_path"].parent),
        argument: bad,
    }
    flags = [item for key, value in args.items() for item in (f"--{key}", value)]
    with pytest.raises(FileNotFoundError, match=f"^--{argument} {re.escape(bad)}: no such"):
        stage1.train(flags + ["--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argument, bad", [("model_name_or_path", "stage1-outptu/"), ("data_path", "data/data.jsnl")])
def test_stage2_names_a_mistyped_local_path_before_loading(argument, bad, parts, tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    monkeypatch.chdir(parts["root"])
    args = {"model_name_or_path": str(parts["language"]), "data_path": str(parts["data_path"]), argument: bad}
    flags = [item for key, value in args.items() for item in (f"--{key}", value)]
    with pytest.raises(FileNotFoundError, match=f"^--{argument} {re.escape(bad)}: no such"):
        stage2.train(flags + ["--output_dir", str(tmp_path / "out"), "--report_to", "none"])


def test_data_path_that_is_a_folder_is_named(parts):
    data_args = DataArguments(data_path=str(parts["data_path"].parent))
    # a folder is read as WebDataset shards: one without any is named as such
    with pytest.raises(FileNotFoundError, match="--data_path .*: is a folder without any .tar shard in it"):
        trainer_module.check_path_arguments(data_args)


def test_a_hub_id_passes_the_path_check_and_offline_it_must_be_in_the_cache(parts, monkeypatch):
    data_args = DataArguments(data_path=str(parts["data_path"]))
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    trainer_module.check_path_arguments(data_args, language_model_name_or_path="mistralai/Mistral-7B-v0.1")
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    with pytest.raises(FileNotFoundError, match=r"--language_model_name_or_path mistralai/Mistral-7B-v0\.1: .*offline"):
        trainer_module.check_path_arguments(data_args, language_model_name_or_path="mistralai/Mistral-7B-v0.1")


# ---------------------------------------------------------------------------------------- saved folders


SAVED_SUFFIXES = {".json", ".safetensors", ".md", ".py", ".jinja"}


def _final_files(folder: Path) -> list[Path]:
    """Every file of a final output folder, subfolders included, except the Trainer's `checkpoint-*` folders."""
    return [
        path for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith("checkpoint-") for part in path.relative_to(folder).parts)
    ]  # fmt: skip


def _assert_safe_and_path_free(folder: Path, local_paths: list[str]):
    files = _final_files(folder)
    assert files
    unexpected = [str(path.relative_to(folder)) for path in files if path.suffix not in SAVED_SUFFIXES]
    assert not unexpected, f"{folder}: files other than safetensors/JSON/code/card: {unexpected}"
    for path in files:
        if path.suffix == ".safetensors":
            continue
        text = path.read_text(encoding="utf-8")
        leaked = [local for local in local_paths if local in text]
        assert not leaked, f"{path.relative_to(folder)} names local paths {leaked}"


def _front_matter(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory) -> dict[str, Path]:
    """Stage 1, then stage 2 with LoRA merged and LoRA adapter-only, each saving a checkpoint, from local folders."""
    root = tmp_path_factory.mktemp("trained")
    data = parts["data_path"]
    flags = dict(max_steps=2, save_strategy="steps", save_steps=2)
    stage1.train(
        ["--vision_model_name_or_path", str(parts["vision"]), "--language_model_name_or_path", str(parts["language"])]
        + training_flags(root / "stage1", data, **flags)
    )
    for name, extra in (("merged", []), ("adapter", ["--save_lora_adapter_only", "True"])):
        stage2.train(
            ["--model_name_or_path", str(root / "stage1"), "--lora_r", "4", *extra]
            + training_flags(root / name, data, **flags)
        )
    return {"stage1": root / "stage1", "merged": root / "merged", "adapter": root / "adapter", "root": root}


def _local_paths(parts, trained) -> list[str]:
    return [str(parts["root"]), str(trained["root"]), "my-local-language-model", "models--acme--tiny-clip"]


@pytest.mark.parametrize("run", ["stage1", "merged", "adapter"])
def test_training_output_holds_no_pickle_and_no_local_path(run, parts, trained):
    folder = trained[run]
    _assert_safe_and_path_free(folder, _local_paths(parts, trained))
    saved_args = folder / ("lora_adapter" if run == "merged" else ".") / "training_args.json"
    training_args = json.loads(saved_args.read_text())
    assert training_args["output_dir"] == run and training_args["max_steps"] == 2
    assert list(folder.glob("checkpoint-2/*.safetensors"))  # the checkpoint is still there, for resuming


@pytest.mark.parametrize("run", ["stage1", "merged"])
def test_saved_model_names_its_hub_base_and_none_for_a_local_folder(run, trained):
    """Saved model names the known hub id as its base and nothing for a local folder."""
    folder = trained[run]
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["_name_or_path"] == "acme/tiny-clip"  # from the Hub cache layout
    assert not config["text_config"].get("_name_or_path")  # a plain local folder: no Hub id is known
    assert _front_matter(folder)["base_model"] == ["acme/tiny-clip"]


def test_lora_adapter_names_no_local_base_model(trained):
    folder = trained["adapter"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    front_matter = _front_matter(folder)
    assert "base_model" not in front_matter
    assert not [tag for tag in front_matter.get("tags", []) if tag.startswith("base_model:")]


def test_checkpoint_of_the_pickle_free_trainer_resumes(parts, trained, tmp_path):
    """Resuming needs nothing that the checkpoint leaves out (no training_args.bin): it continues to step 3."""
    checkpoint = tmp_path / "out" / "checkpoint-2"
    shutil.copytree(trained["stage1"] / "checkpoint-2", checkpoint)
    assert (checkpoint / "training_args.json").is_file() and not (checkpoint / "training_args.bin").exists()
    trainer = stage1.train(
        ["--vision_model_name_or_path", str(parts["vision"]), "--language_model_name_or_path", str(parts["language"])]
        + training_flags(tmp_path / "out", parts["data_path"], max_steps=3)
        + ["--resume_from_checkpoint", str(checkpoint)]
    )
    assert trainer.state.global_step == 3
