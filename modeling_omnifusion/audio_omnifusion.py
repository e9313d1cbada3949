"""
The sound side of OmniFusion's model: the frozen audio tower, which pooled positions of a clip are real, the
per-prompt expansion of per-clip tensors for beam search, and extending an image model with sound.
"""

import torch
from torch import nn


def build_audio_tower(config) -> nn.Module:
    """The encoder half of Whisper, frozen: it is never trained."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    tower = WhisperEncoder(config.audio_config)
    tower.requires_grad_(False)
    return tower


def audio_position_mask(input_features_mask: torch.Tensor, frame_stride: int, pool_stride: int) -> torch.BoolTensor:
    """
    `[clips, window positions]`: which pooled positions of each clip hold its sound, from its `[clips, mel frames]`
    mask (real frames first). The encoder keeps every `frame_stride`-th frame, the pooling averages `pool_stride` of
    those; a position is real when every frame it averages is. For Whisper (`frame_stride` 2) a clip of L real mel
    frames keeps `(((L - 1) // 2 + 1) - pool) // pool + 1` positions, the processor's `num_audio_positions`.
    """
    frames = input_features_mask[:, ::frame_stride].float().unsqueeze(1)
    return nn.functional.avg_pool1d(frames, pool_stride, pool_stride).squeeze(1) == 1


def expand_groups(tensor: torch.Tensor, counts: torch.Tensor, expand_size: int, name: str = "audio features"):
    """
    `tensor` (rows grouped by prompt: `counts[i]` rows for prompt i, in order) with each prompt's group repeated
    `expand_size` times in place: groups [a, b], [c] -> [a, b, a, b], [c, c]. A `ValueError` if the counts do not add
    up to the rows.
    """
    counts = [int(count) for count in counts]
    if sum(counts) != tensor.shape[0]:
        raise ValueError(
            f"{name} has {tensor.shape[0]} rows but the prompts call for {sum(counts)} ({counts} per prompt)"
        )
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0).tolist()
    order = [index for start, count in zip(starts, counts) for index in list(range(start, start + count)) * expand_size]
    return tensor[torch.tensor(order, dtype=torch.long, device=tensor.device)]


def add_sound(model, audio_config, **audio_settings):
    """
    A copy of the image model `model` with sound: the same weights, an `audio_tower` built from `audio_config` (random
    until a pretrained encoder's weights are loaded into it), a fresh `audio_adapter`, and three audio rows appended
    to the marker table (the five image rows unchanged, so image inputs give bit-identical outputs).
    `audio_settings` are `OmniFusionConfig` audio fields (`audio_adapter_type`, `audio_pool_stride`, the three audio
    ids: the processor's `special_token_ids` for its tokenizer).
    """
    if model.config.audio_config is not None:
        raise ValueError("the model already has sound (config.audio_config is set)")
    config_dict = {**model.config.to_dict(), **audio_settings, "audio_config": audio_config}
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        config_dict.pop(key, None)
    sound = type(model)(type(model.config)(**config_dict)).to(model.dtype).eval()
    state = model.state_dict()
    table = "model.language_model.embed_tokens.special_embeddings.weight"
    state[table] = torch.cat([state[table], sound.state_dict()[table][state[table].shape[0] :].to(state[table])])
    missing, unexpected = sound.load_state_dict(state, strict=False)
    if unexpected or any(not name.startswith(("model.audio_tower.", "model.audio_adapter.")) for name in missing):
        raise ValueError(f"cannot extend the model with sound: missing {missing}, unexpected {unexpected}")
    sound.generation_config = model.generation_config
    return sound


__all__ = ["add_sound", "audio_position_mask", "build_audio_tower", "expand_groups"]
