"""``dig bench train-throughput|beam-search|reader|embedding-stage [ARGS...]``: run a benchmark script.

The scripts live in the repository's ``benchmarks/`` folder (they are not part of the
installed package); this wrapper runs one of them with the current interpreter and passes
the remaining arguments through, e.g. ``dig bench beam-search --catalogs 10000``.
Results go to ``benchmarks/results/`` unless the script's ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from dig_torchrec.errors import ConfigError

logger = logging.getLogger(__name__)

SCRIPTS: Dict[str, str] = {
    "train-throughput": "train_throughput.py",
    "beam-search": "beam_search.py",
    "reader": "reader_throughput.py",
    "embedding-stage": "embedding_stage.py",
}


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout (``DIG_BENCHMARKS_DIR`` overrides)."""
    env = os.environ.get("DIG_BENCHMARKS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "benchmarks"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = subparsers.add_parser("bench", help="run a benchmark script from benchmarks/ (see benchmarks/README.md)")
    p.add_argument("name", choices=sorted(SCRIPTS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script (see its --help)")
    p.set_defaults(func=run_bench)


def script_path(name: str) -> Path:
    if name not in SCRIPTS:
        raise ConfigError(f"unknown benchmark '{name}'; choose one of {', '.join(sorted(SCRIPTS))}")
    path = benchmarks_dir() / SCRIPTS[name]
    if not path.is_file():
        raise ConfigError(f"{path}: benchmark script not found (run from a source checkout or set DIG_BENCHMARKS_DIR)")
    return path


def run_bench(args: argparse.Namespace, extra: Optional[List[str]] = None) -> int:
    """Run the script in a child interpreter (its ranks are spawned processes) and return its exit code."""
    path = script_path(args.name)
    cmd = [sys.executable, str(path), *(extra if extra is not None else args.args)]
    logger.info("running %s", " ".join(cmd))
    return subprocess.call(cmd, cwd=str(path.parents[1]))
