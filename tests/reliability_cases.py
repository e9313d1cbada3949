"""
The training and conversion fault cases of issue 10 (sections 1 and 5) as counts, for `examples/fault_injection.py`:

    from reliability_cases import training_and_conversion_fault_counts
    counts = training_and_conversion_fault_counts(Path(workdir))  # {"class": {"cases": n, "handled": k, "failed": [...]}}

Each case builds its hostile input under `workdir` and checks the outcome the README's "Reliability" section promises
(an error of the right type naming the file, a skip, or a clean read). The kill/resume and full-disk cases are
subprocess tests in `tests/test_omnifusion_checkpoints.py`; these are the ones that run in-process in seconds.
"""

import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from omnifusion_fixtures import make_image, make_processor
from released_fixtures import (
    declared_tensors_pickle,
    make_deep_module_chain_projection,
    make_reduce_call_projection,
    patch_zip_entry,
    save_special_embeddings,
    write_raw_torch_archive,
    write_zip_bomb_special_embeddings,
)
from training_fixtures import jpeg_truncated, png_with_corrupt_pixel_data  # also puts examples/ on the path

from modeling_omnifusion.conversion.released_format import read_projection, read_special_embeddings
from omnifusion_checkpoints import resolve_resume_checkpoint
from omnifusion_training import ConversationEncoder, OmniFusionTrainingArguments, read_records


def _expect_error(error_type: type, must_name: Path, action: Callable) -> str | None:
    """None if `action` raises `error_type` naming `must_name`, else what happened instead."""
    try:
        action()
    except error_type as error:
        return None if str(must_name) in str(error) else f"{type(error).__name__} not naming {must_name}: {error}"
    except Exception as error:  # noqa: BLE001 - the point is to report anything else
        return f"{type(error).__name__}: {error}"
    return "no error"


