"""
Training records with video, and extending a model with video for stage 1.

A record's `video` (optional, for a model with video) is a path relative to the video folder (default: the image
folder), or a list of them, decoded with PyAV and sampled by the processor (`video_num_frames` evenly spread frames).
The videos are shown at the first human turn, after its image and before its clips and text, in order; LLaVA-style
`<video>` placeholders (and the newline next to them) are removed from the text, as `<image>` is. A WebDataset sample
with an `.mp4` member is a video caption sample. A model without video refuses a record with `video`.
"""

import io
import os
import re

import torch

from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.processing.video_inputs_omnifusion import OmniFusionVideoProcessor, load_video
from modeling_omnifusion.video_omnifusion import add_video

VIDEO_PATTERN = re.compile(r"<video>\n?|\n?<video>")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")


def record_videos(name: str, record: dict, with_video: bool) -> list[str]:
    """The record's `video` paths (a string or a non-empty list of strings; none without the field); a
    `ValueError` naming the record if malformed or if the model takes no video."""
    videos = record.get("video")
    if videos is None:
        return []
    if not with_video:
        raise ValueError(
            f"Record {name}: has 'video', but this model takes no video (stage 1 with --video_num_frames adds it)."
        )
    paths = [videos] if isinstance(videos, str) else videos
    if not isinstance(paths, list) or not paths or not all(isinstance(path, str) and path for path in paths):
        raise ValueError(
            f"Record {name}: 'video' must be a path string or a non-empty list of them, got {videos!r:.80}."
        )
    return paths


