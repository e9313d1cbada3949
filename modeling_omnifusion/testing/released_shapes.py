"""Released-layout OmniFusion checkpoints at real sizes (random weights), written shard by shard.

`write_released_checkpoint(root, "7b")` lays out what AIRI's v1.1 release holds, at its exact shapes: a Mistral-7B-v0.1
LM as sharded safetensors in `OmniMistral-v1_1/tuned-model/`, the pickled transformer adapter `projection.pt`
(CLIP ViT-L/14-336 width 1024 to 4096, 576 image tokens), `special_embeddings.pt` and a sentencepiece `tokenizer/`,
plus a CLIP vision folder (`clip-vision/`, ViT-L/14 at 336 px) for `--vision_model`. Every shard is filled and written
before the next is made, so the writer holds one shard (`max_shard_bytes`) at a time, never the whole model: the 7B
shape (15 GB of bfloat16) is written in about 2 GB of memory. `"3b"`, `"1b"` and `"tiny"` are smaller LMs with the
same layout (`tiny` for tests: seconds).

Weights: normal(0, 0.02) for matrices and embeddings, ones for norm weights, zeros for biases. Only the shapes and
the layout are real.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

from .released import LAYOUT_NAMES, save_released_projection, save_special_embeddings, write_tokenizer_folder


@dataclasses.dataclass(frozen=True)
class Shape:
    """The sizes of one released-layout checkpoint: a Mistral LM, a CLIP vision tower and the adapter's heads."""

    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    adapter_heads: int
    adapter_ffn: int | None  # None: PyTorch's default 2048 (the release's)
    tokenizer_vocab: int = 384

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def text_config(self, dtype: torch.dtype = torch.bfloat16) -> MistralConfig:
        return MistralConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_hidden,
            intermediate_size=self.text_intermediate,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            num_key_value_heads=self.text_kv_heads,
            max_position_embeddings=32768,
            sliding_window=4096,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            dtype=dtype,
        )

    def vision_config(self, dtype: torch.dtype = torch.bfloat16) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.vision_hidden,
            intermediate_size=self.vision_intermediate,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            projection_dim=768,
            hidden_act="quick_gelu",
            dtype=dtype,
        )


CLIP_L_336 = dict(
    vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=336, patch_size=14
)
SHAPES = {
    # Mistral-7B-v0.1 + CLIP ViT-L/14-336 + the release's adapter (16 heads, PyTorch's default FFN width).
    "7b": Shape(4096, 14336, 32, 32, 8, 32000, **CLIP_L_336, adapter_heads=16, adapter_ffn=None),
    "3b": Shape(3072, 8192, 26, 24, 8, 32000, **CLIP_L_336, adapter_heads=16, adapter_ffn=None),
    "1b": Shape(2048, 5632, 22, 32, 4, 32000, **CLIP_L_336, adapter_heads=16, adapter_ffn=None),
    "tiny": Shape(64, 128, 2, 4, 2, 512, 32, 64, 2, 4, 28, 14, adapter_heads=4, adapter_ffn=64),
}


def state_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """The persistent state of `model_class(config)` as `{name: shape}`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_class(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Ones for norm weights, zeros for biases, normal(0, 0.02) for everything else."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)


def write_random_safetensors(
    folder: Path,
    names_and_shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    max_shard_bytes: int,
    seed: int = 0,
    on_shard: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Random weights for `names_and_shapes` as `model-XXXXX-of-XXXXX.safetensors` shards + index (one file and no
    index when it fits one shard), each shard made and written before the next. `on_shard(done, total)` reports."""
    folder.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in names_and_shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    files, weight_map, total = [], {}, 0
    for index, group in enumerate(groups, start=1):
        filename = "model.safetensors" if len(groups) == 1 else f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: random_tensor(name, names_and_shapes[name], dtype, generator) for name in group}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, folder / filename, metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys(group, filename))
        files.append(folder / filename)
        if on_shard is not None:
            on_shard(index, len(groups))
    if len(groups) > 1:
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2, sort_keys=True))
    return files


def checkpoint_bytes(shape: Shape, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the LM and vision weights `write_released_checkpoint` writes (the adapter and the rest are small)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    counts = [
        state_shapes(MistralForCausalLM, shape.text_config(dtype)),
        state_shapes(CLIPVisionModel, shape.vision_config(dtype)),
    ]
    return itemsize * sum(int(torch.Size(s).numel()) for names in counts for s in names.values())


def write_released_checkpoint(
    root,
    shape: str | Shape = "7b",
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2 * 1024**3,
    seed: int = 0,
    on_shard: Callable[[str, int, int], None] | None = None,
) -> dict[str, Path]:
    """Write the v1.1 layout at `shape` under `root` (see the module docstring); returns `input_dir` (the
    `OmniMistral-v1_1` folder for `--input_dir`) and `vision_model` (the CLIP folder for `--vision_model`).

    `on_shard(part, done, total)` reports each written shard of `part` ("vision" or "lm").
    """
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    root = Path(root)
    names = LAYOUT_NAMES["1.1"]
    input_dir = root / names["subdir"]
    input_dir.mkdir(parents=True, exist_ok=True)

    vision_folder = root / "clip-vision"
    vision_config = shape.vision_config(dtype)
    vision_config.architectures = ["CLIPVisionModel"]
    vision_config.save_pretrained(vision_folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size}
    ).save_pretrained(vision_folder)
    write_random_safetensors(
        vision_folder,
        state_shapes(CLIPVisionModel, vision_config),
        dtype,
        max_shard_bytes,
        seed,
        None if on_shard is None else lambda done, total: on_shard("vision", done, total),
    )

    save_released_projection(
        input_dir / names["projection"],
        vision_hidden=shape.vision_hidden,
        text_hidden=shape.text_hidden,
        num_image_tokens=shape.num_image_tokens,
        num_heads=shape.adapter_heads,
        ffn_dim=shape.adapter_ffn,
        dtype=dtype,
        seed=seed,
    )
    save_special_embeddings(input_dir / "special_embeddings.pt", shape.text_hidden, dtype, seed)
    write_tokenizer_folder(input_dir / names["tokenizer"], shape.tokenizer_vocab)

    lm_folder = input_dir / names["lm"]
    text_config = shape.text_config(dtype)
    text_config.architectures = ["MistralForCausalLM"]
    text_config.save_pretrained(lm_folder)
    write_random_safetensors(
        lm_folder,
        state_shapes(MistralForCausalLM, text_config),
        dtype,
        max_shard_bytes,
        seed + 1,
        None if on_shard is None else lambda done, total: on_shard("lm", done, total),
    )
    return {"root": root, "input_dir": input_dir, "vision_model": vision_folder}
