"""
The processor's input checks: every image becomes 8-bit RGB, every text and chat message is checked, and the
`<image>` placeholders are counted against the images, or a clear `ValueError`/`TypeError` names what is wrong.
"""

import base64
import io
import itertools
import os
import re
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps

CHAT_ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image")

LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def check_string(value, name: str) -> str:
    """`value` if it is a string that can be encoded (no lone surrogate), else a `TypeError`/`ValueError`."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}: {value!r:.80}")
    surrogate = LONE_SURROGATE.search(value)
    if surrogate:
        raise ValueError(
            f"{name} holds a lone surrogate {surrogate.group()!r} at character {surrogate.start()}, which is not "
            "valid Unicode text (decode the input with errors='replace' or fix its source)."
        )
    return value


def check_num_image_tokens(value):
    """`value` (image positions per image) if it is a positive int or `None`, else a clear error."""
    if value is None:
        return None
    expected = "OmniFusionProcessor num_image_tokens must be a positive int (OmniFusionConfig.num_image_tokens)"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{expected}, got {type(value).__name__}: {value!r:.80}")
    if value < 1:
        raise ValueError(f"{expected}, got {value}")
    return int(value)


def _open_image_source(source: str, name: str) -> PIL.Image.Image:
    """A local path, an http(s) URL or base64 data as a PIL image in its own mode (transformers' loader makes RGB)."""
    try:
        if source.startswith(("http://", "https://")):
            from huggingface_hub.utils import get_session

            data = io.BytesIO(get_session().get(source, follow_redirects=True).content)
        elif os.path.isfile(source):
            data = source
        else:
            data = io.BytesIO(base64.b64decode(source.split(",", 1)[-1] if source.startswith("data:") else source))
        image = PIL.Image.open(data)
        image.load()
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(
            f"{name}: cannot read {source!r:.100} as an image (a path to an image file, an http(s) URL or base64 "
            f"data was expected): {type(error).__name__}: {error}"
        ) from None
    return PIL.ImageOps.exif_transpose(image)


def _check_image_size(height: int, width: int, name: str):
    """A `ValueError` for an empty image, or one beyond PIL's decompression-bomb limit (what `Image.open` refuses)."""
    if height < 1 or width < 1:
        raise ValueError(f"{name} is empty: {height}x{width} pixels (height x width).")
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise ValueError(
            f"{name} has {height}x{width} = {height * width} pixels, over twice PIL.Image.MAX_IMAGE_PIXELS "
            f"({limit}): refused as a decompression bomb, as PIL refuses such a file."
        )
    if limit is not None and height * width > limit:
        warnings.warn(
            f"{name} has {height * width} pixels, over PIL.Image.MAX_IMAGE_PIXELS ({limit}); PIL warns the same for "
            "such a file.",
            PIL.Image.DecompressionBombWarning,
        )


def _as_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """
    Pixel values as 8 bits. uint8 and bool as they are; uint16 (16-bit) scaled by 255/65535; other integer types
    must hold 0..255; floats must be finite and in [0, 1] (already rescaled: transformers' `do_rescale` convention,
    scaled by 255) or else in [0, 255]. Anything else is a `ValueError`: never a silently different picture.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return np.round(array.astype(np.float32) * (255 / 65535)).astype(np.uint8)
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{name} is a {array.dtype} image with values {low}..{high}: integer pixels must be 0..255 unless the "
                "image is uint16 (16-bit, PIL mode 'I;16'); convert it to uint8 or uint16 first."
            )
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{name} holds NaN or infinite pixel values.")
        array = array.astype(np.float32)
        low, high = float(array.min()), float(array.max())
        if low >= 0 and high <= 1:
            return np.round(array * 255).astype(np.uint8)
        if low >= 0 and high <= 255:
            return np.round(array).astype(np.uint8)
        raise ValueError(
            f"{name} is a float image with values in [{low:.4g}, {high:.4g}]: float pixels must be in [0, 1] "
            "(or 0..255); a normalised image cannot be read back."
        )
    raise TypeError(f"{name} has pixel type {array.dtype}; expected uint8, uint16, another integer, float or bool.")


def _array_to_rgb(array: np.ndarray, name: str, channels_first_preferred: bool) -> PIL.Image.Image:
    """An HxW, HxWxC or CxHxW array (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA) as an 8-bit RGB image."""
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        if first and (channels_first_preferred or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(
                f"{name} has shape {tuple(array.shape)}: expected HxW, HxWxC or CxHxW with C in 1..4 channels."
            )
    elif array.ndim != 2:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}: expected HxW, HxWxC or CxHxW (a 4-D array is a batch)."
        )
    _check_image_size(array.shape[0], array.shape[1], name)
    array = _as_uint8(array, name)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] in (1, 2):
        array = array[..., :1].repeat(3, axis=-1)
    return PIL.Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")


def _pil_to_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """A PIL image as 8-bit RGB; high bit depth ('I;16', 'I') and float ('F') modes go through `_as_uint8`."""
    _check_image_size(image.height, image.width, name)
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        array = np.asarray(image)
        if image.mode in SIXTEEN_BIT_MODES:
            array = array.astype(np.uint16)
        return _array_to_rgb(array, name, channels_first_preferred=False)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"{name}: cannot convert a PIL image of mode {image.mode!r} to RGB ({error}).") from None


def _to_rgb_image(image, name: str) -> list[PIL.Image.Image]:
    """
    One input image as 8-bit RGB PIL images (a list: a 4-D array or tensor is a batch). Accepts PIL images,
    numpy arrays and torch tensors (HxW, HxWxC, CxHxW; torch is channels-first), paths, URLs and base64 strings.
    """
    if isinstance(image, str):
        image = _open_image_source(image, name)
    if isinstance(image, PIL.Image.Image):
        return [_pil_to_rgb(image, name)]
    channels_first_preferred = False
    if type(image).__module__.startswith("torch"):
        if not hasattr(image, "detach"):
            raise TypeError(f"{name} is a {type(image).__name__}; expected an image tensor.")
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
        channels_first_preferred = True
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{name} is a {type(image).__name__}; expected a PIL image, a numpy array, a torch tensor, a path or a URL."
        )
    if image.ndim == 4:
        return [_array_to_rgb(item, f"{name}[{index}]", channels_first_preferred) for index, item in enumerate(image)]
    return [_array_to_rgb(image, name, channels_first_preferred)]


def check_images(images):
    """
    Every image of `images` (one image, a list, or a list per sample) as 8-bit RGB, in the same nesting; `None`
    when there is none. Each problem is a `ValueError`/`TypeError` naming the image by its position.
    """
    if images is None:
        return None
    positions = itertools.count()
    found = []

    def convert(item) -> list:
        if not isinstance(item, (list, tuple)):
            converted = _to_rgb_image(item, f"Image {next(positions)}")
            found.extend(converted)
            return converted
        nested = []
        for element in item:
            nested += [convert(element)] if isinstance(element, (list, tuple)) else convert(element)
        return nested

    converted = convert(images)
    return converted if found else None


def check_text(text, has_images: bool):
    """The processor's `text` (a string or a list of strings), checked; a clear error if it cannot be a prompt."""
    if text is None:
        if has_images:
            raise ValueError(
                "OmniFusionProcessor got images but text=None: pass a prompt with one '<image>' per image "
                "(or call processor.image_processor(images) for pixel values alone)."
            )
        return None
    if isinstance(text, str):
        return check_string(text, "text")
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}: {text!r:.80}")
    if not text:
        raise ValueError("text is an empty list: pass at least one prompt string.")
    return [check_string(sample, f"text[{index}]") for index, sample in enumerate(text)]


