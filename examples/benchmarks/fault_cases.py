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
import shutil
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
        subprocess.run(
            command, capture_output=True, timeout=300, cwd=root
        )  # a checkout as cwd would shadow the package
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


# The real VisDial v1.0 val sample shipped with the repository's tests (5 dialogs, with their dense annotations).
VISDIAL_SAMPLE = Path(__file__).resolve().parents[2] / "tests/data/visdial/visdial_1.0_val_sample5.json"
VISDIAL_SAMPLE_DENSE = VISDIAL_SAMPLE.with_name("visdial_1.0_val_dense_annotations_sample5.json")


def refused_writing_nothing(call: Callable, output: Path, *words: str) -> tuple:
    """A case that must fail with a `ValueError`/`TypeError` holding `words` (regexes) and leave `output` absent: a
    call that fails after writing it returns instead (counted as silently wrong)."""

    def run():
        try:
            call()
        except Exception:
            if output.exists():
                return f"failed, but wrote {output}"
            raise
        return f"ran to the end (output {'written' if output.exists() else 'absent'})"

    return ("refused", run, words)


def data_cases(workdir: str | Path) -> dict[str, tuple]:
    """Training data lost or wasted without a word: truncated and empty WebDataset shards, runs that would train no
    step, records the conversation format refuses, `--model_max_length` beyond the LM's positions, stage 2 from a
    plain LM folder. The runs are tiny stage-1/stage-2 runs on CPU (a few seconds each)."""
    import tarfile

    from modeling_omnifusion.testing.training import (
        colour_records,
        save_language_model,
        save_vision_model,
        training_flags,
        write_dataset,
        write_shards,
    )
    from modeling_omnifusion.training import stage1, stage2
    from modeling_omnifusion.training.arguments import DataArguments, OmniFusionTrainingArguments
    from modeling_omnifusion.training.conversation import record_to_messages
    from modeling_omnifusion.training.data import load_streaming_dataset, load_training_dataset

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("omnifusion_training", "omnifusion_training.data", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the skip warnings are expected here
    parts = {}

    def vision_and_language() -> list[str]:
        if not parts:
            parts["vision"] = save_vision_model(root / "parts" / "vision")
            parts["language"] = save_language_model(root / "parts" / "language")
        return [
            "--vision_model_name_or_path",
            str(parts["vision"]),
            "--language_model_name_or_path",
            str(parts["language"]),
        ]

    def shards(name: str, per_shard: int = 8, broken: bool = False, cut_after: int | None = None) -> Path:
        def fields(shard: int, index: int, key: str) -> dict[str, bytes]:
            buffer = io.BytesIO()
            make_image(index).save(buffer, format="PNG")
            return {"png": b"not a png" if broken else buffer.getvalue(), "txt": f"It is number {index}.".encode()}

        folder = root / name
        (shard,) = write_shards(folder, 1, per_shard, fields)
        if cut_after is not None:  # a partial download: cut right after the members of the first samples
            with tarfile.open(shard) as archive:
                members = [m for m in archive.getmembers() if int(m.name.split(".")[0][-4:]) < cut_after]
            last = max(members, key=lambda member: member.offset)
            shard.write_bytes(shard.read_bytes()[: last.offset_data + -(-last.size // 512) * 512])
        return folder

    def empty_shard(name: str) -> Path:
        (root / name).mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / name / "00000.tar", "w"):
            pass
        return root / name

    def stream(folder: Path, **data_kwargs) -> list:
        data_args = DataArguments(data_path=str(folder), **data_kwargs)
        training_args = OmniFusionTrainingArguments(output_dir=str(root / "unused"), max_steps=5, report_to="none")
        return list(load_streaming_dataset(data_args, make_processor(end_assistant_turns_with_eos=True), training_args))

    def warned_about_truncation() -> bool:
        folder = shards("truncated-skip", cut_after=5)
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())
        messages = []
        logger = logging.getLogger("omnifusion_training.data")
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        try:
            stream(folder, skip_bad_records=True)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(logging.ERROR)
        return any("truncated" in message and "00000.tar" in message for message in messages)

    def stage1_run(name: str, data_path: Path, **flags) -> tuple:
        output = root / name / "out"
        call = lambda: stage1.train(vision_and_language() + training_flags(output, data_path, **flags))  # noqa: E731
        return call, output

    def no_step(name: str, data_path: Path) -> tuple:
        call, output = stage1_run(name, data_path, max_steps=2, max_bad_samples=10)
        return refused_writing_nothing(call, output, "No training step", re.escape(str(data_path)))

    def records_file(name: str, bad: dict) -> Path:
        return write_dataset(root / name, colour_records(2) + [bad])

    def load_records(path: Path, **data_kwargs):
        data_args = DataArguments(data_path=str(path), **data_kwargs)
        return load_training_dataset(data_args, make_processor(end_assistant_turns_with_eos=True))

    answer_first = {
        "id": "answer-first",
        "image": "images/0.png",
        "conversations": [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "<image>\nWhat colour?"}],
    }
    image_without_image = {
        "id": "image-without-image",
        "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
    }
    audio_answer_first = dict(answer_first, audio="clips/0.wav", image=None)
    audio_answer_first["conversations"] = [
        {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "<audio>\nWhat is said?"},
    ]
    long_record = {
        "id": "long",
        "conversations": [{"from": "human", "value": "Tell me. " * 300}, {"from": "gpt", "value": "Red."}],
    }

    def too_long(name: str, packing: bool) -> tuple:
        path = write_dataset(root / name / "data", colour_records(2) + [long_record])
        call, output = stage1_run(name, path, max_steps=2, model_max_length=100000, packing=packing or None)
        return refused_writing_nothing(call, output, "--model_max_length 100000", "max_position_embeddings")

    def plain_lm_to_stage2() -> tuple:
        output = root / "plain-lm" / "out"
        data_path = write_dataset(root / "plain-lm" / "data", colour_records(2))

        def call():
            vision_and_language()
            return stage2.train(["--model_name_or_path", str(parts["language"])] + training_flags(output, data_path))

        return refused_writing_nothing(call, output, "'mistral' model", "OmniFusion folder", "stage 1")

    truncated = root / "truncated" / "00000.tar"
    return {
        "truncated WebDataset shard": (
            "refused",
            lambda: stream(shards("truncated", cut_after=5)),
            (re.escape(str(truncated)), "truncated", r"\d+ samples were read"),
        ),
        "truncated shard with --skip_bad_records: warned, counted": equal(warned_about_truncation, lambda: True),
        "valid empty shard: a run of 0 steps": no_step("empty", empty_shard("empty-shard")),
        "every sample bad under --max_bad_samples": no_step("all-bad", shards("all-bad", per_shard=3, broken=True)),
        "record opening with a gpt turn": (
            "refused",
            lambda: load_records(records_file("answer-first", answer_first)),
            ("Record answer-first", "'gpt' turn"),
        ),
        "<image> in a record without an image": (
            "refused",
            lambda: load_records(records_file("no-image", image_without_image)),
            ("Record image-without-image", "no 'image' field"),
        ),
        "record opening with a gpt turn, --skip_bad_records: counted": equal(
            lambda: len(load_records(root / "answer-first" / "data.json", skip_bad_records=True)), lambda: 2
        ),
        "audio record opening with a gpt turn": (
            "refused",
            lambda: record_to_messages("speech-0", json.dumps({**audio_answer_first, "image": None}), True),
            ("Record speech-0", "'gpt' turn"),
        ),
        "--model_max_length beyond the LM's positions": too_long("too-long", packing=False),
        "--model_max_length beyond the LM's positions, --packing": too_long("too-long-packed", packing=True),
        "stage 2 from a plain LM folder": plain_lm_to_stage2(),
    }


def visdial_cases(workdir: str | Path, model_folder: str | Path) -> dict[str, tuple]:
    """Malformed Visual Dialog files given to the evaluation command (each must be refused up front, naming the
    dialog, round and field, with nothing written), and a real 10-round dialog on a 256-position LM (the history
    policy must keep every round within the positions)."""
    from modeling_omnifusion.evaluation import visdial as evaluate_visdial

    root = Path(workdir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    sample = json.loads(VISDIAL_SAMPLE.read_text())
    sample["data"]["dialogs"] = sample["data"]["dialogs"][:1]
    dialog = sample["data"]["dialogs"][0]
    make_image(1, size=48).save(images / f"VisualDialog_{sample['split']}_{dialog['image_id']:012d}.jpg")

    def evaluate(name: str, visdial, dense=None, raw: str | None = None, model=model_folder) -> tuple[Callable, Path]:
        path, output = root / f"{name}.json", root / name / "results.json"
        path.write_text(raw if raw is not None else json.dumps(visdial))
        args = ["--model", str(model), "--visdial_json", str(path), "--images_dir", str(images)]
        args += ["--output", str(output), "--batch_size", "100", "--device", "cpu", "--dtype", "float32"]
        if dense is not None:
            (root / f"{name}-dense.json").write_text(dense)
            args += ["--dense_json", str(root / f"{name}-dense.json")]
        return (lambda: evaluate_visdial.evaluate(evaluate_visdial.HfArgumentParser(
            evaluate_visdial.VisDialArguments).parse_args_into_dataclasses(args=args)[0])), output  # fmt: skip

    def broken(name: str, change: Callable[[dict], None], *words: str) -> tuple:
        visdial = json.loads(json.dumps(sample))
        change(visdial)
        call, output = evaluate(name, visdial)
        return refused_writing_nothing(call, output, re.escape(name), *words)

    def first_round(change: Callable[[dict], None]) -> Callable[[dict], None]:
        return lambda visdial: change(visdial["data"]["dialogs"][0]["dialog"][0])

    def whole_dialog() -> int:
        """The dialog on the model with 256 positions, as the embedded demo's LM had: its later rounds do not fit
        with their whole history."""
        short = root / "lm-with-256-positions"
        shutil.copytree(model_folder, short, dirs_exist_ok=True)
        config = json.loads((short / "config.json").read_text())
        config["text_config"]["max_position_embeddings"] = 256
        (short / "config.json").write_text(json.dumps(config))
        call, output = evaluate("ten-rounds", sample, model=short)
        return call()["settings"]["num_rounds"]

    truncated_call, truncated_output = evaluate("truncated", None, raw=json.dumps(sample)[:3000])
    dense = json.loads(VISDIAL_SAMPLE_DENSE.read_text())[:1]
    dense_call, dense_output = evaluate("dense-truncated", sample, dense=json.dumps(dense)[:50])
    dialog_words = ("dialog 0", f"image_id {dialog['image_id']}")
    return {
        "truncated JSON file": refused_writing_nothing(
            truncated_call, truncated_output, "truncated", "not a valid JSON"
        ),
        "truncated dense annotations": refused_writing_nothing(dense_call, dense_output, "dense-truncated", "JSON"),
        "no data": broken("no-data", lambda v: v.pop("data"), "'data'"),
        "a dialog without dialog": broken("no-dialog", lambda v: v["data"]["dialogs"][0].pop("dialog"), *dialog_words),
        "dialog: []": broken("empty-dialog", lambda v: v["data"]["dialogs"][0].update(dialog=[]), *dialog_words),
        "a round without answer_options": broken(
            "no-options", first_round(lambda r: r.pop("answer_options")), *dialog_words, "round 1", "answer_options"
        ),
        "answer_options: []": broken(
            "empty-options", first_round(lambda r: r.update(answer_options=[])), "round 1", "answer_options"
        ),
        "gt_index: 100": broken("gt-100", first_round(lambda r: r.update(gt_index=100)), "round 1", "gt_index"),
        "question: -1": broken(
            "question-negative", first_round(lambda r: r.update(question=-1)), "round 1", "question"
        ),
        "a real 10-round dialog on a 256-position LM": equal(whole_dialog, lambda: 10),
    }
