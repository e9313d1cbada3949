"""OmniFusion: frozen vision (and audio) encoders, small adapters and a decoder LM, with learned input-only markers."""

import os

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .adapters_omnifusion import (
    ADAPTER_CLASSES,
    OmniFusionAdapterSelfAttention,
    OmniFusionLayerMix,
    build_audio_adapter,
)
from .audio_omnifusion import audio_position_mask, build_audio_tower, expand_groups
from .compat_omnifusion import (
    OUTPUT_CACHE_FIELD,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
    cache_argument_name,
    hidden_states_request,
    output_cache,
    slice_logits_to_keep,
)
from .config_checks_omnifusion import check_config_against_weights
from .configuration_omnifusion import (
    MIX_ADAPTER_TYPES,
    OmniFusionConfig,
    check_vision_feature_layer,
    num_vision_prefix_tokens,
)
from .hub_omnifusion import build_model_card, hub_model_id, staged_save
from .input_checks_omnifusion import (
    check_finite_pixels,
    check_generation_config_file,
    check_generation_settings,
    check_prompt,
    check_prompt_ids,
    non_finite_weights,
    prompt_positions,
)
from .kernels_omnifusion import decode_attention_mask, single_position_kernels
from .quantization_omnifusion import (
    compute_dtype,
    declared_modules_present,
    keep_requested_dtype,
    not_quantized_modules,
)
from .video_omnifusion import build_video_adapter, expand_video_frames, video_features


def embed_with_markers(
    text_embedding, marker_table: nn.Embedding, input_ids: torch.LongTensor, marker_ids: torch.Tensor
) -> torch.Tensor:
    """Embed `input_ids`: marker ids from `marker_table` (row i for `marker_ids[i]`), the rest by `text_embedding`."""
    matches = input_ids.unsqueeze(-1) == marker_ids
    is_marker = matches.any(-1)
    text_embeds = text_embedding(input_ids.masked_fill(is_marker, 0))
    marker_embeds = marker_table(matches.int().argmax(-1))
    return torch.where(is_marker.unsqueeze(-1), marker_embeds.to(text_embeds.dtype), text_embeds)


