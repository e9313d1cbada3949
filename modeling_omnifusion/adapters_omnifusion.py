"""OmniFusion adapters: map encoder features to the LM's embedding width.

Single-encoder adapters take one `[num_views, num_patches, vision_hidden]` tensor (`mlp` and `linear` work on every
position alone, so they also take the `[total_positions, audio_hidden]` pooled frames of the audio path). The
encoder-mixing adapters of the technical report take `encoder_features`: per vision encoder (config order), the
list of hidden states they read, each `[num_views, num_patches_of_that_encoder, its_hidden]`.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_omnifusion import MIX_ADAPTER_TYPES, OmniFusionConfig


def eager_adapter_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain softmax attention over `[batch, heads, length, head_dim]` (the adapter never masks); output transposed
    to `[batch, length, heads, head_dim]` like transformers' attention functions."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class OmniFusionAdapterSelfAttention(nn.Module):
    """
    Multi-head self-attention with `nn.MultiheadAttention`'s parameter layout (packed `in_proj_weight`).

    It dispatches through transformers' attention interface on `config._attn_implementation` (the top-level
    `OmniFusionConfig`), so `set_attn_implementation` switches the adapter too; without a config it runs SDPA.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, config: OmniFusionConfig | None = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"adapter width {hidden_size} is not divisible by adapter_num_heads={num_heads}")
        self.config = config
        self.num_heads = num_heads
        self.dropout = dropout
        self.scaling = (hidden_size // num_heads) ** -0.5
        self.is_causal = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        qkv = nn.functional.linear(hidden_states, self.in_proj_weight, self.in_proj_bias)
        query, key, value = qkv.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        implementation = self.config._attn_implementation if self.config is not None else "sdpa"
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_adapter_attention)
        attention, _ = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.out_proj(attention.reshape(batch, length, width))


class OmniFusionAdapterEncoderLayer(nn.Module):
    """
    A post-norm transformer encoder layer, numerically `nn.TransformerEncoderLayer(batch_first=True, norm_first=False)`
    and with the same parameter names, so released adapters load by name. Every weight is used through a submodule
    call, which keeps device maps and offloading working. `width` defaults to the (first) vision encoder's width.
    """

    def __init__(self, config: OmniFusionConfig, width: int | None = None):
        super().__init__()
        width = width or config.vision_config.hidden_size
        self.self_attn = OmniFusionAdapterSelfAttention(
            width, config.adapter_num_heads, config.adapter_dropout, config=config
        )
        self.linear1 = nn.Linear(width, config.adapter_ffn_dim)
        self.linear2 = nn.Linear(config.adapter_ffn_dim, width)
        self.activation = ACT2FN[config.adapter_activation]
        self.norm1 = nn.LayerNorm(width, eps=config.adapter_layer_norm_eps)
        self.norm2 = nn.LayerNorm(width, eps=config.adapter_layer_norm_eps)
        self.dropout = nn.Dropout(config.adapter_dropout)
        self.dropout1 = nn.Dropout(config.adapter_dropout)
        self.dropout2 = nn.Dropout(config.adapter_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.norm1(hidden_states + self.dropout1(self.self_attn(hidden_states)))
        feed_forward = self.linear2(self.dropout(self.activation(self.linear1(hidden_states))))
        return self.norm2(hidden_states + self.dropout2(feed_forward))


class OmniFusionTransformerAdapter(nn.Module):
    """The released adapter: one post-norm transformer encoder layer over the patches, then a Linear to the LM width."""

    def __init__(self, config: OmniFusionConfig):
        super().__init__()
        self.transformer_layer = OmniFusionAdapterEncoderLayer(config)
        self.linear = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.transformer_layer(image_features))


