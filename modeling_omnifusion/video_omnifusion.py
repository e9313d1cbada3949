"""
The video side of OmniFusion's model: frames go through the vision tower(s) and an image-style adapter (the image
adapter itself, or a separate video adapter of the same type), then a spatial average pooling per frame; the one
formula for the positions a frame takes; the config checks for video; extending an image model with video.
"""

import math

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

# `OmniFusionConfig` fields for video, left out of a saved config without video (`video_num_frames` None).
VIDEO_TOKEN_FIELDS = ("video_token_id", "video_start_token_id", "video_end_token_id")
VIDEO_FIELDS = ("video_num_frames", "video_pool_size", "video_adapter", *VIDEO_TOKEN_FIELDS)
VIDEO_ADAPTERS = ("shared", "separate")


def video_frame_positions(num_image_tokens: int, pool_size: int) -> int:
    """
    Positions one frame takes in the prompt: the adapter's `num_image_tokens` outputs of a view form a square grid of
    side `s = sqrt(num_image_tokens)`, average-pooled by `pool_size` x `pool_size` windows (incomplete windows at the
    bottom/right are dropped): `(s // pool_size) ** 2`. A video of F frames takes F times this many.
    """
    side = math.isqrt(num_image_tokens)
    return (side // pool_size) ** 2


def check_video_config(config):
    """A `ValueError`/`TypeError` naming the field unless the video settings of `config` are usable."""
    if config.video_num_frames is None:
        return
    for name in ("video_num_frames", "video_pool_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r:.80}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if config.video_adapter not in VIDEO_ADAPTERS:
        raise ValueError(f"video_adapter must be one of {list(VIDEO_ADAPTERS)}, got {config.video_adapter!r}")
    tokens = config.num_image_tokens
    if math.isqrt(tokens) ** 2 != tokens:
        raise ValueError(
            f"video frames are pooled on the adapter's square grid of patches, but a view gives {tokens} positions "
            f"(adapter_type={config.adapter_type!r}, vision_feature_select_strategy="
            f"{config.vision_feature_select_strategy!r}); use one encoder (or mix_sum) with the 'default' strategy"
        )
    if video_frame_positions(tokens, config.video_pool_size) < 1:
        raise ValueError(
            f"video_pool_size={config.video_pool_size} is larger than the {math.isqrt(tokens)}-patch side of a frame"
        )
    ids = [getattr(config, name) for name in VIDEO_TOKEN_FIELDS]
    if ids[0] != min(ids):
        raise ValueError(
            f"video_token_id ({ids[0]}) must be the smallest of the three video ids (start {ids[1]}, end {ids[2]}): "
            "serving engines take a block's most frequent id, ties going to the smallest"
        )


def build_video_adapter(config) -> nn.Module | None:
    """The `video_adapter` (same type and sizes as the image adapter) when `config.video_adapter` is "separate"."""
    from .adapters_omnifusion import ADAPTER_CLASSES  # the configuration imports this file: no cycle at import

    if config.video_num_frames is None or config.video_adapter != "separate":
        return None
    return ADAPTER_CLASSES[config.adapter_type](config)


def pool_frames(features: torch.Tensor, pool_size: int) -> torch.Tensor:
    """`[frames, side * side, hidden]` -> `[frames, (side // pool_size) ** 2, hidden]`: a 2-D average pooling of each
    frame's grid (row-major), windows `pool_size` x `pool_size` with that stride."""
    if pool_size == 1:
        return features
    frames, positions, hidden = features.shape
    side = math.isqrt(positions)
    grid = features.transpose(1, 2).reshape(frames, hidden, side, side)
    pooled = nn.functional.avg_pool2d(grid, pool_size, pool_size)
    return pooled.flatten(2).transpose(1, 2)


def video_features(model, pixel_values_videos: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
    """
    `OmniFusionModel.get_video_features`: every frame encoded like an image view (no tiles), adapted by the image
    adapter or the video adapter, then pooled by `pool_frames`. `pixel_values_videos` is `[frames, 3, H, W]` (with
    several encoders `[frames, encoders, 3, H, W]`), every video's frames in order, videos in placeholder order; a
    `[videos, frames, ...]` tensor (one more leading axis) is read the same way. The output's `pooler_output` is
    `[total frames, video_frame_positions, text hidden]`.
    """
    config = model.config
    if config.video_num_frames is None:
        raise ValueError("This OmniFusion model takes no video (config.video_num_frames is None).")
    frame_dims = 5 if config.additional_vision_configs else 4
    if not isinstance(pixel_values_videos, torch.Tensor) or pixel_values_videos.dim() not in (
        frame_dims,
        frame_dims + 1,
    ):
        shape = list(pixel_values_videos.shape) if isinstance(pixel_values_videos, torch.Tensor) else None
        raise ValueError(
            f"pixel_values_videos must be a {frame_dims}-D tensor of frames (or {frame_dims + 1}-D, videos first), got "
            f"{shape or type(pixel_values_videos).__name__}; build it with the model's OmniFusionProcessor"
        )
    if pixel_values_videos.dim() == frame_dims + 1:
        pixel_values_videos = pixel_values_videos.flatten(0, 1)
    adapter = model.video_adapter if config.video_adapter == "separate" else model.adapter
    kwargs.pop("vision_feature_select_strategy", None)  # frames always drop the CLS/register tokens
    kwargs.pop("video_grid_thw", None)  # `[frames, 1, 1]` per video (the processor's, for serving engines): unused
    outputs = model.get_image_features(pixel_values_videos, adapter=adapter, return_dict=True, **kwargs)
    outputs.pooler_output = pool_frames(outputs.pooler_output, config.video_pool_size)
    return outputs


def expand_video_frames(model, input_ids, kwargs: dict, expand_size: int) -> dict:
    """
    For beam search and `num_return_sequences` when `generate` passes raw frames on (transformers releases that do
    not encode videos before the prefill): `pixel_values_videos` popped from `kwargs` with every prompt's frames
    repeated as a whole group (`expand_groups`), its frame count read from its `<video>` positions. `{}` otherwise.
    """
    from .audio_omnifusion import expand_groups

    frames = kwargs.get("pixel_values_videos")
    if expand_size == 1 or not isinstance(frames, torch.Tensor) or model.config.video_num_frames is None:
        return {}
    ids = input_ids if input_ids is not None and input_ids.numel() else None
    positions = model.model._placeholders_in(ids, kwargs.get("inputs_embeds"), model.config.video_token_id).sum(-1)
    counts = positions // model.config.num_video_frame_tokens
    frame_dims = 5 if model.config.additional_vision_configs else 4
    flat = kwargs.pop("pixel_values_videos")
    flat = flat.flatten(0, 1) if flat.dim() == frame_dims + 1 else flat
    return {"pixel_values_videos": expand_groups(flat, counts, expand_size, "pixel_values_videos")}


def add_video(model, **video_settings):
    """
    A copy of the model `model` (images, maybe sound) with video: the same weights, the video marker rows appended to
    the marker table (the existing rows unchanged, so image and sound inputs give bit-identical outputs) and, with
    `video_adapter="separate"`, a video adapter initialised from the image adapter's weights. `video_settings` are
    `OmniFusionConfig` video fields (`video_num_frames` is required; the three video ids: the processor's
    `special_token_ids` for its tokenizer).
    """
    if model.config.video_num_frames is not None:
        raise ValueError("the model already takes video (config.video_num_frames is set)")
    if video_settings.get("video_num_frames") is None:
        raise ValueError("add_video needs video_num_frames (frames sampled per video by default)")
    config_dict = {**model.config.to_dict(), **video_settings}
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        config_dict.pop(key, None)
    video = type(model)(type(model.config)(**config_dict)).to(model.dtype).eval()
    state = model.state_dict()
    table = "model.language_model.embed_tokens.special_embeddings.weight"
    state[table] = torch.cat([state[table], video.state_dict()[table][state[table].shape[0] :].to(state[table])])
    for name, value in list(state.items()):
        if name.startswith("model.adapter.") and video.config.video_adapter == "separate":
            state["model.video_adapter." + name[len("model.adapter.") :]] = value.clone()
    missing, unexpected = video.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"cannot extend the model with video: missing {missing}, unexpected {unexpected}")
    video.generation_config = model.generation_config
    return video


__all__ = [
    "VIDEO_ADAPTERS",
    "VIDEO_FIELDS",
    "VIDEO_TOKEN_FIELDS",
    "add_video",
    "build_video_adapter",
    "expand_video_frames",
    "check_video_config",
    "pool_frames",
    "video_features",
    "video_frame_positions",
]
