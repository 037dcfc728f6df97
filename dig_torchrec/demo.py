"""``make demo``: data -> 2-worker TorchX training -> evaluation -> export -> summary.

    python -m dig_torchrec.demo --out runs/demo --ml100k ../shared/data/ml-100k

1. Dataset: MovieLens 100K through ``dig data convert movielens`` when ``--ml100k`` holds
   ``u.data``, else the synthetic ``tiny`` preset (``dig data synth``). An existing dataset
   is reused.
2. Training: ``torchx run -s local_cwd launch/components.py:train`` with 2 local workers
   (torchrun under the hood) and ``--resume auto``, so a rerun continues (or just
   re-validates) the run in ``OUT/train`` instead of starting over.
3. Evaluation: ``dig eval`` (Recall/NDCG@K, exact AUCs) of ``checkpoints/best`` (the best
   validation ``train.select_metric``; ``--last`` takes the last step).
4. Export: ``dig export`` into ``OUT/export`` (rewritten on every run).
5. A short summary: rank AUC, recall AUC, where the checkpoint and the bundle are.

Every step runs ``dig`` / ``torchx`` in a subprocess, as a user would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from dig_torchrec.training.checkpoint import CheckpointManager
from dig_torchrec.training.trainer import read_final_metrics

logger = logging.getLogger("dig_torchrec.demo")

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: List[str], what: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    logger.info("%s: %s", what, " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit {proc.returncode}); see the output above")
    logger.info("%s done in %.0fs", what, time.perf_counter() - t0)
    return proc


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv's ``dig``/``torchx``)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def prepare_dataset(ml100k: Optional[Path], data_root: Path) -> tuple[Path, Path]:
    """(dataset root, config file): MovieLens 100K if its files are there, else synthetic tiny."""
    if ml100k is not None and (ml100k / "u.data").is_file():
        root, config = data_root / "ml100k", REPO / "configs" / "ml100k.yaml"
        if not (root / "meta.json").is_file():
            _run([_bin("dig"), "data", "convert", "movielens", "--src", str(ml100k), "--out", str(root)], "convert MovieLens 100K")
        else:
            logger.info("reusing dataset %s", root)
    else:
        if ml100k is not None:
            logger.info("no MovieLens files under %s: using the synthetic tiny preset", ml100k)
        root, config = data_root / "tiny", REPO / "configs" / "tiny.yaml"
        if not (root / "meta.json").is_file():
            _run([_bin("dig"), "data", "synth", "--preset", "tiny", "--out", str(root)], "synthesize tiny dataset")
        else:
            logger.info("reusing dataset %s", root)
    return root, config


def train(config: Path, data: Path, run_dir: Path, nproc: int, extra: List[str]) -> Dict[str, Any]:
    """2-worker training through the repo's TorchX component; returns ``final_metrics.json``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchrun of this venv
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        _bin("torchx"), "run", "-s", "local_cwd", "launch/components.py:train",
        "--config", str(config), "--nproc_per_node", str(nproc), "--resume", "auto",
        f"data.path={data}", f"run_dir={run_dir}", *extra,
    ]
    _run(cmd, f"train ({nproc} workers via TorchX)", env=env)
    return read_final_metrics(run_dir)


def _eval_inputs(checkpoint: Path, max_users: int) -> Dict[str, Any]:
    """What an evaluation result depends on: the checkpoint (path and the time its COMPLETE
    marker was written, so a re-trained step dir does not match) and the user budget."""
    marker = checkpoint / "COMPLETE"
    return {"checkpoint": str(checkpoint.resolve()), "max_users": max_users,
            "complete_mtime_ns": marker.stat().st_mtime_ns if marker.exists() else None}


