"""
What the benchmarks in this folder share. A benchmark imports it before torch (`import common` comes first among the
third-party imports), so that the environment below applies to every library it loads:

* `HF_HUB_OFFLINE=1`: everything is built locally, nothing is downloaded;
* `OMP_WAIT_POLICY=PASSIVE`: OpenMP threads that spin while waiting for each other make timings slow and erratic on a
  machine whose cores other processes also use; waiting passively costs nothing on an idle one;
* `TOKENIZERS_PARALLELISM=false`.

Each is set only where the environment does not set it already. Also here: `configure` (torch threads, quiet
transformers logging), `cpu_description` (the machine line of a report), `timed`, `random_images`, and the
OmniFusion / LLaVA pair at equal work (`make_processors`, `make_configs`, `build_model`, `copy_weights`) that the
inference and training benchmarks compare, and what the sound and video prefill benchmarks share (`parse_prefill_args`,
`build_with_smollm2`, `prefill`, `median_ms`).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor  # noqa: E402
from modeling_omnifusion.testing import tiny  # noqa: E402

# ----------------------------------------------------------------------------------------------------------- machine

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "asimd")


def configure(threads: int):
    """`torch.set_num_threads(threads)` and transformers' logging at errors only."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()


def cpu_description() -> str:
    """`cpu: <model>, <n> CPUs, flags <the vector-extension flags present>` from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return f"cpu: {model}, {os.cpu_count()} CPUs, flags {' '.join(present) or 'none of ' + '/'.join(CPU_FLAGS)}"


def timed(function) -> tuple[float, float]:
    """Wall and process CPU seconds of one `function()` call under `torch.no_grad()` (CPU time is less sensitive to
    other processes on the cores)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        function()
    return time.perf_counter() - start, time.process_time() - start_cpu


def random_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """`n` RGB images of uniform random pixels, drawn from one generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------------- the OmniFusion / LLaVA pair

PAIR_CORPUS = [
    "This is a dialog with AI assistant.",
    "Describe the image in detail. What objects are there, what colour are they and where are they?",
    "A small yellow triangle on the left of a purple square, and two red circles below a green line.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 yes no",
]
NAMES = ("OmniFusion", "LLaVA")
# SmolLM2-135M-Instruct (the real LM of examples/real_lm_demo.py): Llama, hidden 576, 30 layers, 9 heads of 64, 3 KV
# heads, vocabulary 49,152, tied embeddings.
SMOLLM2_SHAPE = dict(intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
SMOLLM2_SIZE = dict(text_hidden=576, text_layers=30, vocab_size=49152)


def make_tokenizer(extra_special_tokens=()) -> PreTrainedTokenizerFast:
    """The benchmarks' tokenizer: a 400-entry byte-level BPE on `PAIR_CORPUS` (deterministic), plus the given special
    tokens, padding with `<unk>` on the left."""
    return tiny.make_tokenizer(
        400, PAIR_CORPUS * 4, extra_special_tokens=extra_special_tokens, pad_token="<unk>", padding_side="left"
    )


def make_processors(args):
    """OmniFusion's processor and a LlavaProcessor over the same tokenizer vocabulary and image processor settings.

    `args` holds `image_size` and `patch_size`.
    """

    def image_processor():
        return CLIPImageProcessorPil(
            size={"shortest_edge": args.image_size}, crop_size={"height": args.image_size, "width": args.image_size}
        )

    num_patches = (args.image_size // args.patch_size) ** 2
    omni = OmniFusionProcessor(image_processor(), make_tokenizer(), num_image_tokens=num_patches)
    # LLaVA's tokenizer gets the same five added tokens at the same ids (it uses `<image>` and the two role tokens),
    # so the same prompt string tokenizes to the same text ids; only OmniFusion's image start/end markers differ.
    llava = LlavaProcessor(
        image_processor(),
        make_tokenizer(["<image>", "<image_start>", "<image_end>", "<user>", "<assistant>"]),
        patch_size=args.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    assert llava.image_token_id == omni.image_token_id
    return omni, llava


def make_configs(args, omni_processor):
    """`(OmniFusionConfig, LlavaConfig)` from the same CLIP tower and LM configs, OmniFusion's `mlp` adapter being
    LLaVA's projector; sdpa attention everywhere.

    `args` holds `image_size`, `patch_size`, `vision_hidden`, `vision_layers`, `text_hidden`, `text_layers`,
    `vocab_size` and `smollm2` (the LM in SmolLM2-135M's shape).
    """
    vision = CLIPVisionConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64),
        projection_dim=args.vision_hidden,
    )
    tokenizer = omni_processor.tokenizer
    if args.vocab_size <= max(omni_processor.special_token_ids.values()):
        raise ValueError(f"--vocab-size must exceed the tokenizer's ids ({len(tokenizer)}): LLaVA embeds `<image>`")
    if args.smollm2:  # SmolLM2-135M's architecture (random weights: only the timing matters here)
        lm_class, lm_shape = LlamaConfig, dict(SMOLLM2_SHAPE, tie_word_embeddings=True)
    else:
        lm_class, lm_shape = (
            MistralConfig,
            dict(
                intermediate_size=3 * args.text_hidden,
                num_attention_heads=max(1, args.text_hidden // 64),
                num_key_value_heads=max(1, args.text_hidden // 128),
            ),
        )
    text = lm_class(
        vocab_size=args.vocab_size,  # the LM-head width; the tiny tokenizer's ids (and `<image>`) are a subset
        hidden_size=args.text_hidden,
        num_hidden_layers=args.text_layers,
        **lm_shape,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    omni = OmniFusionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        adapter_type="mlp",
        adapter_hidden_size=args.text_hidden,
        adapter_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **omni_processor.special_token_ids,
    )
    llava = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=omni_processor.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    for config in (omni, llava):
        config._attn_implementation = "sdpa"
        config.vision_config._attn_implementation = "sdpa"
        config.text_config._attn_implementation = "sdpa"
    return omni, llava


def build_model(name, configs, pad_token_id):
    """The random model `name` ("OmniFusion" or "LLaVA", seed 0) in eval mode, from `make_configs`' pair."""
    torch.manual_seed(0)
    cls = OmniFusionForCausalLM if name == "OmniFusion" else LlavaForConditionalGeneration
    model = cls(configs[NAMES.index(name)]).eval()
    model.generation_config.pad_token_id = pad_token_id
    return model


def copy_weights(omni: OmniFusionForCausalLM, llava: LlavaForConditionalGeneration):
    """Make LLaVA compute exactly what OmniFusion computes wherever the two overlap."""
    llava.model.vision_tower.load_state_dict(omni.model.vision_tower.state_dict())
    llava.model.multi_modal_projector.load_state_dict(omni.model.adapter.state_dict())
    lm_state = {k: v for k, v in omni.model.language_model.state_dict().items() if "special_embeddings" not in k}
    llava.model.language_model.load_state_dict(lm_state)
    llava.lm_head.load_state_dict(omni.lm_head.state_dict())


# ------------------------------------------------------------------------- prefill with sound or video (one model)

# The `--quick` LM of the prefill benchmarks: 2 layers of width 64, 2 heads of 32, one key/value head.
QUICK_LM_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=2,
    head_dim=32,
    num_key_value_heads=1,
)


