"""
Benchmark VisDial candidate scoring: per-round shared-prefix and whole-dialog KV reuse against the released naive
full-sequence scoring.

Builds a random OmniFusion in-process (a CLIP-shaped vision tower at 336 px / patch 14, so 576 image tokens as in
the released model, and a small Mistral-shaped LM with the 32k vocabulary), one dialog of `--rounds` rounds with
`--candidates` candidates each, and scores every round both ways on the same model:

* shared prefix (`score_candidates_shared_prefix`): the round's context once, its KV cache serving every batch;
* whole dialog (`DialogScorer`, what `omnifusion-evaluate-visdial` uses): one KV cache for the dialog, extended by each
  round's ground-truth answer and next question, so the image, caption and history run once per dialog; each
  batch of candidates runs packed in one sequence (4D attention mask) on that cache;
* released (`score_candidates_naive(..., full_logits=True)`, the released `test.py` method exactly): every
  candidate's full context + answer sequence through the LM, the image encoded once per round, and the LM head run
  at every position of every sequence (test.py takes `.logits` of the whole batch and slices the answer rows);
* naive (`score_candidates_naive`): the same sequences, but only the candidate positions reach the LM head
  (`logits_to_keep`), a stronger baseline than the released code; the speedups over it are printed too.

The whole-dialog scorer runs twice, with its default prefix sharing (the packed candidates of a batch that start
with the same tokens run that prefix once: tree attention) and with `share_prefixes=False` (every candidate's own
tokens packed), so the run shows what sharing gives.

Two sources of text (`--candidates_from`), both in the released prompt layout:

* `visdial` (the default): the real text of one dialog of the repo's VisDial v1.0 val sample
  (`tests/data/visdial/visdial_1.0_val_crowdsourced.json`, `--dialog_index`): its caption, questions (with "?"),
  ground-truth answers and the 100 real answer options of every round, tokenized with the real Mistral tokenizer
  (`tokenizer.model.v1` of the `mistral-common` package, the released OmniMistral tokenizer) - what
  `omnifusion-evaluate-visdial` scores. The model is random but has the Mistral 32k vocabulary, so the real ids fit.
  Real answer options share prefixes ("yes", "no", "it is", ...), which prefix sharing exploits; the released naive
  method pads each batch to its longest candidate, as it does on real data.
* `random`: random ids of VisDial-like lengths (caption 15, question 8, answer 5, candidates 2 to 8 tokens); random
  candidates share no prefix, so this is the scorer's worst case.

The system prompt and the describe request are random ids in both (10 tokens each). It checks that all methods give
the same candidate log-likelihoods (sum of token log-probabilities, within 1e-4) and that the whole-dialog rankings
equal the naive ones in every round, prints the times, and ends with the line
`speedup=<released time / shared-prefix time> dialog_speedup=<released time / whole-dialog time>` (whole dialog
with prefix sharing, the scorer `omnifusion-evaluate-visdial` uses; against the released method, as the goal is stated).
The released method runs in batches of `--batch_size` like the others (test.py puts all 100 candidates in one
batch: the same arithmetic, twice the memory). The methods alternate round by round; with `--threads 1`
(the default) a busy machine disturbs the many small kernels of the cached passes far less than with
oversubscribed threads.

    python examples/benchmarks/benchmark_visdial.py    # 10 rounds x 100 candidates: about 10 minutes on one thread
    python examples/benchmarks/benchmark_visdial.py --candidates_from random
"""

import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature, CLIPVisionConfig, HfArgumentParser, MistralConfig

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM
from modeling_omnifusion.evaluation.visdial_scoring import (
    DialogScorer,
    _candidate_trie,
    _packed_batches,
    score_candidates_naive,
    score_candidates_shared_prefix,
    visdial_metric,
    visdial_round_question,
)

SYSTEM_TOKENS, DESCRIBE_TOKENS, CAPTION_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS = 10, 10, 15, 8, 5
CANDIDATE_TOKENS = (2, 8)
TOLERANCE = 1e-4
VISDIAL_SAMPLE = Path(__file__).resolve().parents[2] / "tests/data/visdial/visdial_1.0_val_crowdsourced.json"
MISTRAL_TOKENIZER = ("mistral_common", "data/tokenizer.model.v1")
CANDIDATE_SOURCES = ("visdial", "random")


