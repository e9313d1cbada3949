"""
Benchmark VisDial candidate scoring: per-round shared-prefix and whole-dialog KV reuse against the released naive
full-sequence scoring.

Builds a random OmniFusion in-process (a CLIP-shaped vision tower at 336 px / patch 14, so 576 image tokens as in
the released model, and a small Mistral-shaped LM with the 32k vocabulary), one dialog of `--rounds` rounds with
`--candidates` candidates each, and scores every round both ways on the same model:

* shared prefix (`score_candidates_shared_prefix`): the round's context once, its KV cache serving every batch;
* whole dialog (`DialogScorer`, what `evaluate_visdial.py` uses): one KV cache for the dialog, extended by each
  round's ground-truth answer and next question, so the image, caption and history run once per dialog; each
  batch of candidates runs packed in one sequence (4D attention mask) on that cache;
* naive (`score_candidates_naive`, the released `test.py` method): every candidate's full context + answer
  sequence through the LM, the image encoded once per round.

Token lengths follow VisDial (caption 15, question 8, answer 2 to 8 tokens) in the released prompt layout; the ids
are random. It checks that all three give the same candidate log-likelihoods (sum of token log-probabilities,
within 1e-4) and that the whole-dialog rankings equal the naive ones in every round, prints the times, and ends
with the line `speedup=<naive time / shared-prefix time> dialog_speedup=<naive time / whole-dialog time>`. The
methods alternate round by round; with `--threads 1` (the default) a busy machine disturbs the many small kernels
of the cached passes far less than with oversubscribed threads.

    python examples/benchmark_visdial.py    # 10 rounds x 100 candidates: about 4 minutes on one quiet CPU thread
"""

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BatchFeature, CLIPVisionConfig, HfArgumentParser, MistralConfig

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM
from visdial_scoring import DialogScorer, score_candidates_naive, score_candidates_shared_prefix, visdial_metric


SYSTEM_TOKENS, DESCRIBE_TOKENS, CAPTION_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS = 10, 10, 15, 8, 5
CANDIDATE_TOKENS = (2, 8)
TOLERANCE = 1e-4


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


def build_rounds(config: OmniFusionConfig, args: BenchmarkArguments, rng: np.random.Generator):
    """`(context_inputs, candidate_ids)` per round, laid out as the OmniFusion chat template lays out VisDial."""

    def text(length):
        return rng.integers(0, config.text_config.vocab_size, length).tolist()

    image_block = [config.image_start_token_id] + [config.image_token_id] * config.num_image_tokens
    context = text(SYSTEM_TOKENS) + image_block + [config.image_end_token_id, config.user_token_id]
    context += text(DESCRIBE_TOKENS) + [config.assistant_token_id] + text(CAPTION_TOKENS)
    pixel_values = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    rounds = []
    for _ in range(args.rounds):
        context += [config.user_token_id] + text(QUESTION_TOKENS) + [config.assistant_token_id]
        input_ids = torch.tensor([context])
        inputs = BatchFeature(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
        )
        candidates = [text(rng.integers(CANDIDATE_TOKENS[0], CANDIDATE_TOKENS[1] + 1)) for _ in range(args.candidates)]
        rounds.append((inputs, candidates))
        context += text(ANSWER_TOKENS)
    return rounds


def ranks(scores: torch.Tensor) -> np.ndarray:
    return visdial_metric.scores_to_ranks(scores.double().numpy())


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
    text = model.config.text_config
    print(
        f"model: random OmniFusion, {model.config.num_image_tokens} image tokens (CLIP-shaped tower 336px/14), "
        f"Mistral-shaped LM hidden {text.hidden_size} x {text.num_hidden_layers} layers, vocab {text.vocab_size}; "
        f"float32 on cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"shape: 1 dialog x {args.rounds} rounds x {args.candidates} candidates, context {context_lengths[0]}.."
        f"{context_lengths[-1]} tokens, candidates {CANDIDATE_TOKENS[0]}..{CANDIDATE_TOKENS[1]} tokens, "
        f"batch {args.batch_size}"
    )

    timed(score_candidates_shared_prefix, model, *rounds[0], args.batch_size)  # warm-up
    timed(score_candidates_naive, model, *rounds[0], args.batch_size)
    warm_up = DialogScorer(model, args.batch_size, score="sum")
    for inputs, candidates in rounds[:2]:
        warm_up.score_round(inputs, candidates)
    # The methods alternate round by round, so a busy machine slows all alike. The dialog scorer keeps its cache
    # from round to round.
    dialog = DialogScorer(model, args.batch_size, score="sum")
    shared_seconds = dialog_seconds = naive_seconds = 0.0
    max_diff = dialog_max_diff = 0.0
    same_ranking = dialog_same_ranking = 0
    for index, (inputs, candidates) in enumerate(rounds, 1):
        seconds, shared = timed(score_candidates_shared_prefix, model, inputs, candidates, args.batch_size)
        shared_seconds += seconds
        start = time.perf_counter()
        whole_dialog = dialog.score_round(inputs, candidates)
        dialog_seconds += time.perf_counter() - start
        seconds, naive = timed(score_candidates_naive, model, inputs, candidates, args.batch_size)
        naive_seconds += seconds
        max_diff = max(max_diff, (shared - naive).abs().max().item())
        dialog_max_diff = max(dialog_max_diff, (whole_dialog - naive).abs().max().item())
        same_ranking += np.array_equal(ranks(shared), ranks(naive))
        dialog_same_ranking += np.array_equal(ranks(whole_dialog), ranks(naive))
        print(
            f"round {index}/{args.rounds}: shared prefix {shared_seconds:.2f} s, whole dialog {dialog_seconds:.2f} s, "
            f"naive {naive_seconds:.2f} s so far"
        )

    print(f"shared prefix:       {shared_seconds:8.2f} s  ({shared_seconds / args.rounds:.3f} s/round)")
    print(
        f"whole dialog:        {dialog_seconds:8.2f} s  ({dialog_seconds / args.rounds:.3f} s/round; "
        f"{dialog.context_tokens_run} context tokens run for {sum(context_lengths)} in all rounds' contexts, "
        f"{dialog.image_encodings} image encoding)"
    )
    print(f"naive full sequence: {naive_seconds:8.2f} s  ({naive_seconds / args.rounds:.3f} s/round)")
    print(
        f"max |log-likelihood difference| vs naive: shared prefix {max_diff:.2e}, whole dialog {dialog_max_diff:.2e} "
        f"(tolerance {TOLERANCE:.0e}); identical rankings in {same_ranking}/{args.rounds} (shared prefix) and "
        f"{dialog_same_ranking}/{args.rounds} (whole dialog) rounds"
    )
    if max(max_diff, dialog_max_diff) >= TOLERANCE:
        raise SystemExit(
            f"cached and naive log-likelihoods differ by {max(max_diff, dialog_max_diff):.2e} >= {TOLERANCE:.0e}"
        )
    if dialog_same_ranking != args.rounds:
        raise SystemExit(f"whole-dialog rankings differ from naive in {args.rounds - dialog_same_ranking} rounds")
    print(f"speedup={naive_seconds / shared_seconds:.1f} dialog_speedup={naive_seconds / dialog_seconds:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
