"""OmniFusion configuration: a vision encoder, an adapter and a decoder-only language model."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# Order of the rows of the learned marker table (`OmniFusionTokenEmbedding.special_embeddings`).
SPECIAL_TOKEN_FIELDS = (
    "image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "user_token_id",
    "assistant_token_id",
)


def num_vision_prefix_tokens(vision_config) -> int:
    """Number of non-patch tokens (CLS, registers) a vision tower puts before its patch tokens."""
    if vision_config.model_type.startswith("siglip"):
        return 0
    return 1 + int(getattr(vision_config, "num_register_tokens", 0) or 0)


def check_vision_feature_layer(layer, vision_config):
    """A `ValueError`/`TypeError` unless `layer` indexes the tower's hidden states (embeddings + one per layer)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"vision_feature_layer must be an int, got {type(layer).__name__}: {layer!r:.80}")
    num_layers = getattr(vision_config, "num_hidden_layers", None)
    if num_layers is not None and not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(
            f"vision_feature_layer={layer} is out of range for a {vision_config.model_type} tower with "
            f"{num_layers} layers: its hidden states are indexed {-(num_layers + 1)}..{num_layers}."
        )


@strict
class OmniFusionConfig(PreTrainedConfig):
    r"""
    Configuration of an OmniFusion model.

    vision_config (`dict` or `PreTrainedConfig`):
        Any transformers vision encoder config (CLIP vision by default; SigLIP and DINOv2 work too).
    text_config (`dict` or `PreTrainedConfig`):
        Any decoder-only LM config (Mistral by default).
    adapter_type (`str`):
        `"transformer"` (the released adapter: one post-norm `nn.TransformerEncoderLayer`, then a Linear to the LM
        width), `"mlp"` (Linear-GELU-Linear) or `"linear"`.
    adapter_num_heads, adapter_ffn_dim, adapter_dropout, adapter_activation, adapter_layer_norm_eps:
        Sizes of the transformer adapter (released: 4 heads, FFN 2048, dropout 0.1, ReLU, eps 1e-5).
    adapter_hidden_size, adapter_hidden_act:
        Hidden width (defaults to the LM width) and activation of the MLP adapter.
    vision_feature_layer (`int`):
        Which vision hidden state feeds the adapter (released: -2).
    vision_feature_select_strategy (`str`):
        `"default"` drops the CLS/register tokens, `"full"` keeps them.
    image_token_id, image_start_token_id, image_end_token_id, user_token_id, assistant_token_id (`int`):
        Ids the processor emits for the image placeholder and the four learned markers. They are input-only: the LM
        head keeps the LM's vocabulary, so none of them can ever be generated.
    """

    model_type = "omnifusion"

    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mistral"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    adapter_type: Literal["transformer", "mlp", "linear"] = "transformer"
    adapter_num_heads: int = 4
    adapter_ffn_dim: int = 2048
    adapter_dropout: float = 0.1
    adapter_activation: str = "relu"
    adapter_layer_norm_eps: float = 1e-5
    adapter_hidden_size: int | None = None
    adapter_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_token_id: int = 32000
    image_start_token_id: int = 32001
    image_end_token_id: int = 32002
    user_token_id: int = 32003
    assistant_token_id: int = 32004
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        check_vision_feature_layer(self.vision_feature_layer, self.vision_config)
        ids = self.special_token_ids
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"OmniFusionConfig special token ids must be distinct, got {dict(zip(SPECIAL_TOKEN_FIELDS, ids))}"
            )

    @property
    def special_token_ids(self) -> list[int]:
        """The ids of [image, image_start, image_end, user, assistant], in marker-table row order."""
        return [getattr(self, name) for name in SPECIAL_TOKEN_FIELDS]

    @property
    def num_image_tokens(self) -> int:
        """Image positions per image: what the adapter outputs and what the processor must emit."""
        vision = self.vision_config
        num_patches = (vision.image_size // vision.patch_size) ** 2
        if self.vision_feature_select_strategy == "full":
            num_patches += num_vision_prefix_tokens(vision)
        return num_patches


__all__ = ["OmniFusionConfig"]
