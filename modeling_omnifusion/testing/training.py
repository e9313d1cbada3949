"""Tiny pretrained-looking vision, Whisper and LM folders and conversation datasets (images, clips, WebDataset shards)
on disk, for the training tests, and a stage-1 run in a fresh process that can be killed mid-checkpoint or given a
full disk."""

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPVisionModel, MistralForCausalLM, WhisperFeatureExtractor, WhisperForConditionalGeneration

from modeling_omnifusion.testing.tiny import (
    AUDIO_WINDOW_SECONDS,
    audio_config,
    make_clip,
    make_config,
    make_image,
    make_processor,
    make_tokenizer,
    vision_config,
)

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


def save_whisper_model(folder: Path, seed: int = 0, encoder_only: bool = False) -> Path:
    """A random tiny Whisper (`audio_config()`, a 1 s window) with its `WhisperFeatureExtractor(chunk_length=1)`, as a
    local 'pretrained' folder: the whole `WhisperForConditionalGeneration`, or its `WhisperEncoder` alone."""
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(audio_config())
    (model.get_encoder() if encoder_only else model).save_pretrained(folder)
    WhisperFeatureExtractor(chunk_length=AUDIO_WINDOW_SECONDS).save_pretrained(folder)
    return folder


def write_clip(path: Path, seed: int = 0, seconds: float = 0.5, sampling_rate: int = 16000, **soundfile_kwargs):
    """`make_clip(seed, seconds, sampling_rate)` written with soundfile, in the format `path`'s extension names (.wav,
    .flac, .mp3, ...); `soundfile_kwargs` (e.g. `subtype="FLOAT"`) go to `soundfile.write`."""
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, make_clip(seed, seconds, sampling_rate), sampling_rate, **soundfile_kwargs)
    return path


def clip_bytes(extension: str, seed: int = 0, seconds: float = 0.5) -> bytes:
    """`make_clip(seed, seconds)` as the bytes of a .`extension` file (wav, flac, mp3, ogg)."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, make_clip(seed, seconds), 16000, format=extension.upper())
    return buffer.getvalue()


def speech_records(num_records: int, extension: str = "wav", with_images: bool = False) -> list[dict]:
    """Records with one clip each (`clips/<i>.<extension>`, an `<audio>` in the question) asking what is said (the
    answers cycle through `COLOURS`); with `with_images` every other record also shows an image."""
    records = []
    for index in range(num_records):
        record = {
            "id": f"speech-{index}",
            "audio": f"clips/{index}.{extension}",
            "conversations": [
                {"from": "human", "value": "<audio>\nWhat is said?"},
                {"from": "gpt", "value": f"It is {COLOURS[index % len(COLOURS)]}."},
            ],
        }
        if with_images and index % 2:
            record["image"] = f"images/{index}.png"
            record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
        records.append(record)
    return records


def write_shards(folder: Path, num_shards: int, per_shard: int, sample_fields) -> list[Path]:
    """WebDataset tar shards `folder/00000.tar`...: sample `index` of shard `shard` has the key
    `f"{shard:05d}{index:04d}"` and the members `key.<extension>` of `sample_fields(shard, index, key)`, a dict
    extension -> bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                for extension, data in sample_fields(shard, index, key).items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def write_audio_shards(folder: Path, num_shards: int, per_shard: int, extensions=("wav", "flac"), bad=None) -> list:
    """WebDataset shards `00000.tar`...: `key.<extension>` (cycling through `extensions`) + `key.txt` with the
    transcript. `bad` maps a key to a replacement for its clip's bytes."""
    bad = bad or {}

    def sample_fields(shard: int, index: int, key: str) -> dict[str, bytes]:
        extension = extensions[index % len(extensions)]
        clip = bad.get(key, clip_bytes(extension, seed=shard * 100 + index))
        return {extension: clip, "txt": f"It is {COLOURS[index % len(COLOURS)]}.".encode()}

    return write_shards(folder, num_shards, per_shard, sample_fields)


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
    """Writes `records` as JSON (or JSONL), a random image for every `image` path and a 0.5 s clip for every `audio`
    path that does not exist yet."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(records):
        image = record.get("image")
        if isinstance(image, str) and not (folder / image).exists():
            (folder / image).parent.mkdir(parents=True, exist_ok=True)
            make_image(seed=index).save(folder / image)
        audio = record.get("audio")
        for number, clip in enumerate([audio] if isinstance(audio, str) else audio or []):
            if isinstance(clip, str) and not (folder / clip).exists():
                write_clip(folder / clip, seed=100 * index + number)
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


def train_image_model(output_dir: Path, data_dir: Path, vision: Path, language: Path) -> Path:
    """A trained image-only OmniFusion folder in `output_dir`: one stage-1 step from the `vision` and `language`
    folders on 4 colour records written to `data_dir`. The training tests extend it with sound or video."""
    from modeling_omnifusion.training import stage1

    data_path = write_dataset(data_dir, colour_records(4))
    stage1.train(
        ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
        + training_flags(output_dir, data_path, max_steps=1)
    )
    return output_dir


def image_logits(folder: Path) -> torch.Tensor:
    """The logits of the saved model in `folder` on one image and a question about its colour."""
    from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor

    model = OmniFusionForCausalLM.from_pretrained(folder).eval()
    processor = OmniFusionProcessor.from_pretrained(folder)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the colour?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    with torch.no_grad():
        return model(**processor(images=[make_image(0)], text=[text], return_tensors="pt")).logits
