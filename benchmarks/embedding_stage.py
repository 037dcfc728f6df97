"""The embedding stage alone at Industrial-Large table sizes: TorchRec vs plain PyTorch.

    python benchmarks/embedding_stage.py                                  # full size (a few minutes)
    python benchmarks/embedding_stage.py --users 200000 --items 5000 \\
        --steps 5 --warmup 1 --rounds 1 --out /tmp/es.json               # smoke run

What one timed step does, for the two big tables of ``configs/industrial_large.yaml``
(``user_id``: 20M rows, ``item_id``: 500K rows read by ``item_id`` and the 20 history
features; d = 64, fp32): look up the step's ids, pool them (sum bags), run backward from a
fixed upstream gradient ``G`` (``pooled.backward(G)``) and the sparse optimizer. (Until
2026-12-04 the step formed ``sum(pooled * G)`` first; that dense multiply and its backward
are the same fixed cost on both sides, outside the embedding stage, and diluted the ratio:
1.26x measured that way on an idle machine, see results/embedding_stage.json history.)
The dense network is left out on purpose: ``train_throughput.py``'s
``torchrec_vs_plain_pytorch`` runs identical dense code on both sides, so on CPU it
mostly measures the Mixer.

Rows per step are those of a training batch: B exposure rows + P x (1 + 4) retrieval rows
with P = ceil(2 x click rate x B) (the reader's auto rule, click rate 0.1077 of the
industrial_large preset); history bags are 80% filled, as in ``train_throughput.py``.

Variants (each in a fresh process, interleaved over ``--rounds``):

* ``torchrec``: an ``EmbeddingBagCollection`` built on ``meta``, row-wise Adagrad fused into
  backward (``apply_optimizer_in_backward``), planned and sharded by
  ``DistributedModelParallel`` exactly as ``dig train`` does (table_wise on CPU, FBGEMM
  TBE kernel) on a world of one process.
* ``plain_adagrad``: one ``torch.nn.EmbeddingBag(mode="sum", sparse=True)`` per table (all
  features of a table in one call) and ``torch.optim.Adagrad`` on the sparse gradients:
  the closest plain-PyTorch match of row-wise Adagrad (but with a full-size state: one
  float per weight instead of one per row).
* ``plain_sparse_adam``: the same with ``torch.optim.SparseAdam`` (two full-size moments;
  needs ~3x the table's RAM: it is skipped, and the JSON says so, when the machine does not
  have that much free memory).

The headline ``torchrec_embedding_stage_speedup`` is the median plain_adagrad step time
over the median torchrec step time (>1: TorchRec faster). Peak RSS per process
(= per rank) is reported next to the bytes of the tables and the optimizer state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py` from the repo root

from benchmarks.common import RESULTS_DIR, auto_positive_slots, machine_info, median, peak_rss_bytes, write_json  # noqa: E402

logger = logging.getLogger("embedding_stage")

VARIANTS = ("torchrec", "plain_adagrad", "plain_sparse_adam")
BASELINE = "plain_adagrad"
FILL = 0.8  # share of non-empty history bags


# ---------------------------------------------------------------------- one process
def _batches(spec: Dict[str, Any], pool: int) -> List[Dict[str, torch.Tensor]]:
    """``pool`` steps of ids: per table the concatenated values and per-bag lengths (feature-major)."""
    g = torch.Generator().manual_seed(spec["seed"])
    rows = spec["rows"]
    out = []
    for _ in range(pool):
        user_len = torch.ones(rows, dtype=torch.int32)
        item_len = [torch.ones(rows, dtype=torch.int32)]
        item_len += [(torch.rand(rows, generator=g) < FILL).to(torch.int32) for _ in range(spec["history"])]
        item_lengths = torch.cat(item_len)
        out.append({
            "user_values": torch.randint(0, spec["users"], (rows,), generator=g),
            "user_lengths": user_len,
            "item_values": torch.randint(0, spec["items"], (int(item_lengths.sum()),), generator=g),
            "item_lengths": item_lengths,
        })
    return out


class _Holder(torch.nn.Module):
    """``embedding_bags`` under the same FQN as in ``DIGModel`` (DMP needs a root with a forward)."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.embedding_bags = ebc

    def forward(self, kjt: Any) -> Any:
        return self.embedding_bags(kjt)


