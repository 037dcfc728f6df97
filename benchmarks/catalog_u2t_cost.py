"""What ``u2t.inference=catalog_mean|catalog_max`` adds to beam search at 500K items.

    python benchmarks/catalog_u2t_cost.py --data data/il_cut --users 64 --beam 64 \
        --out benchmarks/results/catalog_u2t_cost_500k.json

``--data`` is any dataset with the industrial_large catalog (500K items, u2i over category x brand),
e.g. ``dig data synth --preset industrial_large --users 20000 --rows 300000 --out data/il_cut``.
The SIDs are random (K=256, L=4), the worst case for the per-prefix share matrices: no prefix is
brand-pure, so every prefix row holds as many key groups as it can.

One process and one user batch (``--users`` leave-last-out test users with their real states)
replay beam search's query pattern: depth 1 scores all K tokens, depths 2..L score B x K
children of B random occupied prefixes. For each (user, prefix) row the benchmark times:

* the catalog u2t: ``CatalogPrefixU2T.for_users`` (u2i for U users x T key groups, once per
  batch) plus the CSR gathers of every scored row, for ``mean`` and ``max``;
* the baseline it replaces: MLP_u2t's estimate (Eq. 14, ``U2TMLP.forward_layer``) on the
  same rows, with e_u and e_sid of the same widths as the industrial_large config;
* the Mixer pass that scores those rows (``DIGModel.mixer`` of an untrained industrial_large-sized
  model), which beam search pays in every mode.

It reports the ratios catalog / MLP and catalog / Mixer, and the one-off
``CatalogPrefixU2T`` build time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, median, write_json  # noqa: E402
from dig_torchrec.config import load_config  # noqa: E402
from dig_torchrec.data.items import ItemTable  # noqa: E402
from dig_torchrec.data.reader import load_targets, open_dataset  # noqa: E402
from dig_torchrec.data.u2i import U2IFunction  # noqa: E402
from dig_torchrec.model import DIGModel  # noqa: E402
from dig_torchrec.retrieval.evaluate import kjt_select_rows  # noqa: E402
from dig_torchrec.retrieval.sid_index import SidIndex, decode_prefix  # noqa: E402
from dig_torchrec.retrieval.u2t_catalog import CatalogPrefixU2T  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def query_pattern(index: SidIndex, users: int, beam: int, gen: torch.Generator) -> list:
    """Per depth: (user_index [N], sid_prefix [N, l]) as beam search would score them."""
    K, L = index.num_codes, index.num_layers
    out = []
    for depth in range(1, L + 1):
        if depth == 1:
            codes = index.valid_codes(1).repeat(users)
            user = torch.arange(users).repeat_interleave(index.valid_codes(1).numel())
        else:
            parents = index.valid_codes(depth - 1)
            pick = torch.randint(parents.numel(), (users, beam), generator=gen)
            child = (parents[pick].unsqueeze(-1) * K + torch.arange(K)).reshape(users, -1)
            keep = index.is_valid(child.reshape(-1), depth).view(users, -1)
            user, col = keep.nonzero(as_tuple=True)
            codes = child[user, col]
        out.append((user, decode_prefix(codes, depth, K)))
    return out


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--config", default=str(REPO / "configs" / "industrial_large.yaml"))
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--beam", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-rows", type=int, default=16384, help="rows per Mixer / MLP call, as eval.score_chunk_rows")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "catalog_u2t_cost_500k.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cfg = load_config(args.config, [f"data.path={args.data}"])
    meta, schema = open_dataset(args.data, cfg.data)
    items = ItemTable.load(args.data, schema, meta)
    K, L = cfg.tokenizer.num_codes, cfg.tokenizer.num_layers
    sids = torch.randint(K, (items.num_items, L), generator=gen)
    index = SidIndex(sids, K)
    fn = U2IFunction(meta, items.u2i_keys)
    t0 = time.perf_counter()
    catalog = CatalogPrefixU2T(index, fn)
    build_s = time.perf_counter() - t0
    targets = load_targets(args.data, "test", schema)
    rows = torch.arange(min(args.users, len(targets)))
    U = int(rows.numel())
    states = targets.states.select(rows)
    queries = query_pattern(index, U, args.beam, gen)
    total_rows = sum(int(u.numel()) for u, _ in queries)

    torch.manual_seed(0)
    model = DIGModel(cfg, meta)
    model.eval()
    ctx = model.user_context(kjt_select_rows(targets.user_kjt, rows))

    def chunks(user: torch.Tensor, prefix: torch.Tensor):
        for s in range(0, user.numel(), args.max_rows):
            yield user[s:s + args.max_rows], prefix[s:s + args.max_rows]

    def run_catalog(reduce: str) -> None:
        table = catalog.for_users(states, U, reduce)
        for user, prefix in queries:
            for u, pf in chunks(user, prefix):
                table(u, pf)

    u2t_rows = [torch.zeros(int(u.numel()), fn.dim) for u, _ in queries]

    def run_mlp() -> None:
        with torch.no_grad():
            for depth, (user, prefix) in enumerate(queries, 1):
                for u, pf in chunks(user, prefix):
                    model.u2t_mlp.forward_layer(depth - 1, ctx.user_embedding[u], model._sid_prefix_embedding_at(pf))

    def run_mixer() -> None:
        with torch.no_grad():
            for depth, (user, prefix) in enumerate(queries, 1):
                for s in range(0, user.numel(), args.max_rows):
                    u, pf = user[s:s + args.max_rows], prefix[s:s + args.max_rows]
                    model.recall_logits(ctx, u, pf, u2t=u2t_rows[depth - 1][s:s + args.max_rows])

    res = {}
    for name, f in (("catalog_mean", lambda: run_catalog("mean")), ("catalog_max", lambda: run_catalog("max")),
                    ("mlp_u2t", run_mlp), ("mixer", run_mixer)):
        f()  # warm-up
        res[name] = timed(f, args.repeats)
        print(f"{name:14s} {res[name]:.3f} s for {U} users ({total_rows} rows)", flush=True)
    out = {
        "catalog_max_over_mlp_u2t_500k": res["catalog_max"] / res["mlp_u2t"],
        "catalog_max_over_mixer_500k": res["catalog_max"] / res["mixer"],
        "catalog_mean_over_mixer_500k": res["catalog_mean"] / res["mixer"],
        "seconds_per_batch": res,
        "setup": {
            "command": " ".join(["python", "benchmarks/catalog_u2t_cost.py", *sys.argv[1:]]),
            "num_items": items.num_items, "key_groups": catalog.num_groups, "nnz_per_depth": catalog.nnz,
            "sids": f"random, K={K}, L={L}", "users": U, "beam": args.beam, "rows_scored": total_rows,
            "rows_per_depth": [int(u.numel()) for u, _ in queries], "build_seconds": build_s,
            "threads": args.threads, "max_rows": args.max_rows,
            "timing": f"median of {args.repeats} after one warm-up; catalog = for_users + every row's gather",
        },
        "machine": machine_info(),
    }
    write_json(out, args.out)
    print({k: round(v, 3) for k, v in out.items() if isinstance(v, float)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
