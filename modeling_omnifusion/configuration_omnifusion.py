"""OmniFusion configuration: one or several vision encoders, an optional audio encoder, their adapters and a
decoder-only language model."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .compat_omnifusion import NATIVE_SUB_CONFIG_SPEC, SubConfigSpec, legacy_sub_configs, resolve_sub_configs
from .config_checks_omnifusion import check_image_positions, check_sub_config_sizes, config_file_named
from .video_omnifusion import VIDEO_FIELDS, VIDEO_TOKEN_FIELDS, check_video_config, video_frame_positions

# Order of the rows of the learned marker table (`OmniFusionTokenEmbedding.special_embeddings`).
SPECIAL_TOKEN_FIELDS = (
    "image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "user_token_id",
    "assistant_token_id",
)
# Rows appended after the image rows when the config has an audio encoder; the `<audio>` placeholder id is the
# smallest of the three (vLLM takes a block's most frequent id, ties going to the smallest).
AUDIO_TOKEN_FIELDS = ("audio_token_id", "audio_start_token_id", "audio_end_token_id")
AUDIO_ENCODER_TYPES = ("whisper",)


MIX_ADAPTER_TYPES = ("mix_sum", "mix_concat")


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


def _as_vision_config(entry, index: int) -> PreTrainedConfig:
    """A vision config from a config object or a dict naming its `model_type`."""
    if isinstance(entry, PreTrainedConfig):
        return entry
    if isinstance(entry, dict) and entry.get("model_type"):
        entry = dict(entry)
        return AutoConfig.for_model(entry.pop("model_type"), **entry)
    raise TypeError(
        f"OmniFusionConfig vision_config[{index}] must be a vision config or a dict with its `model_type`, "
        f"got {type(entry).__name__}"
    )


def _as_audio_config(entry) -> PreTrainedConfig:
    """An audio encoder config from a config object or a dict naming its `model_type` (Whisper for now)."""
    if isinstance(entry, dict) and entry.get("model_type"):
        entry = dict(entry)
        entry = AutoConfig.for_model(entry.pop("model_type"), **entry)
    if not isinstance(entry, PreTrainedConfig):
        raise TypeError(
            f"OmniFusionConfig audio_config must be an audio encoder config or a dict with its `model_type`, got "
            f"{type(entry).__name__}"
        )
    if entry.model_type not in AUDIO_ENCODER_TYPES:
        raise ValueError(
            f"OmniFusionConfig audio_config: {entry.model_type!r} encoders are not supported; use one of "
            f"{list(AUDIO_ENCODER_TYPES)}"
        )
    return entry


def _describe_encoder(index: int, vision_config) -> str:
    name = vision_config._name_or_path or vision_config.model_type
    return f"vision_config[{index}] ({name}, {vision_config.image_size}px)"


@strict
class OmniFusionConfig(PreTrainedConfig):
    r"""
    Configuration of an OmniFusion model.

    vision_config (`dict`, `PreTrainedConfig` or a list of them):
        Any transformers vision encoder config (CLIP vision by default; SigLIP and DINOv2 work too), or a list of
        them for several encoders (the report's pair: CLIP ViT-L/14-336 + DINOv2). A list is stored as
        `vision_config` (the first encoder) plus `additional_vision_configs` (the others), so single-encoder configs and
        saved folders are unchanged; `vision_configs` lists all of them. Several encoders need a mixing adapter.
    text_config (`dict` or `PreTrainedConfig`):
        Any decoder-only LM config (Mistral by default).
    adapter_type (`str`):
        `"transformer"` (the released adapter: one post-norm `nn.TransformerEncoderLayer`, then a Linear to the LM
        width), `"mlp"` (Linear-GELU-Linear) or `"linear"`: one encoder. For one or several encoders:
        `"mix_sum"`, the report's "projection & summation" (all hidden states of every encoder, a LayerNorm and a
        Linear per hidden state, trainable per-layer coefficients, the encoders' sequences summed with the shorter
        right-padded by zeros, GELU, a Linear to the LM width; positions per view: the longest encoder sequence), or
        `"mix_concat"`, "embedding concatenation" (each encoder's `vision_feature_layer` through its own Linear,
        concatenated along the sequence, one transformer layer, a Linear; positions: the sum of the sequences).
    adapter_num_heads, adapter_ffn_dim, adapter_dropout, adapter_activation, adapter_layer_norm_eps:
        Sizes of the transformer adapter (released: 4 heads, FFN 2048, dropout 0.1, ReLU, eps 1e-5).
    adapter_hidden_size, adapter_hidden_act:
        Hidden width and activation of the MLP adapter (width defaults to the LM width) and of the mix adapters
        (width defaults to the first encoder's width: the release's per-layer Linear(1024, 1024)).
    image_grid_pinpoints (`list[list[int]]`, *optional*):
        Tiling ("anyres", report 1.4): candidate `[height, width]` canvases in pixels, each a multiple of the
        encoders' image size, e.g. `[[672, 336], [336, 672], [672, 672]]` for 1x2, 2x1 and 2x2 tiles of 336 px.
        The processor resizes each image (aspect kept, bicubic) into the best-fitting canvas (the one keeping the
        most image pixels, then the least padding: transformers' `select_best_resolution`, as LLaVA-NeXT), pads it
        centred with black, cuts it into non-overlapping tiles in row-major order and adds the whole image resized to
        one tile as the global view. Every view is encoded and adapted on its own; an image becomes
        `num_views * num_image_tokens` positions inside one
        `<image_start>` ... `<image_end>` pair, with no separators. `None` (default): one view, as released.
    image_global_view_position (`str`):
        Where the global view goes among an image's views when tiling: `"first"` (default, as LLaVA-NeXT) or
        `"last"`.
    vision_feature_layer (`int`):
        Which vision hidden state feeds the adapter (released: -2).
    vision_feature_select_strategy (`str`):
        `"default"` drops the CLS/register tokens, `"full"` keeps them.
    image_token_id, image_start_token_id, image_end_token_id, user_token_id, assistant_token_id (`int`):
        Ids the processor emits for the image placeholder and the four learned markers. They are input-only: the LM
        head keeps the LM's vocabulary, so none of them can ever be generated.
    audio_config (`dict` or `PreTrainedConfig`, *optional*):
        The audio encoder's config (Whisper: its encoder half is the `audio_tower`), or `None` (default): a model
        without sound, whose saved `config.json` holds none of the audio fields below.
    audio_adapter_type (`str`):
        `"mlp"` (default: Linear-GELU-Linear, `adapter_hidden_size` wide, as the image MLP adapter) or `"linear"`,
        from the audio encoder's width to the LM width, applied to every pooled position on its own.
    audio_pool_stride (`int`):
        Average pooling of the encoder's frames (Qwen2-Audio's: 2, i.e. 25 positions per second of sound for Whisper).
        A clip of L mel frames takes `(((L - 1) // 2 + 1) - audio_pool_stride) // audio_pool_stride + 1` positions:
        only its real duration, never the padding of the encoder's 30 s window.
    audio_token_id, audio_start_token_id, audio_end_token_id (`int`):
        Ids of the `<audio>` placeholder and the `<audio_start>`/`<audio_end>` markers, input-only like the image
        ones; their learned rows follow the five image rows in the marker table.
    video_num_frames (`int`, *optional*):
        Frames the processor samples from a video by default (evenly spread), or `None` (default): a model without
        video, whose saved `config.json` holds none of the video fields below. Frames go through the vision
        tower(s) like untiled image views. docs/video.md has the options and the prompt layout.
    video_pool_size (`int`):
        Each frame's adapter output, a square grid of patches, is average-pooled by `video_pool_size` x
        `video_pool_size` windows (2, as LLaVA-NeXT-Video): a frame takes `(sqrt(num_image_tokens) //
        video_pool_size) ** 2` positions (`num_video_frame_tokens`), a video of F frames F times that.
    video_adapter (`str`):
        `"shared"` (default): frames go through the image adapter (no new weights; stage 1 trains the video markers
        only). `"separate"`: a `video_adapter` of the image adapter's type, initialised from its weights by
        `add_video`, trained on video while the image adapter (and so every image output) stays as it was.
    video_token_id, video_start_token_id, video_end_token_id (`int`):
        Ids of the `<video>` placeholder and the `<video_start>`/`<video_end>` markers; their learned rows follow the
        image rows (and the audio rows, with sound) in the marker table.
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
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
    }
    if not NATIVE_SUB_CONFIG_SPEC:  # transformers < 5.24 reads `sub_configs` (key -> class)
        sub_configs = legacy_sub_configs(sub_configs_defaults)

    vision_config: dict | PreTrainedConfig | list | None = None
    text_config: dict | PreTrainedConfig | None = None
    additional_vision_configs: list | None = None
    adapter_type: Literal["transformer", "mlp", "linear", "mix_sum", "mix_concat"] = "transformer"
    adapter_num_heads: int = 4
    adapter_ffn_dim: int = 2048
    adapter_dropout: float = 0.1
    adapter_activation: str = "relu"
    adapter_layer_norm_eps: float = 1e-5
    adapter_hidden_size: int | None = None
    adapter_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_grid_pinpoints: list | None = None
    image_global_view_position: Literal["first", "last"] = "first"
    image_token_id: int = 32000
    image_start_token_id: int = 32001
    image_end_token_id: int = 32002
    user_token_id: int = 32003
    assistant_token_id: int = 32004
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    audio_config: dict | PreTrainedConfig | None = None
    audio_adapter_type: Literal["mlp", "linear"] = "mlp"
    audio_pool_stride: int = 2
    audio_token_id: int = 32005
    audio_start_token_id: int = 32006
    audio_end_token_id: int = 32007
    video_num_frames: int | None = None
    video_pool_size: int = 2
    video_adapter: Literal["shared", "separate"] = "shared"
    video_token_id: int = 32008
    video_start_token_id: int = 32009
    video_end_token_id: int = 32010

    def __post_init__(self, **kwargs):
        saved_num_image_tokens = kwargs.pop("num_image_tokens", None)  # computed (a property); a saved value is checked
        if isinstance(self.vision_config, (list, tuple)):
            if not self.vision_config:
                raise ValueError("OmniFusionConfig vision_config is an empty list; give at least one vision config")
            if self.additional_vision_configs:
                raise ValueError("Pass several encoders either as a vision_config list or as additional_vision_configs")
            self.vision_config, *self.additional_vision_configs = self.vision_config
        self.additional_vision_configs = [
            _as_vision_config(entry, index) for index, entry in enumerate(self.additional_vision_configs or [], 1)
        ] or None
        if self.audio_config is not None:
            self.audio_config = _as_audio_config(self.audio_config)
        resolve_sub_configs(self)
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        ids = self.special_token_ids
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"OmniFusionConfig special token ids must be distinct, got {dict(zip(self.special_token_fields, ids))}"
            )
        check_sub_config_sizes(self)
        self._check_audio()
        self._check_encoders_combine()
        if saved_num_image_tokens is not None and saved_num_image_tokens != self.num_image_tokens:
            raise ValueError(
                f"num_image_tokens={saved_num_image_tokens!r} disagrees with the {self.num_image_tokens} image "
                "positions per view the vision config(s) give (image_size / patch_size, vision_feature_select_strategy"
                "); it is computed from them: remove the field"
            )
        self.check_image_grid_pinpoints()
        check_video_config(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedConfig.from_pretrained`; an invalid value in a local folder's `config.json` is a
        `ValueError`/`TypeError` naming the file and the field."""
        with config_file_named(pretrained_model_name_or_path, kwargs.get("subfolder")):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _check_encoders_combine(self):
        encoders = self.vision_configs
        if len(encoders) > 1 and self.adapter_type not in MIX_ADAPTER_TYPES:
            raise ValueError(
                f"adapter_type={self.adapter_type!r} reads one vision encoder, but the config has {len(encoders)}: "
                + ", ".join(_describe_encoder(i, v) for i, v in enumerate(encoders))
                + f"; use one of {list(MIX_ADAPTER_TYPES)}"
            )
        for index, vision in enumerate(encoders):
            if self.adapter_type != "mix_sum":  # mix_sum reads every hidden state
                check_vision_feature_layer(self.vision_feature_layer, vision)
            if vision.image_size % vision.patch_size:
                raise ValueError(
                    f"{_describe_encoder(index, vision)}: image_size is not a multiple of patch_size "
                    f"{vision.patch_size}"
                )

    def _check_audio(self):
        if self.audio_config is None:
            return
        if isinstance(self.audio_pool_stride, bool) or not isinstance(self.audio_pool_stride, int):
            raise TypeError(f"audio_pool_stride must be an int, got {self.audio_pool_stride!r:.80}")
        if self.audio_pool_stride < 1:
            raise ValueError(f"audio_pool_stride must be at least 1, got {self.audio_pool_stride}")
        if self.audio_token_id != min(self.audio_token_id, self.audio_start_token_id, self.audio_end_token_id):
            raise ValueError(
                f"audio_token_id ({self.audio_token_id}) must be the smallest of the three audio ids "
                f"(start {self.audio_start_token_id}, end {self.audio_end_token_id}): serving engines take a block's "
                "most frequent id, ties going to the smallest"
            )

    def check_image_grid_pinpoints(self):
        if self.image_grid_pinpoints is None:
            return
        pinpoints = self.image_grid_pinpoints
        if not pinpoints or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(type(v) is int and v > 0 for v in p) for p in pinpoints
        ):
            raise ValueError(
                f"image_grid_pinpoints must be a non-empty list of [height, width] pixel sizes, got {pinpoints!r}"
            )
        encoders = self.vision_configs
        first = encoders[0]
        for index, vision in enumerate(encoders[1:], 1):
            if vision.image_size != first.image_size:
                raise ValueError(
                    f"tiles need one tile size shared by every encoder, but {_describe_encoder(0, first)} and "
                    f"{_describe_encoder(index, vision)} differ: give both encoders the same image_size"
                )
        tile = first.image_size
        bad = [list(p) for p in pinpoints if p[0] % tile or p[1] % tile]
        if bad:
            raise ValueError(f"image_grid_pinpoints {bad} are not multiples of the tile size {tile}px")
        self.image_grid_pinpoints = [list(p) for p in pinpoints]
        check_image_positions(self.image_grid_pinpoints, tile, self.num_image_tokens, self.text_config)

    def to_dict(self) -> dict:
        output = super().to_dict()
        if self.additional_vision_configs:
            output["additional_vision_configs"] = [vision.to_dict() for vision in self.additional_vision_configs]
        if self.audio_config is None:  # no audio settings without sound; `audio_config` stays, as every sub-config
            for name in AUDIO_FIELDS:
                if name != "audio_config":
                    output.pop(name, None)
        for name in VIDEO_FIELDS if self.video_num_frames is None else ():  # nor video settings without video
            output.pop(name, None)
        return output

    def to_diff_dict(self) -> dict:
        output = super().to_diff_dict()
        if self.audio_config is None:  # a model without sound saves exactly the fields it always had
            for name in AUDIO_FIELDS:
                output.pop(name, None)
        for name in VIDEO_FIELDS if self.video_num_frames is None else ():
            output.pop(name, None)
        return output

    @property
    def processor_kwargs(self) -> dict:
        """The `OmniFusionProcessor` settings this config fixes: positions per view, the tiling layout and, with sound,
        the audio pooling."""
        kwargs = {
            "num_image_tokens": self.num_image_tokens,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "image_global_view_position": self.image_global_view_position,
        }
        if self.audio_config is not None:
            kwargs["audio_pool_stride"] = self.audio_pool_stride
        if self.video_num_frames is not None:
            kwargs.update(num_video_frame_tokens=self.num_video_frame_tokens, video_num_frames=self.video_num_frames)
        return kwargs

    @property
    def num_video_frame_tokens(self) -> int:
        """Positions per video frame (`video_frame_positions`); a video of F frames takes F times this many."""
        return video_frame_positions(self.num_image_tokens, self.video_pool_size)

    @property
    def vision_configs(self) -> list:
        """Every vision encoder's config, in order (`vision_config` first)."""
        return [self.vision_config, *(self.additional_vision_configs or [])]

    @property
    def mix_adapter_width(self) -> int:
        """Hidden width of the mix adapters (default: the first encoder's width)."""
        return self.adapter_hidden_size or self.vision_config.hidden_size

    def vision_feature_layers(self, vision_config) -> list[int]:
        """The hidden states of `vision_config`'s encoder the adapter reads: all of them for `mix_sum`."""
        if self.adapter_type == "mix_sum":
            return list(range(vision_config.num_hidden_layers + 1))
        return [self.vision_feature_layer]

    def encoder_num_image_tokens(self, vision_config) -> int:
        """Feature vectors one view gives from `vision_config`'s encoder after the select strategy."""
        num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
        if self.vision_feature_select_strategy == "full":
            num_patches += num_vision_prefix_tokens(vision_config)
        return num_patches

    @property
    def special_token_fields(self) -> tuple[str, ...]:
        """The names of the marker ids, in marker-table row order: the five image ones, then the audio ones when the
        config has an audio encoder."""
        audio = AUDIO_TOKEN_FIELDS if self.audio_config is not None else ()
        return SPECIAL_TOKEN_FIELDS + audio + (VIDEO_TOKEN_FIELDS if self.video_num_frames is not None else ())

    @property
    def special_token_ids(self) -> list[int]:
        """The ids of [image, image_start, image_end, user, assistant] (+ [audio, audio_start, audio_end] with sound,
        + [video, video_start, video_end] with video), in marker-table row order."""
        return [getattr(self, name) for name in self.special_token_fields]

    @property
    def num_image_tokens(self) -> int:
        """
        Image positions per view (per image without tiles): what the adapter outputs for one view and what the
        processor emits per view. With several encoders: the longest sequence (`mix_sum`) or their sum (`mix_concat`).
        """
        counts = [self.encoder_num_image_tokens(vision) for vision in self.vision_configs]
        return sum(counts) if self.adapter_type == "mix_concat" else max(counts)


AUDIO_FIELDS = ("audio_config", "audio_adapter_type", "audio_pool_stride", *AUDIO_TOKEN_FIELDS)


__all__ = ["AUDIO_TOKEN_FIELDS", "MIX_ADAPTER_TYPES", "OmniFusionConfig"]
