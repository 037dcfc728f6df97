"""Paired training-throughput comparison of two source trees (e.g. a branch against a git tag).

Runs ``benchmarks/train_throughput.py`` of each tree in alternating short rounds (new, old,
old, new, ... so neither tree always runs first on a warming or loaded machine) and
records every round's samples/s per variant and the per-round paired ratios new / old.

Example (from the new tree; the old one made with ``git worktree add /tmp/old pre-redesign``)::

    python benchmarks/paired_trees.py --old /tmp/old --rounds 4 \\
        --out benchmarks/results/redesign_train_paired.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

NEW = Path(__file__).resolve().parents[1]


def run_tree(tree: Path, args: argparse.Namespace) -> Dict[str, float]:
    """samples/s per ``variant@world`` of one ``train_throughput.py`` run of ``tree``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tt.json"
        cmd = [sys.executable, str(tree / "benchmarks" / "train_throughput.py"), "--users", str(args.users),
               "--items", str(args.items), "--world-sizes", "1", "--variants", *args.variants, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--profile-steps", "0", "--no-plot",
               "--memory-wait-s", "5", "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(cmd, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())["samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="the reference tree (e.g. a worktree of tag pre-redesign)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["dig", "rank_only"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    old = Path(args.old).resolve()
    rounds: List[Dict[str, Dict[str, float]]] = []
    for r in range(args.rounds):
        order = [("new", NEW), ("old", old)] if r % 2 == 0 else [("old", old), ("new", NEW)]
        result = {name: run_tree(tree, args) for name, tree in order}
        rounds.append(result)
        print(f"round {r}: " + ", ".join(f"{k} new/old {result['new'][k] / result['old'][k]:.3f}"
                                         for k in result["new"]), flush=True)
    keys = sorted(rounds[0]["new"])
    summary = {}
    for k in keys:
        ratios = [x["new"][k] / x["old"][k] for x in rounds]
        summary[k] = {
            "paired_ratio_median": statistics.median(ratios),
            "paired_ratios": ratios,
            "new_median_samples_per_s": statistics.median(x["new"][k] for x in rounds),
            "old_median_samples_per_s": statistics.median(x["old"][k] for x in rounds),
        }
    record = {
        "what": "train_throughput.py samples/s, new tree / old tree, alternating rounds (world size 1, CPU)",
        "command": "python benchmarks/paired_trees.py " + " ".join(sys.argv[1:]),
        "old_tree": str(old),
        "summary": summary,
        "rounds": rounds,
        "loadavg_end": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
