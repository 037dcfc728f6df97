"""``benchmarks/beam_search.py --checkpoint``: the beam-search benchmark on a trained model.

A micro DIG run is trained for a few steps (tokenizer initialised at step 10) by the real
Trainer; the benchmark then loads its checkpoint (and its ``dig export`` bundle) the way
``dig eval`` does and serves the dataset's real test requests over its real catalog.
The strongest check: a beam at least as wide as the catalog keeps every valid prefix at
every depth, so beam search is exhaustive and its top-10 must equal the exhaustive leaf
search's exactly (fidelity 1.0): that only holds if both methods score the same users
with the same trained network and the same SID index.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dig_torchrec.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = 40


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``run/checkpoints/step-40`` of a micro DIG run trained by the real Trainer (a few seconds)."""
    from dig_torchrec.training.checkpoint import CheckpointManager
    from dig_torchrec.training.trainer import Trainer

    run = tmp_path_factory.mktemp("beam_bench_run")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.path={tiny_dataset}", f"run_dir={run}", "data.history_length=5", "data.batch_size=64",
        f"train.max_steps={STEPS}", "train.log_every=1000", "train.val_every=0", "train.checkpoint_every=0",
        "tokenizer.init_after_steps=10",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few seconds on one thread; oversubscribed cores make it minutes
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    latest = CheckpointManager(run).latest()
    assert latest is not None and latest.name == f"step-{STEPS}"
    return latest


def _num_items(root: Path) -> int:
    return pq.read_metadata(root / "items.parquet").num_rows


