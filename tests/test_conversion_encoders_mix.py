"""The encoders-mix release (CLIP + DINOv2, projection & summation): structure report, mapping onto mix_sum,
parity with the report's variant 3, and a clear error for projections that do not fit."""

import os

import pytest
import sentencepiece as spm
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    Dinov2Model,
    MistralForCausalLM,
)

from modeling_omnifusion.conversion.convert_omnifusion_to_hf import convert_omnifusion_to_hf, main
from modeling_omnifusion.conversion.released_format import (
    UnsafePickleError,
    describe_projection_structure,
    read_mix_projection,
)
from modeling_omnifusion.testing.released import (
    make_clip_vision_folder,
    make_dinov2_folder,
    make_released_mix_checkpoint,
    released_mix_models_module,
    save_released_mix_projection,
)
from modeling_omnifusion.testing.tiny import chat, make_image

PROMPT = "This is a dialog with AI assistant.\n"
QUERY = "What is the sky color on this image?"


class ReleasedMixInference:
    """The released inference path with the encoders-mix adapter: the pickled module (our fixture's `models.py`, the
    report's variant 3) fed every hidden state of CLIP and of DINOv2 (each on its own preprocessing, CLS dropped),
    spliced between SOI and EOI as in the README, into the released `MistralForCausalLM`."""

    def __init__(self, info, clip_dir, dinov2_dir):
        with released_mix_models_module():
            self.projection = torch.load(info["projection"], weights_only=False).eval()
        self.special = torch.load(info["special_embeddings"], weights_only=True)
        self.lm = MistralForCausalLM.from_pretrained(info["lm_dir"]).eval()
        self.dtype = self.lm.dtype
        self.clip = CLIPVisionModel.from_pretrained(clip_dir, dtype=self.dtype).eval()
        self.dinov2 = Dinov2Model.from_pretrained(dinov2_dir, dtype=self.dtype).eval()
        self.clip_processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
        self.dinov2_processor = BitImageProcessorPil.from_pretrained(dinov2_dir)
        self.sentencepiece = spm.SentencePieceProcessor(model_file=str(info["tokenizer_model"]))

    @torch.no_grad()
    def image_embeddings(self, image):
        clip_pixels = self.clip_processor(image, return_tensors="pt").pixel_values.to(self.dtype)
        dino_pixels = self.dinov2_processor(image, return_tensors="pt").pixel_values.to(self.dtype)
        clip_states = [h[:, 1:] for h in self.clip(clip_pixels, output_hidden_states=True).hidden_states]
        dino_states = [h[:, 1:] for h in self.dinov2(dino_pixels, output_hidden_states=True).hidden_states]
        return self.projection(clip_states, dino_states)

    @torch.no_grad()
    def embeddings(self, image, query=QUERY):
        embed = self.lm.get_input_embeddings()

        def text(value):
            return embed(torch.tensor([self.sentencepiece.encode(value)]))

        def marker(key):
            return self.special[key][None, None]

        parts = [
            text(PROMPT),
            marker("SOI"),
            self.image_embeddings(image),
            marker("EOI"),
            marker("USER"),
            text(query),
            marker("BOT"),
        ]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def logits(self, image, query=QUERY):
        return self.lm(inputs_embeds=self.embeddings(image, query)).logits


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    # CLIP 28 px / 14 px patches: 4 patches; DINOv2 built for 28 px, its processor crops 21 px: 9 patches
    return make_clip_vision_folder(root), make_dinov2_folder(root, image_size=28, crop_size=21, patch_size=7)


@pytest.fixture(scope="module", params=["attributes", "list"])
def converted(request, tmp_path_factory, towers):
    clip_dir, dinov2_dir = towers
    root = tmp_path_factory.mktemp(f"mix-{request.param}")
    info = make_released_mix_checkpoint(
        root / "released", dtype=torch.float32, layout=request.param, num_image_tokens=9
    )
    out = convert_omnifusion_to_hf(info["input_dir"], root / "converted", vision_model=f"{clip_dir},{dinov2_dir}")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    return info, out, ReleasedMixInference(info, clip_dir, dinov2_dir), model, processor


