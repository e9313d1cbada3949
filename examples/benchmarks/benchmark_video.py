"""
What video adds to a prompt's prefill: a video of S seconds sampled at 1 frame per second (S frames, each 2x2-pooled
to a quarter of an image's positions) against the same S frames given as S images, on an OmniFusion with a
CLIP-ViT-B/16-shaped encoder (224 px, 196 positions per image, 49 per frame) and a SmolLM2-135M-shaped LM (random
weights: the cost does not depend on them).

    python examples/benchmarks/benchmark_video.py                  # videos of 2, 4 and 8 s
    python examples/benchmarks/benchmark_video.py --quick          # a small encoder and LM, one round (smoke test)

Per video length it prints the prefill time of the video prompt, of the same frames as images, the vision side's share
and the cost per second of video. Both prompts run the encoder on the same frames; the video prompt gives the LM a
quarter of the positions. The contenders run interleaved, each round once each, and the medians are reported. The last
line is `video_prefill_ms_per_second=<value> video_over_images_prefill=<ratio>`, both for the longest video.
"""

import common  # noqa: I001  (sets the benchmark environment before torch is imported)

import argparse
import statistics

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig

from modeling_omnifusion import OmniFusionForCausalLM
from modeling_omnifusion.processing.video_inputs_omnifusion import OmniFusionVideoProcessor
from modeling_omnifusion.testing import tiny

SOURCE_FPS = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", default="2,4,8", help="Video lengths in seconds, comma-separated (max 64).")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds per contender and video length.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--quick", action="store_true", help="A small encoder and LM, one round: a smoke test.")
    args = parser.parse_args(argv)
    try:
        args.seconds = [int(value) for value in args.seconds.split(",")]
    except ValueError:
        parser.error(f"--seconds {args.seconds}: expected comma-separated whole seconds, e.g. 2,4,8")
    if not args.seconds or not all(0 < value <= 64 for value in args.seconds):
        parser.error(f"--seconds {args.seconds}: every length must be 1 to 64 s")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")
    if args.quick:
        args.rounds = 1
    return args


def build(quick: bool):
    """The model in eval mode and its processor (frames and images through one CLIP image processor)."""
    size, patch = (32, 8) if quick else (224, 16)
    processor = tiny.make_processor(video_preprocessor=OmniFusionVideoProcessor(num_frames=8))
    processor.image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    width, layers, heads = (32, 2, 4) if quick else (768, 12, 12)
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=size,
        patch_size=patch,
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
        max_position_embeddings=16384,
        tie_word_embeddings=True,
    )
    config = tiny.make_config(processor, vision=vision, adapter_type="mlp", video_num_frames=8, video_pool_size=2)
    config.text_config = text
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    torch.manual_seed(0)
    return OmniFusionForCausalLM(config).eval(), processor


def inputs_for(processor, seconds: int) -> tuple[dict, dict]:
    """The video prompt's inputs (1 frame per second of a `SOURCE_FPS` video) and the same frames as images."""
    video = tiny.make_video(seed=1, frames=seconds * SOURCE_FPS, size=processor.tile_size)
    frames = video[::SOURCE_FPS]

    def encode(content, **kwargs):
        messages = [{"role": "user", "content": content + [{"type": "text", "text": "What happens?"}]}]
        return processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
        )

    with_video = encode([{"type": "video", "video": video}], fps=1, video_metadata={"fps": SOURCE_FPS})
    with_images = encode([{"type": "image", "image": frame} for frame in frames])
    return dict(with_video), dict(with_images)


def prefill(model, inputs: dict):
    model(**inputs, use_cache=True, logits_to_keep=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.configure(args.threads)
    model, processor = build(args.quick)
    print(common.cpu_description())
    vision = model.config.vision_config
    print(
        f"OmniFusion video prefill: CLIP-shaped encoder width {vision.hidden_size}, {vision.num_hidden_layers} layers, "
        f"{model.config.num_image_tokens} positions per image, {model.config.num_video_frame_tokens} per frame; LM "
        f"width {model.config.text_config.hidden_size}, {model.config.text_config.num_hidden_layers} layers; "
        f"{args.threads} threads, {args.rounds} rounds"
    )
    print(f"{'video s':>7} {'positions':>9} {'video ms':>9} {'images ms':>9} {'vision ms':>9} {'ms per video s':>14}")
    rows = []
    for seconds in args.seconds:
        with_video, with_images = inputs_for(processor, seconds)
        prefill(model, with_video)  # warm-up
        times = {"video": [], "images": [], "vision": []}
        for _ in range(args.rounds):
            times["video"].append(common.timed(lambda: prefill(model, with_video))[0])
            times["images"].append(common.timed(lambda: prefill(model, with_images))[0])
            times["vision"].append(common.timed(lambda: model.get_video_features(with_video["pixel_values_videos"]))[0])
        video_ms, images_ms, vision_ms = (1000 * statistics.median(times[key]) for key in ("video", "images", "vision"))
        positions = int((with_video["input_ids"] == model.config.video_token_id).sum())
        rows.append((seconds, video_ms, images_ms))
        print(
            f"{seconds:7d} {positions:9d} {video_ms:9.1f} {images_ms:9.1f} {vision_ms:9.1f} {video_ms / seconds:14.1f}"
        )
    seconds, video_ms, images_ms = rows[-1]
    print(f"video_prefill_ms_per_second={video_ms / seconds:.1f} video_over_images_prefill={video_ms / images_ms:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
