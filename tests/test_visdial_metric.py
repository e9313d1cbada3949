"""Tests for the local VisDial `evaluate` metric in `modeling_omnifusion.evaluation.metrics.visdial`."""

import json
import os
from math import log2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import evaluate  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from visdial_data import VISDIAL_DATA_DIR  # noqa: E402

from modeling_omnifusion.evaluation.metrics import VISDIAL_METRIC_DIR  # noqa: E402
from modeling_omnifusion.evaluation.metrics.visdial import visdial as vd  # noqa: E402

VAL_FILE = "visdial_1.0_val_crowdsourced.json"
DENSE_FILE = "visdial_1.0_val_dense_annotations_crowdsourced.json"


@pytest.fixture(scope="module")
def metric():
    """The metric loaded through `evaluate.load` from its absolute folder path."""
    return evaluate.load(str(VISDIAL_METRIC_DIR), keep_in_memory=True)


@pytest.fixture(scope="module")
def val_data():
    """(dialogs, dense entries) of the real VisDial v1.0 val sample."""
    val = json.loads((VISDIAL_DATA_DIR / VAL_FILE).read_text())
    dense = json.loads((VISDIAL_DATA_DIR / DENSE_FILE).read_text())
    return val, dense


def _reference_metrics(predictions, references, relevance):
    """Straightforward per-round re-implementation of the official definitions, for cross-checks."""
    ranks = []
    ndcgs = []
    for scores, gt, rel in zip(predictions, references, relevance):
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        ranks.append(order.index(gt) + 1)
        k = sum(1 for r in rel if r != 0)
        if k == 0:
            continue
        dcg = sum(rel[order[i]] / log2(i + 2) for i in range(k))
        ideal = sorted(rel, reverse=True)
        idcg = sum(ideal[i] / log2(i + 2) for i in range(k))
        ndcgs.append(dcg / idcg)
    n = len(ranks)
    return {
        "r@1": sum(r <= 1 for r in ranks) / n,
        "r@5": sum(r <= 5 for r in ranks) / n,
        "r@10": sum(r <= 10 for r in ranks) / n,
        "mrr": sum(1 / r for r in ranks) / n,
        "mean_rank": sum(ranks) / n,
        "ndcg": sum(ndcgs) / len(ndcgs) if ndcgs else None,
    }


def _assert_close(result, expected):
    assert set(result) == set(expected)
    for key, value in expected.items():
        if value is None:
            assert result[key] is None, key
        else:
            assert result[key] == pytest.approx(value, abs=1e-12), key


def test_loads_offline_and_exposes_info(metric):
    assert isinstance(metric, evaluate.Metric)
    assert set(metric.features) == {"predictions", "references", "relevance"}
    assert "Visual Dialog" in metric.citation
    assert "relevance" in metric.inputs_description


def test_scores_to_ranks_hand_example():
    # scores 0.1 0.9 0.3 0.7 0.5 -> descending order: opt1, opt3, opt4, opt2, opt0
    # so rank[opt0]=5, rank[opt1]=1, rank[opt2]=4, rank[opt3]=2, rank[opt4]=3 (not the argsort [1,3,4,2,0])
    ranks = vd.scores_to_ranks([0.1, 0.9, 0.3, 0.7, 0.5])
    assert ranks.tolist() == [5, 1, 4, 2, 3]
    assert ranks.dtype == np.int64


def test_scores_to_ranks_ties_broken_by_lower_index():
    # scores 1 2 2 1 2: the three 2s take ranks 1,2,3 in index order (opt1, opt2, opt4), then the 1s (opt0, opt3)
    assert vd.scores_to_ranks([1.0, 2.0, 2.0, 1.0, 2.0]).tolist() == [4, 1, 2, 5, 3]
    assert vd.scores_to_ranks([0.5] * 5).tolist() == [1, 2, 3, 4, 5]
    assert vd.scores_to_ranks([0.0, -0.0, 0.0]).tolist() == [1, 2, 3]
    assert vd.scores_to_ranks([-np.inf, 0.0, np.inf]).tolist() == [3, 2, 1]


def test_scores_to_ranks_batched_permutations():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(2, 3, 100)).astype(float)
    ranks = vd.scores_to_ranks(scores)
    assert ranks.shape == (2, 3, 100)
    for row_scores, row_ranks in zip(scores.reshape(-1, 100), ranks.reshape(-1, 100)):
        assert sorted(row_ranks.tolist()) == list(range(1, 101))
        expected = sorted(range(100), key=lambda j: (-row_scores[j], j))
        assert [int(np.flatnonzero(row_ranks == p + 1)[0]) for p in range(100)] == expected


def test_scores_to_ranks_rejects_nan_and_scalar():
    with pytest.raises(ValueError, match="NaN"):
        vd.scores_to_ranks([0.1, float("nan")])
    with pytest.raises(ValueError, match="scalar"):
        vd.scores_to_ranks(3.0)


