"""Training metrics: binned AUC against sklearn, padding rows masked, metric names."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from sklearn.metrics import roc_auc_score

from dig_torchrec.training.metrics import AUCSet, MeanSet, TrainMetrics, flatten_metric, output_scalars


def _output(logits, labels, weights, layers=2):
    return SimpleNamespace(
        rank_logits=logits, labels=labels, weights=weights,
        recall_logits=torch.stack([logits * (l + 1) for l in range(layers)]),
        recall_labels=labels, recall_weights=weights,
        losses={"total": torch.tensor(0.5), "rank": torch.tensor(0.25)},
        tokenizer_metrics={"utilization_l1": torch.tensor(0.75), "collision_rate": torch.tensor(0.1)},
    )


def test_auc_matches_sklearn_and_ignores_padding_rows() -> None:
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(4000, generator=g) < 0.15).float()
    logits = 1.2 * labels + torch.randn(4000, generator=g) - 2.0
    weights = torch.ones(4000)
    weights[::7] = 0.0  # padding rows carry junk that must not count
    junk = torch.where(weights > 0, logits, torch.full_like(logits, 50.0) * (1 - labels))
    aucs = AUCSet(num_layers=2)
    for chunk in range(4):
        sl = slice(chunk * 1000, (chunk + 1) * 1000)
        aucs.update(_output(junk[sl], labels[sl], weights[sl]))
    out = aucs.compute()
    keep = weights > 0
    expected = roc_auc_score(labels[keep].numpy(), logits[keep].numpy())
    assert abs(out["rank_auc"] - expected) < 2e-3
    assert abs(out["recall_auc_l2"] - expected) < 2e-3
    aucs.reset()
    assert torch.isnan(torch.tensor(aucs.compute()["rank_auc"]))


def test_train_metrics_names_and_means() -> None:
    m = TrainMetrics(num_layers=2)
    for _ in range(3):
        m.update(_output(torch.randn(8), (torch.arange(8) % 2).float(), torch.ones(8)))
    out = m.compute()
    assert out["train/loss/total"] == 0.5 and out["train/loss/rank"] == 0.25
    assert out["train/tokenizer/utilization_l1"] == 0.75 and out["train/tokenizer/collision_rate"] > 0.09
    assert {"train/rank_auc", "train/recall_auc_l1", "train/recall_auc_l2", "perf/samples_per_s"} <= set(out)
    assert m.steps == 0  # window reset
    assert flatten_metric("perplexity", torch.tensor([1.0, 2.0])) == {"perplexity_l1": 1.0, "perplexity_l2": 2.0}
    means = MeanSet()
    means.update({"a": 1.0})
    means.update({"a": float("nan")})  # NaN values are not averaged in
    assert means.compute(["a", "b"])["a"] == 1.0
    assert "loss/total" in output_scalars(_output(torch.zeros(2), torch.zeros(2), torch.ones(2)))
