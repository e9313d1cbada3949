"""Malformed Visual Dialog files (`modeling_omnifusion.evaluation.visdial_data`): refused up front, naming the file,
dialog, round and field, with nothing written."""

import copy
import json
from pathlib import Path

import pytest
from visdial_data import VISDIAL_DATA_DIR

from modeling_omnifusion.evaluation import visdial as evaluate_visdial

SAMPLE = VISDIAL_DATA_DIR / "visdial_1.0_val_sample5.json"
DENSE = VISDIAL_DATA_DIR / "visdial_1.0_val_dense_annotations_sample5.json"
FIRST = "dialog 0 \\(image_id 239030\\)"


def drop(field):
    return lambda value: value.pop(field)


def dialog0(change):
    def apply(visdial):
        change(visdial["data"]["dialogs"][0])

    return apply


def round0(change):
    return dialog0(lambda dialog: change(dialog["dialog"][0]))


# what is done to the sample file -> what the error says
BROKEN_FILES = {
    "no-data": (drop("data"), "not a VisDial v1.0 file: expected an object with a 'data' object"),
    "no-split": (drop("split"), "'split' .* must be a string"),
    "no-dialogs": (lambda v: v["data"].update(dialogs=[]), "data.dialogs must be a non-empty list"),
    "questions-not-strings": (lambda v: v["data"]["questions"].append(3), "data.questions must be a list of strings"),
    "dialog-without-dialog": (dialog0(drop("dialog")), f"{FIRST}: 'dialog' must be a non-empty list of rounds"),
    "dialog-empty": (dialog0(lambda d: d.update(dialog=[])), f"{FIRST}: 'dialog' must be a non-empty list"),
    "no-caption": (dialog0(drop("caption")), f"{FIRST}: 'caption' must be a string"),
    "no-image-id": (dialog0(drop("image_id")), "dialog 0: 'image_id' must be a non-negative integer"),
    "round-without-options": (
        round0(drop("answer_options")),
        f"{FIRST}, round 1: 'answer_options' must be a non-empty",
    ),
    "options-empty": (round0(lambda r: r.update(answer_options=[])), f"{FIRST}, round 1: 'answer_options' must be"),
    "option-out-of-range": (
        round0(lambda r: r["answer_options"].__setitem__(5, 10**9)),
        f"{FIRST}, round 1: 'answer_options' must index data.answers .* got 1000000000",
    ),
    "gt-index-100": (round0(lambda r: r.update(gt_index=100)), f"{FIRST}, round 1: 'gt_index' must index its 100"),
    "question-minus-1": (round0(lambda r: r.update(question=-1)), f"{FIRST}, round 1: 'question' must index"),
    "question-a-string": (round0(lambda r: r.update(question="3")), f"{FIRST}, round 1: 'question' must index"),
    "answer-out-of-range": (round0(lambda r: r.update(answer=-2)), f"{FIRST}, round 1: 'answer' must index"),
    "gt-not-the-answer": (
        round0(lambda r: r.update(gt_index=(r["gt_index"] + 1) % 100)),
        f"{FIRST}, round 1: answer_options\\[gt_index\\] is not the answer",
    ),
}


def write(path: Path, visdial) -> Path:
    path.write_text(json.dumps(visdial))
    return path


@pytest.fixture(scope="module")
def sample():
    return json.loads(SAMPLE.read_text())


def run(tmp_path, visdial_json, dense_json=None):
    """The evaluation command on files that fail their check: the model is never loaded (it does not exist)."""
    args = ["--model", str(tmp_path / "no-model"), "--visdial_json", str(visdial_json)]
    args += ["--images_dir", str(tmp_path), "--output", str(tmp_path / "out" / "results.json")]
    evaluate_visdial.main(args + (["--dense_json", str(dense_json)] if dense_json else []))


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_malformed_visdial_file_is_refused_up_front_naming_dialog_round_and_field(tmp_path, sample, case):
    change, message = BROKEN_FILES[case]
    visdial = copy.deepcopy(sample)
    change(visdial)
    path = write(tmp_path / "visdial.json", visdial)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        run(tmp_path, path)
    assert not (tmp_path / "out").exists()


def test_a_truncated_file_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "visdial.json"
    path.write_text(SAMPLE.read_text()[:5000])
    with pytest.raises(ValueError, match=f"{path}: not a valid JSON file \\(VisDial dialogs\\)"):
        run(tmp_path, path)
    dense = tmp_path / "dense.json"
    dense.write_text(DENSE.read_text()[:100])
    with pytest.raises(ValueError, match=f"{dense}: not a valid JSON file \\(dense annotations\\)"):
        run(tmp_path, SAMPLE, dense)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda entry: entry.update(round_id=11), "has no round 11"),
        (lambda entry: entry.update(round_id=0), "has no round 0"),
        (lambda entry: entry["gt_relevance"].pop(), "one number per answer option of round .* \\(100\\)"),
        (lambda entry: entry.pop("gt_relevance"), "'gt_relevance' \\(or 'relevance'\\) must hold"),
    ],
)
def test_a_malformed_dense_file_is_refused_naming_the_entry(tmp_path, change, message):
    dense = json.loads(DENSE.read_text())
    change(dense[0])
    path = write(tmp_path / "dense.json", dense)
    with pytest.raises(ValueError, match=f"{path}: entry 0 \\(image_id {dense[0]['image_id']}\\): .*{message}"):
        run(tmp_path, SAMPLE, path)
    assert not (tmp_path / "out").exists()


def test_the_real_files_pass_and_a_test_split_without_ground_truth_prints_na(sample):
    data, _, dense = evaluate_visdial.load_visdial(SAMPLE, DENSE)
    assert len(data["dialogs"]) == 5 and len(dense) == 5
    crowdsourced = VISDIAL_DATA_DIR / "visdial_1.0_val_crowdsourced.json"
    evaluate_visdial.load_visdial(
        crowdsourced, VISDIAL_DATA_DIR / "visdial_1.0_val_dense_annotations_crowdsourced.json"
    )
    table = evaluate_visdial.results_table([{"model": "test split", "metrics": None}])
    assert table.splitlines()[-1] == "| test split | n/a | n/a | n/a | n/a | n/a |"
