"""The logic of the browser chat demo (`examples/chat_demo.py`): gradio's chat history to the model's chat messages,
the generation settings, streamed replies, and the gradio app around them.

Not part of the remote code shipped in saved folders. Only `build_app` imports gradio (the `[demo]` extra); the rest
needs torch and transformers alone, so it is tested without a browser.

    from modeling_omnifusion.chat_demo import history_to_messages, stream_reply
    messages = history_to_messages(gradio_history, {"text": "What is it?", "files": ["cat.png"]})
    for text_so_far in stream_reply(model, processor, messages, max_new_tokens=50):
        print(text_so_far)
"""

from __future__ import annotations

import mimetypes
import os
import threading
from collections.abc import Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

# The kinds of file a chat turn may hold, by MIME type (then by file suffix where the type is unknown). A kind becomes
# the chat content item {"type": kind, "path": file}; `supported_media` says which kinds a model takes.
MEDIA_KINDS = ("image", "audio", "video")
MEDIA_SUFFIXES = {
    "image": {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"},
    "audio": {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"},
    "video": {".mp4", ".webm", ".mov", ".avi", ".mkv"},
}
ROLES = ("system", "user", "assistant")

DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 1024
BEAM_NOTE = (
    "Replies are streamed with one beam (greedy, or sampling when the temperature is above 0): transformers' "
    "streamers refuse beam search, so this model's `num_beams={num_beams}` from its generation config is not used."
)


def media_kind(path: str | os.PathLike) -> str:
    """ "image", "audio" or "video" for a file, by its MIME type or suffix; a `ValueError` naming it otherwise."""
    mime, _ = mimetypes.guess_type(os.fspath(path))
    kind = (mime or "").split("/", 1)[0]
    if kind in MEDIA_KINDS:
        return kind
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    for kind, suffixes in MEDIA_SUFFIXES.items():
        if suffix in suffixes:
            return kind
    raise ValueError(f"{os.path.basename(path)!r} is not an image, sound or video file (type {mime or 'unknown'})")


def supported_media(processor) -> tuple[str, ...]:
    """The kinds of file the processor's model takes: images always, sound when it has an audio feature extractor,
    video when it has a video preprocessor."""
    kinds = ["image"]
    if getattr(processor, "feature_extractor", None) is not None:
        kinds.append("audio")
    if getattr(processor, "video_preprocessor", None) is not None:
        kinds.append("video")
    return tuple(kinds)


def _file_path(part) -> str | None:
    """The path of a file item in any of gradio's shapes (`{"type": "file", "file": {"path": ...}}`,
    `{"path": ...}`, `{"file": "..."}`, a `(path, alt_text)` tuple), or `None` for a text item."""
    if isinstance(part, (tuple, list)):
        return os.fspath(part[0]) if part else None
    if isinstance(part, dict):
        file = part.get("file", part if "path" in part else None)
        if isinstance(file, dict):
            return file.get("path")
        if isinstance(file, (str, os.PathLike)):
            return os.fspath(file)
    return None


def _content_items(content, media: Sequence[str], where: str) -> tuple[list[dict], list[str]]:
    """A gradio message's content as (media items, texts)."""
    if isinstance(content, str) or content is None:
        return [], [content or ""]
    parts = content if isinstance(content, list) else [content]
    items, texts = [], []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(part.get("text") or "")
        elif (path := _file_path(part)) is not None:
            kind = media_kind(path)
            if kind not in media:
                raise ValueError(
                    f"{where}: {os.path.basename(path)!r} is a{'n' if kind[0] in 'aeiou' else ''} {kind} file; this "
                    f"model takes {', '.join(media)} files"
                )
            items.append({"type": kind, "path": path})
        else:
            raise TypeError(f"{where}: expected text or a file in the message content, got {part!r}")
    return items, texts


def history_to_messages(
    history: Sequence[dict], message: dict | str | None = None, media: Sequence[str] = ("image",)
) -> list[dict]:
    """
    The chat messages for `processor.apply_chat_template` from gradio's chat `history` (a list of `{"role",
    "content"}` dicts; content is a string or a list of `{"type": "text", "text"}` and `{"type": "file", "file":
    {"path"}}` items, as `gr.ChatInterface` passes it) and the new `message` (`gr.MultimodalTextbox`'s value,
    `{"text": str, "files": [path or {"path"}]}`, or a string).

    Every file stays in the turn it was sent in, as `{"type": kind, "path": file}` ahead of that turn's text (the
    order the chat template renders). Consecutive messages of one role (no reply between them) become one turn, their
    texts joined by a newline. Assistant turns keep their text only. A file whose kind is not in `media` is a
    `ValueError` naming it and its message; an empty new message (no text, no file) is a `ValueError`.
    """
    entries = list(history)
    new_index = len(entries)
    if message is not None:
        if isinstance(message, str):
            message = {"text": message, "files": []}
        files = [{"type": "file", "file": {"path": _file_path(file) or file}} for file in message.get("files") or []]
        text = message.get("text") or ""
        if not files and not text.strip():
            raise ValueError("the new message is empty: type a question or attach a file")
        entries.append({"role": "user", "content": files + ([{"type": "text", "text": text}] if text else [])})
    messages: list[dict] = []
    for index, entry in enumerate(entries):
        role = entry.get("role") if isinstance(entry, dict) else None
        if role not in ROLES:
            raise ValueError(f"history[{index}]: expected a role in {ROLES}, got {role!r}")
        where = "the new message" if index == new_index else f"history[{index}]"
        items, texts = _content_items(entry.get("content"), media, where)
        if role == "assistant":
            items = []
        if messages and messages[-1]["role"] == role and role != "system":
            previous = messages[-1]["content"]
            previous_items = [item for item in previous if item["type"] != "text"]
            previous_texts = [item["text"] for item in previous if item["type"] == "text"]
            items, texts = previous_items + items, previous_texts + texts
            messages.pop()
        text = "\n".join(text for text in texts if text)
        messages.append({"role": role, "content": items + [{"type": "text", "text": text}]})
    return messages


def generation_settings(
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0
) -> dict:
    """`generate()` keyword arguments for one streamed reply: greedy at temperature 0, sampling above it; always
    one beam (transformers' streamers refuse beam search)."""
    if int(max_new_tokens) != max_new_tokens or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be 0 (greedy) or more (sampling), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    settings = {"max_new_tokens": int(max_new_tokens), "num_beams": 1}
    if temperature > 0:
        settings.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return settings


class _StopOnEvent(StoppingCriteria):
    """Ends `generate()` at the next token once `event` is set (the stop button, or the reader going away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(model, processor, messages: list[dict], **settings) -> Iterator[str]:
    """
    The reply to `messages` as it grows: yields the whole text so far after each new piece, and at least once.
    `settings` are `generation_settings`' arguments (checked before anything runs). `generate()` runs in a thread
    feeding a `TextIteratorStreamer`, which hands on whole words (text up to a space or a line break) and the rest at
    the end; closing the iterator (gradio's stop button) ends that thread at its next token. An error in
    `generate()` is raised here.
    """
    kwargs = generation_settings(**settings)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run():
        try:
            model.generate(
                **inputs,
                **kwargs,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
            )
        except BaseException as error:  # raised in the reader's thread below
            failure.append(error)
            streamer.end()

    thread = threading.Thread(target=run, name="omnifusion-generate", daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            if piece:
                text += piece
                yield text
        thread.join()
        if failure:
            raise failure[0]
        if not text:
            yield text
    finally:
        stop.set()
        thread.join()


def beam_note(model) -> str | None:
    """What streaming does with a generation config that asks for beam search (`None` when it asks for one beam)."""
    num_beams = getattr(model.generation_config, "num_beams", 1) or 1
    return BEAM_NOTE.format(num_beams=num_beams) if num_beams > 1 else None


def build_app(model, processor, model_name: str | None = None):
    """The gradio app: a multimodal chat (files of the kinds `supported_media` gives), streamed replies, a stop
    button and the generation settings; `model_name` is shown under the title. The chat function's API name is
    `chat`."""
    import gradio as gr

    media = supported_media(processor)
    notes = [f"Model: `{model_name}` ({model.dtype})."] if model_name else []
    notes.append(f"Attach {', '.join(media)} files with the paperclip; they stay in the conversation.")
    if note := beam_note(model):
        notes.append(note)

    def chat(message, history, max_new_tokens, temperature, top_p):
        settings = {"max_new_tokens": int(max_new_tokens), "temperature": temperature, "top_p": top_p}
        try:
            messages = history_to_messages(history, message, media)
            generation_settings(**settings)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from error
        yield from stream_reply(model, processor, messages, **settings)

    sources = ["upload", "microphone"] if "audio" in media else ["upload"]
    textbox = gr.MultimodalTextbox(
        file_types=list(media), file_count="multiple", sources=sources, placeholder="Ask about an image"
    )
    return gr.ChatInterface(
        chat,
        multimodal=True,
        textbox=textbox,
        chatbot=gr.Chatbot(label="OmniFusion", buttons=["copy"], height=520),
        additional_inputs=[
            gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"),
            gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)"),
            gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (sampling only)"),
        ],
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        title="OmniFusion chat",
        description="\n\n".join(notes),
        api_name="chat",
        concurrency_limit=1,
    )
