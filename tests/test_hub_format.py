"""The one-folder Hub format: files, auto_map, model card, Auto registration, and loading without this project."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from fresh_python import run_fresh_python
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionModel, OmniFusionProcessor
from modeling_omnifusion.testing.tiny import chat, make_image, make_model_and_processor

AUTO_MODEL_CLASSES = {
    "AutoConfig": "configuration_omnifusion.OmniFusionConfig",
    "AutoModel": "modeling_omnifusion.OmniFusionModel",
    "AutoModelForCausalLM": "modeling_omnifusion.OmniFusionForCausalLM",
    "AutoModelForImageTextToText": "modeling_omnifusion.OmniFusionForCausalLM",
}


def save_with_reference(tmp_path_factory, **model_kwargs):
    """A tiny model + processor saved to one folder, with reference inputs and logits beside it."""
    folder = tmp_path_factory.mktemp("omnifusion-tiny")
    model, processor = make_model_and_processor(**model_kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    reference = tmp_path_factory.mktemp("reference")
    images = [make_image(0), make_image(1, size=45)]
    images[0].save(reference / "image0.png")
    images[1].save(reference / "image1.png")
    inputs = processor.apply_chat_template(
        chat("What colour is the shape?", images=images),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch.save(
        {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits, "greedy": greedy},
        reference / "reference.pt",
    )
    return folder, reference


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_with_reference(tmp_path_factory)


@pytest.fixture(scope="module")
def saved_mixed_tiled(tmp_path_factory):
    """Two encoders (CLIP + DINOv2, each with its own image processor), mix_sum, 1x2/2x1/2x2 tiles + global view."""
    return save_with_reference(
        tmp_path_factory,
        vision=["clip", "dinov2"],
        adapter_type="mix_sum",
        image_grid_pinpoints=[[64, 32], [32, 64], [64, 64]],
    )


def test_folder_holds_everything_in_one_flat_directory(saved):
    folder, _ = saved
    names = set(os.listdir(folder))
    expected = {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "README.md",
        "chat_template.jinja",
        "configuration_omnifusion.py",
        "modeling_omnifusion.py",
        "adapters_omnifusion.py",
        "processing_omnifusion.py",
        "hub_omnifusion.py",
        "processor_checks_omnifusion.py",
        "tokenizer_setup_omnifusion.py",
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert expected <= names
    assert not any(os.path.isdir(folder / name) for name in names)


def test_auto_map_covers_all_five_auto_classes(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "omnifusion"
    assert config["auto_map"] == AUTO_MODEL_CLASSES
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_omnifusion.OmniFusionProcessor"}
    assert processor_config["num_image_tokens"] == 16


def test_remote_code_imports_only_torch_transformers_and_siblings(saved):
    folder, _ = saved
    # The standard library, and Pillow: what every transformers image processor already needs.
    allowed = {"torch", "transformers", "huggingface_hub", "tokenizers", "numpy", "PIL"} | set(sys.stdlib_module_names)
    names = [
        "configuration_omnifusion.py",
        "modeling_omnifusion.py",
        "adapters_omnifusion.py",
        "audio_omnifusion.py",
        "processing_omnifusion.py",
        "input_checks_omnifusion.py",
        "quantization_omnifusion.py",
        "kernels_omnifusion.py",
        "compat_omnifusion.py",  # the version shim travels with its importers
        "hub_omnifusion.py",
        "processor_checks_omnifusion.py",
        "audio_inputs_omnifusion.py",
        "tokenizer_setup_omnifusion.py",
        "config_checks_omnifusion.py",
        "folder_checks_omnifusion.py",
        "tiles_omnifusion.py",
        "video_omnifusion.py",
        "video_inputs_omnifusion.py",
    ]
    assert sorted(path.name for path in folder.glob("*.py")) == sorted(names)
    for name in names:
        for line in (folder / name).read_text().splitlines():
            if line.startswith(("import ", "from ")) and not line.startswith("from ."):
                assert line.split()[1].split(".")[0] in allowed, f"{name}: {line}"


def test_model_card_front_matter(saved):
    folder, _ = saved
    text = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(text.split("---")[1])
    assert front_matter["library_name"] == "transformers"
    assert front_matter["pipeline_tag"] == "image-text-to-text"
    assert {"omnifusion", "custom_code"} <= set(front_matter["tags"])
    assert "base_model" not in front_matter  # built from bare configs: no Hub parent is known, so none is named
    assert front_matter["widget"][0]["src"].startswith("https://") and front_matter["widget"][0]["text"]
    assert front_matter["widget"][1]["messages"][0]["role"] == "user"


def test_image_processor_loads_from_its_standalone_config(saved):
    from transformers import AutoImageProcessor

    folder, _ = saved
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert image_processor.crop_size == {"height": 32, "width": 32}


def test_chat_template_file_is_the_processor_template(saved):
    folder, _ = saved
    assert (folder / "chat_template.jinja").read_text() == OmniFusionProcessor.from_pretrained(folder).chat_template


def test_importing_the_package_registers_every_auto_class(saved):
    folder, _ = saved
    config = AutoConfig.for_model("omnifusion")
    assert isinstance(config, OmniFusionConfig)
    assert type(AutoModel.from_pretrained(folder)) is OmniFusionModel
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is OmniFusionForCausalLM
    assert type(AutoModelForImageTextToText.from_pretrained(folder)) is OmniFusionForCausalLM
    assert type(AutoProcessor.from_pretrained(folder)) is OmniFusionProcessor


def test_installed_package_exposes_no_generic_top_level_modules(tmp_path):
    probe = (
        "import importlib.util as u, modeling_omnifusion as m; "
        "print([n for n in ('processing', 'conversion', 'examples', 'tests') if u.find_spec(n)]); "
        "print(m.OmniFusionProcessor.__module__); "
        "print(u.find_spec('modeling_omnifusion.conversion.released_format') is not None)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:3] == ["[]", "modeling_omnifusion.processing.processing_omnifusion", "True"]


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    for name in ("modeling_omnifusion", "processing", "conversion"):
        sys.modules[name] = None  # the project is neither installed nor importable here
    import torch
    torch.set_num_threads(1)  # as in the test process (conftest), so the float reductions run in the same order
    from PIL import Image
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer, pipeline)

    folder, reference = sys.argv[1], sys.argv[2]
    expected = torch.load(reference + "/reference.pt")
    images = [Image.open(reference + "/image0.png"), Image.open(reference + "/image1.png")]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    content = [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
               {"type": "text", "text": "What colour is the shape?"}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected["greedy"])
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "OmniFusionConfig"
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "OmniFusionModel"
    causal_lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(causal_lm).__name__ == "OmniFusionForCausalLM"
    assert AutoTokenizer.from_pretrained(folder, trust_remote_code=True).pad_token is not None

    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    answer = pipe(text=[{"role": "user", "content": [{"type": "image", "image": images[0]},
                                                   {"type": "text", "text": "What is shown?"}]}],
                  max_new_tokens=4, return_full_text=False)
    assert isinstance(answer[0]["generated_text"], str)
    print("FRESH-LOAD-OK")
    """
)