def evaluate(checkpoint: Path, out: Path, max_users: int) -> Dict[str, Any]:
    """``dig eval`` metrics.

    A rerun of the demo on a finished run reuses ``out`` when it was made from the same
    checkpoint and user budget (recorded beside it in ``<out>.inputs.json``), so the second
    ``make demo`` does not spend minutes re-evaluating an unchanged model.
    """
    inputs = _eval_inputs(checkpoint, max_users)
    stamp = out.with_name(out.name + ".inputs.json")
    try:
        if json.loads(stamp.read_text()) == inputs:
            cached = json.loads(out.read_text())
            logger.info("reusing %s (same checkpoint and --eval-users; delete it to re-evaluate)", out)
            return cached
    except (OSError, ValueError):
        pass
    stamp.unlink(missing_ok=True)
    cmd = [_bin("dig"), "eval", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"]
    if max_users > 0:
        cmd += ["--max-users", str(max_users)]
    _run(cmd, "evaluate")
    result = json.loads(out.read_text())
    stamp.write_text(json.dumps(inputs))
    return result


def export(checkpoint: Path, out: Path) -> Path:
    """``dig export`` into ``out`` (replaced)."""
    if out.exists():
        shutil.rmtree(out)
    _run([_bin("dig"), "export", "--checkpoint", str(checkpoint), "--out", str(out)], "export")
    return out


def best_checkpoint(run_dir: Path) -> Optional[Dict[str, Any]]:
    """``checkpoints/best.json`` of ``run_dir`` plus the resolved ``path``, or None if there is no best yet."""
    mgr = CheckpointManager(run_dir)
    best = mgr.read_best()
    if best is None:
        return None
    return {**best, "path": str((mgr.dir / best["checkpoint"]).resolve())}


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dig_torchrec.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="demo directory (training run, eval JSON, export bundle)")
    p.add_argument("--ml100k", default=None, help="directory with the MovieLens 100K files (u.data, u.item, u.user)")
    p.add_argument("--data-root", default="data", help="where datasets are made / reused")
    p.add_argument("--nproc", type=int, default=2, help="local training workers")
    p.add_argument("--epochs", type=int, default=3,
                   help="training epochs (keeps the demo to a few minutes on 2 cores; 0: the config's train.epochs)")
    p.add_argument("--eval-users", type=int, default=500, help="users in the retrieval evaluation (0: all)")
    p.add_argument("--last", action="store_true",
                   help="evaluate/export the last checkpoint instead of checkpoints/best (train.select_metric)")
    p.add_argument("overrides", nargs="*", help="extra config overrides for training, e.g. train.epochs=2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, config = prepare_dataset(Path(args.ml100k) if args.ml100k else None, (REPO / args.data_root).resolve())
    extra = ([f"train.epochs={args.epochs}"] if args.epochs > 0 else []) + list(args.overrides)
    final = train(config, data, out / "train", args.nproc, extra)
    checkpoint = Path(final["checkpoint"])
    best = best_checkpoint(out / "train")
    if best is not None and not args.last:
        logger.info("evaluating and exporting checkpoints/best (%s = %.4f at step %d) instead of the last step",
                    best["metric"], best["value"], best["step"])
        checkpoint = Path(best["path"])
    metrics = final["metrics"]
    ev = evaluate(checkpoint, out / "eval.json", args.eval_users)
    bundle = export(checkpoint, out / "export")

    layers = sorted(k for k in metrics if k.startswith("valid/recall_auc_l"))
    rank_auc = ev.get("rank_auc")
    recall_auc = ev["recall_auc"] if "recall_auc" in ev else (metrics.get(layers[-1]) if layers else None)
    lines = [
        "",
        "=== DIG demo summary ===",
        f"dataset     : {data} ({config.name})",
        f"training    : {int(final['step'])} steps on {final['world_size']} workers (TorchX local_cwd)",
        f"rank AUC    : {_fmt(rank_auc)}   (dig eval, test split, exact)",
        f"recall AUC  : {_fmt(recall_auc)}   (last SID layer)",
    ]
    for key in ("recall@10", "recall@50", "ndcg@10", "unified_recall@10"):
        if key in ev:
            lines.append(f"{key:<12}: {_fmt(ev[key])}")
    lines += [
        f"checkpoint  : {checkpoint}{'  (checkpoints/best by ' + best['metric'] + ')' if best and not args.last else ''}",
        f"export      : {bundle}",
        f"metrics     : {out / 'train' / 'metrics.jsonl'} (TensorBoard: {out / 'train' / 'tensorboard'})",
        f"time        : {time.perf_counter() - t0:.0f}s",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
