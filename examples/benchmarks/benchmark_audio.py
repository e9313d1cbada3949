"""
What sound adds to a prompt's prefill: a clip of S seconds (25 LM positions per second) against a text-only prompt of
exactly the same length, on an OmniFusion with a Whisper-base-shaped encoder (6 layers, width 512, 30 s window) and a
SmolLM2-135M-shaped LM (random weights: the cost does not depend on them).

    python examples/benchmarks/benchmark_audio.py                  # clips of 1, 5, 10 and 30 s
    python examples/benchmarks/benchmark_audio.py --quick          # a small LM and encoder, one round (smoke test)

Per clip length it prints the prefill time with the clip, the same-length text prefill, the encoder's share, and the
added cost per second of audio. Whisper's encoder always reads its whole 30 s window, so a short clip pays the window's
cost and the LM positions it adds; a long one amortises it. The contenders run interleaved, each round once each, and
the medians are reported. The last line is `audio_prefill_ms_per_second=<value> audio_over_text_prefill=<ratio>`, both
for the longest clip.
"""

import common  # noqa: I001  (sets the benchmark environment before torch is imported)

import argparse

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor

from modeling_omnifusion.testing import tiny


def read_seconds(text: str, error) -> list[float]:
    try:
        seconds = [float(value) for value in text.split(",")]
    except ValueError:
        error(f"--seconds {text}: expected comma-separated numbers, e.g. 1,5,10,30")
    if not seconds or not all(0 < value <= 30 for value in seconds):
        error(f"--seconds {seconds}: every length must be in (0, 30] (Whisper's window)")
    return seconds


def parse_args(argv=None) -> argparse.Namespace:
    return common.parse_prefill_args(
        argv,
        __doc__,
        seconds="1,5,10,30",
        seconds_help="Clip lengths in seconds, comma-separated (max 30).",
        per="clip length",
        quick_help="A small LM and encoder, one round: a smoke test.",
        read_seconds=read_seconds,
    )


def build(quick: bool):
    """The model in eval mode and its processor (a `WhisperFeatureExtractor` with Whisper's 30 s window)."""
    processor = tiny.make_processor(audio_preprocessor=WhisperFeatureExtractor(), audio_pool_stride=2)
    width, layers, heads = (64, 2, 2) if quick else (512, 6, 8)
    audio = WhisperConfig(
        d_model=width,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * width,
        decoder_layers=1,
        num_mel_bins=80,
        max_source_positions=1500,
    )
    config = tiny.make_config(processor, adapter_type="mlp", audio_config=audio, audio_pool_stride=2)
    return common.build_with_smollm2(config, processor, quick, max_position_embeddings=2048)


def inputs_for(processor, seconds: float) -> tuple[dict, dict]:
    """The clip prompt's inputs, and a text-only prompt of the same length (the clip's block replaced by text ids)."""
    clip = tiny.make_clip(seed=1, seconds=seconds)
    with_audio = processor.apply_chat_template(
        tiny.audio_chat("What is said?", clips=[clip]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    ids = with_audio["input_ids"].clone()
    text_id = processor.tokenizer.convert_tokens_to_ids("a")
    ids[torch.isin(ids, torch.tensor(list(processor.special_token_ids.values())))] = text_id
    text_only = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return dict(with_audio), text_only


def main(argv=None) -> int:
    args = parse_args(argv)
    common.configure(args.threads)
    model, processor = build(args.quick)
    print(common.cpu_description())
    print(
        f"OmniFusion sound prefill: Whisper-shaped encoder width {model.config.audio_config.d_model}, "
        f"{model.config.audio_config.encoder_layers} layers; LM width {model.config.text_config.hidden_size}, "
        f"{model.config.text_config.num_hidden_layers} layers; {args.threads} threads, {args.rounds} rounds"
    )
    print(f"{'clip s':>7} {'positions':>9} {'audio ms':>9} {'text ms':>8} {'encoder ms':>10} {'ms per audio s':>14}")
    rows = []
    for seconds in args.seconds:
        with_audio, text_only = inputs_for(processor, seconds)
        features = {key: with_audio[key] for key in ("input_features", "input_features_mask")}
        common.prefill(model, with_audio)  # warm-up
        contenders = {
            "audio": lambda: common.prefill(model, with_audio),
            "text": lambda: common.prefill(model, text_only),
            "encoder": lambda: model.get_audio_features(**features),
        }
        audio_ms, text_ms, encoder_ms = common.median_ms(contenders, args.rounds).values()
        positions = int((with_audio["input_ids"] == model.config.audio_token_id).sum())
        rows.append((seconds, audio_ms, text_ms))
        print(
            f"{seconds:7.1f} {positions:9d} {audio_ms:9.1f} {text_ms:8.1f} {encoder_ms:10.1f} "
            f"{audio_ms / seconds:14.1f}"
        )
    seconds, audio_ms, text_ms = rows[-1]
    print(f"audio_prefill_ms_per_second={audio_ms / seconds:.1f} audio_over_text_prefill={audio_ms / text_ms:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
