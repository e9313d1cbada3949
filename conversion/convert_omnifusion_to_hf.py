"""Convert AIRI's released OmniFusion checkpoints into one Hugging Face model folder.

The input is a folder in one of the released layouts (the v1.0 repository root with `projection`,
`OmniMistral-model/`, `OmniMistral-tokenizer/`, or `OmniMistral-v1_1/` with `projection.pt`, `tuned-model/`,
`tokenizer/`), or a Hub repo id plus `--subfolder`. The output loads with
`AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)` and `AutoProcessor.from_pretrained(...)`.

    omnifusion-convert --input_dir OmniFusion/OmniMistral-v1_1 --output_dir omnifusion-v1_1-hf
    omnifusion-convert --input_dir AIRI-Institute/OmniFusion --subfolder OmniMistral-v1_1 --output_dir out
    python conversion/convert_omnifusion_to_hf.py --input_dir OmniFusion/OmniMistral-v1_1 --output_dir out

Both exit with status 0 on success, and on failure print the error and exit with status 1.

The pickled adapter and markers are read by `released_format` with an allow-list unpickler, so nothing
in them runs; the LM and vision weights go through `from_pretrained` (safetensors, or `.bin` with
`weights_only=True`). Every weight is mapped by name and shape-checked, and the folder appears only when complete.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionModel,
    GenerationConfig,
    LlamaTokenizer,
    SiglipVisionModel,
)

try:
    from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor
except ModuleNotFoundError as error:  # run as a script from a checkout that was never installed
    if error.name != "modeling_omnifusion":
        raise
    raise SystemExit(
        "convert_omnifusion_to_hf.py needs the omnifusion-transformers package: run `pip install .` in the checkout"
    ) from None
# Absolute imports: `python conversion/convert_omnifusion_to_hf.py` runs as a script as well as `-m`/entry point.
from modeling_omnifusion.configuration_omnifusion import SPECIAL_TOKEN_FIELDS
from modeling_omnifusion.conversion.released_format import (
    ReleasedLayout,
    ReleasedProjection,
    describe_projection_structure,
    find_released_layout,
    read_mix_projection,
    read_projection,
    read_special_embeddings,
)
from modeling_omnifusion.hub_omnifusion import atomic_folder, is_hub_repo_id
from modeling_omnifusion.processing.processing_omnifusion import image_processor_output_size
from modeling_omnifusion.processing.tokenizer_setup_omnifusion import (
    check_tokenizer_folder,
    rank_merges_by_sentencepiece_scores,
)

logger = logging.getLogger(__name__)

DEFAULT_VISION_MODEL = "openai/clip-vit-large-patch14-336"
RELEASED_REPO_ID = "AIRI-Institute/OmniFusion"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Released `special_embeddings.pt` key of each marker-table row; the image placeholder row has none (see below).
RELEASED_MARKER_KEYS = {
    "image_start_token_id": "SOI",
    "image_end_token_id": "EOI",
    "user_token_id": "USER",
    "assistant_token_id": "BOT",
}

# The files of either released layout, relative to the checkpoint folder (for a Hub download).
RELEASED_FILE_PATTERNS = (
    "projection",
    "projection.pt",
    "special_embeddings.pt",
    "OmniMistral-model/*",
    "OmniMistral-tokenizer/*",
    "tuned-model/*",
    "tokenizer/*",
)

CONVERSION_NOTES = """
## Conversion notes

Converted with `omnifusion-convert` from the released checkpoint `{source}` ({version} layout: `{projection}`,
`special_embeddings.pt`, `{lm}/`, `{tokenizer}/`) and the vision model `{vision_model}`; weights in {dtype}.

- **Prompt.** The chat template is the released prompt: `"This is a dialog with AI assistant.\\n"`, the image
  block (`<image_start>`, {num_image_tokens} image positions, `<image_end>`), `<user>` + question, `<assistant>`.
  Each text segment is tokenized on its own with no BOS, as the released code did. The marker tokens are
  input-only ({marker_ids}); the marker-table row of `<image>` is zeros because image features replace it.
