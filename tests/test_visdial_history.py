"""The VisDial dialog-history policy (`visdial_scoring.HISTORY_POLICY`): every round fits the LM's positions by
keeping the image, the caption and the most recent earlier rounds that fit."""

import pytest

from modeling_omnifusion.evaluation import visdial_scoring
from modeling_omnifusion.testing.tiny import make_image, make_model_and_processor

QUESTIONS = ["is it red", "how many shapes are in the picture", "is it big", "any people", "what is on the left"]
ANSWERS = ["yes", "no", "two circles and one square", "it is blue", "one", "a small yellow triangle"]
DATA = {
    "questions": QUESTIONS,
    "answers": ANSWERS,
    "dialogs": [
        {
            "image_id": 3,
            "caption": "a small yellow triangle on the left of a purple square",
            "dialog": [
                {"question": index % 5, "answer": (index + 2) % 6, "gt_index": 0, "answer_options": [(index + 2) % 6]}
                for index in range(8)
            ],
        }
    ],
}
for visdial_round in DATA["dialogs"][0]["dialog"]:
    visdial_round["answer_options"] += [index for index in range(6) if index != visdial_round["answer"]]
IMAGES = {3: make_image(3)}


def context_length(processor, history, question) -> int:
    messages = visdial_scoring.dialog_messages(IMAGES[3], DATA["dialogs"][0]["caption"], history, question)
    return visdial_scoring.build_context(processor, messages)["input_ids"].shape[1]


def test_rounds_beyond_the_positions_keep_the_caption_and_the_most_recent_rounds_that_fit():
    model, processor = make_model_and_processor()
    longest = max(len(ids) for ids in visdial_scoring.tokenize_candidates(processor.tokenizer, ANSWERS))
    rounds = DATA["dialogs"][0]["dialog"]
    questions = [QUESTIONS[r["question"]] + "?" for r in rounds]
    full = [(questions[i], ANSWERS[r["answer"]]) for i, r in enumerate(rounds)]
    limit = context_length(processor, full[:3], questions[3]) + longest - 1  # round 4 on no longer fit whole
    model.config.text_config.max_position_embeddings = limit  # what the model's prompt-length guard reads

    stats = {}
    metrics, ranks = visdial_scoring.evaluate_dialogs(model, processor, DATA, IMAGES, progress=False, stats=stats)

    expected, cut = [], 0
    for index, question in enumerate(questions):
        kept = index
        while context_length(processor, full[index - kept : index], question) + longest > limit:
            kept -= 1
        cut += kept < index
        messages = visdial_scoring.dialog_messages(
            IMAGES[3], DATA["dialogs"][0]["caption"], full[index - kept : index], question
        )
        candidates = [ANSWERS[option] for option in rounds[index]["answer_options"]]
        naive = visdial_scoring.score_candidates_naive(
            model,
            visdial_scoring.build_context(processor, messages),
            visdial_scoring.tokenize_candidates(processor.tokenizer, candidates),
        )
        expected.append(visdial_scoring.visdial_metric.scores_to_ranks(naive.double().numpy()).tolist())
    assert [entry["ranks"] for entry in ranks] == expected and len(ranks) == 8 and metrics is not None
    assert stats == {"rounds_with_cut_history": cut, "max_length": limit} and 5 <= cut < 8


def test_a_round_that_does_not_fit_without_any_history_is_an_error_naming_it():
    model, processor = make_model_and_processor()
    first_question = QUESTIONS[DATA["dialogs"][0]["dialog"][0]["question"]] + "?"
    limit = context_length(processor, [], first_question)
    with pytest.raises(ValueError, match=f"VisDial image 3 round 1: the image, caption and question take {limit} "):
        visdial_scoring.evaluate_dialogs(model, processor, DATA, IMAGES, progress=False, max_length=limit)
