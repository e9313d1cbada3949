"""convert_omnifusion_to_hf: released layouts -> one HF folder, parity with the released inference path, safety."""

import json
import os
import socket
import stat
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml
from safetensors import safe_open
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    GenerationConfig,
    LlamaTokenizer,
    MistralForCausalLM,
)

from modeling_omnifusion import OmniFusionProcessor
from modeling_omnifusion.conversion.convert_omnifusion_to_hf import (
    STAGING_PREFIX,
    convert_omnifusion_to_hf,
    main,
)
from modeling_omnifusion.conversion.released_format import UnsafePickleError
from modeling_omnifusion.hub_omnifusion import clean_stale_staging
from modeling_omnifusion.testing.released import (
    make_clip_vision_folder,
    make_malicious_pickle,
    make_released_checkpoint,
    released_models_module,
    save_released_projection,
    save_special_embeddings,
)
from modeling_omnifusion.testing.tiny import chat, make_image

PROMPT = "This is a dialog with AI assistant.\n"
QUERY = "What is the sky color on this image?"
SHUFFLED_KEYS = ("EOI", "SOI", "BOT", "USER")


class ReleasedInference:
    """The released README's inference path, built from the released files with their own code.

    `inputs_embeds = cat([embed(PROMPT), SOI, projection(clip(image).hidden_states[-2][:, 1:]), EOI, USER,
    embed(query), BOT])` fed to the `MistralForCausalLM`; the pickled adapter is unpickled with
    `torch.load(weights_only=False)` (our own fixture) and put in eval mode.
    """

    def __init__(self, info: dict, clip_dir: Path):
        with released_models_module():
            self.projection = torch.load(info["projection"], weights_only=False).eval()
        self.special = torch.load(info["special_embeddings"], weights_only=True)
        self.lm = MistralForCausalLM.from_pretrained(info["lm_dir"]).eval()
        self.dtype = self.lm.dtype
        self.clip = CLIPVisionModel.from_pretrained(clip_dir, dtype=self.dtype).eval()
        self.image_processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
        self.sentencepiece = spm.SentencePieceProcessor(model_file=str(info["tokenizer_model"]))
        self.tokenizer = LlamaTokenizer.from_pretrained(info["tokenizer_dir"])

    @torch.no_grad()
    def embeddings(self, image, query: str) -> torch.Tensor:
        pixel_values = self.image_processor(image, return_tensors="pt").pixel_values.to(self.dtype)
        patches = self.clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        image_embeds = self.projection(patches)
        embed = self.lm.get_input_embeddings()

        def text(value):
            return embed(torch.tensor([self.sentencepiece.encode(value)]))

        def marker(key):
            return self.special[key][None, None].detach()

        parts = [text(PROMPT), marker("SOI"), image_embeds, marker("EOI"), marker("USER"), text(query), marker("BOT")]
        return torch.cat(parts, dim=1)

    def readme_generate_kwargs(self) -> dict:
        """The README's `generate()` arguments."""
        bad_words_ids = self.tokenizer(["\n", "</s>", ":"], add_special_tokens=False).input_ids + [[13]]
        return dict(
            max_new_tokens=50,
            early_stopping=True,
            num_beams=3,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
            forced_eos_token_id=2,
            bad_words_ids=bad_words_ids,
            repetition_penalty=1.0,
            no_repeat_ngram_size=4,
            remove_invalid_values=True,
            use_cache=True,
            num_return_sequences=1,
        )


def load_converted(folder):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return model, processor


