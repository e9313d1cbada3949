"""
Tiny OmniFusion models, tokenizers, processors and images, built locally (never from the Hub), for tests, demos and
benchmarks.

`make_tokenizer` is the one byte-level BPE builder: with no arguments it trains on `CORPUS` (the tests' tokenizer);
demos and benchmarks pass their own corpus, vocabulary size, padding and extra special tokens.
`make_model_and_processor` gives a random 2-layer OmniFusion in eval mode with its processor;
`make_audio_model_and_processor` the same with a tiny random Whisper encoder (1 s window) and `make_clip` sound.
"""

from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Dinov2Config,
    MistralConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
)

from modeling_omnifusion import OmniFusionConfig, OmniFusionForCausalLM, OmniFusionProcessor

IMAGE_SIZE = 32
PATCH_SIZE = 8

CORPUS = [
    "This is a dialog with AI assistant.",
    "What is the colour of the shape? It is red. It is blue. It is green.",
    "How many circles are there? There are two circles and one square.",
    "Describe the image. A small yellow triangle on the left of a purple square.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 yes no",
]
BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def make_tokenizer(
    vocab_size: int = 300,
    corpus: Iterable[str] | None = None,
    extra_special_tokens: Iterable[str] = (),
    pad_token: str | None = None,
    padding_side: str | None = None,
) -> PreTrainedTokenizerFast:
    """
    A byte-level BPE tokenizer with `<unk>`, `<s>`, `</s>` (ids 0, 1, 2), trained deterministically on `corpus`
    (default: `CORPUS` four times) up to `vocab_size` entries.

    `extra_special_tokens` are added after training as special tokens (ids from the trained vocabulary's size on);
    `pad_token` (one of the tokens, e.g. `"<unk>"`) and `padding_side` are set when given.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS) * 4 if corpus is None else corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    extra_special_tokens = list(extra_special_tokens)
    if extra_special_tokens:
        added = [AddedToken(token, special=True, normalized=False) for token in extra_special_tokens]
        fast.add_tokens(added, special_tokens=True)
    if pad_token is not None:
        fast.pad_token = pad_token
    if padding_side is not None:
        fast.padding_side = padding_side
    return fast


def vision_config(kind: str = "clip", hidden: int = 32, image_size: int = IMAGE_SIZE, num_layers: int = 2):
    """A tiny vision tower config of `kind` ("clip", "siglip" or "dinov2") with patch size `PATCH_SIZE`."""
    common = dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4)
    if kind == "clip":
        return CLIPVisionConfig(image_size=image_size, patch_size=PATCH_SIZE, projection_dim=hidden, **common)
    if kind == "siglip":
        return SiglipVisionConfig(image_size=image_size, patch_size=PATCH_SIZE, **common)
    if kind == "dinov2":
        return Dinov2Config(image_size=image_size, patch_size=PATCH_SIZE, mlp_ratio=2, **common)
    raise ValueError(kind)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def encoder_image_processor(kind: str, size: int = IMAGE_SIZE):
    """The image processor each encoder family ships with, at `size`: DINOv2's resizes larger, crops and uses
    ImageNet statistics; the others CLIP's."""
    if kind == "dinov2":
        return BitImageProcessorPil(
            size={"shortest_edge": size + size // 7},
            crop_size={"height": size, "width": size},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def make_processor(config: OmniFusionConfig | None = None, tokenizer=None, **kwargs) -> OmniFusionProcessor:
    """An OmniFusion processor over CLIP preprocessing at `IMAGE_SIZE` and `tokenizer` (default `make_tokenizer()`),
    with `config`'s image token count (default: one per patch)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    num_image_tokens = config.num_image_tokens if config is not None else (IMAGE_SIZE // PATCH_SIZE) ** 2
    return OmniFusionProcessor(
        image_processor, tokenizer or make_tokenizer(), num_image_tokens=num_image_tokens, **kwargs
    )


def make_config(processor: OmniFusionProcessor, vision="clip", adapter_type: str = "transformer", **kwargs):
    """A tiny OmniFusion config (2-layer Mistral LM) whose marker ids are `processor`'s; `kwargs` go to the config."""
    text_config = MistralConfig(
        vocab_size=len(processor.tokenizer) - len(processor.special_token_ids),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=processor.tokenizer.pad_token_id,
        bos_token_id=processor.tokenizer.bos_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
    )
    return OmniFusionConfig(
        vision_config=vision_config(vision) if isinstance(vision, str) else vision,
        text_config=text_config,
        adapter_type=adapter_type,
        adapter_ffn_dim=64,
        adapter_hidden_size=48,
        **processor.special_token_ids,
        **kwargs,
    )


def make_model_and_processor(
    vision: str | list = "clip", adapter_type: str = "transformer", seed: int = 0, vision_sizes=None, **kwargs
):
    """
    A random tiny OmniFusion (2-layer vision tower(s) and LM) in eval mode, with its processor. `vision` is one
    encoder kind or a list of them (each with its own image processor, at `vision_sizes` px).
    """
    torch.manual_seed(seed)
    processor = make_processor()
    if not isinstance(vision, str):
        sizes = vision_sizes or [IMAGE_SIZE] * len(vision)
        image_processors = [encoder_image_processor(kind, size) for kind, size in zip(vision, sizes)]
        processor.image_processor, *processor.extra_encoder_preprocessors = image_processors
        vision = [vision_config(kind, image_size=size) for kind, size in zip(vision, sizes)]
    config = make_config(processor, vision=vision, adapter_type=adapter_type, **kwargs)
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    model = OmniFusionForCausalLM(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


AUDIO_WINDOW_SECONDS = 1


def audio_config(hidden: int = 32):
    """A tiny Whisper config whose encoder takes `AUDIO_WINDOW_SECONDS` (100 mel frames per second: 50 positions after
    its convolutions)."""
    return WhisperConfig(
        d_model=hidden,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=50 * AUDIO_WINDOW_SECONDS,
    )


def make_audio_model_and_processor(
    audio_adapter_type: str = "mlp", audio_pool_stride: int = 2, seed: int = 0, tokenizer=None, **kwargs
):
    """
    A random tiny OmniFusion with sound (the 2-layer image model of `make_model_and_processor` plus a 1-layer Whisper
    encoder over a 1 s window) in eval mode, with its processor (a `WhisperFeatureExtractor(chunk_length=1)`).
    `kwargs` go to the config.
    """
    torch.manual_seed(seed)
    processor = make_processor(
        tokenizer=tokenizer,
        audio_preprocessor=WhisperFeatureExtractor(chunk_length=AUDIO_WINDOW_SECONDS),
        audio_pool_stride=audio_pool_stride,
    )
    config = make_config(
        processor,
        audio_config=audio_config(),
        audio_adapter_type=audio_adapter_type,
        audio_pool_stride=audio_pool_stride,
        **kwargs,
    )
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    model = OmniFusionForCausalLM(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def make_clip(seed: int = 0, seconds: float = 0.5, sampling_rate: int = 16000) -> np.ndarray:
    """`seconds` of float32 sound from `seed`: a random chord of three tones plus a little noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    times = np.arange(int(round(seconds * sampling_rate))) / sampling_rate
    tones = sum(np.sin(2 * np.pi * rng.uniform(100, 2000) * times + rng.uniform(0, 6)) for _ in range(3))
    return (0.25 * tones + 0.05 * rng.standard_normal(times.size)).astype(np.float32)


def audio_chat(text: str, clips=(), images=()) -> list[dict]:
    """A one-turn user message with its images, then its clips (arrays or paths), then `text`."""
    content = [{"type": "image", "image": image} for image in images]
    content += [
        {"type": "audio", "path": clip} if isinstance(clip, str) else {"type": "audio", "audio": clip} for clip in clips
    ]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def make_image(seed: int = 0, size: int = IMAGE_SIZE, mode: str = "RGB") -> Image.Image:
    """A `size` x `size` image of uniform random pixels from `seed`, converted to `mode`."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


def chat(text: str, n_images: int = 1, images=None) -> list[dict]:
    """A one-turn user message with `n_images` image entries (PIL images if `images` is given)."""
    images = images if images is not None else [None] * n_images
    content = [{"type": "image", "image": image} if image is not None else {"type": "image"} for image in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def make_sentencepiece_tokenizer(folder):
    """A Llama/Mistral-style tokenizer: a SentencePiece BPE model with byte fallback, loaded by `LlamaTokenizer`.

    Returns `(tokenizer, sentencepiece_processor)`; the folder holds only `tokenizer.model`, like a released one.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from .released import write_tokenizer_folder

    folder = write_tokenizer_folder(folder)
    sentencepiece_processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return LlamaTokenizer.from_pretrained(folder), sentencepiece_processor


def make_video_model_and_processor(
    video_num_frames: int = 4, video_pool_size: int = 2, video_adapter: str = "shared", seed: int = 0, **kwargs
):
    """
    A random tiny OmniFusion with video (the image model of `make_model_and_processor`; 16 positions per view, 4 per
    frame after 2x2 pooling) in eval mode, with its processor (an `OmniFusionVideoProcessor` sampling
    `video_num_frames`). With `audio=True` the sound model of `make_audio_model_and_processor` gets video too.
    `kwargs` go to the config.
    """
    from modeling_omnifusion.processing.video_inputs_omnifusion import OmniFusionVideoProcessor

    torch.manual_seed(seed)
    audio = kwargs.pop("audio", False)
    sound = dict(audio_preprocessor=WhisperFeatureExtractor(chunk_length=AUDIO_WINDOW_SECONDS)) if audio else {}
    processor = make_processor(video_preprocessor=OmniFusionVideoProcessor(num_frames=video_num_frames), **sound)
    config = make_config(
        processor,
        video_num_frames=video_num_frames,
        video_pool_size=video_pool_size,
        video_adapter=video_adapter,
        **({"audio_config": audio_config()} if audio else {}),
        **kwargs,
    )
    for name, value in config.processor_kwargs.items():
        setattr(processor, name, value)
    model = OmniFusionForCausalLM(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def make_video(seed: int = 0, frames: int = 6, size: int = IMAGE_SIZE) -> np.ndarray:
    """`frames` frames of uniform random pixels from `seed`: `[frames, size, size, 3]` uint8."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def video_chat(text: str, videos=(), images=()) -> list[dict]:
    """A one-turn user message with its images, then its videos (arrays or paths), then `text`."""
    content = [{"type": "image", "image": image} for image in images]
    content += [
        {"type": "video", "path": video} if isinstance(video, str) else {"type": "video", "video": video}
        for video in videos
    ]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
