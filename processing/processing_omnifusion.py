"""OmniFusion processor: image processor + tokenizer + the released prompt layout as a chat template."""

import numpy as np
from tokenizers import AddedToken
from tokenizers import normalizers as tk_normalizers
from tokenizers import pre_tokenizers as tk_pre_tokenizers
from transformers.processing_utils import MultiModalData, ProcessorMixin


DEFAULT_SYSTEM_PROMPT = "This is a dialog with AI assistant.\n"

# The released sequence: system prompt, then for every user turn its image blocks and <user> + text, for every
# assistant turn <assistant> + text (+ EOS when `end_assistant_turns_with_eos`); nothing in between, no BOS.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set content = messages[0]['content'] -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{{- system_prompt | default('" + DEFAULT_SYSTEM_PROMPT.replace("\n", "\\n") + "') -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is not string -%}"
    "{%- for item in content if item['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}<user>{%- else -%}<assistant>{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}{%- endif -%}"
    "{%- if end_assistant_turns_with_eos -%}{{- eos_token -}}{%- endif -%}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<assistant>{%- endif -%}"
)


def _as_rgb_compatible(image):
    """2-D (grayscale) arrays and tensors get a channel axis; everything else is passed through unchanged."""
    if isinstance(image, (list, tuple)):
        return [_as_rgb_compatible(item) for item in image]
    if hasattr(image, "ndim") and image.ndim == 2:
        array = image.numpy() if hasattr(image, "numpy") else image
        return np.repeat(np.asarray(array)[..., None], 3, axis=-1)
    return image


def _encode_segments_independently(tokenizer):
    """
    Make the tokenizer encode each stretch of text between special tokens exactly as if it were encoded on its own.

    The released code called `encode(text, add_special_tokens=False)` once per segment with SentencePiece, which
    puts the word-boundary marker in front of every segment (even one that starts with a space). A fast tokenizer
    splits special tokens out before normalizing, so moving a Metaspace pre-tokenizer's prepend into the normalizer
    (`Prepend("▁")`, then spaces to "▁": SentencePiece's own order) reproduces those ids for every segment.
    Byte-level BPE tokenizers already encode segments independently and are left unchanged.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    if not isinstance(pre_tokenizer, tk_pre_tokenizers.Metaspace) or pre_tokenizer.prepend_scheme == "never":
        return
    replacement = pre_tokenizer.replacement
    steps = [tk_normalizers.Prepend(replacement), tk_normalizers.Replace(" ", replacement)]
    if backend.normalizer is not None:
        steps.insert(0, backend.normalizer)
    backend.normalizer = tk_normalizers.Sequence(steps)
    backend.pre_tokenizer = tk_pre_tokenizers.Metaspace(
        replacement=replacement, prepend_scheme="never", split=pre_tokenizer.split
    )


class OmniFusionProcessor(ProcessorMixin):
    r"""
    Builds OmniFusion inputs: `pixel_values` from the image processor and `input_ids` in which every `<image>`
    placeholder becomes `<image_start>` + `num_image_tokens` x `<image>` + `<image_end>`.

    Args:
        image_processor: any transformers image processor (CLIP's for the released model).
        tokenizer: the LM's tokenizer. The five special tokens are added to it if missing, a pad token is set when it
            has none (`<unk>` as in the released training code, else EOS) and padding is on the left, for generation.
        num_image_tokens (`int`): image positions per image, `OmniFusionConfig.num_image_tokens`.
        end_assistant_turns_with_eos (`bool`, defaults to `False`): whether the chat template closes every
            assistant turn with the tokenizer's EOS. The released model never saw EOS after a reply (so it does not
            stop by itself); models trained with this project's scripts set it to `True` so generation stops.
        chat_template: defaults to the released prompt layout, `DEFAULT_CHAT_TEMPLATE`.

    Text segments between special tokens are tokenized independently and no BOS is added, exactly as the released
    code did.
    """

    text_kwargs = {"add_special_tokens": False, "padding": "longest"}

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
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_start_token = image_start_token
        self.image_end_token = image_end_token
        self.user_token = user_token
        self.assistant_token = assistant_token
        self.end_assistant_turns_with_eos = end_assistant_turns_with_eos
        special_tokens = [image_token, image_start_token, image_end_token, user_token, assistant_token]
        missing = [token for token in special_tokens if token not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        tokenizer.padding_side = "left"
        _encode_segments_independently(tokenizer)
        self.image_token_id, self.image_start_token_id, self.image_end_token_id, self.user_token_id, self.assistant_token_id = (
            tokenizer.convert_tokens_to_ids(special_tokens)
        )
        self.image_token_ids = [self.image_token_id, self.image_start_token_id, self.image_end_token_id]
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The `OmniFusionConfig` fields for this processor's special ids."""
        return {
            "image_token_id": self.image_token_id,
            "image_start_token_id": self.image_start_token_id,
            "image_end_token_id": self.image_end_token_id,
            "user_token_id": self.user_token_id,
            "assistant_token_id": self.assistant_token_id,
        }

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if images is not None:
            images = _as_rgb_compatible(images)
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.num_image_tokens is None:
            raise ValueError("OmniFusionProcessor needs `num_image_tokens` (OmniFusionConfig.num_image_tokens).")
        return self.image_start_token + self.image_token * self.num_image_tokens + self.image_end_token

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Tokens each image becomes (its whole block, markers included); one patch per image."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens + 2] * len(image_sizes),
            num_image_patches=[1] * len(image_sizes),
        )

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Also writes a standalone `preprocessor_config.json`, for tools that read the image processor alone."""
        saved = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        return saved

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        kwargs.setdefault("end_assistant_turns_with_eos", self.end_assistant_turns_with_eos)
        return super().apply_chat_template(conversation, chat_template, **kwargs)


__all__ = ["OmniFusionProcessor", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT"]
