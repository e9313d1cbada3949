"""
The models the two stages train: a new OmniFusion built from a pretrained vision encoder (or several), a pretrained
LM and optionally a pretrained Whisper encoder (stage 1), an existing image model extended with sound (stage 1),
replacement encoders and tiles for an existing one (stage 2), and which parameters train. Everything is float32 (the
Trainer's `--bf16`/`--fp16` run autocast over float32 weights).
"""

import json
import logging

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    WhisperFeatureExtractor,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, cached_file

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor, add_sound
from modeling_omnifusion.conversion.convert_omnifusion_to_hf import vision_state_at_input_size
from modeling_omnifusion.hub_omnifusion import hub_model_id
from modeling_omnifusion.modeling_omnifusion import build_vision_tower
from modeling_omnifusion.processing.processing_omnifusion import image_processor_output_size
from modeling_omnifusion.processing.tokenizer_setup_omnifusion import (
    check_tokenizer_folder,
    rank_merges_by_sentencepiece_scores,
)
from modeling_omnifusion.quantization_omnifusion import compute_dtype

logger = logging.getLogger("omnifusion_training")  # the name the log lines show; `setup_run` sets its level


def load_vision_tower(name_or_path: str) -> nn.Module:
    """A pretrained vision encoder in float32; for a full CLIP/SigLIP checkpoint, only its vision model."""
    config = AutoConfig.from_pretrained(name_or_path)
    return AutoModel.from_pretrained(name_or_path, config=getattr(config, "vision_config", config), dtype=torch.float32)


