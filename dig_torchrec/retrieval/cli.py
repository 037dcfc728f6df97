"""``dig eval`` and ``dig retrieve``.

``dig eval --checkpoint DIR [--out FILE] [--split test|valid] [--exclude-history] [k=v ...]``
prints the metrics table and writes JSON with flat top-level keys (``rank_auc``,
``recall_auc``, ``recall@10``, ``ndcg@10``, ..., ``unified_recall@10``, ``beam_fidelity@10``,
``collision_rate``) followed by details.

``dig retrieve --checkpoint DIR --users 1,2,3 [--topk N] [--mode beam|unified|exhaustive|full|popularity]``
prints ranked items for the given user ids (their leave-last-out target rows of
``--split``) and optionally writes them to ``--out`` (``.json`` or ``.parquet``).

``DIR`` is a training checkpoint (``run/checkpoints/step-N``) or an export bundle.

Flags, ``--out`` and overrides are checked before torch is imported, so a typo fails in a
fraction of a second: the modules that import torch (evaluation, the checkpoint loader)
are imported inside the ``run_*`` functions, after those checks, for that reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from dig_torchrec.config import DIGConfig, apply_overrides
from dig_torchrec.errors import ConfigError, DataError
from dig_torchrec.files import atomic_path, check_writable_parent

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``retrieve`` subcommands."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint: Recall/NDCG@K, AUCs, beam fidelity (paper §4)")
    _common(ev)
    ev.add_argument("--out", help="write the metrics JSON here (a .json file; replaced atomically if it exists)")
    ev.add_argument("--exclude-history", action="store_true", default=None,
                    help="drop the user's history items from the candidates (default: eval.exclude_history)")
    ev.add_argument("--max-users", type=int, default=None, help="evaluate a seeded subset of target users")
    ev.add_argument("--no-full-ranking", action="store_true", help="skip full-corpus ranking (U x |V| rank-path calls)")
    ev.add_argument("--no-exposures", action="store_true", help="skip the exposure AUCs")
    ev.add_argument("--max-exposure-batches", type=int, default=0, help="cap on exposure batches (0: all)")
    ev.set_defaults(func=run_eval)

    rt = subparsers.add_parser("retrieve", help="ranked items for some users (beam search / unified / exhaustive)")
    _common(rt)
    rt.add_argument("--users", required=True, help="comma-separated user ids, e.g. 1,2,3")
    rt.add_argument("--topk", type=int, default=10, help="items per user")
    rt.add_argument("--mode", default="beam", choices=["beam", "unified", "exhaustive", "full", "popularity"],
                    help="beam: Eq. 16 beam search; unified: beam + rank-path rerank (Eq. 17); exhaustive: every "
                         "leaf scored by the recall path; full: every item scored by the rank path")
    rt.add_argument("--exclude-history", action="store_true", default=False, help="drop history items")
    rt.add_argument("--out", help="write results to FILE.json or FILE.parquet (must not exist unless --force)")
    rt.add_argument("--force", action="store_true", help="replace an existing --out file")
    rt.set_defaults(func=run_retrieve)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (run/checkpoints/step-N) or export bundle")
    p.add_argument("--split", default="test", choices=["test", "valid"], help="which leave-last-out targets")
    p.add_argument("--rebuild-index", action="store_true",
                   help="rebuild the SID index in memory even if CKPT/sid_index is saved (the saved one is never rewritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.beam_size=128 data.path=DIR")


def check_out_file(out: Optional[str], suffixes: Sequence[str], *, overwrite: bool) -> None:
    """Check an ``--out`` file before any work: its suffix, a writable parent directory
    (not a file), and that it does not exist unless ``overwrite``.

    Args:
        out: the ``--out`` argument (None: nothing to check).
        suffixes: accepted file name suffixes.
        overwrite: an existing file may be replaced.
    """
    if not out:
        return
    p = Path(out)
    if p.suffix not in suffixes:
        raise ConfigError(f"--out {p}: use a {' or '.join(suffixes)} file name")
    if p.is_dir():
        raise ConfigError(f"--out {p}: is a directory; pass a file name")
    if p.exists() and not overwrite:
        raise ConfigError(f"--out {p}: already exists; choose a new file name or pass --force to replace it")
    check_writable_parent("--out", p)


def check_overrides(overrides: Sequence[str]) -> None:
    """Unknown keys, wrong types and malformed ``key=value`` overrides fail before any loading."""
    apply_overrides(DIGConfig(), overrides, check=False)


def check_checkpoint_arg(path: str) -> None:
    """``--checkpoint`` exists and is a directory (cheap, before torch is imported)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--checkpoint {p}: checkpoint directory does not exist")
    if not p.is_dir():
        raise ConfigError(f"--checkpoint {p}: is a file; pass a checkpoint directory (run/checkpoints/step-N), "
                          f"a run directory or a serving bundle")


