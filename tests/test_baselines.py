"""benchmarks/baselines.py: cornac peers on the project's exact split, metrics cross-checked.

Needs the optional ``[baselines]`` extra (cornac); skipped without it. Uses the session's
micro synthetic dataset (``tiny_dataset``) and, when present, the real MovieLens 100K files.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("cornac", reason="cornac not installed: `pip install -e '.[baselines]'` to run the peer baseline tests")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import baselines as B  # noqa: E402


@pytest.fixture(scope="module")
def split(tiny_dataset):
    return B.load_split(tiny_dataset)


def _train_clicks(root: Path):
    """Independent read of the train split's clicks: (user, item, ts) in (user, time) order."""
    t = pq.read_table(root / "train").to_pydict()
    rows = [(u, i, ts, n) for n, (u, i, ts, lab) in
            enumerate(zip(t["user_id"], t["item_id"], t["timestamp"], t["label"])) if lab > 0]
    rows.sort(key=lambda r: (r[0], r[2], r[3]))
    return [(u, i, ts) for u, i, ts, _ in rows]


def test_cornac_inputs_are_the_project_train_clicks_without_leakage(tiny_dataset, split):
    train_set, val_set = B.cornac_datasets(split)
    clicks = _train_clicks(tiny_dataset)
    # (a) cornac's training sessions hold exactly the train clicks, per user in time order
    got = []
    for sid, idx in train_set.sessions.items():
        users = set(train_set.uir_tuple[0][idx].tolist())
        assert len(users) == 1
        u = users.pop()
        got += [(u, int(i)) for i in train_set.uir_tuple[1][idx]]
    assert got == [(u, i) for u, i, _ in clicks]
    assert train_set.num_items == split.num_items  # every corpus item is a candidate
    # no test or valid target EVENT (user, item, ts) is a training interaction, and nothing in
    # training is later than the user's validation target
    train_events = {(u, i, ts) for u, i, ts in clicks}
    last_train_ts = {}
    for u, _, ts in clicks:
        last_train_ts[u] = max(ts, last_train_ts.get(u, ts))
    for tg in (split.valid, split.test):
        assert len(tg.user)
        for u, i, ts in zip(tg.user.tolist(), tg.item.tolist(), tg.ts.tolist()):
            assert (u, i, ts) not in train_events
    for u, ts in zip(split.valid.user.tolist(), split.valid.ts.tolist()):
        assert last_train_ts.get(u, -1) <= ts
    # the test users are exactly the project's retrieval targets, and each input sequence ends
    # with the stored history (oldest first) and never contains the target event
    t = pq.read_table(tiny_dataset / "retrieval" / "test.parquet").to_pydict()
    assert split.test.user.tolist() == t["user_id"] and split.test.item.tolist() == t["item_id"]
    H = split.history_length
    for x, h in zip(split.test.inputs, t["history"]):
        assert x[-H:].tolist() == h
    # the validation session = the input before the target + the valid target, last
    vt = {int(u): int(i) for u, i in zip(split.valid.user, split.valid.item)}
    for sid, idx in val_set.sessions.items():
        u = int(val_set.uir_tuple[0][idx[0]])
        assert int(val_set.uir_tuple[1][idx[-1]]) == vt[u]


def test_mostpop_topk_is_the_hand_computed_popularity_ranking(tiny_dataset, split):
    res = B.run_peer(split, "MostPop", 0, keep_lists=True)
    clicks = _train_clicks(tiny_dataset)
    # cornac's MostPop counts DISTINCT users per item (nonzeros of the user x item matrix); the
    # project's popularity counts clicks. They coincide when no user clicks an item twice (ML-100K)
    pop = Counter(i for _, i in {(u, i) for u, i, _ in clicks})
    ranking = sorted(range(split.num_items), key=lambda i: (-pop.get(i, 0), i))
    lists = res["lists"]["include_history"]
    assert lists.shape == (len(split.test.user), B.TOPN)
    for row in lists:
        assert row[row >= 0].tolist() == ranking[: B.TOPN]
    for row, hist in zip(res["lists"]["exclude_history"], split.test.stored_history):
        assert row[row >= 0].tolist() == [i for i in ranking if i not in set(hist.tolist())][: B.TOPN]
    # the project's own popularity (items.parquet train_clicks) is the plain click count
    tc = pq.read_table(tiny_dataset / "items.parquet").to_pydict()
    assert [Counter(i for _, i, _ in clicks).get(i, 0) for i in tc["item_id"]] == tc["train_clicks"]
    assert res["metrics"]["include_history"]["cross_check"]["agree"]


