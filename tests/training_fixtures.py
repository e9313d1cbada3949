"""Tiny pretrained-looking vision and LM folders and conversation datasets on disk, for the training tests."""

import json
import sys
from pathlib import Path

import torch
from transformers import CLIPVisionModel, MistralForCausalLM

from omnifusion_fixtures import make_config, make_image, make_processor, make_tokenizer, vision_config


EXAMPLES_DIR = str(Path(__file__).resolve().parent.parent / "examples")
if EXAMPLES_DIR not in sys.path:
    sys.path.insert(0, EXAMPLES_DIR)

COLOURS = ["red", "blue", "green", "yellow"]


def save_vision_model(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer CLIP vision tower with its image processor, as a local 'pretrained' folder."""
    torch.manual_seed(seed)
    CLIPVisionModel(vision_config("clip")).save_pretrained(folder)
    make_processor().image_processor.save_pretrained(folder)
    return folder


def save_language_model(folder: Path, seed: int = 0) -> Path:
    """The fixtures' random 2-layer Mistral LM with its byte-level tokenizer, as a local 'pretrained' folder."""
    torch.manual_seed(seed)
    MistralForCausalLM(make_config(make_processor()).text_config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def colour_records(num_records: int, with_images: bool = True) -> list[dict]:
    """LLaVA-style records asking for the colour of image `i` (answers cycle through `COLOURS`)."""
    records = []
    for index in range(num_records):
        question = "What is the colour of the shape?"
        record = {
            "id": f"sample-{index}",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}" if with_images else question},
                {"from": "gpt", "value": f"It is {COLOURS[index % len(COLOURS)]}."},
            ],
        }
        if with_images:
            record["image"] = f"images/{index}.png"
        records.append(record)
    return records


def write_dataset(folder: Path, records: list[dict], jsonl: bool = False) -> Path:
    """Writes `records` as JSON (or JSONL) and a random image for every `image` path that does not exist yet."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(records):
        image = record.get("image")
        if isinstance(image, str) and not (folder / image).exists():
            (folder / image).parent.mkdir(parents=True, exist_ok=True)
            make_image(seed=index).save(folder / image)
    path = folder / ("data.jsonl" if jsonl else "data.json")
    with open(path, "w") as file:
        if jsonl:
            file.writelines(json.dumps(record) + "\n" for record in records)
        else:
            json.dump(records, file)
    return path


def training_flags(output_dir: Path, data_path: Path, **overrides) -> list[str]:
    """Command-line flags for a few fast CPU steps (no saving unless asked), `overrides` as `--key value`."""
    flags = {
        "data_path": data_path,
        "output_dir": output_dir,
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
        **overrides,
    }
    return [arg for key, value in flags.items() if value is not None for arg in (f"--{key}", str(value))]


def read_json(path: Path) -> dict:
    with open(path) as file:
        return json.load(file)


def state_dict(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

