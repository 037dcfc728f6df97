"""End to end (slow): train DIG on the synthetic micro preset, then retrieve over the full
corpus and compare with the popularity baseline on the planted structure.

Measured here (4 epochs, 171 test users, 150 items, collision-free SIDs): unified R@10 0.30,
full-corpus ranking 0.39, popularity 0.19, pure beam search 0.16 (R@100 0.82 vs 0.85).
Pure beam search (items ordered by leaf score) does not beat popularity with the current
model, whose recall path is weaker than its rank path (recall AUC 0.61 vs rank AUC 0.67).
So `dig eval` reports that comparison and this test does not assert it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dig_torchrec.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dig_torchrec.training.trainer import Trainer

    run = tmp_path_factory.mktemp("trained")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.path={tiny_dataset}", f"run_dir={run}", "data.history_length=5", "data.batch_size=64",
        "data.retrieval_positives=32", "train.epochs=4", "train.log_every=1000", "train.val_every=0",
        "tokenizer.init_after_steps=30", "eval.user_batch_size=128",
    ])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return run


@pytest.mark.slow
def test_trained_retrieval_beats_popularity(trained_run: Path) -> None:
    from dig_torchrec.retrieval.evaluate import evaluate, load_inference_bundle

    bundle = load_inference_bundle(trained_run)
    res = evaluate(bundle, "test", progress=False, max_exposure_batches=0)
    summary = {k: round(v, 4) for k, v in res.items() if isinstance(v, float)}
    # the planted user-item affinity is learned: the unified retriever (beam candidates
    # reranked by the rank path) and exact full-corpus ranking beat "most clicked items"
    assert res["unified_recall@10"] > res["popularity_recall@10"], summary
    assert res["full_ranking_recall@10"] > res["popularity_recall@10"], summary
    # beam candidates carry the signal: far above a random draw of 100 of the catalog's items
    assert res["recall@100"] > 100 / bundle.items.num_items + 0.05, summary
    assert res["rank_auc"] > 0.6, summary
    # the beam over a trained model is faithful to exhaustive leaf search
    assert res["beam_fidelity@10"] >= 0.9, summary
