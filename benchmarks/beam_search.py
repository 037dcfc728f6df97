"""Generative retrieval cost: beam search vs exhaustive leaf search vs full-corpus ranking.

Two modes, same methods, same interleaving, same JSON layout:

    # synthetic: untrained seeded network, synthetic catalogs of 10K / 100K / 500K items
    python benchmarks/beam_search.py                     # full sweep (about 40 min on a busy core)
    python benchmarks/beam_search.py --catalogs 2000 --beams 16 --beam-users 2 \
        --max-users 2 --out /tmp/bs.json                   # smoke run

    # trained: a checkpoint (RUN/checkpoints/step-N) or a `dig export` bundle, its dataset's
    # real catalog and real test requests (--catalogs is ignored; --data DIR overrides data.path)
    python benchmarks/beam_search.py --checkpoint RUN/checkpoints/step-N \
        --fidelity-users 16 --out benchmarks/results/beam_search_trained.json

In both modes one DIG network serves the same users three ways:

* beam search (Eq. 16, ``dig_torchrec.retrieval.beam_search.beam_search``) with B in
  {16, 64, 256}, leaves mapped to items through the inverted index;
* exhaustive leaf search: every occupied leaf scored by the depth-L recall path (the
  exact argmax in token space; the reference for beam fidelity);
* full-corpus ranking: every item scored by the rank path (Eq. 17).

All three use the retrieval package's own functions, the same user context (e_u, DIN
history) computed once per user batch, and one thread. Methods are interleaved chunk by
chunk so load changes on the shared machine hit them alike; users/s is the median over
chunks. Fidelity@10 = |beam top-10 items ∩ exhaustive top-10 items| / 10, averaged over
the exhaustive users (``--fidelity-users``, else the ``--exhaustive-rows`` budget). The
speedup's own limit is |V| divided by the (user, prefix) pairs beam search scored per
user: the Mixer calls it saves. History items are not excluded from the candidates.

Synthetic mode (default). The network (``configs/industrial_large.yaml``: d=64, L=4,
K=256, DIN + DCNv2 + MoE Mixer) is untrained (seeded random weights) and each catalog is
synthetic (random item features in the industrial_large cardinalities), so its
fidelity@10 says nothing about a trained model. The SIDs come from the model's own
tokenizer: the balanced k-means tree init on the encoder's e_v (``DIGModel.
initialize_tokenizer``) followed by the Eq. 2-3 assignment with last-layer collision
resolution (``full_corpus_sids``), exactly what ``dig export`` indexes. Users are random
requests. Full ranking gets each item's u2i from a precomputed table (a gather), which
makes it cheaper than the real U2I function and the reported speedups conservative.

Checkpoint mode (``--checkpoint PATH``). PATH is loaded in this process exactly as
``dig eval`` / ``dig retrieve`` load it (``retrieval.evaluate.load_inference_bundle``):
the trained network, its resolved config, the dataset named by ``data.path`` (or
``--data``), all of its ``items.parquet`` as the catalog, and the SID index eval uses
(``SidIndex.load_or_build``: the bundle's / checkpoint's saved ``sid_index`` or, if none,
the trained tokenizer's ``full_corpus_sids`` of every item, saved beside the checkpoint
as ``dig eval`` does). The users are the dataset's retrieval targets
(``retrieval/test.parquet``, ``--split``) read by ``load_targets`` as eval reads them: the
first N rows in file order (``--user-sample first``) or eval's seeded subset
(``--user-sample seeded``). The scorers are eval's ``UserBatchScorers``: the recall path
with the configured u2t inference mode, and the rank path with e_v of every item and u2i
from the real U2I function on the target row's user state (as ``dig eval``'s full-corpus
ranking). The result is tagged by the real catalog size.

Timings cover scoring and top-k, not e_v / SID precomputation (offline work in serving).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py` from the repo root

from benchmarks.common import RESULTS_DIR, dig_config_for_bench, industrial_meta, machine_info, median, write_json  # noqa: E402
from dig_torchrec.data.batch import make_kjt  # noqa: E402
from dig_torchrec.data.items import ItemTable  # noqa: E402
from dig_torchrec.data.schema import FeatureSchema  # noqa: E402
from dig_torchrec.model import DIGModel  # noqa: E402
from dig_torchrec.retrieval.beam_search import (  # noqa: E402
    ancestor_ranks,
    beam_search,
    exhaustive_leaf_search,
    leaves_to_items,
    rank_all_items,
)
from dig_torchrec.retrieval.metrics import overlap_per_user_at_k, recall_at_k, target_ranks  # noqa: E402
from dig_torchrec.retrieval.sid_index import SidIndex  # noqa: E402

logger = logging.getLogger("beam_search_bench")

TOPN = 10


def synthetic_items(schema: FeatureSchema, num_items: int, seed: int = 0) -> ItemTable:
    """An item table of ``num_items`` items with random static features in range."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.arange(num_items)]
    for name in schema.item_features[1:]:
        cols.append(torch.randint(0, schema.cardinality[name], (num_items,), generator=g))
    return ItemTable(torch.stack(cols, 1), list(schema.item_features), torch.zeros(num_items), [])


