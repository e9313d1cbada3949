"""Tiny checkpoints in the formats of AIRI's released OmniFusion files, built locally for tests and tools.

The adapter is pickled as a whole ``models.VisualToGPTMapping`` module exactly like the
release (``torch.save(module, path)``), the special embeddings as a plain dict of
tensors, the LM as sharded safetensors (v1.1) or ``.bin`` shards (v1.0), and the
tokenizer as a sentencepiece ``tokenizer.model`` trained on a small English corpus.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    MistralConfig,
    MistralForCausalLM,
)

SPECIAL_KEYS = ("USER", "BOT", "SOI", "EOI")

LAYOUT_NAMES = {
    "1.1": {"subdir": "OmniMistral-v1_1", "projection": "projection.pt", "lm": "tuned-model", "tokenizer": "tokenizer"},
    "1.0": {"subdir": "", "projection": "projection", "lm": "OmniMistral-model", "tokenizer": "OmniMistral-tokenizer"},
}

MODELS_PY = """\
from torch import nn
from torch.nn import Linear, TransformerEncoderLayer

FFN_DIM = {ffn_dim!r}


class VisualToGPTMapping(nn.Module):
    def __init__(self, visual_emb_dim, gpt_emb_dim, num_gpt_embs, num_heads):
        super(VisualToGPTMapping, self).__init__()
        extra = {{}} if FFN_DIM is None else {{"dim_feedforward": FFN_DIM}}
        self.transformer_layer = TransformerEncoderLayer(
            d_model=visual_emb_dim, nhead=num_heads, batch_first=True, norm_first=False, **extra
        )
        self.linear = Linear(visual_emb_dim, gpt_emb_dim)
        self.n_embeddings = num_gpt_embs
        self.embedding_dim = gpt_emb_dim

    def forward(self, visual_embs):
        out = self.transformer_layer(visual_embs)
        out = self.linear(out).view(-1, self.n_embeddings, self.embedding_dim)
        return out
