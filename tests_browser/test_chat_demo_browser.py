"""
The chat demo (`examples/chat_demo.py`) in a real browser: Debian's chromium driven by playwright (no browser
download). A tiny OmniFusion saved here (its generation config asks for 3 beams, like a converted release) is served
on 127.0.0.1 on a free port; the browser sets the generation settings, uploads an image, asks a question and watches
the reply stream in; the reply (read through the page's copy button, so the markdown rendering does not change it)
equals HF `generate`'s greedy text for the same chat; a second, text-only turn (the image kept in the history)
equals `generate` on the two-turn chat. A model with sound takes a WAV clip the same way. The pages are saved as
screenshots, and each server is stopped by its PID.

Run in a venv with the project's `[demo,audio]` extras, pytest and playwright, where /usr/bin/chromium exists
(`.ci/tier_browser.sh` makes both): `pytest tests_browser -q`. The screenshot goes to `$OMNIFUSION_BROWSER_ARTIFACTS`
(default: the test's temporary folder); its path is printed.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch
from playwright.sync_api import expect, sync_playwright
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_omnifusion.testing import served
from modeling_omnifusion.testing.tiny import (
    make_audio_model_and_processor,
    make_clip,
    make_image,
    make_model_and_processor,
)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("OMNIFUSION_CHROMIUM", "/usr/bin/chromium")
MAX_NEW_TOKENS = 24
QUESTIONS = ("What is in the image?", "What colour is it?")
SERVER_START_SECONDS = 300
PAGE_TIMEOUT_MS = 120_000

# Records every text the last reply bubble shows, so that the test sees the reply grow.
WATCH_REPLIES = """() => {
    window.shownReplies = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('[data-testid=bot]');
        if (!bots.length) return;
        const shown = [bots.length, bots[bots.length - 1].innerText];
        const last = window.shownReplies[window.shownReplies.length - 1];
        if (!last || last[0] !== shown[0] || last[1] !== shown[1]) window.shownReplies.push(shown);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
IDLE_WITH_REPLIES = """(count) => document.querySelectorAll('[data-testid=bot]').length === count
    && !document.querySelector('button[aria-label=Stop]')
    && document.querySelector('button[data-testid=submit-button]') !== null"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A tiny OmniFusion folder whose generation config asks for 3 beams, and a PNG image."""
    root = tmp_path_factory.mktemp("chat-demo")
    model, processor = make_model_and_processor(seed=0)
    model.generation_config.num_beams = 3
    folder = root / "omnifusion"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = root / "shapes.png"
    make_image(seed=1, size=64).save(image)
    return {"folder": folder, "image": image, "root": root}


@contextlib.contextmanager
def demo_server(folder: Path, root: Path):
    """`examples/chat_demo.py --model folder` on a free port of 127.0.0.1, yielding its URL once it answers; stopped
    by its PID with SIGTERM, after which the port must be closed."""
    port = served.free_port()
    log = root / f"server-{folder.name}.log"
    command = [sys.executable, str(ROOT / "examples" / "chat_demo.py"), "--model", str(folder)]
    command += ["--port", str(port), "--dtype", "float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    url = f"http://127.0.0.1:{port}/"
    timing = dict(start_seconds=SERVER_START_SECONDS, poll_seconds=1, stop_seconds=30)
    with served.serving(command, log, url, "demo", "answer", **timing, stdin=subprocess.DEVNULL, env=env, cwd=root):
        yield url


@contextlib.contextmanager
def chat_page(url: str):
    """A chromium page on the demo, allowed to read the clipboard, with the reply watcher installed."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 1000})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector("textarea")
            page.evaluate(WATCH_REPLIES)
            yield page
        finally:
            browser.close()


def set_max_new_tokens(page, value: int) -> None:
    """Open the settings and type `value` into the slider's number field until the field holds it: typed while the
    accordion is still opening, a value can be put back to the default by the slider's first render, so it is typed
    again (at most 10 times) when the field does not read `value` within a second. That the reply then has exactly
    `value` tokens is checked by the tests against `generate`."""
    page.click("text=Generation settings")
    field = page.locator("input[aria-label='number input for Max new tokens']")
    field.wait_for(state="visible")
    for _ in range(10):
        field.fill(str(value))
        field.press("Enter")
        try:
            expect(field).to_have_value(str(value), timeout=1000)
            return
        except AssertionError:
            continue
    expect(field).to_have_value(str(value))


def greedy_text(folder: Path, messages: list[dict]) -> str:
    """HF `generate`'s greedy reply (one beam) to `messages`, from the saved folder in float32."""
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def artifacts_dir(saved) -> Path:
    folder = Path(os.environ.get("OMNIFUSION_BROWSER_ARTIFACTS") or saved["root"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def send_and_read_reply(page, text: str, reply_number: int) -> tuple[str, list[str]]:
    """Types `text`, sends it, waits for the reply to end; returns the reply's text (from the copy button) and the
    texts its bubble showed while it grew."""
    page.fill("textarea", text)
    page.click("button[data-testid=submit-button]")
    page.wait_for_function(IDLE_WITH_REPLIES, arg=reply_number, timeout=PAGE_TIMEOUT_MS)
    page.locator("button[aria-label='Copy message']").nth(reply_number - 1).click()
    reply = page.evaluate("navigator.clipboard.readText()")
    shown = [text for number, text in page.evaluate("window.shownReplies") if number == reply_number and text]
    return reply, shown


def test_chat_demo_streams_generate_greedy_text_in_the_browser(saved):
    folder, image = saved["folder"], saved["image"]
    first_chat = [
        {"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": QUESTIONS[0]}]}
    ]
    expected_first = greedy_text(folder, first_chat)
    assert expected_first.strip(), "the tiny model's greedy reply is empty: pick another seed"
    screenshot = artifacts_dir(saved) / "chat_demo.png"

    with demo_server(folder, saved["root"]) as url, chat_page(url) as page:
        # the streamed reply uses one beam, and the page says so for a folder that asks for 3
        assert "num_beams=3" in page.inner_text("body")
        set_max_new_tokens(page, MAX_NEW_TOKENS)
        page.set_input_files("input[data-testid=file-upload]", str(image))
        page.wait_for_selector("button[data-testid=submit-button]:not([disabled])")
        first, shown = send_and_read_reply(page, QUESTIONS[0], 1)
        assert first == expected_first
        # streamed: the bubble showed the reply growing (TextIteratorStreamer sends whole words: this reply has
        # spaces and line breaks; the second has none, so it arrives in one piece)
        assert len(set(shown)) >= 3, shown

        second, _ = send_and_read_reply(page, QUESTIONS[1], 2)
        assert page.locator("[data-testid=user] img").count() == 1  # the image stays in the history
        page.screenshot(path=str(screenshot), full_page=True)
    print(f"\nscreenshot: {screenshot}")

    second_chat = first_chat + [
        {"role": "assistant", "content": [{"type": "text", "text": first}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]},
    ]
    assert second == greedy_text(folder, second_chat)


def test_chat_demo_takes_a_sound_clip_for_a_model_with_sound(saved):
    """A model with an audio tower: the page offers sound files, and a WAV uploaded with a question gets
    `generate`'s greedy reply."""
    root = saved["root"]
    model, processor = make_audio_model_and_processor(seed=3)
    folder = root / "omnifusion-audio"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    clip = root / "question.wav"
    soundfile.write(clip, make_clip(seed=2, seconds=0.5), 16000)
    chat = [{"role": "user", "content": [{"type": "audio", "path": str(clip)}, {"type": "text", "text": "Answer."}]}]
    expected = greedy_text(folder, chat)

    with demo_server(folder, root) as url, chat_page(url) as page:
        assert "Attach image, audio files" in page.inner_text("body")
        set_max_new_tokens(page, MAX_NEW_TOKENS)
        page.set_input_files("input[data-testid=file-upload]", str(clip))
        page.wait_for_selector("button[data-testid=submit-button]:not([disabled])")
        reply, _ = send_and_read_reply(page, "Answer.", 1)
        page.screenshot(path=str(artifacts_dir(saved) / "chat_demo_sound.png"), full_page=True)
    assert reply == expected