def synthetic_users(schema: FeatureSchema, num_users: int, seed: int = 1):  # -> KeyedJaggedTensor
    """User-side KJT (user, context and history keys) of ``num_users`` random requests."""
    g = torch.Generator().manual_seed(seed)
    keys = schema.user_side_keys
    values, lengths = [], []
    for key in keys:
        card = schema.cardinality[schema.table_for_key(key)]
        ln = (torch.rand(num_users, generator=g) < 0.8).to(torch.int32) if key.startswith("hist_") \
            else torch.ones(num_users, dtype=torch.int32)
        values.append(torch.randint(0, card, (int(ln.sum()),), generator=g))
        lengths.append(ln)
    return make_kjt(keys, values, lengths)


def build_catalog(num_items: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Synthetic mode: model, item table, e_v of every item, SID index and request users for one catalog size."""
    cfg = dig_config_for_bench(args.batch_size)
    cfg.tokenizer.init_kmeans_iters = args.kmeans_iters
    meta = industrial_meta(num_users=args.user_table_rows, num_items=num_items)
    torch.manual_seed(args.seed)
    model = DIGModel(cfg, meta, device="cpu").eval()
    items = synthetic_items(model.schema, num_items, seed=args.seed)
    t0 = time.perf_counter()
    e_v = model.corpus_item_representations(items)  # [N, F*d]
    t_ev = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.initialize_tokenizer(e_v)  # balanced k-means tree (§3.2)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = SidIndex(model.tokenizer.corpus_sids(e_v), cfg.tokenizer.num_codes)
    t_sid = time.perf_counter() - t0
    n_users = max(users_for(num_items, args))
    users = synthetic_users(model.schema, n_users, seed=args.seed + 1)
    g = torch.Generator().manual_seed(args.seed + 2)
    u2i = torch.randn(num_items, meta.u2i_dim, generator=g)

    def make_scorers(rows: torch.Tensor) -> tuple:
        ctx = model.user_context(_select_users(users, rows))  # user-side work once per batch

        def recall(ui: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            return model.recall_logits(ctx, ui, prefix)  # Eq. 16

        def rank(ui: torch.Tensor, it: torch.Tensor) -> torch.Tensor:
            return model.rank_logits(ctx, ui, e_v[it], u2i[it])  # Eq. 17

        return recall, rank

    return {"num_items": num_items, "index": index, "make_scorers": make_scorers, "available_users": None,
            "prep_seconds": {"item_representations": t_ev, "tokenizer_init": t_init, "sid_assignment": t_sid}}


def _checkpoint_step(path: Path) -> Optional[int]:
    """Training step of an export bundle (its manifest) or a checkpoint (its train state)."""
    from dig_torchrec.export.bundle import is_bundle, read_manifest
    from dig_torchrec.training.checkpoint import read_train_state

    step = read_manifest(path).get("step") if is_bundle(path) else read_train_state(path).get("step")
    return None if step is None else int(step)


def build_checkpoint_catalog(args: argparse.Namespace) -> Dict[str, Any]:
    """Checkpoint mode: the trained model, its dataset's item table and SID index (loaded as
    ``dig eval`` loads them) and the split's real retrieval requests as users."""
    from dig_torchrec.data.reader import load_targets
    from dig_torchrec.retrieval.evaluate import UserBatchScorers
    from dig_torchrec.retrieval.evaluate import kjt_select_rows, load_inference_bundle, select_users

    overrides = ([f"data.path={args.data}"] if args.data else []) + list(getattr(args, "overrides", None) or [])
    t0 = time.perf_counter()
    bundle = load_inference_bundle(args.checkpoint, overrides)  # model + dataset + SID index, as `dig eval`
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle.item_representation_all()  # e_v of every item (cached; the rank path's item side)
    t_ev = time.perf_counter() - t0
    t0 = time.perf_counter()
    targets = load_targets(bundle.data_root, args.split, bundle.schema)
    t_targets = time.perf_counter() - t0
    num_items = bundle.items.num_items
    available = len(targets)
    n_users = min(max(users_for(num_items, args)), available)
    if args.user_sample == "first":
        user_rows = torch.arange(n_users)
    else:  # the seeded subset `dig eval --max-users N` takes
        user_rows = select_users(available, n_users, seed=args.seed)
    u2t = bundle.cfg.u2t.inference

    def make_scorers(rows: torch.Tensor) -> tuple:
        trows = user_rows[rows]
        sc = UserBatchScorers(bundle, kjt_select_rows(targets.user_kjt, trows), targets.states.select(trows), 0, u2t)
        return sc.recall, sc.rank

    make_scorers(torch.arange(1))  # warm-up outside the timings: builds and caches eval's U2I function
    return {"num_items": num_items, "index": bundle.index, "make_scorers": make_scorers, "available_users": available,
            "bundle": bundle, "user_rows": user_rows, "target_user_ids": targets.user_id[user_rows],
            "target_items": targets.target_item[user_rows],
            "prep_seconds": {"load_checkpoint_and_sid_index": t_load, "item_representations": t_ev,
                             "load_targets": t_targets}}


