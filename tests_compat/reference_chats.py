"""
The chats a reference folder holds, named by file, and how a reader turns them into processor inputs: shared by
`make_reference.py`, which writes and records them, and `test_saved_folder_on_old_transformers.py`, which replays
them in a venv without this package (so only numpy here). Images are named by `.png` file; clips and videos by `.npy`
file (a clip's samples, a video's `[frames, H, W, 3]` uint8 frames), loaded as arrays: no audio or video decoder is
needed where they are read.
"""

from pathlib import Path

import numpy as np

# modality -> (the stem of its `.npy` files and of its chat names, the question asked about it)
MEDIA = {"audio": ("clip", "What is said?"), "video": ("video", "What moves?")}


def media_chats(modality: str) -> dict[str, list[dict]]:
    """One clip or video alone, and an image with two of them (`one_clip`, `image_and_two_clips`; `one_video`,
    `image_and_two_videos`)."""
    stem, question = MEDIA[modality]

    def ask(*names, image=False):
        content = [{"type": "image", "path": "image_0.png"}] if image else []
        content += [{"type": modality, modality: name} for name in names]
        return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]

    return {
        f"one_{stem}": ask(f"{stem}_0.npy"),
        f"image_and_two_{stem}s": ask(f"{stem}_1.npy", f"{stem}_0.npy", image=True),
    }


def resolve(messages: list[dict], folder: Path) -> list[dict]:
    """The messages with each image path made absolute under `folder`."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                dict(item, path=str(folder / item["path"])) if item["type"] == "image" else item for item in content
            ]
        out.append({**message, "content": content})
    return out


def resolve_media(messages: list[dict], folder: Path) -> list[dict]:
    """`resolve`, and each clip or video loaded from its `.npy` file under `folder`."""
    out = resolve(messages, folder)
    for message in out:
        if not isinstance(message["content"], str):
            message["content"] = [
                dict(item, **{item["type"]: np.load(folder / item[item["type"]])}) if item["type"] in MEDIA else item
                for item in message["content"]
            ]
    return out
