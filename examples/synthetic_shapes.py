"""
A synthetic vision-language dataset of coloured shapes, written in the same LLaVA-style JSON as real training data,
and what the two demos (`quickstart.py`, `real_lm_demo.py`) build on it.

Every image shows one to three shapes of one kind and one colour, grouped in one quadrant. Four attributes can be
asked about, each with a short answer: colour ("red"), shape ("circle"), count ("two") and position ("top left").
`write_split` draws images, saves them as PNG and writes two record files: captions for stage 1 and multi-turn
question-answer dialogs for stage 2. For the demos: `pretrain_vision_tower` (a small CLIP-architecture tower that
sees the attributes, standing in for a pretrained encoder), `trainer_flags` (the stage commands' flags),
`evaluate` (held-out questions answered greedily) and `lenient_correct`, with `step` printing progress.
"""

import json
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

IMAGE_SIZE = 32  # the demos' image side and vision patch size, in pixels
PATCH_SIZE = 8

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS}

CAPTION_PROMPTS = ("Describe the image.", "Give a brief description of the image.", "What is in the picture?")
QUESTIONS = {
    "colour": ("What colour is the shape?", "What colour are the shapes?", "Which colour do you see?"),
    "shape": ("What shape is it?", "Which shape is shown?", "What kind of shape is in the image?"),
    "count": ("How many shapes are there?", "How many shapes do you see?", "Count the shapes."),
    "position": ("Where is the shape?", "Where are the shapes?", "In which corner are the shapes?"),
}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: str
    position: str

    def answer(self, attribute: str) -> str:
        return getattr(self, attribute)

    def caption(self) -> str:
        noun = self.shape if self.count == "one" else self.shape + "s"
        return f"{self.count.capitalize()} {self.colour} {noun} at the {self.position}."


def random_scene(rng: random.Random) -> Scene:
    return Scene(*(rng.choice(values) for values in ATTRIBUTES.values()))


def draw(scene: Scene, rng: random.Random, size: int) -> Image.Image:
    """The scene on a light background: its shapes in distinct cells of a 2x2 grid inside its quadrant."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(235, 255) for _ in range(3)))
    canvas = ImageDraw.Draw(image)
    quadrant = size // 2
    cell = quadrant // 2
    top = quadrant if scene.position.startswith("bottom") else 0
    left = quadrant if scene.position.endswith("right") else 0
    cells = rng.sample([(row, column) for row in range(2) for column in range(2)], COUNTS.index(scene.count) + 1)
    colour = tuple(min(255, max(0, channel + rng.randint(-20, 20))) for channel in COLOURS[scene.colour])
    for row, column in cells:
        extent = rng.randint(int(cell * 0.75), cell - 1)
        x0 = left + column * cell + rng.randint(0, cell - extent)
        y0 = top + row * cell + rng.randint(0, cell - extent)
        box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
        if scene.shape == "circle":
            canvas.ellipse(box, fill=colour)
        elif scene.shape == "square":
            canvas.rectangle(box, fill=colour)
        else:
            bottom = y0 + extent - 1
            canvas.polygon([(x0 + extent / 2, y0), (x0, bottom), (x0 + extent - 1, bottom)], fill=colour)
    return image


def caption_record(record_id: str, image: str, scene: Scene, rng: random.Random) -> dict:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
            {"from": "gpt", "value": scene.caption()},
        ],
    }


def dialog_record(record_id: str, image: str, scene: Scene, rng: random.Random) -> dict:
    """Two to four questions about different attributes, sometimes after a caption request, as in LLaVA dialogs."""
    turns = []
    if rng.random() < 0.25:
        turns.append((rng.choice(CAPTION_PROMPTS), scene.caption()))
    for attribute in rng.sample(list(ATTRIBUTES), rng.randint(2, 4)):
        turns.append((rng.choice(QUESTIONS[attribute]), scene.answer(attribute)))
    conversations = []
    for index, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if index == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": record_id, "image": image, "conversations": conversations}


def draw_scenes(num_images: int, seed: int, image_size: int, desc: str) -> tuple[list[Image.Image], list[Scene]]:
    """`num_images` random scenes and their images."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(num_images)]
    images = [draw(scene, rng, image_size) for scene in tqdm(scenes, desc=desc, leave=False)]
    return images, scenes


def write_split(folder: str, name: str, num_images: int, seed: int, image_size: int) -> list[tuple[str, Scene]]:
    """
    Draws `num_images` scenes into `folder/images/<name>-*.png`, writes `folder/<name>_captions.json` and
    `folder/<name>_dialogs.json`, and returns the (image path, scene) pairs.
    """
    images, scenes = draw_scenes(num_images, seed, image_size, desc=f"Drawing {name} images")
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    samples, captions, dialogs = [], [], []
    for index, (image, scene) in enumerate(zip(images, scenes)):
        path = f"images/{name}-{index:05d}.png"
        image.save(os.path.join(folder, path))
        samples.append((path, scene))
        captions.append(caption_record(f"{name}-caption-{index}", path, scene, rng))
        dialogs.append(dialog_record(f"{name}-dialog-{index}", path, scene, rng))
    for kind, records in (("captions", captions), ("dialogs", dialogs)):
        with open(os.path.join(folder, f"{name}_{kind}.json"), "w") as file:
            json.dump(records, file)
    return samples


