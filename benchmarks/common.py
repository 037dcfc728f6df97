"""Shared pieces of the benchmark scripts.

* :func:`machine_info` -- what the numbers were measured on (CPU, cores, RAM, versions, load).
* :func:`industrial_meta` -- an in-memory :class:`DatasetMeta` with the industrial_large
  preset's cardinalities (20M users, 500K items), so a benchmark can build full-size
  tables without a 7.5M-row dataset on disk.
* :class:`SyntheticBatches` -- :class:`DIGBatch` es of random ids in range, made in memory.
* :class:`PlainEmbeddingBagCollection` / :func:`make_plain` -- the plain-PyTorch reference:
  the same dense modules, with one ``torch.nn.EmbeddingBag`` per table instead of TorchRec.
* :func:`model_flops_per_sample`, :func:`matmul_peak_flops` -- for MFU.
* :func:`median`, :func:`write_json` -- result helpers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dig_torchrec.config import DIGConfig
from dig_torchrec.data.batch import DIGBatch, make_kjt
from dig_torchrec.data.schema import DatasetMeta, FeatureSchema
from dig_torchrec.model import DIGModel

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> Dict[str, Any]:
    """CPU, cores, RAM, library versions and the current load average."""
    import importlib.metadata as md

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(_mem_total_gib(), 2),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": _git_commit(),
        "loadavg_1_5_15": list(os.getloadavg()),
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss`` is KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(statistics.median(xs)) if xs else float("nan")


# JSON with NaN/inf as null, written via a temp file: the same writer `dig eval` uses.
from dig_torchrec.retrieval.evaluate import write_json  # noqa: E402,F401


# ---------------------------------------------------------------------- data
def industrial_meta(num_users: int = 20_000_000, num_items: int = 500_000, *, num_cities: int = 1000,
                    num_categories: int = 1000, num_brands: int = 20_000, history_length: int = 20) -> DatasetMeta:
    """Dataset metadata with the ``industrial_large`` synthetic preset's tables (by default).

    Args:
        num_users: rows of the ``user_id`` table.
        num_items: rows of the ``item_id`` table (the catalog).
        num_cities: user feature ``city`` cardinality.
        num_categories: item feature ``category`` cardinality.
        num_brands: item feature ``brand`` cardinality.
        history_length: stored history length.
    """
    from dig_torchrec.data.synthetic import CONTEXT_FEATURES, U2I_FIELDS, U2I_STATS

    return DatasetMeta(
        name=f"bench_{num_users}u_{num_items}i", num_users=num_users, num_items=num_items,
        user_features={"age_bucket": 7, "gender": 3, "city": num_cities},
        context_features=dict(CONTEXT_FEATURES),
        item_features={"category": num_categories, "brand": num_brands, "price_bucket": 10},
        u2i_dim=len(U2I_FIELDS) * len(U2I_STATS), history_length=history_length,
        u2i_fields=list(U2I_FIELDS), u2i_stats=list(U2I_STATS), extra={"source": "benchmark (in memory)"},
    )


def auto_positive_slots(click_rate: float, batch_size: int) -> int:
    """The reader's ``data.retrieval_positives=0`` rule (:func:`~dig_torchrec.data.sampling.retrieval_positives_for`)
    for a click rate given as a number: the rate is taken as clicks per 10^6 rows."""
    from dig_torchrec.data.sampling import retrieval_positives_for

    scale = 10**6
    return retrieval_positives_for(round(click_rate * scale), scale, batch_size)


class SyntheticBatches:
    """An endless cycle over ``pool`` pre-made :class:`DIGBatch` es of random ids in range.

    Each batch is shaped like one of :class:`~dig_torchrec.data.reader.ExposureReader`'s:
    B exposure rows with labels ~ Bernoulli(``click_rate``), then ``positive_slots`` P
    retrieval slots of ``1 + negatives`` rows each (the click, then its negatives). The
    batch's clicks fill the slots in order; slots left over are weight-0 padding (the
    model skips them) and clicks beyond P are dropped, as in the reader. History bags hold
    0 or 1 ids (80% filled) and u2i is random. Making the batches up front keeps batch
    generation out of the timed steps: the benchmark measures training, not a reader.

    Args:
        schema: feature layout.
        batch_size: B.
        positive_slots: P (0: no retrieval rows, e.g. for the rank-only model).
        u2i_dim: d_c.
        pool: distinct batches to cycle through.
        seed: RNG seed (use a different one per rank).
        negatives: negatives per retrieval slot.
        click_rate: Bernoulli rate of the exposure labels.
    """

    def __init__(self, schema: FeatureSchema, batch_size: int, positive_slots: int, u2i_dim: int, *,
                 pool: int = 8, seed: int = 0, negatives: int = 4, click_rate: float = 0.1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = [self._make(schema, batch_size, positive_slots, u2i_dim, negatives, click_rate, g)
                        for _ in range(pool)]
        self._i = 0

    @staticmethod
    def _make(schema: FeatureSchema, B: int, P: int, d_c: int, negatives: int, click_rate: float,
              g: torch.Generator) -> DIGBatch:
        R = P * (1 + negatives)
        rows = B + R
        values, lengths = [], []
        for key in schema.keys:
            card = schema.cardinality[schema.table_for_key(key)]
            if key.startswith("hist_"):
                ln = (torch.rand(rows, generator=g) < 0.8).to(torch.int32)
            else:
                ln = torch.ones(rows, dtype=torch.int32)
            values.append(torch.randint(0, card, (int(ln.sum()),), generator=g))
            lengths.append(ln)
        labels = (torch.rand(B, generator=g) < click_rate).float()
        filled = min(int(labels.sum()), P)
        slot_weight = (torch.arange(P) < filled).float()
        return DIGBatch(
            sparse_features=make_kjt(schema.keys, values, lengths),
            u2i=torch.randn(B, d_c, generator=g),
            labels=labels,
            weights=torch.ones(B),
            retrieval_u2i=torch.randn(R, d_c, generator=g),
            retrieval_labels=(torch.arange(R) % (1 + negatives) == 0).float(),
            retrieval_weights=slot_weight.repeat_interleave(1 + negatives),
        )

    def __iter__(self) -> Iterator[DIGBatch]:
        return self

    def __next__(self) -> DIGBatch:
        b = self.batches[self._i % len(self.batches)]
        self._i += 1
        return b


# ---------------------------------------------------------------------- plain-PyTorch reference
class PooledFeatures:
    """What :class:`PlainEmbeddingBagCollection` returns: ``to_dict()`` like a KeyedTensor."""

    def __init__(self, features: Dict[str, torch.Tensor]) -> None:
        self._features = features

    def to_dict(self) -> Dict[str, torch.Tensor]:
        return self._features


class PlainEmbeddingBagCollection(nn.Module):
    """One ``torch.nn.EmbeddingBag(mode="sum")`` per table, one lookup per table per call.

    The input is read as raw tensors (keys, values, per-key lengths); all features of a
    table (``item_id`` and ``hist_0..hist_{H-1}``) go through that table in ONE
    ``EmbeddingBag`` call, which is how one would batch lookups without TorchRec.

    Args:
        tables: ``(name, num_embeddings, embedding_dim, feature_names)`` per table.
        sparse: sparse gradients (needed for SGD/SparseAdam on huge tables).
        device: parameter device.
    """

    def __init__(self, tables: Sequence[Tuple[str, int, int, Sequence[str]]], sparse: bool = True,
                 device: Optional[torch.device | str] = None) -> None:
        super().__init__()
        self.embedding_bags = nn.ModuleDict({
            name: nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse, device=device) for name, rows, dim, _ in tables
        })
        self.table_features = {name: list(features) for name, _, _, features in tables}

    @classmethod
    def like(cls, ebc: nn.Module, sparse: bool = True, device: Optional[torch.device | str] = None,
             copy_weights: bool = False) -> "PlainEmbeddingBagCollection":
        """Same tables as the TorchRec ``EmbeddingBagCollection`` ``ebc`` (optionally its weights)."""
        tables = [(c.name, c.num_embeddings, c.embedding_dim, c.feature_names) for c in ebc.embedding_bag_configs()]
        plain = cls(tables, sparse=sparse, device=device)
        if copy_weights:
            with torch.no_grad():
                for name, bag in plain.embedding_bags.items():
                    bag.weight.copy_(ebc.embedding_bags[name].weight)
        return plain

    def forward(self, kjt: Any) -> PooledFeatures:
        keys: List[str] = list(kjt.keys())
        S = kjt.stride()
        lengths = kjt.lengths().view(len(keys), S)
        per_key = kjt.length_per_key()
        values = torch.split(kjt.values(), per_key)
        pos = {k: i for i, k in enumerate(keys)}
        out: Dict[str, torch.Tensor] = {}
        for name, features in self.table_features.items():
            present = [f for f in features if f in pos]
            if not present:
                continue
            idx = [pos[f] for f in present]
            flat_len = lengths[idx].reshape(-1)
            offsets = torch.zeros(flat_len.numel(), dtype=torch.long, device=flat_len.device)
            offsets[1:] = torch.cumsum(flat_len, 0)[:-1]
            vals = torch.cat([values[i] for i in idx]) if len(idx) > 1 else values[idx[0]]
            pooled = self.embedding_bags[name](vals, offsets)  # [len(present) * S, d]
            for j, f in enumerate(present):
                out[f] = pooled[j * S:(j + 1) * S]
        return PooledFeatures(out)


def make_plain(model: DIGModel, copy_weights: bool = False, sparse: bool = True) -> DIGModel:
    """Swap ``model``'s two TorchRec EmbeddingBagCollections for plain ones (in place).

    Args:
        model: a DIG (or rank-only) model on CPU or ``meta``.
        copy_weights: copy the TorchRec tables' weights (CPU models only).
        sparse: sparse embedding gradients.
    """
    device = next(model.embedding_bags.parameters()).device
    model.embedding_bags = PlainEmbeddingBagCollection.like(model.embedding_bags, sparse, device, copy_weights)
    if not model.rank_only:  # a rank-only model has no SID tables
        model.sid_embedding_bags = PlainEmbeddingBagCollection.like(model.sid_embedding_bags, sparse, device,
                                                                    copy_weights)
    return model


@torch.no_grad()
def materialize(module: nn.Module, device: str = "cpu") -> nn.Module:
    """Allocate a ``meta`` module on ``device`` and run every ``reset_parameters`` (as DMP does)."""
    module.to_empty(device=device)
    for buf in module.buffers():
        buf.zero_()

    def reset(m: nn.Module) -> None:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()

    module.apply(reset)
    return module


def embedding_parameter_names(model: nn.Module) -> List[str]:
    """Names of the plain tables' weights (``...embedding_bags.<table>.weight``)."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.EmbeddingBag)]


