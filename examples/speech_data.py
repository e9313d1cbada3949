"""
The audio demo's speech data (`audio_demo.py`): real human recordings to evaluate on, synthetic speech to train on.

Real speech (held out, never trained on) is Debian's `asterisk-core-sounds-en-wav` (CC-BY-SA-3.0: 568 prompts recorded
by one female speaker, 16-bit mono 8 kHz WAV) with `asterisk-core-sounds-en`, whose `core-sounds-en.txt` index says
what each file says:

    apt-get install -y --no-install-recommends asterisk-core-sounds-en-wav asterisk-core-sounds-en espeak-ng flite

- `real_digit_clips()`: the spoken digits `digits/0` ... `digits/9` (digit accuracy);
- `real_phrase_clips(count, seed)`: English prompts of at least `min_words` words and at most `max_seconds`, with
  their transcripts from the index (word error rate); a seeded sample of them when `count` is given.

Synthetic speech (training) is spoken by two engines: espeak-ng (GPL-3, Debian's `espeak-ng`), a formant synthesiser, in
several English voices, speeds and pitches (`VOICES`, `SPEEDS`, `PITCHES`), and, for a share of the clips
(`flite_share`), flite (BSD-like, Debian's `flite`), whose voices are built from recordings of four human speakers
(`FLITE_VOICES`, at several speeds and pitches). They speak single digits, digit strings, the index's phrases minus
every phrase held out for evaluation (`training_phrases`, compared after normalisation, so no held-out sentence is ever
spoken in training), and strings of those phrases' words in random order (`shuffled_words`). `write_synthetic_clips`
writes them as 16 kHz mono 16-bit WAV files; the same seed gives the same texts, engines, voices and files.
`write_records` writes LLaVA-style JSON records with an `"audio"` field.

Every clip read for a model is 16 kHz mono float32 (`read_clip`: soundfile + soxr, the `[audio]` extra).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from modeling_omnifusion.evaluation.speech import UNITS, normalize_words

SAMPLING_RATE = 16000
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en")
ASTERISK_INDEX = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
APT_HINT = (
    "apt-get install -y --no-install-recommends asterisk-core-sounds-en-wav asterisk-core-sounds-en espeak-ng flite"
)
# Index sections that are not prompts: single words and letters read for spelling, and silences.
NOT_PHRASES = ("digits/", "letters/", "phonetic/", "silence/")

# A transcript of speech only: words, numbers and punctuation, no sound description (`[beep]`, `<beep ascending>`),
# index note (`IAX (note: does not say "2")`) or key symbol (`*`, `#`) whose reading is ambiguous.
SPOKEN_TEXT = re.compile(r"[A-Za-z0-9 .,?!'\-:;\"]+")

VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+f2", "en-gb-scotland", "en-us+m3", "en-029+f4", "en-gb-x-rp+m7")
SPEEDS = (130, 150, 170, 190)
PITCHES = (35, 50, 65)
# flite's four English voices built from human recordings (CMU ARCTIC: US female, US male, Scottish male; CMU's kal
# diphones), each with the mean pitches (Hz) it is spoken at, and the duration stretches (1.0 is the voice's own rate).
FLITE_VOICES = {"slt": (150, 170, 190), "rms": (90, 105, 120), "awb": (100, 115, 130), "kal16": (95, 110, 125)}
FLITE_STRETCHES = (0.85, 1.0, 1.15, 1.3)
TRANSCRIBE_PROMPT = "<audio>\nTranscribe the audio."


@dataclass(frozen=True)
class Clip:
    """One recording: `name` (unique, e.g. `digits/7`), its WAV `path` and the `text` it says."""

    name: str
    path: str
    text: str


def _require(path: Path, package: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: it comes with Debian's {package} package. Install: {APT_HINT}")
    return path


def asterisk_index() -> dict[str, str]:
    """Every entry of `core-sounds-en.txt`: sound name (`digits/7`, `conf-onlyperson`) -> what it says."""
    lines = gzip.open(_require(ASTERISK_INDEX, "asterisk-core-sounds-en"), "rt", encoding="utf-8").read().splitlines()
    index = {}
    for line in lines:
        if line.startswith(";") or ":" not in line:
            continue
        name, text = line.split(":", 1)
        index[name.strip()] = " ".join(text.split())
    return index


def _recording(name: str) -> Path:
    return _require(ASTERISK_SOUNDS, "asterisk-core-sounds-en-wav") / f"{name}.wav"


def real_digit_clips() -> list[Clip]:
    """The ten spoken digits `digits/0` ... `digits/9`; `text` is the digit's word (`seven`)."""
    index = asterisk_index()
    clips = []
    for digit in range(10):
        name = f"digits/{digit}"
        if not _recording(name).is_file():
            raise FileNotFoundError(f"{_recording(name)} is missing; reinstall: {APT_HINT}")
        clips.append(Clip(name, str(_recording(name)), index.get(name, UNITS[digit])))
    return clips