def encode(processor, image):
    return processor.apply_chat_template(
        chat(QUERY, images=[image]), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_structure_report_lists_modules_shapes_dtypes_and_attributes(tmp_path):
    path = tmp_path / "projection.pt"
    save_released_mix_projection(path, clip=(3, 32), dino=(2, 16), width=24, text_hidden=64)
    entries = {entry.path: entry for entry in describe_projection_structure(path)}
    assert entries["clip_norm_2"].type_name == "LayerNorm" and entries["dino_projection_1"].type_name == "Linear"
    assert entries["dino_projection_1.weight"].shape == (24, 16)
    assert entries["clip_layer_weights"].kind == "parameter" and entries["clip_layer_weights"].shape == (3,)
    assert entries["linear.weight"].shape == (64, 24) and entries["linear.weight"].dtype == torch.bfloat16
    assert entries["n_embeddings"].value == 4 and entries["layout"].value == "attributes"
    assert "dino_norm_2" not in entries


def test_converted_mix_matches_the_reports_variant_3(converted):
    _, _, reference, model, processor = converted
    config = model.config
    assert config.adapter_type == "mix_sum" and [v.model_type for v in config.vision_configs] == [
        "clip_vision_model",
        "dinov2",
    ]
    assert config.num_image_tokens == 9 and config.vision_configs[1].image_size == 21  # CLIP's 4 padded to 9
    for seed in range(2):
        image = make_image(seed, size=40)
        with torch.no_grad():
            logits = model(**encode(processor, image)).logits
        expected = reference.logits(image)
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max().item() <= 1e-5


def test_converted_mix_generates_like_the_release(converted, monkeypatch):
    from transformers import GenerationConfig

    _, _, reference, model, processor = converted
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=2)
    monkeypatch.setattr(model, "generation_config", greedy)
    image = make_image(3, size=40)
    inputs = encode(processor, image)
    output = model.generate(**inputs)[0, inputs["input_ids"].shape[1] :]
    expected = reference.lm.generate(inputs_embeds=reference.embeddings(image), generation_config=greedy)[0]
    assert output.tolist() == expected.tolist() and len(output) > 1


def test_model_card_records_the_mapping(converted):
    _, out, _, _, _ = converted
    card = (out / "README.md").read_text()
    assert "Encoders mix" in card and "GELU is assumed" in card and "clip_" in card


def test_mix_projection_needs_both_encoders(tmp_path, towers):
    clip_dir, _ = towers
    info = make_released_mix_checkpoint(tmp_path / "released", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"encoders-mix adapter .* --vision_model <clip>,<dinov2>"):
        convert_omnifusion_to_hf(info["input_dir"], tmp_path / "out", vision_model=clip_dir)
    assert not (tmp_path / "out").exists()


def test_projection_that_does_not_fit_lists_found_and_expected(tmp_path, towers):
    clip_dir, dinov2_dir = towers
    info = make_released_mix_checkpoint(tmp_path / "released", dtype=torch.float32, dino_layers=2)
    with pytest.raises(ValueError) as error:
        convert_omnifusion_to_hf(info["input_dir"], tmp_path / "out", vision_model=[clip_dir, dinov2_dir])
    message = str(error.value)
    assert "does not fit the mix_sum" in message and "projection.pt" in message
    assert "encoder 1 (dinov2) has 3 hidden states but 'dino_norm_' holds 2 LayerNorms" in message
    assert "Expected:" in message and "3 x LayerNorm(32)" in message
    assert "Found:" in message and "dino_norm_{0..1}" in message
    assert not (tmp_path / "out").exists()


def test_projection_with_an_extra_module_is_refused(tmp_path):
    path = tmp_path / "projection.pt"

    def add_module(module):
        module.gate = torch.nn.Linear(32, 7)

    save_released_mix_projection(path, mutate=add_module)
    with pytest.raises(ValueError, match=r"modules \['gate'\] have no place in the mix_sum adapter"):
        read_mix_projection(path, [("clip_vision_model", 3, 32), ("dinov2", 3, 32)], 64)


def test_payload_in_a_mix_projection_is_refused_without_running(tmp_path):
    path = tmp_path / "projection.pt"
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch '{marker}'",)

    save_released_mix_projection(path, mutate=lambda module: setattr(module, "note", Payload()))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        describe_projection_structure(path)
    assert not marker.exists()


def test_command_line_takes_two_vision_models(tmp_path, towers):
    clip_dir, dinov2_dir = towers
    info = make_released_mix_checkpoint(tmp_path / "released", num_image_tokens=9)
    out = tmp_path / "out"
    assert (
        main(
            [
                "--input_dir",
                str(info["input_dir"]),
                "--output_dir",
                str(out),
                "--vision_model",
                f"{clip_dir},{dinov2_dir}",
            ]
        )
        == 0
    )
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert model.dtype == torch.bfloat16 and len(model.model.vision_tower) == 2
