"""
Rank Visual Dialog answer candidates by their log-likelihood under a vision-language model.

Used by the evaluation driver (`modeling_omnifusion.evaluation.visdial`), the VisDial benchmark and the training
demo. Works with any model that `AutoModelForImageTextToText` loads (OmniFusion, transformers' LLaVA) and any
processor with a chat template.

Prompt of a round (the released OmniFusion layout, rendered by the processor's chat template):

    user:      <image> "Describe what you can see in the picture."
    assistant: caption
    user:      question 1 + "?"      assistant: ground-truth answer 1
    ...                               (all earlier rounds, always with the ground-truth answers)
    user:      question t + "?"      assistant: <- generation prompt; the candidate continues from here

History (`HISTORY_POLICY`, as the VisDial protocol allows): when the context and the round's longest answer option
would not fit the model's positions, the oldest earlier rounds are left out, one at a time, until they do; the image
and caption always stay.

VisDial questions carry no "?"; it is added, as the official starter code does. A candidate is tokenized on its
own (`add_special_tokens=False`), with no EOS after it, and scored as the continuation of the generation prompt.
For OmniFusion that equals tokenizing prompt and candidate together (tested), because the prompt ends with the
`<assistant>` marker and the processor tokenizes the text after each marker independently. LLaVA-1.5's template
writes a reply as "ASSISTANT: " + answer but ends the generation prompt at "ASSISTANT:"; its SentencePiece
tokenizer gives a candidate tokenized alone the leading word-boundary piece that stands for that space.

Score of a candidate: the mean (OmniFusion's released `test.py`) or the sum (the official LF-gen convention) of
its token log-probabilities, computed in float32. Higher is better.

Shared-prefix scoring runs the round's context (image, caption, history, question) once, keeps its KV cache and
scores the candidates in batches on that cache, so each candidate costs only its own few tokens. Whole-dialog
scoring (`DialogScorer`, used by `evaluate_dialogs`) goes further: round t+1's context is round t's plus the
ground-truth answer and the next question, so one KV cache per dialog is extended round by round and the image and
caption run once per dialog; the candidates of a batch run packed in one sequence with a 4D attention mask, a
token prefix that several of them share run once (tree attention), and each later round's new context tokens run in
the same forward as its first candidate batch.
`score_candidates_naive` is the released method (every candidate's full sequence through the LM, the image
encoded once) and exists to check and time the shared-prefix one.
"""

import copy
from collections.abc import Callable, Mapping

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..compat_omnifusion import output_cache
from .metrics.visdial import visdial as visdial_metric

DESCRIBE_PROMPT = "Describe what you can see in the picture."
HISTORY_POLICY = (
    "image, caption and the most recent earlier rounds (ground-truth answers) whose context plus the longest answer "
    "option fits the model's positions; older rounds are left out"
)
SCORE_TYPES = ("mean", "sum")


