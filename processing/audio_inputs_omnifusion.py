"""
The processor's sound intake: every clip becomes a mono float32 waveform at the feature extractor's sampling rate,
or a clear `ValueError`/`TypeError` names the clip; and the one formula for the positions a clip takes.

- Arrays (numpy or torch) of any integer or float type: integers are scaled to [-1, 1] by their type's range
  (int16 by 32768, uint8 around 128, ...), floats are taken as they are (already in [-1, 1] by convention).
- A 2-D array is several channels, mixed to mono by their mean. The channel axis is the shorter one (so both
  `[samples, channels]`, soundfile's layout, and `[channels, samples]`, torchaudio's, work) and may have at most
  `MAX_CHANNELS` entries.
- Another sampling rate (`sampling_rate=` of the call) is resampled: with `soxr` when it is installed, else with a
  band-limited (Hann-windowed sinc) resampler in torch.
- Strings are paths, http(s) URLs or base64 data, decoded by `transformers.audio_utils.load_audio` (soundfile + soxr,
  or torchcodec) straight to the target rate.
- Refused: NaN or Inf samples, an empty clip, a clip too short for one position, one longer than the encoder's
  window (Whisper: 30 s; a longer recording must be cut by the caller), and anything that cannot be decoded.
"""

import math

import numpy as np
import torch
from transformers.audio_utils import AudioInput
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput

MAX_CHANNELS = 16
# The processor's `__init__` settings for sound, left out of a saved processor without it.
AUDIO_PROCESSOR_FIELDS = (
    "audio_preprocessor",
    "audio_pool_stride",
    "audio_token",
    "audio_start_token",
    "audio_end_token",
)


def num_audio_positions(num_frames, pool_stride: int):
    """
    Positions a clip of `num_frames` real mel frames takes in the prompt (an int, or element-wise for arrays and
    tensors): Whisper's convolutions halve the frames (`(L - 1) // 2 + 1`), then the average pooling keeps every full
    window of `pool_stride` of them. 25 per second of sound for Whisper's 100 frames per second and stride 2.
    """
    return (((num_frames - 1) // 2 + 1) - pool_stride) // pool_stride + 1


def num_mel_frames(num_samples: int, hop_length: int) -> int:
    """The real mel frames the feature extractor marks for a clip of `num_samples` samples."""
    return -(-int(num_samples) // hop_length)


def num_audio_tokens(audio_lengths, feature_extractor, pool_stride: int) -> list[int]:
    """The positions of each clip of `audio_lengths` (samples at the feature extractor's rate)."""
    frames = [num_mel_frames(length, feature_extractor.hop_length) for length in audio_lengths]
    return [int(num_audio_positions(count, pool_stride)) for count in frames]


def extract_audio_features(feature_extractor, waveforms: list[np.ndarray]) -> dict:
    """`input_features` `[clips, mel bins, window frames]` and `input_features_mask` `[clips, window frames]` (1 on
    each clip's real frames, first) of checked waveforms: every clip padded to the encoder's whole window."""
    features = feature_extractor(
        waveforms,
        sampling_rate=feature_extractor.sampling_rate,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="np",
    )
    return {"input_features": features["input_features"], "input_features_mask": features["attention_mask"]}


def _sinc_resample(waveform: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling (Hann-windowed sinc, 6 zero crossings, cut-off 0.99 x the lower Nyquist rate)."""
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    zeros, rolloff = 6, 0.99
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    times = torch.arange(-width, width + orig, dtype=torch.float64)[None, :] / orig
    times = times + torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new
    times = (times * base).clamp(-zeros, zeros)
    window = torch.cos(times * math.pi / zeros / 2) ** 2
    times = times * math.pi
    kernel = torch.where(times == 0, torch.ones_like(times), torch.sin(times) / times) * window * (base / orig)
    signal = torch.nn.functional.pad(torch.from_numpy(waveform).double()[None, None], (width, width + orig))
    output = torch.nn.functional.conv1d(signal, kernel[:, None], stride=orig)[0].t().reshape(-1)
    return output[: math.ceil(new * len(waveform) / orig)].float().numpy()


def resample(waveform: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """`waveform` (mono float32) resampled from `orig_rate` to `new_rate` Hz: soxr when installed, else torch."""
    if orig_rate == new_rate:
        return waveform
    try:
        import soxr
    except ImportError:
        return _sinc_resample(waveform, orig_rate, new_rate)
    return soxr.resample(waveform, orig_rate, new_rate, quality="HQ").astype(np.float32)


def _as_float(array: np.ndarray, name: str) -> np.ndarray:
    """Samples as float32: integers scaled to [-1, 1] by their type's range, floats as they are (finite only)."""
    if array.dtype.kind == "i":
        return (array.astype(np.float64) / (np.iinfo(array.dtype).max + 1.0)).astype(np.float32)
    if array.dtype.kind == "u":
        middle = (np.iinfo(array.dtype).max + 1.0) / 2
        return ((array.astype(np.float64) - middle) / middle).astype(np.float32)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{name} holds NaN or infinite samples.")
        return array.astype(np.float32)
    raise TypeError(f"{name} has sample type {array.dtype}; expected an integer or float type.")


def _to_mono(array: np.ndarray, name: str) -> np.ndarray:
    if array.size == 0:
        raise ValueError(f"{name} is empty: no samples (shape {tuple(array.shape)}).")
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}: expected [samples] or, for several channels, [samples, channels] "
            "or [channels, samples]."
        )
    channel_axis = int(np.argmin(array.shape))
    if array.shape[channel_axis] > MAX_CHANNELS:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}: the shorter axis is taken as the channels, and "
            f"{array.shape[channel_axis]} is more than {MAX_CHANNELS} channels."
        )
    return array.mean(axis=channel_axis, dtype=np.float64).astype(np.float32)


