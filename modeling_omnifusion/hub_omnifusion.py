"""
Hub and folder helpers of OmniFusion, shared by the model, the converter and training:

- whether a `from_pretrained`-style name is a Hub repo id or a local path (`is_hub_repo_id`, `hub_model_id`,
  `missing_offline`);
- writing a folder whole or not at all: build it in a staging folder beside the target, then rename it into place
  (`atomic_folder`, built on `make_staging`, `replace_folder` and `clean_stale_staging`; `staging_path` for writers
  in several processes that must agree on one staging folder; `staged_save` for `save_pretrained`, which may add
  files to a folder that already holds others);
- the permissions of written files: those of any new file under the user's umask (`apply_default_permissions`:
  safetensors writes weight files with mode 0600);
- the model card of a saved folder (`build_model_card`).
"""

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Hub id or local path
# --------------------------------------------------------------------------------------------------------------------


def _reads_as_repo_id(name: str) -> bool:
    """`owner/name` or `name`, valid for the Hub, and not written like a path (`.`, `/`, `~` first, `\\`, `a/b/c`)."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_repo_id(name_or_path) -> bool:
    """
    Whether `name_or_path` reads as a Hub repo id (`owner/name` or `name`) and names nothing on this machine.

    `False` for anything that exists here, and for anything written like a local path: starting with `.`, `/` or
    `~`, holding a backslash or more than one `/`, or whose first folder exists here (`data/x` next to a `data/`).
    """
    name = os.fspath(name_or_path) if name_or_path else ""
    if not name or os.path.exists(name):
        return False
    if "/" in name and os.path.isdir(name.split("/", 1)[0]):
        return False
    return _reads_as_repo_id(name)


def hub_model_id(name_or_path) -> str | None:
    """
    The Hub repo id that `name_or_path` (a `from_pretrained` argument) stands for, or `None` when none is known: a
    Hub id (`is_hub_repo_id`) is returned as is, a folder inside the Hub cache (`.../models--owner--name/snapshots/
    <revision>/...`) as `owner/name`, and any other local path (existing or written like one) as `None`, so that no
    local path is ever written into a saved folder.
    """
    name = os.fspath(name_or_path) if name_or_path else ""
    if not name or not os.path.exists(name):
        return name if is_hub_repo_id(name) else None
    parts = os.path.normpath(os.path.abspath(name)).split(os.sep)
    cached = [part.removeprefix("models--") for part in parts if part.startswith("models--")]
    if not cached:
        return None
    name = cached[-1].replace("--", "/")
    return name if _reads_as_repo_id(name) else None


def missing_offline(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the Hub is off (`HF_HUB_OFFLINE=1`) and `filename` of Hub repo `repo_id` is not in the local cache."""
    if not huggingface_hub.is_offline_mode():
        return False
    return not isinstance(huggingface_hub.try_to_load_from_cache(repo_id, filename), str)


# --------------------------------------------------------------------------------------------------------------------
# Folders that appear whole or not at all
# --------------------------------------------------------------------------------------------------------------------

# A staging folder made by `make_staging` holds `STAGING_OWNER` (which process on which host writes it, for which
# target), the folder being written (`STAGING_FOLDER`) and, while `replace_folder` swaps, the target it replaces
# (`STAGING_REPLACED`).
STAGING_OWNER = "owner.json"
STAGING_FOLDER = "folder"
STAGING_REPLACED = "replaced"


def staging_path(target) -> Path:
    """The hidden sibling `.<name>.partial` of `target`: the staging path every process writing `target` agrees on."""
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.partial")


