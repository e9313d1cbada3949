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

from transformers import CLIPImageProcessorPil, CLIPVisionConfig

from modeling_omnifusion.processing.video_inputs_omnifusion import OmniFusionVideoProcessor
from modeling_omnifusion.testing import tiny

SOURCE_FPS = 8


def read_seconds(text: str, error) -> list[int]:
    try:
        seconds = [int(value) for value in text.split(",")]
    except ValueError:
        error(f"--seconds {text}: expected comma-separated whole seconds, e.g. 2,4,8")
    if not seconds or not all(0 < value <= 64 for value in seconds):
        error(f"--seconds {seconds}: every length must be 1 to 64 s")
    return seconds


def parse_args(argv=None) -> argparse.Namespace:
    return common.parse_prefill_args(
        argv,
        __doc__,
        seconds="2,4,8",
        seconds_help="Video lengths in seconds, comma-separated (max 64).",
        per="video length",
        quick_help="A small encoder and LM, one round: a smoke test.",
        read_seconds=read_seconds,
    )


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
    config = tiny.make_config(processor, vision=vision, adapter_type="mlp", video_num_frames=8, video_pool_size=2)
    return common.build_with_smollm2(config, processor, quick, max_position_embeddings=16384)


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
        common.prefill(model, with_video)  # warm-up
        contenders = {
            "video": lambda: common.prefill(model, with_video),
            "images": lambda: common.prefill(model, with_images),
            "vision": lambda: model.get_video_features(with_video["pixel_values_videos"]),
        }
        video_ms, images_ms, vision_ms = common.median_ms(contenders, args.rounds).values()
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
