"""
The processor's video intake: every video becomes its sampled frames, `[frames, height, width, 3]` uint8 RGB, or a
clear `ValueError`/`TypeError` names the video; the frames then go through the encoders' own image processors.

- A video is a path or an http(s) URL (decoded with PyAV, `pip install av`), a 4-D array or tensor of frames
  (`[frames, height, width, channels]` or `[frames, channels, height, width]`, uint8, or floats in [0, 1]), or a list
  of frames (PIL images or 3-D arrays).
- Frames are sampled evenly: `n` of `T` frames are `floor(i * T / n)` for i = 0..n-1 (`sample_frame_indices`, as
  transformers' video processors), `n` being `num_frames` (default: the config's `video_num_frames`) or, with `fps`,
  `floor(duration * fps)` (at least 1); a video with fewer frames keeps all of them.
- Refused: no frames, NaN or infinite values, a side over `MAX_VIDEO_SIDE` pixels, more than `MAX_VIDEO_FRAMES` frames
  in the source or `MAX_SAMPLED_FRAMES` sampled, and anything that cannot be decoded.
"""

import numpy as np
from transformers.audio_utils import AudioInput
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput
from transformers.utils import PushToHubMixin

from .processor_checks_omnifusion import check_placeholder_count

MAX_VIDEO_SIDE = 8192
MAX_VIDEO_FRAMES = 1_000_000
MAX_SAMPLED_FRAMES = 256
# The processor's `__init__` settings for video, left out of a saved processor without it.
VIDEO_PROCESSOR_FIELDS = (
    "video_preprocessor",
    "num_video_frame_tokens",
    "video_token",
    "video_start_token",
    "video_end_token",
)


def sample_frame_indices(total_frames: int, num_frames: int | None = None, fps=None, video_fps=None) -> np.ndarray:
    """
    The indices of the frames kept from a video of `total_frames`: `num_frames` of them, or with `fps` (frames per
    second wanted; `video_fps` the source's rate) `floor(total_frames / video_fps * fps)`, at least 1; never more than
    `total_frames`. Frame i of n is `floor(i * total_frames / n)`.
    """
    if fps is not None:
        if not video_fps or video_fps <= 0:
            raise ValueError("sampling by fps needs the video's frame rate (video_metadata={'fps': ...} for frames)")
        count = max(1, int(total_frames / video_fps * fps))
    else:
        count = num_frames
    count = min(int(count), total_frames)
    return (np.arange(count) * total_frames // count).astype(np.int64)


def _check_count(name: str, total: int, limit: int, what: str):
    if total < 1:
        raise ValueError(f"{name} has no frames.")
    if total > limit:
        raise ValueError(f"{name} has {total} {what}, over the {limit} a video may have; cut it or sample fewer.")


def _as_uint8(frames: np.ndarray, name: str) -> np.ndarray:
    """`[frames, H, W, C]` of any layout and type as uint8 RGB, or an error naming the video."""
    if frames.ndim != 4:
        raise ValueError(
            f"{name} has shape {tuple(frames.shape)}: expected [frames, height, width, channels] or "
            "[frames, channels, height, width] (or a list of frames, a path or a URL)."
        )
    if frames.shape[-1] not in (1, 3, 4) and frames.shape[1] in (1, 3, 4):
        frames = frames.transpose(0, 2, 3, 1)
    if frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} has shape {tuple(frames.shape)}: no axis of 1, 3 or 4 channels.")
    _check_count(name, frames.shape[0], MAX_VIDEO_FRAMES, "frames")
    height, width = frames.shape[1:3]
    if min(height, width) < 1 or max(height, width) > MAX_VIDEO_SIDE:
        raise ValueError(f"{name} has {width}x{height} frames; each side must be 1 to {MAX_VIDEO_SIDE} pixels.")
    if frames.dtype.kind == "f":
        if not np.isfinite(frames).all():
            raise ValueError(f"{name} holds NaN or infinite values.")
        if frames.min() < 0 or frames.max() > 1:
            raise ValueError(f"{name} has float values outside [0, 1] (floats are read as 0..1 intensities).")
        frames = np.round(frames * 255).astype(np.uint8)
    elif frames.dtype != np.uint8:
        raise TypeError(f"{name} has pixel type {frames.dtype}; expected uint8 or floats in [0, 1].")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])