def encode(processor, image, query=QUERY):
    return processor.apply_chat_template(
        chat(query, images=[image]), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".omnifusion-"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_clip_vision_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def converted_fp32(request, tmp_path_factory, clip_dir):
    """float32 releases: v1.0 with the full tokenizer folder and shuffled markers, v1.1 with `tokenizer.model` only."""
    root = tmp_path_factory.mktemp(f"v{request.param}-fp32")
    if request.param == "1.0":
        info = make_released_checkpoint(
            root / "released", "1.0", torch.float32, tokenizer_files="full", special_key_order=SHUFFLED_KEYS
        )
    else:
        info = make_released_checkpoint(root / "released", layout="1.1", dtype=torch.float32)
    out = convert_omnifusion_to_hf(info["input_dir"], root / "converted", vision_model=clip_dir)
    return info, out, ReleasedInference(info, clip_dir), *load_converted(out)


@pytest.fixture(scope="module")
def released_bf16(tmp_path_factory):
    return make_released_checkpoint(tmp_path_factory.mktemp("v11-bf16") / "released", layout="1.1")


@pytest.fixture(scope="module")
def converted_bf16(released_bf16, tmp_path_factory, clip_dir):
    out = tmp_path_factory.mktemp("out") / "bf16"
    convert_omnifusion_to_hf(released_bf16["input_dir"], out, vision_model=clip_dir)
    return out, ReleasedInference(released_bf16, clip_dir), *load_converted(out)


@pytest.fixture
def small_fp32(tmp_path):
    """A fresh float32 v1.1 checkpoint the test may damage."""
    return make_released_checkpoint(tmp_path / "released", layout="1.1", dtype=torch.float32)


# ---------------------------------------------------------------- parity with the released inference path


def test_processor_ids_are_the_released_sequence(converted_fp32):
    info, _, reference, model, processor = converted_fp32
    ids = encode(processor, make_image(0))["input_ids"][0].tolist()
    config = model.config
    expected = (
        reference.sentencepiece.encode(PROMPT)
        + [config.image_start_token_id]
        + [config.image_token_id] * config.num_image_tokens
        + [config.image_end_token_id, config.user_token_id]
        + reference.sentencepiece.encode(QUERY)
        + [config.assistant_token_id]
    )
    assert ids == expected
    assert config.num_image_tokens == 4 and info["vocab_size"] == config.text_config.vocab_size == 384
    assert config.special_token_ids == list(range(384, 389))


def test_float32_logits_match_released_inference(converted_fp32):
    _, _, reference, model, processor = converted_fp32
    for seed in range(2):
        image = make_image(seed)
        with torch.no_grad():
            logits = model(**encode(processor, image)).logits
            expected = reference.lm(inputs_embeds=reference.embeddings(image, QUERY)).logits
        assert logits.dtype == torch.float32 and logits.shape == expected.shape
        assert (logits - expected).abs().max().item() <= 1e-5


def test_greedy_generation_is_identical(converted_fp32, monkeypatch):
    _, _, reference, model, processor = converted_fp32
    greedy = GenerationConfig(max_new_tokens=12, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=2)
    monkeypatch.setattr(model, "generation_config", greedy)  # generate() fills unset fields from the saved config
    image = make_image(1)
    inputs = encode(processor, image)
    output = model.generate(**inputs)[0, inputs["input_ids"].shape[1] :]
    expected = reference.lm.generate(inputs_embeds=reference.embeddings(image, QUERY), generation_config=greedy)[0]
    assert output.tolist() == expected.tolist() and len(output) > 1


@pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`")  # that is the point
def test_saved_generation_config_reproduces_readme_decoding(converted_fp32):
    """Generating from embeddings (as the model card says) with the saved settings is exactly the README's call."""
    _, _, reference, model, processor = converted_fp32
    for seed in range(3):
        image = make_image(seed)
        inputs = encode(processor, image)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        output = model.generate(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        )[0]
        expected = reference.lm.generate(
            inputs_embeds=reference.embeddings(image, QUERY), **reference.readme_generate_kwargs()
        )[0]
        assert output.tolist() == expected.tolist()
        assert len(output) <= 50 and output[-1].item() == 2  # stopped at EOS, or forced EOS as the 50th token


def test_markers_are_mapped_by_name_and_adapter_weights_are_exact(converted_fp32):
    info, _, _, model, _ = converted_fp32
    markers = model.get_input_embeddings().special_embeddings.weight
    expected = info["expected_special_embeddings"]
    assert torch.equal(markers[0], torch.zeros_like(markers[0]))
    for row, key in enumerate(("SOI", "EOI", "USER", "BOT"), start=1):
        assert torch.equal(markers[row], expected[key]), key
    adapter = model.model.adapter.state_dict()
    for key, value in info["expected_projection"].items():
        assert torch.equal(adapter[key], value), key


def test_output_folder_is_the_hub_format(converted_fp32):
    info, out, _, model, processor = converted_fp32
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "chat_template.jinja"} <= names
    assert {"modeling_omnifusion.py", "configuration_omnifusion.py", "processing_omnifusion.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    assert type(model).__name__ == "OmniFusionForCausalLM" and not model.training
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0 and tokenizer.padding_side == "left"
    assert processor.num_image_tokens == model.config.num_image_tokens
    assert "This is a dialog with AI assistant." in (out / "chat_template.jinja").read_text()
    card = " ".join((out / "README.md").read_text().split())
    for note in (
        "## Conversion notes",
        "EOS is not banned",
        "model.generate(inputs_embeds=embeds",
        "out[:, 1:]",
        "loads in eval mode",
    ):
        assert note in card, note
    assert f"v{info['version']} layout" in card and str(info["input_dir"]) not in card


def test_converted_folder_names_the_release_as_base_and_no_local_path(converted_fp32):
    info, out, _, _, _ = converted_fp32
    front_matter = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front_matter["base_model"] == ["AIRI-Institute/OmniFusion"]  # the vision model here is a local folder
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["_name_or_path"] == "AIRI-Institute/OmniFusion"
    assert not config["vision_config"].get("_name_or_path")
    for path in out.iterdir():
        if path.suffix in (".json", ".md", ".jinja", ".py"):
            assert str(info["root"]) not in path.read_text(), path.name


def test_generation_config_values(converted_fp32):
    _, out, reference, _, _ = converted_fp32
    saved = json.loads((out / "generation_config.json").read_text())
    readme = reference.readme_generate_kwargs()
    for key in (
        "num_beams",
        "max_new_tokens",
        "early_stopping",
        "no_repeat_ngram_size",
        "repetition_penalty",
        "do_sample",
        "remove_invalid_values",
        "eos_token_id",
        "pad_token_id",
        "forced_eos_token_id",
        "bad_words_ids",
        "num_return_sequences",
    ):
        assert saved[key] == readme[key], key
    assert saved["bad_words_ids"][1] == [2] and saved["bad_words_ids"][-1] == [13]


# ---------------------------------------------------------------- dtypes


def test_bfloat16_release_converts_in_bfloat16(released_bf16, converted_bf16):
    out, reference, model, processor = converted_bf16
    tensors = saved_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert model.dtype == torch.bfloat16
    adapter = model.model.adapter.state_dict()
    assert all(torch.equal(adapter[k], v) for k, v in released_bf16["expected_projection"].items())
    image = make_image(0)
    with torch.no_grad():
        logits = model(**encode(processor, image)).logits.float()
        expected = reference.lm(inputs_embeds=reference.embeddings(image, QUERY)).logits.float()
    assert (logits - expected).abs().max().item() <= 1e-2  # measured 3.9e-3: one bf16 step at |logit| ~ 0.5


def test_dtype_override_upcasts_exactly(released_bf16, clip_dir, tmp_path):
    out = convert_omnifusion_to_hf(released_bf16["input_dir"], tmp_path / "out", vision_model=clip_dir, dtype="float32")
    tensors = saved_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "float32"
    lm_head = MistralForCausalLM.from_pretrained(released_bf16["lm_dir"]).lm_head.weight
    assert torch.equal(tensors["lm_head.weight"], lm_head.float())


def test_full_clip_model_folder_works_as_vision_model(released_bf16, tmp_path):
    full = make_clip_vision_folder(tmp_path, full_clip=True)
    out = convert_omnifusion_to_hf(released_bf16["input_dir"], tmp_path / "out", vision_model=full, dtype="float32")
    model, _ = load_converted(out)
    clip = CLIPVisionModel.from_pretrained(full)
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == clip.state_dict().keys()
    assert all(torch.equal(tower[k], v) for k, v in clip.state_dict().items())


# ---------------------------------------------------------------- safety


@pytest.mark.parametrize("kind", ["top_level", "nested"])
def test_malicious_pickle_is_refused_without_running(small_fp32, clip_dir, tmp_path, kind):
    marker = make_malicious_pickle(small_fp32["projection"], kind=kind)
    with pytest.raises(UnsafePickleError, match="system") as err:
        convert_omnifusion_to_hf(small_fp32["input_dir"], tmp_path / "out", vision_model=clip_dir)
    assert str(small_fp32["projection"]) in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_malicious_special_embeddings_are_refused(small_fp32, clip_dir, tmp_path):
    marker = make_malicious_pickle(small_fp32["special_embeddings"], kind="top_level", payload="builtins.exec")
    with pytest.raises(UnsafePickleError, match="exec"):
        convert_omnifusion_to_hf(small_fp32["input_dir"], tmp_path / "out", vision_model=clip_dir)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad inputs


def test_mis_shaped_special_embedding_names_file_and_shapes(small_fp32, clip_dir, tmp_path):
    save_special_embeddings(small_fp32["special_embeddings"], hidden=48, dtype=torch.float32)
    with pytest.raises(ValueError) as err:
        convert_omnifusion_to_hf(small_fp32["input_dir"], tmp_path / "out", vision_model=clip_dir)
    message = str(err.value)
    assert str(small_fp32["special_embeddings"]) in message and "(48,)" in message and "(64,)" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "sizes, found, expected",
    [(dict(text_hidden=48), "(48, 32)", "(64, 32)"), (dict(vision_hidden=16), "(64, 16)", "(64, 32)")],
)
def test_mis_shaped_adapter_names_file_and_shapes(small_fp32, clip_dir, tmp_path, sizes, found, expected):
    save_released_projection(small_fp32["projection"], dtype=torch.float32, **sizes)
    with pytest.raises(ValueError) as err:
        convert_omnifusion_to_hf(small_fp32["input_dir"], tmp_path / "out", vision_model=clip_dir)
    message = str(err.value)
    assert str(small_fp32["projection"]) in message and found in message and expected in message


def test_adapter_image_token_count_must_match_vision_model(small_fp32, clip_dir, tmp_path):
    save_released_projection(small_fp32["projection"], num_image_tokens=9, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"9 image tokens.* gives 4") as err:
        convert_omnifusion_to_hf(small_fp32["input_dir"], tmp_path / "out", vision_model=clip_dir)
    assert str(small_fp32["projection"]) in str(err.value)


def test_mis_shaped_lm_weight_names_shard_and_shapes(small_fp32, clip_dir, tmp_path):
    config_path = small_fp32["lm_dir"] / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError) as err:
        convert_omnifusion_to_hf(small_fp32["input_dir"], tmp_path / "out", vision_model=clip_dir)
    message = str(err.value)
    assert "model.layers.0.mlp.gate_proj.weight" in message and "(128, 64)" in message and "(96, 64)" in message
    assert str(small_fp32["lm_dir"] / "model-0000") in message


def test_missing_input_is_a_clear_error(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Hub repo id"):
        convert_omnifusion_to_hf(tmp_path / "missing" / "OmniMistral-v1_1", tmp_path / "out", vision_model=clip_dir)
    with pytest.raises(FileNotFoundError, match="projection.pt"):
        convert_omnifusion_to_hf(tmp_path, tmp_path / "out", vision_model=clip_dir)
    with pytest.raises(FileNotFoundError, match="AIRI-Institute/not-cached"):
        convert_omnifusion_to_hf("AIRI-Institute/not-cached", tmp_path / "out", subfolder="OmniMistral-v1_1")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- atomic output


def test_existing_output_is_refused_then_replaced_with_overwrite(small_fp32, clip_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(out)):
        convert_omnifusion_to_hf(tmp_path / "no-such-input", out, vision_model=clip_dir)
    assert (out / "keep.txt").read_text() == "mine"
    convert_omnifusion_to_hf(small_fp32["input_dir"], out, vision_model=clip_dir, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_failure_while_writing_leaves_no_partial_output(small_fp32, clip_dir, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(OmniFusionProcessor, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_omnifusion_to_hf(small_fp32["input_dir"], out, vision_model=clip_dir, overwrite=True)
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- command line


def test_console_entry_point_writes_sharded_output(small_fp32, clip_dir, tmp_path):
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "omnifusion-convert"]
    assert script.load() is main
    out = tmp_path / "sharded"
    assert main([
        "--input_dir", str(small_fp32["input_dir"]), "--output_dir", str(out),
        "--vision_model", str(clip_dir), "--dtype", "float32", "--max_shard_size", "200KB",
    ]) == 0  # fmt: skip
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    model, processor = load_converted(out)
    reference = ReleasedInference(small_fp32, clip_dir)
    image = make_image(3)
    with torch.no_grad():
        logits = model(**encode(processor, image)).logits
        expected = reference.lm(inputs_embeds=reference.embeddings(image, QUERY)).logits
    assert (logits - expected).abs().max().item() <= 1e-5


CONVERTER_SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "convert_omnifusion_to_hf.py"
CONVERTER_DOORS = {
    "entry point": [str(Path(sys.executable).with_name("omnifusion-convert"))],
    "script": [sys.executable, str(CONVERTER_SCRIPT)],
}


@pytest.mark.parametrize("door", sorted(CONVERTER_DOORS))
def test_both_converter_doors_exit_0_on_success(door, small_fp32, clip_dir, tmp_path):
    """`omnifusion-convert ...` and `python conversion/convert_omnifusion_to_hf.py ...`, run from the checkout."""
    out = tmp_path / "converted"
    result = subprocess.run(
        [*CONVERTER_DOORS[door], "--input_dir", str(small_fp32["input_dir"]), "--output_dir", str(out),
         "--vision_model", str(clip_dir)],
        cwd=CONVERTER_SCRIPT.parents[1], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert result.stderr.strip().splitlines()[-1] == f"Saved the converted model (float32) to {out}"


def test_converter_exits_non_zero_and_names_the_problem_on_failure(tmp_path):
    missing = tmp_path / "no-such-release"
    result = subprocess.run(
        [*CONVERTER_DOORS["script"], "--input_dir", str(missing), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"omnifusion-convert: error: {missing}: no such folder, and not a Hub repo id"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_command_line_rejects_unknown_dtype(capsys):
    with pytest.raises(SystemExit):
        main(["--input_dir", "x", "--output_dir", "y", "--dtype", "float64"])
    assert "float64" in capsys.readouterr().err


# ---------------------------------------------------------------- staging folders and permissions


def stale_staging(parent: Path, pid: int, output_dir: Path, name: str) -> Path:
    """A staging folder as a conversion process `pid` leaves it when killed mid-save."""
    staging = parent / f".omnifusion-convert-{name}"
    (staging / "folder").mkdir(parents=True)
    (staging / "folder" / "config.json").write_text("{}")
    owner = {"pid": pid, "host": socket.gethostname(), "output_dir": str(output_dir)}
    (staging / "owner.json").write_text(json.dumps(owner))
    return staging


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


KILLED_CONVERSION = """
import os, signal, sys
from modeling_omnifusion import OmniFusionProcessor
from modeling_omnifusion.conversion.convert_omnifusion_to_hf import convert_omnifusion_to_hf

OmniFusionProcessor.save_pretrained = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # weights written
convert_omnifusion_to_hf(sys.argv[1], sys.argv[2], vision_model=sys.argv[3])
"""


def test_a_killed_conversion_leaves_no_staging_folder_after_the_next_run(small_fp32, clip_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-c", KILLED_CONVERSION, str(small_fp32["input_dir"]), str(out), str(clip_dir)]
    # cwd: not the checkout (`-c` puts the cwd first on sys.path, where the source folders would shadow the install)
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and len(leftovers(tmp_path)) == 1
    live = stale_staging(tmp_path, os.getpid(), out, "running")  # a conversion still running: not touched
    foreign = tmp_path / ".omnifusion-convert-no-owner"  # no owner file: not provably ours, not touched
    foreign.mkdir()
    convert_omnifusion_to_hf(small_fp32["input_dir"], out, vision_model=clip_dir)
    assert leftovers(tmp_path) == sorted([live.name, foreign.name])
    assert (out / "config.json").is_file()


def test_an_output_moved_aside_by_a_conversion_killed_mid_swap_is_put_back(tmp_path):
    out = tmp_path / "out"
    staging = stale_staging(tmp_path, dead_pid(), out, "swapping")
    (staging / "replaced").mkdir()
    (staging / "replaced" / "config.json").write_text('{"earlier": true}')
    clean_stale_staging(tmp_path, STAGING_PREFIX)
    assert json.loads((out / "config.json").read_text()) == {"earlier": True}
    assert leftovers(tmp_path) == []


def test_the_converted_folder_has_the_permissions_of_any_new_folder(converted_bf16, tmp_path):
    out = converted_bf16[0]
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
