"""Retrieval validation during training and the ``checkpoints/best`` selection (train.select_metric)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dig_torchrec.config import load_config
from dig_torchrec.errors import ConfigError
from dig_torchrec.training.checkpoint import CheckpointManager
from test_train_single_process import _cfg as single_process_cfg


def _cfg(data: Path, run_dir: Path, *extra: str):
    """test_train_single_process's tiny training config, keeping one checkpoint besides the best."""
    return single_process_cfg(data, run_dir, "train.deterministic=false", "train.keep_latest_k=1", *extra)


def _fake_checkpoint(mgr: CheckpointManager, step: int) -> Path:
    """A directory the manager counts as a complete checkpoint (its COMPLETE marker and DCP metadata)."""
    d = mgr.dir / f"step-{step}"
    d.mkdir(parents=True)
    for f in ("COMPLETE", ".metadata"):
        (d / f).write_text("x")
    return d


def test_best_checkpoint_is_the_argmax_of_the_logged_validation_metric(tiny_dataset: Path, tmp_path: Path) -> None:
    from dig_torchrec.retrieval.validation import RetrievalValidator
    from dig_torchrec.training.trainer import Trainer

    run = tmp_path / "r"
    cfg = _cfg(tiny_dataset, run, "train.max_steps=12", "train.val_every=3", "train.val_retrieval_users=40",
               "train.select_metric=recall@10", "eval.beam_size=8", "train.lr=0.01")
    trainer = Trainer(cfg, retrieval_validator=RetrievalValidator)
    try:
        trainer.train()
    finally:
        trainer.close()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in logged if r["kind"] == "valid" and r.get("valid/recall@10") is not None]
    assert [r["step"] for r in valid] == [3, 6, 9, 12]
    for r in valid:
        assert 0.0 <= r["valid/recall@10"] <= 1.0 and 0.0 <= r["valid/ndcg@10"] <= r["valid/recall@10"] + 1e-9
        assert all(0.0 < r[f"valid/sid_utilization_l{l}"] <= 1.0 for l in (1, 2, 3))
    churn = [r["valid/sid_churn"] for r in valid]
    assert churn[0] is None and all(0.0 <= c <= 1.0 for c in churn[1:])  # nothing to compare at the first one
    values = [r["valid/recall@10"] for r in valid]
    want = valid[values.index(max(values))]["step"]  # first argmax: ties keep the earlier checkpoint
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "recall@10" and best["step"] == want and best["value"] == pytest.approx(max(values))
    link = run / "checkpoints" / "best"
    assert link.is_symlink() and link.resolve() == (run / "checkpoints" / f"step-{want}").resolve()
    assert (link / "COMPLETE").is_file()
    # keep_latest_k=1 prunes every other step, never the best one
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert f"step-{want}" in steps and "step-12" in steps and len(steps) <= 2


def test_mark_best_moves_the_link_and_pruning_spares_its_target(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_latest_k=2)
    for step in (1, 2, 3, 4):
        d = _fake_checkpoint(mgr, step)
        if step == 1:
            mgr.mark_best(d, "rank_auc", 0.7, step)
    mgr._prune()
    names = sorted(p.name for p in mgr.dir.glob("step-*"))
    assert names == ["step-1", "step-4"]  # k=2: the best plus the newest
    mgr.mark_best(mgr.dir / "step-4", "rank_auc", 0.8, 4)
    assert mgr.read_best()["step"] == 4 and (mgr.dir / "best").resolve().name == "step-4"


def test_select_metric_recall_needs_retrieval_validation() -> None:
    with pytest.raises(ConfigError, match="train.val_retrieval_users"):
        load_config(None, ["train.select_metric=recall@10"])
    with pytest.raises(ConfigError, match="train.select_metric"):
        load_config(None, ["train.select_metric=loss"])


def test_paper_tables_evaluates_the_checkpoint_the_run_serves(tmp_path: Path) -> None:
    """benchmarks/paper_tables.py reads checkpoints/best when the run has one (what `make demo` serves), else the latest."""
    from benchmarks import paper_tables as PT

    mgr = CheckpointManager(tmp_path, keep_latest_k=8)
    for step in (2, 4, 6):
        _fake_checkpoint(mgr, step)
    assert PT.pick_checkpoint(tmp_path, "auto").name == "step-6"  # no best yet: the latest
    with pytest.raises(RuntimeError, match="checkpoints/best"):
        PT.pick_checkpoint(tmp_path, "best")
    mgr.mark_best(mgr.dir / "step-4", "recall@10", 0.09, 4)
    assert Path(PT.pick_checkpoint(tmp_path, "auto")).name == "step-4"
    assert PT.pick_checkpoint(tmp_path, "latest").name == "step-6"
    assert all(v.checkpoint == "auto" for v in PT.VARIANTS)
    base = next(v for v in PT.VARIANTS if v.name == "Base")  # rank-only: selected by rank AUC, not recall@10
    assert "train.select_metric=rank_auc" in base.train and "loss.recall_loss_weight=0" in base.train


def test_paper_tables_resumes_an_interrupted_training_instead_of_evaluating_it(tmp_path: Path, monkeypatch) -> None:
    """A run killed mid-training has complete checkpoints but no final_metrics.json: it is resumed, then evaluated."""
    import argparse

    from benchmarks import paper_tables as PT

    run_dir = tmp_path / "seed0" / "dig"
    mgr = CheckpointManager(run_dir, keep_latest_k=8)
    _fake_checkpoint(mgr, 200)
    calls = []

    def fake_run(cmd, log):
        calls.append(cmd)
        if "train" in cmd:  # the resumed training finishes
            _fake_checkpoint(mgr, 740)
            (run_dir / "final_metrics.json").write_text("{}")
        else:
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"recall@10": 0.1}))

    monkeypatch.setattr(PT, "run", fake_run)
    args = argparse.Namespace(force=False, overrides=[], config="configs/ml100k.yaml", split="test", eval_overrides=[],
                              max_users=0, exclude_history=False)
    dig = next(v for v in PT.VARIANTS if v.name == "DIG")
    res = PT.train_and_eval(args, dig, 0, tmp_path)
    train_cmd, eval_cmd = calls
    assert train_cmd[train_cmd.index("--resume") + 1] == "auto" and "--fresh" not in train_cmd
    assert eval_cmd[eval_cmd.index("--checkpoint") + 1].endswith("step-740") and res["checkpoint"] == "auto: step-740"
    cached = json.loads((tmp_path / "seed0" / "dig.json").read_text())  # annotated, and the partial file is gone
    assert cached["recall@10"] == 0.1 and cached["checkpoint"] == "auto: step-740"
    assert not list((tmp_path / "seed0").glob("*.eval.json"))
    calls.clear()
    PT.train_and_eval(args, dig, 0, tmp_path)  # cached: neither trained nor evaluated again
    assert calls == []
    (tmp_path / "seed0" / "dig.json").unlink()
    PT.train_and_eval(args, dig, 0, tmp_path)  # finished run, no evaluation: evaluate only
    assert len(calls) == 1 and "eval" in calls[0]
