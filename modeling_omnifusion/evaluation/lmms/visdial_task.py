"""
The lmms-eval task `visdial_val`: Visual Dialog v1.0, the 100 answer candidates of every round ranked by
log-likelihood, reported with the official metrics (R@1/5/10, MRR, mean rank, NDCG).

One doc is one round. Its context is the VisDial prompt of `visdial_scoring` (the image with the describe request,
the caption as the assistant's reply, the ground-truth history, the question with its "?"); every candidate is one
`loglikelihood` request scored as the reply, with the task's `score` (`mean`, the released OmniFusion convention
and `omnifusion-evaluate-visdial`'s default, or `sum`). With the `omnifusion` model the rounds of a dialog run on one
growing KV cache through `visdial_scoring.DialogScorer`, exactly as `omnifusion-evaluate-visdial` runs them, so both
give the same metrics on the same data, score and `candidate_batch_size` (= `--batch_size` there).

Task arguments (`dataset_kwargs` of the task's YAML; relative paths are read from the working directory):
`visdial_json` (e.g. `visdial_1.0_val.json`), `dense_json` (the dense relevance annotations; NDCG is left out
without them), `images_dir` (`VisualDialog_<split>_<12-digit image_id>.jpg`), `score` (`mean` or `sum`) and
`max_dialogs` (the first N dialogs only).
"""

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from lmms_eval.api.instance import Instance

from .. import visdial_scoring
from ..visdial import image_loader, load_visdial
from ..visdial_scoring import SCORE_TYPES, dialog_messages, visdial_round_question
from .offline_tasks import ClassConfigTask

TASK_ARGUMENTS = ("visdial_json", "dense_json", "images_dir", "score", "max_dialogs")


def visdial_rounds(visdial_json, dense_json=None, max_dialogs=None) -> tuple[list[dict], str]:
    """
    The rounds of a VisDial v1.0 file as flat docs, dialog by dialog, and the file's split. A doc holds `image_id`,
    `round_id` (1-based), `caption`, `history` (earlier `[question?, answer]` pairs), `question` (with "?"),
    `answer_options` (the candidate texts), `gt_index` (-1 where the round has none) and `relevance` (the dense
    relevance of the dialog's annotated round, else empty).
    """
    data, split, dense = load_visdial(visdial_json, dense_json, max_dialogs)
    dense_by_image = {entry["image_id"]: entry for entry in dense or []}
    questions, answers = data["questions"], data["answers"]
    docs = []
    for dialog in data["dialogs"]:
        entry = dense_by_image.get(dialog["image_id"])
        history = []
        for round_index, visdial_round in enumerate(dialog["dialog"]):
            question = visdial_round_question(questions[visdial_round["question"]])
            dense_round = entry is not None and entry["round_id"] == round_index + 1
            docs.append(
                {
                    "image_id": dialog["image_id"],
                    "round_id": round_index + 1,
                    "caption": dialog["caption"],
                    "history": [list(pair) for pair in history],
                    "question": question,
                    "answer_options": [answers[index] for index in visdial_round["answer_options"]],
                    "gt_index": visdial_round.get("gt_index", -1),
                    "relevance": list(entry.get("gt_relevance", entry.get("relevance"))) if dense_round else [],
                }
            )
            if "answer" in visdial_round:
                history.append((question, answers[visdial_round["answer"]]))
    return docs, split


