"""Worker failure and interrupted writes, on real multi-process runs (``make failover``).

* A 2-worker ``torchrun --max-restarts 1`` job whose rank 1 SIGKILLs itself at a random
  step (test-only knob ``DIG_FAULT_KILL_AT_STEP``, honoured on the first attempt only)
  restarts, resumes from the newest complete checkpoint (``--resume auto``) and finishes.
  Proof: the row accounting shows every train row consumed exactly once per epoch
  (counts and multiset fingerprint, counted from the checkpoint boundary), the final
  step is right, and the final validation AUC matches an uninterrupted same-seed run.
* A worker killed in the middle of a checkpoint save leaves the previous checkpoint as
  the one ``--resume auto`` picks, and the job still finishes.
* ``dig export`` killed mid-write leaves no partial bundle.

Set ``DIG_FAILOVER_SEED`` to replay a particular kill step (it is printed on failure).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from dig_torchrec.config import DataConfig, DIGConfig
from dig_torchrec.data.reader import open_dataset
from dig_torchrec.training.accounting import read_accounting, split_fingerprint
from dig_torchrec.training.checkpoint import CheckpointManager, is_complete

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY = 10
EPOCHS = 2
# AUC differences between the interrupted and the uninterrupted run above this are not noise
AUC_TOLERANCE = 0.02


def _overrides(data: Path, run: Path) -> List[str]:
    return [
        f"data.path={data}", f"run_dir={run}", "data.batch_size=64", "data.eval_batch_size=256",
        "data.history_length=5", "data.retrieval_positives=16", "data.negatives_per_positive=3",
        "data.shuffle_buffer=1024", "tokenizer.init_after_steps=20", f"train.epochs={EPOCHS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=10", "train.val_every=0",
        "train.deterministic=true", "train.keep_latest_k=2",
    ]


def _torchrun(data: Path, run: Path, env_extra: Optional[Dict[str, str]] = None, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIG_FAULT", "TORCHELASTIC"))}
    # torch >= 2.5 shares the rendezvous TCPStore with the workers' process group; after a restart
    # the workers then read the dead attempt's gloo addresses (pytorch/pytorch#135712): opt out
    env.update({"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "1", "-m", "dig_torchrec.training.cli",
           "--config", str(REPO / "configs" / "tiny.yaml"), "--resume", "auto", *_overrides(data, run)]
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "launcher.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=REPO)
    return proc


def _final(run: Path) -> Dict:
    return json.loads((run / "final_metrics.json").read_text())


def _log(run: Path) -> str:
    return (run / "launcher.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def reference(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict:
    """The uninterrupted same-seed run."""
    run = tmp_path_factory.mktemp("failover") / "uninterrupted"
    t0 = time.perf_counter()
    proc = _torchrun(tiny_dataset, run)
    assert proc.returncode == 0, _log(run)[-3000:]
    return {"run": run, "final": _final(run), "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def expected(tiny_dataset: Path) -> Dict:
    """Rows and fingerprint of the train split (from the parquet files) and the step count."""
    meta, schema = open_dataset(tiny_dataset, DataConfig(path=str(tiny_dataset), history_length=5))
    rows, fp = split_fingerprint(tiny_dataset, "train", schema)
    return {"rows": rows, "fingerprint": fp, "schema": schema}


def _check_accounting(run: Path, expected: Dict, steps_per_epoch: int) -> Dict[int, Dict]:
    acc = read_accounting(run)
    assert sorted(acc) == [0, 1], acc.keys()
    for epoch in range(EPOCHS):
        recs = [acc[r]["epochs"][str(epoch)] for r in (0, 1)]
        for rec in recs:
            assert rec["exact"] and rec["rows"] == rec["share_rows"] == rec["reader_rows_consumed"], rec
            assert rec["batches"] == rec["num_batches"] == steps_per_epoch, rec
        assert sum(r["rows"] for r in recs) == expected["rows"], (epoch, recs)
        fp = sum(int(r["fingerprint"], 16) for r in recs) % (1 << 64)
        assert fp == expected["fingerprint"], f"epoch {epoch}: rows were lost or repeated ({recs})"
    return acc


def test_worker_killed_at_random_step_resumes_and_finishes(tiny_dataset: Path, tmp_path: Path, reference: Dict,
                                                           expected: Dict) -> None:
    total = int(reference["final"]["step"])
    steps_per_epoch = total // EPOCHS
    seed = int(os.environ.get("DIG_FAILOVER_SEED", time.time_ns() % 100_000))
    kill_step = random.Random(seed).randint(CHECKPOINT_EVERY + 1, total - 2)
    note = f"DIG_FAILOVER_SEED={seed}: rank 1 killed after step {kill_step} of {total}"
    run = tmp_path / "interrupted"
    t0 = time.perf_counter()
    proc = _torchrun(tiny_dataset, run, {"DIG_FAULT_KILL_AT_STEP": str(kill_step), "DIG_FAULT_RANK": "1"})
    seconds = time.perf_counter() - t0
    log = _log(run)
    assert proc.returncode == 0, f"{note}\n{log[-4000:]}"
    assert f"test fault injection (DIG_FAULT_KILL_AT_STEP={kill_step}): rank 1 SIGKILLs itself" in log, note
    resumed_from = (kill_step // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    assert f"resumed from {run}/checkpoints/step-{resumed_from} at step {resumed_from}" in log, note

    # the final step count is right and the last checkpoint is complete
    final = _final(run)
    assert final["step"] == total, note
    assert final["checkpoint"] == str(run / "checkpoints" / f"step-{total}") and is_complete(final["checkpoint"])

    # every train row exactly once per epoch, counted from the checkpoint boundary
    acc = _check_accounting(run, expected, steps_per_epoch)
    resumed_epoch = resumed_from // steps_per_epoch
    rec = acc[1]["epochs"][str(resumed_epoch)]
    assert rec["attempt"] == 1 and rec["resumed_at"]["batches_in_epoch"] == resumed_from - resumed_epoch * steps_per_epoch
    _check_accounting(reference["run"], expected, steps_per_epoch)  # the reference run, too

    # the final validation AUC is within noise of the uninterrupted run
    auc_a = reference["final"]["metrics"]["valid/rank_auc"]
    auc_b = final["metrics"]["valid/rank_auc"]
    summary = {"kill_step": kill_step, "resumed_from": resumed_from, "total_steps": total,
               "auc_uninterrupted": auc_a, "auc_interrupted": auc_b,
               "seconds_uninterrupted": round(reference["seconds"], 1), "seconds_interrupted": round(seconds, 1)}
    print("failover:", json.dumps(summary))
    (run / "failover_summary.json").write_text(json.dumps(summary, indent=2))
    assert abs(auc_a - auc_b) <= AUC_TOLERANCE, f"{note}: {summary}"
    for layer_key in [k for k in reference["final"]["metrics"] if k.startswith("valid/recall_auc")]:
        assert abs(reference["final"]["metrics"][layer_key] - final["metrics"][layer_key]) <= AUC_TOLERANCE, layer_key


def test_kill_mid_checkpoint_save_keeps_previous_checkpoint(tiny_dataset: Path, tmp_path: Path, expected: Dict) -> None:
    """Rank 0 dies while writing step-20 (tensors on disk, no COMPLETE): the restart resumes from step-10."""
    run = tmp_path / "mid-save"
    proc = _torchrun(tiny_dataset, run, {"DIG_FAULT_KILL_IN_CHECKPOINT_SAVE": "20", "DIG_FAULT_RANK": "0"})
    log = _log(run)
    assert proc.returncode == 0, log[-4000:]
    assert "test fault injection (DIG_FAULT_KILL_IN_CHECKPOINT_SAVE=20): rank 0 SIGKILLs itself" in log
    assert f"resumed from {run}/checkpoints/step-10 at step 10" in log  # not the half-written step-20
    steps_per_epoch = read_accounting(run)[0]["epochs"]["0"]["num_batches"]
    assert _final(run)["step"] == EPOCHS * steps_per_epoch
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial save was cleaned up
    _check_accounting(run, expected, steps_per_epoch)


def test_checkpoint_half_written_is_never_picked(tmp_path: Path) -> None:
    """A save killed before COMPLETE: the previous checkpoint loads and ``--resume auto`` picks it."""
    script = (
        "import torch\n"
        "from dig_torchrec.config import DIGConfig\n"
        "from dig_torchrec.training.checkpoint import CheckpointManager\n"
        f"m = CheckpointManager({str(tmp_path)!r}, 3, config=DIGConfig())\n"
        "m.save(1, {'model': {'w': torch.ones(8)}})\n"
        "m.save(2, {'model': {'w': torch.full((8,), 2.0)}})\n"
    )
    env = {**os.environ, "DIG_FAULT_KILL_IN_CHECKPOINT_SAVE": "2"}
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / ".tmp-step-2" / ".metadata").is_file()  # the tensors of step 2 did reach the disk...
    mgr = CheckpointManager(tmp_path, 3, config=DIGConfig())
    assert mgr.resolve("auto") == ckpts / "step-1"  # ...but only the complete step 1 counts
    import torch

    state = {"model": {"w": torch.zeros(8)}}
    assert mgr.load(ckpts / "step-1", state).step == 1 and torch.equal(state["model"]["w"], torch.ones(8))
    mgr.save(3, {"model": {"w": torch.ones(8)}})
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1", "step-3"]  # the leftover temp is pruned


def test_kill_mid_export_leaves_no_partial_bundle(reference: Dict, tmp_path: Path) -> None:
    from dig_torchrec.export.bundle import is_bundle

    checkpoint = reference["final"]["checkpoint"]
    out = tmp_path / "bundle"
    dig = Path(sys.executable).with_name("dig")
    proc = subprocess.Popen([str(dig), "export", "--checkpoint", checkpoint, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    temps: List[Path] = []
    while time.time() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".bundle") and any(p.iterdir())]
        if temps:
            break
        time.sleep(0.05)
    assert temps and proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists() and not is_bundle(out)  # nothing at the destination
    done = subprocess.run([str(dig), "export", "--checkpoint", checkpoint, "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_bundle(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # stale temp removed by the rerun
