"""Each offline task config runs through lmms-eval on tiny local files laid out like its Hub dataset."""

import pytest
from datasets import Dataset, Features, Image, Sequence, Value
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager, get_task_dict

from modeling_omnifusion.evaluation.lmms import TASKS_DIR
from modeling_omnifusion.evaluation.lmms.model import OmniFusionLMMs
from modeling_omnifusion.testing.tiny import make_image

QUESTIONS = ["What is the colour of the shape?", "How many circles are there?", "Is it red?"]


def _write(path, rows: dict, features: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=Features(features)).to_parquet(str(path))


def _images(count: int, offset: int = 0):
    return [make_image(seed=offset + index, size=40) for index in range(count)]


def write_pope(root):
    rows = {
        "question_id": ["1", "2", "3"],
        "question": QUESTIONS,
        "answer": ["yes", "no", "yes"],
        "image_source": ["a", "b", "c"],
        "category": ["adversarial"] * 3,
        "image": _images(3),
    }
    features = {name: Value("string") for name in rows if name != "image"} | {"image": Image()}
    _write(root / "lmms_data/POPE/data/test-00000-of-00001.parquet", rows, features)


def write_textvqa(root):
    rows = {
        "question_id": [1, 2, 3],
        "question": QUESTIONS,
        "answers": [["red"] * 10, ["two"] * 10, ["yes"] * 10],
        "ocr_tokens": [["a"], ["b"], []],
        "image": _images(3),
    }
    features = {
        "question_id": Value("int64"),
        "question": Value("string"),
        "answers": Sequence(Value("string")),
        "ocr_tokens": Sequence(Value("string")),
        "image": Image(),
    }
    _write(root / "lmms_data/textvqa/data/validation-00000-of-00001.parquet", rows, features)


def write_scienceqa(root):
    rows = {
        "question": QUESTIONS,
        "hint": ["", "A hint.", ""],
        "choices": [["red", "blue"], ["one", "two", "three"], ["yes", "no"]],
        "answer": [0, 1, 0],
        "image": _images(3),
    }
    features = {
        "question": Value("string"),
        "hint": Value("string"),
        "choices": Sequence(Value("string")),
        "answer": Value("int64"),
        "image": Image(),
    }
    _write(root / "lmms_data/ScienceQA/ScienceQA-IMG/test-00000-of-00001.parquet", rows, features)


def write_gqa(root):
    questions = {"id": ["q1", "q2", "q3"], "imageId": ["n2", "n1", "n2"], "question": QUESTIONS, "answer": ["red"] * 3}
    _write(
        root / "lmms_data/GQA/testdev_balanced_instructions/testdev-00000-of-00001.parquet",
        questions,
        {name: Value("string") for name in questions},
    )
    images = {"id": ["n1", "n2", "n3"], "image": _images(3, offset=10)}
    _write(
        root / "lmms_data/GQA/testdev_balanced_images/testdev-00000-of-00001.parquet",
        images,
        {"id": Value("string"), "image": Image()},
    )


def write_ok_vqa(root):
    rows = {
        "question_id": ["1", "2", "3"],
        "question": QUESTIONS,
        "answers": [["red"] * 10, ["two"] * 10, ["yes"] * 10],
        "image": _images(3),
    }
    features = {
        "question_id": Value("string"),
        "question": Value("string"),
        "answers": Sequence(Value("string")),
        "image": Image(),
    }
    _write(root / "lmms_data/OK-VQA/data/val2014-00000-of-00001.parquet", rows, features)


TASKS = {
    "pope_local": (write_pope, "pope_accuracy"),
    "textvqa_val_local": (write_textvqa, "exact_match"),
    "scienceqa_img_local": (write_scienceqa, "exact_match"),
    "gqa_local": (write_gqa, "exact_match"),
    "ok_vqa_val2014_local": (write_ok_vqa, "exact_match"),
}


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS_DIR))


# Random tiny models never stop by themselves: every task's replies are capped at a few tokens.
MAX_NEW_TOKENS = 6


def omnifusion(model_dir, **kwargs):
    return OmniFusionLMMs(pretrained=str(model_dir), device="cpu", dtype="float32", **kwargs)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_offline_task_answers_every_doc_with_the_models_greedy_reply(
    task, tmp_path, monkeypatch, task_manager, tiny_model_dir
):
    write, metric = TASKS[task]
    write(tmp_path)
    monkeypatch.chdir(tmp_path)
    results = simple_evaluate(
        model=omnifusion(tiny_model_dir, batch_size=2),
        tasks=[task],
        task_manager=task_manager,
        gen_kwargs=f"max_new_tokens={MAX_NEW_TOKENS}",
        log_samples=True,
    )

    values = {key.split(",")[0]: value for key, value in results["results"][task].items()}
    assert 0.0 <= values[metric] <= 1.0
    samples = results["samples"][task]
    assert sorted(sample["doc_id"] for sample in samples) == [0, 1, 2]
    # each reply equals greedy `generate` on the same chat alone (the task ran in batches of 2, left-padded)
    model = omnifusion(tiny_model_dir)
    chats = _task_chats(task_manager, task)
    expected = [model._generate([chat], {"max_new_tokens": MAX_NEW_TOKENS})[0] for chat in chats]
    answers = [sample["resps"][0][0] for sample in sorted(samples, key=lambda sample: sample["doc_id"])]
    assert answers == [answer.split("ASSISTANT:")[0] for answer in expected]


def _task_chats(task_manager, task):
    """Each doc's chat as lmms-eval's tasks mean it: one user turn, the doc's images, then its prompt text."""
    task_object = get_task_dict([task], task_manager, task_type="chat")[task]
    chats = []
    for doc in task_object.dataset[task_object.config.test_split]:
        images = [{"type": "image", "image": image} for image in task_object.doc_to_visual(doc)]
        chats.append([{"role": "user", "content": [*images, {"type": "text", "text": task_object.doc_to_text(doc)}]}])
    return chats
