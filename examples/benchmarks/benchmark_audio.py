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
import statistics

import torch
from transformers import LlamaConfig, WhisperConfig, WhisperFeatureExtractor

from modeling_omnifusion import OmniFusionForCausalLM
from modeling_omnifusion.testing import tiny


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", default="1,5,10,30", help="Clip lengths in seconds, comma-separated (max 30).")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds per contender and clip length.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--quick", action="store_true", help="A small LM and encoder, one round: a smoke test.")
    args = parser.parse_args(argv)
    try:
        args.seconds = [float(value) for value in args.seconds.split(",")]
    except ValueError:
        parser.error(f"--seconds {args.seconds}: expected comma-separated numbers, e.g. 1,5,10,30")
    if not args.seconds or not all(0 < value <= 30 for value in args.seconds):
        parser.error(f"--seconds {args.seconds}: every length must be in (0, 30] (Whisper's window)")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")
    if args.quick:
        args.rounds = 1
    return args


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
    small_lm = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2, head_dim=32)
    lm_shape = dict(small_lm, num_key_value_heads=1) if quick else {}
    text = LlamaConfig(
        **{
            **common.SMOLLM2_SHAPE,
            "hidden_size": common.SMOLLM2_SIZE["text_hidden"],
            "num_hidden_layers": common.SMOLLM2_SIZE["text_layers"],
            **lm_shape,
        },
        vocab_size=common.SMOLLM2_SIZE["vocab_size"],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    config = tiny.make_config(processor, adapter_type="mlp", audio_config=audio, audio_pool_stride=2)
    config.text_config = text
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    torch.manual_seed(0)
    return OmniFusionForCausalLM(config).eval(), processor


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


def prefill(model, inputs: dict):
    model(**inputs, use_cache=True, logits_to_keep=1)


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
        prefill(model, with_audio)  # warm-up
        times = {"audio": [], "text": [], "encoder": []}
        for _ in range(args.rounds):
            times["audio"].append(common.timed(lambda: prefill(model, with_audio))[0])
            times["text"].append(common.timed(lambda: prefill(model, text_only))[0])
            times["encoder"].append(common.timed(lambda: model.get_audio_features(**features))[0])
        audio_ms, text_ms, encoder_ms = (1000 * statistics.median(times[key]) for key in ("audio", "text", "encoder"))
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
