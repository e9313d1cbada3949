"""
Fault and bad-input cases against OmniFusion's input guards, counted per class as ok / unclear error /
silently wrong / crash.

Each case feeds one hostile-but-fair input to a tiny OmniFusion built here (no download) and judges the outcome:
- a case that must be refused is `ok` when it raises `ValueError`/`TypeError` whose message names what is wrong,
  `unclear error` for that type without the expected words, `crash` for any other exception, and `silently wrong`
  when it does not fail at all;
- a case that must work is `ok` when its result equals the reference (the same image in 8 bits, the ids of the text
  as plain characters), `silently wrong` when it differs, `crash` when it raises.

    python examples/benchmarks/fault_injection.py [--classes images text chat model loading training converter
                                                   folders saves data visdial]

`training` (damaged checkpoints, `--resume_from_checkpoint latest`, odd data files, images only decoding catches;
needs the `[train]` extra), `converter` (hostile archives for the released-checkpoint reader), `folders` (damaged
or inconsistent saved folders loaded with `trust_remote_code`, NaN `pixel_values`), `saves` (saves failing
half-way, a kill while the final training output moves in, file modes; needs the `[train]` extra), `data` (training
data lost or wasted without a word: truncated and empty shards, runs of no step, refused records,
`--model_max_length` beyond the LM, stage 2 from a plain LM; tiny training runs, `[train]` extra) and `visdial`
(malformed VisDial files, a real 10-round dialog on a 256-position LM) come from `fault_cases.py` beside this script.

The last line is `cases=<n> ok=<n> unclear=<n> silently_wrong=<n> crash=<n>`.
"""

import argparse
import json
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict

import fault_cases
import numpy as np
import PIL.Image
import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, MistralConfig

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor
from modeling_omnifusion.testing.tiny import make_tokenizer

TYPED = ["<user>", "<assistant>", "<image_start>", "<image_end>", "<image>", "</s>", "<s>", "<unk>"]


def tiny_model_and_processor():
    """A 2-layer CLIP tower + 2-layer Mistral LM (512 positions) with a byte-level BPE tokenizer, 16 image tokens."""
    tokenizer = make_tokenizer(300, ["This is a dialog with AI assistant. What colour is the shape? It is red."] * 4)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = OmniFusionProcessor(image_processor, tokenizer, num_image_tokens=16, end_assistant_turns_with_eos=True)
    text_config = MistralConfig(
        vocab_size=len(tokenizer) - 5, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vision_config = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    config = OmniFusionConfig(
        vision_config=vision_config, text_config=text_config, adapter_type="mlp", **processor.special_token_ids
    )
    torch.manual_seed(0)
    return OmniFusionForCausalLM(config).eval(), processor


def refused(call, *words):
    """A case that must fail with a ValueError/TypeError whose message holds `words` (regexes)."""
    return ("refused", call, words)


def equal(call, reference):
    """A case that must work and give exactly what `reference()` gives."""
    return ("equal", call, reference)


def judge(case) -> str:
    kind, call, expected = case
    try:
        result = call()
    except (ValueError, TypeError) as error:
        if kind == "equal":
            return "crash"
        return "ok" if str(error) and all(re.search(word, str(error)) for word in expected) else "unclear error"
    except Exception:  # noqa: BLE001 - anything else is what this script counts as a crash
        return "crash"
    if kind == "refused":
        return "silently wrong"
    reference = expected()
    same = torch.equal(result, reference) if isinstance(result, torch.Tensor) else result == reference
    return "ok" if same else "silently wrong"


def image_cases(model, processor):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    gray = rgb[..., 0]

    def pixels(image):
        return lambda: processor(images=image, text="<image>q", return_tensors="pt")["pixel_values"]

    as_8_bit = lambda array: pixels(PIL.Image.fromarray(array).convert("RGB"))  # noqa: E731
    return {
        "float HWC in [0, 1]": equal(pixels(rgb / 255.0), as_8_bit(rgb)),
        "torch CHW float in [0, 1]": equal(pixels(torch.tensor(rgb).permute(2, 0, 1) / 255.0), as_8_bit(rgb)),
        "float 1xHxW in [0, 1]": equal(pixels((gray / 255.0)[None]), as_8_bit(gray)),
        "float HxW in [0, 1]": equal(pixels(gray / 255.0), as_8_bit(gray)),
        "PIL mode F in [0, 1]": equal(
            pixels(PIL.Image.fromarray((gray / 255).astype(np.float32), "F")), as_8_bit(gray)
        ),
        "PIL mode I;16": equal(pixels(PIL.Image.fromarray(gray.astype(np.uint16) * 257)), as_8_bit(gray)),
        "numpy uint16": equal(pixels(gray.astype(np.uint16) * 257), as_8_bit(gray)),
        "PIL mode I with 16-bit values": refused(
            pixels(PIL.Image.fromarray(gray.astype(np.int32) * 257)), "Image 0", "uint16"
        ),
        "0x0 PIL image": refused(pixels(PIL.Image.new("RGB", (0, 0))), "Image 0", "0x0"),
        "0x0 array": refused(pixels(np.zeros((0, 0, 3), np.uint8)), "Image 0", "0x0"),
        "5-D array": refused(pixels(np.zeros((1, 1, 3, 8, 8), np.uint8)), "Image 0", "shape"),
        "NaN image": refused(pixels(np.full((8, 8, 3), np.nan, np.float32)), "Image 0", "NaN"),
        "normalised float image": refused(pixels(np.full((8, 8, 3), -1.0)), "Image 0", r"\[0, 1\]"),
        "in-memory decompression bomb": refused(bomb(pixels), "Image 0", "decompression bomb"),
        "dict as image": refused(pixels({"a": 1}), "Image 0", "dict"),
    }


def bomb(pixels):
    def call():
        limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, 1000  # a 64x64 image is a "bomb" here
        try:
            return pixels(np.zeros((64, 64, 3), np.uint8))()
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = limit

    return call


def text_cases(model, processor):
    tokenizer = processor.tokenizer
    control = {tokenizer.convert_tokens_to_ids(token) for token in tokenizer.added_tokens_encoder}

    def control_ids_from(text, role):
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        messages[0 if role == "user" else 1]["content"] = text

        def call():
            ids = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][0]
            return sorted(i for i in ids if i in control)

        return call

    template_only = control_ids_from("x", "user")
    cases = {}
    for token in TYPED:
        for role in ("user", "assistant"):
            cases[f"typed {token} in {role} text"] = equal(control_ids_from(f"say {token} now", role), template_only)

    def rendered_then_tokenized(text):
        def call():
            rendered = processor.apply_chat_template([{"role": "user", "content": text}])
            return sorted(i for i in tokenizer(rendered, add_special_tokens=False)["input_ids"] if i in control)

        return call

    cases["render then tokenize (vLLM's way)"] = equal(
        rendered_then_tokenized(" ".join(TYPED)), rendered_then_tokenized("x")
    )
    return cases