# ---------------------------------------------------------------------- FLOPs
def model_flops_per_sample(model: nn.Module, batch: DIGBatch) -> float:
    """fwd + bwd FLOPs of one training step on ``batch`` divided by its exposure rows.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul/bmm/addmm/conv and
    attention; embedding lookups and element-wise ops count 0, so this is the usual
    "model FLOPs" of MFU).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.batch_size


def matmul_peak_flops(n: int = 2048, seconds: float = 3.0, threads: Optional[int] = None) -> Dict[str, float]:
    """Measured fp32 matmul FLOP/s on this machine (median of repeated ``n x n`` products).

    Args:
        n: matrix size.
        seconds: measuring time budget.
        threads: torch intra-op threads to use (default: current setting).
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        rates = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(rates) < 3:
            t0 = time.perf_counter()
            a @ b
            rates.append(2 * n**3 / (time.perf_counter() - t0))
        return {"median_flops": median(rates), "max_flops": max(rates), "n": n, "threads": torch.get_num_threads(),
                "repeats": len(rates)}
    finally:
        torch.set_num_threads(old)


def dig_config_for_bench(batch_size: int, *, sparse_optimizer: str = "rowwise_adagrad", embedding_dim: int = 64,
                         num_layers: int = 4, num_codes: int = 256) -> DIGConfig:
    """The ``configs/industrial_large.yaml`` model (d=64, L=4, K=256) with the given batch size."""
    from dig_torchrec.config import load_config

    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "industrial_large.yaml"
    cfg = load_config(cfg_path, [f"data.batch_size={batch_size}", f"train.sparse_optimizer={sparse_optimizer}",
                                 f"model.embedding_dim={embedding_dim}", f"tokenizer.num_layers={num_layers}",
                                 f"tokenizer.num_codes={num_codes}"])
    return cfg


@torch.no_grad()
def init_tokenizer_randomly(model: DIGModel, seed: int = 0) -> None:
    """Mark the tokenizer initialised with random codebooks and SIDs (same on every rank).

    The balanced k-means init over a 500K-item catalog takes minutes and does not change a
    training step's cost; after it the step runs the EMA codebook update and SID-table
    refresh, which is what this enables.

    Args:
        model: the DIG module (unwrapped from DMP/DDP).
        seed: RNG seed (use the same on every rank).
    """
    tok = model.tokenizer
    g = torch.Generator().manual_seed(seed)
    L, K, D = tok.quantizer.codebooks.shape
    codebooks = torch.randn(L, K, D, generator=g) / (2.0 ** torch.arange(L)).view(L, 1, 1)
    sids = torch.randint(0, K, tuple(tok.item_sid_table.shape), generator=g)
    tok.quantizer.load_initial_codebooks(codebooks.to(tok.quantizer.codebooks.device), sids)
    tok.item_sid_table.copy_(sids)
    tok.initialized.fill_(1)