def reading_texts(samples: list[tuple[str, Scene]], seed: int) -> list[str]:
    """
    Text for pre-training the LM: each scene's caption, then requests about it (questions, or half of the time also a
    caption request), each followed by its reply, one per line. The LM learns to answer from what it has read, the
    skill a pretrained LLM brings to a VLM.
    """
    rng = random.Random(seed)
    texts = []
    for _, scene in samples:
        attributes = rng.sample(list(ATTRIBUTES), rng.randint(2, 4))
        exchanges = [(rng.choice(QUESTIONS[attribute]), scene.answer(attribute)) for attribute in attributes]
        if rng.random() < 0.5:
            exchanges.insert(rng.randint(0, len(exchanges)), (rng.choice(CAPTION_PROMPTS), scene.caption()))
        texts.append("\n".join([scene.caption(), *(line for exchange in exchanges for line in exchange)]))
    return texts


START = time.time()  # a demo's start: its progress lines and total time count from here


def step(title: str):
    """Print a progress heading with the seconds since `START`."""
    print(f"\n=== [{time.time() - START:.0f} s] {title}", flush=True)


def pretrain_vision_tower(images: list[Image.Image], scenes, steps: int, folder: str) -> None:
    """
    A 3-layer CLIP-architecture vision tower trained so that every patch token of its second-to-last hidden state (the
    one OmniFusion reads) tells, through shared linear probes, the scene's colour, shape, count and position; saved
    with its image processor. `images` are a pool of their own, much larger than the training split (like a real
    encoder's pre-training data), so that the features hold on unseen images.
    """
    config = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=64,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    targets = {
        attribute: torch.tensor([values.index(scene.answer(attribute)) for scene in scenes])
        for attribute, values in ATTRIBUTES.items()
    }
    tower = CLIPVisionModel(config)
    probes = nn.ModuleDict({name: nn.Linear(config.hidden_size, len(values)) for name, values in ATTRIBUTES.items()})
    optimizer = torch.optim.AdamW([*tower.parameters(), *probes.parameters()], lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="Pre-training the vision tower"):
        index = torch.randint(len(images), (64,))
        patches = tower(pixel_values[index], output_hidden_states=True).hidden_states[-2][:, 1:]
        labels = {name: target[index].repeat_interleave(patches.shape[1]) for name, target in targets.items()}
        losses = {name: F.cross_entropy(probe(patches).flatten(0, 1), labels[name]) for name, probe in probes.items()}
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    print("Vision probe losses: " + ", ".join(f"{name} {value.item():.3f}" for name, value in losses.items()))
    tower.save_pretrained(folder)
    image_processor.save_pretrained(folder)


def trainer_flags(output_dir: str, data_path: str, image_folder: str, **flags) -> list[str]:
    common = {
        "data_path": data_path,
        "image_folder": image_folder,
        "output_dir": output_dir,
        "overwrite_output_dir": True,  # a rerun with the same --output_dir redraws and retrains everything
        "per_device_train_batch_size": 32,
        "gradient_accumulation_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 1,
        "dataloader_persistent_workers": True,
        "logging_steps": 25,
        **flags,
    }
    return [arg for key, value in common.items() for arg in (f"--{key}", str(value))]


@torch.inference_mode()
def evaluate(model, processor, data_dir: str, samples, seed: int, max_new_tokens: int = 6) -> list[dict]:
    """Asks one question per attribute about every held-out image and answers greedily."""
    rng = random.Random(seed)
    questions = [
        {"image": image, "attribute": name, "question": rng.choice(QUESTIONS[name]), "expected": scene.answer(name)}
        for image, scene in samples
        for name in ATTRIBUTES
    ]
    batch_size = 50
    for start in tqdm(range(0, len(questions), batch_size), desc="Answering held-out questions"):
        batch = questions[start : start + batch_size]
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": Image.open(os.path.join(data_dir, item["image"])).convert("RGB")},
                        {"type": "text", "text": item["question"]},
                    ],
                }
            ]
            for item in batch
        ]
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for item, answer in zip(batch, answers):
            item["answer"] = answer
            item["correct"] = answer.strip().strip(".").lower() == item["expected"]
    return questions


def lenient_correct(answer: str, attribute: str, expected: str) -> bool:
    """The expected value is named and no other value of the asked attribute is: 'The shape is red.' answers a colour
    question as well as 'red' does (a model after stage 1 has seen only captions, never these short answers)."""
    text = f" {answer.lower().strip()} ".replace(".", " ").replace(",", " ")
    named = {value for value in ATTRIBUTES[attribute] if f" {value} " in text}
    return named == {expected}