def _select_users(users, rows: torch.Tensor):  # noqa: ANN001
    from dig_torchrec.retrieval.evaluate import kjt_select_rows

    return kjt_select_rows(users, rows)


def run_method(cat: Dict[str, Any], method: str, rows: torch.Tensor, beam: int, max_rows: int) -> Dict[str, Any]:
    """Serve users ``rows`` with one method; returns top-10 items, seconds and rows scored."""
    index = cat["index"]
    with torch.no_grad():
        t0 = time.perf_counter()
        recall, rank = cat["make_scorers"](rows)  # user-side work once per batch
        U = int(rows.numel())
        leaf_codes = None
        if method == "beam":
            res = beam_search(recall, U, index, beam, max_rows=max_rows)
            items, _ = leaves_to_items(res, index, TOPN, max_rows=max_rows)
            scored = res.num_scored
        elif method == "exhaustive":
            res = exhaustive_leaf_search(recall, U, index, TOPN, max_rows=max_rows)
            items, _ = leaves_to_items(res, index, TOPN, max_rows=max_rows)
            scored, leaf_codes = res.num_scored, res.codes
        elif method == "full":
            items, _ = rank_all_items(rank, U, index.num_items, TOPN, max_rows=max_rows)
            scored = U * index.num_items
        else:
            raise ValueError(method)
        seconds = time.perf_counter() - t0
    return {"items": items, "seconds": seconds, "scored": scored, "users": U, "leaf_codes": leaf_codes}