def test_hand_computed_five_options(metric):
    predictions = [
        [0.1, 0.9, 0.3, 0.7, 0.5],  # ranks [5,1,4,2,3]; gt opt3 -> rank 2
        [5.0, 4.0, 3.0, 2.0, 1.0],  # ranks [1,2,3,4,5]; gt opt0 -> rank 1
        [1.0, 2.0, 3.0, 4.0, 5.0],  # ranks [5,4,3,2,1]; gt opt2 -> rank 3
    ]
    references = [3, 0, 2]
    relevance = [
        # k=3; predicted top-3 = opt1, opt3, opt4 -> gains 1.0, 0.4, 0.8
        # DCG  = 1.0/1 + 0.4/log2(3) + 0.8/2 = 1.652372; IDCG = 1.0/1 + 0.8/log2(3) + 0.4/2 = 1.704744
        # NDCG = 0.969279
        [0.0, 1.0, 0.0, 0.4, 0.8],
        [],  # no dense annotation: excluded from NDCG
        # k=2; predicted top-2 = opt4, opt3 -> gains 0.6, 0 (opt0's 0.2 sits at position 5 > k)
        # DCG = 0.6; IDCG = 0.6/1 + 0.2/log2(3) = 0.726186; NDCG = 0.826235
        [0.2, 0.0, 0.0, 0.0, 0.6],
    ]
    ndcg_a = (1.0 + 0.4 / log2(3) + 0.8 / 2) / (1.0 + 0.8 / log2(3) + 0.4 / 2)
    ndcg_c = 0.6 / (0.6 + 0.2 / log2(3))
    assert ndcg_a == pytest.approx(0.969279, abs=1e-6)
    assert ndcg_c == pytest.approx(0.826235, abs=1e-6)
    result = metric.compute(predictions=predictions, references=references, relevance=relevance)
    _assert_close(
        result,
        {
            "r@1": 1 / 3,  # only round B has rank 1
            "r@5": 1.0,
            "r@10": 1.0,
            "mrr": (1 / 2 + 1 / 1 + 1 / 3) / 3,  # 11/18 = 0.611111
            "mean_rank": (2 + 1 + 3) / 3,  # 2.0
            "ndcg": (ndcg_a + ndcg_c) / 2,  # 0.897757
        },
    )
    assert result["ndcg"] == pytest.approx(0.897757, abs=1e-6)


def test_hand_computed_recall_cutoffs(metric):
    # 12 options, scores -j -> rank of option j is j+1; gts 0,4,5,9,11 -> ranks 1,5,6,10,12
    predictions = [[-float(j) for j in range(12)]] * 5
    result = metric.compute(predictions=predictions, references=[0, 4, 5, 9, 11], relevance=[[]] * 5)
    _assert_close(
        result,
        {
            "r@1": 1 / 5,  # rank 1
            "r@5": 2 / 5,  # ranks 1, 5
            "r@10": 4 / 5,  # ranks 1, 5, 6, 10
            "mrr": (1 + 1 / 5 + 1 / 6 + 1 / 10 + 1 / 12) / 5,  # 1.55 / 5 = 0.31
            "mean_rank": (1 + 5 + 6 + 10 + 12) / 5,  # 6.8
            "ndcg": None,  # no round has relevance
        },
    )


