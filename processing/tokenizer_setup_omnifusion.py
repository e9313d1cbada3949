"""
Tokenizer set-up for OmniFusion: the image placeholder and marker tokens, the pad token, segment-independent
encoding, the text escape, no default BOS, and reading tokenizer folders (a clear error for one that cannot be read,
SentencePiece's merge order for a `tokenizer.model`).
"""

import importlib.util
import json
import os

from tokenizers import AddedToken
from tokenizers import models as tk_models
from tokenizers import normalizers as tk_normalizers
from tokenizers import pre_tokenizers as tk_pre_tokenizers
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Message text is escaped by the chat template: a word joiner (U+2060) after every "<", so that no text a user types
# can spell a marker or a special token (they all start with "<") in the rendered prompt, whichever engine tokenizes
# it. The tokenizer's normalizer deletes the word joiner again (`delete_text_escape`); it runs after the special
# tokens are split out, so escaped text gets exactly the ids of the same characters as ordinary text.
TEXT_ESCAPE = "\u2060"


# Files from which transformers builds a tokenizer without a SentencePiece model (a BPE/WordPiece vocabulary or
# Mistral's tekken); with none of these, no `tokenizer.json` and no `tokenizer.model`, a folder has no tokenizer.
OTHER_TOKENIZER_FILES = ("vocab.json", "vocab.txt", "tekken.json", "spiece.model", "sentencepiece.bpe.model")
SENTENCEPIECE_PACKAGES = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a missing parent package, or a module set to None
        return True