def ancestor_rank_summary(cat: Dict[str, Any], exh_codes: torch.Tensor, args: argparse.Namespace) -> Dict[str, Any]:
    """For the first ``--ancestor-ranks`` exhaustive users: the rank of each exhaustive top-10
    leaf's depth-l ancestor among all occupied depth-l prefixes (``retrieval.beam_search.
    ancestor_ranks``), and per beam size the share of those ancestors inside the top B."""
    n = min(args.ancestor_ranks, exh_codes.shape[0])
    per_user = []
    with torch.no_grad():
        for u in range(n):
            recall, _ = cat["make_scorers"](torch.tensor([u]))
            per_user.append(ancestor_ranks(recall, cat["index"], exh_codes[u], args.max_rows))
    depths = len(per_user[0]) if per_user else 0
    summary: Dict[str, Any] = {"users": n, "per_user": per_user, "by_depth": []}
    for d in range(depths):
        ranks = sorted(r for user in per_user for r in user[d])
        summary["by_depth"].append({
            "depth": d + 1, "median_rank": ranks[len(ranks) // 2] if ranks else None,
            "share_within_top_b": {str(b): sum(r < b for r in ranks) / len(ranks) for b in args.beams} if ranks else {},
        })
    logger.info("ancestor ranks of the exhaustive top-%d leaves: %s", TOPN,
                [(x["depth"], x["median_rank"], x["share_within_top_b"]) for x in summary["by_depth"]])
    return summary


def users_for(num_items: int, args: argparse.Namespace, available: Optional[int] = None) -> tuple:
    """(beam, exhaustive, full) users for a catalog: a row budget per method, within [min, max] users.

    Exhaustive leaf search and full ranking score |V| rows per user, so their user counts
    shrink with the catalog; the exhaustive users double as the fidelity set, so
    ``args.fidelity_users`` (when set) fixes their number instead of the budget. At most
    ``available`` users per method (the real requests of checkpoint mode).
    """
    def clamp(x: int, lo: int, hi: int) -> int:
        return max(lo, min(hi, x))

    n_exh = clamp(args.exhaustive_rows // num_items, args.min_exhaustive_users, args.max_users)
    if getattr(args, "fidelity_users", None):
        n_exh = args.fidelity_users
    n_full = clamp(args.full_rows // num_items, 1, args.max_users)
    n_beam = max(n_exh, clamp(args.beam_users, 1, args.max_users))
    if available is not None:
        n_beam, n_exh, n_full = (min(n, available) for n in (n_beam, n_exh, n_full))
    return n_beam, n_exh, n_full


def bench_catalog(cat: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """All methods on one prepared catalog, interleaved chunk by chunk."""
    num_items = cat["num_items"]
    n_beam, n_exh, n_full = users_for(num_items, args, cat["available_users"])
    plan: List[tuple] = []  # (method key, method, beam, user rows per chunk)
    for b in args.beams:
        plan.append((f"beam_b{b}", "beam", b, torch.arange(n_beam).split(args.beam_chunk)))
    plan.append(("exhaustive", "exhaustive", 0, torch.arange(n_exh).split(1)))
    plan.append(("full", "full", 0, torch.arange(n_full).split(1)))
    runs: Dict[str, List[Dict[str, Any]]] = {key: [] for key, *_ in plan}
    for i in range(max(len(chunks) for *_, chunks in plan)):
        for key, method, b, chunks in plan:
            if i < len(chunks):
                r = run_method(cat, method, chunks[i], b, args.max_rows)
                runs[key].append(r)
                logger.info("  %d items %-10s chunk %d: %d users in %.2fs (%.0f rows/user), load %.1f", num_items, key,
                            i, r["users"], r["seconds"], r["scored"] / r["users"], os.getloadavg()[0])
    index = cat["index"]
    out: Dict[str, Any] = {"num_items": num_items, "prep_seconds": cat["prep_seconds"],
                           "collisions": index.collision_stats().to_dict(),
                           "sid_shape": {"num_layers": index.num_layers, "num_codes": index.num_codes},
                           "users": {"beam": n_beam, "exhaustive": n_exh, "full": n_full}, "methods": {}}
    exh_items = torch.cat([r["items"] for r in runs["exhaustive"]])
    n_exh = exh_items.shape[0]
    for key, method, b, _ in plan:
        rs = runs[key]
        users = sum(r["users"] for r in rs)
        rec: Dict[str, Any] = {
            "users_per_s": median([r["users"] / r["seconds"] for r in rs]),
            "users_per_s_total": users / sum(r["seconds"] for r in rs),
            "users": users, "chunks": len(rs),
            "scored_pairs_per_user": sum(r["scored"] for r in rs) / users,
            "seconds_per_chunk": [r["seconds"] for r in rs],
        }
        if method == "beam":
            rec["beam_size"] = b
            beam_items = torch.cat([r["items"] for r in rs])
            # fidelity on the users both methods served (the exhaustive users are the first beam users)
            m = min(n_exh, beam_items.shape[0])
            per_user = overlap_per_user_at_k(beam_items[:m], exh_items[:m], TOPN)
            rec["fidelity_top10"] = float(per_user.mean()) if m else float("nan")
            # the sampling error of that mean over users (a second run of the same users gives the same value;
            # a new user sample moves it by about this much)
            rec["fidelity_top10_se"] = float(per_user.std() / m ** 0.5) if m > 1 else float("nan")
            rec["fidelity_top10_per_user"] = per_user.tolist()
            rec["fidelity_users"] = m
            rec["speedup_limit"] = num_items / rec["scored_pairs_per_user"]
        if "target_items" in cat:  # checkpoint mode: real held-out clicks, so Recall@10 against them
            items = torch.cat([r["items"] for r in rs])
            rec["recall@10"] = recall_at_k(target_ranks(items, cat["target_items"][:items.shape[0]]), TOPN)
        out["methods"][key] = rec
    if args.ancestor_ranks:  # untimed diagnostic: where beam search loses the exhaustive top leaves
        out["ancestor_ranks"] = ancestor_rank_summary(cat, torch.cat([r["leaf_codes"] for r in runs["exhaustive"]]),
                                                      args)
    full = out["methods"]["full"]["users_per_s"]
    for key, rec in out["methods"].items():
        rec["speedup_vs_full_ranking"] = rec["users_per_s"] / full
    return out


def prepare_and_bench(num_items: Optional[int], args: argparse.Namespace) -> Dict[str, Any]:
    """Build one catalog (synthetic of ``num_items`` items, or the checkpoint's) and bench it."""
    t0 = time.perf_counter()
    cat = build_checkpoint_catalog(args) if args.checkpoint else build_catalog(int(num_items), args)
    logger.info("catalog %d: prepared in %.0fs %s", cat["num_items"], time.perf_counter() - t0, cat["prep_seconds"])
    return bench_catalog(cat, args), cat


def plot(summary: Dict[str, Any], path: Path) -> None:
    """users/s vs catalog size (log-log) for every beam size, exhaustive leaf search and full ranking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = summary["details"]
    sizes = [c["num_items"] for c in cats]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = list(cats[0]["methods"])
    for key in keys:
        label = {"exhaustive": "exhaustive leaf search", "full": "full-corpus ranking"}.get(key, key.replace("_b", " B="))
        style = "-o" if key.startswith("beam") else "--s"
        ax.plot(sizes, [c["methods"][key]["users_per_s"] for c in cats], style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalog size |V| (items)")
    ax.set_ylabel("users/s (1 thread)")
    shape = cats[0]["sid_shape"]
    which = "trained checkpoint" if summary["setup"].get("trained") else "untrained"
    ax.set_title(f"DIG retrieval: beam vs exhaustive vs full ranking ({which}, L={shape['num_layers']}, "
                 f"K={shape['num_codes']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setup(args: argparse.Namespace, details: List[Dict[str, Any]], cat: Dict[str, Any]) -> Dict[str, Any]:
    """What was measured, for the JSON's ``setup``."""
    common = {
        "threads": args.threads, "topn": TOPN, "max_rows_per_scorer_call": args.max_rows,
        "users_per_catalog": {str(c["num_items"]): c["users"] for c in details},
        "beam_chunk": args.beam_chunk,
        "candidates": "include_history (no exclusion)",
        "fidelity": "mean |beam top-10 ∩ exhaustive-leaf top-10| / 10 over the exhaustive users",
        "fidelity_users": args.fidelity_users or "exhaustive-row budget (--exhaustive-rows, clamped)",
        "speedup_limit": "|V| / (user, prefix) pairs beam search scored per user",
        "interleaving": "per catalog, methods run chunk by chunk in turn; users/s = median over chunks",
    }
    if not args.checkpoint:
        return {
            "model": "configs/industrial_large.yaml network (d=64, L=4, K=256), untrained, seeded",
            "trained": False,
            "catalog": "synthetic items, random features in industrial_large cardinalities",
            "sids": "balanced k-means tree init on e_v, then Eq. 2-3 assignment + last-layer collision resolution",
            "users": "random requests (user/context ids, 20 history slots 80% filled)",
            "full_ranking_u2i": "precomputed per-item table (gather): cheaper than the real U2I function",
            **common,
        }
    bundle = cat["bundle"]
    mcfg = bundle.cfg.model
    tcfg = bundle.cfg.tokenizer
    n_users = int(cat["user_rows"].numel())
    how = (f"first {n_users} rows in file order" if args.user_sample == "first"
           else f"seeded subset of {n_users} rows (dig eval's --max-users sampler, seed {args.seed}), file order")
    return {
        "model": f"trained DIG checkpoint (d={mcfg.embedding_dim}, L={tcfg.num_layers}, K={tcfg.num_codes}), "
                 "loaded by retrieval.evaluate.load_inference_bundle as dig eval / dig retrieve",
        "trained": True,
        "checkpoint": str(args.checkpoint),
        "checkpoint_resolved": str(bundle.checkpoint),
        "step": _checkpoint_step(bundle.checkpoint),
        "data": str(bundle.data_root),
        "data_override": args.data,
        "catalog": f"the dataset's items.parquet, all {bundle.items.num_items} items",
        "item_representations": "bundle.item_representation_all() (Eq. 1 encoder, = model.corpus_item_representations)",
        "sids": "SidIndex.load_or_build as dig eval: the saved CKPT/sid_index, else the trained tokenizer's "
                "full_corpus_sids (Eq. 2-3 + collision resolution) of every item",
        "users": f"{args.split} retrieval targets ({bundle.data_root}/retrieval/{args.split}.parquet, "
                 f"{cat['available_users']} rows) read by data.reader.load_targets as dig eval: {how}",
        "user_sample": args.user_sample,
        "target_user_ids": cat["target_user_ids"].tolist(),
        "scorers": f"retrieval.evaluate.UserBatchScorers (dig eval's), u2t inference {bundle.cfg.u2t.inference!r}",
        "full_ranking_u2i": "the real U2I function on each target row's user_state (UserBatchScorers.rank, as "
                            "dig eval's full-corpus ranking)",
        "catalogs_arg": "ignored (the catalog is the dataset's)",
        **common,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="trained mode: a checkpoint dir (RUN/checkpoints/step-N) or a `dig export` bundle, loaded as "
                        "`dig eval` loads it; catalog = its dataset's items, users = its retrieval targets")
    p.add_argument("--data", default=None, metavar="DIR", help="with --checkpoint: dataset root overriding data.path")
    p.add_argument("overrides", nargs="*", help="with --checkpoint: evaluation config overrides, e.g. "
                   "u2t.inference=catalog_mean (the catalog-mean u2t is built per user batch inside the timings)")
    p.add_argument("--split", default="test", choices=["test", "valid"],
                   help="with --checkpoint: whose retrieval targets are the users")
    p.add_argument("--user-sample", default="first", choices=["first", "seeded"],
                   help="with --checkpoint: the first N target rows in file order, or dig eval's seeded subset")
    p.add_argument("--ancestor-ranks", type=int, default=0,
                   help="after the timed runs, for this many fidelity users: rank of each exhaustive top-10 leaf's "
                        "ancestor among all prefixes of each depth (why beam search misses it; untimed, costs about "
                        "one exhaustive search per user)")
    p.add_argument("--fidelity-users", type=int, default=None,
                   help="exhaustive (= fidelity) users per catalog, replacing the --exhaustive-rows budget "
                        "(default: 16 with --checkpoint, the budget otherwise)")
    p.add_argument("--catalogs", type=int, nargs="+", default=None,
                   help="synthetic catalog sizes (default: 10000 100000 500000); ignored with --checkpoint "
                        "(the catalog is the dataset's item table)")
    p.add_argument("--beams", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--beam-users", type=int, default=4, help="users served by beam search per catalog")
    p.add_argument("--beam-chunk", type=int, default=1, help="users per beam-search call")
    p.add_argument("--exhaustive-rows", type=int, default=300_000,
                   help="row budget of exhaustive leaf search per catalog (users = rows / |V|, clamped)")
    p.add_argument("--min-exhaustive-users", type=int, default=2, help="fewest users in the fidelity set")
    p.add_argument("--full-rows", type=int, default=200_000, help="row budget of full-corpus ranking per catalog")
    p.add_argument("--max-users", type=int, default=8, help="most users per method and catalog")
    p.add_argument("--max-rows", type=int, default=16384, help="largest scorer call (rows)")
    p.add_argument("--kmeans-iters", type=int, default=10, help="synthetic mode only")
    p.add_argument("--user-table-rows", type=int, default=100_000,
                   help="rows of the user_id table (no effect on cost; synthetic mode only)")
    p.add_argument("--batch-size", type=int, default=2048, help="unused by inference; kept for the config")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR / "beam_search.json"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.fidelity_users is None and args.checkpoint:
        args.fidelity_users = 16
    if args.fidelity_users is not None and args.fidelity_users < 1:
        p.error(f"--fidelity-users must be >= 1, got {args.fidelity_users}")
    if args.data and not args.checkpoint:
        p.error("--data needs --checkpoint")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("dig_torchrec").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    t0 = time.perf_counter()
    if args.checkpoint:
        if args.catalogs is not None:
            logger.warning("--catalogs is ignored with --checkpoint: the catalog is the dataset's item table")
        detail, cat = prepare_and_bench(None, args)
        details = [detail]
    else:
        details, cat = [], {}
        for n in args.catalogs or [10_000, 100_000, 500_000]:
            detail, cat = prepare_and_bench(n, args)
            details.append(detail)
            cat = {}  # free the model / catalog before the next size

    def at(n: int, key: str, field: str) -> float:
        for c in details:
            if c["num_items"] == n and key in c["methods"]:
                return c["methods"][key].get(field, float("nan"))
        return float("nan")

    big = max(c["num_items"] for c in details)
    tag = f"{big // 1000}k" if big % 1000 == 0 else str(big)  # 500000 -> "500k"
    summary: Dict[str, Any] = {
        f"speedup_vs_full_ranking_{tag}": at(big, "beam_b64", "speedup_vs_full_ranking"),
        f"fidelity_top10_b64_{tag}": at(big, "beam_b64", "fidelity_top10"),
        f"fidelity_top10_b64_{tag}_se": at(big, "beam_b64", "fidelity_top10_se"),
        f"speedup_limit_{tag}": at(big, "beam_b64", "speedup_limit"),
        "goals": {
            "speedup_vs_full_ranking>=10 (B=64, largest catalog)": at(big, "beam_b64", "speedup_vs_full_ranking") >= 10,
            "fidelity_top10>=0.9 (B=64, largest catalog)": at(big, "beam_b64", "fidelity_top10") >= 0.9,
        },
        "recall_at_10": {k: m["recall@10"] for c in details if c["num_items"] == big
                         for k, m in c["methods"].items() if "recall@10" in m},
        "table": [
            {"num_items": c["num_items"], "method": k, "users_per_s": m["users_per_s"],
             "speedup_vs_full_ranking": m["speedup_vs_full_ranking"], "fidelity_top10": m.get("fidelity_top10"),
             "fidelity_top10_se": m.get("fidelity_top10_se"), "scored_pairs_per_user": m["scored_pairs_per_user"],
             "speedup_limit": m.get("speedup_limit"), "recall@10": m.get("recall@10")}
            for c in details for k, m in c["methods"].items()
        ],
        "details": details,
        "setup": _setup(args, details, cat),
        "machine": machine,
        "loadavg_end": list(os.getloadavg()),
        "seconds": time.perf_counter() - t0,
    }
    write_json(summary, args.out)
    if not args.no_plot:
        plot(summary, Path(args.out).with_suffix(".png"))
    logger.info("%s", {k: v for k, v in summary.items() if k.startswith(("speedup", "fidelity"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