class OmniFusionTokenEmbedding(nn.Embedding):
    """
    The LM's token embedding table extended with the markers: a small table of learned, input-only vectors.

    `weight` is the LM's own `[vocab_size, hidden]` table (so LM checkpoints load unchanged and the LM head may stay
    tied to it); the marker table `special_embeddings` holds one row per id in `special_token_ids`, in the order
    [image placeholder, image start, image end, user, assistant], then [audio placeholder, audio start, audio end]
    for a model with sound. Calling the module embeds every id the processor emits; placeholder rows are overwritten
    by image or audio features afterwards.
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
        marker_ids = self._special_ids(input_ids.device)
        return embed_with_markers(super().forward, self.special_embeddings, input_ids, marker_ids)

    def restrict_marker_gradient(self, token_ids: list[int]):
        """
        Let gradients reach only the marker rows of `token_ids` (e.g. the three audio ids): the other rows' gradient
        is zeroed by a hook on `special_embeddings.weight`. Returns the hook handle (`.remove()` undoes it). With
        AdamW, give the table no weight decay, or the other rows still change.
        """
        unknown = sorted(set(token_ids) - set(self.special_token_ids))
        if unknown:
            raise ValueError(f"ids {unknown} are not marker ids (the marker table holds {self.special_token_ids})")
        keep = torch.tensor([token in token_ids for token in self.special_token_ids]).unsqueeze(-1)
        return self.special_embeddings.weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))


def _sub_configs(config: OmniFusionConfig) -> list:
    """The sub-configs of `config`: the text config, every vision encoder's config and the audio encoder's."""
    return [sub for sub in (config.text_config, *config.vision_configs, config.audio_config) if sub is not None]


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
    # Left unquantized by transformers' quantizers (see quantization_omnifusion); `_get_dtype_plan` keeps their dtype.
    _keep_in_fp32_modules = not_quantized_modules()

    # Checked for NaN/Inf when a folder is loaded (a cheap scan: the parts a broken training run or file spoils first).
    _finite_check_prefixes = (
        "lm_head.",
        "model.language_model.embed_tokens.",
        "model.adapter.",
        "model.audio_adapter.",
        "model.video_adapter.",
        "language_model.embed_tokens.",
        "adapter.",
        "audio_adapter.",
        "video_adapter.",
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, after checking the folder's generation settings and its config against
        its weights file (`check_config_against_weights`) and before returning, a `ValueError` if the LM head, the
        token embeddings, the markers or the adapter hold NaN or Inf values."""
        check_generation_config_file(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        # None: weights from `state_dict=` with `config=`, no folder to check
        path = "" if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
        folder = os.path.join(path, kwargs.get("subfolder") or "")
        if path and os.path.isdir(folder):
            config = kwargs.get("config")
            if not isinstance(config, OmniFusionConfig):
                config = cls.config_class.from_pretrained(folder)
            check_config_against_weights(config, folder)
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
        """
        Save weights, config, generation config, the remote code with `auto_map` for every Auto class, and a model
        card (`build_model_card`, unless the folder already has a `README.md`).

        The sub-configs' `_name_or_path` is saved as the Hub id it stands for, or empty (`hub_model_id`): a saved
        folder names no local path. The main process writes into a staging folder beside `save_directory` and moves
        the files into place when all are written (`staged_save`: a full disk leaves `save_directory` as it was),
        every file with the mode a new file gets under the umask.
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
        if not kwargs.get("is_main_process", True) or os.path.isfile(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)  # only the main process writes a folder
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(save_directory)))
        has_card = os.path.exists(os.path.join(save_directory, "README.md"))
        with staged_save(save_directory) as folder:
            super().save_pretrained(folder, *args, **kwargs)
            if not has_card:
                build_model_card(self.config).save(os.path.join(folder, "README.md"))

    def post_init(self):
        super().post_init()
        self._keep_in_fp32_modules = declared_modules_present(self, self._keep_in_fp32_modules)

    def _get_dtype_plan(self, dtype: torch.dtype) -> dict:
        """transformers' plan without the modules declared only to stay unquantized: they load in `dtype`."""
        return keep_requested_dtype(super()._get_dtype_plan(dtype))

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OmniFusionAdapterSelfAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        if isinstance(module, OmniFusionLayerMix):
            init.constant_(module.layer_weights, 1.0 / module.layer_weights.numel())
        if isinstance(module, OmniFusionTokenEmbedding):
            # The released markers were drawn from N(0, 1/sqrt(hidden)), the scale of a typical token embedding.
            init.normal_(module.special_embeddings.weight, std=module.embedding_dim**-0.5)


def build_vision_tower(config: OmniFusionConfig) -> nn.Module:
    """One encoder as is (the released layout), several as an `nn.ModuleList` in config order."""
    if config.additional_vision_configs:
        return nn.ModuleList(AutoModel.from_config(vision) for vision in config.vision_configs)
    return AutoModel.from_config(config.vision_config)


class OmniFusionModel(OmniFusionPreTrainedModel):
    """Vision tower + adapter (+ audio tower + audio adapter) + decoder LM (no LM head). What `AutoModel` loads."""

    def __init__(self, config: OmniFusionConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.adapter = ADAPTER_CLASSES[config.adapter_type](config)
        if config.audio_config is not None:
            self.audio_tower = build_audio_tower(config)
            self.audio_adapter = build_audio_adapter(config)
            self.input_modalities = ("image", "audio", "text")
        if config.video_num_frames is not None:  # frames share the vision tower; a separate adapter if configured
            self.video_adapter = build_video_adapter(config)
            self.input_modalities = ("image", "video", *self.input_modalities[1:])
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
        self._language_model_cache_argument = cache_argument_name(self.language_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        """
        Make `value` the LM's input embeddings: `get_input_embeddings()` returns `value` itself and its own `forward`
        embeds the text ids. The learned markers stay: a module without a `special_embeddings` table gets the current
        one attached as a submodule (same weight name, `language_model.embed_tokens.special_embeddings.weight`), and
        `forward` embeds the marker ids from it. An `OmniFusionTokenEmbedding` brings its own table.
        """
        if not hasattr(value, "special_embeddings"):
            value.special_embeddings = self.get_input_embeddings().special_embeddings
        self.language_model.set_input_embeddings(value)

    def embed_ids(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Embed every id the processor emits: text ids by the LM's input embeddings, marker ids by the marker table."""
        embeddings = self.get_input_embeddings()
        if isinstance(embeddings, OmniFusionTokenEmbedding) or not hasattr(embeddings, "special_embeddings"):
            return embeddings(input_ids)
        marker_ids = torch.tensor(self.config.special_token_ids, device=input_ids.device)
        return embed_with_markers(embeddings, embeddings.special_embeddings, input_ids, marker_ids)

    @can_return_tuple
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
            pixel_values: `[num_views, channels, height, width]` with one encoder; with several,
                `[num_views, num_encoders, channels, height, width]` (see `_encoder_pixel_values`). A view is an image,
                or with `image_grid_pinpoints` one tile or the global view of an image, in placeholder order.
            output_hidden_states: `True` (or the vision config's `output_hidden_states`) returns every vision hidden
                state; otherwise only the ones the adapter reads are kept (the others are `None`).
            return_dict: `False` returns `to_tuple()` of the output.

        Returns:
            The (first) vision tower's output whose `pooler_output` is the adapter output, a `[num_views,
            num_image_tokens, text_hidden]` tensor (one row per view; one view per image without tiles). A tensor, not
            a list per view: vLLM's Transformers backend takes a list as one entry per image, but splits a tensor
            into images by the processor's `num_image_patches` (views per image), which is what tiles need.
        """
        check_finite_pixels(pixel_values)
        adapter = kwargs.pop("adapter", None) or self.adapter  # `get_video_features` passes the video adapter
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if self.config.adapter_type != "mix_sum":  # mix_sum reads every hidden state
            for vision_config in self.config.vision_configs:
                check_vision_feature_layer(layer, vision_config)
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.vision_config.output_hidden_states or self.config.output_hidden_states
        towers = self.vision_tower if isinstance(self.vision_tower, nn.ModuleList) else [self.vision_tower]
        encoder_features, image_outputs = [], None
        for index, (tower, vision_config) in enumerate(zip(towers, self.config.vision_configs)):
            layers = self.config.vision_feature_layers(vision_config)
            if self.config.adapter_type != "mix_sum":
                layers = [layer]  # the call's `vision_feature_layer` overrides the config's
            outputs = tower(
                self._encoder_pixel_values(pixel_values, index, vision_config).to(compute_dtype(tower, self.dtype)),
                # Asking for the layers used keeps only those hidden states (transformers 5.24+ output capturing).
                output_hidden_states=True if output_hidden_states else hidden_states_request(layers),
                return_dict=True,
                **kwargs,
            )
            prefix = num_vision_prefix_tokens(vision_config) if strategy == "default" else 0
            encoder_features.append([outputs.hidden_states[i][:, prefix:] for i in layers])
            if image_outputs is None:
                image_outputs = outputs
        adapter_dtype = compute_dtype(adapter, self.dtype)
        encoder_features = [[states.to(adapter_dtype) for states in layers] for layers in encoder_features]
        if self.config.adapter_type in MIX_ADAPTER_TYPES:
            image_embeds = adapter(encoder_features)
        else:
            image_embeds = adapter(encoder_features[0][0])
        if vision_feature_select_strategy is None and image_embeds.shape[1] != self.config.num_image_tokens:
            raise ValueError(
                f"The {self.config.adapter_type} adapter returned {image_embeds.shape[1]} positions per view but the "
                f"config (and so the processor) lays out num_image_tokens={self.config.num_image_tokens}"
            )
        image_outputs.pooler_output = image_embeds
        return image_outputs

    def _encoder_pixel_values(self, pixel_values: torch.Tensor, index: int, vision_config) -> torch.Tensor:
        """
        The `[num_views, 3, size, size]` input of encoder `index`: `pixel_values` itself with one encoder; with
        several, `pixel_values` is `[num_views, num_encoders, 3, height, width]`, each encoder's views zero-padded at
        the bottom/right to the largest encoder size, and encoder `index` reads its own `image_size` corner.
        """
        if not self.config.additional_vision_configs:
            return pixel_values
        num_encoders = len(self.config.vision_configs)
        size = vision_config.image_size
        if pixel_values.dim() != 5 or pixel_values.shape[1] != num_encoders or min(pixel_values.shape[-2:]) < size:
            raise ValueError(
                f"pixel_values for {num_encoders} vision encoders must be [num_views, {num_encoders}, 3, height, "
                f"width] with height and width at least each encoder's image_size (encoder {index}: {size}), got "
                f"{list(pixel_values.shape)}; build the inputs with the model's OmniFusionProcessor"
            )
        return pixel_values[:, index, :, :size, :size]

    @can_return_tuple
    def get_video_features(self, pixel_values_videos: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """Encode video frames and project them into the LM's embedding space; see `video_omnifusion.video_features`
        (`pooler_output`: `[total frames, num_video_frame_tokens, text hidden]`)."""
        return video_features(self, pixel_values_videos, **kwargs)

    def get_audio_positions(
        self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.BoolTensor, object]:
        """
        The audio tower's side of `get_audio_features`, before the audio adapter: `(positions, real, outputs)`, with
        `positions` `[clips, window positions, audio width]` (the encoder frames average-pooled by
        `audio_pool_stride`), `real` `[clips, window positions]` (True on the positions that hold each clip's sound,
        first) and the tower's `outputs`. Arguments as for `get_audio_features`.
        """
        if getattr(self, "audio_tower", None) is None:
            raise ValueError("This OmniFusion model has no audio encoder (config.audio_config is None).")
        tower = self.audio_tower
        frame_stride = tower.conv1.stride[0] * tower.conv2.stride[0]
        window = self.config.audio_config.max_source_positions * frame_stride
        if input_features.dim() != 3 or input_features.shape[-1] != window:
            raise ValueError(
                f"input_features must be [clips, mel bins, {window}] (the audio encoder's whole window), got "
                f"{list(input_features.shape)}; build them with the model's OmniFusionProcessor, whose feature "
                f"extractor must pad to {window} frames"
            )
        if input_features_mask is None:
            input_features_mask = torch.ones(input_features.shape[::2], dtype=torch.long, device=input_features.device)
        outputs = tower(input_features.to(tower.conv1.weight.dtype), return_dict=True, **kwargs)
        pool = self.config.audio_pool_stride
        frames = outputs.last_hidden_state.transpose(1, 2)
        pooled = nn.functional.avg_pool1d(frames, pool, pool).transpose(1, 2)
        return pooled, audio_position_mask(input_features_mask.to(pooled.device), frame_stride, pool), outputs

    @can_return_tuple
    def get_audio_features(
        self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """
        Encode sound clips and project them into the LM's embedding space.

        Args:
            input_features: `[clips, mel bins, frames]` log-mel features of whole encoder windows (Whisper: 30 s,
                3000 frames), clips in placeholder order, from the processor's feature extractor.
            input_features_mask: `[clips, frames]`, 1 on each clip's real frames (first) and 0 on the window's
                padding; `None`: every frame is real.
            output_hidden_states, return_dict: as for `get_image_features`.

        Returns:
            The audio tower's output whose `pooler_output` is `[total positions of all clips, text_hidden]`: per clip
            its encoder frames average-pooled by `audio_pool_stride` and cut to its real duration (the window's
            padding never reaches the LM), then the audio adapter; clips follow each other.
        """
        pooled, real, outputs = self.get_audio_positions(input_features, input_features_mask, **kwargs)
        adapter_dtype = compute_dtype(self.audio_adapter, self.dtype)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.audio_adapter(pooled[real].to(adapter_dtype)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _placeholders_in(self, input_ids, inputs_embeds, token_id: int) -> torch.BoolTensor:
        """`[batch, seq]` mask of the positions holding placeholder `token_id` (from the ids, else the embeddings)."""
        if input_ids is not None:
            return input_ids == token_id
        placeholder = self.embed_ids(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == placeholder.to(inputs_embeds.dtype)).all(-1)

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor,
        modality: str = "image",
    ) -> torch.BoolTensor:
        """`[batch, seq, 1]` mask of the `modality` ("image" or "audio") placeholder positions; a `ValueError` naming
        both counts unless it matches the number of feature vectors."""
        mask = self._placeholders_in(input_ids, inputs_embeds, getattr(self.config, f"{modality}_token_id"))
        n_positions = mask.sum()
        if modality == "image":
            per_item = (
                f"({self.config.num_image_tokens} per image); the processor's num_image_tokens must equal this "
                f"model's config.num_image_tokens ({self.config.num_image_tokens})."
            )
        elif modality == "video":
            per_item = (
                f"({self.config.num_video_frame_tokens} per frame); the processor's num_video_frame_tokens must equal "
                f"this model's config.num_video_frame_tokens ({self.config.num_video_frame_tokens})."
            )
        else:
            per_item = (
                "(each clip's count follows from its duration: the processor's audio_pool_stride must equal this "
                f"model's config.audio_pool_stride ({self.config.audio_pool_stride}))."
            )
        torch_compilable_check(
            n_positions == image_features.shape[0],
            lambda: (
                f"{modality.capitalize()} features and {modality} placeholder tokens do not match: {int(n_positions)} "
                f"placeholder positions in the input but {image_features.shape[0]} {modality} feature vectors "
                + per_item
            ),
        )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    def _encode_media(self, input_ids, inputs_embeds, cache, encoded: dict, raw: dict, **encoder_kwargs) -> dict:
        """
        `{modality: encoder output}` for every modality with inputs: pre-encoded (`encoded`, e.g. from `generate`)
        or raw (`raw[modality]`: the keyword arguments of its `get_<modality>_features`). A modality whose placeholders
        are all in `cache` already (continuing a prompt) is skipped: its features were merged into that prefix.
        """
        outputs = {}
        for modality, inputs in raw.items():
            if inputs is not None and encoded.get(modality) is not None:
                raise ValueError(f"Pass either raw {modality} inputs or pre-encoded `mm_encoder_outputs`, not both.")
            output = encoded.get(modality)
            if output is None and inputs is None:
                continue
            if cache is not None and cache.get_seq_length() > 0:
                token_id = getattr(self.config, f"{modality}_token_id")
                if not self._placeholders_in(input_ids, inputs_embeds, token_id).any():
                    continue
            if output is None:
                encode = getattr(self, f"get_{modality}_features")
                output = encode(**inputs, **encoder_kwargs.get(modality, {}), return_dict=True)
            outputs[modality] = output
        return outputs

    def merge_features(self, input_ids, inputs_embeds: torch.Tensor, media_outputs: dict) -> torch.Tensor:
        """`inputs_embeds` with each modality's `pooler_output` scattered, in order, into its placeholder positions."""
        for modality, output in media_outputs.items():
            features = output.pooler_output
            features = torch.cat(list(features), dim=0) if modality != "audio" else features
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, features, modality=modality)
            inputs_embeds = inputs_embeds.masked_scatter(mask, features)
        return inputs_embeds

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalBaseModelOutputWithPast:
        """
        Args:
            pixel_values: `[num_views, 3, height, width]` (see `get_image_features`), views in placeholder order.
            input_features, input_features_mask: `[clips, mel bins, frames]` and `[clips, frames]`, clips in
                placeholder order (see `get_audio_features`).
            mm_encoder_outputs: `{"image": ..., "audio": ..., "video": ...}` outputs of `get_image_features` /
                `get_audio_features` / `get_video_features`, instead of the raw inputs.
            pixel_values_videos: `[total frames, 3, height, width]`, frames of videos in placeholder order (see
                `get_video_features`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("OmniFusionModel.forward needs exactly one of `input_ids` or `inputs_embeds`.")
        max_positions, limit_name = prompt_positions(self.config.text_config)
        past_length = cache.get_seq_length() if cache is not None else 0
        check_prompt(input_ids, inputs_embeds, past_length, max_positions, position_ids, limit_name)

        if inputs_embeds is None:
            check_prompt_ids(input_ids, getattr(self.get_input_embeddings(), "num_embeddings", None), self.config)
            inputs_embeds = self.embed_ids(input_ids)

        raw = {
            "image": None if pixel_values is None else {"pixel_values": pixel_values},
            "audio": None
            if input_features is None
            else {"input_features": input_features, "input_features_mask": input_features_mask},
            "video": None if pixel_values_videos is None else {"pixel_values_videos": pixel_values_videos},
        }
        image_options = {
            "vision_feature_layer": vision_feature_layer,
            "vision_feature_select_strategy": vision_feature_select_strategy,
        }
        media_outputs = self._encode_media(
            input_ids, inputs_embeds, cache, dict(mm_encoder_outputs or {}), raw, image=image_options
        )
        inputs_embeds = self.merge_features(input_ids, inputs_embeds, media_outputs)

        # The decoder takes the cache as `cache` on transformers 5.24+, as `past_key_values` on older releases.
        kwargs[self._language_model_cache_argument] = cache
        attention_mask = decode_attention_mask(attention_mask, inputs_embeds, past_length, self.config.text_config)
        with single_position_kernels(inputs_embeds):
            outputs = self.language_model(
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{OUTPUT_CACHE_FIELD: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=media_outputs.get("image"),
        )


class OmniFusionForCausalLM(OmniFusionPreTrainedModel, GenerationMixin):
    """OmniFusion with the LM head: training loss, logits and `generate()`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _keep_in_fp32_modules = not_quantized_modules("model.", head="lm_head")
    # The LM's plan shards `embed_tokens` (vocab-parallel); the head tied to it is sharded with it, as in the LMs.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: OmniFusionConfig):
        super().__init__(config)
        self.model = OmniFusionModel(config)
        self.input_modalities = self.model.input_modalities  # `generate` encodes images and videos once, up front
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_audio_features(
        self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        return self.model.get_audio_features(input_features, input_features_mask, **kwargs)

    def get_video_features(self, pixel_values_videos: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_video_features(pixel_values_videos, **kwargs)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder=False, input_ids=None, **kwargs):
        """
        `GenerationMixin`'s expansion for beam search and `num_return_sequences`, keeping every prompt's clips in
        order: the per-clip tensors (`input_features`, `input_features_mask`) and pre-encoded audio positions are
        repeated as whole groups per prompt ([a, b] -> [a, b, a, b]) instead of clip by clip ([a, a, b, b]); so are
        raw video frames (`pixel_values_videos`, when `generate` has not encoded them up front).
        """
        per_clip = {}
        if expand_size > 1 and getattr(self.config, "audio_config", None) is not None:
            # With `inputs_embeds` only, `generate` passes empty `input_ids`: count the placeholders in the embeddings.
            ids = input_ids if input_ids is not None and input_ids.numel() else None
            embeds = kwargs.get("inputs_embeds")
            clips = self.model._placeholders_in(ids, embeds, self.config.audio_start_token_id).sum(-1)
            per_clip = {
                name: expand_groups(kwargs.pop(name), clips, expand_size, name)
                for name in ("input_features", "input_features_mask")
                if isinstance(kwargs.get(name), torch.Tensor)
            }
            audio_outputs = (kwargs.get("mm_encoder_outputs") or {}).get("audio")
            if audio_outputs is not None:  # a new output object: the caller's stays as it was
                positions = self.model._placeholders_in(ids, embeds, self.config.audio_token_id).sum(-1)
                expanded = expand_groups(audio_outputs.pooler_output, positions, expand_size)
                audio_outputs = type(audio_outputs)(**{**audio_outputs, "pooler_output": expanded})
                kwargs["mm_encoder_outputs"] = {**kwargs["mm_encoder_outputs"], "audio": audio_outputs}
        per_clip.update(expand_video_frames(self, input_ids, kwargs, expand_size))
        input_ids, kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **kwargs
        )
        kwargs.update(per_clip)
        return input_ids, kwargs

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, after a `TypeError` check of the generation settings' types (a mistyped
        `generation_config.json` value such as `"do_sample": "false"` would otherwise sample, or fail deep inside)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        check_generation_settings(generation_config.to_dict(), "generation_config")
        check_generation_settings(kwargs, "generate()")
        return super().generate(*args, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalCausalLMOutputWithPast:
        """
        Args:
            input_ids: `[batch, seq]` ids from `OmniFusionProcessor`, image and audio blocks already expanded.
            pixel_values: `[num_images, 3, height, width]`, images in the order their placeholders appear.
            input_features, input_features_mask: `[clips, mel bins, frames]`, `[clips, frames]`, clips in the order
                their placeholders appear (see `OmniFusionModel.get_audio_features`).
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
            input_features=input_features,
            input_features_mask=input_features_mask,
            pixel_values_videos=pixel_values_videos,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        with single_position_kernels(hidden_states):
            logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{OUTPUT_CACHE_FIELD: output_cache(outputs)},
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
