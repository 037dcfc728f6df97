"""Evaluation metrics of paper §4.1: Recall@K / NDCG@K over the full corpus (no sampled
negatives), AUC, beam fidelity, and the popularity baseline.

Retrieval metrics take *ranked item lists* (``[U, N]`` item ids, best first, -1 padded)
rather than score matrices, because beam search returns a ranking, not a score for every
item. With leave-last-out there is one target item per user, so Recall@K is the hit rate
and NDCG@K is ``1 / log2(1 + rank)`` when the target ranks within K (the ideal DCG is 1).
They equal torchmetrics' ``RetrievalRecall`` / ``RetrievalNormalizedDCG`` with
``top_k=K`` on the same ranking (tests check this).

AUC is computed exactly (tie-averaged Mann-Whitney statistic, sample weights supported)
in float64 over the collected logits; weight-0 rows (batch padding) drop out. It is
written here because torchmetrics' AUROC takes no per-sample weights; it matches
``sklearn.metrics.roc_auc_score`` and torchmetrics on unweighted data (tests check this).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch

from dig_torchrec.retrieval.beam_search import top_items_from_scores


def target_ranks(ranked_items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based position of each user's target in its ranked list; 0 if it is absent.

    Args:
        ranked_items: ``[U, N]`` item ids, best first (-1 = empty slot).
        targets: ``[U]`` target item ids.
    """
    if ranked_items.shape[0] != targets.shape[0]:
        raise ValueError(f"ranked_items has {ranked_items.shape[0]} users but targets has {targets.shape[0]}")
    hit = ranked_items == targets.unsqueeze(1)
    pos = torch.arange(1, ranked_items.shape[1] + 1).expand_as(hit)
    return torch.where(hit, pos, torch.zeros_like(pos)).max(dim=1).values if ranked_items.shape[1] else \
        torch.zeros_like(targets)


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Fraction of users whose target ranks within the top ``k`` (one target per user).

    Args:
        ranks: ``[U]`` from :func:`target_ranks`.
        k: cutoff.
    """
    if ranks.numel() == 0:
        return float("nan")
    return float(((ranks >= 1) & (ranks <= k)).double().mean())


def ndcg_at_k(ranks: torch.Tensor, k: int) -> float:
    """Mean NDCG@k with one relevant item per user: ``1 / log2(rank + 1)`` if rank <= k.

    Args:
        ranks: ``[U]`` from :func:`target_ranks`.
        k: cutoff.
    """
    if ranks.numel() == 0:
        return float("nan")
    r = ranks.double()
    gain = torch.where((ranks >= 1) & (ranks <= k), 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))
    return float(gain.mean())


def retrieval_metrics(ranked_items: torch.Tensor, targets: torch.Tensor, ks: Iterable[int], prefix: str = "") -> Dict[str, float]:
    """``{prefix}recall@k`` and ``{prefix}ndcg@k`` for every k.

    Args:
        ranked_items: ``[U, N]`` ranked item ids.
        targets: ``[U]`` target items.
        ks: cutoffs; a cutoff above N is still reported (items beyond N count as misses).
        prefix: key prefix, e.g. ``"exhaustive_"``.
    """
    ranks = target_ranks(ranked_items, targets)
    out: Dict[str, float] = {}
    for k in ks:
        out[f"{prefix}recall@{k}"] = recall_at_k(ranks, k)
        out[f"{prefix}ndcg@{k}"] = ndcg_at_k(ranks, k)
    return out


def exact_auc(scores: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> float:
    """Exact area under the ROC curve (every distinct score its own threshold), ties counted
    one half, optionally sample-weighted. ``dig eval`` reports it; training validation uses
    the binned, all-reduced :class:`dig_torchrec.training.metrics.BinnedAUC` instead.

    Args:
        scores: ``[N]`` logits or probabilities (any monotone transform gives the same AUC).
        labels: ``[N]`` in {0, 1}.
        weights: ``[N]`` non-negative sample weights; 0 drops a row (padding).

    Returns:
        AUC, or NaN when there are no positives or no negatives.
    """
    s = scores.detach().reshape(-1).double()
    y = labels.detach().reshape(-1).double()
    w = torch.ones_like(s) if weights is None else weights.detach().reshape(-1).double()
    keep = w > 0
    s, y, w = s[keep], y[keep], w[keep]
    wp, wn = w * (y > 0.5), w * (y <= 0.5)
    P, N = float(wp.sum()), float(wn.sum())
    if P == 0.0 or N == 0.0:
        return float("nan")
    # group equal scores; a positive beats every negative in a lower group and half of its own group's
    uniq, inv = torch.unique(s, sorted=True, return_inverse=True)
    pos_g = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, wp)
    neg_g = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, wn)
    neg_below = torch.cumsum(neg_g, 0) - neg_g
    return float((pos_g * (neg_below + 0.5 * neg_g)).sum() / (P * N))


def overlap_per_user_at_k(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """``|top-k(a) ∩ top-k(b)| / k`` for each user, as a float64 ``[U]`` tensor. Empty slots
    (-1) never match.

    Args:
        a: ``[U, >=k]`` ranked ids.
        b: ``[U, >=k]`` ranked ids.
        k: cutoff.
    """
    x, y = a[:, :k], b[:, :k]
    match = (x.unsqueeze(2) == y.unsqueeze(1)) & (x.unsqueeze(2) >= 0)
    return match.any(dim=2).double().sum(dim=1).div(k)


def overlap_at_k(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean of :func:`overlap_per_user_at_k` over users (beam fidelity against the exhaustive
    reference); NaN for no users."""
    if a.shape[0] == 0:
        return float("nan")
    return float(overlap_per_user_at_k(a, b, k).mean())


def popularity_ranking(popularity: torch.Tensor, num_users: int, topn: int, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The popularity baseline: every user gets the most-clicked train items
    (ties by item id), minus their excluded items.

    Args:
        popularity: ``[num_items]`` train click counts.
        num_users: U.
        topn: items per user.
        exclude: ``[U, H]`` items to drop per user (-1 padded) or ``None``.

    Returns:
        ``[U, topn]`` ranked item ids.
    """
    V = popularity.numel()
    if exclude is None or exclude.numel() == 0:
        items, _ = top_items_from_scores(popularity.float().unsqueeze(0), topn)
        return items.expand(num_users, -1).clone()
    return top_items_from_scores(popularity.float().unsqueeze(0).expand(num_users, V), topn, exclude=exclude)[0]


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs skipped."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    if len(v) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
