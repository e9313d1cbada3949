"""Visual Dialog v1.0 answer-ranking metric for Hugging Face `evaluate`.

Implements the official VisDial v1.0 evaluation (batra-mlp-lab/visdial-challenge-starter-pytorch,
`visdialch/metrics.py`) on per-round option scores:

* Ranks: the rank of option j is 1 + its position in a stable descending sort of the round's scores.
  Exact ties are broken by option index (the lower index ranks first), so results are deterministic.
  The official code uses an unstable `torch.sort` and leaves ties unspecified.
* Sparse metrics over all rounds: R@1, R@5, R@10 (fraction of rounds whose ground-truth option has
  rank <= k), MRR (mean of 1 / rank) and mean rank of the ground-truth option.
* NDCG over the rounds that carry dense relevance: with k = number of non-zero relevances in the round
  and linear gains, NDCG = DCG@k / IDCG@k, where DCG@k = sum_{i=1..k} rel(pi(i)) / log2(i + 1) over the
  predicted order pi and IDCG@k uses the relevances sorted in descending order. The reported value is
  the unweighted mean over those rounds.

Rounds without dense relevance are given an empty relevance list and do not enter NDCG. A round whose
relevance is all zero (k = 0, where the official code gives 0/0 = NaN) is skipped for NDCG as well; it
still counts for the sparse metrics. If no round has a non-zero relevance, `ndcg` is None.

All values are fractions (not percentages). The number of options per round is the length of the score
rows (100 for VisDial); every row must have the same length. Scores are "higher is better": pass
log-likelihoods, or negated NLLs.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Visual Dialog (VisDial v1.0) answer ranking. Each round has N candidate answers (100 in VisDial) that a
model scores; options are ranked by descending score, ties broken by lower option index. Reports R@1,
R@5, R@10, MRR and mean rank of the ground-truth answer over all rounds, and NDCG@k (k = number of
non-zero dense relevances, linear gain, log2(i + 1) discount) over rounds with dense relevance. Rounds
whose relevance is empty or all zero are left out of NDCG; `ndcg` is None when no round is usable.
All values are fractions.
"""

_CITATION = """\
@inproceedings{das2017visual,
  title     = {Visual Dialog},
  author    = {Das, Abhishek and Kottur, Satwik and Gupta, Khushi and Singh, Avi and Yadav, Deshraj
               and Moura, Jos{\\'e} M. F. and Parikh, Devi and Batra, Dhruv},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {326--335},
  year      = {2017}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `list` of `float`): one row of scores per round, one score per answer
        option in `answer_options` order; higher is better. All rows have the same length N.
    references (`list` of `int`): 0-based index of the ground-truth option per round (`gt_index`).
    relevance (`list` of `list` of `float`): dense relevance per round (`gt_relevance`, N
        non-negative values), or an empty list for a round without dense annotation.
Returns:
    `r@1`, `r@5`, `r@10` (`float`): fraction of rounds whose ground-truth option ranks within the top k.
    `mrr` (`float`): mean reciprocal rank of the ground-truth option.
    `mean_rank` (`float`): mean 1-based rank of the ground-truth option.
    `ndcg` (`float` or `None`): mean NDCG@k over rounds with non-zero relevance; None if there are none.
Examples:
    >>> from modeling_omnifusion.evaluation.metrics import VISDIAL_METRIC_DIR
    >>> visdial = evaluate.load(str(VISDIAL_METRIC_DIR))
    >>> visdial.compute(
    ...     predictions=[[0.1, 0.9, 0.3, 0.7, 0.5]],
    ...     references=[3],
    ...     relevance=[[0.0, 1.0, 0.0, 0.4, 0.8]],
    ... )
    {'r@1': 0.0, 'r@5': 1.0, 'r@10': 1.0, 'mrr': 0.5, 'mean_rank': 2.0, 'ndcg': 0.969...}
"""

RECALL_CUTOFFS = (1, 5, 10)


