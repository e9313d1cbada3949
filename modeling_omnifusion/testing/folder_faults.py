"""
Damaged and inconsistent saved folders (edited copies of a good tiny folder), and a script that loads each of them
with `trust_remote_code` in a Python process that has not imported this project, for the folder-fault tests and
`examples/benchmarks/fault_injection.py`.

`FOLDER_FAULTS` maps a case name to `(edit, action, expected)`: `edit(folder)` damages a copy of the folder, `action`
is what the loading process does with it (`"model"`: `AutoModelForImageTextToText.from_pretrained`, `"processor"`:
`AutoProcessor.from_pretrained`, `"generate"`: the model from the copy and the processor from the good folder, then
`generate` on one image, `"nan-pixels"`: both from the good folder, `generate` with NaN `pixel_values`) and
`expected` the regexes that the `ValueError`/`TypeError` message must hold (the file and the field), or, for a case
that must load with a warning, `("warns", regexes)`.

`FRESH_RUNNER` is the loading script: `python script cases.json` prints one JSON line per case,
`{"name", "outcome": "ok" | "error" | "timeout", "type", "message", "warnings", "seconds"}`.
"""

import json
import os
import shutil
import textwrap
from pathlib import Path


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _config(change):
    return lambda folder: edit_json(folder / "config.json", change)


def _sub_config(section: str, field: str, value, *expected: str):
    """A `"model"` case that sets `config.json`'s `section.field` to `value`; the message must name `config.json` and
    match `expected`."""
    return _config(lambda c: c[section].update({field: value})), "model", (r"config\.json", *expected)


def _both_pinpoints(value):
    def edit(folder):
        edit_json(folder / "config.json", lambda c: c.update(image_grid_pinpoints=value))
        edit_json(folder / "processor_config.json", lambda c: c.update(image_grid_pinpoints=value))

    return edit


def _truncate(name: str):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


RAISING_TEMPLATE = "{{ messages[0]['content'].no_such_field.deeper }}"

FOLDER_FAULTS = {
    "text_config.num_hidden_layers: 1000000": _sub_config(
        "text_config", "num_hidden_layers", 1_000_000, r"text_config\.num_hidden_layers=1000000", r"model\.safetensors"
    ),
    "vision_config.num_hidden_layers: 100000": _sub_config(
        "vision_config", "num_hidden_layers", 100_000, r"vision_config\.num_hidden_layers=100000"
    ),
    "text_config.vocab_size: 10000000": _sub_config(
        "text_config", "vocab_size", 10_000_000, r"text_config\.vocab_size=10000000"
    ),
    "image_grid_pinpoints [[32000, 32000]] in config.json and processor_config.json (model)": (
        _both_pinpoints([[32000, 32000]]),
        "model",
        (r"config\.json", "image_grid_pinpoints", "positions"),
    ),
    "image_grid_pinpoints [[32000, 32000]] in config.json and processor_config.json (processor)": (
        _both_pinpoints([[32000, 32000]]),
        "processor",
        (r"processor_config\.json", "image_grid_pinpoints", "MAX_IMAGE_PIXELS"),
    ),
    "image_grid_pinpoints [[3200, 3200]] only in processor_config.json": (
        lambda folder: edit_json(
            folder / "processor_config.json", lambda c: c.update(image_grid_pinpoints=[[3200, 3200]])
        ),
        "processor",
        (r"processor_config\.json", "image_grid_pinpoints", r"config\.json"),
    ),
    "image_token_id: 5 in config.json (processor)": (
        _config(lambda c: c.update(image_token_id=5)),
        "processor",
        (r"config\.json", "image_token_id=5"),
    ),
    "image_token_id: 5 in config.json (generate)": (
        _config(lambda c: c.update(image_token_id=5)),
        "generate",
        ("input_ids", "marker ids", "image_token_id"),
    ),
    "num_image_tokens: 10 in config.json": (
        _config(lambda c: c.update(num_image_tokens=10)),
        "model",
        (r"config\.json", "num_image_tokens=10"),
    ),
    "vision_config.patch_size: 0": _sub_config("vision_config", "patch_size", 0, r"vision_config\.patch_size"),
    "text_config.num_key_value_heads: 0": _sub_config(
        "text_config", "num_key_value_heads", 0, r"text_config\.num_key_value_heads"
    ),
    "text_config.num_attention_heads: 3 (not a multiple of 2 key/value heads)": _sub_config(
        "text_config", "num_attention_heads", 3, r"text_config\.num_attention_heads=3"
    ),
    "chat_template.jinja that raises": (
        lambda folder: (folder / "chat_template.jinja").write_text(RAISING_TEMPLATE),
        "processor",
        (r"chat_template\.jinja", "UndefinedError"),
    ),
    "missing tokenizer_config.json": (_remove("tokenizer_config.json"), "processor", (r"tokenizer_config\.json",)),
    "truncated tokenizer.json": (_truncate("tokenizer.json"), "processor", (r"tokenizer\.json", "JSON")),
    "missing chat_template.jinja": (
        _remove("chat_template.jinja"),
        "processor",
        ("warns", (r"chat_template\.jinja", "built-in")),
    ),
    "NaN pixel_values handed to generate": (lambda folder: None, "nan-pixels", ("pixel_values", "NaN")),
}


