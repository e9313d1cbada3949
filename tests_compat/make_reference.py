"""
Save tiny OmniFusion folders with this project (under transformers 5.24+) plus what they must reproduce elsewhere:
the processor's inputs, the logits and greedy `generate` tokens for single-image, two-image, text-only and batched
chats. `test_saved_folder_on_old_transformers.py` then loads the folders with `trust_remote_code` in a venv with
an older transformers (and without this package) and compares.

    python tests_compat/make_reference.py OUTPUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import transformers


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from omnifusion_fixtures import (  # noqa: E402
    make_config,
    make_image,
    make_model_and_processor,
    make_processor,
    make_sentencepiece_tokenizer,
)

from modeling_omnifusion import OmniFusionForCausalLM  # noqa: E402


MAX_NEW_TOKENS = 8


def chats(image_names: list[str]) -> dict[str, list[dict]]:
    """The prompts, with images named by file (the reader loads them from the reference folder)."""
    one, two = image_names
    return {
        "single_image": [{"role": "user", "content": [{"type": "image", "path": one}, {"type": "text", "text": "What is the colour of the shape?"}]}],
        "two_images": [
            {"role": "user", "content": [{"type": "image", "path": one}, {"type": "image", "path": two}, {"type": "text", "text": "How many circles are there?"}]}
        ],
        "text_only": [{"role": "user", "content": "Describe the image."}],
        "multi_turn": [
            {"role": "user", "content": [{"type": "image", "path": one}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "It is red."},
            {"role": "user", "content": "And the shape?"},
        ],
    }


def resolve(messages: list[dict], folder: Path) -> list[dict]:
    """The messages with each image path made absolute under `folder`."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [dict(item, path=str(folder / item["path"])) if item["type"] == "image" else item for item in content]
        out.append({**message, "content": content})
    return out


def variants(work: Path):
    """(name, model, processor): three towers, three adapters, a byte-level BPE and a Mistral-style tokenizer."""
    yield "clip_transformer_bpe", *make_model_and_processor(vision="clip", adapter_type="transformer", seed=0)
    yield "siglip_mlp_bpe", *make_model_and_processor(vision="siglip", adapter_type="mlp", seed=1)
    tokenizer, _ = make_sentencepiece_tokenizer(work / "spm_release")
    processor = make_processor(tokenizer=tokenizer)
    torch.manual_seed(2)
    model = OmniFusionForCausalLM(make_config(processor, vision="dinov2", adapter_type="linear")).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    yield "dinov2_linear_sentencepiece", model, processor


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


def main(output_dir: str):
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    image_names = ["image_0.png", "image_1.png"]
    for seed, name in enumerate(image_names):
        make_image(seed).save(output / name)
    messages = chats(image_names)
    (output / "chats.json").write_text(json.dumps(messages, indent=1))
    names = []
    for name, model, processor in variants(output / "work"):
        folder = output / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        torch.save(record(model, processor, messages, output), output / f"{name}.reference.pt")
        names.append(name)
    (output / "manifest.json").write_text(json.dumps({"transformers": transformers.__version__, "folders": names}))
    print(f"saved {len(names)} folders with transformers {transformers.__version__} in {output}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests_compat/make_reference.py OUTPUT_DIR")
    main(sys.argv[1])
