"""
Checkpoints and final outputs that are whole or absent, and resuming from them (used by `trainer.py`).

- `AtomicCheckpointTrainer` writes each `checkpoint-N` into a hidden sibling (`.checkpoint-N.partial/`) and renames
  it into place once every process has written its part, so a kill or a full disk never leaves a `checkpoint-N`
  that cannot be resumed. `save_final_output` stages the final model the same way and moves its files into
  `--output_dir` with `config.json` (`adapter_config.json` for an adapter) last: a folder that has one is complete.
- `check_output_dir` refuses to mix two runs in one `--output_dir`; `--overwrite_output_dir` clears the earlier run.
- `resolve_resume_checkpoint` turns `--resume_from_checkpoint latest` (or `true`, any case) into the newest complete
  checkpoint, checks the files of any checkpoint before the Trainer reads them (an error naming the damaged file) and
  warns, naming them, when state files needed to reproduce the uninterrupted run are missing (`--save_only_model`).
"""

import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import signal
import struct
import threading
import zipfile
from collections.abc import Callable

from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from modeling_omnifusion.hub_omnifusion import apply_default_permissions, replace_folder, staging_path

logger = logging.getLogger("omnifusion_checkpoints")  # the name the log lines show

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Staging folders: checkpoints' and the final output's (`.<name>.partial`), `save_pretrained`'s (`.<name>.saving-*`).
STAGING_PATTERN = re.compile(r"^\..+(\.partial|\.saving-.+)$")
FINAL_OUTPUT_STAGING = ".final-output.partial"
FINAL_OUTPUT_COMMITTING = ".final-output.committing"  # a final output being moved into --output_dir (the journal)
# Written last into a final output: a folder holding one of them is complete.
COMMIT_FILES = ("config.json", "adapter_config.json")
WEIGHT_FILES = re.compile(r"^(model|pytorch_model|adapter_model)([-.].*)?\.(safetensors|bin)(\.index\.json)?$")
# What an earlier run left at the top of an output folder, cleared by --overwrite_output_dir (the rest is replaced).
EARLIER_RUN_FILES = re.compile(
    rf"{WEIGHT_FILES.pattern}|^(config|adapter_config|generation_config|trainer_state|training_args)\.(json|bin)$"
)
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
RESUME_LATEST = {"latest", "true"}
WEIGHTS = "model weights (model.safetensors)"  # how `checkpoint_report` names missing weights

# --------------------------------------------------------------------------------------------------------------------
# Writing whole or nothing
# --------------------------------------------------------------------------------------------------------------------


