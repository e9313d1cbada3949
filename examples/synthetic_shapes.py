"""
A synthetic vision-language dataset of coloured shapes, written in the same LLaVA-style JSON as real training data.

Every image shows one to three shapes of one kind and one colour, grouped in one quadrant. Four attributes can be
asked about, each with a short answer: colour ("red"), shape ("circle"), count ("two") and position ("top left").
`write_split` draws images, saves them as PNG and writes two record files: captions for stage 1 and multi-turn
question-answer dialogs for stage 2.
"""

import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw
from tqdm.auto import tqdm


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