def run_eval(args: argparse.Namespace) -> int:
    if args.max_users is not None and args.max_users < 0:
        raise ConfigError(f"--max-users must be >= 0 (0: every user), got {args.max_users}")
    if args.max_exposure_batches < 0:
        raise ConfigError(f"--max-exposure-batches must be >= 0 (0: all), got {args.max_exposure_batches}")
    check_out_file(args.out, (".json",), overwrite=True)
    check_overrides(args.overrides)
    check_checkpoint_arg(args.checkpoint)

    from dig_torchrec.retrieval.evaluate import evaluate, format_table, load_inference_bundle, write_json

    bundle = load_inference_bundle(args.checkpoint, args.overrides, rebuild_index=args.rebuild_index)
    res = evaluate(
        bundle, args.split, exclude_history=args.exclude_history, max_users=args.max_users,
        full_ranking=not args.no_full_ranking, exposures=not args.no_exposures,
        max_exposure_batches=args.max_exposure_batches, progress=not args.no_progress,
    )
    print(format_table(res))
    if args.out:
        write_json(res, args.out)
        print(f"wrote {args.out}")
    return 0


def _parse_users(text: str) -> List[int]:
    try:
        users = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise DataError(f"--users {text!r}: expected comma-separated integer user ids") from e
    if not users:
        raise DataError("--users: no user ids given")
    return users


def _check_users_have_targets(checkpoint: str, overrides: Sequence[str], split: str, users: List[int]) -> None:
    """Every ``--users`` id has a leave-last-out target row (read from parquet before the model loads).

    Skipped when the checkpoint's config or dataset cannot be read here; the loader then
    names the problem.
    """
    import pyarrow.parquet as pq  # after the flag checks (see the module docstring)

    from dig_torchrec.inference import resolve_checkpoint
    from dig_torchrec.training.checkpoint import check_dataset_fingerprint, read_config

    ckpt = resolve_checkpoint(checkpoint)
    try:
        cfg = apply_overrides(read_config(ckpt), overrides, check=False)
        path = Path(cfg.data.path) / "retrieval" / f"{split}.parquet"
        if not (Path(cfg.data.path) / "meta.json").is_file():
            return
    except Exception:  # noqa: BLE001  the full load reports damaged inputs with their names
        return
    check_dataset_fingerprint(ckpt, cfg.data.path)  # another dataset: say so, not "user has no target"
    try:
        have = set(pq.read_table(path, columns=["user_id"]).column(0).to_pylist())
    except Exception:  # noqa: BLE001  the full load reports damaged inputs with their names
        return
    missing = [u for u in users if u not in have]
    if missing:
        raise DataError(f"user {missing[0]} has no {split} retrieval target in {path}")


def run_retrieve(args: argparse.Namespace) -> int:
    users = _parse_users(args.users)
    if args.topk <= 0:
        raise DataError(f"--topk must be > 0, got {args.topk}")
    check_out_file(args.out, (".json", ".parquet"), overwrite=args.force)
    check_overrides(args.overrides)
    check_checkpoint_arg(args.checkpoint)
    _check_users_have_targets(args.checkpoint, args.overrides, args.split, users)

    import torch

    from dig_torchrec.data.reader import load_targets
    from dig_torchrec.retrieval.evaluate import load_inference_bundle, retrieve_topn

    bundle = load_inference_bundle(args.checkpoint, args.overrides, rebuild_index=args.rebuild_index)
    targets = load_targets(bundle.data_root, args.split, bundle.schema)
    rows = []
    for u in users:
        hit = (targets.user_id == u).nonzero().flatten()
        if hit.numel() == 0:
            raise DataError(f"user {u} has no {args.split} retrieval target in {bundle.data_root}/retrieval/{args.split}.parquet")
        rows.append(int(hit[0]))
    run = retrieve_topn(bundle, targets, torch.tensor(rows), [args.mode], args.topk,
                        unified_top_n=args.topk if args.mode == "unified" else None,
                        exclude_history=args.exclude_history, progress=not args.no_progress)
    items, scores = run.items[args.mode], run.scores[args.mode]
    sids = bundle.index.item_sids
    records: List[Dict[str, Any]] = []
    for i, u in enumerate(users):
        for r in range(items.shape[1]):
            v = int(items[i, r])
            if v < 0:
                continue
            records.append({"user_id": u, "rank": r + 1, "item_id": v, "score": float(scores[i, r]),
                            "sid": sids[v].tolist(), "target_item": int(targets.target_item[rows[i]])})
    for u in users:
        mine = [r for r in records if r["user_id"] == u]
        print(f"user {u} ({args.mode}, target {mine[0]['target_item'] if mine else '?'}):")
        for r in mine:
            print(f"  {r['rank']:>3}  item {r['item_id']:>7}  score {r['score']:+.4f}  sid {tuple(r['sid'])}")
    if args.out:
        _write_records(records, Path(args.out), args.mode)
        print(f"wrote {args.out}")
    return 0


def _write_records(records: List[Dict[str, Any]], path: Path, mode: str) -> None:
    """Write atomically (a temp file renamed over ``path``)."""
    if path.suffix not in (".parquet", ".json"):
        raise DataError(f"--out {path}: use a .json or .parquet file name")
    import pyarrow as pa  # after the flag checks (see the module docstring)
    import pyarrow.parquet as pq

    with atomic_path(path, mkdir=True) as tmp:
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(records), tmp)
        else:
            tmp.write_text(json.dumps({"mode": mode, "results": records}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    from dig_torchrec.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))