@dataclass
class BenchmarkArguments:
    rounds: int = field(default=10, metadata={"help": "Rounds; each adds a question and an answer to the context."})
    candidates: int = field(default=100, metadata={"help": "Candidate answers per round."})
    batch_size: int = field(default=50, metadata={"help": "Candidates per forward pass, for both methods."})
    threads: int = field(
        default=1,
        metadata={"help": "CPU threads (0: torch's default). One thread keeps timings steady on a shared machine."},
    )
    seed: int = field(default=0)
    candidates_from: str = field(
        default="visdial",
        metadata={
            "help": "visdial: the real text and answer options of a dialog of --visdial_json, tokenized with the real "
            "Mistral tokenizer (needs mistral-common); random: random ids of VisDial-like lengths.",
            "choices": list(CANDIDATE_SOURCES),
        },
    )
    visdial_json: str = field(
        default=str(VISDIAL_SAMPLE), metadata={"help": "VisDial file for --candidates_from visdial."}
    )
    dialog_index: int = field(
        default=0, metadata={"help": "Which dialog of --visdial_json (--candidates_from visdial)."}
    )


def build_model() -> OmniFusionForCausalLM:
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
    )
    text = MistralConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    config = OmniFusionConfig(vision_config=vision, text_config=text, adapter_type="mlp")
    return OmniFusionForCausalLM(config).eval()


def mistral_tokenizer():
    """The real Mistral SentencePiece tokenizer (Mistral-7B-v0.1's, as in OmniMistral), from mistral-common."""
    spec = importlib.util.find_spec(MISTRAL_TOKENIZER[0])
    if spec is None:
        raise SystemExit(
            "--candidates_from visdial tokenizes with the Mistral tokenizer of the mistral-common package: "
            "pip install mistral-common (or pip install -e '.[test]'), or pass --candidates_from random"
        )
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(Path(spec.origin).parent / MISTRAL_TOKENIZER[1]))


def visdial_text(args: BenchmarkArguments):
    """`(caption, [(question, answer, answer_options)] per round)` of dialog `--dialog_index` of `--visdial_json`."""
    path = Path(args.visdial_json)
    if not path.is_file():
        raise FileNotFoundError(f"--visdial_json {path} does not exist (expected a VisDial v1.0 JSON file)")
    data = json.loads(path.read_text())["data"]
    if not 0 <= args.dialog_index < len(data["dialogs"]):
        raise ValueError(f"--dialog_index must be in 0..{len(data['dialogs']) - 1} for {path}, got {args.dialog_index}")
    dialog = data["dialogs"][args.dialog_index]
    if args.rounds > len(dialog["dialog"]):
        raise ValueError(
            f"--rounds {args.rounds}: dialog {args.dialog_index} of {path} has {len(dialog['dialog'])} rounds"
        )
    rounds = []
    for visdial_round in dialog["dialog"][: args.rounds]:
        options = [data["answers"][index] for index in visdial_round["answer_options"]]
        if args.candidates > len(options):
            raise ValueError(f"--candidates {args.candidates}: the VisDial rounds have {len(options)} answer options")
        rounds.append(
            (
                visdial_round_question(data["questions"][visdial_round["question"]]),
                data["answers"][visdial_round["answer"]],
                options[: args.candidates],
            )
        )
    return dialog["caption"], rounds


