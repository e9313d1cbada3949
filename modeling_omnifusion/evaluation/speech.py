"""
Speech recognition metrics: word error rate and digit accuracy, with one text normalisation for both sides.

`normalize_words(text)` is what both a transcript and its reference become before they are compared: lowercase;
contractions expanded (`you're` -> `you are`, `can't` and `cannot` -> `can not`, `n't` -> ` not`, `'m`, `'ll`, `'ve`,
`'d`); other apostrophes dropped (`party's` -> `partys`, `o'clock` -> `oclock`); `%` and `&` spelled (`percent`,
`and`); commas inside numbers dropped (`1,000` -> `1000`); dotted abbreviations joined (`A.M.` -> `am`); every other
character that is not a letter or a digit a word break (`sixty-two` -> `sixty two`); numerals spelled out in words
(`20` -> `twenty`, `162` -> `one hundred sixty two`, a numeral with a leading zero or more than nine digits digit by
digit). So `press 1` and `Press one.` normalise to the same words.

`word_error_rate(predictions, references)` is corpus-level: the word-level edit distance (substitutions, deletions,
insertions, each costing 1) summed over all pairs, divided by the total number of reference words.

`spoken_digits(text)` reads the digits a text says, as a string: numerals as written, number words as digits
(`zero`/`oh` 0 ... `nine` 9, `ten` ... `nineteen`, `twenty` ... `ninety`, a tens word followed by a unit word as one
number: `twenty one` -> `21`); other words are ignored. `digit_accuracy(predictions, references)` is the fraction of
pairs whose `spoken_digits` agree exactly (and are not empty), so `Seven.`, `7` and `seven` all match the reference
`7`, and `four seven two` matches `472`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SCALES = ((1_000_000, "million"), (1_000, "thousand"))

DIGIT_WORDS = {word: str(value) for value, word in enumerate(UNITS)} | {"oh": "0"}
DIGIT_WORDS |= {word: str(10 + value) for value, word in enumerate(TEENS)}
TENS_WORDS = {word: value for value, word in enumerate(TENS) if word}

_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_SYMBOLS = {"%": " percent ", "&": " and "}
CONTRACTIONS = (
    (re.compile(r"\bcan't\b"), "can not"),
    (re.compile(r"\bcannot\b"), "can not"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'re\b"), " are"),
    (re.compile(r"'m\b"), " am"),
    (re.compile(r"'ll\b"), " will"),
    (re.compile(r"'ve\b"), " have"),
    (re.compile(r"'d\b"), " would"),
)
_ABBREVIATION = re.compile(r"\b(?:[a-z]\.){2,}")
_LETTERS_DIGITS = re.compile(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])")


def number_to_words(number: int) -> str:
    """English words of a non-negative integer below a billion: `162` -> `one hundred sixty two`."""
    if not 0 <= number < 1_000_000_000:
        raise ValueError(f"number_to_words takes 0 <= number < 1e9, got {number}")
    if number < 10:
        return UNITS[number]
    if number < 20:
        return TEENS[number - 10]
    if number < 100:
        return TENS[number // 10] + ("" if number % 10 == 0 else " " + UNITS[number % 10])
    if number < 1000:
        rest = number % 100
        return UNITS[number // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for scale, name in SCALES:
        if number >= scale:
            rest = number % scale
            return number_to_words(number // scale) + f" {name}" + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError(number)


def _numeral_words(numeral: str) -> str:
    if (len(numeral) > 1 and numeral.startswith("0")) or len(numeral) > 9:
        return " ".join(UNITS[int(digit)] for digit in numeral)
    return number_to_words(int(numeral))


def _tokens(text: str) -> list[str]:
    """Lowercase word and numeral tokens of `text`, punctuation removed (numerals kept as digits)."""
    text = text.lower().replace("\u2019", "'")
    for pattern, expansion in CONTRACTIONS:
        text = pattern.sub(expansion, text)
    text = text.replace("'", "")
    text = _NUMBER_COMMA.sub("", _ABBREVIATION.sub(lambda match: match.group().replace(".", ""), text))
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    text = _LETTERS_DIGITS.sub(" ", "".join(char if char.isalnum() else " " for char in text))
    return text.split()


def normalize_words(text: str) -> list[str]:
    """The words `text` is compared by (module docstring): lowercase, no punctuation, numerals spelled out."""
    words = []
    for token in _tokens(text):
        words += _numeral_words(token).split() if token.isdigit() else [token]
    return words


def edit_distance(hypothesis: Sequence[str], reference: Sequence[str]) -> int:
    """The Levenshtein distance between two word sequences (substitution, deletion, insertion each cost 1)."""
    previous = list(range(len(reference) + 1))
    for i, word in enumerate(hypothesis, start=1):
        current = [i]
        for j, target in enumerate(reference, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != target)))
        previous = current
    return previous[-1]


def word_errors(prediction: str, reference: str) -> tuple[int, int]:
    """(word edits, reference words) of one pair, after `normalize_words` on both."""
    reference_words = normalize_words(reference)
    return edit_distance(normalize_words(prediction), reference_words), len(reference_words)


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus WER: total word edits over total reference words (0.0 is perfect; it can exceed 1.0)."""
    _check_pairs(predictions, references)
    edits = words = 0
    for prediction, reference in zip(predictions, references):
        pair_edits, pair_words = word_errors(prediction, reference)
        edits, words = edits + pair_edits, words + pair_words
    if words == 0:
        raise ValueError("The references hold no words after normalisation")
    return edits / words


def spoken_digits(text: str) -> str:
    """The digits `text` says, as one string (module docstring): `Seven.` -> `7`, `four 7 two` -> `472`."""
    digits, tens = [], None
    for token in _tokens(text):
        if tens is not None:
            if token in UNITS[1:]:
                digits.append(str(tens + UNITS.index(token)))
                tens = None
                continue
            digits.append(str(tens))
            tens = None
        if token.isdigit():
            digits.append(token)
        elif token in TENS_WORDS:
            tens = 10 * TENS_WORDS[token]
        elif token in DIGIT_WORDS:
            digits.append(DIGIT_WORDS[token])
    if tens is not None:
        digits.append(str(tens))
    return "".join(digits)


def digit_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of pairs whose `spoken_digits` are equal; a reference that says no digit is a ValueError."""
    _check_pairs(predictions, references)
    correct = 0
    for prediction, reference in zip(predictions, references):
        expected = spoken_digits(reference)
        if not expected:
            raise ValueError(f"The reference {reference!r} says no digit")
        correct += spoken_digits(prediction) == expected
    return correct / len(references)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("No references to score")
