"""
Save tiny OmniFusion folders with this project (under transformers 5.24+) plus what they must reproduce elsewhere:
the processor's inputs, the logits and greedy `generate` tokens for single-image, two-image, text-only and batched
chats. `test_saved_folder_on_old_transformers.py` then loads the folders with `trust_remote_code` in a venv with
an older transformers (and without this package) and compares.

    python tests_compat/make_reference.py OUTPUT_DIR [VARIANT ...]   (default: every variant)
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from reference_chats import media_chats, resolve, resolve_media
from transformers import MistralConfig

from modeling_omnifusion import OmniFusionForCausalLM  # noqa: E402
from modeling_omnifusion.testing.tiny import (  # noqa: E402
    make_audio_model_and_processor,
    make_clip,
    make_config,
    make_image,
    make_model_and_processor,
    make_processor,
    make_sentencepiece_tokenizer,
    make_video,
    make_video_model_and_processor,
)

MAX_NEW_TOKENS = 8


def chats(image_names: list[str]) -> dict[str, list[dict]]:
    """The prompts, with images named by file (the reader loads them from the reference folder)."""
    one, two = image_names
    return {
        "single_image": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": one},
                    {"type": "text", "text": "What is the colour of the shape?"},
                ],
            }
        ],
        "two_images": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": one},
                    {"type": "image", "path": two},
                    {"type": "text", "text": "How many circles are there?"},
                ],
            }
        ],
        "text_only": [{"role": "user", "content": "Describe the image."}],
        "multi_turn": [
            {"role": "user", "content": [{"type": "image", "path": one}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "It is red."},
            {"role": "user", "content": "And the shape?"},
        ],
    }


def with_head_dim_32(config):
    """The same tiny LM with 2 heads of 32 (vLLM's CPU attention takes head_dim 32, 64, 80, ... only)."""
    text = config.text_config
    config.text_config = MistralConfig(
        vocab_size=text.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
    )
    return config


def build(processor, seed: int, head_dim_32: bool = False, **config_kwargs):
    config = make_config(processor, **config_kwargs)
    torch.manual_seed(seed)
    model = OmniFusionForCausalLM(with_head_dim_32(config) if head_dim_32 else config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def build_head_dim_32(make, seed: int, **kwargs):
    """`make(seed=seed, **kwargs)` (a `make_*model_and_processor` of `modeling_omnifusion.testing.tiny`: several
    encoders, tiles, sound, video) with the LM of `with_head_dim_32`."""
    model, processor = make(seed=seed, **kwargs)
    torch.manual_seed(seed)
    model = OmniFusionForCausalLM(with_head_dim_32(model.config)).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def build_vision(seed: int, **kwargs):
    """`make_model_and_processor(**kwargs)` (several encoders, tiles) with the LM of `with_head_dim_32`."""
    return build_head_dim_32(make_model_and_processor, seed, **kwargs)


# Tiles of the 32 px encoder: a 32 x 32 image fits [32, 64] (2 tiles + global view = 3 views), a 64 x 64 one [64, 64]
# (5 views), so one batch holds images whose blocks differ in length.
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def vision_variants():
    """name -> (model, processor) for `tests_vllm/test_vllm_vision_variants.py`: several encoders and tiles on vLLM.
    Their names do not end in `_hd32`, so `test_vllm_serving.py` leaves them to that file."""
    return {
        "hd32_mix_sum_clip_dinov2": lambda: build_vision(
            5, vision=["clip", "dinov2"], adapter_type="mix_sum", vision_sizes=[32, 24]
        ),
        "hd32_tiles_clip": lambda: build_vision(6, image_grid_pinpoints=PINPOINTS),
        # both at once: every view of every image through both encoders (tiles need one size: both 32 px)
        "hd32_mix_sum_tiles_clip_dinov2": lambda: build_vision(
            7, vision=["clip", "dinov2"], adapter_type="mix_sum", image_grid_pinpoints=PINPOINTS
        ),
    }


def vision_chats(image_names: list[str]) -> dict[str, list[dict]]:
    """Prompts whose images differ in size (`image_0` 32 x 32, `image_big` 64 x 64, `image_wide` 32 x 64)."""
    small, big, wide = image_names

    def ask(*paths):
        images = [{"type": "image", "path": path} for path in paths]
        return [{"role": "user", "content": [*images, {"type": "text", "text": "What is the colour of the shape?"}]}]

    return {"small_image": ask(small), "big_image": ask(big), "big_and_wide_images": ask(big, wide)}


def variants(work: Path):
    """name -> (model, processor): three towers, three adapters, a byte-level BPE and a Mistral-style tokenizer;
    the `_hd32` ones have head_dim 32 for vLLM on CPU."""
    spm = lambda name: make_processor(tokenizer=make_sentencepiece_tokenizer(work / name)[0])  # noqa: E731
    return {
        "clip_transformer_bpe": lambda: make_model_and_processor(vision="clip", adapter_type="transformer", seed=0),
        "siglip_mlp_bpe": lambda: make_model_and_processor(vision="siglip", adapter_type="mlp", seed=1),
        "dinov2_linear_sentencepiece": lambda: build(spm("spm2"), 2, vision="dinov2", adapter_type="linear"),
        "clip_transformer_bpe_hd32": lambda: build(make_processor(), 3, head_dim_32=True),
        "clip_mlp_sentencepiece_hd32": lambda: build(spm("spm4"), 4, head_dim_32=True, adapter_type="mlp"),
    }


@torch.no_grad()
def record(model, processor, messages_by_name: dict, folder: Path) -> dict:
    reference = {}
    for name, messages in messages_by_name.items():
        inputs = processor.apply_chat_template(
            resolve(messages, folder), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        reference[name] = {"inputs": dict(inputs), "logits": logits, "tokens": tokens}
    batch = [resolve(messages, folder) for messages in messages_by_name.values()]
    inputs = processor.apply_chat_template(
        batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    reference["batch"] = {
        "inputs": dict(inputs),
        "logits": model(**inputs).logits,
        "tokens": model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False),
    }
    return reference


# Folders with sound or video: checked on older transformers (`tests_compat`) and served by vLLM (`tests_vllm`), clips
# and frames given as arrays (no audio decoder or PyAV there).
MEDIA_VARIANTS = {
    "audio": {"audio_mlp_hd32": lambda: build_head_dim_32(make_audio_model_and_processor, 8)},
    "video": {
        "video_separate_hd32": lambda: build_head_dim_32(make_video_model_and_processor, 9, video_adapter="separate")
    },
}


@torch.no_grad()
def record_media(model, processor, modality: str, folder: Path) -> dict:
    """Inputs, logits, greedy and beam-search tokens for each chat of `media_chats(modality)` and for all of them as
    one batch."""
    reference = {}
    chats = {name: resolve_media(messages, folder) for name, messages in media_chats(modality).items()}
    for name, messages in [*chats.items(), ("batch", list(chats.values()))]:
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        reference[name] = {
            "inputs": dict(inputs),
            "logits": model(**inputs).logits,
            "tokens": model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False),
            "beams": model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False),
        }
    return reference


def save_vision_images(output: Path) -> list[str]:
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(output / "image_big.png")
    Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(output / "image_wide.png")
    return ["image_0.png", "image_big.png", "image_wide.png"]


def main(output_dir: str, names: list[str] | None = None):
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    image_names = ["image_0.png", "image_1.png"]
    for seed, name in enumerate(image_names):
        make_image(seed).save(output / name)
    messages = chats(image_names)
    (output / "chats.json").write_text(json.dumps(messages, indent=1))
    extra_messages = vision_chats(save_vision_images(output))
    (output / "vision_chats.json").write_text(json.dumps(extra_messages, indent=1))
    vision = vision_variants()
    media_of = {name: modality for modality, builders in MEDIA_VARIANTS.items() for name in builders}
    builders = {**variants(output / "work"), **vision, **MEDIA_VARIANTS["audio"], **MEDIA_VARIANTS["video"]}
    np.save(output / "clip_0.npy", make_clip(0, 0.6))
    np.save(output / "clip_1.npy", make_clip(1, 0.9))
    np.save(output / "video_0.npy", make_video(0, 5))
    np.save(output / "video_1.npy", make_video(1, 9))
    for modality in MEDIA_VARIANTS:
        (output / f"{modality}_chats.json").write_text(json.dumps(media_chats(modality), indent=1))
    unknown = sorted(set(names or []) - set(builders))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(builders)}")
    names = names or list(builders)
    for name in names:
        model, processor = builders[name]()
        folder = output / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        if name in media_of:
            modality = media_of[name]
            reference = record_media(model, processor, modality, output)
            torch.save(reference, output / f"{name}.{modality}_reference.pt")
            continue
        torch.save(record(model, processor, messages, output), output / f"{name}.reference.pt")
        if name in vision:
            torch.save(record(model, processor, extra_messages, output), output / f"{name}.vision_reference.pt")
    manifest = {
        "transformers": transformers.__version__,
        "folders": [name for name in names if name not in media_of],
        **{
            f"{modality}_folders": [name for name in names if media_of.get(name) == modality]
            for modality in MEDIA_VARIANTS
        },
    }
    (output / "manifest.json").write_text(json.dumps(manifest))
    print(f"saved {len(names)} folders with transformers {transformers.__version__} in {output}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python tests_compat/make_reference.py OUTPUT_DIR [VARIANT ...]")
    main(sys.argv[1], sys.argv[2:])