def parse_vision_models(value: str) -> list[str]:
    """`--vision_model_name_or_path`: one folder/Hub id, or several comma-separated (`clip_dir,dinov2_dir`)."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--vision_model_name_or_path names no vision model: {value!r}")
    return names


def parse_grid_pinpoints(value: str | None) -> list[list[int]] | None:
    """`--image_grid_pinpoints` as JSON, e.g. '[[672, 336], [336, 672], [672, 672]]' (None: no tiles)."""
    if value is None or value.strip().lower() in ("", "none", "null"):
        return None
    try:
        pinpoints = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"--image_grid_pinpoints must be JSON like '[[672, 336], [672, 672]]', got {value!r}") from exc
    if not isinstance(pinpoints, list):
        raise ValueError(f"--image_grid_pinpoints must be a JSON list of [height, width] pairs, got {value!r}")
    return pinpoints


def load_vision_towers(
    names: list[str], one_input_size: bool, image_processors: list | None = None
) -> tuple[list, list, list[dict]]:
    """
    The pretrained encoders, their image processors (`image_processors`, default: each folder's own) and their
    weights. With several encoders and tiles every processor outputs the first's size (tiles are one size); DINOv2's
    position table is then interpolated to its processor's size with its own code (`vision_state_at_input_size`), as
    DINOv2 does at run time.
    """
    towers = [load_vision_tower(name) for name in names]
    if image_processors is None:
        image_processors = [AutoImageProcessor.from_pretrained(name) for name in names]
    if len(names) == 1:
        return [towers[0].config], image_processors, [towers[0].state_dict()]
    if one_input_size:
        size = image_processor_output_size(image_processors[0])
        for image_processor in image_processors[1:]:
            image_processor.size = {"shortest_edge": size}
            image_processor.crop_size = {"height": size, "width": size}
    configs, states = [], []
    for tower, image_processor in zip(towers, image_processors):
        size = image_processor_output_size(image_processor)
        states.append(vision_state_at_input_size(tower, size))
        configs.append(type(tower.config).from_dict({**tower.config.to_dict(), "image_size": size}))
    return configs, image_processors, states


# Where a Whisper folder keeps its encoder's weights: WhisperForConditionalGeneration, WhisperModel, or the
# encoder saved alone.
WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "")


def _checkpoint_state(name_or_path: str, flag: str) -> dict[str, torch.Tensor]:
    """Every tensor of the weights a model folder or Hub id holds: safetensors (sharded or not), else a
    `pytorch_model.bin` read with `weights_only=True`."""
    found = {
        name: cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False)
        for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME)
    }
    if found[SAFE_WEIGHTS_NAME]:
        return load_file(found[SAFE_WEIGHTS_NAME])
    if found[SAFE_WEIGHTS_INDEX_NAME]:
        with open(found[SAFE_WEIGHTS_INDEX_NAME], encoding="utf-8") as file:
            shards = sorted(set(json.load(file)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(cached_file(name_or_path, shard)))
        return state
    if found[WEIGHTS_NAME]:
        return torch.load(found[WEIGHTS_NAME], map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{flag} {name_or_path}: no weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME})."
    )


def whisper_feature_extractor(name_or_path: str, audio_config) -> WhisperFeatureExtractor:
    """
    The feature extractor of a Whisper folder (its `preprocessor_config.json`), or, for a folder without one, Whisper's
    own for `audio_config` (`num_mel_bins` bins over the encoder's window, 100 frames per second). A `ValueError` if a
    saved one does not fit the encoder (mel bins, window frames).
    """
    window_frames = audio_config.max_source_positions * 2  # the encoder's convolutions halve the mel frames
    try:
        feature_extractor = WhisperFeatureExtractor.from_pretrained(name_or_path)
    except OSError:  # no preprocessor_config.json
        logger.info("%s has no feature extractor: using Whisper's for a %d-frame window.", name_or_path, window_frames)
        return WhisperFeatureExtractor(feature_size=audio_config.num_mel_bins, chunk_length=window_frames // 100)
    if feature_extractor.feature_size != audio_config.num_mel_bins or feature_extractor.nb_max_frames != window_frames:
        raise ValueError(
            f"--audio_model_name_or_path {name_or_path}: its feature extractor gives {feature_extractor.feature_size} "
            f"mel bins x {feature_extractor.nb_max_frames} frames, but its encoder takes {audio_config.num_mel_bins} x "
            f"{window_frames}."
        )
    return feature_extractor


def load_audio_encoder(name_or_path: str, flag: str = "--audio_model_name_or_path"):
    """
    A pretrained Whisper encoder: its config (the folder's `WhisperConfig`), its feature extractor
    (`whisper_feature_extractor`) and the encoder's weights, from a folder or Hub id holding a
    `WhisperForConditionalGeneration`, a `WhisperModel` or a `WhisperEncoder` alone. A `ValueError` names the folder
    if it is not a Whisper model or its encoder weights are incomplete.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type != "whisper":
        raise ValueError(f"{flag} {name_or_path}: expected a Whisper model, found model_type {config.model_type!r}.")
    state = _checkpoint_state(name_or_path, flag)
    with torch.device("meta"):  # only the names of its weights
        expected = WhisperEncoder(config).state_dict().keys()
    for prefix in WHISPER_ENCODER_PREFIXES:
        if f"{prefix}conv1.weight" in state:
            encoder_state = {key: state[prefix + key] for key in expected if prefix + key in state}
            missing = sorted(set(expected) - set(encoder_state))
            if missing:
                raise ValueError(f"{flag} {name_or_path}: the Whisper encoder's weights lack {missing[:5]}.")
            break
    else:
        raise ValueError(
            f"{flag} {name_or_path}: no Whisper encoder weights (no conv1.weight under any of "
            f"{[prefix or '(none)' for prefix in WHISPER_ENCODER_PREFIXES]})."
        )
    config._name_or_path = hub_model_id(name_or_path) or ""
    return config, whisper_feature_extractor(name_or_path, config), encoder_state


def processor_with_sound(
    processor: OmniFusionProcessor, feature_extractor, audio_pool_stride: int
) -> OmniFusionProcessor:
    """An OmniFusion processor like `processor` (image preprocessing, tokenizer, markers, image layout) that also takes
    sound through `feature_extractor`; the three audio markers are added to the tokenizer after the image ones."""
    image_layout = {
        name: getattr(processor, name)
        for name in ("num_image_tokens", "image_grid_pinpoints", "image_global_view_position")
    }
    markers = {
        name: getattr(processor, name)
        for name in ("image_token", "image_start_token", "image_end_token", "user_token", "assistant_token")
    }
    return OmniFusionProcessor(
        processor.image_processor,
        processor.tokenizer,
        **image_layout,
        **markers,
        end_assistant_turns_with_eos=processor.end_assistant_turns_with_eos,
        extra_encoder_preprocessors=processor.extra_encoder_preprocessors,
        audio_preprocessor=feature_extractor,
        audio_pool_stride=audio_pool_stride,
    )


def extend_with_sound(
    model: OmniFusionForCausalLM,
    processor: OmniFusionProcessor,
    audio_model_name_or_path: str,
    audio_adapter_type: str = "mlp",
    audio_pool_stride: int = 2,
) -> tuple[OmniFusionForCausalLM, OmniFusionProcessor]:
    """
    The image model `model` with sound (`add_sound`): its weights unchanged, the pretrained Whisper encoder of
    `audio_model_name_or_path` as its audio tower, a fresh audio adapter and three fresh audio marker rows; and its
    processor with the Whisper feature extractor. Image inputs give bit-identical outputs until the audio side trains.
    """
    audio_config, feature_extractor, encoder_state = load_audio_encoder(audio_model_name_or_path)
    processor = processor_with_sound(processor, feature_extractor, audio_pool_stride)
    audio_ids = {name: value for name, value in processor.special_token_ids.items() if name.startswith("audio_")}
    model = add_sound(
        model,
        audio_config,
        audio_adapter_type=audio_adapter_type,
        audio_pool_stride=audio_pool_stride,
        **audio_ids,
    )
    model.model.audio_tower.load_state_dict(encoder_state)
    return model, processor


def build_model_from_pretrained_parts(
    vision_model_name_or_path: str,
    language_model_name_or_path: str,
    audio_model_name_or_path: str | None = None,
    **config_kwargs,
) -> tuple[OmniFusionForCausalLM, OmniFusionProcessor]:
    """
    A new OmniFusion around pretrained vision encoder(s) (comma-separated for several), a pretrained decoder LM
    (whose tokenizer it takes) and, with `audio_model_name_or_path`, a pretrained Whisper encoder (`load_audio_encoder`:
    its feature extractor joins the processor), with freshly initialised adapters and markers, and its processor.
    `config_kwargs` go to `OmniFusionConfig` (`adapter_type`, `image_grid_pinpoints`, `audio_adapter_type`,
    `audio_pool_stride`, ...). All of it is float32 (the Trainer's
    `--bf16`/`--fp16` run autocast over float32 weights), whatever dtype the parts were saved in: loading a bfloat16
    LM as saved would give a model of mixed dtypes.
    """
    sentencepiece_model = check_tokenizer_folder(language_model_name_or_path)
    names = parse_vision_models(vision_model_name_or_path)
    vision_configs, image_processors, vision_states = load_vision_towers(
        names, one_input_size=config_kwargs.get("image_grid_pinpoints") is not None
    )
    language_model = AutoModelForCausalLM.from_pretrained(language_model_name_or_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(language_model_name_or_path)
    if sentencepiece_model is not None:
        rank_merges_by_sentencepiece_scores(tokenizer, sentencepiece_model)
    audio_config = feature_extractor = encoder_state = None
    if audio_model_name_or_path is not None:
        audio_config, feature_extractor, encoder_state = load_audio_encoder(audio_model_name_or_path)
    processor = OmniFusionProcessor(
        image_processors[0],
        tokenizer,
        end_assistant_turns_with_eos=True,
        extra_encoder_preprocessors=image_processors[1:],
        audio_preprocessor=feature_extractor,
        audio_pool_stride=config_kwargs.get("audio_pool_stride", 2),
    )
    config = OmniFusionConfig(
        vision_config=vision_configs if len(names) > 1 else vision_configs[0],
        text_config=language_model.config,
        audio_config=audio_config,
        **processor.special_token_ids,
        **config_kwargs,
    )
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    # What the saved folder names as its base models: the Hub ids, never a local path.
    for vision, name in zip(config.vision_configs, names):
        vision._name_or_path = hub_model_id(name) or ""
    config.text_config._name_or_path = hub_model_id(language_model_name_or_path) or ""

    model = OmniFusionForCausalLM(config)
    towers = model.model.vision_tower if len(names) > 1 else [model.model.vision_tower]
    for tower, state in zip(towers, vision_states):
        tower.load_state_dict(state)
    if encoder_state is not None:
        model.model.audio_tower.load_state_dict(encoder_state)
    missing, unexpected = model.model.language_model.load_state_dict(
        language_model.base_model.state_dict(), strict=False
    )
    if missing != ["embed_tokens.special_embeddings.weight"] or unexpected:
        raise ValueError(
            f"The language model's weights do not fit OmniFusion's: missing {missing}, unexpected {unexpected}."
        )
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.generation_config = language_model.generation_config
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


# What the adapter and the number of image positions depend on, per encoder: a replacement must agree on all of them.
ENCODER_FIELDS_THE_ADAPTER_READS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "image_size",
    "patch_size",
    "num_register_tokens",
)


def _own_image_processor(name_or_path: str):
    """The image processor a vision encoder folder/Hub id ships, or None if it has none."""
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except OSError:  # no preprocessor_config.json (nor processor_config.json) there
        return None


def load_replacement_vision_towers(
    config: OmniFusionConfig,
    processor: OmniFusionProcessor,
    vision_model_name_or_path: str,
    model_name_or_path: str,
    flag: str = "--vision_model_name_or_path",
) -> tuple[list, list, list[dict]]:
    """
    Stage 2's `--vision_model_name_or_path`: pretrained encoders (comma-separated, as in stage 1) to put in place of
    the towers of a model whose adapter was trained on `config`'s encoders. Returns their configs, image processors
    and weights (`install_vision_towers` puts them in). Each encoder comes at the size the model runs it at, exactly as
    stage 1 builds it (`load_vision_towers`: with several encoders of one size, every image processor outputs the
    first's and DINOv2's position table is interpolated). The image processor is the folder's own (it defines the
    encoder's resizing and normalisation), or, for a folder without one, `processor`'s for that encoder.

    A `ValueError` naming `flag`, the encoder index, the folder and the field unless there are as many encoders as
    the adapter reads and each agrees with the one it replaces on everything the adapter and the number of image
    positions depend on (`ENCODER_FIELDS_THE_ADAPTER_READS`, and its image processor's output size).
    """
    names = parse_vision_models(vision_model_name_or_path)
    expected = config.vision_configs
    if len(names) != len(expected):
        raise ValueError(
            f"{flag} {vision_model_name_or_path}: {len(names)} vision encoder(s), but the adapter of "
            f"{model_name_or_path} was trained on {len(expected)} ({', '.join(v.model_type for v in expected)}); "
            "give one folder or Hub id per encoder, comma-separated, in the same order."
        )

    def check(index: int, name: str, found: dict, wanted: dict):
        mismatch = [(field, found[field], wanted[field]) for field in wanted if found[field] != wanted[field]]
        if mismatch:
            field, value, trained = mismatch[0]
            raise ValueError(
                f"{flag}: encoder {index} ({name}) does not match the one the adapter of {model_name_or_path} was "
                f"trained on: {field} is {value!r} in {name} but {trained!r} in {model_name_or_path}"
                + "".join(f"; {f} {v!r} vs {t!r}" for f, v, t in mismatch[1:])
            )

    def fields(vision_config, names) -> dict:
        return {field: getattr(vision_config, field, None) for field in names}

    # The architecture first, before any weight loads. The size a DINOv2 runs at is settled with its image
    # processor below (its position table is interpolated, as in stage 1); any other encoder has one size.
    for index, (name, wanted) in enumerate(zip(names, expected)):
        found = AutoConfig.from_pretrained(name)
        found = getattr(found, "vision_config", found)
        architecture = [
            field for field in ENCODER_FIELDS_THE_ADAPTER_READS if field != "image_size" or found.model_type != "dinov2"
        ]
        check(index, name, fields(found, architecture), fields(wanted, architecture))
    image_processors = [
        _own_image_processor(name) or current for name, current in zip(names, processor.image_processors)
    ]
    one_input_size = len(names) > 1 and len({vision.image_size for vision in expected}) == 1
    try:
        configs, image_processors, states = load_vision_towers(names, one_input_size, image_processors)
    except ValueError as error:  # an encoder that cannot run at the size its processor outputs
        raise ValueError(f"{flag} {vision_model_name_or_path}: {error}") from None
    for index, (name, found, wanted, image_processor) in enumerate(zip(names, configs, expected, image_processors)):
        size = "image processor output size"
        check(
            index,
            name,
            {"image_size": found.image_size, size: image_processor_output_size(image_processor)},
            {"image_size": wanted.image_size, size: wanted.image_size},
        )
        found._name_or_path = hub_model_id(name) or ""
    return configs, image_processors, states


def install_vision_towers(model: OmniFusionForCausalLM, configs: list, states: list[dict]):
    """Replace `model`'s vision towers (modules and configs) by encoders built from `configs` holding `states`, in
    the dtype of the towers they replace."""
    dtype = compute_dtype(model.model.vision_tower, model.dtype)
    model.config.vision_config, *additional = configs
    model.config.additional_vision_configs = additional or None
    vision_tower = build_vision_tower(model.config).to(dtype)  # the model's own layout for one or several encoders
    for tower, state in zip(vision_tower if additional else [vision_tower], states):
        tower.load_state_dict(state)
    model.model.vision_tower = vision_tower.requires_grad_(False)


def set_image_grid_pinpoints(model: OmniFusionForCausalLM, processor: OmniFusionProcessor, pinpoints):
    """Switch tiles on (or change them) for an existing model and its processor; the weights are unchanged."""
    config = model.config
    config.image_grid_pinpoints = pinpoints
    config.check_image_grid_pinpoints()
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)


def train_only(model: nn.Module, modules: list[nn.Module]):
    """Freeze `model` except `modules`, and log what is trained."""
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    log_trainable_parameters(model)


ADAPTER_NAMES = ("adapter", "audio_adapter", "video_adapter")


def adapter_names(model: OmniFusionForCausalLM) -> list[str]:
    """The names (under `model.model`) of the model's adapters: the image adapter and, with sound, the audio adapter,
    with a separate one, the video adapter."""
    return [name for name in ADAPTER_NAMES if getattr(model.model, name, None) is not None]


def adapters(model: OmniFusionForCausalLM) -> list[nn.Module]:
    """The model's adapters (`adapter_names`)."""
    return [getattr(model.model, name) for name in adapter_names(model)]


def fine_tuned_modules(model: OmniFusionForCausalLM, with_adapters: bool = True) -> list[nn.Module]:
    """What stage 2 trains fully: the adapters (unless `with_adapters` is false), the LM (the marker table included)
    and the LM head; never an encoder."""
    return (adapters(model) if with_adapters else []) + [model.model.language_model, model.lm_head]


def train_sound_side(model: OmniFusionForCausalLM) -> list[str]:
    """
    Freeze `model` except its audio adapter and the three audio rows of the marker table (the other rows' gradients
    are zeroed by `restrict_marker_gradient`), and log what is trained. Returns the marker table's parameter name,
    which must get no weight decay: with zero gradients the optimizer's step leaves the image and turn markers
    bit-identical only then.
    """
    config = model.config
    embeddings = model.get_input_embeddings()
    train_only(model, [model.model.audio_adapter, embeddings.special_embeddings])
    embeddings.restrict_marker_gradient([config.audio_token_id, config.audio_start_token_id, config.audio_end_token_id])
    table = embeddings.special_embeddings.weight
    return [name for name, parameter in model.named_parameters() if parameter is table]


def log_trainable_parameters(model: nn.Module):
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    logger.info("Training %d of %d parameters (%.2f%%).", trainable, total, 100 * trainable / total)
