"""
A processor folder read whole or refused, and written whole or not at all:

- `check_folder` (before transformers reads a local folder): every JSON file readable (an error naming it,
  not a bare `JSONDecodeError`), `tokenizer_config.json` beside a `tokenizer.json`, the tile canvases of
  `processor_config.json` bounded (`check_pinpoints`) and equal to `config.json`'s, then `check_tokenizer_folder`;
- `check_loaded` (after): the marker ids the tokenizer gives equal to `config.json`'s, the chat template
  rendering a plain chat (an error naming its file), a warning when the folder has no chat template of its own;
- `template_errors_named`: a template that fails while rendering is a `ValueError` naming the template's file;
- `staged_save`: `save_pretrained` into a staging folder beside the target, then moved into place.
"""

import contextlib
import json
import os
import shutil
import tempfile
import warnings

import PIL.Image

from .tokenizer_setup_omnifusion import check_tokenizer_folder, rank_merges_by_sentencepiece_scores

JSON_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.json", "config.json",
)  # fmt: skip
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
PROBE_CHAT = [{"role": "user", "content": "Hello"}]


def check_pinpoints(pinpoints, where: str = "image_grid_pinpoints"):
    """
    `pinpoints` as a list of `[height, width]` lists, or `None`; a `ValueError` naming `where` unless every entry is
    two positive ints and no canvas holds more than `PIL.Image.MAX_IMAGE_PIXELS` pixels (the bound PIL puts on an
    image it decodes: a larger canvas is a memory bomb, allocated for every image).
    """
    if pinpoints is None:
        return None
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"{where} must be a non-empty list of [height, width] pixel sizes, got {pinpoints!r:.80}")
    for canvas in pinpoints:
        if not (
            isinstance(canvas, (list, tuple))
            and len(canvas) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in canvas)
        ):
            raise ValueError(f"{where} must be a list of [height, width] positive ints, got entry {canvas!r:.80}")
        limit = PIL.Image.MAX_IMAGE_PIXELS
        if limit is not None and canvas[0] * canvas[1] > limit:
            raise ValueError(
                f"{where}: the canvas {list(canvas)} holds {canvas[0] * canvas[1]} pixels, more than "
                f"PIL.Image.MAX_IMAGE_PIXELS ({limit}), the most an image canvas may hold"
            )
    return [list(canvas) for canvas in pinpoints]


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8-sig") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: not a readable JSON file ({type(error).__name__}: {error}); save the processor again or "
            "restore the file."
        ) from None


def _omnifusion_config(folder: str) -> dict | None:
    path = os.path.join(folder, "config.json")
    config = _read_json(path) if os.path.isfile(path) else None
    return config if isinstance(config, dict) and config.get("model_type") == "omnifusion" else None


def check_folder(folder) -> str | None:
    """
    Check a local processor folder before transformers reads it (see the module docstring); a Hub id is left to
    transformers. Returns what `check_tokenizer_folder` returns (the SentencePiece model the tokenizer is built
    from, or `None`).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return check_tokenizer_folder(folder)
    contents = {
        name: _read_json(os.path.join(folder, name))
        for name in JSON_FILES
        if os.path.isfile(os.path.join(folder, name))
    }
    if "tokenizer.json" in contents and "tokenizer_config.json" not in contents:
        raise ValueError(
            f"{os.path.join(folder, 'tokenizer_config.json')} is missing beside tokenizer.json: it names the "
            "tokenizer's class and its special tokens (pad, unknown, end of sequence); save the processor again or "
            "restore the file."
        )
    processor_config = contents.get("processor_config.json")
    if isinstance(processor_config, dict) and processor_config.get("image_grid_pinpoints") is not None:
        path = os.path.join(folder, "processor_config.json")
        pinpoints = check_pinpoints(processor_config["image_grid_pinpoints"], f"{path}: image_grid_pinpoints")
        config = _omnifusion_config(folder)
        if config is not None and config.get("image_grid_pinpoints") != pinpoints:
            raise ValueError(
                f"{path}: image_grid_pinpoints {pinpoints} differ from {os.path.join(folder, 'config.json')}'s "
                f"{config.get('image_grid_pinpoints')}: the processor must tile images as the model was built to read "
                "them"
            )
    return check_tokenizer_folder(folder)


def check_loaded(processor, folder, sentencepiece_model: str | None):
    """The processor loaded from `folder`, after the checks that need it (see the module docstring)."""
    if sentencepiece_model is not None:
        rank_merges_by_sentencepiece_scores(processor.tokenizer, sentencepiece_model)
    folder = os.path.normpath(os.fspath(folder))
    if not os.path.isdir(folder):
        return processor
    config = _omnifusion_config(folder) or {}
    for field, token_id in processor.special_token_ids.items():
        if field in config and config[field] != token_id:
            token = getattr(processor, field.removesuffix("_id"))
            raise ValueError(
                f"{os.path.join(folder, 'config.json')}: {field}={config[field]!r}, but the processor's tokenizer "
                f"gives {token!r} the id {token_id}: the model would read other tokens than the processor writes"
            )
    own = [name for name in CHAT_TEMPLATE_FILES if os.path.isfile(os.path.join(folder, name))]
    processor.chat_template_source = os.path.join(folder, own[0]) if own else "the built-in default chat template"
    if not own and "chat_template" not in (_read_processor_config(folder) or {}):
        warnings.warn(
            f"{folder} has no chat_template.jinja: the built-in OmniFusion prompt layout is used instead",
            stacklevel=3,
        )
    with template_errors_named(processor):
        processor.apply_chat_template(PROBE_CHAT, add_generation_prompt=True, tokenize=False)
    return processor


def _read_processor_config(folder: str):
    path = os.path.join(folder, "processor_config.json")
    return _read_json(path) if os.path.isfile(path) else None


@contextlib.contextmanager
def template_errors_named(processor):
    """A jinja error while rendering becomes a `ValueError` naming the chat template's file (where it was loaded
    from: `processor.chat_template_source`)."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as error:
        source = getattr(processor, "chat_template_source", "the processor's chat template")
        raise ValueError(f"{source}: the chat template failed ({type(error).__name__}: {error})") from error


@contextlib.contextmanager
def staged_save(target, push_kwargs: dict | None = None):
    """
    Yields an empty folder beside `target` for `save_pretrained` to write into; when the block ends normally, its
    files are moved into `target` (created if missing, same-named files replaced), `processor_config.json` last.
    When it raises (a full disk), `target` is as before and the staging folder is deleted. `push_kwargs`, the
    `save_pretrained` keyword arguments of a push to the Hub, get the repo named after `target` by default.
    """
    target = os.path.abspath(os.fspath(target))
    if push_kwargs is not None:
        push_kwargs.setdefault("repo_id", os.path.basename(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.processor-")
    folder = os.path.join(staging, "folder")
    os.mkdir(folder)  # the permissions of any new folder (not mkdtemp's 0700)
    try:
        yield folder
        if not os.path.islink(target) and (not os.path.isdir(target) or not os.listdir(target)):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(target)
            os.rename(folder, target)
            return
        names = sorted(os.listdir(folder), key=lambda name: name == "processor_config.json")
        for name in names:
            destination = os.path.join(target, name)
            if os.path.isdir(destination) and not os.path.islink(destination):
                shutil.rmtree(destination)
            os.replace(os.path.join(folder, name), destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "template_errors_named",
    "check_loaded",
    "check_pinpoints",
    "check_folder",
    "staged_save",
]
