"""`examples/benchmarks/benchmark_real_size.py --shape tiny`: the whole real-size pipeline (released layout written
shard by shard, converted by `omnifusion-convert` with its memory sampled, OmniFusion and LLaVA timed, ratios to the
measured limits) in seconds, with the arithmetic of its ratios recomputed from what it reports."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from modeling_omnifusion.testing.released_shapes import SHAPES, checkpoint_bytes, write_released_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^ttft_roofline=(\S+) decode_roofline=(\S+) convert_peak_anon_gb=(\S+)$")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("real_size")
    result = subprocess.run(
        [sys.executable, "examples/benchmarks/benchmark_real_size.py", "--shape", "tiny", "--output_dir", output_dir],
        cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result, json.loads((output_dir / "results.json").read_text())


def test_the_last_line_carries_the_two_roofline_ratios_and_the_converter_memory(tiny_run):
    _, result, results = tiny_run
    match = LAST_LINE.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout[-2000:]
    omni = results["models"]["OmniFusion"]
    assert float(match[1]) == pytest.approx(omni["ttft_roofline"], rel=1e-3)
    assert float(match[2]) == pytest.approx(omni["decode_roofline"], rel=1e-3)
    assert float(match[3]) == pytest.approx(results["convert"]["peak_anon_gb"], rel=1e-3, abs=1e-3)
    assert "converting with omnifusion-convert" in result.stderr  # the progress display


def test_the_conversion_ran_with_its_memory_sampled_and_the_checkpoints_are_removed(tiny_run):
    output_dir, _, results = tiny_run
    convert = results["convert"]
    assert convert["samples"] >= 1 and convert["seconds"] > 0
    assert 0 < convert["peak_anon_gb"] <= convert["peak_rss_gb"] <= convert["vm_hwm_gb"] + 1e-9
    assert convert["output_gb"] > 0
    assert sorted(p.name for p in output_dir.iterdir()) == ["convert.log", "results.json"]


def test_the_ratios_are_the_measured_cpu_seconds_over_the_rooflines(tiny_run):
    _, _, results = tiny_run
    limits = results["limits"]
    for name, model in results["models"].items():
        flops = model["prefill_flops"]
        floor = flops["vision"] / limits["vision_mlp_model"]["flop_per_cpu_s"]
        floor += flops["lm"] / limits["lm_mlp_model"]["flop_per_cpu_s"]
        assert model["ttft_roofline"] == pytest.approx(model["ttft_cpu_s"] / floor), name
        weights = model["weights_bandwidth"]
        assert weights["bytes_per_cpu_s"] > 0 and len(weights["probes_gb_per_s"]) == 1 + results["repeats"]
        # the probe read exactly the decoded weights: the decode bytes without the KV cache
        shape, itemsize = SHAPES["tiny"], 4 if results["dtype"] == "float32" else 2
        context = results["prompt_positions"][name] + results["new_tokens"] // 2
        cache = 2 * shape.text_layers * context * shape.text_kv_heads * (shape.text_hidden // shape.text_heads)
        assert weights["bytes"] == model["decode_bytes_per_token"] - itemsize * cache, name
        decode_floor = model["decode_bytes_per_token"] / weights["bytes_per_cpu_s"]
        assert model["decode_roofline"] == pytest.approx(model["decode_cpu_s_per_token"] / decode_floor), name
        assert all(math.isfinite(v) and v > 0 for v in (model["ttft_roofline"], model["decode_roofline"]))
    omni, llava = results["models"]["OmniFusion"], results["models"]["LLaVA"]
    ratios = results["omnifusion_over_llava"]
    assert ratios["ttft_cpu"] == pytest.approx(omni["ttft_cpu_s"] / llava["ttft_cpu_s"])
    assert ratios["decode"] == pytest.approx(omni["decode_s_per_token"] / llava["decode_s_per_token"])
    # OmniFusion's prompt is LLaVA's plus the two image markers.
    assert results["prompt_positions"]["OmniFusion"] == results["prompt_positions"]["LLaVA"] + 2


def test_the_streaming_writer_lays_out_the_release_and_shards_by_size(tmp_path):
    paths = write_released_checkpoint(tmp_path, "tiny", max_shard_bytes=40_000)
    lm = paths["input_dir"] / "tuned-model"
    shards = sorted(lm.glob("model-*.safetensors"))
    assert len(shards) > 1 and (lm / "model.safetensors.index.json").is_file()
    index = json.loads((lm / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    for name in ("projection.pt", "special_embeddings.pt", "tokenizer/tokenizer.model"):
        assert (paths["input_dir"] / name).is_file(), name
    norms = 0
    for path in shards:
        with safe_open(path, "pt") as shard:
            for key in (k for k in shard.keys() if "norm" in k):
                assert bool((shard.get_tensor(key) == 1).all()), key
                norms += 1
    assert norms == 2 * SHAPES["tiny"].text_layers + 1


def test_the_7b_shape_is_the_release_size():
    """Mistral-7B-v0.1 (7.24 B) + CLIP ViT-L/14 vision (0.30 B) in bfloat16: 15.09 GB."""
    assert checkpoint_bytes(SHAPES["7b"]) == pytest.approx(15.09e9, rel=0.002)
    assert SHAPES["7b"].num_image_tokens == 576


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--output_dir", "/proc/omnifusion-not-here"], "--output_dir /proc/omnifusion-not-here cannot be created"),
        (["--output_dir", "{tmp}", "--new_tokens", "1"], "--new_tokens must be at least 2"),
    ],
)
def test_unusable_arguments_stop_before_anything_is_written(tmp_path, flags, message):
    flags = [flag.format(tmp=tmp_path / "out") for flag in flags]
    result = subprocess.run(
        [sys.executable, "examples/benchmarks/benchmark_real_size.py", "--shape", "tiny", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
