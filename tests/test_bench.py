"""Correctness of the benchmark helpers (nothing here is timed).

* the plain-PyTorch reference computes the same function (loss, logits, gradients) as the
  TorchRec model on the same weights;
* the rank-only model is DIG's rank path without the recall path;
* synthetic batches respect the schema;
* both benchmark scripts run end to end at a tiny size (``-m slow``).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    PlainEmbeddingBagCollection,
    SyntheticBatches,
    auto_positive_slots,
    industrial_meta,
    init_tokenizer_randomly,
    make_plain,
)
from dig_torchrec.config import DIGConfig, ModelConfig, TokenizerConfig, U2TConfig  # noqa: E402
from dig_torchrec.data.schema import FeatureSchema  # noqa: E402
from dig_torchrec.model import DIGModel  # noqa: E402


def _small() -> tuple:
    cfg = DIGConfig(model=ModelConfig(embedding_dim=8, din_hidden=[16, 8], cross_layers=1, num_experts=2,
                                      expert_hidden=[16, 8]),
                    tokenizer=TokenizerConfig(num_layers=2, num_codes=8, encoder_layers=1, encoder_heads=2),
                    u2t=U2TConfig(hidden_dim=8))
    cfg.data.history_length = 4
    meta = industrial_meta(num_users=50, num_items=40, num_cities=5, num_categories=6, num_brands=9, history_length=4)
    return cfg, meta, FeatureSchema.from_meta(meta, 4)


def test_synthetic_batches_follow_the_schema() -> None:
    cfg, meta, schema = _small()
    data = SyntheticBatches(schema, 16, 2, meta.u2i_dim, pool=2, seed=3, negatives=4, click_rate=0.1)
    batch = next(data)
    kjt = batch.sparse_features
    assert kjt.keys() == schema.keys and kjt.stride() == 26
    for key, jt in kjt.to_dict().items():
        card = schema.cardinality[schema.table_for_key(key)]
        v = jt.values()
        assert v.numel() == 0 or (int(v.min()) >= 0 and int(v.max()) < card)
        assert set(jt.lengths().tolist()) <= ({0, 1} if key.startswith("hist_") else {1})
    assert batch.u2i.shape == (16, meta.u2i_dim) and batch.retrieval_u2i.shape == (10, meta.u2i_dim)
    assert batch.retrieval_labels.tolist() == [1, 0, 0, 0, 0] * 2  # one click, then 4 negatives per slot
    assert next(data) is not batch and next(data) is batch  # a cycle of `pool` batches
    # the batch's clicks fill the slots in order, the rest are weight-0 padding, as in the reader
    for clicks_wanted, rate in ((0, 0.0), (2, 1.0)):
        b = next(SyntheticBatches(schema, 16, 2, meta.u2i_dim, pool=1, negatives=4, click_rate=rate))
        assert int(b.labels.sum()) == 8 * clicks_wanted
        assert b.retrieval_weights.tolist() == [float(clicks_wanted > 0)] * 10
    b = next(SyntheticBatches(schema, 400, 300, meta.u2i_dim, pool=1, seed=5, negatives=1, click_rate=0.25))
    real_slots = int(b.retrieval_weights.sum()) // 2
    assert real_slots == int(b.labels.sum()) and 60 < real_slots < 140
    assert b.retrieval_weights[: 2 * real_slots].all() and not b.retrieval_weights[2 * real_slots:].any()
    assert auto_positive_slots(0.1077, 256) == 56 and auto_positive_slots(0.9, 10) == 10


def test_plain_reference_computes_the_same_function() -> None:
    """Same weights -> same loss, logits and gradients (table gradients compared densely)."""
    cfg, meta, schema = _small()
    torch.manual_seed(0)
    trec = DIGModel(cfg, meta)
    init_tokenizer_randomly(trec, seed=1)
    plain = make_plain(copy.deepcopy(trec), copy_weights=True)
    assert isinstance(plain.embedding_bags, PlainEmbeddingBagCollection)
    assert not any(type(m).__module__.startswith("torchrec.modules.embedding") for m in plain.modules())
    batch = next(SyntheticBatches(schema, 12, 2, meta.u2i_dim, seed=2, click_rate=0.5))
    trec.train()
    plain.train()
    loss_t, out_t = trec(batch)
    loss_p, out_p = plain(batch)
    torch.testing.assert_close(loss_p, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_p.rank_logits, out_t.rank_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_p.recall_logits, out_t.recall_logits, rtol=1e-5, atol=1e-6)
    loss_t.backward()
    loss_p.backward()
    grads_t = dict(trec.named_parameters())
    for name, p in plain.named_parameters():
        g_t = grads_t[name].grad
        g_p = p.grad.to_dense() if p.grad is not None and p.grad.is_sparse else p.grad
        if g_t is None:
            assert g_p is None or not g_p.any(), name
            continue
        assert g_p is not None, name
        torch.testing.assert_close(g_p, g_t, rtol=1e-4, atol=1e-6, msg=name)
    assert plain.embedding_bags.embedding_bags["user_id"].weight.grad.is_sparse  # SGD-on-sparse-rows reference


def test_rank_only_is_dig_without_the_recall_path() -> None:
    cfg, meta, schema = _small()
    torch.manual_seed(0)
    dig = DIGModel(cfg, meta)
    rank_only = DIGModel(cfg, meta, rank_only=True)
    missing, unexpected = rank_only.load_state_dict(dig.state_dict(), strict=False)
    assert not missing and unexpected and all(k.split(".")[0] in ("sid_embedding_bags", "u2t_mlp", "u2t_stats",
                                                                   "bn_sid", "bn_u2t") for k in unexpected)
    batch = next(SyntheticBatches(schema, 12, 2, meta.u2i_dim, seed=2, click_rate=0.5))  # its retrieval rows are ignored
    dig.eval()
    rank_only.eval()
    with torch.no_grad():
        want = dig.forward_parts(batch).output.rank_logits
        _, got = rank_only(batch)
    torch.testing.assert_close(got.rank_logits, want)  # same exposure rows, same network, eval-mode BN
    rank_only.train()
    loss, _ = rank_only(batch)
    loss.backward()
    # no recall-path module left, and every remaining parameter is trained by L_rank (DDP needs no unused search)
    assert not any(n.startswith(("sid_embedding_bags", "u2t", "bn_sid", "bn_u2t")) for n, _ in rank_only.named_parameters())
    assert all(p.grad is not None for p in rank_only.parameters())
    assert rank_only.embedding_bags.embedding_bags["user_id"].weight.grad is not None


def test_phase_mapping_of_profiler_ranges() -> None:
    from benchmarks.train_throughput import _phase_of

    assert _phase_of("## forward 4 ##") == "forward"
    assert _phase_of("## backward ##") == "backward"
    assert _phase_of("## optimizer 7 ##") == "optimizer" and _phase_of("## zero_grad ##") == "optimizer"
    assert _phase_of("## start_sparse_data_dist 5 ##") == "data" and _phase_of("## data ##") == "data"
    assert _phase_of("aten::mm") is None


def test_beam_bench_user_budgets_shrink_with_the_catalog() -> None:
    import argparse

    from benchmarks.beam_search import users_for

    a = argparse.Namespace(exhaustive_rows=300_000, min_exhaustive_users=2, max_users=8, full_rows=200_000, beam_users=4)
    assert users_for(10_000, a) == (8, 8, 8)
    assert users_for(500_000, a) == (4, 2, 1)


@pytest.mark.slow
def test_train_throughput_runs_end_to_end(tmp_path: Path) -> None:
    from benchmarks.train_throughput import main

    out = tmp_path / "tt.json"
    assert main(["--users", "300", "--items", "200", "--batch-size", "16", "--steps", "2", "--warmup", "1",
                 "--profile-steps", "1", "--rounds", "1", "--world-sizes", "1", "2", "--out", str(out),
                 "--memory-wait-s", "0"]) == 0
    res = json.loads(out.read_text())
    for key in ("dig_vs_rank_only", "torchrec_vs_plain_pytorch", "mfu"):
        assert isinstance(res[key], float) and res[key] > 0
    assert set(res["samples_per_s"]) == {f"{v}@{w}" for v in ("dig", "rank_only", "plain", "plain_rank_only")
                                         for w in (1, 2)}
    assert out.with_suffix(".png").stat().st_size > 0
    split = res["details"]["dig@2"]["per_rank"][0]["split_seconds_per_step"]
    assert split["forward"] > 0 and split["backward"] > 0


@pytest.mark.slow
def test_beam_search_bench_runs_end_to_end(tmp_path: Path) -> None:
    from benchmarks.beam_search import main

    out = tmp_path / "bs.json"
    assert main(["--catalogs", "300", "600", "--beams", "16", "64", "--beam-users", "2", "--max-users", "2",
                 "--user-table-rows", "100", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0.0 <= res["fidelity_top10_b64_600"] <= 1.0
    assert res["speedup_limit_600"] == 600 / res["details"][-1]["methods"]["beam_b64"]["scored_pairs_per_user"]
    m = res["details"][-1]["methods"]
    assert m["full"]["scored_pairs_per_user"] == 600
    assert m["beam_b16"]["scored_pairs_per_user"] < m["beam_b64"]["scored_pairs_per_user"] <= 600
    assert m["exhaustive"]["scored_pairs_per_user"] == res["details"][-1]["collisions"]["occupied_leaves"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_dig_bench_finds_every_script() -> None:
    from dig_torchrec.bench import SCRIPTS, script_path
    from dig_torchrec.errors import ConfigError

    for name, file in SCRIPTS.items():
        assert script_path(name) == ROOT / "benchmarks" / file
    with pytest.raises(ConfigError, match="unknown benchmark"):
        script_path("nope")
