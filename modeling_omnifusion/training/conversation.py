"""
From a LLaVA-style conversation record to model inputs, and the collator that pads them into a batch.

A record, as in LLaVA and the released OmniFusion code:

    {"id": "000042", "image": "coco/000042.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A cup of tea."}]}

`image` (optional) is a path relative to the image folder; the image is shown at the first human turn. LLaVA's
literal `<image>` (and the newline next to it) is removed from the text: where the image goes is decided by the chat
template, never by the text; an `<image>` in a record without `image` is an error (the picture it asks about is
missing), as is a conversation whose first turn is not `human`. Any other text is text: a `<user>`, `</s>` or `<s>`
typed in a record is trained on as those characters (the chat template escapes message text), never as a marker or
EOS.

For a model with sound, `audio` (optional) is a path relative to the audio folder, or a list of them, read with
soundfile (WAV, FLAC, MP3, OGG, ...); the conversation holds one `<audio>` per clip, in human turns, and clip i is
heard at the turn of the i-th `<audio>` (after the turn's image, before its text). A count that differs is a
`ValueError` naming the record.

`ConversationEncoder` turns a record into model inputs: chat template -> token ids -> truncation -> labels, the image
through the image processor and the clips through the feature extractor. Labels are -100 everywhere except the
assistant text, EOS at the end of each assistant turn included (the processor is set to
`end_assistant_turns_with_eos=True`, so that trained models stop by themselves). A sequence longer than the maximum
length is cut; a cut that would land inside an image or audio block (`<image_start>` ... `<image_end>`,
`<audio_start>` ... `<audio_end>`) is moved to before the block's start, and that image or clip (and every later one)
is dropped.
"""

import json
import logging
import os
import re
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from modeling_omnifusion import OmniFusionProcessor
from modeling_omnifusion.processing.audio_inputs_omnifusion import (
    check_audio,
    extract_audio_features,
    num_mel_frames,
)

from .video_records import add_video_items, read_videos, video_blocks, video_features

logger = logging.getLogger("omnifusion_training")  # the name the log lines show; `setup_run` sets its level

ROLES = {"human": "user", "gpt": "assistant"}
LLAVA_IMAGE_PATTERN = re.compile(r"<image>\n?|\n?<image>")
AUDIO_PLACEHOLDER = "<audio>"
AUDIO_PATTERN = re.compile(r"<audio>\n?|\n?<audio>")


def record_audio(name: str, record: dict) -> list[str]:
    """The record's `audio` paths (a string or a non-empty list of strings; none without the field)."""
    audio = record.get("audio")
    if audio is None:
        return []
    clips = [audio] if isinstance(audio, str) else audio
    if not isinstance(clips, list) or not clips or not all(isinstance(clip, str) and clip for clip in clips):
        raise ValueError(
            f"Record {name}: 'audio' must be a path string or a non-empty list of them, got {audio!r:.80}."
        )
    return clips


