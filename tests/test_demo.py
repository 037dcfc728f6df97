"""`make demo` pieces: a rerun on a finished run reuses an evaluation of the same checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import pytest

from dig_torchrec import demo


@pytest.fixture
def fake_eval(monkeypatch):
    """Replace the `dig eval` subprocess with one that writes a result and counts calls."""
    calls: List[List[str]] = []

    def run(cmd, what, env=None):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.write_text(json.dumps({"rank_auc": 0.5 + 0.01 * len(calls)}))

    monkeypatch.setattr(demo, "_run", run)
    return calls


def _checkpoint(tmp_path: Path, name: str = "step-10") -> Path:
    ckpt = tmp_path / "run" / "checkpoints" / name
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    return ckpt


def test_evaluation_is_reused_only_for_the_same_checkpoint_and_user_budget(tmp_path, fake_eval):
    ckpt, out = _checkpoint(tmp_path), tmp_path / "eval.json"
    first = demo.evaluate(ckpt, out, 500)
    assert len(fake_eval) == 1 and first == {"rank_auc": 0.51}
    assert demo.evaluate(ckpt, out, 500) == first and len(fake_eval) == 1  # reused
    demo.evaluate(ckpt, out, 100)  # another user budget: evaluated again
    assert len(fake_eval) == 2
    demo.evaluate(ckpt, out, 100)
    assert len(fake_eval) == 2
    # the same step directory written again (a new training run) has a newer COMPLETE marker
    marker = ckpt / "COMPLETE"
    st = marker.stat()
    os.utime(marker, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    demo.evaluate(ckpt, out, 100)
    assert len(fake_eval) == 3
    demo.evaluate(_checkpoint(tmp_path, "step-20"), out, 100)  # another checkpoint
    assert len(fake_eval) == 4


def test_a_damaged_evaluation_file_is_not_reused(tmp_path, fake_eval):
    ckpt, out = _checkpoint(tmp_path), tmp_path / "eval.json"
    demo.evaluate(ckpt, out, 500)
    out.write_text("{truncated")
    assert demo.evaluate(ckpt, out, 500) == {"rank_auc": 0.52}
    assert len(fake_eval) == 2


def test_demo_takes_the_best_checkpoint_when_the_run_marked_one(tmp_path):
    from dig_torchrec.demo import best_checkpoint
    from dig_torchrec.training.checkpoint import CheckpointManager

    assert best_checkpoint(tmp_path) is None  # no checkpoints yet: the demo keeps the last step
    mgr = CheckpointManager(tmp_path)
    for step in (10, 20):
        d = mgr.dir / f"step-{step}"
        d.mkdir(parents=True)
        (d / "COMPLETE").write_text("x")
        (d / ".metadata").write_text("x")
    mgr.mark_best(mgr.dir / "step-10", "recall@10", 0.12, 10)
    best = best_checkpoint(tmp_path)
    assert best["step"] == 10 and best["path"] == str((mgr.dir / "step-10").resolve())