class VisDialTask(ClassConfigTask):
    """`visdial_val`: loglikelihood requests `(question, candidate, doc_to_messages, doc_id, task, split, score)`."""

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        arguments = dict(dataset_kwargs or {})
        unknown = set(arguments) - set(TASK_ARGUMENTS)
        if unknown:
            raise ValueError(f"visdial_val: unknown task arguments {sorted(unknown)}; expected {TASK_ARGUMENTS}")
        for name in ("visdial_json", "images_dir"):
            if not arguments.get(name):
                raise ValueError(f"visdial_val: the task argument {name} (dataset_kwargs.{name}) is required")
        if not Path(arguments["visdial_json"]).is_file():
            raise FileNotFoundError(f"visdial_val: visdial_json {arguments['visdial_json']} does not exist")
        if arguments.get("dense_json") and not Path(arguments["dense_json"]).is_file():
            raise FileNotFoundError(f"visdial_val: dense_json {arguments['dense_json']} does not exist")
        if not Path(arguments["images_dir"]).is_dir():
            raise FileNotFoundError(f"visdial_val: images_dir {arguments['images_dir']} is not a folder")
        self.score = arguments.get("score", "mean")
        if self.score not in SCORE_TYPES:
            raise ValueError(f"visdial_val: score must be one of {SCORE_TYPES}, got {self.score!r}")
        max_dialogs = arguments.get("max_dialogs")
        docs, split = visdial_rounds(
            arguments["visdial_json"], arguments.get("dense_json"), int(max_dialogs) if max_dialogs else None
        )
        self._load_image = image_loader(arguments["images_dir"], split)
        self._image = (None, None)
        self.dataset = DatasetDict({self.config.test_split: Dataset.from_list(docs)})
        self.dataset_no_image = self.dataset

    def image(self, image_id: int):
        """The dialog's image, read once for all its rounds."""
        if self._image[0] != image_id:
            self._image = (image_id, self._load_image(image_id))
        return self._image[1]

    def doc_to_visual(self, doc):
        return [self.image(doc["image_id"])]

    def doc_to_text(self, doc):
        return doc["question"]

    def doc_to_target(self, doc):
        return doc["gt_index"]

    def doc_to_messages(self, doc, **_):
        """The round's chat (`visdial_scoring.dialog_messages`), ending with the question as the last user turn."""
        history = [tuple(pair) for pair in doc["history"]]
        return dialog_messages(self.image(doc["image_id"]), doc["caption"], history, doc["question"])

    def construct_requests(self, doc_id: int, ctx: str, **kwargs) -> list[Instance]:
        split = kwargs["metadata"]["split"]
        doc = self.dataset[split][doc_id]
        return [
            Instance(
                request_type="loglikelihood",
                arguments=(ctx, candidate, self.doc_to_messages, doc_id, self.config.task, split, self.score),
                idx=index,
                **kwargs,
            )
            for index, candidate in enumerate(doc["answer_options"])
        ]


METRICS = ("r@1", "r@5", "r@10", "mrr", "mean_rank", "ndcg")


def process_results(doc, results) -> dict:
    """One round's record for every metric: the candidates' scores (request order), ground truth and relevance."""
    record = {
        "image_id": doc["image_id"],
        "round_id": doc["round_id"],
        "scores": [float(result[0]) for result in results],
        "gt_index": doc["gt_index"],
        "relevance": doc["relevance"],
    }
    return {metric: record for metric in METRICS}


def visdial_metrics(records: list[dict]) -> dict:
    """The official metrics (fractions) over the rounds with a ground truth; `ndcg` None without dense rounds."""
    scored = [record for record in records if record["gt_index"] >= 0]
    if not scored:
        raise ValueError("visdial_val: no round has a ground-truth answer (gt_index); nothing to measure")
    return visdial_scoring.visdial_metric.visdial_metrics(
        [record["scores"] for record in scored],
        [record["gt_index"] for record in scored],
        [record["relevance"] for record in scored],
    )


def r_at_1(records):
    return visdial_metrics(records)["r@1"]


def r_at_5(records):
    return visdial_metrics(records)["r@5"]


def r_at_10(records):
    return visdial_metrics(records)["r@10"]


def mrr(records):
    return visdial_metrics(records)["mrr"]


def mean_rank(records):
    return visdial_metrics(records)["mean_rank"]


def ndcg(records):
    return visdial_metrics(records)["ndcg"]
