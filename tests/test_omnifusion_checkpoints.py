"""Tests for modeling_omnifusion.training.checkpoints: whole-or-absent checkpoints and outputs, resuming, one run per
folder."""

import errno
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_omnifusion.testing.training import (
    colour_records,
    run_stage1_subprocess,
    save_language_model,
    save_vision_model,
    training_flags,
    write_dataset,
)
from modeling_omnifusion.training import stage1
from modeling_omnifusion.training.arguments import OmniFusionTrainingArguments
from modeling_omnifusion.training.checkpoints import check_output_dir, resolve_resume_checkpoint, save_final_output

LOGGER = "omnifusion_checkpoints"
RUN = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("parts")
    vision, language = save_vision_model(root / "vision"), save_language_model(root / "language")
    return ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), colour_records(8))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, parts, data_path) -> Path:
    """An uninterrupted 6-step stage-1 run with checkpoints at steps 2, 4 and 6."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    stage1.train(parts + training_flags(output_dir, data_path, **RUN))
    return output_dir


def args(output_dir: Path, **overrides) -> OmniFusionTrainingArguments:
    return OmniFusionTrainingArguments(output_dir=str(output_dir), report_to="none", **overrides)


def copy_checkpoint(finished_run: Path, step: int, output_dir: Path) -> Path:
    return Path(shutil.copytree(finished_run / f"checkpoint-{step}", output_dir / f"checkpoint-{step}"))


def hidden_entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


# --------------------------------------------------------------------------------------------------------------------
# Kills and full disks
# --------------------------------------------------------------------------------------------------------------------


def test_a_run_killed_mid_checkpoint_resumes_latest_to_the_uninterrupted_weights(
    parts, data_path, finished_run, tmp_path, caplog
):
    killed = run_stage1_subprocess(parts + training_flags(tmp_path, data_path, **RUN), kill_at_step=4)
    assert killed.returncode == -9, killed.stderr[-3000:]
    # The checkpoint being written when the process died never appears; the one before is whole.
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".")) == ["checkpoint-2"]
    assert hidden_entries(tmp_path) == [".checkpoint-4.partial"]
    # A checkpoint an older version left half-written (no trainer_state.json, an empty RNG state) is skipped.
    broken = copy_checkpoint(finished_run, 4, tmp_path)
    (broken / "trainer_state.json").unlink()
    (broken / "rng_state.pth").write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resumed = stage1.train(parts + training_flags(tmp_path, data_path, resume_from_checkpoint="latest", **RUN))
    assert f"Skipping the incomplete checkpoint {broken}: {broken}/rng_state.pth is empty (0 bytes)" in caplog.text
    assert resumed.resume_checkpoint == str(tmp_path / "checkpoint-2") and resumed.state.global_step == 6
    expected, actual = load_file(finished_run / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert hidden_entries(tmp_path) == []  # the stale staging folder was cleared by the new save of checkpoint-4


def test_a_full_disk_during_a_checkpoint_names_it_and_leaves_no_checkpoint(parts, data_path, tmp_path):
    result = run_stage1_subprocess(parts + training_flags(tmp_path, data_path, **RUN), file_size_limit=200_000)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    disk_full = f"OSError: [Errno {errno.EFBIG}] Could not save {tmp_path}/checkpoint-2: the disk is full"
    assert last_line.startswith(disk_full) and "File too large" in last_line
    assert f"the partial copy in {tmp_path}/.checkpoint-2.partial is removed" in last_line
    assert list(tmp_path.iterdir()) == []  # no checkpoint-2, no staging folder


def test_a_failed_final_save_leaves_the_earlier_output_as_it_was(finished_run, tmp_path):
    output_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}

    class Trainer:  # what save_final_output uses of a Trainer
        class args:
            should_save = True

        class accelerator:
            wait_for_everyone = staticmethod(lambda: None)

        @staticmethod
        def save_model(folder):
            Path(folder).mkdir()
            Path(folder, "model.safetensors").write_bytes(b"new weights, half written")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"Could not save {output_dir}: the disk is full .*No space left") as error:
        save_final_output(Trainer, str(output_dir))
    assert error.value.errno == errno.ENOSPC
    assert {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()} == before
    assert hidden_entries(output_dir) == []


# --------------------------------------------------------------------------------------------------------------------
# What --resume_from_checkpoint resumes from
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["latest", "True", "true", "LATEST"])
def test_resume_latest_or_true_in_any_case_is_the_newest_complete_checkpoint(finished_run, value):
    resumed = resolve_resume_checkpoint(args(finished_run, resume_from_checkpoint=value))
    assert resumed == str(finished_run / "checkpoint-6")


def test_resume_latest_without_a_checkpoint_starts_afresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_resume_checkpoint(args(tmp_path, resume_from_checkpoint="latest")) is None
    assert f"no complete checkpoint in {tmp_path}, starting afresh" in caplog.text


DAMAGE = {
    "truncated-trainer-state": ("trainer_state.json", lambda data: data[: len(data) // 2], "is not valid JSON"),
    "empty-optimizer": ("optimizer.pt", lambda data: b"", "is empty (0 bytes)"),
    "truncated-optimizer": ("optimizer.pt", lambda data: data[:-100], "is truncated or not a torch.save file"),
    "truncated-weights": ("model.safetensors", lambda data: data[:-100], "is truncated"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_file_is_an_error_naming_it_and_skipped_by_latest(finished_run, tmp_path, case, caplog):
    name, damage, message = DAMAGE[case]
    copy_checkpoint(finished_run, 4, tmp_path)
    checkpoint = copy_checkpoint(finished_run, 6, tmp_path)
    (checkpoint / name).write_bytes(damage((checkpoint / name).read_bytes()))

    with pytest.raises(ValueError, match=re.escape(f"Cannot resume from {checkpoint}: {checkpoint / name} {message}")):
        resolve_resume_checkpoint(args(tmp_path, resume_from_checkpoint=str(checkpoint)))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resumed = resolve_resume_checkpoint(args(tmp_path, resume_from_checkpoint="latest"))
        assert resumed == str(tmp_path / "checkpoint-4")
    assert f"Skipping the incomplete checkpoint {checkpoint}: {checkpoint / name} {message}" in caplog.text


def test_resuming_without_optimizer_or_rng_state_warns_naming_what_is_missing(finished_run, tmp_path, caplog):
    checkpoint = copy_checkpoint(finished_run, 4, tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):  # what --save_only_model leaves out
        (checkpoint / name).unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_resume_checkpoint(args(tmp_path, resume_from_checkpoint="latest")) == str(checkpoint)
    assert (
        f"Resuming from {checkpoint} cannot reproduce the uninterrupted run: it has no optimizer.pt, scheduler.pt, "
        "rng_state.pth (saved with --save_only_model, or lost), so the optimizer state, the learning-rate schedule, "
        "the random state (data order, dropout) start afresh."
    ) in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):  # a whole checkpoint resumes silently
        resolve_resume_checkpoint(args(finished_run, resume_from_checkpoint="latest"))
    assert "cannot reproduce" not in caplog.text


def test_resuming_a_finished_run_is_a_no_op(parts, data_path, finished_run, tmp_path, caplog):
    output_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    before = load_file(output_dir / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = stage1.train(parts + training_flags(output_dir, data_path, resume_from_checkpoint="latest", **RUN))
    ended = f"{output_dir}/checkpoint-6 is the end of this run (step 6, max_steps=6): nothing left to train"
    assert ended in caplog.text
    assert trainer.state.global_step == 6 and not (output_dir / "checkpoint-7").exists()
    after = load_file(output_dir / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before)


# --------------------------------------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------------------------------------


def test_a_folder_holding_another_run_is_refused_unless_overwritten(parts, data_path, finished_run, tmp_path):
    output_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    flags = parts + training_flags(output_dir, data_path, max_steps=1)
    with pytest.raises(FileExistsError, match=f"--output_dir {output_dir} already holds another run .*checkpoint-2"):
        stage1.train(flags)

    stage1.train(flags + ["--overwrite_output_dir"])
    assert not any(path.name.startswith("checkpoint-") for path in output_dir.iterdir())
    state = json.loads((output_dir / "config.json").read_text())
    assert state["model_type"] == "omnifusion"
    assert load_file(output_dir / "model.safetensors").keys() == load_file(finished_run / "model.safetensors").keys()


def test_resume_latest_without_a_complete_checkpoint_is_refused(tmp_path, caplog):
    """Resume latest in a used folder without a complete checkpoint is refused saying so."""
    (tmp_path / "checkpoint-4").mkdir()  # what a kill left under the old, non-atomic saving
    resume_latest = args(tmp_path, resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        checkpoint = resolve_resume_checkpoint(resume_latest)
    assert checkpoint is None and f"Skipping the incomplete checkpoint {tmp_path}/checkpoint-4: no model" in caplog.text
    with pytest.raises(FileExistsError, match="holds another run \\(checkpoint-4\\): it has no complete checkpoint"):
        check_output_dir(resume_latest, checkpoint)