def test_project_metric_matches_cornac_metric_on_hand_lists():
    lists = np.array([[3, 1, 2, -1], [0, 5, 7, 9], [4, 4, 6, 8], [-1, -1, -1, -1], [9, 8, 7, 2]])
    targets = np.array([2, 0, 8, 1, 2])
    for k in (1, 2, 3, 4):
        cc = B.cross_check(lists, targets, k)
        assert cc["agree"], cc
    cc = B.cross_check(lists, targets, 3)
    # hits within 3: user0 rank 3, user1 rank 1 -> recall 2/5; ndcg (1/log2(4) + 1) / 5
    assert cc["project"]["recall@3"] == pytest.approx(0.4)
    assert cc["project"]["ndcg@3"] == pytest.approx((0.5 + 1.0) / 5)


def test_sasrec_smoke_and_cached_driver(tiny_dataset, split, tmp_path, monkeypatch):
    settings = dict(B.PEERS["SASRec"], n_epochs=2, val_eval_every=1, embedding_dim=16, n_sample=64, batch_size=256)
    monkeypatch.setitem(B.PEERS, "SASRec", settings)
    res = B.cached_run(split, "SASRec", 0, "test", tmp_path)
    assert len(res["val_curve"]) == 2 and res["best_epoch"] in (1, 2)
    for cand in B.CANDIDATES:
        m = res["metrics"][cand]
        assert 0.0 <= m["recall@10"] <= m["recall@50"] <= m["recall@100"] <= 1.0
        assert m["cross_check"]["agree"]
    again = B.cached_run(split, "SASRec", 0, "test", tmp_path)  # served from the cache
    assert again["train_time_s"] == res["train_time_s"]
    doc = {"command": "x", "cornac_version": "3.0.1",
           "peers": {"SASRec": {**B.summarize([res]), "runs": [res]}}}
    rows = B.peer_rows(doc)
    assert [r.name for r in rows] == ["SASRec (cornac)", "SASRec (cornac), exclude history"]
    assert rows[0].fmt("recall@10") == f"{res['metrics']['include_history']['recall@10']:.4f}"
    path = tmp_path / "b.json"
    path.write_text(json.dumps(doc))
    table, section = B.peer_markdown(path)
    assert len(table) == 2 and table[0].startswith("| SASRec (cornac) |") and table[0].count("|") == 10
    assert any("embedding_dim=16" in line for line in section)


ML100K = next((Path(c) for c in (os.environ.get("DIG_ML100K", ""), "/work/shared/data/ml-100k")
               if c and (Path(c) / "u.data").exists()), None)


@pytest.mark.skipif(ML100K is None, reason="MovieLens 100K not found ($DIG_ML100K or /work/shared/data/ml-100k): "
                                            "the real-data check of the peer inputs is skipped")
def test_ml100k_split_and_cornac_mostpop_equal_the_project_popularity(tmp_path):
    from dig_torchrec.data.movielens import convert

    convert(ML100K, tmp_path / "ml")
    data = B.load_split(tmp_path / "ml")  # raises if any input disagrees with the stored history
    assert (len(data.test.user), data.num_items) == (942, 1682)
    res = B.run_peer(data, "MostPop", 0)
    # the numbers of the project's popularity baseline (benchmarks/results/paper_tables_ml100k.md)
    assert res["metrics"]["include_history"]["recall@10"] == pytest.approx(50 / 942)
    assert res["metrics"]["include_history"]["cross_check"]["agree"]


def test_paper_tables_peers_option_adds_rows_and_section(tmp_path):
    """``paper_tables.py --peers``: the committed DIG results re-rendered with a peers JSON."""
    import argparse

    import paper_tables as PT

    results = json.loads((REPO / "benchmarks" / "results" / "paper_tables_ml100k.json").read_text())["results"]
    res = {v.name: results.get(v.name, []) for v in PT.VARIANTS}
    run = {"seed": 0, "settings": {"embedding_dim": 64}, "train_time_s": 12.0, "score_time_s": 1.0,
           "metrics": {c: {"recall@10": 0.125, "ndcg@10": 0.05, "recall@50": 0.3, "ndcg@50": 0.08,
                           "recall@100": 0.4, "ndcg@100": 0.1, "cross_check": {"agree": True}} for c in B.CANDIDATES}}
    doc = {"command": "python benchmarks/baselines.py ...", "cornac_version": "3.0.1",
           "peers": {"SASRec": {**B.summarize([run]), "runs": [run]}}}
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps(doc))
    args = argparse.Namespace(config="configs/ml100k.yaml", first_seed=0, notes=None, peers=str(peers))
    md = PT.render(args, res, "cmd", 0.0)
    main = md.split("## Main retrieval results")[1].split("\n## ")[0]
    assert "| SASRec (cornac) | 0.1250 | 0.0500 | 0.3000 | 0.0800 | 0.4000 | 0.1000 | – | – |" in main
    assert "| SASRec (cornac), exclude history | 0.1250 |" in main
    assert "## Peers (cornac baselines" in md and "embedding_dim=64" in md
    args.peers = None
    assert "SASRec" not in PT.render(args, res, "cmd", 0.0)  # without --peers: unchanged output