def _frame_array(frame, name: str) -> np.ndarray:
    if hasattr(frame, "convert") and hasattr(frame, "size"):  # a PIL image
        return np.asarray(frame.convert("RGB"))
    if type(frame).__module__.startswith("torch"):
        frame = frame.detach().cpu().numpy()
    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        raise TypeError(f"{name}: a frame must be a PIL image or a 3-D array, got {type(frame).__name__}")
    return frame


def decode_video(source: str, name: str, num_frames=None, fps=None) -> np.ndarray:
    """The sampled frames of a video file, URL or open binary file, decoded with PyAV (`[frames, H, W, 3]` uint8
    RGB)."""
    try:
        import av
    except ImportError:
        raise ImportError(f"{name}: reading video files needs PyAV: pip install av") from None

    def open_stream():
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            container = av.open(source)
        except Exception as error:  # FFmpeg and the OS raise their own types: all mean "not a readable video"
            raise ValueError(
                f"{name}: cannot read {source!r:.100} as a video (a path to a video file or an http(s) URL was "
                f"expected): {type(error).__name__}: {error}"
            ) from None
        if not container.streams.video:
            container.close()
            raise ValueError(f"{name}: {source!r:.100} has no video stream.")
        return container, container.streams.video[0]

    container, stream = open_stream()
    with container:
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        width, height = stream.codec_context.width, stream.codec_context.height
    _check_count(name, total, MAX_VIDEO_FRAMES, "frames")
    if max(width, height) > MAX_VIDEO_SIDE:
        raise ValueError(f"{name} has {width}x{height} frames; each side must be 1 to {MAX_VIDEO_SIDE} pixels.")
    for _ in range(2):  # a second pass when the container's frame count was not the decoded one
        wanted = sample_frame_indices(total, num_frames, fps, rate)
        positions = {int(index): order for order, index in enumerate(wanted)}
        frames, decoded = [None] * len(wanted), 0
        container, stream = open_stream()
        try:
            with container:
                for frame in container.decode(stream):
                    if decoded in positions:
                        frames[positions[decoded]] = frame.to_ndarray(format="rgb24")
                    decoded += 1
        except av.FFmpegError as error:
            raise ValueError(f"{name}: {source!r:.100} cannot be decoded: {error}") from None
        if decoded == total:
            break
        _check_count(name, decoded, MAX_VIDEO_FRAMES, "decoded frames")
        total = decoded
    return np.stack(frames)


def load_video(video, name: str, num_frames=None, fps=None, video_fps=None) -> np.ndarray:
    """One video (path, URL, frames array/tensor or list of frames) as its sampled `[frames, H, W, 3]` uint8 RGB."""
    if isinstance(video, str) or hasattr(video, "read"):  # a path, a URL or an open file
        frames = decode_video(video, name, num_frames, fps)
    else:
        if type(video).__module__.startswith("torch") and hasattr(video, "detach"):
            video = video.detach().cpu()
            video = (video.float() if video.is_floating_point() else video).numpy()
        if isinstance(video, (list, tuple)):
            if not video:
                raise ValueError(f"{name} has no frames.")
            video = np.stack([_frame_array(frame, f"{name} frame {index}") for index, frame in enumerate(video)])
        if not isinstance(video, np.ndarray):
            raise TypeError(
                f"{name} is a {type(video).__name__}; expected a path, a URL, a 4-D array or tensor of frames, or a "
                "list of frames."
            )
        frames = _as_uint8(video, name)
        frames = frames[sample_frame_indices(len(frames), num_frames, fps, video_fps)]
    _check_count(name, len(frames), MAX_SAMPLED_FRAMES, "sampled frames")
    return frames


