"""OmniFusion: a frozen vision encoder, a small adapter and a decoder LM, with learned input-only markers."""

import os

import torch
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import torch_compilable_check
from transformers.utils.generic import can_return_tuple

from .configuration_omnifusion import OmniFusionConfig, check_vision_feature_layer, num_vision_prefix_tokens
from .input_checks_omnifusion import (
    check_generation_config_file,
    check_generation_settings,
    check_prompt,
    non_finite_weights,
)


class OmniFusionTokenEmbedding(nn.Embedding):
    """
    The LM's token embedding table extended with a small table of learned, input-only vectors.

    `weight` is the LM's own `[vocab_size, hidden]` table (so LM checkpoints load unchanged and the LM head may stay
    tied to it); `special_embeddings` holds one row per id in `special_token_ids`, in the order
    [image placeholder, image start, image end, user, assistant]. Calling the module embeds every id the processor
    emits; image placeholder rows are overwritten by image features afterwards.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, special_token_ids: list[int], padding_idx=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.special_embeddings = nn.Embedding(len(special_token_ids), embedding_dim)
        self.special_token_ids = list(special_token_ids)
        self._special_ids_on_device = {}

    def _special_ids(self, device: torch.device) -> torch.Tensor:
        """The marker ids as a tensor on `device`, made once per device (not a buffer: loading skips those)."""
        if device not in self._special_ids_on_device:
            self._special_ids_on_device[device] = torch.tensor(self.special_token_ids, device=device)
        return self._special_ids_on_device[device]

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        matches = input_ids.unsqueeze(-1) == self._special_ids(input_ids.device)
        is_special = matches.any(-1)
        text_embeds = super().forward(input_ids.masked_fill(is_special, 0))
        special_embeds = self.special_embeddings(matches.int().argmax(-1))
        return torch.where(is_special.unsqueeze(-1), special_embeds.to(text_embeds.dtype), text_embeds)


class OmniFusionAdapterSelfAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter layout (packed `in_proj_weight`), on SDPA."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"adapter width {hidden_size} is not divisible by adapter_num_heads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        qkv = nn.functional.linear(hidden_states, self.in_proj_weight, self.in_proj_bias)
        query, key, value = qkv.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attention = nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(attention.transpose(1, 2).reshape(batch, length, width))


class OmniFusionAdapterEncoderLayer(nn.Module):
    """
    A post-norm transformer encoder layer, numerically `nn.TransformerEncoderLayer(batch_first=True, norm_first=False)`
    and with the same parameter names, so released adapters load by name. Every weight is used through a submodule
    call, which keeps device maps and offloading working.
    """

    def __init__(self, config: OmniFusionConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.self_attn = OmniFusionAdapterSelfAttention(width, config.adapter_num_heads, config.adapter_dropout)
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
    """Linear-activation-Linear from the vision width to the LM width (the paper's best single-encoder adapter)."""

    def __init__(self, config: OmniFusionConfig):
        super().__init__()
        hidden = config.adapter_hidden_size or config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, hidden)
        self.act = ACT2FN[config.adapter_hidden_act]
        self.linear_2 = nn.Linear(hidden, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class OmniFusionLinearAdapter(nn.Module):
    """A single Linear from the vision width to the LM width."""

    def __init__(self, config: OmniFusionConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


ADAPTER_CLASSES = {
    "transformer": OmniFusionTransformerAdapter,
    "mlp": OmniFusionMLPAdapter,
    "linear": OmniFusionLinearAdapter,
}


WIDGET_IMAGE_URL = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/bee.jpg"


def hub_model_id(name_or_path) -> str | None:
    """
    The Hub repo id that `name_or_path` (a `from_pretrained` argument) stands for, or `None` when none is known: a
    Hub id is returned as is, a folder inside the Hub cache (`.../models--owner--name/snapshots/<revision>/...`) as
    `owner/name`, and any other local path (existing, or written like one: `./x`, `/x`, `~/x`, `a/b/c`) as `None`,
    so that no local path is ever written into a saved folder.
    """
    name = os.fspath(name_or_path) if name_or_path else ""
    if not name:
        return None
    if os.path.exists(name):
        parts = os.path.normpath(os.path.abspath(name)).split(os.sep)
        cached = [part.removeprefix("models--") for part in parts if part.startswith("models--")]
        if not cached:
            return None
        name = cached[-1].replace("--", "/")
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _sub_configs(config: OmniFusionConfig) -> list:
    """The sub-configs of `config` (the vision and text configs)."""
    return [sub for key in config.sub_configs if (sub := getattr(config, key, None)) is not None]


def build_model_card(config: OmniFusionConfig) -> ModelCard:
    """A Hub model card: front matter for the image-text-to-text widget and a usage snippet.

    `base_model` lists the Hub ids of the sub-models when they are known (`hub_model_id`), and is left out otherwise.
    """
    base_models = list(dict.fromkeys(filter(None, (hub_model_id(sub._name_or_path) for sub in _sub_configs(config)))))
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        base_model=base_models or None,
        tags=["omnifusion", "multimodal", "vision-language", "image-text-to-text", "conversational", "custom_code"],
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
    vision = config.vision_config
    content = f"""---
{data.to_yaml()}
---

# OmniFusion

An OmniFusion vision-language model: a frozen {vision.model_type} vision encoder ({vision.image_size}px,
{config.num_image_tokens} image tokens from hidden layer {config.vision_feature_layer}), a `{config.adapter_type}`
adapter, learned image-start/end and user/assistant embeddings, and a {config.text_config.model_type} language model.

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


class OmniFusionPreTrainedModel(PreTrainedModel):
    config: OmniFusionConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    # Checked for NaN/Inf when a folder is loaded (a cheap scan: the parts a broken training run or file spoils first).
    _finite_check_prefixes = (
        "lm_head.",
        "model.language_model.embed_tokens.",
        "model.adapter.",
        "language_model.embed_tokens.",
        "adapter.",
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, after checking the folder's generation settings and before returning,
        a `ValueError` if the LM head, the token/marker embeddings or the adapter hold NaN or Inf values."""
        check_generation_config_file(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        broken = non_finite_weights(model, cls._finite_check_prefixes)
        if broken:
            raise ValueError(
                f"{pretrained_model_name_or_path}: weights with NaN or Inf values (count per tensor): {broken}. "
                "The model cannot give meaningful outputs; re-export or re-train it."
            )
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config, generation config, the remote code with `auto_map` for every Auto class, and a model card.

        The sub-configs' `_name_or_path` is saved as the Hub id it stands for, or empty (`hub_model_id`): a saved folder
        names no local path.
        """
        for sub_config in _sub_configs(self.config):
            sub_config._name_or_path = hub_model_id(sub_config._name_or_path) or ""
        if self._auto_class is not None:
            module = self.__class__.__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module}.OmniFusionModel",
                "AutoModelForCausalLM": f"{module}.OmniFusionForCausalLM",
                "AutoModelForImageTextToText": f"{module}.OmniFusionForCausalLM",
            }
        super().save_pretrained(save_directory, *args, **kwargs)
        card_path = os.path.join(save_directory, "README.md")
        if kwargs.get("is_main_process", True) and not os.path.exists(card_path):
            build_model_card(self.config).save(card_path)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OmniFusionAdapterSelfAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        if isinstance(module, OmniFusionTokenEmbedding):
            # The released markers were drawn from N(0, 1/sqrt(hidden)), the scale of a typical token embedding.
            init.normal_(module.special_embeddings.weight, std=module.embedding_dim**-0.5)


class OmniFusionModel(OmniFusionPreTrainedModel):
    """Vision tower + adapter + decoder LM (no LM head). This is what `AutoModel` loads."""

    def __init__(self, config: OmniFusionConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.adapter = ADAPTER_CLASSES[config.adapter_type](config)
        self.language_model = AutoModel.from_config(config.text_config)
        text_embeddings = self.language_model.get_input_embeddings()
        self.language_model.set_input_embeddings(
            OmniFusionTokenEmbedding(
                text_embeddings.num_embeddings,
                text_embeddings.embedding_dim,
                config.special_token_ids,
                padding_idx=text_embeddings.padding_idx,
            )
        )
        self.post_init()

    def get_input_embeddings(self) -> OmniFusionTokenEmbedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        if not isinstance(value, OmniFusionTokenEmbedding):
            markers = self.get_input_embeddings().special_embeddings
            wrapped = OmniFusionTokenEmbedding(
                value.num_embeddings, value.embedding_dim, self.config.special_token_ids, value.padding_idx
            ).to(device=value.weight.device, dtype=value.weight.dtype)
            wrapped.weight = value.weight
            wrapped.special_embeddings = markers
            value = wrapped
        self.language_model.set_input_embeddings(value)

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """
        Encode images and project them into the LM's embedding space.

        Args:
            pixel_values: `[num_images, channels, height, width]`.

        Returns:
            The vision tower's output whose `pooler_output` is a list with one `[num_image_tokens, text_hidden]`
            tensor per image (the adapter output).
        """
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        check_vision_feature_layer(layer, self.config.vision_config)
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        kwargs.pop("return_dict", None)
        kwargs.pop("output_hidden_states", None)
        tower_dtype = next(self.vision_tower.parameters()).dtype
        # Asking for the one layer used keeps only that hidden state (transformers 5 output capturing).
        image_outputs = self.vision_tower(
            pixel_values.to(tower_dtype), output_hidden_states=[layer], return_dict=True, **kwargs
        )
        image_features = image_outputs.hidden_states[layer]
        if strategy == "default":
            image_features = image_features[:, num_vision_prefix_tokens(self.config.vision_config) :]
        image_embeds = self.adapter(image_features.to(next(self.adapter.parameters()).dtype))
        image_outputs.pooler_output = list(image_embeds)
        return image_outputs

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.BoolTensor:
        """`[batch, seq, 1]` mask of the image placeholder positions; checks it matches the number of features."""
        if input_ids is None:
            placeholder = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == placeholder.to(inputs_embeds.dtype)).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_positions = mask.sum()
        torch_compilable_check(
            n_positions == image_features.shape[0],
            lambda: f"Image features and image placeholder tokens do not match: {int(n_positions)} placeholder "
            f"positions in the input but {image_features.shape[0]} image feature vectors "
            f"({self.config.num_image_tokens} per image); the processor's num_image_tokens must equal this "
            f"model's config.num_image_tokens ({self.config.num_image_tokens}).",
        )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> MultimodalBaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("OmniFusionModel.forward needs exactly one of `input_ids` or `inputs_embeds`.")
        if pixel_values is not None and mm_encoder_outputs:
            raise ValueError("Pass either `pixel_values` or pre-encoded `mm_encoder_outputs`, not both.")
        if "past_key_values" in kwargs and cache is None:
            cache = kwargs.pop("past_key_values")
        check_prompt(
            input_ids,
            inputs_embeds,
            cache.get_seq_length() if cache is not None else 0,
            getattr(self.config.text_config, "max_position_embeddings", None),
        )

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(
                pixel_values, vision_feature_layer, vision_feature_select_strategy
            )
        if image_outputs is not None:
            image_features = torch.cat(list(image_outputs.pooler_output), dim=0)
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
        )


class OmniFusionForCausalLM(OmniFusionPreTrainedModel, GenerationMixin):
    """OmniFusion with the LM head: training loss, logits and `generate()`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: OmniFusionConfig):
        super().__init__(config)
        self.model = OmniFusionModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> OmniFusionTokenEmbedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, after a `TypeError` check of the generation settings' types (a mistyped
        `generation_config.json` value such as `"do_sample": "false"` would otherwise sample, or fail deep inside)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        check_generation_settings(generation_config.to_dict(), "generation_config")
        check_generation_settings(kwargs, "generate()")
        return super().generate(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> MultimodalCausalLMOutputWithPast:
        """
        Args:
            input_ids: `[batch, seq]` ids from `OmniFusionProcessor`, image blocks already expanded.
            pixel_values: `[num_images, 3, height, width]`, images in the order their placeholders appear.
            labels: `[batch, seq]` target ids, -100 where no loss is taken; shifted inside the loss.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )


__all__ = [
    "OmniFusionForCausalLM",
    "OmniFusionModel",
    "OmniFusionPreTrainedModel",
    "OmniFusionTokenEmbedding",
]
