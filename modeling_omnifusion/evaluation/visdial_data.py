"""
Checks of Visual Dialog v1.0 files before anything is evaluated, so that a malformed file fails at once with an error
naming the file, the dialog, the round and the field, and nothing is written.

A VisDial file is `{"split": "val2018", "data": {"questions": [str], "answers": [str], "dialogs": [dialog]}}`; a
dialog is `{"image_id": int, "caption": str, "dialog": [round, ...]}` with at least one round; a round is
`{"question": q, "answer": a, "answer_options": [a, ...], "gt_index": i}` where `q` and `a` index `questions` and
`answers` (from 0, no negative index), `answer_options` is a non-empty list and `gt_index` an index into it whose
option is `answer`. `answer` and `gt_index` are absent in the last round of a test dialog (ranked, not scored).

A dense annotations file is a list of `{"image_id", "round_id" (1-based), "gt_relevance" (or train's "relevance")}`,
one relevance value per answer option of that round.
"""

import json
import numbers


def read_json_file(path, what: str):
    """The parsed JSON of `path`; a `ValueError` naming the file (`what` says which one) if it does not parse."""
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a valid JSON file ({what}): {error}") from None


def _is_index(value, size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size


def check_visdial_file(visdial, path) -> None:
    """The structure of a whole VisDial file (`visdial`, parsed from `path`) up to the dialogs' list; the dialogs
    themselves are checked by `check_dialogs`."""
    if not isinstance(visdial, dict) or not isinstance(visdial.get("data"), dict):
        raise ValueError(f"{path}: not a VisDial v1.0 file: expected an object with a 'data' object")
    if not isinstance(visdial.get("split"), str):
        raise ValueError(f"{path}: 'split' (e.g. \"val2018\", which names the images) must be a string")
    data = visdial["data"]
    for field in ("questions", "answers"):
        values = data.get(field)
        if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
            raise ValueError(f"{path}: data.{field} must be a list of strings")
    if not isinstance(data.get("dialogs"), list) or not data["dialogs"]:
        raise ValueError(f"{path}: data.dialogs must be a non-empty list of dialogs")


def check_dialogs(dialogs: list, data: dict, path, first: int = 0) -> None:
    """Every dialog and round of `dialogs` (part of `data`, the file's `data` field, from its dialog `first` on):
    `ValueError` naming the dialog (its position in the file's list and its image_id), the round (1-based) and the
    field."""
    num_questions, num_answers = len(data["questions"]), len(data["answers"])
    for number, dialog in enumerate(dialogs, start=first):
        where = f"{path}: dialog {number}"
        if not isinstance(dialog, dict):
            raise ValueError(f"{where}: expected an object, got {type(dialog).__name__}")
        image_id = dialog.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:
            raise ValueError(f"{where}: 'image_id' must be a non-negative integer, got {image_id!r:.40}")
        where += f" (image_id {image_id})"
        if not isinstance(dialog.get("caption"), str):
            raise ValueError(f"{where}: 'caption' must be a string")
        rounds = dialog.get("dialog")
        if not isinstance(rounds, list) or not rounds:
            raise ValueError(f"{where}: 'dialog' must be a non-empty list of rounds, got {rounds!r:.40}")
        for round_index, visdial_round in enumerate(rounds):
            at = f"{where}, round {round_index + 1}"
            if not isinstance(visdial_round, dict):
                raise ValueError(f"{at}: expected an object, got {type(visdial_round).__name__}")
            if not _is_index(visdial_round.get("question"), num_questions):
                raise ValueError(
                    f"{at}: 'question' must index data.questions (0..{num_questions - 1}), "
                    f"got {visdial_round.get('question')!r:.40}"
                )
            answer = visdial_round.get("answer")
            if "answer" in visdial_round and not _is_index(answer, num_answers):
                raise ValueError(f"{at}: 'answer' must index data.answers (0..{num_answers - 1}), got {answer!r:.40}")
            options = visdial_round.get("answer_options")
            if not isinstance(options, list) or not options:
                raise ValueError(
                    f"{at}: 'answer_options' must be a non-empty list of answer indices, got {options!r:.40}"
                )
            bad = [option for option in options if not _is_index(option, num_answers)]
            if bad:
                raise ValueError(
                    f"{at}: 'answer_options' must index data.answers (0..{num_answers - 1}), got {bad[0]!r:.40}"
                )
            if "gt_index" in visdial_round:
                gt_index = visdial_round["gt_index"]
                if not _is_index(gt_index, len(options)):
                    raise ValueError(
                        f"{at}: 'gt_index' must index its {len(options)} answer_options, got {gt_index!r:.40}"
                    )
                if "answer" in visdial_round and options[gt_index] != visdial_round["answer"]:
                    raise ValueError(f"{at}: answer_options[gt_index] is not the answer")


def check_dense(dense, dialogs: list, path) -> list[dict]:
    """
    The entries of the dense annotations `dense` (parsed from `path`) for the images of `dialogs`, checked: each an
    object with an integer `image_id`, a `round_id` the dialog has and one relevance value (a number) per answer
    option of that round. A `ValueError` names the file, the entry and the field.
    """
    if not isinstance(dense, list):
        raise ValueError(f"{path}: dense annotations must be a list of entries, got {type(dense).__name__}")
    dialogs_by_image = {dialog["image_id"]: dialog for dialog in dialogs}
    kept = []
    for number, entry in enumerate(dense):
        where = f"{path}: entry {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), int):
            raise ValueError(f"{where}: expected an object with an integer 'image_id'")
        dialog = dialogs_by_image.get(entry["image_id"])
        if dialog is None:
            continue
        where += f" (image_id {entry['image_id']})"
        round_id = entry.get("round_id")
        if not _is_index(round_id, len(dialog["dialog"]) + 1) or round_id == 0:
            raise ValueError(f"{where}: image {entry['image_id']} has no round {round_id!r:.40}")
        values = entry.get("gt_relevance", entry.get("relevance"))
        options = dialog["dialog"][round_id - 1]["answer_options"]
        if (
            not isinstance(values, list)
            or len(values) != len(options)
            or not all(isinstance(value, numbers.Real) and not isinstance(value, bool) for value in values)
        ):
            raise ValueError(
                f"{where}: 'gt_relevance' (or 'relevance') must hold one number per answer option of round "
                f"{round_id} ({len(options)}), got {values!r:.60}"
            )
        kept.append(entry)
    return kept