@pytest.mark.parametrize("variant", ["saved", "saved_mixed_tiled"])
def test_folder_loads_in_a_fresh_python_without_this_project(variant, request, tmp_path):
    folder, reference = request.getfixturevalue(variant)
    assert "FRESH-LOAD-OK" in run_fresh_python(FRESH_PROCESS_SCRIPT, tmp_path, folder, reference)


def test_serving_engine_contract(saved):
    """What vLLM's Transformers backend needs from a remote-code VLM (see shared/reference)."""
    folder, _ = saved
    base = AutoModel.from_pretrained(folder)
    assert {"vision_tower", "adapter", "language_model"} <= {name for name, _ in base.named_children()}
    assert not hasattr(base, "lm_head")
    assert base._supports_attention_backend
    text_config = base.config.get_text_config()
    assert text_config is base.config.text_config and base.config.sub_configs.keys() >= {"text_config", "vision_config"}
    layers = base.language_model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))
    assert layers[0].self_attn.config is text_config
    processor = AutoProcessor.from_pretrained(folder)
    image = make_image(3)
    pixel_values = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    features = base.get_image_features(pixel_values, return_dict=True)
    assert features.pooler_output[0].shape == (processor.num_image_tokens, text_config.hidden_size)
    ids = torch.tensor([list(processor.special_token_ids.values())])
    assert base.get_input_embeddings()(ids).shape == (1, 5, text_config.hidden_size)
    assert (
        processor.image_token == "<image>" and len(processor.tokenizer.encode("<image>", add_special_tokens=False)) == 1
    )
