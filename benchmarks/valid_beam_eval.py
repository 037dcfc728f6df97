"""Quick recipe-selection evaluation: beam-search Recall/NDCG@{10,50}, popularity and exposure AUCs.

    python benchmarks/valid_beam_eval.py RUN_DIR valid OUT.json [k=v ...]

Lighter than ``dig eval`` (no unified rerank, exhaustive leaf search or full-corpus ranking):
beam search at B=64 over every leave-last-out user of the split, the popularity baseline on
the same users, and rank/recall AUC on the split's exposures. Used to choose the default
recipe on the *valid* split (benchmarks/results/retrieval_levers_ml100k.md), so the test
split stays untouched until the paper tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dig_torchrec.data.reader import load_targets  # noqa: E402
from dig_torchrec.retrieval import metrics as M  # noqa: E402
from dig_torchrec.retrieval.evaluate import exposure_aucs, load_inference_bundle, retrieve_topn, select_users  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("split", choices=["valid", "test"])
    p.add_argument("out", help="JSON output")
    p.add_argument("--beam-size", type=int, default=64)
    p.add_argument("overrides", nargs="*", help="evaluation overrides (e.g. data.path=...)")
    args = p.parse_args()
    t0 = time.time()
    bundle = load_inference_bundle(args.checkpoint, args.overrides, save_index=False, rebuild_index=True)
    targets = load_targets(bundle.data_root, args.split, bundle.schema)
    rows = select_users(len(targets), 0)
    run = retrieve_topn(bundle, targets, rows, ["beam", "popularity"], 50, beam_size=args.beam_size, progress=False)
    tgt = targets.target_item[rows]
    res = {"split": args.split, "num_users": int(rows.numel()), "beam_size": args.beam_size}
    res.update(M.retrieval_metrics(run.items["beam"], tgt, [10, 50]))
    res.update(M.retrieval_metrics(run.items["popularity"], tgt, [10, 50], prefix="popularity_"))
    res.update({k: v for k, v in exposure_aucs(bundle, args.split, progress=False).items() if not isinstance(v, list)})
    res["collision_rate"] = bundle.index.collision_stats().collision_rate
    res["seconds"] = time.time() - t0
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