def make_fault_folders(good: Path, root: Path, names=None) -> dict[str, Path]:
    """`{case name: damaged copy of the folder `good`}` under `root`, for the `FOLDER_FAULTS` cases in `names`."""
    folders = {}
    for index, name in enumerate(names or FOLDER_FAULTS):
        folder = Path(root) / f"case-{index:02d}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(good, folder)
        FOLDER_FAULTS[name][0](folder)
        folders[name] = folder
    return folders


def case_list(folders: dict[str, Path], good: Path, image: Path) -> list[dict]:
    """The runner's input: one entry per case (its folder, action, the good folder and an image file)."""
    return [
        {"name": name, "folder": str(folder), "action": FOLDER_FAULTS[name][1], "good": str(good), "image": str(image)}
        for name, folder in folders.items()
    ]


def judge(result: dict, expected) -> str:
    """`"ok"` when a case's runner result is what `expected` asks, else what it was (`"unclear error"`,
    `"silently wrong"`, `"crash"`, `"timeout"`)."""
    import re

    if result["outcome"] == "timeout":
        return "timeout"
    if expected[0] == "warns":
        found = any(all(re.search(w, text) for w in expected[1]) for text in result["warnings"])
        return "ok" if result["outcome"] == "ok" and found else "silently wrong"
    if result["outcome"] == "ok":
        return "silently wrong"
    if result["type"] not in ("ValueError", "TypeError"):
        return "crash"
    return "ok" if all(re.search(word, result["message"]) for word in expected) else "unclear error"


FRESH_RUNNER = textwrap.dedent(
    """
    import json, signal, sys, time, traceback, warnings
    for name in ("modeling_omnifusion", "processing", "conversion"):
        sys.modules[name] = None  # the project is neither installed nor importable here
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    TIMEOUT = int(sys.argv[2]) if len(sys.argv) > 2 else 60

    def load_model(folder):
        return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()

    def load_processor(folder):
        return AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    def generate(model, processor, image_file, nan=False):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=Image.open(image_file), text=prompt, return_tensors="pt")
        if nan:
            inputs["pixel_values"] = torch.full_like(inputs["pixel_values"], float("nan"))
        return model.generate(**inputs, max_new_tokens=2, do_sample=False)

    ACTIONS = {
        "model": lambda case: load_model(case["folder"]),
        "processor": lambda case: load_processor(case["folder"]),
        "generate": lambda case: generate(load_model(case["folder"]), load_processor(case["good"]), case["image"]),
        "nan-pixels": lambda case: generate(load_model(case["good"]), load_processor(case["good"]), case["image"], 1),
    }

    def on_alarm(signum, frame):
        raise TimeoutError(f"no result after {TIMEOUT} s")

    signal.signal(signal.SIGALRM, on_alarm)
    for case in json.load(open(sys.argv[1])):
        start = time.perf_counter()
        result = {"name": case["name"], "outcome": "ok", "type": None, "message": "", "warnings": []}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            signal.alarm(TIMEOUT)
            try:
                ACTIONS[case["action"]](case)
            except TimeoutError as error:
                result.update(outcome="timeout", type="TimeoutError", message=str(error))
            except BaseException as error:
                result.update(outcome="error", type=type(error).__name__, message=str(error)[:2000])
            finally:
                signal.alarm(0)
        result["warnings"] = [str(warning.message) for warning in caught]
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(result), flush=True)
    """
)


# `python -c KILL_AT_MOVE staging output_dir signal`: `commit_files(staging, output_dir)` with the process sending
# itself `signal` right after the second file is moved into `output_dir`.
KILL_AT_MOVE = textwrap.dedent(
    """
    import os, signal, sys
    from modeling_omnifusion.training import checkpoints

    staging, output_dir, kill_signal = sys.argv[1], sys.argv[2], int(sys.argv[3])
    replace, moved = os.replace, []

    def replace_then_kill(source, destination):
        replace(source, destination)
        moved.append(destination)
        if len(moved) == 2:
            os.kill(os.getpid(), kill_signal)

    checkpoints.os.replace = replace_then_kill
    checkpoints.commit_files(staging, output_dir)
    print("RETURNED")
    """
)


def staged_output(root: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """`(output dir, staged final output, {file: bytes})`: an output dir holding `checkpoint-2` and a staged final
    output of 4 files, `config.json` among them, for `KILL_AT_MOVE`."""
    output_dir, staging = root / "run", root / "run" / ".final-output.partial"
    (output_dir / "checkpoint-2").mkdir(parents=True)
    staging.mkdir()
    files = {"config.json": b"{}", "model.safetensors": b"w" * 100, "tokenizer.json": b"{}", "README.md": b"card"}
    for name, data in files.items():
        (staging / name).write_bytes(data)
    return output_dir, staging, files


def files_of(folder: Path) -> dict[str, bytes]:
    """`{name: bytes}` of the files directly in `folder`."""
    return {name: (folder / name).read_bytes() for name in os.listdir(folder) if (folder / name).is_file()}


__all__ = [
    "FOLDER_FAULTS",
    "FRESH_RUNNER",
    "KILL_AT_MOVE",
    "case_list",
    "edit_json",
    "files_of",
    "judge",
    "make_fault_folders",
    "staged_output",
]