def dialog_messages(image, caption: str, history: list[tuple[str, str]], question: str) -> list[dict]:
    """
    Chat messages for one round: the image with the describe request, the caption as the assistant's reply, the
    earlier (question, answer) pairs as user/assistant turns and the current question as the last user turn.
    Questions are used as given (`visdial_round_question` adds the "?").
    """
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": DESCRIBE_PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]
    for past_question, past_answer in history:
        messages.append({"role": "user", "content": [{"type": "text", "text": past_question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": past_answer}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
    return messages


def visdial_round_question(text: str) -> str:
    """A VisDial question as put in the prompt: with the "?" the annotations leave out."""
    return text if text.endswith("?") else text + "?"


def build_context(processor, messages: list[dict]):
    """
    The model inputs of a round's context (`input_ids` `[1, context_len]`, `attention_mask`, `pixel_values`, ...)
    rendered through the processor's chat template with the generation prompt appended.
    """
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            f"{type(processor).__name__} has no chat template; VisDial prompts are built with "
            "`processor.apply_chat_template`, so save the processor with one (`processor.chat_template = ...`)."
        )
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def tokenize_candidates(tokenizer, candidates: list[str]) -> list[list[int]]:
    """Token ids of every candidate answer on its own (no special tokens); raises on an empty candidate."""
    candidate_ids = tokenizer(list(candidates), add_special_tokens=False)["input_ids"]
    for text, ids in zip(candidates, candidate_ids):
        if not ids:
            raise ValueError(f"Candidate {text!r} tokenizes to no tokens and cannot be scored.")
    return candidate_ids


def _pad_right(candidate_ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[batch, max_len]` ids right-padded with 0 and the matching boolean mask of real tokens."""
    length = max(len(ids) for ids in candidate_ids)
    ids = torch.zeros(len(candidate_ids), length, dtype=torch.long)
    real = torch.zeros(len(candidate_ids), length, dtype=torch.bool)
    for row, tokens in enumerate(candidate_ids):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        real[row, : len(tokens)] = True
    return ids.to(device), real.to(device)


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 log-probability of each of `targets` `[n]` under the matching row of `logits` `[n, vocab]`."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _reduce(log_probs: torch.Tensor, real: torch.Tensor, score: str) -> torch.Tensor:
    """Per-candidate sum, or mean over its real tokens, of `log_probs` `[batch, len]` (0 at padding)."""
    total = log_probs.sum(-1)
    return total / real.sum(-1) if score == "mean" else total


def _expand_cache(cache, batch_size: int):
    """
    The batch-1 context cache widened to `batch_size` rows for one candidate batch; `cache` itself is left as it is.
    Full and sliding-window dynamic layers get stride-0 views of the context keys/values (their `update` writes the
    concatenation to new tensors, so the views are only read); any other layer type is deep-copied and repeated.
    """
    expanded = copy.copy(cache)
    expanded.layers = []
    for layer in cache.layers:
        if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and layer.is_initialized:
            layer = copy.copy(layer)
            layer.keys = layer.keys.expand(batch_size, -1, -1, -1)
            layer.values = layer.values.expand(batch_size, -1, -1, -1)
        else:
            layer = copy.deepcopy(layer)
            layer.batch_repeat_interleave(batch_size)
        expanded.layers.append(layer)
    return expanded


def _check_arguments(context_inputs, score: str):
    if score not in SCORE_TYPES:
        raise ValueError(f"score must be one of {SCORE_TYPES}, got {score!r}")
    if context_inputs["input_ids"].shape[0] != 1:
        raise ValueError(f"Expected the context of one round (batch 1), got {context_inputs['input_ids'].shape[0]}.")


@torch.no_grad()
def score_candidates_shared_prefix(
    model, context_inputs, candidate_ids: list[list[int]], batch_size: int = 50, score: str = "mean"
) -> torch.Tensor:
    """
    Log-likelihood score of every candidate continuing the context, running the context once.

    The context's last logits give every candidate's first token; each batch of candidates (grouped by length, so
    little padding) runs on the context cache widened to the batch, with position ids continuing the context, and
    the LM head is applied only where a candidate token follows (`logits_to_keep` as a boolean mask).

    Args:
        model: an image-text-to-text model whose forward takes `cache`, `position_ids` and `logits_to_keep`.
        context_inputs: the processor's output for one round's context (`build_context`), batch 1.
        candidate_ids: token ids of each candidate (`tokenize_candidates`).
        batch_size: candidates per forward pass.
        score: `"mean"` or `"sum"` of the candidate's token log-probabilities.

    Returns:
        float32 `[num_candidates]` scores on the CPU, in `candidate_ids` order, higher is better.
    """
    _check_arguments(context_inputs, score)
    context_inputs = context_inputs.to(model.device, model.dtype)
    context = model(**context_inputs, use_cache=True, logits_to_keep=1)
    first_token_log_probs = torch.log_softmax(context.logits[0, -1].float(), dim=-1)
    return _score_padded_batches(
        model,
        output_cache(context),
        context_inputs["attention_mask"],
        first_token_log_probs,
        candidate_ids,
        batch_size,
        score,
    )


def _score_padded_batches(
    model, cache, context_mask, first_token_log_probs, candidate_ids, batch_size: int, score: str
) -> torch.Tensor:
    """Candidates in right-padded batches on `cache` widened to each batch (`cache` itself is left as it is)."""
    context_len = context_mask.shape[1]
    by_length = sorted(range(len(candidate_ids)), key=lambda index: len(candidate_ids[index]))
    scores = torch.empty(len(candidate_ids), device=model.device)
    for start in range(0, len(by_length), batch_size):
        rows = by_length[start : start + batch_size]
        ids, real = _pad_right([candidate_ids[row] for row in rows], model.device)
        batch, length = ids.shape
        log_probs = torch.zeros(batch, length, device=model.device)
        log_probs[:, 0] = first_token_log_probs[ids[:, 0]]
        if length > 1:
            predicts_next = torch.zeros_like(real)
            predicts_next[:, :-1] = real[:, 1:]
            outputs = model(
                input_ids=ids,
                attention_mask=torch.cat([context_mask.expand(batch, -1), real.long()], dim=1),
                position_ids=torch.arange(context_len, context_len + length, device=model.device).expand(batch, -1),
                cache=_expand_cache(cache, batch),
                use_cache=True,
                logits_to_keep=predicts_next,
            )
            log_probs[:, 1:][real[:, 1:]] = _token_log_probs(outputs.logits, ids[:, 1:][real[:, 1:]])
        scores[rows] = _reduce(log_probs, real, score)
    return scores.cpu()


PACKED_ATTENTION = ("sdpa", "eager")


def _can_pack(model, cache, packed_len: int) -> bool:
    """
    Whether candidates can run packed in one sequence with a custom 4D mask: the decoder's attention takes additive
    4D masks (sdpa, eager) and every cache layer keeps all context tokens for the packed forward (full layers, or
    sliding-window layers whose window covers context + packed candidates).
    """
    attention = getattr(model.config.get_text_config(), "_attn_implementation", None)
    if attention not in PACKED_ATTENTION:
        return False
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            if layer.sliding_window < cache.get_seq_length() + packed_len + 1:
                return False
        elif type(layer) is not DynamicLayer:
            return False
    return True


def _candidate_trie(groups: list[list[int]], share_prefixes: bool = True):
    """
    The positions a packed forward runs for the candidates `groups`: one node per distinct token prefix that
    predicts a next token (a candidate's tokens except its last), so candidates that start alike share the nodes of
    their common prefix (with `share_prefixes=False` every candidate keeps its own chain of nodes).

    Returns `(tokens, parents, depths, paths)`: each node's token id, parent node (-1: the context) and depth (0 for
    a candidate's first token), nodes in an order where a parent comes before its children; `paths[c][i]` is the
    node whose logits predict token `i + 1` of candidate `c`.
    """
    nodes: dict[tuple, int] = {}
    tokens, parents, depths, paths = [], [], [], []
    for row, ids in enumerate(groups):
        parent, path = -1, []
        for depth, token in enumerate(ids[:-1]):
            key = (parent, token) if share_prefixes else (row, depth)
            node = nodes.get(key)
            if node is None:
                node = nodes[key] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                depths.append(depth)
            path.append(node)
            parent = node
        paths.append(path)
    return tokens, parents, depths, paths


def _packed_mask(parents: torch.Tensor, depth: int, cached_len: int, new_len: int, dtype) -> torch.Tensor:
    """
    `[new_len + nodes, cached_len + new_len + nodes]` additive mask (0 visible, dtype's min hidden) of a packed
    forward on a cache of `cached_len` context tokens: first `new_len` new context tokens (causal: each sees the
    cached ones, itself and the new ones before it), then the trie nodes (`parents` `[nodes]`, -1 at the roots;
    `depth`: the deepest node's depth), each seeing the whole context, itself and its ancestors.
    """
    count = parents.shape[0]
    hidden = torch.finfo(dtype).min
    mask = torch.zeros(new_len + count, cached_len + new_len + count, dtype=dtype, device=parents.device)
    if new_len:
        later = torch.ones(new_len, new_len, dtype=torch.bool, device=parents.device).triu(1)
        mask[:new_len, cached_len : cached_len + new_len].masked_fill_(later, hidden)
        mask[:new_len, cached_len + new_len :] = hidden
    if count:
        # A sentinel column `count` stands for "no ancestor": the walk up from a root ends there.
        up = torch.cat([parents.masked_fill(parents < 0, count), parents.new_tensor([count])])
        visible = torch.zeros(count, count + 1, dtype=torch.bool, device=parents.device)
        rows = torch.arange(count, device=parents.device)
        ancestor = rows
        for _ in range(depth + 1):
            visible[rows, ancestor] = True
            ancestor = up[ancestor]
        mask[new_len:, cached_len + new_len :].masked_fill_(~visible[:, :count], hidden)
    return mask


def _score_packed(
    model,
    cache,
    context_len: int,
    first_token_log_probs,
    candidate_ids,
    batches,
    score: str,
    share_prefixes: bool = True,
    new_context_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    The candidates of each batch (`_packed_batches`) packed into one sequence, on the batch-1 context cache.

    Only the tokens whose next-token prediction is needed run (a candidate's last token predicts nothing, so a
    one-token candidate needs no forward at all), and with `share_prefixes` a token prefix that several candidates
    of the batch share runs once (`_candidate_trie`): tree attention, a 4D additive mask letting every packed token
    see the whole context and its own prefix only, position ids continuing the context by the depth in the
    candidate. The LM head and log-softmax run once per packed token; each candidate sums the log-probabilities
    along its own path (in float64, then rounded to float32). So nothing is padded and the context keys/values are
    never copied per candidate.

    `new_context_ids` (`[1, n]`): the context's last n tokens, not yet in `cache`. The first batch's forward then
    runs them first, stores them in `cache` (which ends holding exactly the context) and gives the first-token
    log-probabilities from the logits of the context's last token (`first_token_log_probs` is then None): one
    forward and one pass over the LM head's weights fewer per round.
    """
    device = model.device
    scores = torch.empty(len(candidate_ids), dtype=torch.float64, device=device)
    for rows in batches:
        groups = [candidate_ids[row] for row in rows]
        tokens, parents, depths, paths = _candidate_trie(groups, share_prefixes)
        new_len = 0 if new_context_ids is None else new_context_ids.shape[1]
        node_log_probs = None
        if tokens or new_len:
            cached_len = context_len - new_len
            ids = torch.tensor(tokens, dtype=torch.long, device=device)
            positions = context_len + torch.tensor(depths, dtype=torch.long, device=device)
            parents = torch.tensor(parents, dtype=torch.long, device=device)
            if new_len:
                ids = torch.cat([new_context_ids[0], ids])
                positions = torch.cat([torch.arange(cached_len, context_len, device=device), positions])
            outputs = model(
                input_ids=ids[None],
                attention_mask=_packed_mask(parents, max(depths, default=0), cached_len, new_len, model.dtype)[
                    None, None
                ],
                position_ids=positions[None],
                cache=cache if new_len else _expand_cache(cache, 1),
                use_cache=True,
                # the context's last token (when it runs here) and every node; int: the last that many positions
                logits_to_keep=len(tokens) + 1 if new_len else 0,
            )
            log_probs = torch.log_softmax(outputs.logits[0].float(), dim=-1)
            if new_len:
                if output_cache(outputs) is not cache or not _crop_cache(cache, context_len):
                    raise RuntimeError("The packed forward did not extend the context cache in place.")
                first_token_log_probs, log_probs = log_probs[0], log_probs[1:]
                new_context_ids = None
            node_log_probs = log_probs
        first = torch.tensor([ids[0] for ids in groups], device=device)
        totals = first_token_log_probs[first].double()
        if node_log_probs is not None and tokens:
            nodes = torch.tensor([node for path in paths for node in path], device=device)
            targets = torch.tensor([token for ids in groups for token in ids[1:]], device=device)
            owners = torch.tensor([row for row, path in enumerate(paths) for _ in path], device=device)
            totals = totals.index_add(0, owners, node_log_probs[nodes, targets].double())
        lengths = torch.tensor([len(ids) for ids in groups], device=device)
        scores[rows] = totals / lengths if score == "mean" else totals
    return scores.float().cpu()


def _packed_batches(
    model, context_len: int, candidate_ids, batch_size: int, share_prefixes: bool = False
) -> list[list[int]]:
    """
    Candidate indices cut into batches of at most `batch_size` whose packed tokens also fit the LM's
    `max_position_embeddings` after the context (the model's input checks count a forward's length after the cache
    against it, even though each packed candidate's positions restart at the context length).

    Without `share_prefixes` the candidates stay in order and a candidate packs its tokens but the last. With it,
    they are taken in the order of their token ids, so candidates with a common prefix land in one batch, and a
    candidate packs only the prefixes no earlier candidate of its batch has (the nodes `_candidate_trie` makes).
    """
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    room = limit - context_len if limit else None
    order = range(len(candidate_ids))
    if share_prefixes:
        order = sorted(order, key=candidate_ids.__getitem__)
    batches, current, tokens, prefixes = [], [], 0, set()
    for row in order:
        ids = candidate_ids[row]
        new = [tuple(ids[:end]) for end in range(1, len(ids))]
        if share_prefixes:
            new = [prefix for prefix in new if prefix not in prefixes]
        if current and (len(current) == batch_size or (room is not None and tokens + len(new) > room)):
            batches.append(current)
            current, tokens = [], 0
            prefixes.clear()
            new = [tuple(ids[:end]) for end in range(1, len(ids))]
        current.append(row)
        tokens += len(new)
        if share_prefixes:
            prefixes.update(new)
    if current:
        batches.append(current)
    return batches


def _crop_cache(cache, length: int) -> bool:
    """
    Cut every layer of `cache` back to its first `length` tokens; False (cache untouched) if a layer can't be: not
    a dynamic layer, or a sliding-window layer that has already dropped its oldest tokens.
    """
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            if layer.is_initialized and layer.keys.shape[-2] != layer.cumulative_length:
                return False
        elif type(layer) is not DynamicLayer:
            return False
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
            if type(layer) is DynamicSlidingWindowLayer:
                layer.cumulative_length = length
    return True


class DialogScorer:
    """
    Scores the rounds of one dialog on one growing KV cache: the image, caption and earlier rounds run once.

    Round t+1's context is round t's plus the ground-truth answer and the next question, so `score_round` runs only
    the tokens its context adds to the cached one (the longest common token prefix is kept; if the new context
    diverges inside it, the cache is cut back to the common prefix). The image is encoded only when the cache is
    (re)built: on the first round, or when the image inputs change, or when the part to run would contain image
    tokens. Candidates are then scored on the context cache without changing it: packed into one sequence per
    batch with a 4D attention mask where the decoder supports it (`_score_packed`; candidates taken in token order,
    a prefix several candidates of a batch share runs once, and when the cache was reused the context's new tokens
    run in the first batch's forward), otherwise in padded batches like `score_candidates_shared_prefix`.

    Args:
        model: an image-text-to-text model whose forward takes `cache`, `position_ids` and `logits_to_keep`.
        batch_size: candidates per forward pass.
        score: `"mean"` or `"sum"` of the candidate's token log-probabilities.
        packed: pack the candidates of a batch into one sequence when the model allows it (see `_can_pack`).
        share_prefixes: in packed batches, run a token prefix that several candidates share once (tree attention,
            `_candidate_trie`); False packs every candidate's tokens on their own. Same scores either way.

    Attributes (counters, for tests and benchmarks): `context_tokens_run` (context tokens that went through the
    LM), `image_encodings` (full context passes with the image inputs).
    """

    def __init__(
        self, model, batch_size: int = 50, score: str = "mean", packed: bool = True, share_prefixes: bool = True
    ):
        if score not in SCORE_TYPES:
            raise ValueError(f"score must be one of {SCORE_TYPES}, got {score!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of candidates, got {batch_size!r}")
        self.model, self.batch_size, self.score, self.packed = model, batch_size, score, packed
        self.share_prefixes = share_prefixes
        self.cache = None
        self.context_ids = None
        self.image_inputs = None
        self.context_tokens_run = 0
        self.image_encodings = 0

    def _reusable_length(self, inputs) -> int:
        """How many of the cached context tokens serve the new context (0: rebuild the cache with the image)."""
        if self.cache is None:
            return 0
        image_inputs = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        if image_inputs.keys() != self.image_inputs.keys() or not all(
            torch.equal(value, self.image_inputs[key]) for key, value in image_inputs.items()
        ):
            return 0
        new_ids, cached_ids = inputs["input_ids"][0], self.context_ids
        shared = min(len(new_ids), len(cached_ids))
        differs = (new_ids[:shared] != cached_ids[:shared]).nonzero()
        common = int(differs[0]) if len(differs) else shared
        keep = min(common, len(new_ids) - 1)  # at least one token runs: its logits score the first candidate token
        image_token_id = getattr(self.model.config, "image_token_id", None)
        if image_token_id is not None and bool((new_ids[keep:] == image_token_id).any()):
            return 0
        if keep < len(cached_ids) and not _crop_cache(self.cache, keep):
            return 0
        return keep

    def _ran_context(self, inputs, keep: int):
        """Book-keeping once the cache holds this round's context, `keep` tokens of it reused."""
        self.context_ids = inputs["input_ids"][0].clone()
        self.context_tokens_run += inputs["input_ids"].shape[1] - keep

    @torch.no_grad()
    def score_round(self, context_inputs, candidate_ids: list[list[int]], messages=None) -> torch.Tensor:
        """
        Scores of every candidate continuing this round's context (`build_context`, batch 1), float32 on the CPU
        in `candidate_ids` order, higher is better; equal to `score_candidates_shared_prefix` on the same inputs.
        `messages` (the round's chat messages) is accepted for the common scorer interface and not needed here.
        """
        _check_arguments(context_inputs, self.score)
        model = self.model
        inputs = context_inputs.to(model.device, model.dtype)
        if not bool(inputs["attention_mask"].all()):
            raise ValueError("The context of a round must have no padding (attention_mask all ones).")
        keep = self._reusable_length(inputs)
        context_len = inputs["input_ids"].shape[1]
        batches = packed_len = None
        if self.packed:
            batches = _packed_batches(model, context_len, candidate_ids, self.batch_size, self.share_prefixes)
            packed_len = max(
                (len(_candidate_trie([candidate_ids[r] for r in rows], self.share_prefixes)[0]) for rows in batches),
                default=0,
            )
        if keep and batches and _can_pack(model, self.cache, context_len - keep + packed_len):
            # The context's new tokens run in the first candidate batch's packed forward.
            scores = _score_packed(
                model,
                self.cache,
                context_len,
                None,
                candidate_ids,
                batches,
                self.score,
                self.share_prefixes,
                new_context_ids=inputs["input_ids"][:, keep:],
            )
            self._ran_context(inputs, keep)
            return scores
        if keep == 0:
            context = model(**inputs, use_cache=True, logits_to_keep=1)
            self.cache = output_cache(context)
            self.image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            self.image_encodings += 1
        else:
            context = model(
                input_ids=inputs["input_ids"][:, keep:],
                attention_mask=inputs["attention_mask"],
                position_ids=torch.arange(keep, context_len, device=model.device)[None],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self.cache = output_cache(context)
        self._ran_context(inputs, keep)
        first_token_log_probs = torch.log_softmax(context.logits[0, -1].float(), dim=-1)
        if batches is not None and _can_pack(model, self.cache, packed_len):
            return _score_packed(
                model,
                self.cache,
                context_len,
                first_token_log_probs,
                candidate_ids,
                batches,
                self.score,
                self.share_prefixes,
            )
        return _score_padded_batches(
            model,
            self.cache,
            inputs["attention_mask"],
            first_token_log_probs,
            candidate_ids,
            self.batch_size,
            self.score,
        )


@torch.no_grad()
def score_candidates_naive(
    model,
    context_inputs,
    candidate_ids: list[list[int]],
    batch_size: int = 50,
    score: str = "mean",
    full_logits: bool = False,
) -> torch.Tensor:
    """
    The released method: every candidate's full sequence (context + candidate) through the LM, right-padded in
    batches; the image is encoded once and its features reused. Same arguments and result as
    `score_candidates_shared_prefix`; `context_inputs` may only hold `input_ids`, `attention_mask`, `pixel_values`.

    `full_logits=True` is the released `test.py` exactly: the LM head runs at every position of every sequence and
    the candidate positions are sliced out afterwards. By default only the candidate positions reach the LM head
    (`logits_to_keep`), a stronger baseline with the same scores.
    """
    _check_arguments(context_inputs, score)
    unsupported = set(context_inputs) - {"input_ids", "attention_mask", "pixel_values"}
    if unsupported:
        raise ValueError(f"score_candidates_naive does not handle the context inputs {sorted(unsupported)}.")
    context_inputs = context_inputs.to(model.device, model.dtype)
    image_features = model.get_image_features(pixel_values=context_inputs["pixel_values"]).pooler_output
    context_ids, context_mask = context_inputs["input_ids"], context_inputs["attention_mask"]
    context_len = context_ids.shape[1]

    scores = []
    for start in range(0, len(candidate_ids), batch_size):
        ids, real = _pad_right(candidate_ids[start : start + batch_size], model.device)
        batch, length = ids.shape
        predicts_candidate = torch.zeros(batch, context_len + length, dtype=torch.bool, device=model.device)
        predicts_candidate[:, context_len - 1 : -1] = real
        outputs = model(
            input_ids=torch.cat([context_ids.expand(batch, -1), ids], dim=1),
            attention_mask=torch.cat([context_mask.expand(batch, -1), real.long()], dim=1),
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(image_features) * batch)},
            logits_to_keep=0 if full_logits else predicts_candidate,
        )
        logits = outputs.logits[predicts_candidate] if full_logits else outputs.logits
        log_probs = torch.zeros(batch, length, device=model.device)
        log_probs[real] = _token_log_probs(logits, ids[real])
        scores.append(_reduce(log_probs, real, score))
    return torch.cat(scores).cpu()


def _dense_relevance_by_image(dense_annotations: list[dict] | None) -> dict[int, tuple[int, list[float]]]:
    """`{image_id: (round_id, relevance)}` from VisDial dense annotations (`gt_relevance`, or train's `relevance`)."""
    relevance = {}
    for entry in dense_annotations or []:
        values = entry["gt_relevance"] if "gt_relevance" in entry else entry["relevance"]
        relevance[entry["image_id"]] = (entry["round_id"], values)
    return relevance


def evaluate_dialogs(
    model,
    processor,
    visdial_data: dict,
    images: Mapping | Callable,
    dense_annotations: list[dict] | None = None,
    score: str = "mean",
    batch_size: int = 50,
    progress: bool = True,
    scorer_factory: Callable | None = None,
    max_length: int | None = None,
    stats: dict | None = None,
) -> tuple[dict | None, list[dict]]:
    """
    Score and rank the candidates of every round of every dialog, then compute the VisDial metrics.

    Args:
        model, processor: an image-text-to-text model and its processor (with a chat template).
        visdial_data: the `data` field of a VisDial JSON file: `{"questions", "answers", "dialogs"}`, dialogs as
            `{"image_id", "caption", "dialog": [{"question", "answer", "gt_index", "answer_options"}]}` with
            indices into `questions`/`answers`. A round without `answer` (the last round of a test dialog) is
            ranked but not scored by the metrics, and dialogs continue with ground-truth answers only.
        images: `image_id -> PIL image`, a mapping or a callable.
        dense_annotations: the dense relevance file (one entry per dialog, any order), or None for no NDCG.
        score, batch_size: see `score_candidates_shared_prefix`. Each dialog runs on one growing KV cache
            (`DialogScorer`): the image, caption and earlier rounds go through the model once per dialog.
        progress: show a progress bar over rounds.
        scorer_factory: `dialog -> scorer` whose `score_round(context_inputs, candidate_ids, messages)` scores a
            round (e.g. `visdial_vllm.VLLMDialogScorer`); by default a `DialogScorer` on `model` per dialog. With a
            factory, `model` may be None.
        max_length: the positions a round may take, context and longest candidate together (default: the model's
            `max_position_embeddings`; None without a model means no limit). The dialog history follows
            `HISTORY_POLICY`: a round whose full history would not fit keeps the image, the caption and its most
            recent earlier rounds that fit; a round that does not fit even without history is a `ValueError`
            naming the dialog and round.
        stats: a dict that receives `rounds_with_cut_history` (rounds whose oldest history rounds were left out)
            and `max_length`.

    The model (if any) runs in eval mode and is put back in its previous mode at the end.

    Returns:
        `(metrics, ranks)`: `metrics` is `visdial_metrics`' dict of fractions (r@1, r@5, r@10, mrr, mean_rank,
        ndcg), None if no round has a ground truth; `ranks` is the official submission list
        `[{"image_id", "round_id" (1-based), "ranks": [1-based rank of each answer option]}]`, one per round.
    """
    load_image = images.__getitem__ if isinstance(images, Mapping) else images
    questions, answers = visdial_data["questions"], visdial_data["answers"]
    dialogs = visdial_data["dialogs"]
    relevance_by_image = _dense_relevance_by_image(dense_annotations)
    if scorer_factory is None:
        scorer_factory = lambda dialog: DialogScorer(model, batch_size, score)  # noqa: E731
    was_training = model is not None and model.training
    if model is not None:
        model.eval()

    if max_length is None and model is not None:
        max_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    cut_rounds = 0

    ranks, predictions, references, relevance = [], [], [], []
    bar = tqdm(total=sum(len(d["dialog"]) for d in dialogs), desc="VisDial rounds", unit="round", disable=not progress)
    for dialog in dialogs:
        image = load_image(dialog["image_id"])
        dense_round, dense_values = relevance_by_image.get(dialog["image_id"], (None, None))
        history = []
        scorer = scorer_factory(dialog)
        for round_index, visdial_round in enumerate(dialog["dialog"]):
            question = visdial_round_question(questions[visdial_round["question"]])
            candidates = [answers[index] for index in visdial_round["answer_options"]]
            candidate_ids = tokenize_candidates(processor.tokenizer, candidates)
            room = None if max_length is None else max_length - max(len(ids) for ids in candidate_ids)
            kept = len(history)
            while True:  # HISTORY_POLICY: the caption and the most recent rounds that fit
                messages = dialog_messages(image, dialog["caption"], history[len(history) - kept :], question)
                context_inputs = build_context(processor, messages)
                if room is None or context_inputs["input_ids"].shape[1] <= room:
                    break
                if not kept:
                    raise ValueError(
                        f"VisDial image {dialog['image_id']} round {round_index + 1}: the image, caption and question "
                        f"take {context_inputs['input_ids'].shape[1]} positions and its longest answer option "
                        f"{max_length - room}, more than the model's {max_length} even with no earlier round."
                    )
                kept -= 1
            cut_rounds += kept < len(history)
            scores = scorer.score_round(context_inputs, candidate_ids, messages)
            round_ranks = visdial_metric.scores_to_ranks(scores.double().numpy())
            ranks.append({"image_id": dialog["image_id"], "round_id": round_index + 1, "ranks": round_ranks.tolist()})
            if "gt_index" in visdial_round:
                predictions.append(scores.double().tolist())
                references.append(visdial_round["gt_index"])
                relevance.append(dense_values if dense_round == round_index + 1 else [])
            if "answer" in visdial_round:
                history.append((question, answers[visdial_round["answer"]]))
            bar.update()
    bar.close()
    if model is not None:
        model.train(was_training)

    if stats is not None:
        stats.update(rounds_with_cut_history=cut_rounds, max_length=max_length)
    metrics = visdial_metric.visdial_metrics(predictions, references, relevance) if predictions else None
    return metrics, ranks
