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


@pytest.mark.slow
def test_two_rank_run_syncs_codebooks_and_reshards_to_one_process(tiny_dataset: Path, tmp_path: Path) -> None:
    from dig_torchrec.model import DIGModel  # noqa: F401  (fail fast if the model is missing)
    from dig_torchrec.data.reader import ExposureReader
    from dig_torchrec.training.checkpoint import is_complete, read_train_state
    from dig_torchrec.inference import load_for_inference

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


def _params(checkpoint: Path) -> dict:
    from dig_torchrec.inference import load_for_inference

    model, _, _ = load_for_inference(checkpoint)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_two_rank_resume_matches_uninterrupted_run_and_loads_on_one_rank(tiny_dataset: Path, tmp_path: Path) -> None:
    common = {"train.checkpoint_every": 8, "train.deterministic": "true", "train.val_every": 0}
    run_driver(micro_overrides(tiny_dataset, tmp_path / "a", **common, **{"train.max_steps": 16}), tmp_path / "da")
    run_driver(micro_overrides(tiny_dataset, tmp_path / "b", **common, **{"train.max_steps": 8}), tmp_path / "db0")
    run_driver(micro_overrides(tiny_dataset, tmp_path / "b", **common, **{"train.max_steps": 16}), tmp_path / "db",
               resume="auto")
    full, resumed = _params(tmp_path / "a" / "checkpoints" / "step-16"), _params(tmp_path / "b" / "checkpoints" / "step-16")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the same reader position on every rank
    for r in (0, 1):
        a, b = torch.load(tmp_path / "da" / f"rank{r}.pt"), torch.load(tmp_path / "db" / f"rank{r}.pt")
        keys = ("epoch", "batches_in_epoch", "rows_consumed")
        assert {k: a["reader"][k] for k in keys} == {k: b["reader"][k] for k in keys}

    # resharding through the trainer: the 2-rank checkpoint resumed by ONE process (DMP world of one)
    run_driver(micro_overrides(tiny_dataset, tmp_path / "c", **common, **{"train.max_steps": 16}), tmp_path / "dc",
               nproc=1, resume=str(tmp_path / "a" / "checkpoints" / "step-16"))
    two, one = torch.load(tmp_path / "da" / "pred0.pt"), torch.load(tmp_path / "dc" / "pred0.pt")
    torch.testing.assert_close(one["rank_logits"], two["rank_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one["recall_logits"], two["recall_logits"], rtol=1e-5, atol=1e-5)


def _shuffle_train_labels(src: Path, dst: Path, seed: int = 0) -> None:
    """Copy a dataset and permute the label across the train rows: no learnable signal left.

    ``user_state`` (each user's u2i prefix statistics) is stored on click rows only, and must
    be non-decreasing per user in time, so it cannot travel with a permuted label: every
    click row after the permutation gets an empty state (no statistics) and every other row
    none. A label drawn independently of every feature then leaves nothing to learn.
    """
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    for f in sorted((dst / "train").glob("*.parquet")):
        pf = pq.ParquetFile(f)
        rg_rows = pf.metadata.row_group(0).num_rows
        table = pf.read()
        perm = rng.permutation(table.num_rows)
        i = table.column_names.index("label")
        labels = table.column("label").take(pa.array(perm))
        table = table.set_column(i, "label", labels)
        j = table.column_names.index("user_state")
        state_type = table.schema.field("user_state").type
        state = pa.array([[] if y else None for y in labels.to_pylist()], type=state_type)
        table = table.set_column(j, pa.field("user_state", state_type), state)
        pq.write_table(table, f, row_group_size=rg_rows)
    for cache in dst.glob(".dig_validated*"):
        cache.unlink()


@pytest.mark.slow
def test_planted_structure_is_learned_and_shuffled_labels_are_not(tmp_path: Path) -> None:
    """2 ranks, configs/tiny.yaml on the tiny synthetic preset (oracle valid AUC ~0.80)."""
    from dig_torchrec.data.synthetic import generate, preset

    data = tmp_path / "tiny"
    generate(preset("tiny"), data, processes=1)
    run_driver([f"data.path={data}", f"run_dir={tmp_path / 'run'}"], tmp_path / "d", timeout=1800)
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())["metrics"]
    assert final["valid/rank_auc"] > 0.7, final

    shuffled = tmp_path / "tiny_shuffled"
    _shuffle_train_labels(data, shuffled)
    run_driver([f"data.path={shuffled}", f"run_dir={tmp_path / 'run_shuffled'}"], tmp_path / "ds", timeout=1800)
    noise = json.loads((tmp_path / "run_shuffled" / "final_metrics.json").read_text())["metrics"]
    assert abs(noise["valid/rank_auc"] - 0.5) < 0.05, noise


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dist.ddp", "component"])
def test_torchx_launch_completes(tiny_dataset: Path, tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "run"
    overrides = micro_overrides(tiny_dataset, run_dir, **{"train.max_steps": 6})
    torchx = str(Path(sys.executable).parent / "torchx")
    if how == "dist.ddp":
        cmd = [torchx, "run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "-m", "dig_torchrec.training.cli", "--",
               "--config", str(TINY_CONFIG), *overrides]
    else:
        cmd = [torchx, "run", "-s", "local_cwd", "launch/components.py:train", "--config", str(TINY_CONFIG),
               "--nproc_per_node", "2", *overrides]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 6 and final["world_size"] == 2
