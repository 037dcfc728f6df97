"""Training and validation metrics, aggregated across ranks.

* rank AUC (exposure rows, Eq. 6 logits) and recall AUC per SID layer l = 1..L (Eq. 7
  logits) from binned score histograms (:class:`BinnedAUC`), so the cross-rank sync is one
  all-reduce and memory stays constant however long the window;
* every loss term of Eq. 8 (``total, rank, recall, commit, sem, u2t``), averaged over the
  window and the ranks;
* tokenizer health from the model (per-layer codebook utilization and perplexity,
  dead-code restarts, collision rate);
* throughput: exposure rows per second over all ranks.

Every ``compute`` is a collective call: all ranks must call it at the same step.
Output goes to the console (rank 0, with a tqdm bar), TensorBoard (``run_dir/tensorboard``)
and ``run_dir/metrics.jsonl`` (one JSON record per log/validation event).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from dig_torchrec.distributed.env import collective_device

logger = logging.getLogger(__name__)

AUC_THRESHOLDS = 4096  # histogram bins of each AUC (score resolution 2.4e-4)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = t.to(collective_device())
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu()
    return t


def flatten_metric(name: str, value: Any) -> Dict[str, float]:
    """``{"utilization": tensor([a, b, c])}`` -> ``utilization_l1, _l2, _l3`` (layers 1-based)."""
    if isinstance(value, torch.Tensor):
        v = value.detach().float().cpu().reshape(-1)
        if v.numel() == 1:
            return {name: float(v[0])}
        return {f"{name}_l{i + 1}": float(x) for i, x in enumerate(v)}
    if isinstance(value, (int, float)):
        return {name: float(value)}
    if isinstance(value, (list, tuple)):
        return {f"{name}_l{i + 1}": float(x) for i, x in enumerate(value)}
    return {}


class BinnedAUC:
    """ROC AUC from per-bin positive/negative counts of sigmoid scores (Mann-Whitney with bins).

    Same statistic as torchmetrics' binned ``BinaryAUROC``; written here because its update
    materialises an ``[N, thresholds]`` tensor under ``torch.use_deterministic_algorithms``
    (``train.deterministic=true``), while one ``index_add_`` histogram stays O(bins).

    The histogram lives on the scores' device and :meth:`update` never syncs the host:
    masked and non-finite rows are weighted 0 instead of being filtered out (boolean
    indexing would be a data-dependent shape, i.e. a sync on CUDA). Counts are integers in
    float64, so the sum is exact in any order.

    Args:
        bins: histogram bins over [0, 1].
    """

    def __init__(self, bins: int = AUC_THRESHOLDS) -> None:
        self.bins = bins
        self.counts = torch.zeros(2, bins, dtype=torch.float64)  # row 0: negatives, row 1: positives

    def update(self, scores: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add rows: ``scores`` in [0, 1], ``labels`` in {0, 1}; ``mask`` (bool) selects rows (default all)."""
        scores, labels = scores.detach(), labels.detach()
        if self.counts.device != scores.device:
            self.counts = self.counts.to(scores.device)
        keep = torch.isfinite(scores)  # a skipped (NaN) step must not poison the window
        if mask is not None:
            keep = keep & mask.to(keep.device)
        idx = (torch.nan_to_num(scores.double(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
               * (self.bins - 1)).round().long()
        lab = (labels.to(scores.device) > 0.5).long()
        self.counts.view(-1).index_add_(0, (lab * self.bins + idx).reshape(-1), keep.reshape(-1).to(torch.float64))

    def reset(self) -> None:
        self.counts.zero_()


def auc_from_counts(counts: torch.Tensor) -> float:
    """AUC from ``[2, bins]`` (negative, positive) histograms; NaN when a class is missing."""
    neg, pos = counts[0].double(), counts[1].double()
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if n_neg <= 0 or n_pos <= 0:
        return float("nan")
    neg_below = torch.cumsum(neg, 0) - neg  # negatives in strictly lower bins
    wins = (pos * (neg_below + 0.5 * neg)).sum()  # ties inside a bin count half
    return float(wins / (n_pos * n_neg))


class AUCSet:
    """Rank AUC plus one recall AUC per SID layer, over masked (weight > 0) rows.

    Args:
        num_layers: L, the number of SID layers.
        bins: histogram bins of each AUC.
    """

    def __init__(self, num_layers: int, bins: int = AUC_THRESHOLDS) -> None:
        self.num_layers = num_layers
        self.rank_auc = BinnedAUC(bins)
        self.recall_auc = [BinnedAUC(bins) for _ in range(num_layers)]

    def _metrics(self) -> List[BinnedAUC]:
        return [self.rank_auc, *self.recall_auc]

    def update(self, output: Any) -> None:
        """Add one step's logits/labels from a ``DIGOutput``."""
        logits = getattr(output, "rank_logits", None)
        if logits is not None and logits.numel():
            self.rank_auc.update(torch.sigmoid(logits.float()), output.labels, output.weights > 0)
        rec = getattr(output, "recall_logits", None)
        if rec is not None and rec.numel():
            mask = output.recall_weights > 0
            for layer in range(min(self.num_layers, rec.shape[0])):
                self.recall_auc[layer].update(torch.sigmoid(rec[layer].float()), output.recall_labels, mask)

    def compute(self) -> Dict[str, float]:
        """Cross-rank AUCs (collective: one all-reduce of the histograms). NaN when a window saw one class."""
        states = all_reduce_sum(torch.stack([m.counts.to(self.rank_auc.counts.device) for m in self._metrics()]))
        names = ["rank_auc", *[f"recall_auc_l{l + 1}" for l in range(self.num_layers)]]
        return {name: auc_from_counts(counts) for name, counts in zip(names, states)}

    def reset(self) -> None:
        for m in self._metrics():
            m.reset()


class MeanSet:
    """Running means of named scalars (loss terms, tokenizer stats), averaged across ranks."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}

    def update(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def compute(self, keys: Iterable[str]) -> Dict[str, float]:
        """Means over the window and the ranks (collective; every rank passes the same keys)."""
        keys = list(keys)
        if not keys:
            return {}
        t = torch.tensor([[self.sums.get(k, 0.0), float(self.counts.get(k, 0))] for k in keys], dtype=torch.float64)
        t = all_reduce_sum(t)
        return {k: (float(s / c) if c > 0 else float("nan")) for k, (s, c) in zip(keys, t.tolist())}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def output_scalars(output: Any) -> Dict[str, float]:
    """Loss terms (``loss/<term>``) and tokenizer stats (``tokenizer/<name>[_l<layer>]``) of one step."""
    out: Dict[str, float] = {}
    for name, value in (getattr(output, "losses", None) or {}).items():
        out.update(flatten_metric(f"loss/{name}", value))
    for name, value in (getattr(output, "tokenizer_metrics", None) or {}).items():
        out.update(flatten_metric(f"tokenizer/{name}", value))
    return out


def _scalar_tensors(name: str, value: Any) -> Dict[str, torch.Tensor]:
    """:func:`flatten_metric` without leaving the device: ``{name[_l<i>]: 0-dim tensor}``."""
    if isinstance(value, torch.Tensor):
        v = value.detach().reshape(-1)
        if v.numel() == 1:
            return {name: v[0]}
        return {f"{name}_l{i + 1}": v[i] for i in range(v.numel())}
    if isinstance(value, (int, float)):
        return {name: torch.tensor(float(value), device="cpu")}
    if isinstance(value, (list, tuple)):
        return {f"{name}_l{i + 1}": torch.tensor(float(x), device="cpu") for i, x in enumerate(value)}
    return {}


def output_scalar_tensors(output: Any) -> Dict[str, torch.Tensor]:
    """:func:`output_scalars` as 0-dim tensors on their device (no host sync)."""
    out: Dict[str, torch.Tensor] = {}
    for name, value in (getattr(output, "losses", None) or {}).items():
        out.update(_scalar_tensors(f"loss/{name}", value))
    for name, value in (getattr(output, "tokenizer_metrics", None) or {}).items():
        out.update(_scalar_tensors(f"tokenizer/{name}", value))
    return out


class TrainMetrics:
    """Windowed training metrics: AUCs, loss terms, tokenizer stats, samples/s.

    Args:
        num_layers: L.
        scalar_keys: every scalar name the model reports (the same list on all ranks, so
            the all-reduce lines up); grown from the first output when None.
    """

    def __init__(self, num_layers: int, scalar_keys: Optional[List[str]] = None) -> None:
        self.aucs = AUCSet(num_layers)
        self.scalar_keys: List[str] = list(scalar_keys or [])
        # per set of scalar names: (sums, finite counts) as float64 vectors on the step's device
        self._acc: Dict[Tuple[str, ...], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: Optional[torch.Tensor] = None
        self.steps = 0
        self._t0 = time.perf_counter()

    @property
    def rows(self) -> int:
        """Real exposure rows in the window on this rank (reads the device counter: a sync)."""
        return int(self._rows.item()) if self._rows is not None else 0

    def update(self, output: Any) -> None:
        """Add one step's output without a host sync: everything is accumulated on the device."""
        scalars = output_scalar_tensors(output)
        keys = tuple(scalars)
        if keys:
            ref = getattr(output, "weights", None)
            dev = ref.device if isinstance(ref, torch.Tensor) else next(iter(scalars.values())).device
            vec = torch.stack([v.to(dev, torch.float64) for v in scalars.values()])
            finite = torch.isfinite(vec)  # NaN values (a skipped step) are not averaged in
            vec = torch.where(finite, vec, torch.zeros_like(vec))
            if keys in self._acc:
                sums, counts = self._acc[keys]
                sums.add_(vec)
                counts.add_(finite.to(torch.float64))
            else:
                self._acc[keys] = (vec, finite.to(torch.float64))
        self.aucs.update(output)
        w = getattr(output, "weights", None)
        if w is not None:
            n = (w > 0).sum()
            self._rows = n if self._rows is None else self._rows + n
        self.steps += 1

    def _window_means(self) -> Dict[str, Tuple[float, float]]:
        """name -> (sum, count) of this rank's window (one host copy per set of names)."""
        out: Dict[str, Tuple[float, float]] = {}
        for keys, (sums, counts) in self._acc.items():
            for k, s_, c in zip(keys, sums.cpu().tolist(), counts.cpu().tolist()):
                ps, pc = out.get(k, (0.0, 0.0))
                out[k] = (ps + s_, pc + c)
        return out

    def compute(self, extra: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
        """Window results (collective) and reset the window.

        Args:
            extra: more per-rank scalars to average over ranks (same names on every rank),
                e.g. values read only at log steps.
        """
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        out = {f"train/{k}": v for k, v in self.aucs.compute().items()}
        local = self._window_means()
        for k, v in (extra or {}).items():
            local[k] = (float(v), 1.0)
        # every rank sees the same keys at the same step (the model's structure is the same),
        # so the sorted union lines up in the all-reduce
        self.scalar_keys = sorted(set(self.scalar_keys) | set(local))
        rows = float(self._rows.item()) if self._rows is not None else 0.0
        t = torch.tensor([[*local.get(k, (0.0, 0.0))] for k in self.scalar_keys] + [[rows, 0.0]], dtype=torch.float64)
        t = all_reduce_sum(t)
        for k, (s_, c) in zip(self.scalar_keys, t[:-1].tolist()):
            out[f"train/{k}"] = float(s_ / c) if c > 0 else float("nan")
        out["perf/samples_per_s"] = float(t[-1, 0]) / elapsed
        out["perf/steps_per_s"] = self.steps / elapsed
        self.aucs.reset()
        self._acc.clear()
        self._rows = None
        self.steps = 0
        self._t0 = time.perf_counter()
        return out


class MetricsLogger:
    """Where metrics go: console (logging), TensorBoard and ``metrics.jsonl``, on rank 0 only.

    Args:
        run_dir: the run directory.
        enabled: True on rank 0.
        tensorboard: also write TensorBoard event files under ``run_dir/tensorboard``.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._writer = None
        self._jsonl = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
            if tensorboard:
                try:  # optional: TensorBoard may be missing or broken; training goes on without it
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
                except Exception as e:  # tensorboard missing or broken: keep training, log why
                    logger.warning("TensorBoard disabled: %s", e)

    def log(self, step: int, values: Mapping[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        if self._writer is not None:
            for k, v in values.items():
                if v is not None and not math.isnan(v):
                    self._writer.add_scalar(k, v, step)
            self._writer.flush()
        if self._jsonl is not None:
            rec = {"kind": kind, "step": step, **{k: (None if v is None or math.isnan(v) else v) for k, v in values.items()}}
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()
        binned = " (AUCs binned, %d bins)" % AUC_THRESHOLDS if any(k.endswith("auc") for k in values) else ""
        logger.info("%s step %d%s: %s", kind, step, binned, format_metrics(values))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def format_metrics(values: Mapping[str, float], keys: Optional[Iterable[str]] = None) -> str:
    """A compact one-line summary: the headline metrics first."""
    order = list(keys) if keys is not None else sorted(values, key=lambda k: (not k.endswith("auc"), "loss/total" not in k, k))
    parts = []
    for k in order:
        v = values.get(k)
        if v is None:
            continue
        short = k.split("/", 1)[-1]
        parts.append(f"{short}={v:.4g}" if not math.isnan(v) else f"{short}=nan")
    return " ".join(parts)


def read_metrics(run_dir: str | Path, kind: Optional[str] = None) -> List[Dict[str, Any]]:
    """Records of ``run_dir/metrics.jsonl`` (optionally only one kind: train | valid)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in recs if kind is None or r.get("kind") == kind]