def replace_folder(new, target, aside=None) -> None:
    """
    Rename the complete folder `new` to `target`. An empty `target` folder is removed first; any other existing
    `target` is renamed to `aside` (defaults to `<new>.replaced`; an old one is deleted first), put back if the
    rename of `new` fails, and deleted once `new` is in place.
    """
    new, target = Path(new), Path(target)
    aside = Path(aside) if aside is not None else new.with_name(new.name + ".replaced")
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def make_staging(target, prefix: str) -> Path:
    """
    A new staging folder `<prefix>XXXX` beside `target` (its parent is created if needed), holding `STAGING_OWNER`
    and an empty `STAGING_FOLDER` to write into, made with the permissions of any new folder (not `mkdtemp`'s 0700).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "output_dir": str(target)}
    (staging / STAGING_OWNER).write_text(json.dumps(owner))
    (staging / STAGING_FOLDER).mkdir()
    return staging


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_staging(parent, prefix: str, writer: str = "a process") -> list[Path]:
    """
    Delete the staging folders `<prefix>*` in `parent` that a process on this host left when it was killed: their
    `STAGING_OWNER` names a process that is gone. A target it had moved aside (killed while swapping) and that has
    not been replaced since is put back first. A folder without a readable owner file is left alone. Each deletion
    is logged (at INFO), naming the folder and the `writer` that left it. Returns the folders deleted.
    """
    removed = []
    for staging in Path(parent).glob(prefix + "*"):
        try:
            owner = json.loads((staging / STAGING_OWNER).read_text())
            pid, host, target = int(owner["pid"]), owner["host"], Path(owner["output_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not made by `make_staging`, or still being created
        if host != socket.gethostname() or _process_alive(pid):
            continue
        if (staging / STAGING_REPLACED).is_dir() and not target.exists():
            os.rename(staging / STAGING_REPLACED, target)
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
        logger.info(f"Removed {staging}, left by {writer} (process {pid}) that did not finish")
    return removed


def default_modes() -> tuple[int, int]:
    """`(file mode, folder mode)` a new file and a new folder get under this process's umask (0644/0755 for 022)."""
    umask = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as status:
            umask = next((int(line.split()[1], 8) for line in status if line.startswith("Umask:")), None)
    if umask is None:  # no procfs: read it by setting it (and back)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask, 0o777 & ~umask


def apply_default_permissions(folder) -> None:
    """Give every file and folder under `folder` (itself included) the mode a new one gets under the umask, as a
    plain `open`/`mkdir` would: another user of a shared model folder can read the weights as the other files."""
    file_mode, folder_mode = default_modes()
    os.chmod(folder, folder_mode)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), folder_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


# `save_pretrained` weight files; a new save into a folder deletes an earlier save's that it does not rewrite.
SAVED_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _move_into(staged: Path, target: Path, last: tuple[str, ...]) -> None:
    """Move every entry of `staged` into the existing folder `target` (replacing same-named ones), `last` at the end;
    earlier weight files the new save does not have are deleted first."""
    names = sorted(os.listdir(staged), key=lambda name: name in last)
    if any(SAVED_WEIGHTS.match(name) for name in names):
        for name in os.listdir(target):
            if SAVED_WEIGHTS.match(name) and name not in names:
                os.remove(target / name)
    for name in names:
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(staged / name, destination)