def test_exact_ties_are_deterministic_by_index(metric):
    # scores 1 2 2 1 2 -> ranks [4,1,2,5,3]; gt opt4 -> rank 3, gt opt2 -> rank 2
    tied = [1.0, 2.0, 2.0, 1.0, 2.0]
    result = metric.compute(predictions=[tied, tied], references=[4, 2], relevance=[[], []])
    assert result["mean_rank"] == 2.5
    assert result["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert result["r@1"] == 0.0
    # all-equal scores: order is opt0..opt4; relevance on opt4 only (k=1) -> DCG@1 = rel[opt0] = 0 -> NDCG 0
    flat = metric.compute(predictions=[[0.0] * 5], references=[0], relevance=[[0, 0, 0, 0, 1.0]])
    assert flat["mean_rank"] == 1.0
    assert flat["ndcg"] == 0.0


def test_single_round(metric):
    # ranks [5,1,4,2,3]; gt opt1 -> rank 1; relevance only on opt1 (k=1) at position 1 -> NDCG 1
    result = metric.compute(
        predictions=[[0.1, 0.9, 0.3, 0.7, 0.5]], references=[1], relevance=[[0.0, 0.6, 0.0, 0.0, 0.0]]
    )
    _assert_close(result, {"r@1": 1.0, "r@5": 1.0, "r@10": 1.0, "mrr": 1.0, "mean_rank": 1.0, "ndcg": 1.0})


def test_all_zero_relevance_round_is_skipped_for_ndcg(metric):
    scores = [0.1, 0.9, 0.3, 0.7, 0.5]
    # round 0 all zero (k=0, official 0/0): skipped, not NaN and not counted as 0
    # round 1: gain 0.4 on opt3 at position 2, k=1 -> DCG@1 = rel[opt1] = 0 -> NDCG 0
    # round 2: gain 0.4 on opt1 at position 1, k=1 -> NDCG 1
    result = metric.compute(
        predictions=[scores] * 3,
        references=[1, 1, 1],
        relevance=[[0.0] * 5, [0, 0, 0, 0.4, 0], [0, 0.4, 0, 0, 0]],
    )
    assert result["ndcg"] == 0.5
    assert result["mean_rank"] == 1.0  # the all-zero round still counts for sparse metrics
    only_zero = metric.compute(predictions=[scores] * 2, references=[0, 1], relevance=[[0.0] * 5, []])
    assert only_zero["ndcg"] is None
    assert only_zero["mean_rank"] == (5 + 1) / 2


def test_rounds_without_relevance_do_not_change_ndcg(metric):
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(6, 20)).tolist()
    rel = (rng.integers(0, 6, size=20) / 5).tolist()
    annotated = metric.compute(predictions=scores[:1], references=[0], relevance=[rel])
    mixed = metric.compute(predictions=scores, references=[0] * 6, relevance=[rel] + [[]] * 5)
    assert mixed["ndcg"] == annotated["ndcg"]
    sparse = _reference_metrics(scores, [0] * 6, [[]] * 6)
    assert mixed["mean_rank"] == pytest.approx(sparse["mean_rank"])
    assert mixed["mrr"] == pytest.approx(sparse["mrr"])


def test_oracle_scores_give_ndcg_one(metric):
    rng = np.random.default_rng(2)
    relevance = (rng.integers(0, 6, size=(8, 100)) * (rng.random((8, 100)) < 0.15) / 5).tolist()
    relevance[0] = [0.0] * 99 + [0.2]
    relevance[1] = [1.0] * 100  # every option relevant and tied
    result = metric.compute(predictions=relevance, references=[0] * 8, relevance=relevance)
    assert result["ndcg"] == pytest.approx(1.0, abs=1e-12)
    reversed_scores = [[-r for r in row] for row in relevance]
    worse = metric.compute(predictions=reversed_scores, references=[0] * 8, relevance=relevance)
    assert worse["ndcg"] < 0.5


def test_matches_reference_implementation_with_ties(metric):
    rng = np.random.default_rng(3)
    predictions = rng.integers(0, 10, size=(40, 30)).astype(float).tolist()  # heavy ties
    references = rng.integers(0, 30, size=40).tolist()
    relevance = [
        (rng.integers(0, 6, size=30) * (rng.random(30) < 0.3) / 5).tolist() if i % 3 == 0 else [] for i in range(40)
    ]
    expected = _reference_metrics(predictions, references, relevance)
    _assert_close(metric.compute(predictions=predictions, references=references, relevance=relevance), expected)
    _assert_close(vd.visdial_metrics(predictions, references, relevance), expected)


def test_add_batch_equals_single_compute(metric):
    rng = np.random.default_rng(4)
    predictions = rng.normal(size=(10, 100)).tolist()
    references = rng.integers(0, 100, size=10).tolist()
    relevance = [(rng.integers(0, 6, size=100) / 5).tolist() if i % 2 else [] for i in range(10)]
    for start in range(0, 10, 4):
        stop = start + 4
        metric.add_batch(
            predictions=predictions[start:stop], references=references[start:stop], relevance=relevance[start:stop]
        )
    batched = metric.compute()
    _assert_close(batched, vd.visdial_metrics(predictions, references, relevance))


@pytest.mark.parametrize(
    "predictions, references, relevance, message",
    [
        ([[0.1, 0.2, 0.3], [0.1, 0.2]], [0, 0], [[], []], r"round 1: prediction row has 2 scores, expected 3"),
        ([[0.1, 0.2, 0.3]], [3], [[]], r"round 0: reference 3 is out of range.*\[0, 2\]"),
        ([[0.1, 0.2, 0.3]] * 2, [0, -1], [[], []], r"round 1: reference -1 is out of range"),
        ([[0.1, 0.2, 0.3]] * 2, [0, 1], [[], [0.2, 0.4]], r"round 1: relevance row has 2 values.*empty.*3"),
        ([[0.1, 0.2, 0.3]] * 2, [0, 1], [[], [0.2, -0.4, 0]], r"round 1: relevance .*non-negative"),
        ([[0.1, float("nan"), 0.3]], [0], [[]], r"round 0: prediction row contains NaN"),
        ([[0.1, 0.2, 0.3]] * 2, [0], [[], []], r"one entry per round, got 2, 1 and 2"),
        ([], [], [], r"no rounds"),
        ([[]], [0], [[]], r"round 0: prediction row is empty"),
        ([[0.1, 0.2]], [1.0], [[]], r"round 0: reference must be an int"),
    ],
)
def test_bad_inputs_raise_value_error(predictions, references, relevance, message):
    with pytest.raises(ValueError, match=message):
        vd.visdial_metrics(predictions, references, relevance)