"""

CORPUS = (
    "This is a dialog with AI assistant.",
    "What is the sky color on this image? The sky is blue and the grass is green.",
    "Describe the image in detail. A small red car is parked next to a tall tree.",
    "Give a brief description of the image. Two cats are sleeping on a sofa.",
    "How many people are in the picture? There are three people walking on the street.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Provide a short description of the image. A plate with bread, cheese and apples.",
    "Read the text on the sign. It says: open from 9 to 17, closed on Sunday.",
    "Where is the dog? The dog is under the wooden table in the kitchen.",
    "What is the woman holding? She is holding an umbrella and a yellow bag.",
)

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(("<unk>", "<s>", "</s>"))
    },
    "additional_special_tokens": [],
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": True,
    "model_max_length": 1000000000000000019884624838656,
    "pad_token": None,
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}

SPECIAL_TOKENS_MAP = {
    name: {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    for name, tok in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
}


@contextlib.contextmanager
def released_models_module(ffn_dim: int | None = None, source: str | None = None):
    """The release's ``VisualToGPTMapping`` (or ``source``) as a temporary module registered as ``models`` in
    ``sys.modules``, which is where pickling and unpickling look it up; any earlier ``models`` is restored after."""
    tmp = tempfile.mkdtemp(prefix="omnifusion_models_")
    previous = sys.modules.pop("models", None)
    try:
        path = Path(tmp, "models.py")
        path.write_text(source if source is not None else MODELS_PY.format(ffn_dim=ffn_dim))
        spec = importlib.util.spec_from_file_location("models", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["models"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("models", None)
        if previous is not None:
            sys.modules["models"] = previous
        shutil.rmtree(tmp, ignore_errors=True)


def save_released_projection(
    path,
    *,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    num_image_tokens: int = 4,
    num_heads: int = 4,
    ffn_dim: int | None = 64,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    mutate=None,
) -> dict[str, torch.Tensor]:
    """Pickle a whole ``models.VisualToGPTMapping`` like the release; returns a copy of its state dict.

    ``mutate(module)`` may alter the module before saving (e.g. to plant a payload).
    """
    with released_models_module(ffn_dim) as models, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = models.VisualToGPTMapping(vision_hidden, text_hidden, num_image_tokens, num_heads).to(dtype)
        with torch.no_grad():
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        if mutate is not None:
            mutate(module)
        torch.save(module, path)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_special_embeddings(path, hidden: int, dtype=torch.bfloat16, seed: int = 0, key_order=SPECIAL_KEYS):
    """Write ``special_embeddings.pt`` as a plain dict; returns the tensors (detached copies)."""
    gen = torch.Generator().manual_seed(seed + 1)
    values = {k: (torch.randn(hidden, generator=gen) / hidden**0.5).to(dtype) for k in SPECIAL_KEYS}
    data = {k: values[k].clone().requires_grad_() for k in key_order}
    torch.save(data, path)
    return {k: v.clone() for k, v in values.items()}


@functools.lru_cache(maxsize=None)
def sentencepiece_model_bytes(vocab_size: int = 384) -> bytes:
    """A Mistral-like sentencepiece BPE model (byte fallback, <unk>=0, <s>=1, </s>=2)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def write_tokenizer_folder(
    folder, vocab_size: int = 384, tokenizer_files: str = "model_only", tokenizer_model: bytes | None = None
) -> Path:
    """Write ``tokenizer.model`` (and for ``"full"`` the release's two JSON files) into ``folder``.

    ``tokenizer_model`` is the model file's content (a real release's); by default one trained on ``CORPUS``.
    """
    if tokenizer_files not in ("model_only", "full"):
        raise ValueError(f"tokenizer_files must be 'model_only' or 'full', got {tokenizer_files!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tokenizer_model if tokenizer_model is not None else sentencepiece_model_bytes(vocab_size)
    (folder / "tokenizer.model").write_bytes(model)
    if tokenizer_files == "full":
        (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
        (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    return folder


def tiny_mistral(vocab_size: int, hidden: int = 64, seed: int = 0, dtype=torch.bfloat16) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MistralForCausalLM(config)
    return model.to(dtype).eval()


def save_bin_shards(model, folder, max_shard_bytes: int = 100_000) -> list[Path]:
    """Save ``pytorch_model-XXXXX-of-XXXXX.bin`` shards + index, as transformers 4.x did."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    chunks: list[OrderedDict] = [OrderedDict()]
    size = 0
    for key, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if chunks[-1] and size + nbytes > max_shard_bytes:
            chunks.append(OrderedDict())
            size = 0
        chunks[-1][key] = tensor.detach().clone().contiguous()
        size += nbytes
    weight_map, files, total = {}, [], 0
    for i, chunk in enumerate(chunks, start=1):
        name = f"pytorch_model-{i:05d}-of-{len(chunks):05d}.bin"
        torch.save(chunk, folder / name)
        files.append(folder / name)
        for key, tensor in chunk.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return files


def make_released_checkpoint(
    root,
    layout: str = "1.1",
    dtype: torch.dtype = torch.bfloat16,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    vocab_size: int = 384,
    seed: int = 0,
    *,
    num_image_tokens: int = 4,
    num_heads: int = 4,
    ffn_dim: int | None = 64,
    tokenizer_files: str = "model_only",
    special_key_order=SPECIAL_KEYS,
    max_shard_bytes: int = 100_000,
    tokenizer_model: bytes | None = None,
) -> dict:
    """Build a tiny released-format checkpoint under ``root``.

    ``layout="1.1"`` writes ``root/OmniMistral-v1_1/{projection.pt, special_embeddings.pt,
    tuned-model/, tokenizer/}``; ``"1.0"`` writes ``root/{projection, special_embeddings.pt,
    OmniMistral-model/, OmniMistral-tokenizer/}``. Returns paths (``input_dir``, ``projection``,
    ``special_embeddings``, ``lm_dir``, ``tokenizer_dir``), ``version``, ``vocab_size`` and the
    expected tensors (``expected_projection``, ``expected_special_embeddings``). ``tokenizer_model`` (bytes of a
    real ``tokenizer.model``, whose vocabulary must be ``vocab_size``) replaces the trained tokenizer.
    """
    if layout not in LAYOUT_NAMES:
        raise ValueError(f"layout must be '1.0' or '1.1', got {layout!r}")
    names = LAYOUT_NAMES[layout]
    input_dir = Path(root) / names["subdir"] if names["subdir"] else Path(root)
    input_dir.mkdir(parents=True, exist_ok=True)
    projection = input_dir / names["projection"]
    expected_projection = save_released_projection(
        projection,
        vision_hidden=vision_hidden,
        text_hidden=text_hidden,
        num_image_tokens=num_image_tokens,
        num_heads=num_heads,
        ffn_dim=ffn_dim,
        dtype=dtype,
        seed=seed,
    )
    special = input_dir / "special_embeddings.pt"
    expected_special = save_special_embeddings(special, text_hidden, dtype, seed, special_key_order)
    tokenizer_dir = write_tokenizer_folder(input_dir / names["tokenizer"], vocab_size, tokenizer_files, tokenizer_model)
    lm_dir = input_dir / names["lm"]
    model = tiny_mistral(vocab_size, text_hidden, seed, dtype)
    if layout == "1.1":
        model.save_pretrained(lm_dir, max_shard_size=max_shard_bytes)
    else:
        save_bin_shards(model, lm_dir, max_shard_bytes)
    return {
        "version": layout,
        "root": Path(root),
        "input_dir": input_dir,
        "projection": projection,
        "special_embeddings": special,
        "lm_dir": lm_dir,
        "tokenizer_dir": tokenizer_dir,
        "tokenizer_model": tokenizer_dir / "tokenizer.model",
        "vocab_size": vocab_size,
        "expected_projection": expected_projection,
        "expected_special_embeddings": expected_special,
    }


def make_clip_vision_folder(
    root,
    hidden: int = 32,
    image_size: int = 28,
    patch_size: int = 14,
    layers: int = 2,
    seed: int = 0,
    full_clip: bool = False,
) -> Path:
    """Save a tiny ``CLIPVisionModel`` and a matching CLIP image processor into ``root/clip-vision``.

    With ``full_clip`` it is a whole ``CLIPModel`` (text tower too, like ``openai/clip-vit-large-patch14-336``)
    in ``root/clip-full``.
    """
    folder = Path(root) / ("clip-full" if full_clip else "clip-vision")
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )
    if full_clip:
        text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4)
        config = CLIPConfig(text_config=text, vision_config=config.to_dict(), projection_dim=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (CLIPModel if full_clip else CLIPVisionModel)(config).eval()
    model.save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


PAYLOADS = ("os.system", "builtins.exec", "subprocess.run")


class _Payload:
    """Pickles as a call to ``func(*args)``; creating the marker proves it ran."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payload(kind: str, marker: Path) -> _Payload:
    if kind == "os.system":
        return _Payload(os.system, (f"touch '{marker}'",))
    if kind == "builtins.exec":
        return _Payload(exec, (f"open({str(marker)!r}, 'w').close()",))
    if kind == "subprocess.run":
        return _Payload(subprocess.run, (["touch", str(marker)],))
    raise ValueError(f"unknown payload {kind!r}; expected one of {PAYLOADS}")


def make_malicious_pickle(path, kind: str = "top_level", payload: str = "os.system") -> Path:
    """Write a torch checkpoint that creates a marker file when unpickled; returns the marker path.

    ``kind="top_level"`` pickles the payload itself, ``"nested"`` hides it as an attribute of
    ``transformer_layer.self_attn`` inside an otherwise valid ``VisualToGPTMapping``.
    """
    path = Path(path)
    marker = path.with_name(path.name + ".PWNED")
    if marker.exists():
        marker.unlink()
    evil = _payload(payload, marker)
    if kind == "top_level":
        torch.save(evil, path)
    elif kind == "nested":
        save_released_projection(path, mutate=lambda m: setattr(m.transformer_layer.self_attn, "note", evil))
    else:
        raise ValueError(f"kind must be 'top_level' or 'nested', got {kind!r}")
    return marker


def write_raw_torch_archive(
    path, data_pkl: bytes, records: dict[str, bytes] | None = None, prefix: str = "archive"
) -> Path:
    """Write a torch-style zip archive around a hand-made ``data.pkl`` (for hostile-input tests)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", data_pkl)
        archive.writestr(f"{prefix}/byteorder", "little")
        archive.writestr(f"{prefix}/version", "3\n")
        for name, data in (records or {}).items():
            archive.writestr(f"{prefix}/{name}", data)
    return path


# ---------------------------------------------------------------- the encoders-mix release (CLIP + DINOv2)

MIX_MODELS_PY = '''\
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import LayerNorm, Linear


class VisualToGPTMapping(nn.Module):
    """The report's "projection & summation" (variant 3), in the layout the release's pickle allows: only Linear,
    LayerNorm and raw Parameters, per-layer modules as numbered attributes ("attributes") or plain lists ("list")."""

    def __init__(self, clip_layers, clip_dim, dino_layers, dino_dim, width, gpt_emb_dim, num_gpt_embs, layout):
        super(VisualToGPTMapping, self).__init__()
        self.layout = layout
        for name, layers, dim in (("clip", clip_layers, clip_dim), ("dino", dino_layers, dino_dim)):
            norms = [LayerNorm(dim) for _ in range(layers)]
            projections = [Linear(dim, width) for _ in range(layers)]
            if layout == "list":
                setattr(self, name + "_norms", norms)
                setattr(self, name + "_projections", projections)
            else:
                for index in range(layers):
                    setattr(self, name + "_norm_" + str(index), norms[index])
                    setattr(self, name + "_projection_" + str(index), projections[index])
            setattr(self, name + "_layer_weights", nn.Parameter(torch.full((layers,), 1.0 / layers)))
        self.linear = Linear(width, gpt_emb_dim)
        self.n_embeddings = num_gpt_embs
        self.embedding_dim = gpt_emb_dim

    def layer_modules(self, name):
        if self.layout == "list":
            return getattr(self, name + "_norms"), getattr(self, name + "_projections")
        layers = getattr(self, name + "_layer_weights").numel()
        return ([getattr(self, name + "_norm_" + str(i)) for i in range(layers)],
                [getattr(self, name + "_projection_" + str(i)) for i in range(layers)])

    def extra_modules(self):
        """Per-layer modules held in plain lists, which `nn.Module` does not track."""
        if self.layout != "list":
            return []
        return [m for name in ("clip", "dino") for group in self.layer_modules(name) for m in group]

    def mix(self, name, hidden_states):
        norms, projections = self.layer_modules(name)
        weights = getattr(self, name + "_layer_weights")
        out = 0
        for index, states in enumerate(hidden_states):
            out = out + weights[index] * projections[index](norms[index](states))
        return out

    def forward(self, clip_hidden_states, dino_hidden_states):
        clip = self.mix("clip", clip_hidden_states)
        dino = self.mix("dino", dino_hidden_states)
        length = max(clip.shape[1], dino.shape[1])
        clip = F.pad(clip, (0, 0, 0, length - clip.shape[1]))
        dino = F.pad(dino, (0, 0, 0, length - dino.shape[1]))
        return self.linear(F.gelu(clip + dino))
'''


def released_mix_models_module():
    """Import a temporary ``models`` module holding the encoders-mix ``VisualToGPTMapping``."""
    return released_models_module(source=MIX_MODELS_PY)


def save_released_mix_projection(
    path,
    *,
    clip=(3, 32),
    dino=(3, 32),
    width=32,
    text_hidden=64,
    num_image_tokens=4,
    layout="attributes",
    dtype=torch.bfloat16,
    seed=0,
    mutate=None,
):
    """Pickle an encoders-mix ``VisualToGPTMapping`` (``clip``/``dino``: (hidden states, width)) like the release."""
    with released_mix_models_module() as models, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = models.VisualToGPTMapping(*clip, *dino, width, text_hidden, num_image_tokens, layout)
        with torch.no_grad():
            for part in [module, *module.extra_modules()]:
                part.to(dtype)
                for param in part.parameters():
                    param.add_(torch.randn_like(param) * 0.1)
        if mutate is not None:
            mutate(module)
        torch.save(module, path)


def make_dinov2_folder(root, hidden=32, image_size=28, crop_size=14, patch_size=7, layers=2, seed=0) -> Path:
    """A tiny ``Dinov2Model`` whose image processor crops smaller than its config's image size, as DINOv2's do
    (518 px position table, 224 px crops)."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    folder = Path(root) / "dinov2"
    config = Dinov2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        mlp_ratio=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessorPil(
        size={"shortest_edge": crop_size + crop_size // 7},
        crop_size={"height": crop_size, "width": crop_size},
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
    ).save_pretrained(folder)
    return folder


def make_released_mix_checkpoint(
    root, dtype=torch.bfloat16, layout="attributes", clip_layers=3, dino_layers=3, width=32, seed=0, **projection_kwargs
) -> dict:
    """A v1.1-layout folder like ``OmniMistral-v1_1-encoders-mix``: the encoders-mix ``projection.pt``."""
    info = make_released_checkpoint(root, layout="1.1", dtype=dtype, seed=seed)
    save_released_mix_projection(
        info["projection"],
        clip=(clip_layers, 32),
        dino=(dino_layers, 32),
        width=width,
        layout=layout,
        dtype=dtype,
        seed=seed,
        **projection_kwargs,
    )
    return info


# --------------------------------------------------------------------------------------------------------------------
# Hostile archives that stay within the allow-list: sizes, bombs, damaged zips, calls
# --------------------------------------------------------------------------------------------------------------------

ZEROS_2GIB_CRC32 = 0x4DBDF21C  # zlib.crc32(bytes(2**31)), precomputed: computing it takes seconds


class _DeclaredStorage:
    """Pickles as the persistent id of a float32 storage ``data/<key>`` of ``numel`` elements."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _DeclaredTensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2`` of a view of a `_DeclaredStorage`."""

    def __init__(self, storage: _DeclaredStorage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(int(torch.tensor(self.shape[i + 1 :]).prod()) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, OrderedDict())


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _DeclaredStorage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def declared_tensors_pickle(tensors: dict[str, tuple[str, int, tuple[int, ...]]]) -> bytes:
    """``data.pkl`` of a dict of float32 tensors, `name: (storage key, storage numel, view shape)`."""
    storages = {key: _DeclaredStorage(key, numel) for key, numel, _ in tensors.values()}
    values = {name: _DeclaredTensor(storages[key], shape) for name, (key, _, shape) in tensors.items()}
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(values)
    return buffer.getvalue()


def _deflated_zeros(size: int) -> bytes:
    """A raw deflate stream of `size` zero bytes (a multiple of 1 MiB), built from one repeated block in no time."""
    chunk = 2**20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (size // chunk) + compressor.flush()


def write_zip_bomb_special_embeddings(path, inflated_size: int = 2**31) -> Path:
    """A ~2 MB ``special_embeddings.pt`` whose ``data/0`` (USER's storage) inflates to `inflated_size` zero bytes;
    the pickle declares exactly that size, so only the decompression is hostile."""
    numel = inflated_size // 4
    data_pkl = declared_tensors_pickle({key: ("0", numel, (numel,)) for key in SPECIAL_KEYS})
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
    stream = _deflated_zeros(inflated_size)
    crc = ZEROS_2GIB_CRC32 if inflated_size == 2**31 else zlib.crc32(bytes(inflated_size))
    _append_raw_zip_entry(path, "archive/data/0", stream, inflated_size, crc)
    return path


def _append_raw_zip_entry(path: Path, name: str, deflated: bytes, size: int, crc: int):
    """Adds an already deflated entry to the zip at `path` (zipfile cannot write precompressed data)."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        central_start = archive.start_dir
    raw = path.read_bytes()
    name_bytes = name.encode()
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(deflated), size, len(name_bytes), 0)
    offset = central_start
    body = raw[:central_start] + local + name_bytes + deflated
    central = raw[central_start : raw.rindex(b"PK\x05\x06")]
    central += struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, len(deflated), size, len(name_bytes), 0, 0, 0, 0, 0,
        offset,
    ) + name_bytes  # fmt: skip
    count = len(infos) + 1
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(body), 0)
    path.write_bytes(body + central + end)


def patch_zip_entry(path, name: str, *, flip_data_byte: bool = False, method: int | None = None) -> Path:
    """Damages entry `name` of the zip at `path` in place: one byte of its data flipped (a bad CRC), or its
    compression method in the central directory set to `method`."""
    path = Path(path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
        central_start = archive.start_dir
    if flip_data_byte:
        name_length, extra_length = struct.unpack("<2H", raw[info.header_offset + 26 : info.header_offset + 30])
        raw[info.header_offset + 30 + name_length + extra_length] ^= 0xFF
    if method is not None:
        position = raw.index(b"PK\x01\x02", central_start)
        while raw[position + 46 : position + 46 + len(name)] != name.encode():
            position = raw.index(b"PK\x01\x02", position + 4)
        raw[position + 10 : position + 12] = struct.pack("<H", method)
    path.write_bytes(bytes(raw))
    return path


def make_reduce_call_projection(path, module_class=torch.nn.Linear, args=(20000, 20000)) -> Path:
    """A few-hundred-byte ``projection.pt`` whose pickle calls an allowed module class (``nn.Linear(20000, 20000)``
    would allocate 1.5 GB in its ``__init__``) instead of rebuilding it from stored state."""
    return write_raw_torch_archive(path, pickle.dumps(_Payload(module_class, args), protocol=2))


def make_deep_module_chain_projection(path, depth: int = 3000) -> Path:
    """A released-format ``projection.pt`` with a chain of `depth` nested (allowed) Dropout modules in it."""

    def plant(module):
        chain = torch.nn.Dropout()
        for _ in range(depth):
            parent = torch.nn.Dropout()
            parent.add_module("inner", chain)
            chain = parent
        module.transformer_layer.add_module("deep", chain)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * depth))  # the pickler recurses once per level
    try:
        save_released_projection(path, mutate=plant)
    finally:
        sys.setrecursionlimit(limit)
    return Path(path)