def build_rounds(config: OmniFusionConfig, args: BenchmarkArguments, rng: np.random.Generator):
    """`(context_inputs, candidate_ids)` per round, laid out as the OmniFusion chat template lays out VisDial."""

    def text(length):
        return rng.integers(0, config.text_config.vocab_size, length).tolist()

    if args.candidates_from == "visdial":
        tokenizer = mistral_tokenizer()
        caption, dialog = visdial_text(args)
        caption_ids = tokenizer.encode(caption)
        dialog = [
            (tokenizer.encode(question), tokenizer.encode(answer), tokenizer.encode(options))
            for question, answer, options in dialog
        ]
    else:
        caption_ids = text(CAPTION_TOKENS)
        dialog = [
            (
                text(QUESTION_TOKENS),
                text(ANSWER_TOKENS),
                [text(rng.integers(CANDIDATE_TOKENS[0], CANDIDATE_TOKENS[1] + 1)) for _ in range(args.candidates)],
            )
            for _ in range(args.rounds)
        ]

    image_block = [config.image_start_token_id] + [config.image_token_id] * config.num_image_tokens
    context = text(SYSTEM_TOKENS) + image_block + [config.image_end_token_id, config.user_token_id]
    context += text(DESCRIBE_TOKENS) + [config.assistant_token_id] + caption_ids
    pixel_values = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    rounds = []
    for question, answer, candidates in dialog:
        context += [config.user_token_id] + question + [config.assistant_token_id]
        input_ids = torch.tensor([context])
        inputs = BatchFeature(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
        )
        rounds.append((inputs, candidates))
        context += answer
    return rounds


def packed_positions(model, rounds, batch_size: int, share_prefixes: bool) -> int:
    """Candidate tokens the whole-dialog scorer runs in all rounds, with or without prefix sharing."""
    total = 0
    for inputs, candidates in rounds:
        context_len = inputs["input_ids"].shape[1]
        for rows in _packed_batches(model, context_len, candidates, batch_size, share_prefixes):
            total += len(_candidate_trie([candidates[row] for row in rows], share_prefixes)[0])
    return total


def ranks(scores: torch.Tensor) -> np.ndarray:
    return visdial_metric.scores_to_ranks(scores.double().numpy())


def score_released(model, inputs, candidates, batch_size, score):
    """The released test.py scoring: full sequences, the LM head at every position (see the module docstring)."""
    return score_candidates_naive(model, inputs, candidates, batch_size=batch_size, score=score, full_logits=True)


def timed(score_fn, model, inputs, candidates, batch_size):
    """(seconds, float32 scores) of one round scored with `score_fn` (sum of token log-probabilities)."""
    start = time.perf_counter()
    scores = score_fn(model, inputs, candidates, batch_size=batch_size, score="sum")
    return time.perf_counter() - start, scores