@contextlib.contextmanager
def staged_save(target, last: tuple[str, ...] = ("config.json",)) -> Iterator[Path]:
    """
    A `save_pretrained` that leaves nothing half-written:

        with staged_save(save_directory) as folder:
            super().save_pretrained(folder)

    Yields an empty folder in a staging folder beside `target` (`make_staging`, after deleting the ones a killed
    save left: `clean_stale_staging`). When the block ends normally its files get the default permissions
    (`apply_default_permissions`) and go into place: renamed to `target` when that does not exist or is an empty
    folder, else (a folder with files, or a link to a folder) moved into it one by one (`last` at the end, earlier
    weight files the new save does not have deleted). When the block raises (a full disk, a failed write), `target`
    is as before. The staging folder is deleted either way.
    """
    target = Path(target).absolute()
    prefix = f".{target.name}.saving-"
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target.parent, prefix, writer="a save_pretrained")
    staging = make_staging(target, prefix)
    try:
        yield staging / STAGING_FOLDER
        apply_default_permissions(staging / STAGING_FOLDER)
        if target.is_symlink() or (target.is_dir() and any(target.iterdir())):  # a link is kept: its folder filled
            _move_into(staging / STAGING_FOLDER, target, last)
        else:
            replace_folder(staging / STAGING_FOLDER, target, aside=staging / STAGING_REPLACED)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target, prefix: str, writer: str = "a process") -> Iterator[Path]:
    """
    Write a folder that appears at `target` only when complete:

        with atomic_folder(output_dir, ".omnifusion-convert-") as folder:
            model.save_pretrained(folder)

    Yields an empty folder inside a new staging folder beside `target` (`make_staging`), after deleting the stale
    staging folders with the same `prefix` there (`clean_stale_staging`, which logs them as left by `writer`). When
    the block ends normally the folder replaces `target` (`replace_folder`, the old `target` waiting in the staging
    folder until then); when it raises, `target` is untouched. The staging folder is deleted either way.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target.parent, prefix, writer)
    staging = make_staging(target, prefix)
    try:
        yield staging / STAGING_FOLDER
        apply_default_permissions(staging / STAGING_FOLDER)
        replace_folder(staging / STAGING_FOLDER, target, aside=staging / STAGING_REPLACED)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------

WIDGET_IMAGE_URL = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/bee.jpg"


def build_model_card(config) -> ModelCard:
    """A Hub model card for an `OmniFusionConfig`: front matter for the image-text-to-text widget and a usage snippet.

    `base_model` lists the Hub ids of the sub-models when they are known (`hub_model_id`), and is left out otherwise.
    """
    audio = getattr(config, "audio_config", None)
    sub_configs = [sub for sub in (config.text_config, *config.vision_configs, audio) if sub is not None]
    base_models = list(dict.fromkeys(filter(None, (hub_model_id(sub._name_or_path) for sub in sub_configs))))
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        base_model=base_models or None,
        tags=["omnifusion", "multimodal", "vision-language", "image-text-to-text", "conversational", "custom_code"]
        + (["audio", "speech"] if audio is not None else []),
        widget=[
            {"text": "What is shown in this image?", "src": WIDGET_IMAGE_URL},
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "url": WIDGET_IMAGE_URL},
                            {"type": "text", "text": "Describe the image."},
                        ],
                    }
                ]
            },
        ],
    )
    encoders = " + ".join(f"{vision.model_type} ({vision.image_size}px)" for vision in config.vision_configs)
    layers = "all hidden layers" if config.adapter_type == "mix_sum" else f"hidden layer {config.vision_feature_layer}"
    tiles = f", tiled over {config.image_grid_pinpoints} plus a global view" if config.image_grid_pinpoints else ""
    sound, lm = sound_note(config), config.text_config.model_type
    content = f"""---
{data.to_yaml()}
---

# OmniFusion

An OmniFusion vision-language model: frozen vision encoder(s) {encoders} ({config.num_image_tokens} image tokens
per view from {layers}{tiles}), a `{config.adapter_type}`
adapter, learned image-start/end and user/assistant markers, and a {lm} language model.{sound}

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("path/or/repo", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/or/repo", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "url": "{WIDGET_IMAGE_URL}"}},
                                          {{"type": "text", "text": "What is shown in this image?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=50)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""
    return ModelCard(content)


def sound_note(config) -> str:
    """The card's paragraph on sound, empty for a model without it."""
    audio = getattr(config, "audio_config", None)
    if audio is None:
        return ""
    return f"""

It also hears: a frozen {audio.model_type} encoder, {config.audio_pool_stride}x average pooling of its frames and an
`{config.audio_adapter_type}` audio adapter, the clip's positions between learned audio-start/end markers. Clips go in
chat messages as `{{"type": "audio", "audio": <waveform> | "path": <file> | "url": <url>}}` items (up to the encoder's
30 s window each)."""


__all__ = [
    "apply_default_permissions",
    "atomic_folder",
    "build_model_card",
    "clean_stale_staging",
    "default_modes",
    "hub_model_id",
    "is_hub_repo_id",
    "make_staging",
    "missing_offline",
    "replace_folder",
    "staged_save",
    "staging_path",
]