- **Decoding.** `generation_config.json` holds the README's settings: 3 beams, `no_repeat_ngram_size=4`,
  `max_new_tokens=50`, `early_stopping=True`, `repetition_penalty=1.0`, and `bad_words_ids={bad_words_ids}`
  (the tokenizer's ids of `"\\n"`, `"</s>"`, `":"`, then the newline byte token). That list names EOS, but
  transformers drops a bad word equal to `eos_token_id` (it did so when the README was written too), so EOS is
  not banned: generation stops at EOS or after 50 tokens, the last of which `forced_eos_token_id={eos}` makes EOS.
- **Prompt n-grams.** The README generated from `inputs_embeds` alone, so `no_repeat_ngram_size` only blocked
  repeats inside the answer; `model.generate(**inputs)` also blocks 4-grams of the prompt (of the question, say).
  For exactly the README's decoding, generate from the embeddings; the output then holds only the new tokens:

  ```python
  embeds = model.get_input_embeddings()(inputs["input_ids"])
  output = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                          pixel_values=inputs["pixel_values"])
  print(processor.decode(output[0], skip_special_tokens=True))
  ```
- **First token.** The README decoded `out[:, 1:]`, which with `inputs_embeds` generation drops the first
  generated token; decode all generated tokens instead.
- **Dropout.** The released adapter was pickled in training mode and the README never called `.eval()`, so it
  applied dropout 0.1 at inference. This model loads in eval mode (deterministic), matching the released
  inference path with the adapter in eval mode.
"""


MIX_CONVERSION_NOTES = """
- **Encoders mix.** The released projection holds only LayerNorms, Linears and raw coefficients; it was mapped onto
  `adapter_type="mix_sum"` (the report's projection & summation) by structure: {groups} (LayerNorms / Linears to
  width {width} / per-layer coefficients), then the final Linear. Encoders: {encoders}; CLS tokens dropped. The
  pickle names no activation: GELU is assumed, as the report describes. Which DINOv2 and which input size the
  release used are not public; DINOv2's position table was interpolated (its own `interpolate_pos_encoding`) to
  its image processor's size, which is what DINOv2 computes at run time.
"""


# A conversion is built in `<output parent>/.omnifusion-convert-XXXX/` and renamed into place when complete
# (`hub_omnifusion.atomic_folder`).
STAGING_PREFIX = ".omnifusion-convert-"


def resolve_input_dir(input_dir: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local folder holding the released files: `input_dir[/subfolder]`, or a Hub snapshot of repo `input_dir`."""
    local = Path(input_dir)
    if local.is_dir():
        return local / subfolder if subfolder else local
    text = str(input_dir)
    if not is_hub_repo_id(text):
        raise FileNotFoundError(f"{input_dir}: no such folder, and not a Hub repo id")
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(text, allow_patterns=[prefix + pattern for pattern in RELEASED_FILE_PATTERNS])
    except Exception as exc:
        raise FileNotFoundError(f"{input_dir}: no such folder, and downloading it from the Hub failed ({exc})") from exc
    return Path(snapshot) / prefix


def weights_file(folder: Path, key: str) -> Path:
    """The weight file of `folder` that holds `key` (its shard when the folder is sharded), else the folder."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shard = json.loads(index.read_text()).get("weight_map", {}).get(key)
            return folder / shard if shard else index
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return folder


def load_pretrained_strictly(model_class, name_or_path, dtype, ignore_unexpected: bool = False):
    """`model_class.from_pretrained` that raises, naming the file and both shapes, on a missing or mis-shaped weight."""
    model, info = model_class.from_pretrained(
        name_or_path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
    )
    folder = Path(name_or_path)
    problems = [
        f"{weights_file(folder, key)}: '{key}' has shape {tuple(found)}, expected {tuple(expected)}"
        for key, found, expected in sorted(info["mismatched_keys"])
    ]
    if info["missing_keys"]:
        problems.append(f"{folder}: missing weights {sorted(info['missing_keys'])}")
    if info["unexpected_keys"] and not ignore_unexpected:
        problems.append(f"{folder}: unexpected weights {sorted(info['unexpected_keys'])}")
    if problems:
        raise ValueError(f"cannot convert {name_or_path}: " + "; ".join(problems))
    return model


def check_projection(projection: ReleasedProjection, path: Path, vision_config, text_config, vision_model: str):
    """The adapter's widths must match the vision tower and the LM, and the adapter must be the post-norm layer."""
    linear = tuple(projection.state_dict["linear.weight"].shape)
    expected = (text_config.hidden_size, vision_config.hidden_size)
    if linear != expected:
        raise ValueError(
            f"{path}: adapter 'linear.weight' has shape {linear}, expected {expected} "
            f"(LM hidden size {expected[0]}, vision hidden size {expected[1]} of {vision_model})"
        )
    if projection.norm_first or not projection.batch_first:
        raise ValueError(
            f"{path}: unsupported adapter layout norm_first={projection.norm_first}, "
            f"batch_first={projection.batch_first}; expected norm_first=False, batch_first=True"
        )


def released_bad_words_ids(tokenizer) -> list[list[int]]:
    """The README's `tokenizer(["\\n", "</s>", ":"], add_special_tokens=False).input_ids + [[13]]`, for any tokenizer.

    `13` is Mistral's newline byte token `<0x0A>`, looked up here by name; for Mistral this is
    `[[28705, 13], [2], [714], [13]]`.
    """
    bad_words = tokenizer(["\n", "</s>", ":"], add_special_tokens=False).input_ids
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    if newline is not None and newline != tokenizer.unk_token_id:
        bad_words.append([newline])
    return bad_words


def released_generation_config(tokenizer) -> GenerationConfig:
    """The decoding settings of the released README (its EOS quirk is explained in `CONVERSION_NOTES`)."""
    eos = tokenizer.eos_token_id
    return GenerationConfig(
        do_sample=False,
        num_beams=3,
        max_new_tokens=50,
        early_stopping=True,
        no_repeat_ngram_size=4,
        repetition_penalty=1.0,
        remove_invalid_values=True,
        num_return_sequences=1,
        use_cache=True,
        bad_words_ids=released_bad_words_ids(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos,
        forced_eos_token_id=eos,
    )


def build_marker_table(released_markers: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[5, hidden]` rows in `OmniFusionConfig.special_token_ids` order, taken by name from the released markers
    (`read_special_embeddings`).

    The image placeholder row is zeros: image features overwrite it at every use.
    """
    hidden = next(iter(released_markers.values()))
    rows = [
        released_markers[RELEASED_MARKER_KEYS[field]] if field in RELEASED_MARKER_KEYS else torch.zeros_like(hidden)
        for field in SPECIAL_TOKEN_FIELDS
    ]
    return torch.stack(rows)


def split_vision_models(vision_model) -> list[str]:
    """`--vision_model`: one folder/Hub id, several comma-separated (`clip_dir,dinov2_dir`), or a list."""
    names = vision_model.split(",") if isinstance(vision_model, str) else [str(v) for v in vision_model]
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise ValueError(f"--vision_model names no vision model: {vision_model!r}")
    return names


def load_text_side(layout: ReleasedLayout, sentencepiece_model):
    """The released LM config, markers, tokenizer and decoding settings, checked against each other.

    `sentencepiece_model` is what `check_tokenizer_folder` returned for the tokenizer folder (checked first of all).
    """
    text_config = AutoConfig.from_pretrained(layout.lm_dir)
    released_markers = read_special_embeddings(layout.special_embeddings, hidden_size=text_config.hidden_size)
    tokenizer = LlamaTokenizer.from_pretrained(layout.tokenizer_dir)
    if sentencepiece_model is not None:
        rank_merges_by_sentencepiece_scores(tokenizer, sentencepiece_model)
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(
            f"{layout.tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens, more than the LM's vocab_size "
            f"{text_config.vocab_size} ({layout.lm_dir / 'config.json'})"
        )
    return text_config, released_markers, tokenizer, released_generation_config(tokenizer)


def assemble_model(config, layout, dtype, vision_state, adapter_state, released_markers, generation_config):
    """The converted `OmniFusionForCausalLM`: vision tower(s), adapter, the released LM and the marker table."""
    lm = load_pretrained_strictly(AutoModelForCausalLM, layout.lm_dir, dtype or "auto")
    dtype = dtype or lm.dtype
    vision_state = vision_state(dtype)
    config.dtype = dtype
    for sub_config in (config.text_config, *config.vision_configs):
        sub_config.dtype = dtype
    # The model card's base_model: the release (whose tuned LM this is) and the vision models' Hub ids where they have
    # them; saving writes a local path as nothing (`hub_model_id`).
    config.text_config._name_or_path = RELEASED_REPO_ID
    state_dict = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    state_dict.update({f"model.adapter.{k}": v for k, v in adapter_state.items()})
    state_dict.update({f"model.language_model.{k}": v for k, v in lm.get_decoder().state_dict().items()})
    state_dict["lm_head.weight"] = lm.get_output_embeddings().weight
    state_dict["model.language_model.embed_tokens.special_embeddings.weight"] = build_marker_table(released_markers)
    with torch.device("meta"):
        model = OmniFusionForCausalLM(config)
    model.load_state_dict({k: v.detach().to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    model.generation_config = generation_config
    return model


VISION_MODEL_CLASSES = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}


def load_vision_config(name_or_path: str):
    """The vision encoder config of a folder/Hub id (the vision half of a full CLIP/SigLIP checkpoint)."""
    config = AutoConfig.from_pretrained(name_or_path)
    return getattr(config, "vision_config", None) or config


def vision_state_at_input_size(tower, input_size: int) -> dict[str, torch.Tensor]:
    """
    `tower`'s weights for `input_size` px inputs. DINOv2 interpolates its position table at run time when the input
    differs from its config's `image_size` (518 px table, 224 px crops); the table is interpolated here once with the
    model's own `interpolate_pos_encoding`, so the converted tower computes exactly what the original does.
    """
    config = tower.config
    state = tower.state_dict()
    if config.image_size == input_size:
        return state
    if config.model_type != "dinov2":
        raise ValueError(
            f"{config._name_or_path or config.model_type}: its image processor outputs {input_size} px but the "
            f"model is built for {config.image_size} px; only DINOv2 interpolates its position embeddings"
        )
    num_patches = (input_size // config.patch_size) ** 2
    table = state["embeddings.position_embeddings"]
    with torch.no_grad():
        dummy = torch.zeros(1, num_patches + 1, config.hidden_size, dtype=table.dtype)
        table = tower.embeddings.interpolate_pos_encoding(dummy, input_size, input_size)
        state["embeddings.position_embeddings"] = table
    return state


@dataclasses.dataclass(frozen=True)
class ReleasedAdapter:
    """A released adapter, read and checked: what sets the two released layouts apart in `load_released_checkpoint`.

    `config_fields` are the `OmniFusionConfig` fields it fixes, `num_image_tokens` the image positions it was
    trained for (its stored `n_embeddings`, if any), `mix_groups` the encoders-mix attribute groups per encoder (for
    the model card; empty for the single-encoder adapter).
    """

    state_dict: dict[str, torch.Tensor]
    config_fields: dict
    num_image_tokens: int | None
    mix_groups: tuple[str, ...] = ()


def read_transformer_adapter(path: Path, vision_configs: list, text_config, vision_models: list[str]):
    """The single-encoder release: a transformer layer and a Linear (`released_format.read_projection`)."""
    vision_config = vision_configs[0]
    projection = read_projection(path, vision_config.hidden_size, text_config.hidden_size)
    check_projection(projection, path, vision_config, text_config, vision_models[0])
    config_fields = dict(
        adapter_type="transformer",
        adapter_num_heads=projection.num_heads,
        adapter_ffn_dim=projection.ffn_dim,
        adapter_dropout=projection.dropout,
        adapter_activation=projection.activation_name,
        adapter_layer_norm_eps=projection.layer_norm_eps,
        vision_feature_layer=-2,
    )
    return ReleasedAdapter(projection.state_dict, config_fields, projection.num_image_tokens)


def read_mix_adapter(path: Path, vision_configs: list, text_config, vision_models: list[str]):
    """
    The encoders-mix release (`OmniMistral-v1_1-encoders-mix`): a projection holding only LayerNorms, Linears and
    raw coefficients, mapped onto `adapter_type="mix_sum"` (`released_format.read_mix_projection`).
    """
    projection = read_mix_projection(
        path,
        [(v.model_type, v.num_hidden_layers + 1, v.hidden_size) for v in vision_configs],
        text_config.hidden_size,
    )
    config_fields = dict(
        adapter_type="mix_sum",
        adapter_hidden_size=projection.width,
        adapter_layer_norm_eps=projection.layer_norm_eps,
        adapter_hidden_act="gelu",
    )
    return ReleasedAdapter(projection.state_dict, config_fields, projection.num_image_tokens, projection.groups)


def check_vision_model_count(path: Path, vision_models: list[str], mix: bool):
    """The single-encoder adapter reads one `--vision_model`, the encoders-mix one at least two."""
    if mix and len(vision_models) < 2:
        raise ValueError(
            f"{path}: this is an encoders-mix adapter (no transformer layer), which reads two vision "
            f"encoders; pass both: --vision_model <clip>,<dinov2> (got {vision_models})"
        )
    if not mix and len(vision_models) > 1:
        raise ValueError(
            f"{path}: this adapter reads one vision encoder (a transformer layer), but --vision_model "
            f"names {len(vision_models)}: {', '.join(vision_models)}"
        )


def load_released_checkpoint(layout: ReleasedLayout, vision_model, dtype: torch.dtype | None):
    """
    Read and check every piece of a released checkpoint, the cheap checks before the large weights; returns
    `(model, processor)`.

    Both released layouts go through here. A projection with a transformer layer reads one vision encoder (CLIP
    ViT-L/14-336); one without it is the encoders-mix release, with one vision encoder per `--vision_model` entry
    (CLIP first, then DINOv2), each with its own image processor and at that processor's input size.
    """
    sentencepiece_model = check_tokenizer_folder(layout.tokenizer_dir)  # names a missing sentencepiece/protobuf
    vision_models = split_vision_models(vision_model)
    structure = describe_projection_structure(layout.projection)
    mix = not any(entry.path == "transformer_layer" for entry in structure)
    check_vision_model_count(layout.projection, vision_models, mix)
    image_processors = [AutoImageProcessor.from_pretrained(v, backend="pil") for v in vision_models]
    vision_configs = [load_vision_config(v) for v in vision_models]
    input_sizes = [image_processor_output_size(p) for p in image_processors]
    text_config = AutoConfig.from_pretrained(layout.lm_dir)
    read_adapter = read_mix_adapter if mix else read_transformer_adapter
    adapter = read_adapter(layout.projection, vision_configs, text_config, vision_models)
    text_config, released_markers, tokenizer, generation_config = load_text_side(layout, sentencepiece_model)
    vision_configs = [
        vision if vision.image_size == size else type(vision).from_dict({**vision.to_dict(), "image_size": size})
        for vision, size in zip(vision_configs, input_sizes)
    ]
    processor = OmniFusionProcessor(image_processors[0], tokenizer, extra_encoder_preprocessors=image_processors[1:])
    config = OmniFusionConfig(
        vision_config=vision_configs,
        text_config=text_config,
        vision_feature_select_strategy="default",
        **adapter.config_fields,
        **processor.special_token_ids,
    )
    if adapter.num_image_tokens is not None and adapter.num_image_tokens != config.num_image_tokens:
        if len(vision_models) == 1:
            vision = vision_configs[0]
            source = f"{vision_models[0]} gives {config.num_image_tokens} (image_size {vision.image_size}, "
            source += f"patch_size {vision.patch_size})"
        else:
            source = f"the encoders give {config.num_image_tokens} (the longest of "
            source += ", ".join(f"{v} at {s}px" for v, s in zip(vision_models, input_sizes)) + ")"
        raise ValueError(
            f"{layout.projection}: the adapter was trained for {adapter.num_image_tokens} image tokens "
            f"(n_embeddings) but {source}"
        )
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)

    def vision_state(dtype):
        state = {}
        for index, (name, vision) in enumerate(zip(vision_models, vision_configs)):
            model_class = VISION_MODEL_CLASSES.get(vision.model_type, AutoModel)
            tower = load_pretrained_strictly(model_class, name, dtype, ignore_unexpected=True)
            prefix = f"{index}." if len(vision_models) > 1 else ""
            state.update({prefix + k: v for k, v in vision_state_at_input_size(tower, input_sizes[index]).items()})
        return state

    model = assemble_model(config, layout, dtype, vision_state, adapter.state_dict, released_markers, generation_config)
    if adapter.mix_groups:
        model.released_mix_groups = adapter.mix_groups
    return model, processor


def add_conversion_notes(folder: Path, layout: ReleasedLayout, source: str, vision_model: str, model, processor):
    """Append the release's quirks (decoding, prompt n-grams, first token, dropout) to the model card."""
    card = ModelCard.load(folder / "README.md")
    generation_config = model.generation_config
    card.text += CONVERSION_NOTES.format(
        source=source,
        version=f"v{layout.version}",
        projection=layout.projection.name,
        lm=layout.lm_dir.name,
        tokenizer=layout.tokenizer_dir.name,
        dtype=str(model.dtype).removeprefix("torch."),
        vision_model=vision_model,
        num_image_tokens=processor.num_image_tokens,
        marker_ids=", ".join(
            f"`{processor.tokenizer.convert_ids_to_tokens(i)}`={i}" for i in model.config.special_token_ids
        ),
        bad_words_ids=generation_config.bad_words_ids,
        eos=generation_config.forced_eos_token_id,
    )
    groups = getattr(model, "released_mix_groups", None)
    if groups:
        card.text += MIX_CONVERSION_NOTES.format(
            encoders=", ".join(
                f"{vision.model_type} at {vision.image_size} px ({vision.num_hidden_layers + 1} hidden states)"
                for vision in model.config.vision_configs
            ),
            groups="; ".join(f"encoder {i}: `{g}`" for i, g in enumerate(groups)),
            width=model.config.mix_adapter_width,
        )
    card.save(folder / "README.md")


def _display_name(name_or_path: str) -> str:
    """A Hub id as is, a local folder by its last component (no local paths in the model card)."""
    return Path(name_or_path).name if Path(name_or_path).is_dir() else name_or_path


def convert_omnifusion_to_hf(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    vision_model: str | os.PathLike = DEFAULT_VISION_MODEL,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    subfolder: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """
    Convert a released OmniFusion checkpoint to one Hugging Face folder and return its path.

    Args:
        input_dir: a released checkpoint folder (v1.0 root or `OmniMistral-v1_1`), or a Hub repo id.
        output_dir: where the folder appears (built beside it in a temporary folder and renamed when complete).
        vision_model: folder or Hub id of the CLIP vision model the release was trained with; for the encoders-mix
            release both encoders, comma-separated or as a list (CLIP, then DINOv2).
        dtype: `float32`, `bfloat16` or `float16` (or a `torch.dtype`); defaults to the LM's stored dtype.
        overwrite: replace an existing non-empty `output_dir`; otherwise it is refused before any work.
        push_to_hub: a Hub repo id to upload the finished folder to.
        subfolder: the checkpoint's folder inside `input_dir`, e.g. `OmniMistral-v1_1`.
        max_shard_size: largest safetensors shard, as for `save_pretrained`.
    """
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir}: folder exists and is not empty; pass overwrite=True (--overwrite)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    vision_models = split_vision_models(str(vision_model) if isinstance(vision_model, os.PathLike) else vision_model)
    vision_model = ",".join(vision_models)

    layout = find_released_layout(resolve_input_dir(input_dir, subfolder))
    logger.info(f"Converting the released v{layout.version} checkpoint in {layout.root}")
    model, processor = load_released_checkpoint(layout, vision_model, dtype)

    with atomic_folder(output_dir, STAGING_PREFIX, writer="a conversion") as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        processor.save_pretrained(folder)
        source = layout.root.name if Path(input_dir).is_dir() else "/".join(filter(None, (str(input_dir), subfolder)))
        vision_names = ", ".join(_display_name(name) for name in vision_models)
        add_conversion_notes(folder, layout, source, vision_names, model, processor)
    logger.info(f"Saved the converted model ({str(model.dtype).removeprefix('torch.')}) to {output_dir}")

    if push_to_hub:
        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=output_dir, commit_message="Convert OmniFusion checkpoint")
    return output_dir


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_dir", required=True, help="released checkpoint folder, or a Hub repo id")
    parser.add_argument("--subfolder", default=None, help="checkpoint folder inside --input_dir, e.g. OmniMistral-v1_1")
    parser.add_argument(
        "--vision_model",
        default=DEFAULT_VISION_MODEL,
        help="CLIP vision model folder or Hub id; for the encoders-mix release the two encoders, comma-separated "
        "(CLIP first, then DINOv2: openai/clip-vit-large-patch14-336,facebook/dinov2-large)",
    )
    parser.add_argument("--output_dir", required=True, help="folder to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: the LM's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output_dir")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO", help="upload the result to this Hub repo")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default: 5GB)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: the exit status, 0 once the folder is complete, 1 (after printing the error) on bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    max_shard_size = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    try:
        convert_omnifusion_to_hf(
            args.input_dir,
            args.output_dir,
            vision_model=args.vision_model,
            dtype=args.dtype,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            subfolder=args.subfolder,
            max_shard_size=max_shard_size,
        )
    except (OSError, ValueError, ImportError) as error:
        print(f"omnifusion-convert: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
