"""probe.metrics: ranks with ties, P@k, MRR, macro vs micro aggregation and per-type blocks."""

from __future__ import annotations

import pytest
import torch

from probe.metrics import aggregate, mean_reciprocal_rank, precision_at_k, ranks_of, relation_metrics


def test_ranks_of_with_ties_in_favour_of_gold():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0]] * 4)
    gold = torch.tensor([2, 1, 3, 0])
    assert ranks_of(scores, gold).tolist() == [1, 1, 3, 4]


def test_ranks_of_rows_are_independent():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.1], [0.0, 0.0, 0.0]])
    assert ranks_of(scores, torch.tensor([2, 0, 1])).tolist() == [2, 1, 1]


def test_precision_at_k():
    ranks = [1, 3, 11, 2]
    assert precision_at_k(ranks, 1) == 0.25
    assert precision_at_k(ranks, 2) == 0.5
    assert precision_at_k(ranks, 10) == 0.75
    assert precision_at_k(torch.tensor(ranks), 11) == 1.0
    assert precision_at_k([], 1) == 0.0


def test_mean_reciprocal_rank():
    assert mean_reciprocal_rank([1, 2, 4]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert mean_reciprocal_rank(torch.tensor([3])) == pytest.approx(1 / 3)
    assert mean_reciprocal_rank([]) == 0.0


def test_relation_metrics_in_percent_and_fraction():
    m = relation_metrics([1, 2, 4, 20])
    assert m == pytest.approx({"p1": 25.0, "p10": 75.0, "mrr": (1 + 0.5 + 0.25 + 0.05) / 4})


ROWS = [
    {"relation": "P19", "type": "N-1", "n_facts": 10, "p1": 50.0, "p10": 80.0, "mrr": 0.6},
    {"relation": "P20", "type": "N-1", "n_facts": 30, "p1": 10.0, "p10": 40.0, "mrr": 0.2},
    {"relation": "P36", "type": "1-1", "n_facts": 60, "p1": 100.0, "p10": 100.0, "mrr": 1.0},
]


def test_aggregate_macro_vs_micro():
    s = aggregate(ROWS)["all"]
    assert s["relations"] == 3 and s["facts"] == 100
    assert s["macro_p1"] == pytest.approx(160 / 3)
    assert s["micro_p1"] == pytest.approx(68.0)  # (10*50 + 30*10 + 60*100) / 100
    assert s["macro_p10"] == pytest.approx(220 / 3)
    assert s["micro_p10"] == pytest.approx(80.0)
    assert s["macro_mrr"] == pytest.approx(0.6)
    assert s["micro_mrr"] == pytest.approx(0.72)


def test_aggregate_per_type():
    summary = aggregate(ROWS)
    assert list(summary) == ["all", "1-1", "N-1"]  # types in LAMA order, absent types left out
    n1 = summary["N-1"]
    assert n1["relations"] == 2 and n1["facts"] == 40
    assert n1["macro_p1"] == pytest.approx(30.0)
    assert n1["micro_p1"] == pytest.approx(20.0)
    assert n1["micro_mrr"] == pytest.approx((10 * 0.6 + 30 * 0.2) / 40)
    one = summary["1-1"]
    assert one["macro_p1"] == one["micro_p1"] == 100.0


def test_aggregate_empty():
    assert aggregate([]) == {"all": {
        "relations": 0, "facts": 0, "macro_p1": 0.0, "micro_p1": 0.0, "macro_p10": 0.0, "micro_p10": 0.0,
        "macro_mrr": 0.0, "micro_mrr": 0.0,
    }}


def test_nan_scores_never_help_the_gold():
    """A diverged prompt's NaN scores rank the gold last, not first (NaN compares False with everything)."""
    nan = float("nan")
    scores = torch.tensor([[nan, nan, nan], [0.1, nan, 0.5], [0.9, 0.2, 0.1], [0.3, 0.3, 0.1]])
    assert ranks_of(scores, torch.tensor([0, 0, 0, 1])).tolist() == [3, 3, 1, 1]  # finite scores: as before, ties help
