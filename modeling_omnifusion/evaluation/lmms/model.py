"""
`lmms-eval --model omnifusion`: any OmniFusion folder or Hub id as an lmms-eval chat model.

    lmms-eval --model omnifusion --model_args pretrained=path/to/omnifusion,dtype=auto --tasks pope_local \
        --include_path "$(python -m modeling_omnifusion.evaluation.lmms)" --batch_size 8

The model and processor load with `AutoModelForImageTextToText` / `AutoProcessor` and `trust_remote_code=True`;
every prompt is rendered by the processor's own chat template (the released prompt layout).

- `generate_until`: chat requests (`doc_to_messages`) and those of Python task classes (`doc_to_visual` and the
  context text), in batches of `batch_size` (left-padded), greedy unless the task asks for a temperature,
  cut at the task's `until` strings.
- `generate_until_multi_round`: lmms-eval's round protocol (`doc_to_messages(doc, round_idx=..., previous_output=...)`);
  each round's user turn is appended to the conversation so far, with the model's earlier answers as assistant turns.
- `loglikelihood`: requests `(context, continuation, visuals_or_messages, doc_id, task, split[, score])`, where the
  third item is a callable on the doc giving either its visuals (the context text becomes the user turn after them)
  or a whole chat ending with a user turn; the continuation is scored as the assistant's reply after the generation
  prompt. The continuations of one context are scored together on one KV cache by the VisDial shared-prefix scorer
  (`visdial_scoring.DialogScorer`), and a context that extends the previous one (a dialog's next round) reuses its
  cache. `score` is `"sum"` (lmms-eval's convention, the default) or `"mean"` of the token log-probabilities
  (float32). The greedy flag is not computed (`None`): the scorer yields scores only.

Media: images (PIL images or paths); sound for models with an audio tower (HF `Audio` dicts with `array` and
`sampling_rate`, arrays at the processor's rate, or file paths); videos (paths, or frames) where the model has video,
else a `ValueError` (`video_content` is the one place that turns an lmms-eval video item into chat content).
"""

import os
from collections.abc import Callable

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ...inference import DTYPE_CHOICES, resolve_dtype
from ...processing.audio_inputs_omnifusion import to_waveform
from ..visdial_scoring import SCORE_TYPES, DialogScorer, build_context, tokenize_candidates

DEFAULT_MAX_NEW_TOKENS = 128
AUDIO_FILES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


def _same_content(left, right) -> bool:
    """Whether two chat content items are equal (images by pixels, sound by samples)."""
    if left.keys() != right.keys():
        return False
    for key, value in left.items():
        other = right[key]
        if isinstance(value, np.ndarray) or isinstance(other, np.ndarray):
            if not (isinstance(value, np.ndarray) and isinstance(other, np.ndarray) and np.array_equal(value, other)):
                return False
        elif value is not other and value != other:
            return False
    return True


def chat_continues(previous: list[dict] | None, chat: list[dict]) -> bool:
    """Whether `chat` starts with every message of `previous` (the next round of the same conversation)."""
    if previous is None or len(previous) > len(chat):
        return False
    for old, new in zip(previous, chat):
        if old["role"] != new["role"] or len(old["content"]) != len(new["content"]):
            return False
        if not all(_same_content(a, b) for a, b in zip(old["content"], new["content"])):
            return False
    return True