def real_phrase_clips(
    count: int | None = None, seed: int = 0, min_words: int = 3, max_seconds: float = 8.0
) -> list[Clip]:
    """
    English prompts whose index text is speech only (`SPOKEN_TEXT`) of at least `min_words` words, whose recording
    exists and lasts at most `max_seconds`, one per distinct normalised text, in name order; `count` of them drawn
    with `seed` when given.
    """
    import soundfile

    clips, seen = [], set()
    for name, text in sorted(asterisk_index().items()):
        if name.startswith(NOT_PHRASES) or not SPOKEN_TEXT.fullmatch(text) or len(normalize_words(text)) < min_words:
            continue
        path = _recording(name)
        key = " ".join(normalize_words(text))
        if key in seen or not path.is_file() or soundfile.info(str(path)).duration > max_seconds:
            continue
        seen.add(key)
        clips.append(Clip(name, str(path), text))
    if count is not None:
        if count > len(clips):
            raise ValueError(f"Asked for {count} phrases, only {len(clips)} qualify")
        clips = sorted(random.Random(seed).sample(clips, count), key=lambda clip: clip.name)
    return clips


def training_phrases(held_out: list[Clip], max_words: int = 30) -> list[str]:
    """The index's speech prompts (as `real_phrase_clips` picks them, any duration, at most `max_words` words) whose
    normalised text is not that of any held-out clip; leading and trailing ellipses removed."""
    excluded = {" ".join(normalize_words(clip.text)) for clip in held_out}
    phrases = {}
    for clip in real_phrase_clips(min_words=2, max_seconds=float("inf")):
        key = " ".join(normalize_words(clip.text))
        if key not in excluded and len(key.split()) <= max_words:
            phrases.setdefault(key, clip.text.strip(". ") + ("." if clip.text.rstrip().endswith(".") else ""))
    return sorted(phrases.values())


def read_clip(path: str | os.PathLike) -> np.ndarray:
    """A sound file as 16 kHz mono float32 in [-1, 1] (channels averaged, resampled with soxr)."""
    import soundfile
    import soxr

    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLING_RATE:
        audio = soxr.resample(audio, rate, SAMPLING_RATE).astype(np.float32)
    return audio


def _speak(program: str, arguments, text: str, path: str | os.PathLike) -> Path:
    """Run the speech synthesiser `program` (Debian's package of that name) with `arguments(raw file)`, the argument
    list that makes it say `text` into that raw file, and write what it said to `path` as 16 kHz mono 16-bit WAV (the
    raw file removed)."""
    import soundfile

    executable = shutil.which(program)
    if executable is None:
        raise FileNotFoundError(f"{program} is not installed (Debian's {program} package). Install: {APT_HINT}")
    path = Path(path)
    raw = path.with_suffix(f".{program}.wav")
    command = [executable, *arguments(str(raw))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if result.returncode != 0 or not raw.is_file():
        raise RuntimeError(f"{program} failed on {text!r} ({command[1:]}): {result.stderr.strip()[-500:]}")
    try:
        soundfile.write(str(path), read_clip(raw), SAMPLING_RATE, subtype="PCM_16")
    finally:
        raw.unlink(missing_ok=True)
    return path


def synthesize(text: str, path: str | os.PathLike, voice: str, speed: int, pitch: int) -> Path:
    """`text` spoken by espeak-ng with `voice` (e.g. `en-gb+f2`), `speed` (words per minute) and `pitch` (0-99),
    written to `path` as 16 kHz mono 16-bit WAV."""
    settings = ["-v", voice, "-s", str(speed), "-p", str(pitch)]
    return _speak("espeak-ng", lambda raw: [*settings, "-w", raw, "--", text], text, path)


def synthesize_flite(text: str, path: str | os.PathLike, voice: str, stretch: float, pitch: int) -> Path:
    """`text` spoken by flite with `voice` (a key of `FLITE_VOICES`), duration `stretch` (1.0: the voice's own rate)
    and mean pitch `pitch` (Hz), written to `path` as 16 kHz mono 16-bit WAV."""
    if voice not in FLITE_VOICES:
        raise ValueError(f"flite voice {voice!r} is not one of {sorted(FLITE_VOICES)}")
    settings = ["-voice", voice, "--setf", f"duration_stretch={stretch}", "--setf", f"int_f0_target_mean={pitch}"]
    return _speak("flite", lambda raw: [*settings, "-o", raw, "-t", text], text, path)


def digit_string(rng: random.Random, min_digits: int = 2, max_digits: int = 4) -> str:
    """A few digit words, e.g. `four seven two`."""
    return " ".join(UNITS[rng.randrange(10)] for _ in range(rng.randint(min_digits, max_digits)))


def shuffled_words(rng: random.Random, vocabulary: list[str], min_words: int = 3, max_words: int = 12) -> str:
    """A few words drawn at random from `vocabulary`, e.g. `mailbox the Press again`: no sentence to memorise."""
    return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(min_words, max_words)))


