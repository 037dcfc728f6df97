"""Reader throughput: ExposureReader (parquet -> DIGBatch with retrieval rows) vs a raw
``pyarrow.dataset`` scan of the same files and columns, in one run.

Runs are interleaved (raw, reader[w=0], reader[w=2], raw, ...) so background load hits all
of them alike; the medians and their ratio go to ``benchmarks/results/reader_throughput.json``
together with machine information. Goal (issue 2): reader >= 50% of the raw scan rate.

Usage::

    python benchmarks/reader_throughput.py --data data/industrial_small          # generated if missing
    python benchmarks/reader_throughput.py --data /tmp/bench1m --rows 1000000 --repeats 3 --workers 0,2
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
from typing import Dict, List

import pyarrow
import pyarrow.dataset as pads
import torch

from dig_torchrec.config import DataConfig
from dig_torchrec.data.reader import ExposureReader, open_dataset
from dig_torchrec.data.synthetic import generate, preset

logger = logging.getLogger("reader_throughput")


def raw_scan(root: Path, columns: List[str]) -> int:
    rows = 0
    for batch in pads.dataset(str(root / "train"), format="parquet").to_batches(columns=columns):
        rows += batch.num_rows
    return rows


def reader_pass(root: Path, cfg: DataConfig, schema) -> int:
    reader = ExposureReader(root, "train", cfg, schema)
    rows = 0
    for batch in reader:
        rows += int(batch.weights.sum())
    return rows


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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--positives", default="0,256",
                   help="comma-separated data.retrieval_positives values (0: batch_size // 2, the default); "
                        "the first is measured for every --workers value, the others with workers=0")
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

    def cfg_for(w: int, p_slots: int) -> DataConfig:
        return DataConfig(path=str(root), batch_size=args.batch_size, history_length=20, num_workers=w,
                          negatives_per_positive=args.negatives, retrieval_positives=p_slots)

    cfgs: Dict[str, DataConfig] = {f"reader_w{w}": cfg_for(w, positives[0]) for w in workers}
    cfgs.update({f"reader_w0_p{p_slots}": cfg_for(0, p_slots) for p_slots in positives[1:]})
    first = next(iter(cfgs.values()))
    meta, schema = open_dataset(root, first)
    columns = ExposureReader(root, "train", first, schema).decoder.columns()
    times: Dict[str, List[float]] = {"raw": [], **{k: [] for k in cfgs}}
    cpu: Dict[str, List[float]] = {k: [] for k in times}
    rows: Dict[str, int] = {}
    for rep in range(args.repeats):
        for name in times:
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "raw":
                n = raw_scan(root, columns)
            else:
                n = reader_pass(root, cfgs[name], schema)
            dt = time.perf_counter() - t0
            times[name].append(dt)
            cpu[name].append(time.process_time() - c0)
            rows[name] = n
            logger.info("repeat %d %-10s %9d rows %7.2fs %10.0f rows/s", rep, name, n, dt, n / dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: rows[k] / med[k] for k in med}
    result = {
        "dataset": str(root), "train_rows": rows["raw"], "columns": columns, "batch_size": args.batch_size,
        "retrieval": {"positives_per_batch": {k: c.retrieval_positives or args.batch_size // 2 for k, c in cfgs.items()},
                      "negatives_per_positive": args.negatives},
        "repeats": args.repeats, "seconds": times, "median_seconds": med, "rows_per_second": rate,
        "ratio_to_raw": {k: rate[k] / rate["raw"] for k in rate if k != "raw"}, "goal_ratio": 0.5,
        # CPU seconds of this process (all its threads; DataLoader worker processes excluded):
        # on a shared host this is the contention-robust cost of a pass
        "cpu_seconds": cpu,
        "rows_per_cpu_second": {k: rows[k] / statistics.median(v) for k, v in cpu.items()
                                if k == "raw" or cfgs[k].num_workers == 0},
        "machine": {**info, "loadavg_end": list(os.getloadavg())},
        "note": "raw = pyarrow.dataset scan of the same files/columns (multithreaded arrow decode, no batch "
                "building); reader = ExposureReader epoch incl. shuffle, KJT, retrieval negatives and their u2i",
    }
    for k, r in result["ratio_to_raw"].items():
        logger.info("%s: %.0f rows/s = %.1f%% of raw scan (%.0f rows/s)", k, rate[k], 100 * r, rate["raw"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
