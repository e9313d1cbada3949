"""
The training, conversion, saved-folder and save fault cases of `fault_injection.py`'s `training`, `converter`,
`folders` and `saves` classes: `training_cases(workdir)`, `converter_cases(workdir)`, `folder_cases(folder, workdir)`
and `save_cases(model, processor, workdir)` give `{name: case}` in that script's form,
`("refused", call, regexes the message must hold)` or `("equal", call, reference)`.

Each case builds its hostile input under `workdir` when called. The training cases need the `[train]` extra
(`modeling_omnifusion.training`); the kill/resume and full-disk cases are subprocess tests of the training tests.
"""

import codecs
import io
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from modeling_omnifusion.conversion.released_format import read_projection, read_special_embeddings
from modeling_omnifusion.testing.released import (
    declared_tensors_pickle,
    make_deep_module_chain_projection,
    make_reduce_call_projection,
    patch_zip_entry,
    save_special_embeddings,
    write_raw_torch_archive,
    write_zip_bomb_special_embeddings,
)
from modeling_omnifusion.testing.tiny import make_image, make_processor


def refused(call: Callable, path: Path) -> tuple:
    """A case that must raise a `ValueError` (or `TypeError`) naming `path`."""
    return ("refused", call, (re.escape(str(path)),))


def equal(call: Callable, reference: Callable) -> tuple:
    return ("equal", call, reference)


def converter_cases(workdir: str | Path) -> dict[str, tuple]:
    """Hostile archives within the allow-list: each a `ValueError` naming the file, in bounded memory."""
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)

    def special(name: str) -> Path:
        save_special_embeddings(root / f"{name}.pt", 16)
        return root / f"{name}.pt"

    def oversized_storage() -> Path:
        tensors = {key: (str(index), 8, (8,)) for index, key in enumerate(("USER", "BOT", "SOI", "EOI"))}
        tensors["USER"] = ("0", 2**20, (8,))
        records = {f"data/{index}": bytes(32) for index in range(1, 4)} | {"data/0": bytes(2**22)}
        return write_raw_torch_archive(root / "oversized.pt", declared_tensors_pickle(tensors), records)

    bomb = root / "bomb.pt"
    return {
        "zip bomb (2 MB inflating to 2 GiB)": refused(
            lambda: read_special_embeddings(write_zip_bomb_special_embeddings(bomb)), bomb
        ),
        "zip bomb, expected width given": refused(
            lambda: read_special_embeddings(write_zip_bomb_special_embeddings(bomb), hidden_size=64), bomb
        ),
        "pickle calling nn.Linear(20000, 20000)": refused(
            lambda: read_projection(make_reduce_call_projection(root / "linear.pt")), root / "linear.pt"
        ),
        "storage larger than its tensor": refused(
            lambda: read_special_embeddings(oversized_storage()), root / "oversized.pt"
        ),
        "3000-deep module chain": refused(
            lambda: read_projection(make_deep_module_chain_projection(root / "deep.pt")), root / "deep.pt"
        ),
        "bad CRC": refused(
            lambda: read_special_embeddings(patch_zip_entry(special("crc"), "crc/data/0", flip_data_byte=True)),
            root / "crc.pt",
        ),
        "unknown compression method": refused(
            lambda: read_special_embeddings(patch_zip_entry(special("method"), "method/data/0", method=99)),
            root / "method.pt",
        ),
    }


def _fake_checkpoint(folder: Path) -> Path:
    """A checkpoint folder with every file a resume needs, small."""
    folder.mkdir(parents=True)
    save_file({"weight": torch.zeros(4)}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4, "log_history": []}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"state": torch.zeros(2)}, folder / name)
    return folder


