"""Paired comparison of ``beam_search.py`` on two source trees (e.g. this branch vs the
``pre-redesign`` tag) in short alternating rounds.

    git worktree add /tmp/dig_old pre-redesign && ln -s "$PWD/.venv" /tmp/dig_old/.venv
    python benchmarks/paired_commits.py --old /tmp/dig_old --rounds 5 \
        --out benchmarks/results/redesign_beam_paired.json -- --catalogs 10000 --beams 64 --beam-users 8 --max-users 8

Each round runs the same ``beam_search.py`` arguments once per tree (the order alternates
between rounds, so drift in the machine's load hits both sides alike), each in a fresh
process with ``PYTHONPATH`` set to its tree. Per method it reports users/s of every run,
the per-round ratio new/old and its median; it also checks that the two trees compute the
same thing (beam fidelity and scored pairs per user are deterministic given the seed).
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
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

NEW = Path(__file__).resolve().parents[1]


def run_once(tree: Path, args: List[str], out: Path) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, str(tree / "benchmarks" / "beam_search.py"), *args, "--no-plot", "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def rows(result: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {f"{r['num_items']}/{r['method']}": r for r in result["table"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="the reference source tree (a worktree of the old commit)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(NEW / "benchmarks" / "results" / "redesign_beam_paired.json"))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: beam_search.py arguments")
    a = p.parse_args()
    bench_args = [x for x in a.bench_args if x != "--"]
    trees = {"new": NEW, "old": Path(a.old).resolve()}
    runs: Dict[str, List[Dict[str, Dict[str, Any]]]] = {"new": [], "old": []}
    load_start = os.getloadavg()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = ["new", "old"] if r % 2 == 0 else ["old", "new"]
            for side in order:
                runs[side].append(rows(run_once(trees[side], bench_args, Path(tmp) / f"{side}_{r}.json")))
            print(f"round {r + 1}/{a.rounds} done ({time.time() - t0:.0f}s)", flush=True)
    methods = sorted(runs["new"][0])
    summary: Dict[str, Any] = {}
    for m in methods:
        new = [run[m]["users_per_s"] for run in runs["new"]]
        old = [run[m]["users_per_s"] for run in runs["old"]]
        paired = [n / o for n, o in zip(new, old)]
        same = all(rn[m]["scored_pairs_per_user"] == ro[m]["scored_pairs_per_user"]
                   and rn[m]["fidelity_top10"] == ro[m]["fidelity_top10"]
                   for rn, ro in zip(runs["new"], runs["old"]))
        summary[m] = {"users_per_s_new": new, "users_per_s_old": old, "paired_ratio_new_over_old": paired,
                      "paired_ratio_median": statistics.median(paired),
                      "ratio_of_medians": statistics.median(new) / statistics.median(old),
                      "same_results": same,
                      "fidelity_top10": runs["new"][0][m]["fidelity_top10"],
                      "scored_pairs_per_user": runs["new"][0][m]["scored_pairs_per_user"]}
    record = {
        "command": "python benchmarks/paired_commits.py --old <worktree of pre-redesign> --rounds "
                   f"{a.rounds} --out {a.out} -- {' '.join(bench_args)}",
        "old_tree": str(trees["old"]),
        "old_commit": subprocess.run(["git", "-C", str(trees["old"]), "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
        "rounds": a.rounds,
        "methods": summary,
        "machine": machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "seconds": time.time() - t0,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=2))
    for m, s in summary.items():
        print(f"{m:<22} paired new/old median {s['paired_ratio_median']:.3f}  (rounds "
              f"{', '.join(f'{x:.2f}' for x in s['paired_ratio_new_over_old'])})  same results: {s['same_results']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
