"""Tiny pretrained-looking vision and LM folders and conversation datasets on disk, for the training tests, and a
stage-1 run in a fresh process that can be killed mid-checkpoint or given a full disk."""

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPVisionModel, MistralForCausalLM

from modeling_omnifusion.testing.tiny import make_config, make_image, make_processor, make_tokenizer, vision_config

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


def jpeg_truncated(image_bytes: bytes) -> bytes:
    """The first 60% of `image_bytes` re-saved as a JPEG: the header and part of the data stream (`verify()` accepts
    it)."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10]


def png_with_corrupt_pixel_data(image_bytes: bytes) -> bytes:
    """The PNG with bytes of its compressed pixel data flipped and the chunk CRC fixed (`verify()` accepts it)."""
    data = bytearray(image_bytes)
    start = data.index(b"IDAT")
    length = struct.unpack(">I", data[start - 4 : start])[0]
    pixels = data[start + 4 : start + 4 + length]
    for index in range(20, length - 10, 7):
        pixels[index] ^= 0xFF
    data[start + 4 : start + 4 + length] = pixels
    data[start + 4 + length : start + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(pixels)))
    return bytes(data)


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


STAGE1_DRIVER = """
import os, resource, signal, sys
import torch
from modeling_omnifusion.training import checkpoints, stage1

torch.set_num_threads(1)  # as in the test process (tests/conftest.py), for bit-identical results

kill_at_step, file_size_limit = int(sys.argv[1]), int(sys.argv[2])
save_rng_state = checkpoints.AtomicCheckpointTrainer._save_rng_state

def save_rng_state_or_die(self, output_dir):
    if self.state.global_step == kill_at_step:  # mid-checkpoint: weights and optimizer written, RNG state not yet
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(self, output_dir)

checkpoints.AtomicCheckpointTrainer._save_rng_state = save_rng_state_or_die
if file_size_limit:  # a full disk: writing past the limit fails with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))
stage1.train(sys.argv[3:])
"""


def run_stage1_subprocess(
    flags: list[str], kill_at_step: int = 0, file_size_limit: int = 0, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Stage 1 with `flags` in a fresh process, SIGKILLed mid-checkpoint at `kill_at_step` if given, or with every
    file it writes limited to `file_size_limit` bytes (as on a full disk)."""
    command = [sys.executable, "-c", STAGE1_DRIVER, str(kill_at_step), str(file_size_limit), *flags]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    # cwd: not a checkout (`-c` puts the cwd first on sys.path, where its source folders would shadow the install)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