def test_bad_inputs_through_evaluate(metric):
    with pytest.raises(ValueError, match=r"round 1: prediction row has 99 scores, expected 100"):
        metric.compute(predictions=[[0.0] * 100, [0.0] * 99], references=[0, 0], relevance=[[], []])
    with pytest.raises(ValueError, match=r"round 0: reference 100 is out of range"):
        metric.compute(predictions=[[0.0] * 100], references=[100], relevance=[[]])
    with pytest.raises(ValueError, match="relevance"):
        metric.compute(predictions=[[0.0] * 100], references=[0])
    ok = metric.compute(predictions=[[0.0] * 100], references=[99], relevance=[[]])
    assert ok["mean_rank"] == 100.0


def test_real_val_sample_parses(val_data):
    val, dense = val_data
    assert val["version"] == "1.0"
    dialogs = val["data"]["dialogs"]
    answers = val["data"]["answers"]
    questions = val["data"]["questions"]
    assert len(dialogs) == 97
    assert len(dense) == 97
    for dialog, entry in zip(dialogs, dense):
        assert len(dialog["dialog"]) == 10
        for rnd in dialog["dialog"]:
            options = rnd["answer_options"]
            assert len(options) == 100
            assert len(set(options)) == 100
            assert options[rnd["gt_index"]] == rnd["answer"]
            assert 0 <= rnd["answer"] < len(answers) and 0 <= rnd["question"] < len(questions)
        assert entry["image_id"] == dialog["image_id"]
        assert 1 <= entry["round_id"] <= 10
        relevance = entry["gt_relevance"]
        assert len(relevance) == 100
        assert all(0.0 <= r <= 1.0 for r in relevance)
        assert any(r != 0 for r in relevance)


def _val_inputs(val, dense):
    """(references, relevance) for all 970 val rounds; relevance only on each dialog's dense round."""
    references, relevance = [], []
    for dialog, entry in zip(val["data"]["dialogs"], dense):
        for round_index, rnd in enumerate(dialog["dialog"]):
            references.append(rnd["gt_index"])
            relevance.append(entry["gt_relevance"] if round_index == entry["round_id"] - 1 else [])
    return references, relevance


def test_random_scores_on_real_val_are_near_chance(metric, val_data):
    references, relevance = _val_inputs(*val_data)
    assert len(references) == 970 and sum(1 for r in relevance if r) == 97
    rng = np.random.default_rng(5)
    predictions = rng.random((970, 100)).tolist()
    result = metric.compute(predictions=predictions, references=references, relevance=relevance)
    _assert_close(result, _reference_metrics(predictions, references, relevance))
    # chance: R@1/5/10 = 0.01/0.05/0.10, MRR = H_100/100 = 0.0519, mean rank 50.5, NDCG about 0.09
    assert result["r@1"] < 0.04
    assert 0.02 < result["r@5"] < 0.09
    assert 0.06 < result["r@10"] < 0.15
    assert 0.03 < result["mrr"] < 0.08
    assert 45 < result["mean_rank"] < 56
    assert 0.03 < result["ndcg"] < 0.2


def test_real_val_oracle_and_gt_scores(metric, val_data):
    references, relevance = _val_inputs(*val_data)
    gt_first = np.zeros((970, 100))
    gt_first[np.arange(970), references] = 1.0
    result = metric.compute(predictions=gt_first.tolist(), references=references, relevance=relevance)
    assert result["r@1"] == 1.0 and result["mrr"] == 1.0 and result["mean_rank"] == 1.0
    oracle = [row if row else [0.0] * 100 for row in relevance]
    assert metric.compute(predictions=oracle, references=references, relevance=relevance)["ndcg"] == pytest.approx(
        1.0, abs=1e-12
    )


def test_submission_ranks_from_real_val(val_data):
    val, dense = val_data
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(len(dense), 100))
    ranks = vd.scores_to_ranks(scores)
    submission = [
        {"image_id": entry["image_id"], "round_id": entry["round_id"], "ranks": row.tolist()}
        for entry, row in zip(dense, ranks)
    ]
    assert json.loads(json.dumps(submission))[0]["ranks"] == ranks[0].tolist()
    for row_scores, entry in zip(scores, submission):
        assert sorted(entry["ranks"]) == list(range(1, 101))
        assert entry["ranks"][int(np.argmax(row_scores))] == 1
        assert entry["ranks"][int(np.argmin(row_scores))] == 100