def training_cases(workdir: str | Path) -> dict[str, tuple]:
    """Damaged checkpoints, `--resume_from_checkpoint latest`, odd data files, images only decoding can catch."""
    from modeling_omnifusion.testing.training import jpeg_truncated, png_with_corrupt_pixel_data
    from modeling_omnifusion.training.arguments import OmniFusionTrainingArguments
    from modeling_omnifusion.training.checkpoints import resolve_resume_checkpoint
    from modeling_omnifusion.training.conversation import ConversationEncoder
    from modeling_omnifusion.training.data import read_records

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    logging.getLogger("omnifusion_checkpoints").setLevel(logging.ERROR)  # the skip warnings are expected here

    def damaged(case: str, name: str, damage: Callable[[bytes], bytes]) -> tuple:
        checkpoint = root / case / "checkpoint-2"

        def call():
            _fake_checkpoint(checkpoint)
            (checkpoint / name).write_bytes(damage((checkpoint / name).read_bytes()))
            args = OmniFusionTrainingArguments(output_dir=str(root / case), resume_from_checkpoint=str(checkpoint))
            return resolve_resume_checkpoint(args)

        return refused(call, checkpoint / name)

    def latest(value: str) -> tuple:
        output_dir = root / f"latest-{value}"

        def call():
            _fake_checkpoint(output_dir / "checkpoint-2")
            (output_dir / "checkpoint-4").mkdir()  # an incomplete checkpoint folder, as a kill mid-save leaves
            args = OmniFusionTrainingArguments(output_dir=str(output_dir), resume_from_checkpoint=value)
            return resolve_resume_checkpoint(args)

        return equal(call, lambda: str(output_dir / "checkpoint-2"))

    def data_file(name: str, content: bytes) -> Path:
        (root / name).write_bytes(content)
        return root / name

    record = json.dumps({"id": "r", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]})
    read = lambda path: read_records(str(path))["record"]  # noqa: E731

    def image_file(name: str, damage: Callable[[bytes], bytes], image_format: str) -> str:
        buffer = io.BytesIO()
        make_image(size=64).save(buffer, image_format)
        (root / name).write_bytes(damage(buffer.getvalue()))
        return name

    encoder = ConversationEncoder(make_processor(), str(root), 2048)

    def check_image(name: str, damage: Callable[[bytes], bytes], image_format: str) -> tuple:
        path = root / name
        return refused(lambda: encoder.read_image("r", image_file(name, damage, image_format), decode=False), path)

    return {
        "truncated trainer_state.json": damaged("state", "trainer_state.json", lambda data: data[:10]),
        "0-byte optimizer.pt": damaged("empty", "optimizer.pt", lambda data: b""),
        "truncated optimizer.pt": damaged("truncated", "optimizer.pt", lambda data: data[:-50]),
        "truncated model.safetensors": damaged("weights", "model.safetensors", lambda data: data[:-8]),
        "--resume_from_checkpoint latest": latest("latest"),
        "--resume_from_checkpoint True": latest("True"),
        "empty data file": refused(lambda: read(data_file("empty.json", b"")), root / "empty.json"),
        "empty JSON list": refused(lambda: read(data_file("empty-list.json", b"[]")), root / "empty-list.json"),
        "JSON with a UTF-8 BOM": equal(
            lambda: read(data_file("bom.json", codecs.BOM_UTF8 + f"[{record}]".encode())), lambda: [record]
        ),
        "JSONL with a UTF-8 BOM": equal(
            lambda: read(data_file("bom.jsonl", codecs.BOM_UTF8 + f"{record}\n".encode())), lambda: [record]
        ),
        "truncated JPEG": check_image("truncated.jpg", jpeg_truncated, "JPEG"),
        "PNG with corrupt pixel data": check_image("corrupt.png", png_with_corrupt_pixel_data, "PNG"),
    }


