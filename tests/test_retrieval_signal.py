"""End to end (slow): the ``industrial_small`` preset's retrieval signal (favourite brands,
40K-item catalog) is learned in one epoch, and beam search over the trained recall path beats
popularity by a wide margin when the recall path gets the user's exact u2i over the catalog
(``u2t.inference=catalog_mean|catalog_max``), not with MLP_u2t's estimate; with ``catalog_max``
beam search at B=64 also finds the exhaustive leaf search's top-10.

Measured (the recipe below, 1,370 test users): the rank path ranking the whole catalog reaches
R@10 0.083 (300 users) against popularity's 0.002-0.003, so the signal is learnable and learned;
the recall path scores R@10 0.000-0.002 by beam search and by exhaustive leaf search alike (beam
fidelity 0.996), with the SIDs distinct (``tokenizer.seal=balanced``: 0 collisions) or not
(0.72). The gap was the recall path's u2t input: scored with the user's exact u2i at the leaf, the
same recall path reaches R@10 0.215 by exhaustive leaf search and 0.100 by beam search (B=100,
``u2t.inference=catalog_mean``, 200 users); with MLP_u2t's estimate it stays at ~0 (a strict xfail).

The dataset keeps the preset's catalog, structure and ``p_brand`` and cuts the rows (and
users, at the same rows per user) so that a CPU test can train on it; the model is small.
``meta.json`` states the oracle and popularity Recall@10 of the same test targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

from dig_torchrec.config import load_config
from dig_torchrec.data.schema import DatasetMeta

REPO = Path(__file__).resolve().parents[1]
USERS, ROWS = 1600, 200_000  # industrial_small: 12,000 users, 1.5M rows (the same ~125 rows per user)


def _train(data: Path, run: Path) -> None:
    from dig_torchrec.training.trainer import Trainer

    cfg = load_config(REPO / "configs" / "industrial_small.yaml", [
        f"data.path={data}", f"run_dir={run}", "data.batch_size=512", "model.embedding_dim=32",
        "model.din_hidden=[32]", "model.expert_hidden=[64]", "model.num_experts=2", "model.cross_layers=1",
        "tokenizer.num_codes=64", "tokenizer.num_layers=3", "tokenizer.init_after_steps=60",
        "tokenizer.freeze_after_steps=60", "loss.recall_objective=softmax", "u2t.grouping=user_bucket", "train.epochs=1",
        "train.log_every=1000", "train.val_every=0", "train.checkpoint_every=0", "train.lr=0.002",
    ])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


def _retrieve(run: Path, methods: Tuple[str, ...], max_users: int = 0, u2t_mode: str = "mlp") -> Dict[str, float]:
    """Recall@10 of each method on the test targets (a seeded subset of ``max_users`` if > 0)."""
    from dig_torchrec.data.targets import load_targets
    from dig_torchrec.retrieval import metrics as M
    from dig_torchrec.retrieval.evaluate import load_inference_bundle, retrieve_topn

    bundle = load_inference_bundle(run)
    targets = load_targets(bundle.data_root, "test", bundle.schema)
    rows = torch.arange(len(targets))
    if max_users:
        rows = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))[:max_users].sort().values
    res = retrieve_topn(bundle, targets, rows, list(methods), 10, beam_size=64, u2t_mode=u2t_mode, progress=False)
    tgt = targets.target_item[rows]
    return {m: M.recall_at_k(M.target_ranks(res.items[m], tgt), 10) for m in methods}


@pytest.fixture(scope="module")
def signal_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dig_torchrec.data.synthetic import generate, preset

    root = tmp_path_factory.mktemp("signal") / "industrial_small_cut"
    generate(preset("industrial_small", num_users=USERS, num_rows=ROWS, chunk_rows=ROWS), root, processes=1)
    return root


@pytest.fixture(scope="module")
def trained_run(signal_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("signal_run") / "run"
    _train(signal_dataset, run)
    return run


@pytest.mark.slow
def test_the_rank_path_learns_the_signal_over_the_whole_catalog(signal_dataset: Path, trained_run: Path) -> None:
    oracle = DatasetMeta.load(signal_dataset).extra["retrieval_oracle"]
    assert oracle["popularity_fraction_of_oracle"] <= 0.25, oracle
    r = _retrieve(trained_run, ("full", "popularity"), max_users=200)
    # measured 0.083 vs 0.003 (300 users): the planted affinity is learnable in one epoch
    assert r["full"] >= 5 * max(r["popularity"], 1 / 200), (r, oracle)


@pytest.mark.slow
@pytest.mark.parametrize("u2t", ["catalog_mean", "catalog_max"])
def test_beam_search_with_a_catalog_u2t_beats_twice_popularity(signal_dataset: Path, trained_run: Path, u2t: str) -> None:
    # measured (1,370 users, B=64): catalog_mean 0.141, catalog_max 0.2-0.275 (40 users), popularity 0.002
    oracle = DatasetMeta.load(signal_dataset).extra["retrieval_oracle"]
    r = _retrieve(trained_run, ("beam", "popularity"), max_users=300, u2t_mode=u2t)
    assert r["beam"] >= 2 * max(r["popularity"], 1 / 300), (r, oracle)
    assert r["beam"] >= 0.05 * oracle["recall@10"], (r, oracle)


@pytest.mark.slow
def test_catalog_max_beam_search_finds_the_exhaustive_top10(trained_run: Path) -> None:
    """Issue 14's 40K goals on a trained model: fidelity@10 >= 0.9 at B=64 and beam R@10 >= 0.95 x exhaustive.
    Measured: fidelity 0.99, beam R@10 0.275 = exhaustive (40 users); with catalog_mean the fidelity is 0.32."""
    from dig_torchrec.data.targets import load_targets
    from dig_torchrec.retrieval import metrics as M
    from dig_torchrec.retrieval.evaluate import load_inference_bundle, retrieve_topn

    bundle = load_inference_bundle(trained_run)
    targets = load_targets(bundle.data_root, "test", bundle.schema)
    rows = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))[:60].sort().values
    res = retrieve_topn(bundle, targets, rows, ["beam", "exhaustive"], 10, beam_size=64, u2t_mode="catalog_max",
                        progress=False)
    fidelity = M.overlap_at_k(res.items["beam"], res.items["exhaustive"], 10)
    tgt = targets.target_item[rows]
    beam, exh = (M.recall_at_k(M.target_ranks(res.items[m], tgt), 10) for m in ("beam", "exhaustive"))
    assert fidelity >= 0.9, fidelity
    assert beam >= 0.95 * exh and exh > 0, (beam, exh)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the paper's MLP_u2t estimate (u2t.inference=mlp) leaves the recall path at "
                   "R@10 ~0 here: the personal signal it learned comes through the exact u2i of Eq. 13's teacher")
def test_beam_search_with_the_mlp_u2t_beats_twice_popularity(signal_dataset: Path, trained_run: Path) -> None:
    oracle = DatasetMeta.load(signal_dataset).extra["retrieval_oracle"]
    r = _retrieve(trained_run, ("beam", "popularity"), max_users=300)
    assert r["beam"] >= 2 * max(r["popularity"], 1 / 300), (r, oracle)
    assert r["beam"] >= 0.05 * oracle["recall@10"], (r, oracle)
