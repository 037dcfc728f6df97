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

Usage::

    python benchmarks/reader_throughput.py --data data/industrial_small          # generated if missing
    python benchmarks/reader_throughput.py --data /tmp/bench1m --rows 1000000 --repeats 5 --workers 0,2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
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
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "reader_throughput.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    root = Path(args.data)
    if not (root / "meta.json").exists():
        logger.info("generating %s (%s rows) at %s", args.preset, args.rows or "preset", root)
        generate(preset(args.preset, num_rows=args.rows), root)
    info = machine_info()
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    positives = [int(x) for x in args.positives.split(",") if x.strip()]

    threads = [int(t) for t in args.reader_threads.split(",") if t.strip()]

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