def _reader_cases(root: Path) -> dict[str, Callable[[], str | None]]:
    def special(name: str) -> Path:
        path = root / name
        save_special_embeddings(path, 16)
        return path

    def oversized_storage() -> Path:
        tensors = {key: (str(index), 8, (8,)) for index, key in enumerate(("USER", "BOT", "SOI", "EOI"))}
        tensors["USER"] = ("0", 2**20, (8,))
        records = {f"data/{index}": bytes(32) for index in range(1, 4)} | {"data/0": bytes(2**22)}
        return write_raw_torch_archive(root / "oversized.pt", declared_tensors_pickle(tensors), records)

    bomb = write_zip_bomb_special_embeddings(root / "bomb.pt")
    return {
        "zip bomb (2 MB -> 2 GiB)": lambda: _expect_error(ValueError, bomb, lambda: read_special_embeddings(bomb)),
        "zip bomb with the expected width": lambda: _expect_error(
            ValueError, bomb, lambda: read_special_embeddings(bomb, hidden_size=64)
        ),
        "pickle calling nn.Linear(20000, 20000)": lambda: _expect_error(
            ValueError, root / "linear.pt", lambda: read_projection(make_reduce_call_projection(root / "linear.pt"))
        ),
        "storage larger than its tensor": lambda: _expect_error(
            ValueError, root / "oversized.pt", lambda: read_special_embeddings(oversized_storage())
        ),
        "3000-deep module chain": lambda: _expect_error(
            ValueError, root / "deep.pt", lambda: read_projection(make_deep_module_chain_projection(root / "deep.pt"))
        ),
        "bad CRC": lambda: _expect_error(
            ValueError,
            root / "crc.pt",
            lambda: read_special_embeddings(patch_zip_entry(special("crc.pt"), "crc/data/0", flip_data_byte=True)),
        ),
        "unknown compression method": lambda: _expect_error(
            ValueError,
            root / "method.pt",
            lambda: read_special_embeddings(patch_zip_entry(special("method.pt"), "method/data/0", method=99)),
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


def _checkpoint_cases(root: Path) -> dict[str, Callable[[], str | None]]:
    def damaged(case: str, name: str, damage: Callable[[bytes], bytes]) -> str | None:
        output_dir = root / case
        checkpoint = _fake_checkpoint(output_dir / "checkpoint-2")
        (checkpoint / name).write_bytes(damage((checkpoint / name).read_bytes()))
        args = OmniFusionTrainingArguments(output_dir=str(output_dir), resume_from_checkpoint=str(checkpoint))
        return _expect_error(ValueError, checkpoint / name, lambda: resolve_resume_checkpoint(args))

    def latest(value: str) -> str | None:
        output_dir = root / f"latest-{value}"
        _fake_checkpoint(output_dir / "checkpoint-2")
        (output_dir / "checkpoint-4").mkdir()  # what a kill left under the old, non-atomic saving
        found = resolve_resume_checkpoint(OmniFusionTrainingArguments(output_dir=str(output_dir),
                                                                      resume_from_checkpoint=value))
        return None if found == str(output_dir / "checkpoint-2") else f"resumed from {found}"

    return {
        "truncated trainer_state.json": lambda: damaged("state", "trainer_state.json", lambda data: data[:10]),
        "0-byte optimizer.pt": lambda: damaged("empty", "optimizer.pt", lambda data: b""),
        "truncated optimizer.pt": lambda: damaged("truncated", "optimizer.pt", lambda data: data[:-50]),
        "truncated model.safetensors": lambda: damaged("weights", "model.safetensors", lambda data: data[:-8]),
        "--resume_from_checkpoint latest": lambda: latest("latest"),
        "--resume_from_checkpoint True": lambda: latest("True"),
    }


def _data_cases(root: Path) -> dict[str, Callable[[], str | None]]:
    def data_file(name: str, content: bytes) -> Path:
        path = root / name
        path.write_bytes(content)
        return path

    def reads(path: Path) -> str | None:
        try:
            return None if len(read_records(str(path))) == 1 else "wrong number of records"
        except Exception as error:  # noqa: BLE001
            return f"{type(error).__name__}: {error}"

    record = json.dumps({"id": "r", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]})
    empty = data_file("empty.json", b"")
    empty_list = data_file("empty-list.json", b"[]")
    return {
        "empty data file": lambda: _expect_error(ValueError, empty, lambda: read_records(str(empty))),
        "empty JSON list": lambda: _expect_error(ValueError, empty_list, lambda: read_records(str(empty_list))),
        "JSON with a UTF-8 BOM": lambda: reads(data_file("bom.json", b"\xef\xbb\xbf[" + record.encode() + b"]")),
        "JSONL with a UTF-8 BOM": lambda: reads(data_file("bom.jsonl", b"\xef\xbb\xbf" + record.encode() + b"\n")),
    }


def _image_cases(root: Path) -> dict[str, Callable[[], str | None]]:
    encoder = ConversationEncoder(make_processor(), str(root), 2048)

    def image_file(name: str, damage: Callable[[bytes], bytes], image_format: str) -> str:
        buffer = io.BytesIO()
        make_image(size=64).save(buffer, image_format)
        (root / name).write_bytes(damage(buffer.getvalue()))
        return name

    def checked(name: str) -> str | None:
        return _expect_error(ValueError, root / name, lambda: encoder.read_image("r", name, decode=False))

    return {
        "truncated JPEG": lambda: checked(image_file("truncated.jpg", jpeg_truncated, "JPEG")),
        "PNG with corrupt pixel data": lambda: checked(image_file("corrupt.png", png_with_corrupt_pixel_data, "PNG")),
    }


def training_and_conversion_fault_counts(workdir: Path) -> dict[str, dict]:
    """Runs every case; per class: how many cases, how many ended as promised, and what the others did."""
    classes = {
        "converter reader: hostile archives": _reader_cases,
        "training: damaged checkpoints and resume": _checkpoint_cases,
        "training: data files": _data_cases,
        "training: images the up-front check must catch": _image_cases,
    }
    counts = {}
    logging.getLogger("omnifusion_checkpoints").setLevel(logging.ERROR)
    for name, make_cases in classes.items():
        root = Path(workdir) / name.split(":")[0].replace(" ", "-") / name.split(": ")[1].replace(" ", "-")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        cases = make_cases(root)
        failed = [f"{case}: {problem}" for case, run in cases.items() if (problem := run()) is not None]
        counts[name] = {"cases": len(cases), "handled": len(cases) - len(failed), "failed": failed}
    return counts
