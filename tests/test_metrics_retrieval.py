"""Recall@K, NDCG@K, AUC, fidelity and the popularity baseline: hand-computed values and
agreement with torchmetrics / sklearn."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalRecall

from dig_torchrec.retrieval.metrics import (
    exact_auc,
    mean_std,
    ndcg_at_k,
    overlap_at_k,
    overlap_per_user_at_k,
    popularity_ranking,
    recall_at_k,
    retrieval_metrics,
    target_ranks,
)


def test_recall_and_ndcg_hand_computed():
    ranked = torch.tensor([[5, 3, 9, 1], [2, 8, 7, 6], [4, 0, -1, -1], [1, 2, 3, 4]])
    targets = torch.tensor([9, 2, 7, 4])
    ranks = target_ranks(ranked, targets)
    assert ranks.tolist() == [3, 1, 0, 4]
    assert recall_at_k(ranks, 1) == pytest.approx(1 / 4)
    assert recall_at_k(ranks, 3) == pytest.approx(2 / 4)
    assert recall_at_k(ranks, 4) == pytest.approx(3 / 4)
    assert ndcg_at_k(ranks, 3) == pytest.approx((1 / math.log2(4) + 1.0) / 4)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 / math.log2(4) + 1.0 + 1 / math.log2(5)) / 4)
    m = retrieval_metrics(ranked, targets, [1, 3])
    assert set(m) == {"recall@1", "ndcg@1", "recall@3", "ndcg@3"}
    assert m["ndcg@1"] == pytest.approx(0.25)


@pytest.mark.parametrize("k", [1, 5, 10, 50])
def test_recall_ndcg_agree_with_torchmetrics(k):
    g = torch.Generator().manual_seed(k)
    U, V = 40, 60
    # continuous (no ties) and positive: torchmetrics 1.9's recall counts only preds > 0 as retrieved
    scores = torch.randn(U, V, generator=g).sigmoid()
    targets = torch.randint(0, V, (U,), generator=g)
    ranked = torch.argsort(scores, dim=1, descending=True)
    ours = retrieval_metrics(ranked, targets, [k])
    rel = torch.zeros(U, V, dtype=torch.bool)
    rel[torch.arange(U), targets] = True
    idx = torch.arange(U).unsqueeze(1).expand(U, V)
    tm_recall = RetrievalRecall(top_k=k)(scores.flatten(), rel.flatten(), indexes=idx.flatten())
    tm_ndcg = RetrievalNormalizedDCG(top_k=k)(scores.flatten(), rel.flatten(), indexes=idx.flatten())
    assert ours[f"recall@{k}"] == pytest.approx(float(tm_recall), abs=1e-6)
    assert ours[f"ndcg@{k}"] == pytest.approx(float(tm_ndcg), abs=1e-6)


def test_auc_hand_computed_with_ties_and_padding():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4, 7.0])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    weights = torch.tensor([1, 1, 1, 1, 1, 0])  # last row is padding
    # positives {0.35, 0.8, 0.4} vs negatives {0.1, 0.4}: 0.35 beats 1; 0.8 beats 2; 0.4 beats 1 + tie 0.5
    assert exact_auc(scores, labels, weights) == pytest.approx((1 + 2 + 1.5) / 6)
    assert math.isnan(exact_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))


def test_auc_agrees_with_sklearn_and_torchmetrics():
    from torchmetrics.functional.classification import binary_auroc

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (500,), generator=g)
    s = torch.round(torch.randn(500, generator=g) + y * 0.7, decimals=1)  # informative, with ties
    w = torch.rand(500, generator=g) + 0.1
    assert exact_auc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    assert exact_auc(s, y) == pytest.approx(float(binary_auroc(s.sigmoid(), y)), abs=1e-6)
    assert exact_auc(s, y, w) == pytest.approx(roc_auc_score(y.numpy(), s.numpy(), sample_weight=w.numpy()), abs=1e-12)
    assert exact_auc(-s, y) == pytest.approx(1.0 - exact_auc(s, y), abs=1e-12)


def test_overlap_at_k():
    a = torch.tensor([[1, 2, 3], [4, 5, -1]])
    b = torch.tensor([[3, 9, 1], [6, -1, 7]])
    assert overlap_at_k(a, b, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert overlap_at_k(a, a, 2) == pytest.approx(1.0)
    assert overlap_per_user_at_k(a, b, 3).tolist() == pytest.approx([2 / 3, 0.0])
    assert overlap_at_k(a[:0], b[:0], 3) != overlap_at_k(a[:0], b[:0], 3)  # NaN for no users


def test_popularity_ranking_ties_and_exclusion():
    pop = torch.tensor([3.0, 9.0, 3.0, 0.0, 5.0])
    r = popularity_ranking(pop, 2, 4)
    assert r.tolist() == [[1, 4, 0, 2], [1, 4, 0, 2]]
    r = popularity_ranking(pop, 2, 4, exclude=torch.tensor([[-1, -1], [4, 0]]))
    assert r.tolist() == [[1, 4, 0, 2], [1, 2, 3, -1]]


def test_mean_std():
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert mean_std([2.0]) == (2.0, 0.0)