def _count_images(images) -> int:
    """How many images `images` holds (`None`, one image, a list, or a list per sample)."""
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(_count_images(item) for item in images)
    return 1


def flat_images(images) -> list:
    """The images of `images` (a list, or a list per sample) as one flat list, in order."""
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in flat_images(item)]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def check_placeholder_count(text, images, image_token: str, item: str = "image") -> None:
    """
    A `ValueError` unless `text` (a string or a list of strings) holds exactly one `image_token` placeholder per
    image of `images`, naming both counts and what is expected. With a list of images per sample (as many lists as
    prompts) every prompt is checked against its own images, otherwise the totals. `item` names what is counted
    (`"audio clip"` with `<audio>` and clips).

    transformers >= 5.24 checks the totals in `ProcessorMixin.validate_inputs`; 5.16-5.19 (vLLM's pins) do not, and
    vLLM never shows the processor a prompt together with its images, so `OmniFusionProcessor.vllm_inputs` runs
    this check for vLLM prompts.
    """
    if text is None:
        return
    prompts = [text] if isinstance(text, str) else list(text)
    kind = item.split()[0]
    expected = (
        f"expected exactly one {item} per {image_token!r} placeholder, in order (the chat template writes one "
        f"{image_token!r} per {{'type': '{kind}'}} content item; the number of {image_token!r} tokens in the prompts "
        f"should be the same as the number of {item}s)"
    )
    per_sample = (
        isinstance(images, (list, tuple))
        and len(prompts) > 1
        and len(images) == len(prompts)
        and all(isinstance(item, (list, tuple)) for item in images)
    )
    if per_sample:
        for index, (prompt, sample_images) in enumerate(zip(prompts, images)):
            placeholders, count = prompt.count(image_token), _count_images(sample_images)
            if placeholders != count:
                raise ValueError(
                    f"text[{index}] has {_plural(placeholders, repr(image_token) + ' placeholder')} but "
                    f"{_plural(count, item)} {'was' if count == 1 else 'were'} given for it: {expected}."
                )
        return
    placeholders, count = sum(prompt.count(image_token) for prompt in prompts), _count_images(images)
    if placeholders != count:
        where = "The prompt has" if len(prompts) == 1 else f"The {len(prompts)} prompts have"
        in_total = "" if len(prompts) == 1 else f" in total ({[prompt.count(image_token) for prompt in prompts]})"
        raise ValueError(
            f"{where} {_plural(placeholders, repr(image_token) + ' placeholder')}{in_total} but "
            f"{_plural(count, item)} {'was' if count == 1 else 'were'} given: {expected}."
        )


