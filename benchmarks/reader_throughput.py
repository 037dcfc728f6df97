"""Reader throughput: ExposureReader (parquet -> DIGBatch with retrieval rows) vs a raw
``pyarrow.dataset`` scan of the same files and columns, in one run.

Method (built for a shared, busy host):

* one untimed warm-up scan (page cache), then ``--repeats`` rounds; each round runs every
  config once, in forward order on even rounds and reversed on odd rounds, so slow drifts
  in background load hit every config alike;
* ``--settle 1`` (default): each timed run follows an untimed run of the SAME config, so every
  config is measured in its own steady state. Without it the allocator state left by the
  previous config leaks into the next: arrow's mimalloc heaps are purged while a reader
  epoch runs, and the raw scan right after one spent half its time zeroing fresh
  transparent huge pages (``clear_page_erms`` in ``perf``; +0.5-1.5 s, 2x its CPU) while
  the raw scan right after a raw scan did not. As the forward/reversed order puts raw after
  raw on even rounds and after a reader on odd rounds, the paired ratios alternated between
  two clusters (e.g. 0.4 / 0.9) and the median was a coin flip between them;
* per run: wall seconds and CPU seconds of this process AND its reaped children
  (``os.times``; DataLoader worker processes are joined at the end of an epoch, so their
  CPU is included);
* headline: the median over rounds of the paired ratio ``reader rows/s / raw rows/s`` of the
  same round (robust to load changing between rounds), next to the ratio of the medians;
  the same for rows per CPU-second, which is much less sensitive to other jobs;
* ``os.getloadavg()`` at the start and end of the run and per round.

Results go to ``benchmarks/results/reader_throughput.json``. Goal (issue 2): reader >= 50%
of the raw scan rate.

``--paired-against TREE`` instead compares this checkout's reader with the one of another
source tree (e.g. a ``git worktree`` of an older commit) on the same data: each round runs
one epoch per tree in a fresh process (``PYTHONPATH`` = the tree), old and new alternating
which goes first, ``--epochs-per-run`` timed epochs after an untimed settle epoch in the same
process; the headline is the
median over rounds of the paired ratio of rows per CPU-second (``time.process_time``, all
threads of the process, so other jobs on the host barely move it), next to wall time.

Usage::

    python benchmarks/reader_throughput.py --data data/industrial_small          # generated if missing
    python benchmarks/reader_throughput.py --data /tmp/bench1m --rows 1000000 --repeats 5 --workers 0,2
    python benchmarks/reader_throughput.py --data /tmp/bench --rows 300000 --paired-against ../wt-pre-reader
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pyarrow
import pyarrow.dataset as pads
import torch

from dig_torchrec.config import DataConfig
from dig_torchrec.data.reader import ExposureReader, open_dataset
from dig_torchrec.data.synthetic import generate, preset

logger = logging.getLogger("reader_throughput")


def raw_scan(root: Path, columns: List[str]) -> int:
    """Rows of a multithreaded ``pyarrow.dataset`` scan of the train split (decode only)."""
    rows = 0
    for batch in pads.dataset(str(root / "train"), format="parquet").to_batches(columns=columns):
        rows += batch.num_rows
    return rows


def reader_pass(root: Path, cfg: DataConfig, schema) -> Tuple[int, int]:
    """(real exposure rows, retrieval clicks dropped) of one ExposureReader train epoch."""
    reader = ExposureReader(root, "train", cfg, schema)
    rows = 0
    for batch in reader:
        rows += int(batch.weights.sum())
    return rows, reader.retrieval_clicks_dropped


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_info() -> Dict[str, object]:
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "pyarrow": pyarrow.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


def _child_epochs(root: Path, cfg: DataConfig, epochs: int) -> Dict[str, float]:
    """One untimed settle epoch, then ``epochs`` timed epochs, of the reader importable here."""
    _, schema = open_dataset(root, cfg, deep=False)
    reader_pass(root, cfg, schema)
    rows = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        n, dropped = reader_pass(root, cfg, schema)
        rows += n
    return {"rows": rows, "dropped": dropped, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def paired(args: argparse.Namespace, root: Path, cfg: DataConfig) -> Dict[str, object]:
    """This tree's reader vs ``--paired-against``'s, alternating rounds (module docstring)."""
    trees = {"new": Path(__file__).resolve().parents[1], "old": Path(args.paired_against).resolve()}
    runs: Dict[str, List[Dict[str, float]]] = {k: [] for k in trees}
    load_per_round = []
    for rep in range(args.repeats):
        load_per_round.append(list(os.getloadavg()))
        for name in (["old", "new"] if rep % 2 == 0 else ["new", "old"]):
            env = {**os.environ, "PYTHONPATH": str(trees[name]), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            out = subprocess.run([sys.executable, __file__, "--child-epoch", "--data", str(root),
                                  "--batch-size", str(args.batch_size), "--negatives", str(args.negatives),
                                  "--positives", str(cfg.retrieval_positives),
                                  "--reader-threads", str(cfg.reader_threads),
                                  "--epochs-per-run", str(args.epochs_per_run)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs[name].append(r)
            logger.info("round %d %s: %d rows %.2fs wall %.2f cpu-s = %.0f rows/cpu-s", rep, name, r["rows"],
                        r["wall"], r["cpu"], r["rows"] / r["cpu"])
    assert runs["old"][0]["rows"] == runs["new"][0]["rows"]
    per_cpu = {k: [r["rows"] / r["cpu"] for r in v] for k, v in runs.items()}
    per_wall = {k: [r["rows"] / r["wall"] for r in v] for k, v in runs.items()}
    ratio_cpu = [a / b for a, b in zip(per_cpu["new"], per_cpu["old"])]
    ratio_wall = [a / b for a, b in zip(per_wall["new"], per_wall["old"])]
    return {
        "mode": "paired", "trees": {k: str(v) for k, v in trees.items()},
        "commits": {k: subprocess.run(["git", "-C", str(v), "rev-parse", "HEAD"], capture_output=True,
                                      text=True).stdout.strip() for k, v in trees.items()},
        "dataset": str(root), "batch_size": args.batch_size, "negatives_per_positive": args.negatives,
        "retrieval_positives": cfg.retrieval_positives, "reader_threads": cfg.reader_threads,
        "repeats": args.repeats, "order": "old first on even rounds, new first on odd rounds; each run = a fresh "
                                          "process, one untimed settle epoch then --epochs-per-run timed epochs",
        "headline_ratio_cpu_new_over_old": statistics.median(ratio_cpu),
        "paired_ratio_cpu": ratio_cpu,
        "headline_ratio_wall_new_over_old": statistics.median(ratio_wall),
        "paired_ratio_wall": ratio_wall,
        "rows_per_cpu_second": per_cpu, "rows_per_second": per_wall, "runs": runs,
        "machine": {**machine_info(), "loadavg_per_round": load_per_round, "loadavg_end": list(os.getloadavg())},
    }


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/industrial_small", help="dataset root (generated if missing)")
    p.add_argument("--preset", default="industrial_small", help="synth preset used when --data is missing")
    p.add_argument("--rows", type=int, default=None, help="rows of the generated set (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--negatives", type=int, default=4)
    p.add_argument("--workers", default="0,2", help="comma-separated data.num_workers values to measure")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--positives", default="0,1024",
                   help="comma-separated data.retrieval_positives values (0: auto = ceil(2 x train click rate x B), "
                        "the default); the first is measured for every --workers value, the others with workers=0")
    p.add_argument("--reader-threads", default="0",
                   help="comma-separated data.reader_threads values measured with workers=0 (0 = auto: usable cores "
                        "- 1, the training default that leaves a core to the step; the raw scan uses every core, so "
                        "reader_threads = cores is the equal-cores comparison)")
    p.add_argument("--settle", type=int, default=1, choices=(0, 1),
                   help="1: an untimed run of the same config right before each timed run (steady state, "
                        "see the module docstring); 0: back-to-back timed runs only")
    p.add_argument("--paired-against", default=None,
                   help="another source tree (e.g. a git worktree of an older commit): compare its reader with "
                        "this one, rows per CPU-second, alternating rounds (first --positives and --reader-threads "
                        "value, workers=0)")
    p.add_argument("--epochs-per-run", type=int, default=3, help="timed epochs per paired run")
    p.add_argument("--child-epoch", action="store_true", help=argparse.SUPPRESS)  # one paired run (internal)
    p.add_argument("--out", default=None, help="result JSON (default: results/reader_throughput.json, "
                                               "results/reader_paired.json with --paired-against)")
    args = p.parse_args(argv)
    default_out = "reader_paired.json" if args.paired_against else "reader_throughput.json"
    args.out = args.out or str(Path(__file__).parent / "results" / default_out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    root = Path(args.data)
    if not (root / "meta.json").exists():
        logger.info("generating %s (%s rows) at %s", args.preset, args.rows or "preset", root)
        generate(preset(args.preset, num_rows=args.rows), root)
    info = machine_info()
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    positives = [int(x) for x in args.positives.split(",") if x.strip()]

    threads = [int(t) for t in args.reader_threads.split(",") if t.strip()]
    if args.child_epoch or args.paired_against:
        one = DataConfig(path=str(root), batch_size=args.batch_size, history_length=20, num_workers=0,
                         negatives_per_positive=args.negatives, retrieval_positives=positives[0],
                         reader_threads=threads[0])
        if args.child_epoch:
            print(json.dumps(_child_epochs(root, one, args.epochs_per_run)))
            return 0
        result = paired(args, root, one)
        result["command"] = "python benchmarks/reader_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        logger.info("new / old: %.3f rows per CPU-second (paired median; rounds %s), %.3f wall",
                    result["headline_ratio_cpu_new_over_old"],
                    ", ".join(f"{r:.3f}" for r in result["paired_ratio_cpu"]), result["headline_ratio_wall_new_over_old"])
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        logger.info("wrote %s", out)
        return 0

    def cfg_for(w: int, p_slots: int, t: int = 0) -> DataConfig:
        return DataConfig(path=str(root), batch_size=args.batch_size, history_length=20, num_workers=w,
                          negatives_per_positive=args.negatives, retrieval_positives=p_slots, reader_threads=t)

    cfgs: Dict[str, DataConfig] = {f"reader_w{w}": cfg_for(w, positives[0]) for w in workers}
    cfgs.update({f"reader_w0_t{t}": cfg_for(0, positives[0], t) for t in threads if t})
    cfgs.update({f"reader_w0_p{p_slots}": cfg_for(0, p_slots) for p_slots in positives[1:]})
    first = next(iter(cfgs.values()))
    meta, schema = open_dataset(root, first)
    columns = ExposureReader(root, "train", first, schema).decoder.columns()
    slots = {k: ExposureReader(root, "train", c, schema).num_retrieval_positives for k, c in cfgs.items()}
    names = ["raw", *cfgs]
    raw_scan(root, columns)  # warm-up: page cache, arrow thread pool
    wall: Dict[str, List[float]] = {k: [] for k in names}
    cpu: Dict[str, List[float]] = {k: [] for k in names}
    rows: Dict[str, int] = {}
    dropped: Dict[str, int] = {}
    load_per_round: List[List[float]] = []
    settle: Dict[str, List[float]] = {k: [] for k in names}  # rows/s of the untimed settle runs
    for rep in range(args.repeats):
        load_per_round.append(list(os.getloadavg()))
        for name in (names if rep % 2 == 0 else names[::-1]):
            for timed in ([False] if args.settle else []) + [True]:
                t0, c0 = time.perf_counter(), cpu_seconds()
                if name == "raw":
                    n = raw_scan(root, columns)
                else:
                    n, dropped[name] = reader_pass(root, cfgs[name], schema)
                dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
                if not timed:
                    settle[name].append(n / dt)
            wall[name].append(dt)
            cpu[name].append(dc)
            rows[name] = n
            logger.info("round %d %-16s %9d rows %7.2fs wall %10.0f rows/s | %6.2f cpu-s %10.0f rows/cpu-s",
                        rep, name, n, dt, n / dt, dc, n / dc)

    def rate(k: str, secs: List[float]) -> List[float]:
        return [rows[k] / s for s in secs]

    wall_rate = {k: statistics.median(rate(k, v)) for k, v in wall.items()}
    cpu_rate = {k: statistics.median(rate(k, v)) for k, v in cpu.items()}
    readers = [k for k in names if k != "raw"]
    paired_wall = {k: [a / b for a, b in zip(rate(k, wall[k]), rate("raw", wall["raw"]))] for k in readers}
    paired_cpu = {k: [a / b for a, b in zip(rate(k, cpu[k]), rate("raw", cpu["raw"]))] for k in readers}
    headline = {k: statistics.median(v) for k, v in paired_wall.items()}
    result = {
        "dataset": str(root), "train_rows": rows["raw"], "columns": columns, "batch_size": args.batch_size,
        "retrieval": {"positives_per_batch": slots,
                      "config_retrieval_positives": {k: c.retrieval_positives for k, c in cfgs.items()},
                      "config_reader_threads": {k: c.reader_threads for k, c in cfgs.items()},
                      "negatives_per_positive": args.negatives,
                      "clicks_dropped_per_epoch": dropped},
        "repeats": args.repeats, "order": "interleaved; forward on even rounds, reversed on odd rounds",
        "settle": bool(args.settle),  # each timed run right after an untimed run of the same config
        "settle_rows_per_second": settle,
        "goal_ratio": 0.5,
        "headline_ratio_wall": headline,  # median over rounds of the paired (same round) wall-rate ratio
        "paired_ratio_wall": paired_wall,
        "ratio_of_median_wall_rates": {k: wall_rate[k] / wall_rate["raw"] for k in readers},
        # best run of each config (least disturbed by other jobs)
        "ratio_of_best_wall_rates": {k: max(rate(k, wall[k])) / max(rate("raw", wall["raw"])) for k in readers},
        "headline_ratio_cpu": {k: statistics.median(v) for k, v in paired_cpu.items()},
        "ratio_of_best_cpu_rates": {k: max(rate(k, cpu[k])) / max(rate("raw", cpu["raw"])) for k in readers},
        "paired_ratio_cpu": paired_cpu,
        "rows_per_second": wall_rate, "rows_per_cpu_second": cpu_rate,
        "wall_seconds": wall,
        # CPU of this process + reaped children (DataLoader workers included)
        "cpu_seconds": cpu,
        "machine": {**info, "loadavg_per_round": load_per_round, "loadavg_end": list(os.getloadavg())},
        "note": "raw = multithreaded pyarrow.dataset scan of the same files/columns (decode only, no batch "
                "building); reader = ExposureReader train epoch incl. shuffle, KJT, retrieval negatives and "
                "their u2i",
    }
    for k in readers:
        logger.info("%s: %.0f rows/s = %.1f%% of raw (%.0f rows/s) [paired median; ratio of medians %.1f%%, "
                    "of best runs %.1f%%]; per CPU-second %.0f vs %.0f = %.1f%% [best runs %.1f%%]", k, wall_rate[k],
                    100 * headline[k], wall_rate["raw"], 100 * result["ratio_of_median_wall_rates"][k],
                    100 * result["ratio_of_best_wall_rates"][k], cpu_rate[k], cpu_rate["raw"],
                    100 * result["headline_ratio_cpu"][k], 100 * result["ratio_of_best_cpu_rates"][k])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
