"""Ranking metrics and their aggregation: macro = mean over relations, micro = mean over facts."""

from __future__ import annotations

import torch

from probe.data import RELATION_TYPES
from probe.objects import length_bucket


def ranks_of(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's gold candidate; ties with the gold count in its favour.

    A NaN score (a diverged prompt) never helps the gold: a NaN candidate counts as above it, and a NaN gold
    ranks last. Without this, NaN compares False with everything and every gold would rank first.
    """
    gold_scores = scores.gather(1, gold[:, None])
    above = (scores > gold_scores) | scores.isnan()
    above.scatter_(1, gold[:, None], False)  # the gold is never above itself
    ranks = above.sum(dim=1) + 1
    ranks[gold_scores[:, 0].isnan()] = scores.shape[1]
    return ranks


def precision_at_k(ranks: list[int] | torch.Tensor, k: int) -> float:
    """Share of facts whose gold object is ranked within the top k."""
    ranks = torch.as_tensor(ranks)
    return float((ranks <= k).float().mean()) if len(ranks) else 0.0


def mean_reciprocal_rank(ranks: list[int] | torch.Tensor) -> float:
    """Mean of 1/rank over facts."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    return float((1.0 / ranks).mean()) if len(ranks) else 0.0


def relation_metrics(ranks: list[int]) -> dict[str, float]:
    """P@1, P@10 and MRR of one relation, in percent (MRR as a fraction)."""
    return {
        "p1": 100 * precision_at_k(ranks, 1),
        "p10": 100 * precision_at_k(ranks, 10),
        "mrr": mean_reciprocal_rank(ranks),
    }


def length_breakdown(ranks: list[int], lengths: list[int]) -> dict[str, dict]:
    """Facts and P@1 by the gold object's token count: '1', '2', '3+'."""
    buckets: dict[str, list[int]] = {}
    for rank, n in zip(ranks, lengths, strict=True):
        buckets.setdefault(length_bucket(n), []).append(rank)
    return {b: {"facts": len(r), "p1": 100 * precision_at_k(r, 1)} for b, r in sorted(buckets.items())}


def pooled_breakdown(rows: list[dict], key: str = "by_length") -> dict[str, dict]:
    """Relations' by-length breakdowns pooled over their facts: facts and micro P@1 per bucket."""
    pooled: dict[str, dict] = {}
    for row in rows:
        for bucket, b in (row.get(key) or {}).items():
            acc = pooled.setdefault(bucket, {"facts": 0, "hits": 0.0})
            acc["facts"] += b["facts"]
            acc["hits"] += b["p1"] * b["facts"] / 100
    return {b: {"facts": a["facts"], "p1": 100 * a["hits"] / a["facts"] if a["facts"] else 0.0}
            for b, a in sorted(pooled.items())}


METRICS = ("p1", "p10", "mrr")


def aggregate(rows: list[dict]) -> dict:
    """Macro and micro P@1/P@10/MRR over relation rows (each with n_facts, type and metrics), and per type."""

    def block(rs: list[dict]) -> dict:
        n = sum(r["n_facts"] for r in rs)
        out: dict = {"relations": len(rs), "facts": n}
        for m in METRICS:
            out[f"macro_{m}"] = sum(r[m] for r in rs) / len(rs) if rs else 0.0
            out[f"micro_{m}"] = sum(r[m] * r["n_facts"] for r in rs) / n if n else 0.0
        return out

    summary = {"all": block(rows)}
    for t in RELATION_TYPES:
        typed = [r for r in rows if r.get("type") == t]
        if typed:
            summary[t] = block(typed)
    return summary
