"""Retrieval and evaluation with the real DIGModel (untrained, tokenizer initialized) on the
micro synthetic dataset: SID index files, beam search vs exhaustive search through the real
recall path, unified reranking by the real rank path, and the `evaluate` JSON contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dig_torchrec.config import apply_overrides
from dig_torchrec.data.reader import load_targets
from dig_torchrec.retrieval.beam_search import beam_search, exhaustive_leaf_search
from dig_torchrec.retrieval.evaluate import (
    FLAT_KEYS,
    UserBatchScorers,
    evaluate,
    format_table,
    kjt_select_rows,
    retrieve_topn,
    write_json,
)

from conftest import untrained_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_dataset, tmp_path_factory):
    return untrained_bundle(tiny_dataset, tmp_path_factory.mktemp("ckpt"), "data.history_length=5",
                            "eval.user_batch_size=16", "eval.beam_size=8", "eval.unified_top_n=20", "eval.topk=[10, 20]",
                            "tokenizer.num_codes=8", "tokenizer.num_layers=3")


def test_sid_index_saved_next_to_checkpoint(bundle):
    d = bundle.checkpoint / "sid_index"
    table = pq.read_table(d / "sid_table.parquet")
    assert table.num_rows == bundle.items.num_items
    assert table.column_names == ["item_id", "s_1", "s_2", "s_3", "leaf_code"]
    # the index is the model's assignment of the whole corpus
    assert torch.equal(bundle.index.item_sids, bundle.model.full_corpus_sids(bundle.items))
    inv = pq.read_table(d / "inverted_index.parquet").to_pydict()
    assert sorted(v for items in inv["items"] for v in items) == list(range(bundle.items.num_items))
    assert json.loads((d / "index.json").read_text())["collisions"]["num_items"] == bundle.items.num_items


def test_kjt_select_rows(bundle):
    t = load_targets(bundle.data_root, "test", bundle.schema)
    rows = torch.tensor([4, 0, 4, 2])
    sub = kjt_select_rows(t.user_kjt, rows)
    full, part = t.user_kjt.to_dict(), sub.to_dict()
    assert sub.stride() == 4 and sub.keys() == t.user_kjt.keys()
    for k in t.user_kjt.keys():
        want = [full[k].to_dense()[r].tolist() for r in rows.tolist()]
        assert [x.tolist() for x in part[k].to_dense()] == want


def test_wide_beam_equals_exhaustive_with_real_recall_path(bundle):
    t = load_targets(bundle.data_root, "test", bundle.schema)
    rows = torch.arange(6)
    sc = UserBatchScorers(bundle, kjt_select_rows(t.user_kjt, rows), t.states.select(rows), 0, "mlp")
    K, L = bundle.index.num_codes, bundle.index.num_layers
    beam = beam_search(sc.recall, 6, bundle.index, beam_size=K ** (L - 1))
    exh = exhaustive_leaf_search(sc.recall, 6, bundle.index, topn=K ** (L - 1))
    n = min(20, bundle.index.leaf_codes.numel())
    assert torch.equal(beam.codes[:, :n], exh.codes[:, :n])
    torch.testing.assert_close(beam.scores[:, :n], exh.scores[:, :n], rtol=1e-5, atol=1e-5)
    assert bool(bundle.index.is_valid(beam.codes[:, :n], L).all())


def test_unified_mode_is_sorted_by_rank_path(bundle):
    t = load_targets(bundle.data_root, "test", bundle.schema)
    rows = torch.arange(5)
    run = retrieve_topn(bundle, t, rows, ["beam", "unified"], 10, unified_top_n=10, progress=False)
    sc = UserBatchScorers(bundle, kjt_select_rows(t.user_kjt, rows), t.states.select(rows), 0, "mlp")
    items = run.items["unified"]
    ui = torch.arange(5).unsqueeze(1).expand_as(items)
    ok = items >= 0
    rank = sc.rank(ui[ok], items[ok])
    torch.testing.assert_close(run.scores["unified"][ok], rank, rtol=1e-5, atol=1e-5)
    for r in range(5):
        s = run.scores["unified"][r][items[r] >= 0]
        assert bool((s[:-1] >= s[1:]).all())
    # unified candidates come from the beam's leaves
    leaves = set(bundle.index.item_leaf_code[items[ok]].tolist())
    assert bool(bundle.index.is_valid(torch.tensor(sorted(leaves)), bundle.index.num_layers).all())


def test_exclude_history_removes_history_items(bundle):
    t = load_targets(bundle.data_root, "test", bundle.schema)
    rows = torch.arange(12)
    run = retrieve_topn(bundle, t, rows, ["beam", "full", "popularity"], 20, exclude_history=True, progress=False)
    hist = t.history[rows]
    assert (hist >= 0).any()
    for m in ("beam", "full", "popularity"):
        for r in range(12):
            h = set(hist[r][hist[r] >= 0].tolist())
            assert not h & set(run.items[m][r].tolist()), m


def test_evaluate_json_contract(bundle, tmp_path):
    res = evaluate(bundle, "test", max_users=24, max_exposure_batches=2, progress=False)
    for k in FLAT_KEYS:
        if k.endswith("@50") or k.endswith("@100"):
            continue  # this config's topk is [10, 20]
        assert k in res, k
    for k in ("recall@10", "ndcg@10", "recall@20", "unified_recall@10", "beam_fidelity@10", "popularity_recall@10",
              "exhaustive_recall@10", "full_ranking_recall@10", "rank_auc", "recall_auc"):
        assert 0.0 <= res[k] <= 1.0, (k, res[k])
    assert res["num_users"] == 24 and res["candidates"] == "include_history"
    assert len(res["recall_auc_per_layer"]) == bundle.index.num_layers
    assert res["recall_rank_auc_gap"] == pytest.approx(res["recall_auc"] - res["rank_auc"])
    assert res["collision_rate"] == pytest.approx(bundle.index.collision_stats().collision_rate)
    sids = bundle.index.item_sids
    assert res["sid_utilization_per_layer"] == [len(set(sids[:, l].tolist())) / bundle.index.num_codes
                                                for l in range(bundle.index.num_layers)]
    assert res["recall@20"] >= res["recall@10"]
    out = tmp_path / "m.json"
    write_json(res, out)
    back = json.loads(out.read_text())
    flat = [k for k in FLAT_KEYS if k in res]
    assert list(back)[:len(flat)] == flat  # the flat contract keys lead the JSON
    assert back["recall@10"] == res["recall@10"]
    assert "beam search" in format_table(res)
    res2 = evaluate(bundle, "test", max_users=10, exclude_history=True, exposures=False, full_ranking=False,
                    progress=False)
    assert res2["candidates"] == "exclude_history" and math.isnan(res2["rank_auc"])
    write_json(res2, out)
    assert json.loads(out.read_text())["rank_auc"] is None  # NaN is written as null


def test_apply_overrides_rejects_unknown_keys(bundle):
    from dig_torchrec.errors import ConfigError

    cfg = apply_overrides(bundle.cfg, ["eval.beam_size=3", "u2t.inference=stat_mean"])
    assert cfg.eval.beam_size == 3 and cfg.u2t.inference == "stat_mean"
    assert bundle.cfg.eval.beam_size == 8
    with pytest.raises(ConfigError, match="eval.beam_width"):
        apply_overrides(bundle.cfg, ["eval.beam_width=3"])
