"""
A task only video answers: which way does the shape move? Short synthetic clips (a square moving left, right, up or
down, or appearing or vanishing in place), rendered and encoded as MP4 with PyAV, train a tiny OmniFusion with video
through both stage commands (`modeling_omnifusion.training.stage1` and `stage2`, their library `main` functions), and
the model is asked about held-out clips. The baseline asks the same questions with one frame of each clip only.

    pip install ".[train,video]"
    python examples/video_demo.py --output_dir video-demo            # the full run
    python examples/video_demo.py --output_dir video-demo --quick    # a smoke test: fewer clips and steps

The final Hub folder is `<output_dir>/omnifusion-video` (the stage-2 model). The last line printed is
`motion_accuracy=<value> single_frame_accuracy=<value>`: exact-answer accuracy on the held-out clips with all sampled
frames, and with the first frame only. One frame cannot tell the directions apart (the square's position in it is
random) and shows a square for every class but "appearing": the best any model can do from it is 0.25, chance is 1/6.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.testing.training import save_language_model, save_vision_model
from modeling_omnifusion.testing.videos import MOTIONS, motion_clip, write_video
from modeling_omnifusion.training import stage1, stage2

QUESTION = "How does the shape move?"
FRAMES = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where the data, the stages and omnifusion-video go.")
    parser.add_argument("--quick", action="store_true", help="A smoke test: fewer clips and training steps.")
    parser.add_argument("--train_per_motion", type=int, default=None, help="Training clips per motion.")
    parser.add_argument("--test_per_motion", type=int, default=None, help="Held-out clips per motion.")
    parser.add_argument("--stage1_steps", type=int, default=None, help="Stage-1 steps (adapter and markers).")
    parser.add_argument("--stage2_steps", type=int, default=None, help="Stage-2 steps (adapter, LM, markers).")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = parser.parse_args(argv)
    defaults = (8, 4, 10, 60) if args.quick else (60, 20, 100, 600)
    for name, value in zip(("train_per_motion", "test_per_motion", "stage1_steps", "stage2_steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def write_clips(folder: Path, per_motion: int, seed_base: int) -> list[dict]:
    """`per_motion` MP4 clips of every motion under `folder/clips`, as LLaVA-style records with a `video` field."""
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    records = []
    for number in range(per_motion):
        for motion in MOTIONS:
            seed = seed_base + number * len(MOTIONS) + MOTIONS.index(motion)
            name = f"clips/{motion}-{seed}.mp4"
            write_video(folder / name, motion_clip(motion, seed=seed, frames=FRAMES), fps=FRAMES)
            conversation = [{"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": motion}]
            records.append({"id": f"{motion}-{seed}", "video": name, "conversations": conversation})
    return records


def common_flags(output_dir: Path, data_path: Path, steps: int, learning_rate: float) -> list[str]:
    flags = {
        "data_path": data_path,
        "image_folder": data_path.parent,
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, steps // 20),
        "weight_decay": 0.0,
        "save_strategy": "no",
        "logging_steps": max(1, steps // 5),
        "disable_tqdm": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    return [arg for key, value in flags.items() for arg in (f"--{key}", str(value))]


@torch.no_grad()
def accuracy(model, processor, records: list[dict], folder: Path, num_frames: int) -> float:
    """Exact greedy answers to the question about each record's clip, `num_frames` frames sampled."""
    correct = 0
    for record in records:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "video", "path": str(folder / record["video"])},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ]
        inputs = processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"num_frames": num_frames},
        )
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        correct += answer == record["conversations"][1]["value"]
    return correct / len(records)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    data = output_dir / "data"
    started = time.perf_counter()
    parts = {
        "vision": save_vision_model(output_dir / "parts/vision"),
        "language": save_language_model(output_dir / "parts/language"),
    }
    train_records = write_clips(data, args.train_per_motion, seed_base=0)
    test_records = write_clips(data, args.test_per_motion, seed_base=1_000_000)
    train_path = data / "train.json"
    train_path.write_text(json.dumps(train_records))
    print(f"clips: {len(train_records)} training, {len(test_records)} held out, {FRAMES} frames of 32x32 each")

    stage1_dir, final_dir = output_dir / "stage1", output_dir / "omnifusion-video"
    stage1.main(
        ["--vision_model_name_or_path", str(parts["vision"]), "--language_model_name_or_path", str(parts["language"])]
        + ["--adapter_type", "mlp", "--video_num_frames", str(FRAMES)]
        + common_flags(stage1_dir, train_path, args.stage1_steps, 2e-3)
    )
    stage2.main(
        ["--model_name_or_path", str(stage1_dir)] + common_flags(final_dir, train_path, args.stage2_steps, 1e-3)
    )

    model = OmniFusionForCausalLM.from_pretrained(final_dir).eval()
    processor = OmniFusionProcessor.from_pretrained(final_dir)
    motion = accuracy(model, processor, test_records, data, FRAMES)
    single = accuracy(model, processor, test_records, data, 1)
    table = (
        "| model | frames per clip | held-out clips | accuracy |\n|---|---|---|---|\n"
        f"| omnifusion-video | {FRAMES} | {len(test_records)} | {motion:.3f} |\n"
        f"| omnifusion-video, one frame | 1 | {len(test_records)} | {single:.3f} |\n"
    )
    (output_dir / "video_results.md").write_text(table)
    print(table + f"chance: {1 / len(MOTIONS):.3f}; {time.perf_counter() - started:.0f} s in all; model: {final_dir}")
    print(f"motion_accuracy={motion:.3f} single_frame_accuracy={single:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