def _load(source: str, name: str, sampling_rate: int) -> np.ndarray:
    from transformers.audio_utils import load_audio

    try:
        return np.asarray(load_audio(source, sampling_rate=sampling_rate))
    except Exception as error:  # every decoder raises its own types: all of them mean "not readable sound"
        raise ValueError(
            f"{name}: cannot read {source!r:.100} as sound (a path to an audio file, an http(s) URL or base64 data "
            f"was expected): {type(error).__name__}: {error}"
        ) from None


def to_waveform(clip, name: str, sampling_rate: int, target_rate: int) -> np.ndarray:
    """One clip (array, tensor, path, URL or base64 string) as a mono float32 waveform at `target_rate` Hz."""
    if isinstance(clip, str):
        return _to_mono(_as_float(_load(clip, name, target_rate), name), name)
    if type(clip).__module__.startswith("torch"):
        if not hasattr(clip, "detach"):
            raise TypeError(f"{name} is a {type(clip).__name__}; expected a waveform tensor.")
        clip = clip.detach().cpu()
        clip = (clip.float() if clip.is_floating_point() else clip).numpy()
    if not isinstance(clip, np.ndarray):
        raise TypeError(
            f"{name} is a {type(clip).__name__}; expected a numpy array or torch tensor of samples, a path or a URL."
        )
    waveform = _to_mono(_as_float(clip, name), name)
    return resample(waveform, sampling_rate, target_rate)


def flat_clips(audio) -> list:
    """The clips of `audio` (one clip, a list, or a list per sample) as one flat list, in order."""
    if audio is None:
        return []
    if not isinstance(audio, (list, tuple)):
        return [audio]
    return [clip for item in audio for clip in flat_clips(item)]


