"""``dig data synth | convert | validate | stats``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

from dig_torchrec.errors import DataError
from dig_torchrec.files import check_writable_parent

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` subcommand tree."""
    p = subparsers.add_parser("data", help="make, convert, validate and describe datasets")
    sub = p.add_subparsers(dest="data_command", metavar="{synth,convert,validate,stats}")
    sub.required = True

    s = sub.add_parser("synth", help="generate a synthetic exposure-log dataset with planted structure")
    s.add_argument("--preset", default="tiny", help="micro | tiny | industrial_small | industrial_large")
    s.add_argument("--out", required=True, help="output dataset root (must not hold a dataset)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--rows", type=int, default=None, help="override the number of exposure rows")
    s.add_argument("--users", type=int, default=None, help="override the number of users")
    s.add_argument("--items", type=int, default=None, help="override the number of items")
    s.add_argument("--history-length", type=int, default=None, help="stored history length")
    s.add_argument("--p-brand", type=float, default=None,
                   help="retrieval signal: share of personal exposures from the user's favourite brand "
                        "(presets: 0 for micro/tiny, 0.7 for industrial_*)")
    s.add_argument("--processes", type=int, default=None, help="worker processes (default: min(2, cores))")
    s.set_defaults(func=_synth)

    c = sub.add_parser("convert", help="convert a public dataset's raw files")
    c.add_argument("source", choices=["movielens", "kuairec", "taobao"])
    c.add_argument("--src", required=True, help="directory with the raw files")
    c.add_argument("--out", required=True, help="output dataset root")
    c.add_argument("--history-length", type=int, default=20)
    c.add_argument("--matrix", default="small_matrix.csv", help="KuaiRec: small_matrix.csv or big_matrix.csv")
    c.add_argument("--max-rows", type=int, default=0, help="Taobao: read at most this many raw_sample rows (0: all)")
    c.set_defaults(func=_convert)

    v = sub.add_parser("validate", help="check schema and values of a dataset root")
    v.add_argument("path")
    v.add_argument("--hash-ids", action="store_true", help="allow ids beyond the table size (they are hashed)")
    v.set_defaults(func=_validate)

    t = sub.add_parser("stats", help="row counts, positive rate, id ranges, history lengths, u2i coverage")
    t.add_argument("path")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=_stats)


_TMP_MARK = ".partial-"


def check_out_root(out: Path) -> None:
    """``--out`` of ``synth``/``convert``: not a file, not an existing or partial dataset, parent writable.

    Args:
        out: the dataset root to create.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; pass a directory for the dataset root")
    if out.is_dir() and any(out.iterdir()):
        if (out / "meta.json").exists():
            raise DataError(f"--out {out}: already holds a dataset; choose an empty --out directory")
        raise DataError(f"--out {out}: directory is not empty (a partial dataset of an older, interrupted run?); "
                        f"delete it or choose an empty --out directory")
    check_writable_parent("--out", out, error=DataError)


@contextlib.contextmanager
def atomic_dataset_root(out: Path) -> Iterator[Path]:
    """Write a dataset into ``.<name>.partial-<pid>`` beside ``out`` and rename it to ``out`` at the end.

    Any failure (or Ctrl-C) removes the partial directory, so a rerun never finds half a
    dataset; partial directories of killed runs are removed by the next run.
    """
    check_out_root(out)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{out.name}{_TMP_MARK}*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass
    tmp = parent / f".{out.name}{_TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _synth(args: argparse.Namespace) -> int:
    from dig_torchrec.data.synthetic import preset

    out = Path(args.out)
    check_out_root(out)
    cfg = preset(args.preset, seed=args.seed, num_rows=args.rows, num_users=args.users, num_items=args.items,
                 history_length=args.history_length, p_brand=args.p_brand)
    if not 0.0 <= cfg.p_brand <= 1.0:
        raise DataError(f"--p-brand must be in [0, 1], got {cfg.p_brand}")
    from dig_torchrec.data.synthetic import generate

    with atomic_dataset_root(out) as tmp:
        summary = generate(cfg, tmp, processes=args.processes)
    print(json.dumps({"out": str(args.out), "preset": args.preset, **summary}))
    return 0


def _convert(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.exists():
        raise DataError(f"{src}: source directory not found")
    if not src.is_dir():
        raise DataError(f"--src {src}: is a file; pass the directory holding the raw files")
    out = Path(args.out)
    check_out_root(out)
    with atomic_dataset_root(out) as tmp:
        if args.source == "movielens":
            from dig_torchrec.data.movielens import convert

            summary = convert(src, tmp, history_length=args.history_length)
        elif args.source == "kuairec":
            from dig_torchrec.data.kuairec import convert

            summary = convert(src, tmp, history_length=args.history_length, matrix=args.matrix)
        else:
            from dig_torchrec.data.taobao import convert

            summary = convert(src, tmp, history_length=args.history_length, max_rows=args.max_rows)
    print(json.dumps({"out": str(args.out), "source": args.source, **summary}))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from dig_torchrec.config import DataConfig
    from dig_torchrec.data.stats import dataset_stats
    from dig_torchrec.data.validate import validate_dataset

    report = validate_dataset(args.path, DataConfig(path=args.path, hash_ids=args.hash_ids), deep=True, use_cache=False)
    print(f"ok: {args.path}: {len(report['files'])} files, rows {report['rows']}")
    _print_stats(dataset_stats(args.path))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from dig_torchrec.config import DataConfig
    from dig_torchrec.data.stats import dataset_stats
    from dig_torchrec.data.validate import validate_dataset

    if not Path(args.path).is_dir():
        raise DataError(f"{args.path}: dataset root not found" if not Path(args.path).exists()
                        else f"{args.path}: is a file; pass a dataset root directory")
    problem = None
    try:  # the same checks as `dig data validate` (cached after a successful scan)
        validate_dataset(args.path, DataConfig(path=str(args.path)), deep=True, use_cache=True)
    except DataError as e:
        problem = e
    try:
        st = dataset_stats(args.path)
    except Exception as e:  # noqa: BLE001  damaged files: report the validation's named cause
        if problem is not None:
            raise problem from e
        raise DataError(f"{args.path}: cannot compute statistics ({type(e).__name__}: {e})") from e
    if problem is not None:
        logger.warning("%s (`dig data validate` fails; the statistics below include the bad rows)", problem)
        st["validation_error"] = str(problem)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        _print_stats(st)
    return 0


def _print_stats(st: Dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"dataset {st['name']}: {st['num_users']} users, {st['num_items']} items, {st['rows']} rows, "
              f"d_c={st['u2i_dim']}, retrieval targets valid={st['retrieval_valid_targets']} "
              f"test={st['retrieval_test_targets']}\n")
    for split, s in st["splits"].items():
        if not s.get("rows"):
            out.write(f"  {split}: 0 rows\n")
            continue
        h = s["history_length"]
        out.write(f"  {split}: {s['rows']} rows, positive rate {s['positive_rate']:.4f}, "
                  f"u2i coverage {s['u2i_coverage']:.4f}, history length mean {h['mean']} "
                  f"p10/p50/p90 {h['p10']}/{h['p50']}/{h['p90']} max {h['max']} (zero {h['zero_fraction']:.3f})\n")
        for col, d in s["ids"].items():
            out.write(f"    {col:<14} range [{d['min']}, {d['max']}]  distinct {d['distinct']}  cardinality {d['cardinality']}\n")