class OmniFusionMLPAdapter(nn.Module):
    """Linear-activation-Linear from the encoder width (`input_width`, default the vision encoder's) to the LM width
    (the paper's best single-encoder adapter)."""

    def __init__(self, config: OmniFusionConfig, input_width: int | None = None):
        super().__init__()
        hidden = config.adapter_hidden_size or config.text_config.hidden_size
        self.linear_1 = nn.Linear(input_width or config.vision_config.hidden_size, hidden)
        self.act = ACT2FN[config.adapter_hidden_act]
        self.linear_2 = nn.Linear(hidden, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class OmniFusionLinearAdapter(nn.Module):
    """A single Linear from the encoder width (`input_width`, default the vision encoder's) to the LM width."""

    def __init__(self, config: OmniFusionConfig, input_width: int | None = None):
        super().__init__()
        self.linear = nn.Linear(input_width or config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


class OmniFusionLayerMix(nn.Module):
    """
    One encoder's share of the "projection & summation" adapter: every hidden state gets its own LayerNorm and Linear,
    and the results are combined with one trainable coefficient per hidden state (`layer_weights`, `[num_layers]`).
    """

    def __init__(self, num_layers: int, in_width: int, out_width: int, layer_norm_eps: float):
        super().__init__()
        self.layer_norms = nn.ModuleList(nn.LayerNorm(in_width, eps=layer_norm_eps) for _ in range(num_layers))
        self.layer_projections = nn.ModuleList(nn.Linear(in_width, out_width) for _ in range(num_layers))
        self.layer_weights = nn.Parameter(torch.full((num_layers,), 1.0 / num_layers))

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """`hidden_states`: `num_layers` tensors `[num_views, num_patches, in_width]`; returns
        `[num_views, num_patches, out_width]`."""
        if len(hidden_states) != len(self.layer_projections):
            raise ValueError(
                f"mix_sum adapter expects {len(self.layer_projections)} hidden states per encoder, "
                f"got {len(hidden_states)}"
            )
        mixed = 0
        for weight, norm, projection, states in zip(
            self.layer_weights.unbind(0), self.layer_norms, self.layer_projections, hidden_states
        ):
            mixed = mixed + weight * projection(norm(states))
        return mixed


class OmniFusionMixSumAdapter(nn.Module):
    """
    The report's "projection & summation" adapter (its variant 3, the best of Table 5): all hidden states of every
    encoder through `OmniFusionLayerMix`, the encoders' sequences summed (the shorter right-padded with zeros), then
    the activation (GELU) and a final Linear to the LM width. Output length: the longest encoder sequence.
    """

    def __init__(self, config: OmniFusionConfig):
        super().__init__()
        width = config.mix_adapter_width
        self.encoder_mixes = nn.ModuleList(
            OmniFusionLayerMix(vision.num_hidden_layers + 1, vision.hidden_size, width, config.adapter_layer_norm_eps)
            for vision in config.vision_configs
        )
        self.act = ACT2FN[config.adapter_hidden_act]
        self.linear = nn.Linear(width, config.text_config.hidden_size)

    def forward(self, encoder_features: list[list[torch.Tensor]]) -> torch.Tensor:
        mixed = [mix(features) for mix, features in zip(self.encoder_mixes, encoder_features)]
        length = max(sequence.shape[1] for sequence in mixed)
        summed = sum(nn.functional.pad(sequence, (0, 0, 0, length - sequence.shape[1])) for sequence in mixed)
        return self.linear(self.act(summed))


class OmniFusionMixConcatAdapter(nn.Module):
    """
    The report's "embedding concatenation" adapter (variant 2): each encoder's `vision_feature_layer` features
    through its own Linear, the sequences concatenated (config order), one post-norm transformer layer, then a Linear
    to the LM width. Output length: the sum of the encoders' sequence lengths.
    """

    def __init__(self, config: OmniFusionConfig):
        super().__init__()
        width = config.mix_adapter_width
        self.encoder_projections = nn.ModuleList(
            nn.Linear(vision.hidden_size, width) for vision in config.vision_configs
        )
        self.transformer_layer = OmniFusionAdapterEncoderLayer(config, width=width)
        self.linear = nn.Linear(width, config.text_config.hidden_size)

    def forward(self, encoder_features: list[list[torch.Tensor]]) -> torch.Tensor:
        projected = [
            projection(features[-1]) for projection, features in zip(self.encoder_projections, encoder_features)
        ]
        return self.linear(self.transformer_layer(torch.cat(projected, dim=1)))


ADAPTER_CLASSES = {
    "transformer": OmniFusionTransformerAdapter,
    "mlp": OmniFusionMLPAdapter,
    "linear": OmniFusionLinearAdapter,
    "mix_sum": OmniFusionMixSumAdapter,
    "mix_concat": OmniFusionMixConcatAdapter,
}


def build_audio_adapter(config: OmniFusionConfig) -> nn.Module:
    """The `audio_adapter`: `config.audio_adapter_type` from the audio encoder's width to the LM width."""
    return ADAPTER_CLASSES[config.audio_adapter_type](config, input_width=config.audio_config.d_model)


__all__ = [
    "ADAPTER_CLASSES",
    "build_audio_adapter",
    "MIX_ADAPTER_TYPES",
    "OmniFusionAdapterEncoderLayer",
    "OmniFusionAdapterSelfAttention",
    "OmniFusionLayerMix",
    "OmniFusionLinearAdapter",
    "OmniFusionMLPAdapter",
    "OmniFusionMixConcatAdapter",
    "OmniFusionMixSumAdapter",
    "OmniFusionTransformerAdapter",
]
