"""``dig eval`` / ``dig retrieve`` through the real CLI on a checkpoint written by the real
CheckpointManager (an untrained micro model with an initialized tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dig_torchrec.cli import main as dig_main
from dig_torchrec.config import DataConfig, DIGConfig, EvalConfig, ModelConfig, TokenizerConfig, U2TConfig


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dig_torchrec.data.items import ItemTable
    from dig_torchrec.data.reader import open_dataset
    from dig_torchrec.model import DIGModel
    from dig_torchrec.training.checkpoint import CheckpointManager

    run = tmp_path_factory.mktemp("eval_run")
    cfg = DIGConfig(
        data=DataConfig(path=str(tiny_dataset), batch_size=64, eval_batch_size=256, history_length=5),
        model=ModelConfig(embedding_dim=8, din_hidden=[16, 8], cross_layers=1, num_experts=2, expert_hidden=[16, 8]),
        tokenizer=TokenizerConfig(num_layers=2, num_codes=16, encoder_layers=1, encoder_heads=2),
        u2t=U2TConfig(hidden_dim=8),
        eval=EvalConfig(beam_size=8, topk=[5, 10], unified_top_n=10, user_batch_size=16),
    )
    cfg.run_dir = cfg.train.run_dir = str(run)
    meta, schema = open_dataset(tiny_dataset, cfg.data)
    torch.manual_seed(0)
    model = DIGModel(cfg, meta, device="cpu").eval()
    items = ItemTable.load(tiny_dataset, schema, meta)
    model.initialize_tokenizer(model.corpus_item_representations(items))
    return CheckpointManager(run, config=cfg, dataset_meta=meta).save(1, {"model": model})


def test_dig_eval_writes_flat_json_and_sid_index(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "metrics.json"
    rc = dig_main(["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--max-users", "12",
                   "--max-exposure-batches", "1", "--no-progress", "--exclude-history"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "beam search" in printed and "rank AUC" in printed
    res = json.loads(out.read_text())
    for k in ("rank_auc", "recall_auc", "recall@10", "ndcg@10", "recall@5", "ndcg@5", "unified_recall@10",
              "beam_fidelity@10", "collision_rate"):
        assert isinstance(res[k], float), k
    assert res["candidates"] == "exclude_history" and res["num_users"] == 12
    assert res["beam_size"] == 10  # widened from eval.beam_size=8 to the largest cutoff
    # the index is stored beside the checkpoint it was built from
    assert pq.read_table(checkpoint / "sid_index" / "sid_table.parquet").num_rows == res["num_items"]


def test_dig_eval_accepts_run_dir_and_overrides(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    rc = dig_main(["eval", "--checkpoint", str(checkpoint.parent.parent), "--out", str(out), "--max-users", "8",
                   "--no-exposures", "--no-full-ranking", "--no-progress", "u2t.inference=none", "eval.topk=[3]"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["u2t_inference"] == "none" and "recall@3" in res and res["checkpoint"] == str(checkpoint)


def test_dig_eval_bad_override_is_a_one_line_error(checkpoint: Path, capsys) -> None:
    rc = dig_main(["eval", "--checkpoint", str(checkpoint), "eval.beam_width=3"])
    assert rc == 2
    assert "eval.beam_width" in capsys.readouterr().err


def test_dig_retrieve_users(checkpoint: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    users = pq.read_table(tiny_dataset / "retrieval" / "test.parquet").column("user_id").to_pylist()[:3]
    out = tmp_path / "recs.parquet"
    rc = dig_main(["retrieve", "--checkpoint", str(checkpoint), "--users", ",".join(map(str, users)), "--topk", "7",
                   "--mode", "unified", "--out", str(out), "--no-progress"])
    assert rc == 0
    recs = pq.read_table(out).to_pylist()
    assert sorted({r["user_id"] for r in recs}) == sorted(users)
    for u in users:
        mine = [r for r in recs if r["user_id"] == u]
        assert [r["rank"] for r in mine] == list(range(1, 8))
        scores = [r["score"] for r in mine]
        assert scores == sorted(scores, reverse=True)
        assert len({r["item_id"] for r in mine}) == 7
    assert f"user {users[0]}" in capsys.readouterr().out
    out_json = tmp_path / "recs.json"
    assert dig_main(["retrieve", "--checkpoint", str(checkpoint), "--users", str(users[0]), "--mode", "exhaustive",
                     "--out", str(out_json), "--no-progress"]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["mode"] == "exhaustive" and len(doc["results"]) == 10


def test_dig_retrieve_unknown_user(checkpoint: Path, capsys) -> None:
    rc = dig_main(["retrieve", "--checkpoint", str(checkpoint), "--users", "999999", "--no-progress"])
    assert rc == 2
    assert "user 999999" in capsys.readouterr().err