def check_audio(audio, sampling_rate, feature_extractor, pool_stride: int) -> list[np.ndarray] | None:
    """
    Every clip of `audio` (one clip, a list, or a list per sample) as a mono float32 waveform at the feature
    extractor's sampling rate, in one flat list; `None` when there is none. `sampling_rate` is the rate of the
    array clips (`None`: the feature extractor's). A `ValueError`/`TypeError` names the clip (by its position) that
    is empty, too short for one position, longer than the encoder's window, not finite or not readable.
    """
    clips = flat_clips(audio)
    if not clips:
        return None
    target_rate = feature_extractor.sampling_rate
    rate = target_rate if sampling_rate is None else sampling_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
        raise ValueError(f"sampling_rate must be a positive int (Hz), got {rate!r:.40}")
    window = feature_extractor.n_samples
    waveforms = []
    for index, clip in enumerate(clips):
        name = f"Audio clip {index}"
        waveform = to_waveform(clip, name, int(rate), target_rate)
        if waveform.size == 0:
            raise ValueError(f"{name} is empty: no samples.")
        if waveform.size > window:
            raise ValueError(
                f"{name} is {waveform.size / target_rate:.2f} s long, over the {window / target_rate:g} s the audio "
                "encoder takes in one window; cut it into shorter clips (each its own <audio>)."
            )
        if num_audio_positions(num_mel_frames(waveform.size, feature_extractor.hop_length), pool_stride) < 1:
            raise ValueError(
                f"{name} is {1000 * waveform.size / target_rate:.1f} ms long, too short for a single audio position."
            )
        waveforms.append(waveform)
    return waveforms


def load_chat_audio(conversation, sampling_rate: int):
    """
    A copy of `conversation` (one chat or a batch) whose `{"type": "audio"}` items hold their sound as a mono
    waveform at `sampling_rate` under `"audio"`: paths, URLs and base64 (`"path"`, `"url"` or a string `"audio"`)
    are read here, so an unreadable one is a `ValueError` naming its item. Arrays stay as they are (the processor
    call resamples them from its `sampling_rate`).
    """
    chats = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
    loaded = [[dict(message) for message in chat] for chat in chats]
    for chat_index, chat in enumerate(loaded):
        for index, message in enumerate(chat):
            if isinstance(message.get("content"), (list, tuple)):
                message["content"] = [
                    _load_chat_item(
                        item, f"conversation {chat_index} message {index} content item {item_index}", sampling_rate
                    )
                    for item_index, item in enumerate(message["content"])
                ]
    return loaded if chats is conversation else loaded[0]


def _load_chat_item(item, name: str, sampling_rate: int):
    if not isinstance(item, dict) or item.get("type") != "audio":
        return item
    sources = [key for key in ("audio", "path", "url") if item.get(key) is not None]
    if len(sources) > 1:
        raise ValueError(f"{name}: an audio item takes one of 'audio', 'path' or 'url', got {sources}")
    if not sources:  # a placeholder only (rendering a prompt whose clips are given elsewhere)
        return item
    source = item[sources[0]]
    if isinstance(source, str):
        source = to_waveform(source, name, sampling_rate, sampling_rate)
    return {key: value for key, value in item.items() if key not in ("path", "url")} | {"audio": source}


def feature_extractor_from_dict(entry):
    """A feature extractor saved in `processor_config.json` (its `to_dict()`), or `entry` itself if not a dict."""
    if not isinstance(entry, dict):
        return entry
    import transformers

    entry = dict(entry)
    class_name = entry.pop("feature_extractor_type", None)
    feature_extractor_class = getattr(transformers, class_name or "", None)
    if feature_extractor_class is None:
        raise ValueError(f"audio_preprocessor: unknown feature extractor class {class_name!r}")
    return feature_extractor_class.from_dict(entry)


__all__ = [
    "AUDIO_PROCESSOR_FIELDS",
    "MAX_CHANNELS",
    "extract_audio_features",
    "num_audio_tokens",
    "check_audio",
    "feature_extractor_from_dict",
    "flat_clips",
    "load_chat_audio",
    "num_audio_positions",
    "num_mel_frames",
    "resample",
    "to_waveform",
]


class SoundProcessorMixin(ProcessorMixin):
    """
    The processor's face to transformers for images, sound and text. transformers (its processors and their common
    tests) read the modalities a processor takes from the signature of `__call__`, which names `images`, `text` and
    `audio` here and leaves out `videos` (a processor with a video preprocessor takes them as a keyword; others refuse
    them in `prepare_inputs_layout`); and
    `model_input_names` lists `input_features` and `input_features_mask` when the processor has sound (its
    `audio_preprocessor`, which is not one of the processor's attributes transformers collect names from).
    """

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        audio: AudioInput | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ):
        return super().__call__(images=images, text=text, audio=audio, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        sound = ["input_features", "input_features_mask"] if getattr(self, "audio_preprocessor", None) else []
        return super().model_input_names + sound
