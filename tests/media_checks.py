"""What the sound and video tests share: a chat encoded as the model's inputs, the checks that batching, the KV
cache and beams change no output, the count of encoder calls in `generate`, the files a saved folder must hold as
recorded, and a saved folder with its recorded outputs plus the script that reloads it in a fresh Python."""

import functools
import json
import textwrap
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
SAVED_FILES = (
    "config.json",
    "generation_config.json",
    "README.md",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def encode(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


@torch.no_grad()
def assert_batch_equals_rows_alone(model, processor, chats: list, new_tokens: int):
    """The chats as one batch: each row's last logits and `new_tokens` greedy tokens are those of the chat alone."""
    batch = encode(processor, chats)
    logits = model(**batch).logits[:, -1]
    tokens = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)[:, -new_tokens:]
    for index, messages in enumerate(chats):
        alone = encode(processor, messages)
        torch.testing.assert_close(logits[index], model(**alone).logits[0, -1], atol=1e-4, rtol=1e-4)
        expected = model.generate(**alone, max_new_tokens=new_tokens, do_sample=False)[0, -new_tokens:]
        assert torch.equal(tokens[index], expected)


@torch.no_grad()
def assert_cached_equals_uncached(model, inputs):
    """Six greedy tokens are the same with the KV cache and without it."""
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def encoder_calls(monkeypatch, model, method: str, count) -> list:
    """The list that `count(*args, **kwargs)` of every later call of `model.model.<method>` is appended to."""
    calls = []
    original = getattr(model.model, method)

    @functools.wraps(original)  # `generate` reads the encoder's parameters from its signature
    def counting(*args, **kwargs):
        calls.append(count(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(model.model, method, counting)
    return calls


@torch.no_grad()
def assert_beams_keep_media_order(model, processor, messages, swapped):
    """Every beam of `messages` starts from the same prompt: the first logits of each of 3 beams are the prompt's
    own, and those of `swapped` (its clips or videos in the other order) differ."""
    inputs = encode(processor, messages)
    reference = model(**inputs).logits[0, -1]
    out = model.generate(
        **inputs, max_new_tokens=3, num_beams=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    for beam_logits in out.logits[0]:
        torch.testing.assert_close(beam_logits, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model(**encode(processor, swapped)).logits[0, -1], reference)


def assert_saves_recorded_files(model, processor, folder: Path, recorded: Path):
    """`model` and `processor` saved in `folder` write `SAVED_FILES` as recorded in `recorded` (the transformers
    version aside) and weights of the names and shapes of its `weights.json`."""
    import transformers
    from safetensors import safe_open

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for file in SAVED_FILES:
        expected = (recorded / file).read_text().replace('"5.25.0"', json.dumps(transformers.__version__))
        assert (folder / file).read_text() == expected, file
    with safe_open(folder / "model.safetensors", "pt") as weights:
        shapes = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
    assert shapes == json.loads((recorded / "weights.json").read_text())


def save_with_reference(model, processor, folder: Path, reference: Path, messages: list):
    """`model` and `processor` saved in `folder`; in `reference` the chat (`chat.json`) and its inputs, logits, 6
    greedy and 4 beam-search tokens (`ref.pt`), for `fresh_load_script`."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (reference / "chat.json").write_text(json.dumps(messages))
    inputs = encode(processor, messages)
    with torch.no_grad():
        logits = model(**inputs).logits
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    torch.save({"inputs": dict(inputs), "logits": logits, "greedy": greedy, "beams": beams}, reference / "ref.pt")


FRESH_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    for name in ("modeling_omnifusion", "processing", "conversion"):
        sys.modules[name] = None  # the project is neither installed nor importable here
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoProcessor

    folder, reference = sys.argv[1], sys.argv[2]
    expected = torch.load(reference + "/ref.pt")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    PROCESSOR_CHECK
    messages = json.load(open(reference + "/chat.json"))
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert sorted(inputs) == sorted(expected["inputs"]), sorted(inputs)
    for key, value in expected["inputs"].items():
        assert torch.equal(inputs[key], value), key
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected["greedy"])
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False), expected["beams"])
    FINAL_CHECK
    print("FRESH-LOAD-OK")
    """
)


def fresh_load_script(processor_check: str, final_check: str = "") -> str:
    """The script (`python script folder reference`, run by `fresh_python.run_fresh_python`) that loads a folder of
    `save_with_reference` with `trust_remote_code` where this project cannot be imported, checks `processor_check`
    on its processor, reproduces the recorded inputs, logits, greedy and beam tokens exactly, checks `final_check`,
    and prints `FRESH-LOAD-OK`."""
    return FRESH_LOAD_SCRIPT.replace("PROCESSOR_CHECK", processor_check).replace("FINAL_CHECK", final_check)