def _is_one_video(item) -> bool:
    if isinstance(item, str) or getattr(item, "ndim", 0) == 4 or hasattr(item, "read"):
        return True
    return isinstance(item, (list, tuple)) and bool(item) and all(_is_frame(frame) for frame in item)


def _is_frame(item) -> bool:
    return (hasattr(item, "convert") and hasattr(item, "size")) or getattr(item, "ndim", 0) == 3


def flat_videos(videos) -> list:
    """The videos of `videos` (one video, a list, or a list per sample, where an empty list is a sample without
    videos) as one flat list, in order."""
    if videos is None:
        return []
    if _is_one_video(videos) or not isinstance(videos, (list, tuple)):
        return [videos]
    return [video for item in videos for video in flat_videos(item)]


class OmniFusionVideoProcessor(PushToHubMixin):
    """
    Decodes and samples videos (`num_frames` per video by default, or `fps` frames per second of video) and runs every
    frame through the frame processors: the encoders' own image processors, which `OmniFusionProcessor` gives it
    (`frame_processors`, not saved). `__call__` returns `pixel_values_videos` (`[total frames, 3, H, W]`, with
    several encoders `[total frames, encoders, 3, H, W]`).
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, num_frames: int = 8, fps: float | None = None, **kwargs):
        kwargs.pop("video_processor_type", None)
        if kwargs:
            raise ValueError(f"OmniFusionVideoProcessor: unknown settings {sorted(kwargs)}")
        self.num_frames, self.fps, self.frame_processors = num_frames, fps, []
        self.check_sampling(num_frames, fps)

    @staticmethod
    def check_sampling(num_frames, fps):
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_SAMPLED_FRAMES:
            raise ValueError(f"num_frames must be an int from 1 to {MAX_SAMPLED_FRAMES}, got {num_frames!r:.40}")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise ValueError(f"fps must be a positive number of frames per second, got {fps!r:.40}")

    def to_dict(self) -> dict:
        return {"num_frames": self.num_frames, "fps": self.fps, "video_processor_type": type(self).__name__}

    @classmethod
    def from_dict(cls, entry: dict):
        return cls(**entry)

    def __deepcopy__(self, memo):
        return type(self).from_dict(self.to_dict())

    def load(self, videos, num_frames=None, fps=None, video_metadata=None) -> list[np.ndarray]:
        """Every video of `videos` decoded and sampled (`load_video`), or `None` when there is none."""
        videos = flat_videos(videos)
        if not videos:
            return None
        num_frames = self.num_frames if num_frames is None else num_frames
        fps = self.fps if fps is None else fps
        self.check_sampling(num_frames, fps)
        metadata = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * len(videos)
        return [
            load_video(video, f"Video {index}", num_frames, fps, (meta or {}).get("fps") if meta else None)
            for index, (video, meta) in enumerate(zip(videos, metadata))
        ]

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        """`pixel_values_videos` of `videos` (decoded and sampled here unless already `load`ed)."""
        if not _all_loaded(videos):
            videos = self.load(videos, kwargs.get("num_frames"), kwargs.get("fps"), kwargs.get("video_metadata"))
        frames = [frame for video in videos for frame in video]
        encoder_pixels = [np.asarray(p(frames, return_tensors="np")["pixel_values"]) for p in self.frame_processors]
        return BatchFeature({"pixel_values_videos": stack_encoder_pixels(encoder_pixels)}, tensor_type=return_tensors)


def _all_loaded(videos) -> bool:
    """Whether `videos` is already a list of sampled `[frames, H, W, 3]` uint8 arrays (`load`'s output)."""
    return isinstance(videos, list) and all(
        isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4 for video in videos
    )


def stack_encoder_pixels(encoder_pixels: list[np.ndarray]) -> np.ndarray:
    """One encoder's `[views, 3, H, W]` as is; several stacked as `[views, encoders, 3, H, W]`, each encoder's views
    zero-padded at the bottom/right to the largest (images' views and video frames alike)."""
    if len(encoder_pixels) == 1:
        return encoder_pixels[0]
    height = max(pixels.shape[-2] for pixels in encoder_pixels)
    width = max(pixels.shape[-1] for pixels in encoder_pixels)
    shape = (len(encoder_pixels[0]), len(encoder_pixels), 3, height, width)
    stacked = np.zeros(shape, dtype=encoder_pixels[0].dtype)
    for index, pixels in enumerate(encoder_pixels):
        stacked[:, index, :, : pixels.shape[-2], : pixels.shape[-1]] = pixels
    return stacked


def video_processor_from_dict(entry):
    """An `OmniFusionVideoProcessor` saved in `processor_config.json` (its `to_dict()`), or `entry` itself."""
    return OmniFusionVideoProcessor.from_dict(entry) if isinstance(entry, dict) else entry


def add_video_items(template: str) -> str:
    """`template` writing `<video>` for `{"type": "video"}` items too, in order with the image (and audio) items."""
    image_loop = "{%- for item in content if item['type'] == 'image' -%}<image>{%- endfor -%}"
    audio_loop = (
        "{%- for item in content if item['type'] in ['image', 'audio'] -%}"
        "{{- '<image>' if item['type'] == 'image' else '<audio>' -}}{%- endfor -%}"
    )
    loop = audio_loop if audio_loop in template else image_loop
    types = "['image', 'audio', 'video']" if loop == audio_loop else "['image', 'video']"
    return template.replace(
        loop,
        "{%- for item in content if item['type'] in " + types + " -%}{{- '<' ~ item['type'] ~ '>' -}}{%- endfor -%}",
    )


class VideoProcessingMixin(ProcessorMixin):
    """The video methods of `OmniFusionProcessor` (a model with `video_num_frames` set; `video_preprocessor` None:
    no video, and the processor saves exactly the files it always did)."""

    def _init_video(self, video_preprocessor, num_video_frame_tokens, tokens: list[str]) -> list[str]:
        """Set the video settings; the video marker strings to add to the tokenizer ([] without video)."""
        self.video_preprocessor = video_processor_from_dict(video_preprocessor)
        self.num_video_frame_tokens = num_video_frame_tokens
        markers = tokens if self.video_preprocessor is not None else []
        self.video_token, self.video_start_token, self.video_end_token = markers or [None] * 3
        return markers

    @property
    def model_input_names(self) -> list[str]:
        """The processor's output names, with `pixel_values_videos` when it has a video preprocessor."""
        video = ["pixel_values_videos"] if getattr(self, "video_preprocessor", None) is not None else []
        return super().model_input_names + video

    @property
    def video_processor(self):
        """The video processor (`None` without video): the sub-processor transformers and vLLM look for."""
        return self.video_preprocessor

    @property
    def video_num_frames(self):
        """Frames sampled per video by default (`OmniFusionConfig.video_num_frames`)."""
        return None if self.video_preprocessor is None else self.video_preprocessor.num_frames

    @video_num_frames.setter
    def video_num_frames(self, value):
        if self.video_preprocessor is not None:
            self.video_preprocessor.check_sampling(value, self.video_preprocessor.fps)
            self.video_preprocessor.num_frames = value

    @property
    def image_processors_for_frames(self) -> list:
        return [self.image_processor, *self.extra_encoder_preprocessors]

    def load_videos(self, videos, kwargs: dict):
        """The checked, sampled frames of every video of a processor call (`num_frames`, `fps` and `video_metadata`
        from its keyword arguments or its `videos_kwargs`), or a `ValueError` naming the video."""
        if videos is None:
            return None
        if self.video_preprocessor is None:
            raise ValueError("This OmniFusion model takes no video: it takes images and text, not videos.")
        options = {**(kwargs.get("videos_kwargs") or {}), **kwargs}
        return self.video_preprocessor.load(
            videos, options.get("num_frames"), options.get("fps"), options.get("video_metadata")
        )

    def _process_videos(self, videos, **kwargs):
        self.video_preprocessor.frame_processors = self.image_processors_for_frames
        videos = videos if _all_loaded(videos) else self.video_preprocessor.load(videos)
        processed = dict(self.video_preprocessor(videos))
        return processed, [self.video_block(len(video)) for video in videos]

    def video_block(self, num_frames: int) -> str:
        """The text a video of `num_frames` sampled frames becomes: `<video_start>`, `num_frames *
        num_video_frame_tokens` x `<video>`, `<video_end>` (no separators between frames)."""
        return (
            self.video_start_token
            + self.video_token * (num_frames * self.num_video_frame_tokens)
            + self.video_end_token
        )

    def video_chat_template(self, template: str) -> str:
        """The default chat template: `template` with `{"type": "video"}` items (`add_video_items`) with video."""
        return template if self.video_preprocessor is None else add_video_items(template)

    def video_token_counts(self, video_sizes) -> dict:
        """For `_get_num_multimodal_tokens`: per video of `video_sizes` (`[frames, height, width]` of its sampled
        frames) its `<video>` positions (`num_video_tokens`) and frames (`num_video_patches`); `{}` without video."""
        if video_sizes is None or self.video_preprocessor is None:
            return {}
        frames = [int(size[0]) for size in video_sizes]
        return {
            "num_video_tokens": [count * self.num_video_frame_tokens for count in frames],
            "num_video_patches": frames,
        }

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        audio: AudioInput | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """`ProcessorMixin.__call__` (the signature transformers reads the modalities from, as `SoundProcessorMixin`'s;
        videos come as the `videos` keyword); when the text replacement offsets are asked for (serving engines such
        as vLLM's Transformers backend ask for them), also `video_grid_thw`: `[frames, 1, 1]` per video, in order,
        which is how such an engine tells the rows of `pixel_values_videos` (one per frame) of each video apart."""
        outputs = super().__call__(images=images, text=text, audio=audio, **kwargs)
        offsets = outputs.get("text_replacement_offsets") if kwargs.get("return_text_replacement_offsets") else None
        frames = outputs.get("pixel_values_videos")
        if offsets is None or frames is None or self.video_token is None:
            return outputs
        per_frame = self.num_video_frame_tokens
        counts = [
            entry["replacement"].count(self.video_token) // per_frame
            for sample in offsets
            for entry in sample
            if entry["type"] == "video"
        ]
        grid = np.array([[count, 1, 1] for count in counts], dtype=np.int64).reshape(-1, 3)
        if type(frames).__module__.startswith("torch"):
            import torch

            grid = torch.from_numpy(grid)
        outputs["video_grid_thw"] = grid
        return outputs

    def vllm_video_data(self, text: str, videos) -> dict:
        """For `vllm_inputs`: `{"video": [frames, ...]}`, every video decoded and sampled (`load`: `[frames, H, W, 3]`
        uint8 arrays, which the processor keeps as they are) after checking one `<video>` per video in `text`; `{}`
        without videos (a model without video and videos: a `ValueError`)."""
        if self.video_token is not None:
            check_placeholder_count(text, None if videos is None else flat_videos(videos), self.video_token, "video")
        videos = self.load_videos(videos, {})
        return {"video": videos} if videos else {}

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """One `<video>` placeholder per video (a `ValueError` naming both counts), then the other checks."""
        if self.video_token is not None:
            check_placeholder_count(text, videos, self.video_token, item="video")
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def to_dict(self) -> dict:
        """Without video, none of the video settings (`VIDEO_PROCESSOR_FIELDS`): the files saved before video."""
        output = super().to_dict()
        for name in VIDEO_PROCESSOR_FIELDS if self.video_preprocessor is None else ():
            output.pop(name, None)
        return output


__all__ = [
    "MAX_SAMPLED_FRAMES",
    "MAX_VIDEO_FRAMES",
    "MAX_VIDEO_SIDE",
    "OmniFusionVideoProcessor",
    "VIDEO_PROCESSOR_FIELDS",
    "VideoProcessingMixin",
    "decode_video",
    "flat_videos",
    "load_video",
    "sample_frame_indices",
    "stack_encoder_pixels",
    "add_video_items",
    "video_processor_from_dict",
]