def _error_number(error: BaseException, folder: str) -> int:
    """The errno behind a failed save of `folder`; torch's and safetensors' writers drop it, so the disk is asked."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
        found = re.search(r"os error (\d+)", str(cause))
        if found:
            return int(found.group(1))
        cause = cause.__cause__ or cause.__context__
    if os.path.isdir(folder):
        if shutil.disk_usage(folder).free < 2**20:
            return errno.ENOSPC
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        sizes = [os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names]
        if limit != resource.RLIM_INFINITY and max(sizes, default=0) >= limit:
            return errno.EFBIG
    return errno.EIO


def write_error(target: str, staging: str, error: BaseException) -> OSError:
    """An `OSError` naming `target`, the folder being written (in `staging`) when `error` stopped the save."""
    code = _error_number(error, staging)
    reason = "the disk is full (or the file size limit is reached)" if code in DISK_FULL_ERRNOS else "the write failed"
    return OSError(
        code,
        f"Could not save {target}: {reason} ({type(error).__name__}: {error}). Nothing was half-written: the partial "
        f"copy in {staging} is removed and {target} is as before.",
    )


def commit_files(staging: str, target: str):
    """
    Moves every entry of `staging` into the folder `target` (created if needed), `COMMIT_FILES` last and removed from
    `target` first, and deletes weight files of an earlier save that the new one does not have (other shards). Every
    file gets the mode a new file gets under the umask (`apply_default_permissions`).

    The move is journalled: `staging` is first renamed to `target/FINAL_OUTPUT_COMMITTING`, so a process killed
    while moving leaves the rest there, and `finish_interrupted_commit` (run when training starts) moves it in.
    SIGINT and SIGTERM wait until the move is done.
    """
    os.makedirs(target, exist_ok=True)
    apply_default_permissions(staging)
    committing = os.path.join(target, FINAL_OUTPUT_COMMITTING)
    shutil.rmtree(committing, ignore_errors=True)
    with signals_deferred():
        os.rename(staging, committing)
        _move_committed(committing, target)


def _move_committed(committing: str, target: str):
    names = os.listdir(committing)
    commits = [name for name in COMMIT_FILES if name in names]
    for name in os.listdir(target):
        if name in COMMIT_FILES or (WEIGHT_FILES.match(name) and name not in names):
            os.remove(os.path.join(target, name))
    for name in [name for name in names if name not in commits] + commits:
        destination = os.path.join(target, name)
        if os.path.isdir(destination) and not os.path.islink(destination):
            shutil.rmtree(destination)
        os.replace(os.path.join(committing, name), destination)
    os.rmdir(committing)


def finish_interrupted_commit(output_dir: str) -> bool:
    """
    Finish moving a final output into `output_dir` that a killed process left half-moved (`commit_files`'s journal,
    `FINAL_OUTPUT_COMMITTING`): the files it still holds are moved in, `config.json` last, and a warning names the
    folder. Returns whether there was one.
    """
    committing = os.path.join(output_dir, FINAL_OUTPUT_COMMITTING)
    if not os.path.isdir(committing):
        return False
    with signals_deferred():
        _move_committed(committing, output_dir)
    logger.warning(
        "Finished moving the final output into %s: the process writing it was killed while moving it.", output_dir
    )
    return True


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT and SIGTERM that arrive while the block runs are sent again, to the previous handlers, when it ends
    (in the main thread, where Python runs signal handlers; elsewhere the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number)) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            os.kill(os.getpid(), number)


class AtomicCheckpointTrainer(Trainer):
    """A `Trainer` whose checkpoints appear only when complete (see the module docstring)."""

    resume_checkpoint: str | None = None  # what `train_or_resume` resumes from (`resolve_resume_checkpoint`)
    _checkpoint_staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        target = os.path.join(run_dir, name)
        staging = str(staging_path(target))
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)  # into staging/checkpoint-N
        except Exception as error:
            if self.args.should_save:
                failure = write_error(target, staging, error)
                shutil.rmtree(staging, ignore_errors=True)
                raise failure from error
            raise
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._point_best_checkpoint_into(run_dir, os.path.join(staging, name))
            apply_default_permissions(os.path.join(staging, name))
            replace_folder(os.path.join(staging, name), target)
            os.rmdir(staging)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _point_best_checkpoint_into(self, run_dir: str, staged: str):
        """The best checkpoint as it will be named once renamed (the Trainer looked for it in the staging folder)."""
        best = self.state.best_global_step
        if not best:
            return
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
        if best == self.state.global_step or os.path.isdir(best_dir):
            self.state.best_model_checkpoint = best_dir
            if os.path.isfile(os.path.join(staged, TRAINER_STATE)):
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE))


def save_final_output(
    trainer: Trainer, output_dir: str, save: Callable[[str], None] | None = None, on_every_process: bool = True
):
    """
    Writes the final output into a staging folder inside `output_dir`, then moves its files into `output_dir`
    (`commit_files`). `save(folder)` defaults to `trainer.save_model`, which runs on every process (to gather ZeRO-3
    or FSDP shards); `on_every_process=False` for a `save` that only this process runs.
    """
    save = save or trainer.save_model
    staging = os.path.join(output_dir, FINAL_OUTPUT_STAGING)
    writer = trainer.args.should_save or not on_every_process
    barrier = trainer.accelerator.wait_for_everyone if on_every_process else lambda: None
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    try:
        save(staging)
    except Exception as error:
        if writer:
            failure = write_error(output_dir, staging, error)
            shutil.rmtree(staging, ignore_errors=True)
            raise failure from error
        raise
    barrier()
    if writer:
        commit_files(staging, output_dir)
    barrier()


# --------------------------------------------------------------------------------------------------------------------
# One run per folder
# --------------------------------------------------------------------------------------------------------------------


def _is_inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)


def check_output_dir(args: TrainingArguments, resume_checkpoint: str | None):
    """
    Finishes moving a final output that a killed run left half-moved (`finish_interrupted_commit`), then refuses a
    non-empty `--output_dir` unless this run resumes from a checkpoint inside it; with
    `--overwrite_output_dir`, first deletes the earlier run's checkpoints and model files (the main process, before
    the others look).
    """
    output_dir = args.output_dir
    if args.should_save:
        finish_interrupted_commit(output_dir)
    if resume_checkpoint is not None and _is_inside(resume_checkpoint, output_dir):
        return
    # Every process enters (one barrier each) whatever it finds: a process that returned on a missing folder while
    # another found it (made by the first one's Trainer meanwhile) left them in different collectives, hung for good.
    with args.main_process_first(desc="clearing the earlier run in --output_dir"):
        if not os.path.isdir(output_dir):
            return
        entries = sorted(name for name in os.listdir(output_dir) if not STAGING_PATTERN.match(name))
        if not entries:
            return
        if not getattr(args, "overwrite_output_dir", False):
            resume = (
                "it has no complete checkpoint to resume"
                if args.resume_from_checkpoint
                else ("resume it with --resume_from_checkpoint latest")
            )
            raise FileExistsError(
                f"--output_dir {output_dir} already holds another run ({', '.join(entries[:6])}"
                f"{', ...' if len(entries) > 6 else ''}): {resume}, choose another --output_dir, or pass "
                "--overwrite_output_dir to replace it."
            )
        if args.should_save:
            for name in os.listdir(output_dir):
                path = os.path.join(output_dir, name)
                if os.path.isdir(path) and (
                    CHECKPOINT_PATTERN.match(name) or STAGING_PATTERN.match(name) or name == "lora_adapter"
                ):
                    shutil.rmtree(path)
                elif os.path.isfile(path) and EARLIER_RUN_FILES.match(name):
                    os.remove(path)
            logger.warning("--overwrite_output_dir: deleted the earlier run's checkpoints and model in %s.", output_dir)


# --------------------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------------------


def _safetensors_problem(path: str) -> str | None:
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return "truncated (no safetensors header)"
        (header_size,) = struct.unpack("<Q", head)
        size = os.path.getsize(path)
        if header_size > size - 8:
            return "truncated (the safetensors header is cut)"
        try:
            header = json.loads(file.read(header_size))
        except ValueError:
            return "not a safetensors file (unreadable header)"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + header_size + max(ends, default=0) > size:
        return f"truncated ({size} bytes, the header needs {8 + header_size + max(ends)})"
    return None


def file_problem(path: str) -> str | None:
    """Why a checkpoint file cannot be read (cheap checks: size, JSON, safetensors header, torch zip directory)."""
    if os.path.getsize(path) == 0:
        return "empty (0 bytes)"
    name = os.path.basename(path)
    if name.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as file:
                json.load(file)
        except (ValueError, UnicodeDecodeError) as error:
            return f"not valid JSON ({error})"
    elif name.endswith(".safetensors"):
        return _safetensors_problem(path)
    elif name.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(path):
        return "truncated or not a torch.save file (no zip directory at its end)"
    return None


def checkpoint_report(folder: str, world_size: int = 1) -> tuple[list[str], list[str]]:
    """`(damaged, missing)`: its files that cannot be read (with why), and the state files it lacks."""
    names = os.listdir(folder)
    damaged = []
    for name in sorted(names):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            problem = file_problem(path)
            if problem:
                damaged.append(f"{path} is {problem}")
    missing = []
    if not any(WEIGHT_FILES.match(name) or name.startswith(("pytorch_model_fsdp", "global_step")) for name in names):
        missing.append(WEIGHTS)
    if TRAINER_STATE not in names:
        missing.append(TRAINER_STATE)
    if not any(name.startswith(("optimizer", "global_step")) for name in names):
        missing.append("optimizer.pt")
    if "scheduler.pt" not in names and not any(name.startswith("global_step") for name in names):
        missing.append("scheduler.pt")
    rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    missing += [name for name in rng if name not in names]
    return damaged, missing


def _step(name: str) -> int:
    return int(CHECKPOINT_PATTERN.match(name).group(1))


def latest_complete_checkpoint(output_dir: str, world_size: int = 1) -> str | None:
    """The newest `checkpoint-N` with weights and a readable `trainer_state.json`, warning about newer broken ones."""
    if not os.path.isdir(output_dir):
        return None
    names = [name for name in os.listdir(output_dir) if CHECKPOINT_PATTERN.match(name)]
    for name in sorted(names, key=_step, reverse=True):
        folder = os.path.join(output_dir, name)
        damaged, missing = checkpoint_report(folder, world_size)
        incomplete = damaged + [f"no {item}" for item in missing if item in (WEIGHTS, TRAINER_STATE)]
        if not incomplete:
            return folder
        logger.warning("Skipping the incomplete checkpoint %s: %s.", folder, "; ".join(incomplete))
    return None


def resolve_resume_checkpoint(args: TrainingArguments) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names (see the module docstring), checked; None to start afresh."""
    value = args.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false", "none"):
        return None
    if str(value).strip().lower() in RESUME_LATEST:
        checkpoint = latest_complete_checkpoint(args.output_dir, args.world_size)
        if checkpoint is None:
            logger.warning(
                "--resume_from_checkpoint %s: no complete checkpoint in %s, starting afresh.", value, args.output_dir
            )
            return None
    else:
        checkpoint = str(value)
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")
    damaged, missing = checkpoint_report(checkpoint, args.world_size)
    if damaged or WEIGHTS in missing:
        problems = damaged + ([f"it has no {WEIGHTS}"] if WEIGHTS in missing else [])
        raise ValueError(
            f"Cannot resume from {checkpoint}: {'; '.join(problems)}. Resume from an earlier checkpoint "
            "(--resume_from_checkpoint latest skips damaged ones)."
        )
    if missing:
        lost = [
            meaning for prefix, meaning in STATE_MEANING.items() if any(item.startswith(prefix) for item in missing)
        ]
        logger.warning(
            "Resuming from %s cannot reproduce the uninterrupted run: it has no %s (saved with --save_only_model, or "
            "lost), so %s start afresh.",
            checkpoint,
            ", ".join(missing),
            ", ".join(lost),
        )
    return checkpoint