def check_conversation(conversation, with_audio: bool = False, with_video: bool = False):
    """
    A `ValueError`/`TypeError` naming the message if `conversation` (one chat or a batch of chats, after
    transformers' normalisation) is not a non-empty list of messages with a known role (one system message at most,
    first) and content that is a string or a list of `{"type": "text" | "image", ...}` items (and `"audio"` items
    when `with_audio`, `"video"` items when `with_video`).
    """
    content_types = CONTENT_TYPES + (("audio",) if with_audio else ()) + (("video",) if with_video else ())
    for chat_index, chat in enumerate(conversation):
        prefix = f"conversation {chat_index}: " if len(conversation) > 1 else ""
        if not isinstance(chat, (list, tuple)) or not chat:
            raise ValueError(f"{prefix}a chat must be a non-empty list of messages, got {chat!r:.80}")
        for index, message in enumerate(chat):
            where = f"{prefix}message {index}"
            if not isinstance(message, dict):
                raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise ValueError(f"{where} has role {role!r:.40}; expected one of {list(CHAT_ROLES)}.")
            if role == "system" and index != 0:
                raise ValueError(f"{where} is a system message; only the first message may be one.")
            content = message.get("content")
            if isinstance(content, str):
                check_string(content, f"{where} content")
                continue
            if not isinstance(content, (list, tuple)):
                raise TypeError(
                    f"{where} content must be a string or a list of content items, got {type(content).__name__}: "
                    f"{content!r:.80}"
                )
            for item_index, item in enumerate(content):
                item_name = f"{where} content item {item_index}"
                if not isinstance(item, dict) or item.get("type") not in content_types:
                    found = item.get("type", "no 'type'") if isinstance(item, dict) else type(item).__name__
                    no_sound = " (this model has no audio encoder)" if found == "audio" else ""
                    raise ValueError(
                        f"{item_name} must be a dict with 'type' in {list(content_types)}, got {found!r:.80}{no_sound}"
                    )
                if item["type"] == "text":
                    check_string(item.get("text"), f"{item_name} 'text'")
                elif role != "user":
                    kind = {"image": "an image", "video": "a video"}.get(item["type"], "audio")
                    raise ValueError(
                        f"{item_name} is {kind} in a {role} message; images, audio and video go in user messages."
                    )


__all__ = [
    "CHAT_ROLES",
    "CONTENT_TYPES",
    "check_conversation",
    "check_images",
    "check_num_image_tokens",
    "check_placeholder_count",
    "check_string",
    "check_text",
    "flat_images",
]