def scores_to_ranks(scores):
    """1-based rank of every option for scores of shape [..., N] (higher is better).

    Rank is 1 + position in a stable descending sort over the last axis, so exact ties go to the lower
    option index. The result is in option order (what a VisDial submission's `ranks` field holds), not
    an argsort. Returns an int64 array of the same shape; raises ValueError on NaN or a 0-d input.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 0:
        raise ValueError("scores must have at least one dimension (the options axis), got a scalar")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; ranks would be ill-defined")
    order = np.argsort(-scores, axis=-1, kind="stable")
    positions = np.broadcast_to(np.arange(1, scores.shape[-1] + 1, dtype=np.int64), scores.shape)
    ranks = np.empty(scores.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, positions, axis=-1)
    return ranks


def _check_inputs(predictions, references, relevance):
    """Validated (scores [R, N] float64, gt [R] int64, relevance rows) or ValueError naming the round."""
    if not (len(predictions) == len(references) == len(relevance)):
        raise ValueError(
            "predictions, references and relevance must have one entry per round, got "
            f"{len(predictions)}, {len(references)} and {len(relevance)}"
        )
    if len(predictions) == 0:
        raise ValueError("no rounds to evaluate: predictions is empty")

    num_options = len(predictions[0])
    if num_options == 0:
        raise ValueError("round 0: prediction row is empty, expected one score per answer option")
    scores = np.empty((len(predictions), num_options), dtype=np.float64)
    gt = np.empty(len(predictions), dtype=np.int64)
    relevance_rows = []
    for i, (row, ref, rel) in enumerate(zip(predictions, references, relevance)):
        if len(row) != num_options:
            raise ValueError(
                f"round {i}: prediction row has {len(row)} scores, expected {num_options} "
                "(all rows must have the length of round 0)"
            )
        scores[i] = row
        if np.isnan(scores[i]).any():
            raise ValueError(f"round {i}: prediction row contains NaN")

        if isinstance(ref, (bool, np.bool_)) or not isinstance(ref, (int, np.integer)):
            raise ValueError(f"round {i}: reference must be an int option index, got {ref!r}")
        if not 0 <= ref < num_options:
            raise ValueError(
                f"round {i}: reference {ref} is out of range, expected a 0-based option index in [0, {num_options - 1}]"
            )
        gt[i] = ref

        if rel is None or len(rel) == 0:
            relevance_rows.append(None)
            continue
        if len(rel) != num_options:
            raise ValueError(
                f"round {i}: relevance row has {len(rel)} values, expected either an empty list "
                f"(no dense annotation) or {num_options} values (one per option)"
            )
        rel = np.asarray(rel, dtype=np.float64)
        if not np.isfinite(rel).all() or (rel < 0).any():
            raise ValueError(f"round {i}: relevance values must be finite and non-negative")
        relevance_rows.append(rel)
    return scores, gt, relevance_rows


def _ndcg_at_nonzero(scores, relevance):
    """Per-round NDCG@k, k = non-zero relevances per round, for scores and relevance of shape [R, N] (k >= 1)."""
    num_options = scores.shape[1]
    k = np.count_nonzero(relevance, axis=1)
    within_k = np.arange(num_options)[None, :] < k[:, None]
    discounts = 1.0 / np.log2(np.arange(2, num_options + 2, dtype=np.float64))
    predicted_order = np.argsort(-scores, axis=1, kind="stable")
    predicted_gains = np.take_along_axis(relevance, predicted_order, axis=1)
    ideal_gains = -np.sort(-relevance, axis=1)
    dcg = (predicted_gains * discounts * within_k).sum(axis=1)
    idcg = (ideal_gains * discounts * within_k).sum(axis=1)
    return dcg / idcg


def visdial_metrics(predictions, references, relevance):
    """VisDial ranking metrics as a dict of fractions: r@1, r@5, r@10, mrr, mean_rank, ndcg.

    predictions: R rows of N scores (higher is better); references: R 0-based ground-truth indices;
    relevance: R rows of N dense relevances, or empty rows for unannotated rounds. Sparse metrics use all
    R rounds; `ndcg` averages the rounds with a non-zero relevance and is None if there is none.
    """
    scores, gt, relevance_rows = _check_inputs(predictions, references, relevance)
    gt_ranks = scores_to_ranks(scores)[np.arange(len(gt)), gt].astype(np.float64)

    result = {f"r@{k}": float(np.mean(gt_ranks <= k)) for k in RECALL_CUTOFFS}
    result["mrr"] = float(np.mean(1.0 / gt_ranks))
    result["mean_rank"] = float(np.mean(gt_ranks))

    usable = [i for i, rel in enumerate(relevance_rows) if rel is not None and rel.any()]
    if usable:
        dense = np.stack([relevance_rows[i] for i in usable])
        result["ndcg"] = float(np.mean(_ndcg_at_nonzero(scores[usable], dense)))
    else:
        result["ndcg"] = None
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VisDial(evaluate.Metric):
    """VisDial v1.0 ranking metric: R@1/5/10, MRR, mean rank and NDCG@k."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                    "relevance": datasets.Sequence(datasets.Value("float64")),
                }
            ),
            reference_urls=[
                "https://visualdialog.org/",
                "https://github.com/batra-mlp-lab/visdial-challenge-starter-pytorch",
            ],
        )

    def _compute(self, predictions, references, relevance):
        return visdial_metrics(predictions, references, relevance)