def parse_prefill_args(argv, doc: str, seconds: str, seconds_help: str, per: str, quick_help: str, read_seconds):
    """`--seconds` (turned into the lengths by `read_seconds(text, error)`, which calls `error(message)` on a bad
    value), `--rounds` (timed rounds per contender and `per`), `--threads` and `--quick` (one round) of a prefill
    benchmark whose module docstring is `doc`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", default=seconds, help=seconds_help)
    parser.add_argument("--rounds", type=int, default=3, help=f"Timed rounds per contender and {per}.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads.")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    args.seconds = read_seconds(args.seconds, parser.error)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")
    if args.quick:
        args.rounds = 1
    return args


def build_with_smollm2(config: OmniFusionConfig, processor, quick: bool, max_position_embeddings: int):
    """The OmniFusion of `config` (random, seed 0, eval mode) with a SmolLM2-135M-shaped LM (`QUICK_LM_SHAPE` with
    `quick`), and `processor` given the config's processor settings."""
    text = LlamaConfig(
        **{
            **SMOLLM2_SHAPE,
            "hidden_size": SMOLLM2_SIZE["text_hidden"],
            "num_hidden_layers": SMOLLM2_SIZE["text_layers"],
            **(QUICK_LM_SHAPE if quick else {}),
        },
        vocab_size=SMOLLM2_SIZE["vocab_size"],
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
    )
    config.text_config = text
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    torch.manual_seed(0)
    return OmniFusionForCausalLM(config).eval(), processor


def prefill(model, inputs: dict):
    """One prefill: the prompt through the model with the KV cache, logits of the last position only."""
    model(**inputs, use_cache=True, logits_to_keep=1)


def median_ms(contenders: dict, rounds: int) -> dict[str, float]:
    """The median wall milliseconds of each contender (name -> function) over `rounds` rounds, the contenders
    interleaved: one call of each per round, in order."""
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, function in contenders.items():
            times[name].append(timed(function)[0])
    return {name: 1000 * statistics.median(values) for name, values in times.items()}