def test_checkpoint_mode_uses_the_real_catalog_and_requests(trained_checkpoint: Path, tiny_dataset: Path,
                                                           tmp_path: Path) -> None:
    from benchmarks.beam_search import main

    torch.set_num_threads(1)
    V = _num_items(tiny_dataset)
    out = tmp_path / "bs.json"
    # --catalogs is ignored in checkpoint mode; B = V is an unbounded beam
    assert main(["--checkpoint", str(trained_checkpoint), "--catalogs", "999", "--beams", "16", "64", str(V),
                 "--beam-users", "2", "--max-users", "2", "--fidelity-users", "6", "--ancestor-ranks", "2",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    tag = f"{V // 1000}k" if V % 1000 == 0 else str(V)
    [detail] = res["details"]
    assert detail["num_items"] == V == detail["collisions"]["num_items"]
    for key in ("speedup_vs_full_ranking", "fidelity_top10_b64", "speedup_limit"):
        assert isinstance(res[f"{key}_{tag}"], float), key
    assert not any(k.endswith("_999") for k in res)
    assert 0.0 <= res[f"fidelity_top10_b64_{tag}"] <= 1.0
    m = detail["methods"]
    # beam search with B >= |V| is exhaustive: identical top-10 for every fidelity user
    assert m[f"beam_b{V}"]["fidelity_top10"] == 1.0 and m[f"beam_b{V}"]["fidelity_users"] == 6
    # Recall@10 against the real held-out clicks, per method; the unbounded beam equals exhaustive
    assert m[f"beam_b{V}"]["recall@10"] == m["exhaustive"]["recall@10"]
    assert set(res["recall_at_10"]) == {"beam_b16", "beam_b64", f"beam_b{V}", "exhaustive", "full"}
    assert all(0.0 <= r <= 1.0 and abs(r * m[k]["users"] - round(r * m[k]["users"])) < 1e-9  # a share of users
               for k, r in res["recall_at_10"].items())
    assert m["beam_b16"]["fidelity_users"] == 6  # the requested fidelity set, not the row budget's 2+
    # per-user overlaps behind the mean, and the mean's standard error over those users
    for b in (16, 64, V):
        per_user = m[f"beam_b{b}"]["fidelity_top10_per_user"]
        assert len(per_user) == 6 and all(x * 10 == round(x * 10) for x in per_user)
        assert sum(per_user) / 6 == pytest.approx(m[f"beam_b{b}"]["fidelity_top10"])
        assert m[f"beam_b{b}"]["fidelity_top10_se"] == pytest.approx(torch.tensor(per_user).std().item() / 6 ** 0.5)
    assert m[f"beam_b{V}"]["fidelity_top10_se"] == 0.0
    assert res[f"fidelity_top10_b64_{tag}_se"] == m["beam_b64"]["fidelity_top10_se"]
    # the ancestor-rank diagnostic: every exhaustive top-10 leaf's ancestor at each depth < L, all
    # inside the top B when B covers every prefix
    anc = detail["ancestor_ranks"]
    L = detail["sid_shape"]["num_layers"]
    assert anc["users"] == 2 and len(anc["per_user"]) == 2 and len(anc["by_depth"]) == L - 1
    assert all(len(depth) == 10 for user in anc["per_user"] for depth in user)
    assert all(x["share_within_top_b"][str(V)] == 1.0 for x in anc["by_depth"])
    assert m["exhaustive"]["users"] == 6 and m["full"]["users"] == 2
    assert m["exhaustive"]["scored_pairs_per_user"] == detail["collisions"]["occupied_leaves"]
    assert m["full"]["scored_pairs_per_user"] == V
    assert res[f"speedup_limit_{tag}"] == V / m["beam_b64"]["scored_pairs_per_user"]
    setup = res["setup"]
    assert setup["trained"] is True and setup["step"] == STEPS
    assert setup["checkpoint"] == str(trained_checkpoint) and setup["data"] == str(tiny_dataset)
    assert "first 6 rows in file order" in setup["users"]
    first_users = pq.read_table(tiny_dataset / "retrieval" / "test.parquet", columns=["user_id"]).column(
        "user_id").to_pylist()[:6]
    assert setup["target_user_ids"] == first_users
    assert "U2I function" in setup["full_ranking_u2i"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_checkpoint_mode_serves_what_dig_eval_serves(trained_checkpoint: Path, tiny_dataset: Path) -> None:
    """The benchmark's exhaustive leaf search and full ranking return the same items for the
    same target rows as the retrieval package's ``retrieve_topn`` (``dig eval`` / ``dig retrieve``)."""
    from benchmarks.beam_search import build_checkpoint_catalog, run_method
    from dig_torchrec.data.reader import load_targets
    from dig_torchrec.retrieval.evaluate import load_inference_bundle, retrieve_topn

    torch.set_num_threads(1)
    args = argparse.Namespace(checkpoint=str(trained_checkpoint), data=None, split="test", user_sample="seeded",
                              seed=3, fidelity_users=5, exhaustive_rows=1, min_exhaustive_users=1, max_users=4,
                              full_rows=10**9, beam_users=1)
    cat = build_checkpoint_catalog(args)
    rows = cat["user_rows"]
    assert rows.numel() == 5 and bool((rows[1:] > rows[:-1]).all())  # eval's seeded subset, sorted
    mine = {m: torch.cat([run_method(cat, m, torch.tensor([i]), 0, 16384)["items"] for i in range(4)])
            for m in ("exhaustive", "full")}
    bundle = load_inference_bundle(trained_checkpoint)
    targets = load_targets(bundle.data_root, "test", bundle.schema)
    ref = retrieve_topn(bundle, targets, rows[:4], ["exhaustive", "full"], 10, progress=False)
    assert torch.equal(mine["exhaustive"], ref.items["exhaustive"])
    assert torch.equal(mine["full"], ref.items["full"])


def test_checkpoint_mode_reads_an_export_bundle_with_data_override(trained_checkpoint: Path, tiny_dataset: Path,
                                                                  tmp_path: Path) -> None:
    from benchmarks.beam_search import main
    from dig_torchrec.export.writer import export_bundle

    torch.set_num_threads(1)
    bundle = export_bundle(trained_checkpoint, tmp_path / "bundle")
    V = _num_items(tiny_dataset)
    out = tmp_path / "bundle.json"
    assert main(["--checkpoint", str(bundle), "--data", str(tiny_dataset), "--beams", "64", str(V), "--beam-users", "1",
                 "--max-users", "1", "--fidelity-users", "3", "--no-plot", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["details"][0]["num_items"] == V
    assert res["details"][0]["methods"][f"beam_b{V}"]["fidelity_top10"] == 1.0
    setup = res["setup"]
    assert setup["step"] == STEPS and setup["trained"] is True
    assert setup["checkpoint"] == str(bundle) and setup["data_override"] == str(tiny_dataset)