def add_video_items(name: str, record: dict, messages: list[dict], with_video: bool) -> list[dict]:
    """`messages` with the record's videos as `{"type": "video", "path": ...}` items at the first human turn (after
    its image) and `<video>` placeholders removed from every text; unchanged without video."""
    if not with_video:
        record_videos(name, record, with_video)
        return messages
    paths = record_videos(name, record, with_video)
    for message in messages:
        for item in message["content"]:
            if item["type"] == "text":
                item["text"] = VIDEO_PATTERN.sub("", item["text"])
    if paths:
        first_user = next((message for message in messages if message["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"Record {name}: has a video but no 'human' turn to show it at.")
        at = sum(item["type"] == "image" for item in first_user["content"])
        first_user["content"][at:at] = [{"type": "video", "path": path} for path in paths]
    return messages


def video_items(messages: list[dict]) -> list[dict]:
    """The `{"type": "video"}` content items of `messages`, in order."""
    return [item for message in messages for item in message["content"] if item["type"] == "video"]


def read_videos(processor: OmniFusionProcessor, folder: str, name: str, messages: list[dict]) -> list:
    """Decode and sample the record's videos (paths relative to `folder`, or bytes of a WebDataset member) into its
    video items, in place, and return their frames in order. A missing file is a `FileNotFoundError`, an unusable
    video a `ValueError`; both name the record and the file."""
    frames = []
    for item in video_items(messages):
        if "video" not in item:
            path = os.path.join(folder, item.pop("path"))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Record {name}: video file not found: {path}")
            item["video"] = path
        source = item["video"]
        if isinstance(source, (str, bytes)) or hasattr(source, "read"):
            label = f"Record {name}: video {source if isinstance(source, str) else '(.mp4 member)'}"
            source = io.BytesIO(source) if isinstance(source, bytes) else source
            item["video"] = load_video(
                source, label, processor.video_processor.num_frames, processor.video_processor.fps
            )
        frames.append(item["video"])
    return frames


def video_blocks(processor: OmniFusionProcessor, messages: list[dict]) -> list[str]:
    """The text each decoded video of `messages` becomes."""
    return [processor.video_block(len(item["video"])) for item in video_items(messages)]


def video_features(processor: OmniFusionProcessor, input_ids: torch.LongTensor, frames: list) -> dict:
    """`pixel_values_videos` of the videos whose blocks `input_ids` holds (truncation drops the last ones), or None."""
    kept = int((input_ids == processor.video_end_token_id).sum()) if frames else 0
    if not kept:
        return {"pixel_values_videos": None}
    processor.video_processor.frame_processors = processor.image_processors_for_frames
    pixels = processor.video_processor(list(frames[:kept]))["pixel_values_videos"]
    return {"pixel_values_videos": torch.as_tensor(pixels)}


def video_sample_example(key: str, caption: str, video: bytes, encoder) -> dict:
    """The model inputs of a WebDataset sample with an `.mp4` member: its caption as the answer to "Describe the
    video." about the video (a `ValueError` if the member cannot be decoded)."""
    import json

    from .conversation import assistant_labels, record_to_messages

    record = {"id": key, "video": key, "conversations": [{"from": "human", "value": "<video>\nDescribe the video."}]}
    record["conversations"].append({"from": "gpt", "value": caption})
    messages, _ = record_to_messages(key, json.dumps(record), encoder.with_audio, True)
    (item,) = video_items(messages)
    del item["path"]
    item["video"] = video
    frames = read_videos(encoder.processor, "", key, messages)
    input_ids = encoder.tokenize_record(key, messages)
    example = {"input_ids": input_ids, "labels": assistant_labels(input_ids, encoder.processor), "pixel_values": None}
    return example | encoder.audio_features(input_ids, []) | video_features(encoder.processor, input_ids, frames)


def processor_with_video(processor: OmniFusionProcessor, video_num_frames: int, num_video_frame_tokens: int):
    """An OmniFusion processor like `processor` (images, sound, tokenizer, markers) that also takes video, sampling
    `video_num_frames` frames; the three video markers are added to the tokenizer after the others."""
    names = (
        "num_image_tokens",
        "image_grid_pinpoints",
        "image_global_view_position",
        "image_token",
        "image_start_token",
        "image_end_token",
        "user_token",
        "assistant_token",
        "end_assistant_turns_with_eos",
        "extra_encoder_preprocessors",
        "audio_preprocessor",
        "audio_pool_stride",
    )
    settings = {name: getattr(processor, name) for name in names}
    if processor.audio_preprocessor is not None:
        settings.update(
            {name: getattr(processor, name) for name in ("audio_token", "audio_start_token", "audio_end_token")}
        )
    return OmniFusionProcessor(
        processor.image_processor,
        processor.tokenizer,
        **settings,
        video_preprocessor=OmniFusionVideoProcessor(num_frames=video_num_frames),
        num_video_frame_tokens=num_video_frame_tokens,
    )


def extend_with_video(
    model: OmniFusionForCausalLM,
    processor: OmniFusionProcessor,
    video_num_frames: int,
    video_pool_size: int = 2,
    video_adapter: str = "shared",
) -> tuple[OmniFusionForCausalLM, OmniFusionProcessor]:
    """The model `model` with video (`add_video`: weights unchanged, three fresh video marker rows, a video adapter
    copied from the image adapter when "separate") and its processor with a video processor. Image (and sound) inputs
    give bit-identical outputs until the video side trains."""
    processor = processor_with_video(processor, video_num_frames, 1)
    ids = {name: value for name, value in processor.special_token_ids.items() if name.startswith("video_")}
    model = add_video(
        model, video_num_frames=video_num_frames, video_pool_size=video_pool_size, video_adapter=video_adapter, **ids
    )
    processor.num_video_frame_tokens = model.config.num_video_frame_tokens
    return model, processor


def video_settings(model_args) -> dict:
    """The config's video settings from stage 1's flags (defaults: pool 2, shared adapter)."""
    return {
        "video_num_frames": model_args.video_num_frames,
        "video_pool_size": 2 if model_args.video_pool_size is None else model_args.video_pool_size,
        "video_adapter": model_args.video_adapter or "shared",
    }


def load_model_for_video(name: str, **settings) -> tuple[OmniFusionForCausalLM, OmniFusionProcessor]:
    """The `name` folder's model in float32 with its processor, extended with video (`extend_with_video`); a
    `ValueError` if it already takes video."""
    from modeling_omnifusion.hub_omnifusion import hub_model_id

    model = OmniFusionForCausalLM.from_pretrained(name, dtype=torch.float32)
    if model.config.video_num_frames is not None:
        raise ValueError(f"--model_name_or_path {name} already takes video: drop --video_num_frames.")
    processor = OmniFusionProcessor.from_pretrained(name)
    processor.end_assistant_turns_with_eos = True
    model, processor = extend_with_video(model, processor, **settings)
    model.config._name_or_path = hub_model_id(name) or ""
    return model, processor


def train_video_side(model: OmniFusionForCausalLM) -> list[str]:
    """
    Freeze `model` except the three video rows of the marker table (the other rows' gradients are zeroed by
    `restrict_marker_gradient`) and, with `video_adapter="separate"`, the video adapter. Returns the marker table's
    parameter name, which must get no weight decay (so the other markers stay bit-identical).
    """
    from .models import train_only

    config = model.config
    embeddings = model.get_input_embeddings()
    modules = [embeddings.special_embeddings]
    if config.video_adapter == "separate":
        modules.append(model.model.video_adapter)
    train_only(model, modules)
    embeddings.restrict_marker_gradient([config.video_token_id, config.video_start_token_id, config.video_end_token_id])
    table = embeddings.special_embeddings.weight
    return [name for name, parameter in model.named_parameters() if parameter is table]


__all__ = [
    "VIDEO_EXTENSIONS",
    "add_video_items",
    "extend_with_video",
    "processor_with_video",
    "read_videos",
    "record_videos",
    "load_model_for_video",
    "train_video_side",
    "video_sample_example",
    "video_settings",
    "video_blocks",
    "video_features",
    "video_items",
]