# What each missing state file means for a resumed run.
STATE_MEANING = {
    "trainer_state": "the step count",
    "optimizer": "the optimizer state",
    "scheduler": "the learning-rate schedule",
    "rng_state": "the random state (data order, dropout)",
}


def finished_at(checkpoint: str, args: TrainingArguments) -> int | None:
    """The checkpoint's step if it is the end of the run `args` describe, else None."""
    path = os.path.join(checkpoint, TRAINER_STATE)
    if not os.path.isfile(path):
        return None
    state = TrainerState.load_from_json(path)
    if args.max_steps > 0:
        done = state.global_step >= args.max_steps
    else:
        done = state.global_step >= state.max_steps and args.num_train_epochs <= (state.num_train_epochs or 0)
    return state.global_step if done else None


def train_or_resume(trainer: AtomicCheckpointTrainer):
    """`trainer.train` from `trainer.resume_checkpoint`; a run already finished there is loaded, not stepped again."""
    checkpoint = trainer.resume_checkpoint
    step = finished_at(checkpoint, trainer.args) if checkpoint else None
    if step is None:
        trainer.train(resume_from_checkpoint=checkpoint)
        return
    logger.warning(
        "%s is the end of this run (step %d, max_steps=%s): nothing left to train; the final output is written "
        "from it.",
        checkpoint,
        step,
        trainer.args.max_steps if trainer.args.max_steps > 0 else f"{trainer.args.num_train_epochs} epochs",
    )
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE))
