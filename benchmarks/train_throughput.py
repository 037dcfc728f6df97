"""Training throughput at Industrial-Large table sizes: DIG vs rank-only vs plain PyTorch.

    python benchmarks/train_throughput.py                      # full run (about 30 min on 2 cores)
    python benchmarks/train_throughput.py --users 2000 --items 500 --batch-size 32 \
        --steps 3 --warmup 1 --rounds 1 --out /tmp/tt.json    # smoke run

Tables: ``user_id`` 20M rows, ``item_id`` 500K rows (also read by the 20 history
features), the user/context/item feature tables of the industrial_large preset and the SID
table (L*K = 1024 rows of width F_enc*d = 256); d = 64, fp32. Model: ``configs/
industrial_large.yaml`` (DIN + DCNv2 + MoE Mixer, 4-layer VQ encoder, L=4, K=256).

Variants, each run on 1 and on 2 local ranks (gloo, CPU), in fresh processes:

* ``dig``: DIGModel through the production path: built on ``meta``, row-wise Adagrad fused
  into backward (``apply_optimizer_in_backward``), planner (tables table_wise on CPU), DMP,
  dense Adam in a CombinedOptimizer, ``TrainPipelineSparseDist`` (the trainer's wiring). Batches carry B exposure
  rows (clicks at ``--click-rate``, default 0.1077 = the industrial_large preset's train click
  rate) + P = ceil(2 x rate x B) retrieval slots of 1 + 4 negatives rows, as the reader makes
  them; the batch's clicks fill the slots and the model skips the weight-0 rest.
* ``rank_only``: the same network without the recall path (``DIGModel(..., rank_only=True)``:
  no quantizer, SID embeddings, u2t or recall Mixer calls), same wiring,
  batches of B exposure rows only.
* ``plain``: the plain-PyTorch reference: DIG's dense modules unchanged, every table a
  ``torch.nn.EmbeddingBag(sparse=True)`` (one lookup per table per step), dense Adam plus
  ``torch.optim.SGD`` on the sparse table gradients, and on 2 ranks
  ``DistributedDataParallel`` over the whole model (every rank holds every table; sparse
  gradients are all-reduced). That is what data parallelism without TorchRec amounts to;
  SparseAdam or Adagrad would add a full-size state per table per rank (20M x 64 x 4 B =
  5.1 GB each for the user table), which 2 ranks on a 24 GiB machine cannot hold, so the
  reference uses the stateless sparse SGD -- a cheaper update than the TorchRec path's
  row-wise Adagrad, so the comparison leans towards the reference.
* ``plain_rank_only`` (``--variants``): the same reference for the rank-only network,
  where the embedding side is a larger share of the step.

Batches are synthetic (random ids in range, ``common.SyntheticBatches``), made in memory
before timing and cycled (8 distinct batches per rank), so the numbers measure training,
not a reader (see ``reader_throughput.py`` for that). The tokenizer is marked initialised
with random codebooks, so DIG's steps include the EMA codebook update.

Per run: ``--warmup`` untimed steps, ``--steps`` timed steps (median step time), then
``--profile-steps`` steps under ``torch.profiler`` for the data / forward / backward /
optimizer split. Rounds interleave every (world size, variant) pair; the JSON reports
medians over rounds, the ratios at 2 ranks, MFU (model FLOP/s over a measured fp32 matmul
peak), peak RSS per rank against that rank's table shards + optimizer state, machine
info and load averages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py` from the repo root

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    SyntheticBatches,
    auto_positive_slots,
    current_rss_bytes,
    dig_config_for_bench,
    industrial_meta,
    init_tokenizer_randomly,
    machine_info,
    make_plain,
    materialize,
    matmul_peak_flops,
    median,
    model_flops_per_sample,
    peak_rss_bytes,
    write_json,
)
from dig_torchrec.model import DIGModel  # noqa: E402

logger = logging.getLogger("train_throughput")

VARIANTS = ("dig", "rank_only", "plain", "plain_rank_only")
PHASES = ("data", "forward", "backward", "optimizer")


# ---------------------------------------------------------------------- one rank
def _phase_of(label: str) -> Optional[str]:
    """Map a profiler range (TorchRec pipeline's ``## ... ##`` labels or ours) to a phase."""
    if not label.startswith("##"):
        return None
    name = label.strip("# ").lower()
    if name.startswith("forward"):
        return "forward"
    if name.startswith("backward"):
        return "backward"
    if name.startswith("optimizer") or name.startswith("zero_grad"):
        return "optimizer"
    return "data"  # load batch / next_batch / copy_batch_to_gpu / wait_for_batch / *sparse_data_dist*


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every local tensor (ShardedTensor: local shards) in a nested state."""
    if hasattr(obj, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _worker(rank: int, world: int, port: int, spec: Dict[str, Any], out_path: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s r{rank} %(message)s")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from dig_torchrec.data.schema import FeatureSchema
    from dig_torchrec.distributed.env import init_distributed, shutdown

    torch.set_num_threads(spec["threads"])
    env = init_distributed(spec.get("device", "cpu"))  # cuda: cuda:<rank>, nccl
    cuda = env.device.type == "cuda"

    def sync() -> None:  # step times on CUDA: wait for the queued kernels
        if cuda:
            torch.cuda.synchronize(env.device)
    rss_after_import = current_rss_bytes()
    variant = spec["variant"]
    cfg = dig_config_for_bench(spec["batch_size"], sparse_optimizer=spec["sparse_optimizer"])
    cfg.train.sparse_lr = 0.05
    meta = industrial_meta(spec["users"], spec["items"])
    schema = FeatureSchema.from_meta(meta, cfg.data.history_length)
    B = spec["batch_size"]
    # retrieval click slots per batch: the reader's auto rule at the dataset's click rate
    P = auto_positive_slots(spec["click_rate"], B) if variant in ("dig", "plain") else 0
    R = P * (1 + cfg.data.negatives_per_positive)
    torch.manual_seed(0)  # identical dense init on every rank
    t_build = time.perf_counter()
    info: Dict[str, Any] = {}
    if variant in ("dig", "rank_only"):
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        from dig_torchrec.distributed.planner import plan_sharding_types
        from dig_torchrec.distributed.sharding import shard_model
        from dig_torchrec.training.optim import build_optimizer

        model = DIGModel(cfg, meta, device="meta", rank_only=variant == "rank_only")
        dmp, plan = shard_model(model, cfg, env, B)  # as training/trainer.py (no per-feature pooling hint)
        optimizer, _ = build_optimizer(dmp, cfg.train)
        dig = dmp.module
        if variant == "dig":
            init_tokenizer_randomly(dig, seed=0)
        pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)  # as training/trainer.py
        dmp.train()
        info["sharding"] = plan_sharding_types(plan)
        info["tables_on_rank"] = sorted(
            t for _, mp_ in plan.plan.items() for t, ps in mp_.items() if rank in (ps.ranks or []))  # type: ignore[union-attr]
        sd = dmp.state_dict()
        table_keys = [k for k in sd if "embedding_bags." in k]
        table_bytes = sum(_tensor_bytes(sd[k]) for k in table_keys)
        dense_bytes = sum(_tensor_bytes(v) for k, v in sd.items() if k not in table_keys)
        sparse_opt_bytes = _tensor_bytes(dmp.fused_optimizer.state_dict()["state"])
        opt_state = optimizer.state_dict()["state"]
        total_opt_bytes = _tensor_bytes(opt_state)
        dense_opt_bytes = total_opt_bytes - sparse_opt_bytes
        del sd, opt_state
        source = SyntheticBatches(schema, B, P, meta.u2i_dim, pool=spec["pool"], seed=1 + rank,
                                  negatives=cfg.data.negatives_per_positive, click_rate=spec["click_rate"])

        def data_iter():
            while True:
                with record_function("## data ##"):
                    batch = next(source)
                yield batch

        it = data_iter()

        def step() -> None:
            output = pipeline.progress(it)
            dig.on_step_accepted(output)  # the step's EMA / u2t / BN updates, as Trainer._run_segment
    else:  # plain PyTorch
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = make_plain(DIGModel(cfg, meta, device="meta", rank_only=variant == "plain_rank_only"))
        materialize(model, device=str(env.device))
        init_tokenizer_randomly(model, seed=0)
        model.train()
        sparse_params = [p for n, p in model.named_parameters() if "embedding_bags.embedding_bags." in n]
        sparse_ids = {id(p) for p in sparse_params}
        dense_params = [p for p in model.parameters() if id(p) not in sparse_ids]
        net = DDP(model, init_sync=False, find_unused_parameters=False) if world > 1 else model
        opt_sparse = torch.optim.SGD(sparse_params, lr=cfg.train.sparse_lr)
        opt_dense = torch.optim.Adam(dense_params, lr=cfg.train.lr)
        table_bytes = sum(p.numel() * p.element_size() for p in sparse_params)
        dense_bytes = sum(_tensor_bytes(v) for k, v in model.state_dict().items()
                          if "embedding_bags.embedding_bags." not in k)
        sparse_opt_bytes = 0
        info["sharding"] = {"all": "replicated (DDP)" if world > 1 else "single process"}
        source = SyntheticBatches(schema, B, P, meta.u2i_dim, pool=spec["pool"], seed=1 + rank,
                                  negatives=cfg.data.negatives_per_positive, click_rate=spec["click_rate"])

        def step() -> None:
            with record_function("## data ##"):
                batch = next(source)
                if cuda:
                    batch = batch.to(env.device, non_blocking=True)
            with record_function("## zero_grad ##"):
                opt_sparse.zero_grad(set_to_none=True)
                opt_dense.zero_grad(set_to_none=True)
            with record_function("## forward ##"):
                loss, output = net(batch)
            with record_function("## backward ##"):
                loss.backward()
            with record_function("## optimizer ##"):
                opt_sparse.step()
                opt_dense.step()
                model.on_step_accepted(output)

        step()  # materialise Adam state for the byte count
        dense_opt_bytes = _tensor_bytes(opt_dense.state_dict()["state"])
    build_s = time.perf_counter() - t_build
    dist.barrier()

    for _ in range(spec["warmup"]):
        step()
    sync()
    dist.barrier()
    times: List[float] = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    split: Dict[str, float] = {p: 0.0 for p in PHASES}
    labels: Dict[str, float] = {}
    if spec["profile_steps"] > 0:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(spec["profile_steps"]):
                step()
        for ev in prof.key_averages():
            phase = _phase_of(ev.key)
            if phase is None:
                continue
            sec = ev.cpu_time_total / 1e6 / spec["profile_steps"]
            labels[ev.key] = sec
            split[phase] += sec
    dist.barrier()
    result = {
        "rank": rank, "world_size": world, "variant": variant, "batch_size": B, "retrieval_rows": R,
        "real_retrieval_rows_per_step": sum(float(b.retrieval_weights.sum()) for b in source.batches) / len(source.batches),
        "step_seconds": times, "median_step_seconds": median(times),
        "samples_per_s_rank": B / median(times),
        "split_seconds_per_step": split, "profiler_ranges_seconds_per_step": labels,
        "peak_rss_bytes": peak_rss_bytes(), "rss_after_import_bytes": rss_after_import,
        "table_bytes": table_bytes, "sparse_optimizer_state_bytes": sparse_opt_bytes,
        "dense_bytes": dense_bytes, "dense_optimizer_state_bytes": dense_opt_bytes,
        "build_seconds": build_s, "threads": torch.get_num_threads(), **info,
    }
    Path(f"{out_path}.rank{rank}").write_text(json.dumps(result))
    shutdown(env)


def count_model_flops(variant: str, batch_size: int, click_rate: float) -> float:
    """fwd+bwd model FLOPs per exposure sample of ``variant``'s network (no process group).

    Counted on a copy with small tables: FLOPs per sample do not depend on table rows.
    """
    from dig_torchrec.data.schema import FeatureSchema

    cfg = dig_config_for_bench(batch_size)
    small = industrial_meta(1000, 1000)
    rank_only = variant in ("rank_only", "plain_rank_only")
    torch.manual_seed(0)
    m = DIGModel(cfg, small, device="cpu", rank_only=rank_only)
    if not rank_only:
        init_tokenizer_randomly(m, seed=0)
    m.train()
    b = batch_size
    slots = auto_positive_slots(click_rate, b) if not rank_only else 0
    batch = next(SyntheticBatches(FeatureSchema.from_meta(small, cfg.data.history_length), b, slots, small.u2i_dim,
                                  pool=1, negatives=cfg.data.negatives_per_positive, click_rate=click_rate))
    return model_flops_per_sample(m, batch)


# ---------------------------------------------------------------------- driver
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def memory_needed_bytes(variant: str, world: int, args: argparse.Namespace) -> int:
    """Rough RAM need of a run: table copies (a replica per rank for ``plain``) + 1.5 GiB per rank."""
    tables = (args.users + args.items * 1.2) * 64 * 4
    copies = world if variant == "plain" else 1
    return int(tables * copies * 1.1 + world * 1.5 * 2**30)


def wait_for_memory(need: int, timeout_s: float) -> bool:
    """Wait until ``need`` bytes are available (the machine is shared); False on timeout."""
    t_end = time.time() + timeout_s
    while _mem_available_bytes() < need:
        if time.time() > t_end:
            return False
        logger.info("waiting for %.1f GiB free RAM (%.1f GiB available)", need / 2**30, _mem_available_bytes() / 2**30)
        time.sleep(20)
    return True


def run_once(variant: str, world: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Spawn ``world`` fresh ranks for one (variant, world size) run and collect their results."""
    import torch.multiprocessing as mp

    spec = {"variant": variant, "batch_size": args.batch_size, "users": args.users, "items": args.items,
            "steps": args.steps, "warmup": args.warmup, "profile_steps": args.profile_steps, "pool": args.pool,
            "threads": args.threads_per_rank, "sparse_optimizer": args.sparse_optimizer, "click_rate": args.click_rate,
            "device": args.device}
    # the machine is shared: measure the matmul peak right before each run, under the same load
    peak_now = matmul_peak_flops(threads=args.threads_per_rank, seconds=2.0)["median_flops"]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result")
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        mp.start_processes(_worker, args=(world, _free_port(), spec, out), nprocs=world, join=True,
                           start_method="spawn")
        wall = time.perf_counter() - t0
        results = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
    for r in results:
        r["wall_seconds"] = wall
        r["matmul_peak_flops"] = peak_now
        r["matmul_peak_measured_before_run"] = True
        r["loadavg_start"], r["loadavg_end"] = list(load0), list(os.getloadavg())
    return results


def summarize(runs: List[Dict[str, Any]], args: argparse.Namespace, peak: Dict[str, float],
              machine_start: Dict[str, Any], load_end: List[float]) -> Dict[str, Any]:
    """Medians over rounds, ratios, MFU and memory goals."""
    by: Dict[str, Dict[int, List[List[Dict[str, Any]]]]] = {}
    for run in runs:
        by.setdefault(run["variant"], {}).setdefault(run["world_size"], []).append(run["ranks"])
    details: Dict[str, Any] = {}
    flops = {v: count_model_flops(v, args.batch_size, args.click_rate) for v in by}
    for variant, per_world in by.items():
        for world, rounds in per_world.items():
            # global samples/s of a round: all ranks step together (collectives), so W * B / step time of the slowest rank
            sps = [world * args.batch_size / max(r["median_step_seconds"] for r in ranks) for ranks in rounds]
            peaks = [ranks[0].get("matmul_peak_flops") or peak["median_flops"] for ranks in rounds]
            own_peak = [bool(ranks[0].get("matmul_peak_measured_before_run")) for ranks in rounds]
            ranks_last = rounds[-1]
            per_rank = []
            for rk in range(world):
                rr = [ranks[rk] for ranks in rounds]
                state = median([x["table_bytes"] + x["sparse_optimizer_state_bytes"] for x in rr])
                model_state = median([x["table_bytes"] + x["sparse_optimizer_state_bytes"] + x["dense_bytes"]
                                      + x["dense_optimizer_state_bytes"] for x in rr])
                rss = max(x["peak_rss_bytes"] for x in rr)
                base = median([x["rss_after_import_bytes"] for x in rr])
                per_rank.append({
                    "rank": rk,
                    "peak_rss_gib": rss / 2**30,
                    "tables_plus_sparse_optimizer_gib": state / 2**30,
                    "model_and_optimizer_state_gib": model_state / 2**30,
                    "rss_after_imports_gib": base / 2**30,
                    "rss_over_tables_and_optimizer": rss / state if state else float("nan"),
                    "rss_over_model_and_optimizer_state": rss / model_state if model_state else float("nan"),
                    "rss_minus_import_baseline_over_state": (rss - base) / model_state if model_state else float("nan"),
                    "tables_on_rank": rr[-1].get("tables_on_rank"),
                    "split_seconds_per_step": {p: median([x["split_seconds_per_step"][p] for x in rr]) for p in PHASES},
                    "median_step_seconds": median([x["median_step_seconds"] for x in rr]),
                })
            f = flops.get(variant)
            details[f"{variant}@{world}"] = {
                "variant": variant, "world_size": world,
                "samples_per_s": median(sps), "samples_per_s_rounds": sps,
                "model_flops_per_sample": f,
                "model_flops_per_s": median(sps) * f if f else None,
                # per round: model FLOP/s over (matmul peak measured just before that run x ranks)
                "mfu": median([x * f / (pk * world) for x, pk, own in zip(sps, peaks, own_peak) if own or not any(own_peak)])
                if f else None,
                "matmul_peak_flops_rounds": peaks,
                "per_rank": per_rank,
                "sharding": ranks_last[0].get("sharding"),
                "retrieval_rows_per_step": ranks_last[0]["retrieval_rows"],
                "loadavg_rounds": [[ranks[0]["loadavg_start"], ranks[0]["loadavg_end"]] for ranks in rounds],
                "build_seconds": median([ranks[0]["build_seconds"] for ranks in rounds]),
            }

    def sps(v: str, w: int) -> float:
        return details.get(f"{v}@{w}", {}).get("samples_per_s", float("nan"))

    top_w = max(args.world_sizes)
    dig_vs_rank = sps("dig", top_w) / sps("rank_only", top_w)
    trec_vs_plain = sps("dig", top_w) / sps("plain", top_w)
    def mfu_at(w: int) -> float:
        return details.get(f"dig@{w}", {}).get("mfu") or float("nan")

    mfu = mfu_at(top_w)
    rss_ok = {k: all(r["rss_over_tables_and_optimizer"] <= 1.5 for r in d["per_rank"]) for k, d in details.items()}
    return {
        "dig_vs_rank_only": dig_vs_rank,
        "torchrec_vs_plain_pytorch": trec_vs_plain,
        "mfu": mfu,
        "goals": {
            "dig_vs_rank_only>=0.5": dig_vs_rank >= 0.5,
            "torchrec_vs_plain_pytorch>=1.2": trec_vs_plain >= 1.2,
            "peak_rss_per_rank<=1.5x(tables+optimizer)": rss_ok,
        },
        "ratios_by_world_size": {
            str(w): {"dig_vs_rank_only": sps("dig", w) / sps("rank_only", w),
                     "torchrec_vs_plain_pytorch": sps("dig", w) / sps("plain", w),
                     "rank_only_torchrec_vs_plain_pytorch": sps("rank_only", w) / sps("plain_rank_only", w),
                     "mfu": mfu_at(w)}
            for w in args.world_sizes
        },
        "samples_per_s": {k: d["samples_per_s"] for k, d in details.items()},
        "details": details,
        "setup": {
            "tables": {"user_id_rows": args.users, "item_id_rows": args.items, "embedding_dim": 64,
                       "sid_rows": 4 * 256, "dtype": "float32"},
            "batch_size_per_rank": args.batch_size, "timed_steps": args.steps, "warmup_steps": args.warmup,
            "profile_steps": args.profile_steps, "rounds": args.rounds, "threads_per_rank": args.threads_per_rank,
            "torchrec_sparse_optimizer": args.sparse_optimizer, "plain_sparse_optimizer": "torch.optim.SGD (sparse grads)",
            "dense_optimizer": "Adam (both)",
            "batches": f"synthetic, in memory: {args.pool} pre-made batches of random ids in range cycled per rank",
            "plain_reference": "same dense modules; nn.EmbeddingBag(sparse=True) per table; DDP over the whole "
                               "model on 2 ranks (full table replicas, sparse all-reduce)",
            "samples": "exposure rows (B per rank per step); DIG additionally trains on the real (clicked) "
                       "retrieval slots of R = P x (1 + negatives) rows per step",
            "click_rate": args.click_rate,
            "positive_slots_per_step": auto_positive_slots(args.click_rate, args.batch_size),
            "mfu": "model FLOP/s (fwd+bwd matmul FLOPs per exposure sample from FlopCounterMode x samples/s) / "
                   "(median fp32 matmul FLOP/s of a 2048^3 product with one rank's threads, measured right "
                   "before the run, x ranks); median over the rounds that measured such a peak",
            "rss_goal": "peak RSS of each rank <= 1.5 x (its table shards + sparse optimizer state)",
        },
        "matmul_peak": peak,
        "machine": machine_start,
        "loadavg_end": load_end,
    }


def plot(summary: Dict[str, Any], path: Path) -> None:
    """Bars: samples/s per variant and world size; stacked per-step split on the side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = summary["details"]
    worlds = sorted({v["world_size"] for v in d.values()})
    variants = [v for v in VARIANTS if any(f"{v}@{w}" in d for w in worlds)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ys = [d.get(f"{v}@{w}", {}).get("samples_per_s", 0) for w in worlds]
        ax1.bar([w + (i - (len(variants) - 1) / 2) * width for w in worlds], ys, width, label=v)
    ax1.set_yscale("log")
    ax1.set_xticks(worlds)
    ax1.set_xlabel("local ranks (gloo, CPU)")
    ax1.set_ylabel("samples/s (exposure rows, all ranks)")
    ax1.set_title("training throughput, industrial_large tables")
    ax1.legend(fontsize=8, loc="lower right")
    keys = [k for k in d]
    bottom = [0.0] * len(keys)
    for p in PHASES:
        vals = [d[k]["per_rank"][0]["split_seconds_per_step"][p] for k in keys]
        ax2.bar(range(len(keys)), vals, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_xticks(range(len(keys)))
    ax2.set_xticklabels(keys, rotation=30)
    ax2.set_ylabel("seconds per step (rank 0, profiler)")
    ax2.set_title("per-step split")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=20_000_000)
    p.add_argument("--items", type=int, default=500_000)
    p.add_argument("--batch-size", type=int, default=256, help="exposure rows per rank and step")
    p.add_argument("--steps", type=int, default=15, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every run")
    p.add_argument("--pool", type=int, default=8, help="distinct synthetic batches per rank")
    p.add_argument("--click-rate", type=float, default=0.1077,
                   help="exposure click rate of the synthetic batches (default: the train click rate of "
                        "`dig data synth --preset industrial_large`, from `dig data stats`); sets the reader's "
                        "auto retrieval slots P = ceil(2 x rate x B) and how many of them are real")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="intra-op threads per rank (1: on a shared 2-core machine OpenMP spin-waits collapse "
                        "multi-threaded steps whenever another process holds a core)")
    p.add_argument("--sparse-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "sgd"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: rank r on cuda:r with NCCL (GPU hosts; the MFU peak is still the CPU matmul's)")
    p.add_argument("--out", default=str(RESULTS_DIR / "train_throughput.json"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--memory-wait-s", type=float, default=900, help="wait this long for free RAM before a run")
    p.add_argument("--reuse", help="add the raw runs of an earlier result JSON (e.g. to add variants later)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)

    machine = machine_info()
    logger.info("machine: %s, %s cpus, %.1f GiB, load %s", machine["cpu"], machine["usable_cpus"], machine["ram_gib"],
                machine["loadavg_1_5_15"])
    peak = matmul_peak_flops(threads=args.threads_per_rank)
    logger.info("fp32 matmul peak: %.1f GFLOP/s per rank (%d thread(s))", peak["median_flops"] / 1e9,
                args.threads_per_rank)
    runs: List[Dict[str, Any]] = []
    reused: Dict[str, Any] = {}
    if args.reuse:
        reused = json.loads(Path(args.reuse).read_text())
        for r in reused["raw_runs"]:
            r["invocation"] = r.get("invocation", 0)
            for rk in r["ranks"]:  # runs made before per-run peaks: that invocation's start peak (not used for MFU)
                if "matmul_peak_flops" not in rk:
                    rk["matmul_peak_flops"] = reused["matmul_peak"]["median_flops"]
                    rk["matmul_peak_measured_before_run"] = False
        runs.extend(reused["raw_runs"])
        logger.info("reusing %d runs from %s", len(runs), args.reuse)
    invocation = 1 + max((r["invocation"] for r in runs), default=-1)
    for rnd in range(args.rounds):
        order = list(args.variants) if (rnd + invocation) % 2 == 0 else list(reversed(args.variants))
        for world in args.world_sizes:
            for variant in order:
                need = memory_needed_bytes(variant, world, args)
                if not wait_for_memory(need, args.memory_wait_s):
                    logger.warning("round %d %s x%d skipped: %.1f GiB RAM not available", rnd, variant, world,
                                   need / 2**30)
                    continue
                t0 = time.perf_counter()
                ranks = run_once(variant, world, args)
                step = max(r["median_step_seconds"] for r in ranks)
                logger.info("round %d %-9s x%d: %.1f samples/s (step %.2fs), peak RSS %s GiB, load %.1f->%.1f, %.0fs",
                            rnd, variant, world, world * args.batch_size / step, step,
                            [round(r["peak_rss_bytes"] / 2**30, 2) for r in ranks], ranks[0]["loadavg_start"][0],
                            ranks[0]["loadavg_end"][0], time.perf_counter() - t0)
                runs.append({"variant": variant, "world_size": world, "round": rnd, "invocation": invocation,
                             "ranks": ranks})
                write_json({"partial": True, "runs": runs}, args.out + ".partial")
    if reused:  # one summary over both invocations: world sizes and variants of either
        args.world_sizes = sorted({r["world_size"] for r in runs})
        args.variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    summary = summarize(runs, args, peak, machine, list(os.getloadavg()))
    if reused:
        summary["earlier_invocation"] = {"machine": reused.get("machine"), "matmul_peak": reused.get("matmul_peak"),
                                         "loadavg_end": reused.get("loadavg_end")}
    summary["raw_runs"] = runs
    write_json(summary, args.out)
    Path(args.out + ".partial").unlink(missing_ok=True)
    if not args.no_plot:
        plot(summary, Path(args.out).with_suffix(".png"))
    logger.info("dig_vs_rank_only=%.3f torchrec_vs_plain_pytorch=%.3f mfu=%.4f -> %s", summary["dig_vs_rank_only"],
                summary["torchrec_vs_plain_pytorch"], summary["mfu"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
