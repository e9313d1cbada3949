"""
Benchmark VisDial candidate scoring: shared-prefix KV reuse against the released naive full-sequence scoring.

Builds a random OmniFusion in-process (a CLIP-shaped vision tower at 336 px / patch 14, so 576 image tokens as in
the released model, and a small Mistral-shaped LM with the 32k vocabulary), one dialog of `--rounds` rounds with
`--candidates` candidates each, and scores every round both ways on the same model:

* shared prefix (`score_candidates_shared_prefix`): the round's context once, its KV cache serving every batch;
* naive (`score_candidates_naive`, the released `test.py` method): every candidate's full context + answer
  sequence through the LM, the image encoded once per round.

Token lengths follow VisDial (caption 15, question 8, answer 2 to 8 tokens) in the released prompt layout; the ids
are random. It checks that both give the same candidate log-likelihoods (sum of token log-probabilities, within
1e-4), prints both times, and ends with the line `speedup=<naive time / shared-prefix time>`. The methods alternate
round by round; with `--threads 1` (the default) a busy machine disturbs the many small kernels of the
shared-prefix pass far less than with oversubscribed threads.

    python examples/benchmark_visdial.py    # 10 rounds x 100 candidates: about 5 minutes on one CPU thread
"""

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BatchFeature, CLIPVisionConfig, HfArgumentParser, MistralConfig

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM
from visdial_scoring import score_candidates_naive, score_candidates_shared_prefix, visdial_metric


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
    # The two methods alternate round by round, so a busy machine slows both alike.
    shared_seconds = naive_seconds = max_diff = 0.0
    same_ranking = 0
    for index, (inputs, candidates) in enumerate(rounds, 1):
        seconds, shared = timed(score_candidates_shared_prefix, model, inputs, candidates, args.batch_size)
        shared_seconds += seconds
        seconds, naive = timed(score_candidates_naive, model, inputs, candidates, args.batch_size)
        naive_seconds += seconds
        max_diff = max(max_diff, (shared - naive).abs().max().item())
        same_ranking += np.array_equal(ranks(shared), ranks(naive))
        print(f"round {index}/{args.rounds}: shared prefix {shared_seconds:.2f} s, naive {naive_seconds:.2f} s so far")

    print(f"shared prefix:       {shared_seconds:8.2f} s  ({shared_seconds / args.rounds:.3f} s/round)")
    print(f"naive full sequence: {naive_seconds:8.2f} s  ({naive_seconds / args.rounds:.3f} s/round)")
    print(
        f"max |log-likelihood difference| = {max_diff:.2e} (tolerance {TOLERANCE:.0e}); "
        f"identical rankings in {same_ranking}/{args.rounds} rounds"
    )
    if max_diff >= TOLERANCE:
        raise SystemExit(f"shared-prefix and naive log-likelihoods differ by {max_diff:.2e} >= {TOLERANCE:.0e}")
    print(f"speedup={naive_seconds / shared_seconds:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