def _worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Build one variant, run warm-up + timed steps, return the timings and memory."""
    torch.set_num_threads(spec["threads"])
    variant, d, rows, H = spec["variant"], spec["dim"], spec["rows"], spec["history"]
    item_features = ["item_id", *[f"hist_{j}" for j in range(H)]]
    batches = _batches(spec, spec["pool"])
    grad_user = torch.randn(rows, d, generator=torch.Generator().manual_seed(7))
    grad_item = torch.randn((1 + H) * rows, d, generator=torch.Generator().manual_seed(8))
    t_build = time.perf_counter()
    info: Dict[str, Any] = {}
    if variant == "torchrec":
        import torch.distributed as dist
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        from dig_torchrec.config import ShardingConfig, TrainConfig
        from dig_torchrec.distributed.planner import default_sharders, plan_sharding, plan_sharding_types
        from dig_torchrec.training.optim import attach_sparse_optimizer

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        tables = [
            EmbeddingBagConfig(name="user_id", embedding_dim=d, num_embeddings=spec["users"], feature_names=["user_id"],
                               pooling=PoolingType.SUM, weight_init_min=-0.05, weight_init_max=0.05),
            EmbeddingBagConfig(name="item_id", embedding_dim=d, num_embeddings=spec["items"], feature_names=item_features,
                               pooling=PoolingType.SUM, weight_init_min=-0.05, weight_init_max=0.05),
        ]
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        holder = _Holder(ebc)
        attach_sparse_optimizer(holder, TrainConfig(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05), "cpu")
        plan = plan_sharding(holder, ShardingConfig(), torch.device("cpu"), 1, 1, rows, pg=dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(holder, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                       device=torch.device("cpu"), plan=plan, sharders=default_sharders())
        info["sharding"] = plan_sharding_types(plan)
        info["optimizer"] = "torchrec.optim.RowWiseAdagrad fused into backward (FBGEMM TBE)"
        state = dmp.fused_optimizer.state_dict()["state"]
        info["optimizer_state_bytes"] = sum(
            sum(s.tensor.numel() * s.tensor.element_size() for s in v.local_shards()) if hasattr(v, "local_shards")
            else v.numel() * v.element_size()
            for per in state.values() for v in per.values() if hasattr(v, "local_shards") or isinstance(v, torch.Tensor))
        keys = ["user_id", *item_features]
        kjts = [KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat([b["user_values"], b["item_values"]]),
                                                    lengths=torch.cat([b["user_lengths"], b["item_lengths"]]))
                for b in batches]
        grad = torch.cat([grad_user, grad_item.view(1 + H, rows, d).transpose(0, 1).reshape(rows, (1 + H) * d)], 1)

        def step(i: int) -> None:
            pooled = dmp(kjts[i % len(kjts)]).values()  # [rows, (1 + 1 + H) * d], key order
            pooled.backward(grad)  # the fused row-wise Adagrad updates the touched rows here

    else:
        from torch import nn

        bags = nn.ModuleDict({
            "user_id": nn.EmbeddingBag(spec["users"], d, mode="sum", sparse=True),
            "item_id": nn.EmbeddingBag(spec["items"], d, mode="sum", sparse=True),
        })
        with torch.no_grad():
            for bag in bags.values():
                bag.weight.uniform_(-0.05, 0.05)
        if variant == "plain_adagrad":
            opt: torch.optim.Optimizer = torch.optim.Adagrad(bags.parameters(), lr=0.05, eps=1e-8)
            info["optimizer"] = "torch.optim.Adagrad (sparse gradients)"
        else:
            opt = torch.optim.SparseAdam(list(bags.parameters()), lr=1e-3)
            info["optimizer"] = "torch.optim.SparseAdam"
        info["sharding"] = {"user_id": "replicated (plain)", "item_id": "replicated (plain)"}

        def offsets(lengths: torch.Tensor) -> torch.Tensor:
            o = torch.zeros(lengths.numel(), dtype=torch.long)
            o[1:] = torch.cumsum(lengths, 0)[:-1]
            return o

        prepared = [(b["user_values"], offsets(b["user_lengths"]), b["item_values"], offsets(b["item_lengths"]))
                    for b in batches]

        def step(i: int) -> None:
            uv, uo, iv, io = prepared[i % len(prepared)]
            torch.autograd.backward([bags["user_id"](uv, uo), bags["item_id"](iv, io)], [grad_user, grad_item])
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(0)  # materialise the optimizer state before measuring it
        info["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for st in opt.state.values()
                                            for v in st.values() if isinstance(v, torch.Tensor))
    info["table_bytes"] = (spec["users"] + spec["items"]) * d * 4
    info["build_seconds"] = time.perf_counter() - t_build
    for i in range(spec["warmup"]):
        step(i)
    times = []
    for i in range(spec["steps"]):
        t0 = time.perf_counter()
        step(spec["warmup"] + i)
        times.append(time.perf_counter() - t0)
    if variant == "torchrec":  # the fused update did run: row-wise Adagrad's per-row state moved
        moved = [float(v.local_shards()[0].tensor.abs().sum()) if hasattr(v, "local_shards") else float(v.abs().sum())
                 for per in dmp.fused_optimizer.state_dict()["state"].values() for v in per.values()
                 if hasattr(v, "local_shards") or isinstance(v, torch.Tensor)]
    else:
        moved = [float(v.abs().sum()) for st in opt.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
    info["optimizer_state_abs_sum"] = sum(moved)
    info.update({"variant": variant, "step_seconds": times, "median_step_seconds": median(times),
                 "peak_rss_bytes": peak_rss_bytes(), "loadavg_end": list(os.getloadavg())})
    info["rss_over_tables_and_state"] = info["peak_rss_bytes"] / (info["table_bytes"] + info["optimizer_state_bytes"])
    return info


# ---------------------------------------------------------------------- driver
def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def memory_needed_bytes(variant: str, users: int, items: int, dim: int) -> int:
    """Peak RSS measured at 20M x 64 (torchrec 1.05x the tables, plain_adagrad 2.9x: weights +
    state + the sparse gradient's coalesce buffers, plain_sparse_adam 3.8x) with a margin, + 2 GiB
    left to the other jobs of this shared machine."""
    copies = {"torchrec": 1.2, "plain_adagrad": 3.0, "plain_sparse_adam": 4.0}[variant]
    return int((users + items) * dim * 4 * copies + 2 * 2**30)


def run_variant(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one variant in a fresh interpreter (its peak RSS is the variant's alone)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    if res.returncode != 0:
        raise RuntimeError(f"{spec['variant']} worker failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(runs: List[Dict[str, Any]], skipped: List[Dict[str, Any]], args: argparse.Namespace,
              machine: Dict[str, Any]) -> Dict[str, Any]:
    per: Dict[str, Dict[str, Any]] = {}
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        if not mine:
            continue
        per[v] = {
            "median_step_seconds": median([r["median_step_seconds"] for r in mine]),
            "best_step_seconds": min(min(r["step_seconds"]) for r in mine),  # least disturbed by other jobs
            "rounds": len(mine),
            "peak_rss_gib_per_rank": max(r["peak_rss_bytes"] for r in mine) / 2**30,
            "table_gib": mine[0]["table_bytes"] / 2**30,
            "optimizer_state_gib": mine[0]["optimizer_state_bytes"] / 2**30,
            "rss_over_tables_and_state": max(r["rss_over_tables_and_state"] for r in mine),
            "optimizer": mine[0]["optimizer"],
            "sharding": mine[0]["sharding"],
        }
        per[v]["rows_per_s"] = args.rows / per[v]["median_step_seconds"]
    tr = per.get("torchrec", {}).get("median_step_seconds", float("nan"))
    speedup = {f"vs_{v}": per[v]["median_step_seconds"] / tr for v in per if v != "torchrec"}
    # the same ratio per round (both variants ran back to back, under about the same load)
    paired: Dict[str, List[float]] = {}
    for v in per:
        if v == "torchrec":
            continue
        for rnd in sorted({r["round"] for r in runs}):
            a = [r for r in runs if r["round"] == rnd and r["variant"] == v]
            b = [r for r in runs if r["round"] == rnd and r["variant"] == "torchrec"]
            if a and b:
                paired.setdefault(f"vs_{v}", []).append(a[0]["median_step_seconds"] / b[0]["median_step_seconds"])
    return {
        "benchmark": "embedding_stage",
        "torchrec_embedding_stage_speedup": speedup.get(f"vs_{BASELINE}", float("nan")),
        "goal": ">= 1.5x (plain_adagrad median step / torchrec median step)",
        "speedups": speedup,
        "paired_round_speedups": paired,
        "best_step_speedup": {f"vs_{v}": per[v]["best_step_seconds"] / per["torchrec"]["best_step_seconds"]
                              for v in per if v != "torchrec" and "torchrec" in per},
        "median_paired_speedup": {k: median(v) for k, v in paired.items()},
        "rss_gib_per_rank": {v: per[v]["peak_rss_gib_per_rank"] for v in per},
        "variants": per,
        "skipped": skipped,
        "setup": {"users": args.users, "items": args.items, "dim": args.dim, "batch_size": args.batch_size,
                  "retrieval_slots": args.slots, "rows_per_step": args.rows, "history": args.history,
                  "threads_per_process": args.threads, "steps": args.steps, "warmup": args.warmup,
                  "rounds": args.rounds, "world_size": 1},
        "command": "python benchmarks/embedding_stage.py " + " ".join(args.argv),
        "machine": machine,
        "loadavg_end": list(os.getloadavg()),
        "raw_runs": runs,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=20_000_000)
    p.add_argument("--items", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2048, help="exposure rows per step (industrial_large: 2048)")
    p.add_argument("--click-rate", type=float, default=0.1077)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool", type=int, default=4, help="distinct id batches cycled through")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--variants", nargs="+", default=["torchrec", "plain_adagrad"], choices=VARIANTS,
                   help="plain_sparse_adam needs ~4x the tables' RAM (21.6 GiB at 20M x 64): add it on a big machine "
                        "or with smaller --users")
    p.add_argument("--memory-wait-s", type=float, default=60)
    p.add_argument("--out", default=str(RESULTS_DIR / "embedding_stage.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.slots = auto_positive_slots(args.click_rate, args.batch_size)
    args.rows = args.batch_size + args.slots * 5
    machine = machine_info()
    runs: List[Dict[str, Any]] = []
    skipped: List[Dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = list(args.variants) if rnd % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            need = memory_needed_bytes(variant, args.users, args.items, args.dim)
            t_end = time.time() + args.memory_wait_s
            while _mem_available_bytes() < need and time.time() < t_end:
                time.sleep(10)
            avail = _mem_available_bytes()
            if avail < need:
                logger.warning("round %d %s skipped: needs %.1f GiB, %.1f GiB available", rnd, variant,
                               need / 2**30, avail / 2**30)
                skipped.append({"round": rnd, "variant": variant, "needed_gib": need / 2**30,
                                "available_gib": avail / 2**30})
                continue
            spec = {"variant": variant, "users": args.users, "items": args.items, "dim": args.dim, "rows": args.rows,
                    "history": args.history, "steps": args.steps, "warmup": args.warmup, "pool": args.pool,
                    "threads": args.threads, "seed": 100 + rnd}
            try:
                r = run_variant(spec)
            except RuntimeError as e:  # e.g. killed by the OOM killer: record it, keep the other runs
                logger.warning("round %d %s failed: %s", rnd, variant, e)
                skipped.append({"round": rnd, "variant": variant, "failed": str(e)[-500:]})
                continue
            r["round"] = rnd
            runs.append(r)
            logger.info("round %d %-17s step %.4fs (%.0f rows/s), peak RSS %.2f GiB, build %.0fs", rnd, variant,
                        r["median_step_seconds"], args.rows / r["median_step_seconds"], r["peak_rss_bytes"] / 2**30,
                        r["build_seconds"])
    summary = summarize(runs, skipped, args, machine)
    write_json(summary, args.out)
    logger.info("torchrec_embedding_stage_speedup=%.3f (%s) -> %s", summary["torchrec_embedding_stage_speedup"],
                ", ".join(f"{k}={v:.2f}" for k, v in summary["speedups"].items()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