def main(argv=None):
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model()
    rounds = build_rounds(model.config, args, np.random.default_rng(args.seed))
    context_lengths = [inputs["input_ids"].shape[1] for inputs, _ in rounds]
    candidate_lengths = [len(ids) for _, candidates in rounds for ids in candidates]
    text = model.config.text_config
    print(
        f"model: random OmniFusion, {model.config.num_image_tokens} image tokens (CLIP-shaped tower 336px/14), "
        f"Mistral-shaped LM hidden {text.hidden_size} x {text.num_hidden_layers} layers, vocab {text.vocab_size}; "
        f"float32 on cpu, {torch.get_num_threads()} threads"
    )
    source = (
        f"dialog {args.dialog_index} of {Path(args.visdial_json).name} (real text and answer options, Mistral "
        "tokenizer)"
        if args.candidates_from == "visdial"
        else "random ids"
    )
    print(
        f"shape: 1 dialog x {args.rounds} rounds x {args.candidates} candidates from {source}, context "
        f"{context_lengths[0]}..{context_lengths[-1]} tokens, candidates {min(candidate_lengths)}.."
        f"{max(candidate_lengths)} tokens (mean {np.mean(candidate_lengths):.2f}), batch {args.batch_size}"
    )
    unshared_positions = packed_positions(model, rounds, args.batch_size, share_prefixes=False)
    shared_positions = packed_positions(model, rounds, args.batch_size, share_prefixes=True)
    print(
        f"candidate tokens run by the whole-dialog scorer: {shared_positions} with prefix sharing, "
        f"{unshared_positions} without ({1 - shared_positions / unshared_positions:.1%} fewer)"
    )

    timed(score_candidates_shared_prefix, model, *rounds[0], args.batch_size)  # warm-up
    timed(score_candidates_naive, model, *rounds[0], args.batch_size)
    timed(score_released, model, *rounds[0], args.batch_size)
    for share_prefixes in (True, False):
        warm_up = DialogScorer(model, args.batch_size, score="sum", share_prefixes=share_prefixes)
        for inputs, candidates in rounds[:2]:
            warm_up.score_round(inputs, candidates)
    # The methods alternate round by round, so a busy machine slows all alike. The dialog scorers keep their cache
    # from round to round.
    dialog = DialogScorer(model, args.batch_size, score="sum")
    unshared = DialogScorer(model, args.batch_size, score="sum", share_prefixes=False)
    seconds = {"shared prefix": 0.0, "whole dialog": 0.0, "unshared": 0.0, "naive": 0.0, "released": 0.0}
    max_diff = {"shared prefix": 0.0, "whole dialog": 0.0, "unshared": 0.0, "released": 0.0}
    same_ranking = {"shared prefix": 0, "whole dialog": 0, "unshared": 0, "released": 0}
    for index, (inputs, candidates) in enumerate(rounds, 1):
        scores = {}
        for name, score_fn in (
            ("shared prefix", score_candidates_shared_prefix),
            ("whole dialog", lambda _model, *a, **k: dialog.score_round(*a[:2])),
            ("unshared", lambda _model, *a, **k: unshared.score_round(*a[:2])),
            ("naive", score_candidates_naive),
            ("released", score_released),
        ):
            elapsed, scores[name] = timed(score_fn, model, inputs, candidates, args.batch_size)
            seconds[name] += elapsed
        for name in max_diff:
            max_diff[name] = max(max_diff[name], (scores[name] - scores["naive"]).abs().max().item())
            same_ranking[name] += np.array_equal(ranks(scores[name]), ranks(scores["naive"]))
        print(
            f"round {index}/{args.rounds}: shared prefix {seconds['shared prefix']:.2f} s, whole dialog "
            f"{seconds['whole dialog']:.2f} s (without prefix sharing {seconds['unshared']:.2f} s), naive "
            f"{seconds['naive']:.2f} s, released {seconds['released']:.2f} s so far"
        )

    def line(name, label):
        return f"{label:<38} {seconds[name]:8.2f} s  ({seconds[name] / args.rounds:.3f} s/round"

    def over(name):
        return f"{seconds['released'] / seconds[name]:.1f}x the released, {seconds['naive'] / seconds[name]:.1f}x naive"

    print(line("shared prefix", "shared prefix (per round):") + f", {over('shared prefix')})")
    print(
        line("whole dialog", "whole dialog, prefix sharing:")
        + f", {over('whole dialog')}; {dialog.context_tokens_run} context tokens run for "
        f"{sum(context_lengths)} in all rounds' contexts, {dialog.image_encodings} image encoding)"
    )
    print(line("unshared", "whole dialog, no prefix sharing:") + f", {over('unshared')})")
    print(line("naive", "naive full sequence (logits_to_keep):") + f", {over('naive')})")
    print(line("released", "released test.py (all logits):") + ")")
    print(
        "max |log-likelihood difference| vs naive: "
        + ", ".join(f"{name} {diff:.2e}" for name, diff in max_diff.items())
        + f" (tolerance {TOLERANCE:.0e}); identical rankings in "
        + ", ".join(f"{count}/{args.rounds} ({name})" for name, count in same_ranking.items())
        + " rounds"
    )
    worst = max(max_diff.values())
    if worst >= TOLERANCE:
        raise SystemExit(f"cached and naive log-likelihoods differ by {worst:.2e} >= {TOLERANCE:.0e}")
    for name in ("whole dialog", "unshared", "released"):
        if same_ranking[name] != args.rounds:
            raise SystemExit(f"{name} rankings differ from naive in {args.rounds - same_ranking[name]} rounds")
    print(
        f"speedup={seconds['released'] / seconds['shared prefix']:.1f} "
        f"dialog_speedup={seconds['released'] / seconds['whole dialog']:.1f}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
