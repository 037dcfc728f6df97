"""Real multi-process training runs (gloo on CPU) through ``torchrun`` and the trainer.

The default run keeps one short 2-rank run; the long ones (planted-structure AUC, exact
resume, TorchX launch) are ``@pytest.mark.slow`` (``make test-slow``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "train_driver.py"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def micro_overrides(data: Path, run_dir: Path, **extra: object) -> List[str]:
    """tiny.yaml model on the micro dataset with small batches (a few seconds per epoch)."""
    base = {
        "data.path": str(data),
        "run_dir": str(run_dir),
        "data.batch_size": 64,
        "data.eval_batch_size": 256,
        "data.history_length": 5,
        "data.retrieval_positives": 16,
        "data.negatives_per_positive": 3,
        "data.shuffle_buffer": 1024,
        "tokenizer.init_after_steps": 4,
        "train.log_every": 4,
        "train.val_max_batches": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_driver(overrides: List[str], dump: Path, nproc: int = 2, resume: Optional[str] = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    cmd = [*launcher, str(DRIVER), "--config", str(TINY_CONFIG), "--dump", str(dump)]
    if resume:
        cmd += ["--resume", resume]
    cmd += overrides
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def test_two_rank_run_syncs_codebooks_and_reshards_to_one_process(tiny_dataset: Path, tmp_path: Path) -> None:
    from dig_torchrec.model import DIGModel  # noqa: F401  (fail fast if the model is missing)
    from dig_torchrec.data.reader import ExposureReader
    from dig_torchrec.training.checkpoint import is_complete, read_train_state
    from dig_torchrec.training.loading import load_for_inference

    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    run_driver(micro_overrides(tiny_dataset, run_dir, **{"train.max_steps": 12, "train.checkpoint_every": 6}), dump)

    # checkpoints: atomic step dirs with the training facts
    ckpts = run_dir / "checkpoints"
    assert is_complete(ckpts / "step-6") and is_complete(ckpts / "step-12")
    state = read_train_state(ckpts / "step-12")
    assert state["step"] == 12 and state["world_size"] == 2
    assert set(state["sharding"].values()) == {"table_wise"}
    assert (ckpts / "step-12" / "rank_state" / "rank-1.pt").exists()

    # codebooks, EMA statistics and the SID table are bitwise identical on both ranks
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert r0["initialized"] and r1["initialized"]
    assert r0["step"] == r1["step"] == 12
    assert r0["buffers"].keys() == r1["buffers"].keys()
    for name, value in r0["buffers"].items():
        assert torch.equal(value, r1["buffers"][name]), f"tokenizer buffer {name} differs across ranks"
    # ranks read different data
    assert r0["reader"]["rows_consumed"] > 0 and r0["reader"]["batches_in_epoch"] == 12

    # the 2-rank checkpoint loads into one unsharded process and predicts the same
    model, cfg, meta = load_for_inference(ckpts / "step-12")
    assert not model.training and meta.num_items == 150
    batch = next(iter(ExposureReader(cfg.data.path, "valid", cfg.data, model.schema, with_retrieval=False, shuffle=False)))
    with torch.no_grad():
        _, out = model(batch)
    pred = torch.load(dump / "pred0.pt")
    torch.testing.assert_close(out.rank_logits, pred["rank_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recall_logits, pred["recall_logits"], rtol=1e-5, atol=1e-5)

    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["checkpoint"].endswith("step-12")
    assert 0.0 <= final["metrics"]["valid/rank_auc"] <= 1.0
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "metrics.jsonl").is_file()
