"""
A task only video answers: which way does the shape move? Short synthetic clips (a square moving left, right, up or
down, or appearing or vanishing in place), rendered and encoded as MP4 with PyAV, train a tiny OmniFusion with video
through both stage commands (`modeling_omnifusion.training.stage1` and `stage2`, their library `main` functions), and
the model is asked about held-out clips (other seeds, never trained on). The baseline asks the same questions with one
frame of each clip only (the first: `num_frames=1` samples frame 0).

    pip install ".[train,video]"
    python examples/video_demo.py --output_dir video-demo            # the full run
    python examples/video_demo.py --output_dir video-demo --quick    # a smoke test: fewer clips and steps

Before the stages, two parts stand in for pretrained models: a 3-layer CLIP-architecture tower trained on single
frames to tell, from each patch token, how much of that patch the square covers (no motion labels), and the fixtures'
2-layer LM trained on the question followed by each answer (the answer words, all six alike). Clips have 4 frames of
32x32 and the square moves `DISTANCE` (8) pixels; its first frame is drawn from one distribution for every motion but
"appearing" (no square), so from one frame the best any model can do is 1/6 + (5/6) / 5 = 0.333, chance is 1/6.

The final Hub folder is `<output_dir>/omnifusion-video` (the stage-2 model). The last line printed is
`motion_accuracy=<value> single_frame_accuracy=<value>`: the share of held-out clips whose answer ranks first among the
six candidates by log-likelihood (each candidate scored as the assistant's turn after the question), with all sampled
frames and with the first frame only.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from modeling_omnifusion import OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.testing.tiny import make_processor, vision_config
from modeling_omnifusion.testing.training import save_language_model
from modeling_omnifusion.testing.videos import MOTIONS, motion_clip, write_video
from modeling_omnifusion.training import stage1, stage2

QUESTION = "How does the shape move?"
FRAMES = 4
DISTANCE = 8  # pixels the square moves in a clip; its first frame is drawn alike for every motion but "appearing"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where the data, the stages and omnifusion-video go.")
    parser.add_argument("--quick", action="store_true", help="A smoke test: fewer clips and training steps.")
    parser.add_argument("--train_per_motion", type=int, default=None, help="Training clips per motion.")
    parser.add_argument("--test_per_motion", type=int, default=None, help="Held-out clips per motion.")
    parser.add_argument("--stage1_steps", type=int, default=None, help="Stage-1 steps (adapter and markers).")
    parser.add_argument("--stage2_steps", type=int, default=None, help="Stage-2 steps (adapter, LM, markers).")
    parser.add_argument("--vision_steps", type=int, default=None, help="Vision tower pre-training steps (frames).")
    parser.add_argument("--lm_steps", type=int, default=None, help="LM pre-training steps (chat and answers).")
    parser.add_argument("--stage1_lr", type=float, default=3e-3, help="Stage-1 learning rate.")
    parser.add_argument("--stage2_lr", type=float, default=3e-3, help="Stage-2 learning rate.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = parser.parse_args(argv)
    defaults = (10, 4, 40, 50, 10, 100) if args.quick else (200, 20, 100, 100, 300, 3000)
    names = ("train_per_motion", "test_per_motion", "vision_steps", "lm_steps", "stage1_steps", "stage2_steps")
    for name, value in zip(names, defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def pretrain_language_model(folder: Path, steps: int) -> None:
    """
    Pre-trains the LM saved in `folder` (in place) on the demo's chat without video: the question and each of the
    `MOTIONS` as the answer, equally often, as plain text. It learns the answer words and that all six
    are possible; which one fits a clip is left to the stages.
    """
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [f"{QUESTION}\n{motion}{tokenizer.eos_token}" for motion in MOTIONS]
    tokenizer.pad_token = tokenizer.eos_token  # padding only: the labels mask it out
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"LM pre-training: {steps} steps, loss {loss.item():.3f} (floor ln 6 / answer tokens)")
    model.save_pretrained(folder)


def pretrain_vision_model(folder: Path, steps: int, seed_base: int) -> Path:
    """
    A 3-layer CLIP-architecture tower (`vision_config("clip", hidden=64, num_layers=3)`) trained on single frames so
    that every patch token of the hidden state OmniFusion reads (the second-to-last) tells, through a shared linear
    probe, how much of that patch the square covers: a stand-in for a pretrained encoder that sees where things are.
    Its frames come from clips of seeds `seed_base` onwards (none of the demo's training or held-out clips) and it
    never sees a motion label. Saved with the fixtures' image processor.
    """
    torch.manual_seed(0)
    tower = CLIPVisionModel(vision_config("clip", hidden=64, num_layers=3))
    image_processor = make_processor().image_processor
    clips = [
        motion_clip(motion, seed=seed_base + seed, frames=FRAMES, distance=DISTANCE)
        for seed in range(50)
        for motion in MOTIONS
    ]
    frames = np.concatenate(clips)
    pixel_values = image_processor(list(frames), return_tensors="pt")["pixel_values"]
    bright = torch.from_numpy(frames.max(-1) >= 150).float()  # [n, 32, 32]: the square's pixels
    patch = tower.config.patch_size
    coverage = torch.nn.functional.avg_pool2d(bright[:, None], patch).flatten(1)  # [n, patches]
    probe = torch.nn.Linear(tower.config.hidden_size, 1)
    optimizer = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        index = torch.randint(len(frames), (64,))
        patches = tower(pixel_values[index], output_hidden_states=True).hidden_states[-2][:, 1:]
        loss = torch.nn.functional.mse_loss(probe(patches).squeeze(-1), coverage[index])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    print(f"vision pre-training: {steps} steps, coverage probe loss {loss.item():.4f} (variance {coverage.var():.4f})")
    tower.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def write_clips(folder: Path, per_motion: int, seed_base: int) -> list[dict]:
    """`per_motion` MP4 clips of every motion under `folder/clips`, as LLaVA-style records with a `video` field."""
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    records = []
    for number in range(per_motion):
        for motion in MOTIONS:
            seed = seed_base + number * len(MOTIONS) + MOTIONS.index(motion)
            name = f"clips/{motion}-{seed}.mp4"
            write_video(folder / name, motion_clip(motion, seed=seed, frames=FRAMES, distance=DISTANCE), fps=FRAMES)
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


def messages_for(record: dict, folder: Path, answer: str | None = None) -> list[dict]:
    """The chat for `record`'s clip and question; with `answer`, the assistant's turn too."""
    user = [{"type": "video", "path": str(folder / record["video"])}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@torch.no_grad()
def accuracy(model, processor, records: list[dict], folder: Path, num_frames: int) -> float:
    """
    Share of `records` whose answer ranks first among `MOTIONS`: each candidate's summed log-likelihood as the
    assistant's turn (its tokens and the turn's end, exactly as training labels them) after the question about the
    record's clip, `num_frames` frames sampled.
    """
    correct = 0
    options = {"tokenize": True, "return_dict": True, "return_tensors": "pt"}
    options["processor_kwargs"] = {"num_frames": num_frames}
    for record in records:
        prompt = processor.apply_chat_template(messages_for(record, folder), add_generation_prompt=True, **options)
        start = prompt["input_ids"].shape[1]
        scores = []
        for candidate in MOTIONS:
            inputs = processor.apply_chat_template(messages_for(record, folder, candidate), **options)
            if not torch.equal(inputs["input_ids"][0, :start], prompt["input_ids"][0]):
                raise ValueError("the chat template's answer turn does not extend its generation prompt")
            log_probs = model(**inputs).logits[0, start - 1 : -1].float().log_softmax(-1)
            targets = inputs["input_ids"][0, start:]
            scores.append(log_probs.gather(-1, targets[:, None]).sum().item())
        correct += MOTIONS[max(range(len(MOTIONS)), key=scores.__getitem__)] == record["conversations"][1]["value"]
    return correct / len(records)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    data = output_dir / "data"
    started = time.perf_counter()
    parts = {
        "vision": pretrain_vision_model(output_dir / "parts/vision", args.vision_steps, seed_base=2_000_000),
        "language": save_language_model(output_dir / "parts/language"),
    }
    pretrain_language_model(parts["language"], args.lm_steps)
    train_records = write_clips(data, args.train_per_motion, seed_base=0)
    test_records = write_clips(data, args.test_per_motion, seed_base=1_000_000)
    train_path = data / "train.json"
    train_path.write_text(json.dumps(train_records))
    print(f"clips: {len(train_records)} training, {len(test_records)} held out, {FRAMES} frames of 32x32 each")

    stage1_dir, final_dir = output_dir / "stage1", output_dir / "omnifusion-video"
    stage1.main(
        ["--vision_model_name_or_path", str(parts["vision"]), "--language_model_name_or_path", str(parts["language"])]
        + ["--adapter_type", "mlp", "--video_num_frames", str(FRAMES)]
        + common_flags(stage1_dir, train_path, args.stage1_steps, args.stage1_lr)
    )
    stage2.main(
        ["--model_name_or_path", str(stage1_dir)]
        + common_flags(final_dir, train_path, args.stage2_steps, args.stage2_lr)
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