def folder_cases(folder: str | Path, workdir: str | Path) -> dict[str, tuple]:
    """
    Damaged and inconsistent copies of the saved `folder` (`modeling_omnifusion.testing.folder_faults`), each
    loaded with `trust_remote_code` in one Python process that has not imported this project (the folder's own code
    runs, as for a user of the folder), started when the first case is judged. Each must be refused naming the file
    and the field, or (no chat template file) load with a warning. A case's call raises the error that process saw
    (`ValueError`/`TypeError` as they were, anything else as a `RuntimeError` naming its type: a crash).
    """
    import json
    import os
    import subprocess
    import sys

    from modeling_omnifusion.testing.folder_faults import FOLDER_FAULTS, FRESH_RUNNER, case_list, make_fault_folders

    root = Path(workdir)
    folders = make_fault_folders(Path(folder), root)
    make_image(0).save(root / "image.png")
    (root / "cases.json").write_text(json.dumps(case_list(folders, Path(folder), root / "image.png")))
    (root / "runner.py").write_text(FRESH_RUNNER)
    results = {}

    def outcome(name: str):
        if not results:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules"), "PYTHONPATH": ""}
            command = [sys.executable, str(root / "runner.py"), str(root / "cases.json"), "120"]
            run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
            results.update((r["name"], r) for r in map(json.loads, run.stdout.splitlines()) if r)
        result = results.get(name) or {"outcome": "error", "type": "missing", "message": "the loading process died"}
        if result["outcome"] == "ok":
            return result["warnings"]
        if result["type"] in ("ValueError", "TypeError"):
            raise {"ValueError": ValueError, "TypeError": TypeError}[result["type"]](result["message"])
        raise RuntimeError(f"{result['type']}: {result['message']}")

    def warned(name: str, words) -> bool:
        return any(all(re.search(word, text) for word in words) for text in outcome(name))

    cases = {}
    for name in folders:
        expected = FOLDER_FAULTS[name][2]
        if expected[0] == "warns":
            cases[name] = equal(lambda name=name, words=expected[1]: warned(name, words), lambda: True)
        else:
            cases[name] = ("refused", lambda name=name: outcome(name), expected)
    return cases


def save_cases(model, processor, workdir: str | Path) -> dict[str, tuple]:
    """
    Saves that fail half-way (a write raising `ENOSPC`), a kill while a final training output is moved into
    `--output_dir`, and the modes of saved files: each must leave nothing half-written, and every saved file the mode
    a new file gets under the umask.
    """
    import errno
    import os
    import signal
    import subprocess
    import sys
    from unittest import mock

    from modeling_omnifusion.hub_omnifusion import atomic_folder, default_modes
    from modeling_omnifusion.testing.folder_faults import KILL_AT_MOVE, files_of, staged_output
    from modeling_omnifusion.training.checkpoints import commit_files, finish_interrupted_commit

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def failed_save(name: str, target: str, save: Callable[[Path], None]):
        def call():
            parent = root / name
            parent.mkdir()
            with mock.patch(target, full_disk):
                try:
                    save(parent / "folder")
                except OSError:
                    pass
            return sorted(os.listdir(parent))

        return equal(call, lambda: [])

    def kill_at_move():
        output_dir, staging, files = staged_output(root / "kill")
        command = [sys.executable, "-c", KILL_AT_MOVE, str(staging), str(output_dir), str(int(signal.SIGKILL))]
        subprocess.run(command, capture_output=True, timeout=300)
        finish_interrupted_commit(str(output_dir))  # what the next training start does
        return files_of(output_dir) == files and "checkpoint-2" in os.listdir(output_dir)

    def modes(save: Callable[[Path], None], name: str):
        def call():
            save(root / name)
            return {os.stat(path).st_mode & 0o777 for path in (root / name).iterdir()}

        return equal(call, lambda: {default_modes()[0]})

    def converted(path: Path):
        with atomic_folder(path, ".convert-") as folder:
            save_file({"weight": torch.zeros(2)}, folder / "model.safetensors")

    def trained(path: Path):
        (path / "staging").mkdir(parents=True)
        save_file({"weight": torch.zeros(2)}, path / "staging" / "adapter_model.safetensors")
        commit_files(str(path / "staging"), str(path))

    image_processor = type(processor.image_processor)
    return {
        "model.save_pretrained on a full disk": failed_save(
            "model-full", "transformers.modeling_utils.safe_save_file", model.save_pretrained
        ),
        "processor.save_pretrained on a full disk": failed_save(
            "processor-full",
            f"{image_processor.__module__}.{image_processor.__name__}.save_pretrained",
            processor.save_pretrained,
        ),  # fmt: skip
        "kill while the final output moves into --output_dir": equal(kill_at_move, lambda: True),
        "modes of a model + processor save": modes(
            lambda p: (model.save_pretrained(p), processor.save_pretrained(p)), "saved"
        ),
        "modes of a converted folder (atomic_folder)": modes(converted, "converted"),
        "modes of a final training output": modes(trained, "trained"),
    }