class OmniFusionLMMs(lmms):
    """
    The lmms-eval chat model for OmniFusion.

    Args (`--model_args key=value,...`; `batch_size` and `device` also come from lmms-eval's own flags):
        pretrained: model folder or Hub id.
        device: `cuda` when available, else `cpu`, by default.
        dtype: one of `inference.DTYPE_CHOICES` (`auto`: bfloat16 on CPUs with native bfloat16, and on CUDA).
        batch_size: requests per `generate` call.
        candidate_batch_size: continuations per forward pass in `loglikelihood`.
        max_new_tokens: the cap when a task sets none.
        attn_implementation: passed to `from_pretrained` (`sdpa` packs loglikelihood candidates; see
            `visdial_scoring`).
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        candidate_batch_size: int | str = 50,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        attn_implementation: str | None = None,
        max_batch_size: int | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"omnifusion: unknown --model_args {sorted(unknown)}")
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"omnifusion: dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load_kwargs = {"trust_remote_code": True, "dtype": resolve_dtype(dtype, self._device)}
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.processor.tokenizer.padding_side = "left"
        self.batch_size_per_call = self._positive("batch_size", batch_size)
        self.candidate_batch_size = self._positive("candidate_batch_size", candidate_batch_size)
        self.max_new_tokens = self._positive("max_new_tokens", max_new_tokens)
        self.has_audio = getattr(self.processor, "audio_preprocessor", None) is not None
        self.has_video = getattr(self.processor, "video_preprocessor", None) is not None

    @staticmethod
    def _positive(name: str, value) -> int:
        number = int(value)
        if number < 1:
            raise ValueError(f"omnifusion: {name} must be a positive integer, got {value!r}")
        return number

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_call

    # ---- lmms-eval messages -> the processor's chat

    def video_content(self, item: dict) -> list[dict]:
        """The chat content for an lmms-eval video item: a file path or URL (decoded by the processor with PyAV), or
        decoded frames (an array, a tensor or a list of images); a model without video refuses it."""
        payload = item.get("url", item.get("video"))
        if not self.has_video:
            raise ValueError(
                f"omnifusion: this model takes images and{'' if self.has_audio else ' no'} sound, not video "
                f"(got a video item {str(payload)[:80]!r})"
            )
        if isinstance(payload, (str, os.PathLike)):
            return [{"type": "video", "path": os.fspath(payload)}]
        if payload is None:
            raise ValueError("omnifusion: a video item holds neither a path nor frames")
        return [{"type": "video", "video": payload}]

    def _sound(self, source) -> dict:
        if not self.has_audio:
            raise ValueError("omnifusion: this model has no audio tower; the task gives sound")
        rate = self.processor.audio_preprocessor.sampling_rate
        if isinstance(source, dict):
            waveform = to_waveform(source["array"], "audio", source["sampling_rate"], rate)
            return {"type": "audio", "audio": waveform}
        if isinstance(source, str):
            return {"type": "audio", "path": source}
        return {"type": "audio", "audio": to_waveform(source, "audio", rate, rate)}

    def _content(self, item: dict) -> list[dict]:
        kind = item.get("type")
        payload = item.get("url", item.get(kind))
        if kind == "text":
            return [{"type": "text", "text": item["text"]}]
        if isinstance(payload, dict) and "array" in payload and "sampling_rate" in payload:
            return [self._sound(payload)]  # lmms-eval types HF Audio dicts as "video"
        if kind == "image":
            if isinstance(payload, str):
                with Image.open(payload) as image:
                    payload = image.convert("RGB")
            if not isinstance(payload, Image.Image):
                raise TypeError(f"omnifusion: an image item must be a PIL image or a path, got {type(payload)}")
            return [{"type": "image", "image": payload}]
        if kind == "audio":
            return [self._sound(payload)]
        if kind == "video":
            return self.video_content(item)
        raise ValueError(f"omnifusion: unknown content type {kind!r} in a task's messages")

    def to_chat(self, messages) -> list[dict]:
        """lmms-eval chat messages (`ChatMessages` dicts, media under `url`) as the processor's chat."""
        chat = []
        for message in messages:
            if hasattr(message, "model_dump"):
                message = message.model_dump()
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            chat.append({"role": message["role"], "content": [part for c in content for part in self._content(c)]})
        return chat

    # ---- generation

    def _generate(self, chats: list[list[dict]], gen_kwargs: dict) -> list[str]:
        inputs = self.processor.apply_chat_template(
            chats,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        ).to(self.device, self.model.dtype)
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0)
        settings = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": temperature > 0,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            settings.update(temperature=temperature, top_p=gen_kwargs.get("top_p") or 1.0)
        with torch.no_grad():
            output = self.model.generate(**inputs, **settings)
        texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = []
        for text in texts:
            for stop in until:
                if stop:
                    text = text.split(stop, 1)[0]
            answers.append(text)
        return answers

    def _generation_request(self, request: Instance) -> tuple[list[dict], dict]:
        """The chat and generation settings of a `generate_until` request: a chat task's
        `(context, doc_to_messages, settings, doc_id, task, split)` or a Python task class's
        `(context, settings, doc_to_visual, doc_id, task, split)` (the context text after the doc's visuals)."""
        context, second, third, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        if isinstance(second, dict):
            return self._context_chat(context, third, doc), second
        return self.to_chat(second(doc)), third

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        prepared = [self._generation_request(request) for request in requests]
        results = [None] * len(requests)
        by_settings: dict[str, list[int]] = {}
        for index, (_, settings) in enumerate(prepared):
            by_settings.setdefault(repr(sorted(settings.items())), []).append(index)
        bar = tqdm(total=len(requests), desc="omnifusion generate", disable=self.rank != 0)
        for indices in by_settings.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                answers = self._generate([prepared[index][0] for index in batch], prepared[batch[0]][1])
                for index, answer in zip(batch, answers):
                    results[index] = GenerationResult(text=answer)
                bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        results = []
        for request in tqdm(requests, desc="omnifusion multi-round", disable=self.rank != 0):
            _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            chat = self.to_chat(doc_to_messages(doc))
            answers, info = [], None
            while True:
                answer = self._generate([chat], gen_kwargs)[0]
                answers.append(answer)
                payload = doc_to_messages(
                    doc, round_idx=len(answers), previous_output=list(answers), previous_round_info=info
                )
                if not (isinstance(payload, tuple) and len(payload) == 4):
                    break
                messages, terminal, _, info = payload
                if terminal or not messages:
                    break
                chat = chat + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
                chat = chat + self.to_chat(messages)
            results.append(answers)
        return results

    # ---- log-likelihood

    def _context_chat(self, context: str, source: Callable | None, doc) -> list[dict]:
        given = source(doc) if callable(source) else source
        if given and isinstance(given, (list, tuple)) and isinstance(given[0], dict) and "role" in given[0]:
            return self.to_chat(given)
        content = [{"type": "text", "text": context}]
        return self.to_chat([{"role": "user", "content": [*self._visual_items(given or []), *content]}])

    @staticmethod
    def _visual_items(visuals) -> list[dict]:
        items = []
        for visual in visuals:
            sound = isinstance(visual, dict) or (isinstance(visual, str) and visual.lower().endswith(AUDIO_FILES))
            items.append({"type": "audio" if sound else "image", "url": visual})
        return items

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """`(score, None)` per request, each wrapped in a `GenerationResult`: lmms-eval 0.7.3 passes a
        `GenerationResult`'s `text` on as it is and turns any other non-string output into its `str()`."""
        groups: dict[tuple, list[int]] = {}
        continuations = []
        for index, request in enumerate(requests):
            context, continuation, source, doc_id, task, split, *rest = request.args
            score = rest[0] if rest else "sum"
            if score not in SCORE_TYPES:
                raise ValueError(f"omnifusion: loglikelihood score must be one of {SCORE_TYPES}, got {score!r}")
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            continuations.append(continuation)
            groups.setdefault((task, split, doc_id, context, score), []).append(index)

        results = [None] * len(requests)
        scorer, previous_chat = None, None
        for (task, split, doc_id, context, score), indices in tqdm(
            groups.items(), desc="omnifusion loglikelihood", disable=self.rank != 0
        ):
            doc = self.task_dict[task][split][doc_id]
            chat = self._context_chat(context, requests[indices[0]].args[2], doc)
            if scorer is None or scorer.score != score or not chat_continues(previous_chat, chat):
                scorer = DialogScorer(self.model, self.candidate_batch_size, score)
            candidate_ids = tokenize_candidates(self.tokenizer, [continuations[index] for index in indices])
            scores = scorer.score_round(build_context(self.processor, chat), candidate_ids)
            for index, value in zip(indices, scores.tolist()):
                results[index] = GenerationResult(text=(value, None))
            previous_chat = chat
        return results