def check_tokenizer_folder(folder) -> str | None:
    """
    Check a local tokenizer folder before transformers reads it, so that a problem is named instead of surfacing as
    a misleading fallback error. A folder without `tokenizer.json` that holds a SentencePiece `tokenizer.model` (the
    released OmniFusion layout) needs the `sentencepiece` and `protobuf` packages to be read: `ImportError` naming
    the missing ones. A folder with no tokenizer file at all: `FileNotFoundError` naming the folder. A Hub id (not a
    local folder) is left to transformers.

    Returns the path of the SentencePiece model the tokenizer will be built from (for
    `rank_merges_by_sentencepiece_scores`), or `None`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    model_file = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(model_file):
        with open(model_file, "rb") as file:
            if file.read(1) != b"\n":  # not a serialized SentencePiece ModelProto (a tiktoken file is text)
                return None
        missing = [package for package, module in SENTENCEPIECE_PACKAGES.items() if _module_missing(module)]
        if missing:
            raise ImportError(
                f"{model_file} is a SentencePiece model and {folder} has no tokenizer.json: reading it needs the "
                f"{' and '.join(missing)} package{'s' if len(missing) > 1 else ''}, not installed here "
                f"(pip install {' '.join(missing)})."
            )
        return model_file
    if not any(os.path.isfile(os.path.join(folder, name)) for name in OTHER_TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer: no tokenizer.json (the file save_pretrained writes), no SentencePiece "
            f"tokenizer.model and no vocabulary file ({', '.join(OTHER_TOKENIZER_FILES)})."
        )
    return None


def rank_merges_by_sentencepiece_scores(tokenizer, model_file) -> None:
    """
    Give a tokenizer built from a SentencePiece BPE `model_file` the merge order SentencePiece encodes with.

    SentencePiece merges, at each step, the adjacent pair whose joined piece has the highest score. transformers 5
    ranks the merges it derives from a `tokenizer.model` by vocabulary id instead, and the two orders differ where a
    whitespace-only piece (`▁▁`, score -1e9 but a low id in Mistral's vocabulary) competes: `"it  is"` became
    `▁it ▁▁ is` instead of SentencePiece's `▁it ▁ ▁is`. Rebuilding the BPE model with score-ranked merges restores
    SentencePiece's ids; a Unigram model, or a tokenizer that is not BPE, is left unchanged.
    """
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    backend = tokenizer.backend_tokenizer
    if not isinstance(backend.model, tk_models.BPE):
        return
    proto = import_protobuf().ModelProto()
    with open(model_file, "rb") as file:
        proto.ParseFromString(file.read())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        return
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    scores = {piece.piece: piece.score for piece in proto.pieces}
    backend.model = tk_models.BPE(
        vocab=vocab,
        merges=generate_merges(vocab, scores),
        unk_token=proto.trainer_spec.unk_piece,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )


def encode_segments_independently(tokenizer):
    """
    Make the tokenizer encode each stretch of text between special tokens exactly as if it were encoded on its own.

    The released code called `encode(text, add_special_tokens=False)` once per segment with SentencePiece, which
    puts the word-boundary symbol "▁" in front of every segment (even one that starts with a space). A fast tokenizer
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


def delete_text_escape(tokenizer):
    """
    Make the tokenizer's normalizer delete `TEXT_ESCAPE`, so escaped message text gets the ids of its characters.
    Normalizing happens after the special tokens are split out, so an escaped "<user>" can never become the marker.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"OmniFusionProcessor needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}; "
            "load it with AutoTokenizer.from_pretrained(...)."
        )
    if backend.normalizer is not None and TEXT_ESCAPE not in backend.normalizer.normalize_str(TEXT_ESCAPE):
        return
    steps = [tk_normalizers.Replace(TEXT_ESCAPE, "")]
    if backend.normalizer is not None:
        steps.append(backend.normalizer)
    backend.normalizer = tk_normalizers.Sequence(steps)


def tokens_text_can_spell(tokenizer) -> list[str]:
    """The tokenizer's added tokens that escaped message text still encodes to (none for the usual "<...>" tokens)."""
    tokens = [token for token in tokenizer.added_tokens_encoder if token]
    escaped = [token.replace("<", "<" + TEXT_ESCAPE) for token in tokens]
    encodings = tokenizer(escaped, add_special_tokens=False, padding=False)["input_ids"]
    return [token for token, ids in zip(tokens, encodings) if tokenizer.added_tokens_encoder[token] in ids]


def without_default_bos(tokenizer):
    """
    Stop the tokenizer adding BOS when called with its default `add_special_tokens=True`.

    The released sequence never starts with BOS, but Llama/Mistral tokenizers add one by default (`add_bos_token`,
    the post-processor's template). The processor passes `add_special_tokens=False`; serving engines (vLLM) tokenize
    the rendered chat template with the tokenizer's defaults, so the saved tokenizer itself must not add it.
    """
    if tokenizer.bos_token_id is None:
        return
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False  # the setter rebuilds a fast tokenizer's post-processor
    probe = tokenizer("a").input_ids
    if probe and probe[0] == tokenizer.bos_token_id and hasattr(tokenizer, "update_post_processor"):
        # A post-processor from tokenizer.json that adds BOS while `add_bos_token` says it does not.
        object.__setattr__(tokenizer, "_add_bos_token", False)
        tokenizer.update_post_processor()
        probe = tokenizer("a").input_ids
    if probe and probe[0] == tokenizer.bos_token_id:
        raise ValueError(
            f"OmniFusionProcessor: the tokenizer {type(tokenizer).__name__} adds BOS ({tokenizer.bos_token!r}) by "
            "default and it could not be switched off; the released prompt has no BOS."
        )


def load_tokenizer_json_as_saved(save_directory):
    """
    Make the saved `tokenizer_config.json` name the generic `TokenizersBackend` instead of a model-specific class.

    `LlamaTokenizer` and its kin rebuild the normalizer and pre-tokenizer from their class defaults on load, which
    undoes `encode_segments_independently` for anything that loads the tokenizer alone (`AutoTokenizer`, vLLM);
    the generic class loads `tokenizer.json` as it was saved.
    """
    path = os.path.join(save_directory, "tokenizer_config.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(save_directory, "tokenizer.json")):
        return
    with open(path, encoding="utf-8") as file:
        tokenizer_config = json.load(file)
    if tokenizer_config.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        return
    tokenizer_config["tokenizer_class"] = "TokenizersBackend"
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(tokenizer_config, file, indent=2, ensure_ascii=False)
        file.write("\n")
    os.replace(path + ".tmp", path)


def set_up_tokenizer(tokenizer, markers: list[str]) -> list[int]:
    """
    Prepare the LM's tokenizer for OmniFusion prompts and return the ids of `markers` (the image placeholder and the
    markers, in marker-table order).

    Adds the `markers` missing from its vocabulary (as special tokens), sets a pad token when it has none (`<unk>`
    as in the released training code, else EOS) and pads on the left, for generation. It then encodes every text
    segment between special tokens on its own (`encode_segments_independently`), deletes `TEXT_ESCAPE` when
    normalizing (`delete_text_escape`: a `TypeError` for a tokenizer that is not a fast one), warns about added
    tokens that escaped message text can still spell, and adds no BOS by default (`without_default_bos`).
    """
    missing = [token for token in markers if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "left"
    encode_segments_independently(tokenizer)
    delete_text_escape(tokenizer)
    spellable = tokens_text_can_spell(tokenizer)
    if spellable:
        logger.warning(
            "Message text can still spell these tokens of the tokenizer (the chat template escapes only tokens "
            "that start with '<'): %s",
            spellable,
        )
    without_default_bos(tokenizer)
    return tokenizer.convert_tokens_to_ids(markers)


__all__ = [
    "TEXT_ESCAPE",
    "check_tokenizer_folder",
    "delete_text_escape",
    "encode_segments_independently",
    "load_tokenizer_json_as_saved",
    "rank_merges_by_sentencepiece_scores",
    "set_up_tokenizer",
    "tokens_text_can_spell",
    "without_default_bos",
]
