"""Word error rate and digit accuracy (`modeling_omnifusion.evaluation.speech`): one normalisation on both sides,
numerals and number words read alike, corpus-level WER."""

import pytest

from modeling_omnifusion.evaluation.speech import (
    digit_accuracy,
    edit_distance,
    normalize_words,
    number_to_words,
    spoken_digits,
    word_error_rate,
    word_errors,
)


@pytest.mark.parametrize(
    "number, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (40, "forty"),
        (62, "sixty two"),
        (100, "one hundred"),
        (162, "one hundred sixty two"),
        (1000, "one thousand"),
        (2_005_019, "two million five thousand nineteen"),
    ],
)
def test_number_to_words_spells_english_numbers(number, words):
    assert number_to_words(number) == words


def test_number_to_words_refuses_numbers_out_of_range():
    with pytest.raises(ValueError, match="1e9"):
        number_to_words(1_000_000_000)


def test_normalisation_lowercases_strips_punctuation_and_spells_numerals():
    text = "Please press 1, it's 1,000% at 5 A.M. o'clock: sixty-two (007)!"
    assert normalize_words(text) == (
        "please press one its one thousand percent at five am oclock sixty two zero zero seven".split()
    )


def test_normalisation_expands_contractions():
    assert normalize_words("You're sure I can't? We'll see, it won't; I'd, I'm, we've.") == (
        "you are sure i can not we will see it will not i would i am we have".split()
    )
    assert normalize_words("You cannot") == normalize_words("you can\u2019t")


def test_normalisation_reads_numerals_and_number_words_alike():
    assert normalize_words("Press 1 or 20.") == normalize_words("press one, or twenty")


def test_edit_distance_counts_substitutions_deletions_and_insertions():
    assert edit_distance("a b c".split(), "a b c".split()) == 0
    assert edit_distance("a x c".split(), "a b c".split()) == 1
    assert edit_distance("a c".split(), "a b c".split()) == 1
    assert edit_distance("a b c d".split(), "a b c".split()) == 1
    assert edit_distance([], "a b".split()) == 2
    assert edit_distance("x y".split(), []) == 2


def test_word_errors_of_one_pair_after_normalisation():
    assert word_errors("You are currently the only person.", "you are currently the only person") == (0, 6)
    assert word_errors("the quick round fox", "The quick brown fox.") == (1, 4)


def test_wer_is_total_edits_over_total_reference_words():
    predictions = ["the quick round fox", "hello there"]
    references = ["The quick brown fox.", "Hello"]
    assert word_error_rate(predictions, references) == pytest.approx(2 / 5)


def test_wer_is_zero_for_a_perfect_transcript_with_other_spelling():
    assert word_error_rate(["Press 1 for sales."], ["press one for sales"]) == 0.0


def test_wer_can_exceed_one_with_insertions():
    assert word_error_rate(["a b c d"], ["e"]) == 4.0


@pytest.mark.parametrize(
    "predictions, references, match",
    [(["a"], ["a", "b"], "1 predictions for 2"), ([], [], "No references"), (["a"], ["?!"], "no words")],
)
def test_wer_names_bad_input(predictions, references, match):
    with pytest.raises(ValueError, match=match):
        word_error_rate(predictions, references)


@pytest.mark.parametrize(
    "text, digits",
    [
        ("Seven.", "7"),
        ("7", "7"),
        ("zero", "0"),
        ("Oh", "0"),
        ("four 7 two", "472"),
        ("4, 7, 2.", "472"),
        ("twenty one, ninety", "2190"),
        ("fifteen", "15"),
        ("The number is nine.", "9"),
        ("nothing here", ""),
    ],
)
def test_spoken_digits_reads_numerals_and_number_words(text, digits):
    assert spoken_digits(text) == digits


def test_digit_accuracy_matches_words_numerals_and_punctuation():
    predictions = ["Seven.", "8", "three", "Two, two.", "Hello."]
    references = ["7", "eight", "3", "22", "5"]
    assert digit_accuracy(predictions, references) == pytest.approx(4 / 5)


def test_digit_accuracy_refuses_a_reference_without_digits():
    with pytest.raises(ValueError, match="says no digit"):
        digit_accuracy(["seven"], ["hello"])