def chat_cases(model, processor):
    template = processor.apply_chat_template
    image = PIL.Image.new("RGB", (8, 8))
    return {
        "empty chat": refused(lambda: template([]), "non-empty"),
        "content item without type": refused(
            lambda: template([{"role": "user", "content": [{"text": "x"}]}]), "'type'"
        ),
        "content that is a number": refused(lambda: template([{"role": "user", "content": 5}]), "message 0 content"),
        "unknown role": refused(lambda: template([{"role": "robot", "content": "x"}]), "robot"),
        "second system message": refused(
            lambda: template([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}]), "system"
        ),
        "lone surrogate in chat": refused(lambda: template([{"role": "user", "content": "a\ud800"}]), "surrogate"),
        "text=None with an image": refused(lambda: processor(images=image), "text=None"),
        "images=[] with text=[]": refused(lambda: processor(images=[], text=[]), "empty list"),
        "lone surrogate in text": refused(lambda: processor(text="a\udc80"), "surrogate"),
        "more <image> than images": refused(lambda: processor(images=[image], text="<image><image>"), "<image>"),
        "number as text": refused(lambda: processor(text=3), "text must be"),
    }


def model_cases(model, processor):
    def generate(**kwargs):
        return lambda: model.generate(max_new_tokens=1, **kwargs)

    return {
        "empty prompt (forward)": refused(lambda: model(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
        "empty prompt (generate)": refused(generate(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
        "75k-token prompt on 512 positions": refused(
            generate(input_ids=torch.ones(1, 75_000, dtype=torch.long)), "75000", "max_position_embeddings=512"
        ),
        "vision_feature_layer out of range (call)": refused(
            lambda: model.get_image_features(torch.zeros(1, 3, 32, 32), vision_feature_layer=9),
            "vision_feature_layer=9",
        ),
        "processor num_image_tokens disagrees": refused(mismatched_generate(model, processor), "num_image_tokens"),
        "max_new_tokens as a string": refused(
            lambda: model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens="3"), "max_new_tokens"
        ),
    }


def mismatched_generate(model, processor):
    def call():
        saved, processor.num_image_tokens = processor.num_image_tokens, 8
        try:
            inputs = processor(images=PIL.Image.new("RGB", (32, 32)), text="<image>q", return_tensors="pt")
        finally:
            processor.num_image_tokens = saved
        return model.generate(**inputs, max_new_tokens=1)

    return call


def loading_cases(model, processor, folder):
    def edited(file, change, load):
        def call():
            copy = tempfile.mkdtemp(dir=os.path.dirname(folder))
            shutil.copytree(folder, copy, dirs_exist_ok=True)
            path = os.path.join(copy, file)
            if file.endswith(".json"):
                with open(path) as handle:
                    data = json.load(handle)
                with open(path, "w") as handle:
                    json.dump(change(data), handle)
            else:
                change(path)
            return load(copy)

        return call

    def poison(tensor):
        def change(path):
            from safetensors.torch import load_file, save_file

            weights = load_file(path)
            weights[tensor][0, 0] = float("nan")
            save_file(weights, path, metadata={"format": "pt"})

        return change

    load_model, load_processor = OmniFusionForCausalLM.from_pretrained, OmniFusionProcessor.from_pretrained
    cases = {
        f"vision_feature_layer={layer} in config.json": refused(
            edited("config.json", lambda c, layer=layer: {**c, "vision_feature_layer": layer}, load_model),
            "vision_feature_layer",
            "out of range",
        )
        for layer in (5, -7)
    }
    for value in (-4, "16", 0):
        cases[f"num_image_tokens={value!r} in processor_config.json"] = refused(
            edited("processor_config.json", lambda c, value=value: {**c, "num_image_tokens": value}, load_processor),
            "num_image_tokens",
        )
    for key, value in (("do_sample", "false"), ("max_new_tokens", "50"), ("num_beams", "3"), ("eos_token_id", "2")):
        cases[f"generation_config {key}={value!r}"] = refused(
            edited("generation_config.json", lambda c, key=key, value=value: {**c, key: value}, load_model),
            "generation_config.json",
            key,
        )
    for tensor in ("lm_head.weight", "model.language_model.embed_tokens.special_embeddings.weight"):
        cases[f"NaN in {tensor}"] = refused(edited("model.safetensors", poison(tensor), load_model), "NaN", tensor)
    return cases


def training_cases(model, processor, folder):
    return fault_cases.training_cases(os.path.join(os.path.dirname(folder), "training"))


def converter_cases(model, processor, folder):
    return fault_cases.converter_cases(os.path.join(os.path.dirname(folder), "converter"))


def folder_cases(model, processor, folder):
    return fault_cases.folder_cases(folder, os.path.join(os.path.dirname(folder), "folders"))


def save_cases(model, processor, folder):
    return fault_cases.save_cases(model, processor, os.path.join(os.path.dirname(folder), "saves"))


def data_cases(model, processor, folder):
    return fault_cases.data_cases(os.path.join(os.path.dirname(folder), "data"))


def visdial_cases(model, processor, folder):
    return fault_cases.visdial_cases(os.path.join(os.path.dirname(folder), "visdial"), folder)


CLASSES = {
    "images": image_cases, "text": text_cases, "chat": chat_cases, "model": model_cases, "loading": loading_cases,
    "training": training_cases, "converter": converter_cases, "folders": folder_cases, "saves": save_cases,
    "data": data_cases, "visdial": visdial_cases,
}  # fmt: skip
WITH_FOLDER = {
    "loading",
    "training",
    "converter",
    "folders",
    "saves",
    "data",
    "visdial",
}  # builders that also take the work folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", nargs="+", choices=sorted(CLASSES), default=list(CLASSES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = tiny_model_and_processor()
    with tempfile.TemporaryDirectory() as workdir:
        folder = os.path.join(workdir, "model")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        counts = defaultdict(Counter)
        for name in args.classes:
            builder = CLASSES[name]
            cases = builder(model, processor, folder) if name in WITH_FOLDER else builder(model, processor)
            for case_name, case in cases.items():
                outcome = judge(case)
                counts[name][outcome] += 1
                if outcome != "ok":
                    print(f"  [{name}] {case_name}: {outcome}")
    outcomes = ("ok", "unclear error", "silently wrong", "crash")
    print(f"{'class':10s}" + "".join(f"{outcome:>16s}" for outcome in outcomes))
    for name in args.classes:
        print(f"{name:10s}" + "".join(f"{counts[name][outcome]:16d}" for outcome in outcomes))
    total = sum(counts.values(), Counter())
    print(
        f"cases={sum(total.values())} ok={total['ok']} unclear={total['unclear error']} "
        f"silently_wrong={total['silently wrong']} crash={total['crash']}"
    )


if __name__ == "__main__":
    main()