def synthetic_texts(
    phrases: list[str], num_digits: int, num_digit_strings: int, num_phrases: int, seed: int, num_shuffled: int = 0
):
    """The (kind, text) of the synthetic clips: every digit word in turn, then digit strings, then `phrases` in a
    seeded order, cycling through them when more are asked for than there are, then `num_shuffled` strings of words
    drawn from the phrases' own words as they are spelled there (`shuffled_words`; a phrase's final full stop
    dropped)."""
    rng = random.Random(seed)
    texts = [("digit", UNITS[index % 10]) for index in range(num_digits)]
    texts += [("digits", digit_string(rng)) for _ in range(num_digit_strings)]
    order = rng.sample(phrases, len(phrases)) if phrases else []
    texts += [("phrase", order[index % len(order)]) for index in range(num_phrases if order else 0)]
    vocabulary = sorted({word for phrase in phrases for word in phrase.rstrip(".").split()})
    if num_shuffled and not vocabulary:
        raise ValueError(f"num_shuffled={num_shuffled} needs phrases to draw words from; none were given")
    shuffled_rng = random.Random(seed + 2)
    texts += [("shuffled", shuffled_words(shuffled_rng, vocabulary)) for _ in range(num_shuffled)]
    return texts


def write_synthetic_clips(
    folder: str | os.PathLike,
    phrases: list[str],
    num_digits: int,
    num_digit_strings: int,
    num_phrases: int,
    seed: int,
    flite_share: float = 0.0,
    num_shuffled: int = 0,
) -> list[Clip]:
    """
    Speak `synthetic_texts(...)`, each clip by flite with probability `flite_share` (a seeded voice, speed and pitch
    of `FLITE_VOICES`) and by espeak-ng otherwise (a seeded voice, speed and pitch), into
    `<folder>/<engine>-NNNNN.wav`; returns the clips (`name` is the file name without `.wav`). An existing file is
    rewritten.
    """
    if not 0.0 <= flite_share <= 1.0:
        raise ValueError(f"flite_share must be between 0 and 1, got {flite_share}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    clips = []
    texts = synthetic_texts(phrases, num_digits, num_digit_strings, num_phrases, seed, num_shuffled)
    for index, (_, text) in enumerate(texts):
        if flite_share and rng.random() < flite_share:
            voice = rng.choice(sorted(FLITE_VOICES))
            stretch, pitch = rng.choice(FLITE_STRETCHES), rng.choice(FLITE_VOICES[voice])
            path = synthesize_flite(text, folder / f"flite-{index:05d}.wav", voice, stretch, pitch)
        else:
            voice, speed, pitch = rng.choice(VOICES), rng.choice(SPEEDS), rng.choice(PITCHES)
            path = synthesize(text, folder / f"espeak-{index:05d}.wav", voice, speed, pitch)
        clips.append(Clip(path.stem, str(path), text))
    return clips


def write_records(path: str | os.PathLike, clips: list[Clip], audio_folder: str | os.PathLike) -> Path:
    """LLaVA-style JSON records, one per clip: `"audio"` (path relative to `audio_folder`) and a two-turn
    conversation (`TRANSCRIBE_PROMPT`, then the clip's text)."""
    records = [
        {
            "id": clip.name,
            "audio": os.path.relpath(clip.path, audio_folder),
            "conversations": [{"from": "human", "value": TRANSCRIBE_PROMPT}, {"from": "gpt", "value": clip.text}],
        }
        for clip in clips
    ]
    Path(path).write_text(json.dumps(records, indent=1))
    return Path(path)


def write_clip_list(path: str | os.PathLike, clips: list[Clip]) -> Path:
    """The clips as JSON (name, path, text), e.g. to record which files a run held out."""
    Path(path).write_text(json.dumps([asdict(clip) for clip in clips], indent=1))
    return Path(path)