def record_to_messages(
    name: str, record_json: str, with_audio: bool = False, with_video: bool = False
) -> tuple[list[dict], str | None]:
    """
    Chat messages (processor format) and the image path of one record; `ValueError` naming the record if it is
    malformed. `with_audio` (a model with sound): the record's clips become `{"type": "audio", "path": ...}` items
    (paths as in the record) at the human turns of their `<audio>` placeholders, one per clip; without it an `audio`
    field is refused and `<audio>` is text. `with_video`: the record's videos (`video_records.add_video_items`).
    """
    try:
        record = json.loads(record_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"Record {name}: not valid JSON ({error}).") from None
    if not isinstance(record, dict):
        raise ValueError(f"Record {name}: expected a JSON object, got {type(record).__name__}.")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"Record {name}: 'conversations' must be a non-empty list of turns, got {conversations!r:.50}")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"Record {name}: 'image' must be a path string, got {image!r:.80}.")
    if not with_audio and "audio" in record:
        raise ValueError(
            f"Record {name}: has 'audio', but this model has no audio encoder (stage 1 with "
            "--audio_model_name_or_path builds or adds one)."
        )
    clips = record_audio(name, record) if with_audio else []
    placeholders = 0

    messages = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            found = turn.get("from") if isinstance(turn, dict) else turn
            raise ValueError(f"Record {name}: turn {index} needs 'from': 'human' or 'gpt', got {found!r:.80}.")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"Record {name}: turn {index} needs a string 'value', got {value!r:.80}.")
        if index == 0 and turn["from"] != "human":
            raise ValueError(
                f"Record {name}: turn 0 is a {turn['from']!r} turn; a conversation starts with a 'human' turn (the "
                "answer to nothing would be trained on)."
            )
        if image is None and LLAVA_IMAGE_PATTERN.search(value):
            raise ValueError(
                f"Record {name}: turn {index} has <image> but the record has no 'image' field (the image it asks "
                "about is missing); add the image path or remove the placeholder."
            )
        text = LLAVA_IMAGE_PATTERN.sub("", value)
        content = []
        if with_audio:
            heard = text.count(AUDIO_PLACEHOLDER)
            if heard and turn["from"] != "human":
                raise ValueError(f"Record {name}: turn {index} ('gpt') has <audio>; clips are heard in human turns.")
            content = [{"type": "audio", "path": clip} for clip in clips[placeholders : placeholders + heard]]
            placeholders += heard
            text = AUDIO_PATTERN.sub("", text)
        content.append({"type": "text", "text": text})
        messages.append({"role": ROLES[turn["from"]], "content": content})
    if placeholders != len(clips):
        raise ValueError(
            f"Record {name}: {len(clips)} audio clip(s) but {placeholders} <audio> placeholder(s) in its "
            "conversations; put one <audio> per clip in the human turn where it is heard."
        )
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"Record {name}: the conversation has no 'gpt' turn, so nothing to learn from.")
    if image is not None:
        first_user = next((message for message in messages if message["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"Record {name}: has an image but no 'human' turn to show it at.")
        first_user["content"].insert(0, {"type": "image"})
    return add_video_items(name, record, messages, with_video), image


def assistant_labels(input_ids: torch.LongTensor, processor: OmniFusionProcessor) -> torch.LongTensor:
    """
    `input_ids` (`[..., seq]`) with -100 everywhere except assistant text: a token is a target iff the most recent
    `<user>`/`<assistant>`/`<image_start>`/`<audio_start>` marker before it is `<assistant>` and it is not itself a
    special token.
    """
    special = torch.tensor(list(processor.special_token_ids.values()))
    block_starts = [processor.image_start_token_id, processor.audio_start_token_id, processor.video_start_token_id]
    boundaries = torch.tensor([processor.user_token_id, processor.assistant_token_id, *filter(None, block_starts)])
    positions = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
    last_boundary = torch.where(torch.isin(input_ids, boundaries), positions, -1).cummax(-1).values
    last_marker = input_ids.gather(-1, last_boundary.clamp(min=0))
    in_answer = (last_boundary >= 0) & (last_marker == processor.assistant_token_id)
    return input_ids.masked_fill(~in_answer | torch.isin(input_ids, special), -100)


def truncate(input_ids: torch.LongTensor, max_length: int, processor: OmniFusionProcessor) -> torch.LongTensor:
    """The first `max_length` ids of a 1-D sequence, cut earlier if needed so that no image or audio block is
    split."""
    if input_ids.shape[0] <= max_length:
        return input_ids
    head = input_ids[:max_length]
    block_starts = [processor.image_start_token_id, processor.audio_start_token_id, processor.video_start_token_id]
    block_ends = [processor.image_end_token_id, processor.audio_end_token_id, processor.video_end_token_id]
    starts = torch.isin(head, torch.tensor([i for i in block_starts if i is not None])).nonzero().flatten()
    if len(starts) > int(torch.isin(head, torch.tensor([i for i in block_ends if i is not None])).sum()):
        return input_ids[: int(starts[-1])]
    return head


def decode_sound(source, processor: OmniFusionProcessor, name: str) -> np.ndarray:
    """
    The clip in `source` (a path or a binary file object: WAV, FLAC, MP3, OGG, ... as soundfile reads them) as the
    processor takes it: mono float32 at the feature extractor's sampling rate, checked (`check_audio`). A `ValueError`
    naming `name` (e.g. the record and file) if it cannot be decoded, holds NaN/Inf samples, is empty, too short for
    one position or longer than the encoder's window.
    """
    try:
        import soundfile
    except ImportError as error:
        raise ImportError(f"{name}: reading sound needs soundfile (pip install soundfile).") from error
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=False)
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError, ... on bad data
        raise ValueError(f"{name}: cannot read it as sound ({type(error).__name__}: {error})") from None
    try:
        (waveform,) = check_audio(samples, rate, processor.audio_preprocessor, processor.audio_pool_stride)
    except (TypeError, ValueError) as error:
        message = str(error)
        clip = "Audio clip 0 "  # how `check_audio` names a clip: the record and file name it here
        raise ValueError(
            f"{name} {message[len(clip) :]}" if message.startswith(clip) else f"{name}: {message}"
        ) from None
    return waveform


def audio_items(messages: list[dict]) -> list[dict]:
    """The `{"type": "audio"}` content items of `messages`, in order."""
    return [item for message in messages for item in message["content"] if item["type"] == "audio"]


class ConversationEncoder:
    """
    Turns stored records into model inputs. Called on a batch of rows it is the dataset transform; `check` runs
    every step except decoding the pixels, for the up-front validation (clips are decoded there: their length sets
    their block's).
    """

    check_images = "header"  # what `check` does with the image: "none", "header" or "full" (decode)

    def __init__(
        self,
        processor: OmniFusionProcessor,
        image_folder: str,
        max_length: int,
        skip_bad_records: bool = False,
        audio_folder: str | None = None,
    ):
        self.processor = processor
        self.image_folder = image_folder
        self.audio_folder = image_folder if audio_folder is None else audio_folder
        self.with_audio = processor.audio_preprocessor is not None
        self.with_video = processor.video_preprocessor is not None  # videos are read from the image folder
        self.max_length = max_length
        self.skip_bad_records = skip_bad_records
        self.records: datasets.Dataset | None = None  # the checked rows, where a skipped record's stand-in comes from
        self.skipped: list[str] = []  # records skipped at run time (in this process)

    def tokenize(self, messages: list[dict], image_size: tuple[int, int] | None = None) -> torch.LongTensor:
        """Token ids exactly as `processor(images=..., audio=..., text=chat)` gives them, without decoding any image
        (with tiles the image block's length depends on the image's `(height, width)`, read from its header). Audio
        items hold their decoded clips (`read_audio`), whose lengths set their blocks'."""
        processor = self.processor
        chat = processor.apply_chat_template(messages, tokenize=False)
        num_images = sum(item["type"] == "image" for message in messages for item in message["content"])
        num_views = processor.num_image_views(*image_size) if image_size is not None else 1
        blocks = [processor.image_block(num_views) for _ in range(num_images)]
        hop = processor.audio_preprocessor.hop_length if self.with_audio else None
        audio_blocks = [
            processor.audio_block(num_mel_frames(len(item["audio"]), hop)) for item in audio_items(messages)
        ]
        (text,), _ = processor.get_text_with_replacements(
            [chat],
            images_replacements=blocks,
            videos_replacements=video_blocks(processor, messages),
            audio_replacements=audio_blocks,
        )
        input_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return truncate(torch.tensor(input_ids, dtype=torch.long), self.max_length, processor)

    def tokenize_record(
        self, name: str, messages: list[dict], image_size: tuple[int, int] | None = None
    ) -> torch.LongTensor:
        """`tokenize`, with what the processor refuses (e.g. a lone surrogate in the text) named by the record."""
        try:
            return self.tokenize(messages, image_size)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Record {name}: {error}") from error

    def read_image(self, name: str, image: str, decode: bool = True) -> Image.Image | None:
        """
        The record's image, decoded in its own mode (`decode=False`: only check that it decodes, a JPEG at 1/8 scale,
        which still reads its whole data stream: a truncated file or corrupt pixel data fails here, as in training).
        """
        path = os.path.join(self.image_folder, image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Record {name}: image file not found: {path}")
        try:
            with Image.open(path) as file:
                if not decode:
                    file.draft(None, (1, 1))  # JPEG: decode at 1/8 scale, in its own mode
                    file.load()
                    return None
                file.load()
                return file
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on bad files
            raise ValueError(f"Record {name}: cannot read image {path} ({type(error).__name__}: {error}).") from error

    def read_audio(self, name: str, messages: list[dict]) -> list[np.ndarray]:
        """
        Decode the record's clips (`decode_sound`; paths relative to the audio folder) into its audio items, in
        place, and return them in order. A missing file is a `FileNotFoundError`, an unusable clip a `ValueError`;
        both name the record and the file.
        """
        waveforms = []
        for item in audio_items(messages):
            if "audio" not in item:
                path = os.path.join(self.audio_folder, item.pop("path"))
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"Record {name}: audio file not found: {path}")
                item["audio"] = decode_sound(path, self.processor, f"Record {name}: audio {path}")
            waveforms.append(item["audio"])
        return waveforms

    def image_size(self, name: str, image: str | None) -> tuple[int, int] | None:
        """`(height, width)` of the record's image when the processor tiles (its block length depends on it)."""
        if image is None or self.processor.image_grid_pinpoints is None:
            return None
        path = os.path.join(self.image_folder, image)
        try:
            with Image.open(path) as file:
                width, height = file.size
        except Exception as error:
            raise ValueError(f"Record {name}: cannot read image {path} ({type(error).__name__}: {error}).") from error
        return height, width

    def check(self, row: dict) -> dict:
        """`error` (message, empty if fine), `error_type` and `has_answer` for one stored row."""
        try:
            messages, image = record_to_messages(row["name"], row["record"], self.with_audio, self.with_video)
            self.read_audio(row["name"], messages)
            read_videos(self.processor, self.image_folder, row["name"], messages)
            if image is not None and self.check_images != "none":
                self.read_image(row["name"], image, decode=self.check_images == "full")
            image_size = self.image_size(row["name"], image)
            input_ids = self.tokenize_record(row["name"], messages, image_size)
            labels = assistant_labels(input_ids, self.processor)
        except (FileNotFoundError, ValueError) as error:
            return {"error": str(error), "error_type": type(error).__name__, "has_answer": False, "length": 0}
        return {"error": "", "error_type": "", "has_answer": bool((labels != -100).any()), "length": len(input_ids)}

    def encode(self, name: str, record: str) -> dict:
        messages, image = record_to_messages(name, record, self.with_audio, self.with_video)
        waveforms = self.read_audio(name, messages)
        frames = read_videos(self.processor, self.image_folder, name, messages)
        input_ids = self.tokenize_record(name, messages, self.image_size(name, image))
        pixel_values = None
        if image is not None and (input_ids == self.processor.image_end_token_id).any():
            try:
                image_inputs = self.processor.prepare_images([self.read_image(name, image)], return_tensors="pt")
            except (TypeError, ValueError) as error:
                raise ValueError(f"Record {name}: image {os.path.join(self.image_folder, image)}: {error}") from error
            pixel_values = image_inputs["pixel_values"]
        return {
            "input_ids": input_ids,
            "labels": assistant_labels(input_ids, self.processor),
            "pixel_values": pixel_values,
            **self.audio_features(input_ids, waveforms),
            **video_features(self.processor, input_ids, frames),
        }

    def audio_features(self, input_ids: torch.LongTensor, waveforms: list[np.ndarray]) -> dict:
        """`input_features` `[clips, mel bins, frames]` and `input_features_mask` `[clips, frames]` of the clips whose
        blocks `input_ids` holds (truncation drops the last ones), or None for both without any."""
        kept = int((input_ids == self.processor.audio_end_token_id).sum()) if waveforms else 0
        if not kept:
            return {"input_features": None, "input_features_mask": None}
        features = extract_audio_features(self.processor.audio_preprocessor, waveforms[:kept])
        return {name: torch.from_numpy(value) for name, value in features.items()}

    def encode_or_skip(self, position: int, name: str, record: str) -> dict:
        """
        `encode`; under `skip_bad_records`, a record that fails is skipped and counted, and the next record of
        `self.records` that encodes (from `position` on) takes its place, so that the batch keeps its size.
        """
        for offset in range(len(self.records) if self.skip_bad_records and self.records is not None else 1):
            if offset:
                row = self.records[(position + offset) % len(self.records)]
                name, record = row["name"], row["record"]
            try:
                return self.encode(name, record)
            except (FileNotFoundError, ValueError, OSError) as error:
                if not self.skip_bad_records or self.records is None:
                    raise
                self.skipped.append(name)
                logger.warning(
                    "Skipped record %s during training (%s); %d skipped so far, the next record takes its place.",
                    name,
                    error,
                    len(self.skipped),
                )
        raise ValueError(f"No record of {len(self.records)} could be read during training (see the log).")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        positions = batch.get("position", [0] * len(batch["name"]))
        examples = [self.encode_or_skip(*row) for row in zip(positions, batch["name"], batch["record"])]
        return {key: [example[key] for example in examples] for key in EXAMPLE_KEYS}


# What one encoded record holds: `pixel_values` and the audio features are None for a record without them.
EXAMPLE_KEYS = ("input_ids", "labels", "pixel_values", "input_features", "input_features_mask", "pixel_values_videos")


def stack_media(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The images (`pixel_values`) and clips (`input_features`, `input_features_mask`) of `examples`, concatenated in
    order; records without them contribute none, and a batch without any has no such key."""
    stacked = {}
    for key in ("pixel_values", "input_features", "input_features_mask", "pixel_values_videos"):
        values = [example[key] for example in examples if example.get(key) is not None]
        if values:
            stacked[key] = torch.cat(values)
    return stacked


@dataclass
class OmniFusionDataCollator:
    """Pads `input_ids` (with `pad_token_id`), `labels` (with -100) and `attention_mask` on the right; stacks images
    and clips (`stack_media`)."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = [example["input_ids"] for example in examples]
        batch = {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence(
                [torch.ones_like(ids) for ids in input_ids], batch_first=True, padding_value=0
            ),
            "labels": pad_sequence([example["labels"] for example in examples], batch_first=True, padding_value=-100),
        }
        return batch | stack_media(examples)
