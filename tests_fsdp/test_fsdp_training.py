"""
FSDP2 on CPU, 2 processes over gloo, through stage 2 (`modeling_omnifusion.training.stage2`: full and LoRA) and its
checkpoint resume.

Each run goes through `fsdp_driver.py`, which records how every process holds the model after training: the tests
fail if the run fell back to DDP (the model whole in each process) instead of sharding it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from modeling_omnifusion import OmniFusionForCausalLM
from modeling_omnifusion.testing.training import (
    colour_records,
    save_language_model,
    save_vision_model,
    training_flags,
    write_dataset,
)
from modeling_omnifusion.training import stage1

ROOT = Path(__file__).resolve().parent.parent
DRIVER = str(Path(__file__).resolve().parent / "fsdp_driver.py")
CHECKPOINT_STATE = {"scheduler.pt", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"}


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), colour_records(8))


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory, data_path) -> Path:
    root = tmp_path_factory.mktemp("parts")
    vision, language = save_vision_model(root / "vision"), save_language_model(root / "language")
    output_dir = root / "stage1"
    stage1.train(
        ["--vision_model_name_or_path", str(vision), "--language_model_name_or_path", str(language)]
        + training_flags(output_dir, data_path, max_steps=2)
    )
    return output_dir


def run_stage2(stage1_dir, data_path, output_dir, fsdp: bool = True, **overrides) -> tuple[str, list[dict], float]:
    """A 4-step stage-2 run with 2 processes (checkpoints at steps 2 and 4): its log, each process's report, seconds."""
    report_dir = Path(str(output_dir) + "-report")
    flags = {
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "log_level": "info",
        **({"fsdp": "full_shard"} if fsdp else {}),
        **overrides,
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        DRIVER, str(report_dir), "--model_name_or_path", str(stage1_dir),
        *training_flags(output_dir, data_path, **flags),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    # a session of its own, so that a run past its time is killed with its worker processes
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env, start_new_session=True
    ) as process:
        try:
            log, _ = process.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            log, _ = process.communicate()
            pytest.fail(f"the 2-process run passed 400 s:\n{log[-6000:]}")
    seconds = time.monotonic() - start
    assert process.returncode == 0, log[-6000:]
    print(f"{output_dir.name}: 2-process stage-2 run of 4 steps in {seconds:.1f} s")
    reports = [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    return log, reports, seconds


def assert_sharded(reports: list[dict], prefix: str) -> list[str]:
    """Both processes ran FSDP (not DDP) and split every parameter whose name has `prefix` between them, each
    holding half of its rows; returns those parameters' names."""
    for report in reports:
        assert report["distributed_type"] == "DistributedType.FSDP", report["distributed_type"]
        assert report["is_fsdp_enabled"]
        assert not report["ddp"] and report["model_class"].startswith("FSDP"), report["model_class"]
    names = [name for name in reports[0]["parameters"] if prefix in name]
    assert names, prefix
    for name in names:
        held = [report["parameters"][name] for report in reports]
        assert all(entry["dtensor"] for entry in held), name
        rows, size = held[0]["shape"][0], held[0]["global"]
        # FSDP2 splits the rows (dim 0): process 0 holds the first ceil(rows / 2), process 1 the rest
        expected = [-(-rows // 2) * size // rows, rows // 2 * size // rows]
        assert [entry["local"] for entry in held] == expected, (name, held)
    return names


def losses(folder: Path) -> dict[int, float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def resume_from_step_2(first: Path, tmp_path: Path, stage1_dir, data_path, **overrides):
    """A run that was stopped after checkpoint-2 (that checkpoint alone in its folder), resumed to the end."""
    second = tmp_path / "resumed"
    second.mkdir()
    shutil.copytree(first / "checkpoint-2", second / "checkpoint-2")
    log, reports, _ = run_stage2(stage1_dir, data_path, second, resume_from_checkpoint="latest", **overrides)
    assert [report["trained_steps"] for report in reports] == [[2, 3], [2, 3]], log[-3000:]  # steps 3 and 4 only
    return second, reports


def assert_hub_folder(folder: Path):
    """A normal saved folder: OmniFusion's remote code (none of torch's FSDP files), loadable both ways."""
    names = set(os.listdir(folder))
    assert {"modeling_omnifusion.py", "config.json", "model.safetensors"} <= names, names
    assert not [name for name in names if name.startswith("_fsdp") or name.startswith(".")], names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert {value.split(".")[0] for value in auto_map.values()} <= {"modeling_omnifusion", "configuration_omnifusion"}
    model = OmniFusionForCausalLM.from_pretrained(folder)
    assert type(model) is OmniFusionForCausalLM
    assert AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).config.model_type == "omnifusion"


def test_fsdp_full_stage2_two_processes_resume_matches_the_uninterrupted_run(stage1_dir, data_path, tmp_path):
    first = tmp_path / "run"
    log, reports, seconds = run_stage2(stage1_dir, data_path, first)
    assert "FSDP2 on CPU over gloo: 2 processes" in log
    sharded = assert_sharded(reports, "model.language_model.layers.")
    assert [report["trained_steps"] for report in reports] == [[0, 1, 2, 3]] * 2
    assert reports[0]["optimizer_class"] == "ShardedAdafactor"  # --optim adafactor, the scripts' default

    # the checkpoint holds the FSDP state: the model and the optimizer, gathered whole (FULL_STATE_DICT)
    checkpoint = first / "checkpoint-2"
    assert CHECKPOINT_STATE | {"pytorch_model_fsdp.bin", "optimizer.bin"} <= set(os.listdir(checkpoint))
    final = load_file(first / "model.safetensors")
    fsdp_model = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    for name in sharded:
        assert fsdp_model[name].shape == final[name].shape
    q_proj = optimizer["state"]["model.language_model.layers.0.self_attn.q_proj.weight"]
    rows = final["model.language_model.layers.0.self_attn.q_proj.weight"].shape[0]
    assert q_proj["step"] == 2 and q_proj["exp_avg_sq_row"].shape == (rows,)
    assert_hub_folder(first)

    second, resumed_reports = resume_from_step_2(first, tmp_path, stage1_dir, data_path)
    assert_sharded(resumed_reports, "model.language_model.layers.")
    assert_hub_folder(second)
    assert losses(second / "checkpoint-4") == losses(first / "checkpoint-4")
    resumed = load_file(second / "model.safetensors")
    start = load_file(stage1_dir / "model.safetensors")
    assert resumed.keys() == final.keys()
    for name in final:
        # the same sharded arithmetic in the same order on both runs: equal to the bit
        assert torch.equal(resumed[name], final[name]), name
    assert not torch.equal(
        final["model.language_model.layers.1.mlp.up_proj.weight"],
        start["model.language_model.layers.1.mlp.up_proj.weight"],
    )

    # and FSDP trains as DDP does: the same steps, up to float rounding of sums taken in another order
    ddp = tmp_path / "ddp"
    log, ddp_reports, _ = run_stage2(stage1_dir, data_path, ddp, fsdp=False)
    assert ddp_reports[0]["ddp"] and not ddp_reports[0]["parameters"][sharded[0]]["dtensor"]
    ddp_final = load_file(ddp / "model.safetensors")
    assert losses(ddp / "checkpoint-4") == pytest.approx(losses(first / "checkpoint-4"), abs=1e-3)
    hidden = OmniFusionForCausalLM.config_class.from_pretrained(stage1_dir).vision_config.hidden_size
    for name in final:
        expected, got = ddp_final[name], final[name]
        if name.endswith("self_attn.in_proj_bias"):
            # the key bias of the adapter's attention has a zero true gradient (softmax ignores it): Adafactor divides
            # its rounding noise by its own size, so those entries take noise-sized steps that differ between runs
            expected = torch.cat([expected[:hidden], expected[2 * hidden :]])
            got = torch.cat([got[:hidden], got[2 * hidden :]])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=name)
            continue
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    print(f"full stage 2, FSDP, 2 processes: {seconds:.1f} s")


def test_fsdp_lora_stage2_two_processes_sharded_checkpoints_and_resume(stage1_dir, data_path, tmp_path):
    sharded_state = {
        "fsdp_config": json.dumps({"state_dict_type": "SHARDED_STATE_DICT"}),
        "lora_r": 4,
        "learning_rate": 1e-2,
    }
    first = tmp_path / "run"
    log, reports, seconds = run_stage2(stage1_dir, data_path, first, **sharded_state)
    assert_sharded(reports, "base_layer.weight")  # the frozen LM projections under LoRA: sharded too
    lora = assert_sharded(reports, "lora_")
    assert all(reports[0]["parameters"][name]["trainable"] for name in lora)

    # SHARDED_STATE_DICT: each process wrote its own part of the model and optimizer (torch.distributed.checkpoint)
    checkpoint = first / "checkpoint-2"
    names = set(os.listdir(checkpoint))
    assert CHECKPOINT_STATE | {"pytorch_model_fsdp_0", "optimizer_0"} <= names, names
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(checkpoint / part)), part
    # the final outputs are whole all the same: the adapter, and the merged model
    adapter = load_file(first / "lora_adapter" / "adapter_model.safetensors")
    assert any("lora_A" in name for name in adapter)
    assert_hub_folder(first)

    second, _ = resume_from_step_2(first, tmp_path, stage1_dir, data_path, **sharded_state)
    assert losses(second / "checkpoint-4") == losses(first / "checkpoint-4")
    resumed_adapter = load_file(second / "lora_adapter" / "adapter_model.safetensors")
    assert resumed_adapter.keys() == adapter.keys()
    for name in adapter:
        assert torch.equal(resumed_adapter[name], adapter[name]), name
    merged, resumed_merged = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    start = load_file(stage1_dir / "model.safetensors")
    for name in merged:
        assert torch.equal(resumed_merged[name], merged[name]), name
    changed = [name for name in merged if not torch.equal(merged[name], start[name])]
    assert any(".self_attn.q_proj" in name for name in changed)
    assert any(name.startswith("model.adapter.") for name in changed)
    print(f"LoRA stage 2, FSDP, 2 processes: {seconds:.1f} s")
