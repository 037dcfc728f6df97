"""Evaluation of a trained DIG checkpoint: the paper's §4 metrics over the full corpus.

One loader (:func:`load_inference_bundle`) turns a training checkpoint or an export bundle
into a model in eval mode plus everything retrieval needs (dataset schema, item table,
SID index). :func:`retrieve_topn` runs any retrieval mode for a set of target rows, user
batch by user batch, doing the user-side work (e_u, history) once per batch;
:func:`evaluate` computes

* Recall@K / NDCG@K of beam search (Eq. 16), the unified path (beam top-N reranked by the
  rank path, Eq. 17, with u2i from the target row's ``user_state``), exhaustive leaf search,
  full-corpus ranking and the popularity baseline;
* beam fidelity@10 (beam top-10 vs exhaustive-leaf top-10);
* exact rank AUC and recall AUC (per depth; the depth-L one is Table 4's) on the split's exposures;
* the SID collision statistics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from dig_torchrec.config import DIGConfig, apply_overrides
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.reader import ExposureReader, load_targets, open_dataset
from dig_torchrec.data.schema import DatasetMeta, FeatureSchema
from dig_torchrec.data.u2i import U2IFunction
from dig_torchrec.errors import CheckpointError, DataError
from dig_torchrec.files import write_text_atomic
from dig_torchrec.eval_loop import run_eval_loop
from dig_torchrec.inference import load_for_inference, resolve_checkpoint
from dig_torchrec.retrieval import metrics as M
from dig_torchrec.retrieval.beam_search import (
    BeamResult,
    beam_search,
    exhaustive_leaf_search,
    leaves_to_items,
    rank_all_items,
)
from dig_torchrec.retrieval.sid_index import SidIndex
from dig_torchrec.retrieval.u2t_catalog import CATALOG_MODES, CatalogPrefixU2T, UserCatalogU2T
from dig_torchrec.training.checkpoint import check_dataset_fingerprint, read_config

logger = logging.getLogger(__name__)

MODES = ("beam", "unified", "exhaustive", "full", "popularity")


# ---------------------------------------------------------------------- loading
@dataclass
class InferenceBundle:
    """A model in eval mode with everything retrieval needs."""

    model: torch.nn.Module
    cfg: DIGConfig
    meta: DatasetMeta
    schema: FeatureSchema
    items: ItemTable
    index: SidIndex
    checkpoint: Path
    data_root: Path
    _item_repr: Optional[torch.Tensor] = field(default=None, repr=False)

    _catalog_u2t: Optional[CatalogPrefixU2T] = field(default=None, repr=False)
    _u2i_fn: Optional[U2IFunction] = field(default=None, repr=False)

    def u2i_fn(self) -> U2IFunction:
        """The dataset's u2i function (built once)."""
        if self._u2i_fn is None:
            self._u2i_fn = U2IFunction(self.meta, self.items.u2i_keys)
        return self._u2i_fn

    def catalog_u2t(self) -> CatalogPrefixU2T:
        """The per-prefix item shares of ``u2t.inference=catalog_mean|catalog_max`` for this index (built once)."""
        if self._catalog_u2t is None:
            self._catalog_u2t = CatalogPrefixU2T(self.index, self.u2i_fn())
        return self._catalog_u2t

    def item_representation_all(self, batch_size: int = 4096) -> torch.Tensor:
        """e_v of every item (Eq. 1), computed once and cached: ``[num_items, F*d]``."""
        if self._item_repr is None:
            self._item_repr = self.model.corpus_item_representations(self.items, batch_size)
        return self._item_repr


def load_inference_bundle(
    checkpoint: str | Path, overrides: Sequence[str] = (), *, rebuild_index: bool = False, save_index: bool = True
) -> InferenceBundle:
    """Load a training checkpoint (``run/checkpoints/step-N``) or an export bundle for
    single-process inference, open its dataset and load (or build and save) its SID index.

    Args:
        checkpoint: checkpoint or bundle directory.
        overrides: dotted config overrides applied after loading (``data.path=...``,
            ``eval.*``, ``u2t.inference=stat_mean``); the network itself is as trained.
        rebuild_index: rebuild ``CKPT/sid_index`` even if one is saved.
        save_index: write a freshly built index next to the checkpoint.
    """
    ckpt = resolve_checkpoint(checkpoint)  # a run directory -> its newest complete checkpoint
    wanted = apply_overrides(read_config(ckpt), overrides)  # bad overrides / another dataset: fail before loading
    if (Path(wanted.data.path) / "meta.json").is_file():
        check_dataset_fingerprint(ckpt, wanted.data.path)
    model, cfg, _ = load_for_inference(ckpt, require_tokenizer=True)
    cfg = apply_overrides(cfg, overrides)
    return bundle_from_model(model, cfg, ckpt, rebuild_index=rebuild_index, save_index=save_index)


def bundle_from_model(
    model: torch.nn.Module, cfg: DIGConfig, checkpoint: str | Path, *, rebuild_index: bool = False,
    save_index: bool = True,
) -> InferenceBundle:
    """Wrap an in-memory model: open ``cfg.data.path`` and load/build the SID index under
    ``checkpoint/sid_index``.

    ``cfg.data.path`` must be the checkpoint's training dataset (its recorded fingerprint,
    :func:`~dig_torchrec.training.checkpoint.check_dataset_fingerprint`); a saved SID index
    is never overwritten.

    Args:
        model: a ``DIGModel`` (put in eval mode here).
        cfg: its config (with any evaluation overrides).
        checkpoint: directory the SID index is read from / written to.
        rebuild_index: rebuild the SID index even if saved.
        save_index: write a freshly built index.
    """
    ckpt = Path(checkpoint)
    model.eval()
    root = Path(cfg.data.path)
    if not (root / "meta.json").exists():
        raise DataError(
            f"{root / 'meta.json'}: dataset of checkpoint {ckpt} not found (config key 'data.path' = "
            f"{cfg.data.path!r}; pass data.path=DIR to point at it)"
        )
    check_dataset_fingerprint(ckpt, root)
    meta, schema = open_dataset(root, cfg.data)
    items = ItemTable.load(root, schema, meta)
    index = SidIndex.load_or_build(ckpt, model, items, rebuild=rebuild_index, save=save_index)
    if index.num_items != items.num_items:
        raise CheckpointError(f"{ckpt}: SID index covers {index.num_items} items but {root} has {items.num_items}")
    return InferenceBundle(model=model, cfg=cfg, meta=meta, schema=schema, items=items, index=index,
                           checkpoint=ckpt, data_root=root)


# ---------------------------------------------------------------------- user batches
def kjt_select_rows(kjt: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
    """Rows ``rows`` of every key of ``kjt`` (torchrec's KJT has no row gather).

    Args:
        kjt: a KJT with stride S.
        rows: int64 row indices in ``[0, S)``.
    """
    keys = kjt.keys()
    S = kjt.stride()
    nk = len(keys)
    lengths = kjt.lengths().view(nk, S).long()
    offsets = kjt.offsets()[:-1].view(nk, S).long()
    sel_len = lengths[:, rows]  # [nk, R]
    sel_off = offsets[:, rows]
    flat_len = sel_len.reshape(-1)
    total = int(flat_len.sum())
    seg = torch.repeat_interleave(torch.arange(flat_len.numel()), flat_len)
    first = torch.cumsum(flat_len, 0) - flat_len
    src = sel_off.reshape(-1)[seg] + (torch.arange(total) - first[seg])
    values = kjt.values()[src]
    per_key = sel_len.sum(dim=1).tolist()
    offset_per_key = [0]
    for n in per_key:
        offset_per_key.append(offset_per_key[-1] + int(n))
    return KeyedJaggedTensor(keys=keys, values=values, lengths=flat_len.to(torch.int32), stride=int(rows.numel()),
                             length_per_key=[int(n) for n in per_key], offset_per_key=offset_per_key)


class UserBatchScorers:
    """The two scoring paths for one batch of target rows, sharing one user context.

    Args:
        bundle: the loaded model bundle.
        user_kjt: user-side KJT of the batch (``schema.user_side_keys``).
        states: user states of ALL target rows.
        state_offset: index of this batch's first row in ``states``.
        u2t_mode: u2t inference mode for the recall path.
    """

    def __init__(self, bundle: InferenceBundle, user_kjt: KeyedJaggedTensor, states: Any, state_offset: int,
                 u2t_mode: str) -> None:
        self.bundle = bundle
        self.model = bundle.model
        self.ctx = self.model.user_context(user_kjt)  # user-side work once per batch
        self.states = states
        self.state_offset = state_offset
        self.u2t_mode = u2t_mode
        self._u2i = bundle.u2i_fn()
        catalog = None
        if u2t_mode in CATALOG_MODES:
            n = self.ctx.num_users
            own = states if state_offset == 0 and len(states) == n else states.select(torch.arange(n) + state_offset)
            catalog = bundle.catalog_u2t().for_users(own, n, CATALOG_MODES[u2t_mode])
        self.recall = recall_scorer(self.model, self.ctx, u2t_mode, catalog)

    def rank(self, user_index: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Eq. 17: rank logit of ``item_ids`` with u2i recomputed from the row's user_state."""
        e_v = self.bundle.item_representation_all()[item_ids]
        u2i = self._u2i(self.states, user_index + self.state_offset, item_ids)
        return self.model.rank_logits(self.ctx, user_index, e_v, u2i)


def recall_scorer(model: torch.nn.Module, ctx: Any, u2t_mode: str, catalog: Optional[UserCatalogU2T] = None,
                  device: Optional[torch.device] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Eq. 16 scorer ``(user_index [N], sid_prefix [N, l]) -> logits [N]`` of one user batch.

    Args:
        model: the ``DIGModel`` (eval mode).
        ctx: the batch's :class:`~dig_torchrec.model.UserContext`.
        u2t_mode: the recall path's u2t input (``u2t.inference``).
        catalog: ``catalog_mean`` / ``catalog_max``: the batch's users' u2i per key group
            (:meth:`CatalogPrefixU2T.for_users`).
        device: the model's device (rows are moved there, logits come back on the CPU); None: no moves.
    """
    if u2t_mode in CATALOG_MODES and catalog is None:
        raise ValueError(f"u2t_mode={u2t_mode} needs the batch's users' catalog u2i (CatalogPrefixU2T.for_users)")

    def score(user_index: torch.Tensor, sid_prefix: torch.Tensor) -> torch.Tensor:
        u2t = catalog(user_index, sid_prefix) if catalog is not None else None
        if device is None:
            return model.recall_logits(ctx, user_index, sid_prefix, u2t_mode=u2t_mode, u2t=u2t)
        u2t = u2t.to(device) if u2t is not None else None
        return model.recall_logits(ctx, user_index.to(device), sid_prefix.to(device), u2t_mode=u2t_mode,
                                   u2t=u2t).cpu()

    return score


@dataclass
class RetrievalRun:
    """Ranked items per mode for U target rows (``[U, n]`` item ids, -1 padded)."""

    items: Dict[str, torch.Tensor]
    scores: Dict[str, torch.Tensor]
    leaves: Dict[str, torch.Tensor]  # "beam" / "exhaustive": ranked leaf codes [U, B]
    seconds: Dict[str, float]
    scored_rows: Dict[str, int]
    beam_size: int


def retrieve_topn(
    bundle: InferenceBundle,
    targets: Any,
    rows: torch.Tensor,
    modes: Iterable[str],
    n: int,
    *,
    beam_size: Optional[int] = None,
    unified_top_n: Optional[int] = None,
    exclude_history: bool = False,
    u2t_mode: Optional[str] = None,
    progress: bool = True,
) -> RetrievalRun:
    """Run the requested retrieval modes for target rows ``rows``.

    Args:
        bundle: the loaded model bundle.
        targets: :class:`RetrievalTargets` of a split.
        rows: which target rows (users) to serve.
        modes: subset of ``beam`` (Eq. 16, items by leaf score), ``unified`` (beam leaves,
            items by the rank path, Eq. 17), ``exhaustive`` (every leaf scored by the recall
            path), ``full`` (every item scored by the rank path), ``popularity``.
        n: items per user (``unified`` returns ``unified_top_n``).
        beam_size: B; default ``max(eval.beam_size, n)``, so a beam can fill n slots.
        unified_top_n: beam candidates reranked by the rank path; default ``eval.unified_top_n``.
        exclude_history: drop the user's history items from every list.
        u2t_mode: u2t inference mode; default ``u2t.inference``.
        progress: show a tqdm bar.
    """
    cfg = bundle.cfg
    modes = list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown retrieval mode(s) {bad}; choose from {MODES}")
    B = beam_size or max(cfg.eval.beam_size, n)
    top_n_unified = unified_top_n or cfg.eval.unified_top_n
    u2t = u2t_mode or cfg.u2t.inference
    max_rows = cfg.eval.score_chunk_rows
    chunk = max(1, cfg.eval.user_batch_size)
    index = bundle.index
    out_items: Dict[str, List[torch.Tensor]] = {m: [] for m in modes}
    out_scores: Dict[str, List[torch.Tensor]] = {m: [] for m in modes}
    out_leaves: Dict[str, List[torch.Tensor]] = {m: [] for m in modes if m in ("beam", "exhaustive")}
    seconds = {m: 0.0 for m in modes}
    scored = {m: 0 for m in modes}
    rows = rows.long()
    history = targets.history
    model = bundle.model
    model.eval()
    if "unified" in modes or "full" in modes:
        bundle.item_representation_all()
    bar = tqdm(total=rows.numel(), desc="retrieval", unit="user", disable=not progress, leave=False)
    with torch.no_grad():
        for c0 in range(0, rows.numel(), chunk):
            idx = rows[c0:c0 + chunk]
            U = idx.numel()
            exclude = history[idx] if exclude_history else None
            sub_states = targets.states.select(idx)
            t0 = time.perf_counter()
            sc = UserBatchScorers(bundle, kjt_select_rows(targets.user_kjt, idx), sub_states, 0, u2t)
            t_ctx = time.perf_counter() - t0
            beam: Optional[BeamResult] = None
            if "beam" in modes or "unified" in modes:
                t0 = time.perf_counter()
                beam = beam_search(sc.recall, U, index, B, max_rows=max_rows)
                t_beam = time.perf_counter() - t0 + t_ctx
                if "beam" in modes:
                    it, s = leaves_to_items(beam, index, n, exclude=exclude, max_rows=max_rows)
                    out_items["beam"].append(it)
                    out_scores["beam"].append(s)
                    out_leaves["beam"].append(beam.codes)
                    seconds["beam"] += t_beam
                    scored["beam"] += beam.num_scored
                if "unified" in modes:
                    t0 = time.perf_counter()
                    it, s = leaves_to_items(beam, index, top_n_unified, item_score_fn=sc.rank, exclude=exclude,
                                            max_rows=max_rows)
                    out_items["unified"].append(it)
                    out_scores["unified"].append(s)
                    seconds["unified"] += t_beam + time.perf_counter() - t0
                    scored["unified"] += beam.num_scored
            if "exhaustive" in modes:
                t0 = time.perf_counter()
                exh = exhaustive_leaf_search(sc.recall, U, index, max(n, 1), max_rows=max_rows)
                it, s = leaves_to_items(exh, index, n, exclude=exclude, max_rows=max_rows)
                seconds["exhaustive"] += time.perf_counter() - t0 + t_ctx
                scored["exhaustive"] += exh.num_scored
                out_items["exhaustive"].append(it)
                out_scores["exhaustive"].append(s)
                out_leaves["exhaustive"].append(exh.codes)
            if "full" in modes:
                t0 = time.perf_counter()
                it, s = rank_all_items(sc.rank, U, bundle.items.num_items, n, exclude=exclude, max_rows=max_rows)
                seconds["full"] += time.perf_counter() - t0 + t_ctx
                scored["full"] += U * bundle.items.num_items
                out_items["full"].append(it)
                out_scores["full"].append(s)
            if "popularity" in modes:
                it = M.popularity_ranking(bundle.items.popularity, U, n, exclude=exclude)
                out_items["popularity"].append(it)
                out_scores["popularity"].append(bundle.items.popularity[it.clamp(min=0)].float())
            bar.update(U)
    bar.close()
    cat = lambda d: {k: torch.cat(v) if v else torch.empty(0, dtype=torch.long) for k, v in d.items()}  # noqa: E731
    return RetrievalRun(items=cat(out_items), scores=cat(out_scores), leaves=cat(out_leaves), seconds=seconds,
                        scored_rows=scored, beam_size=B)


# ---------------------------------------------------------------------- exposure AUCs
def exposure_aucs(bundle: InferenceBundle, split: str, max_batches: int = 0, progress: bool = True) -> Dict[str, Any]:
    """Exact rank AUC (Eq. 6/17) and recall AUC per depth (Eq. 7/16, u2t per ``u2t.inference``)
    on the split's exposure rows, from the model's eval-mode forward (:func:`metrics.exact_auc`).

    Args:
        bundle: the loaded model bundle.
        split: ``valid`` or ``test``.
        max_batches: stop after this many batches (0: all).
        progress: show a tqdm bar.
    """
    reader = ExposureReader(bundle.data_root, split, bundle.cfg.data, bundle.schema, with_retrieval=False, shuffle=False)
    rank_logits: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    weights: List[torch.Tensor] = []
    recall: List[torch.Tensor] = []
    recall_labels: List[torch.Tensor] = []
    recall_weights: List[torch.Tensor] = []

    def collect(out: Any) -> None:
        rank_logits.append(out.rank_logits.float())
        labels.append(out.labels.float())
        weights.append(out.weights.float())
        if out.recall_logits is not None and out.recall_logits.numel():
            recall.append(out.recall_logits.float())
            recall_labels.append(out.recall_labels.float())
            recall_weights.append(out.recall_weights.float())

    model = bundle.model
    u2t_mode = bundle.cfg.u2t.inference  # the recall path's u2t input (Eq. 16), as retrieval uses it
    total = reader.num_batches if not max_batches else min(max_batches, reader.num_batches)
    run_eval_loop(model, reader, total, lambda b: model.forward_parts(b, u2t_mode=u2t_mode).output, collect,
                  progress=progress, desc=f"{split} exposures")
    if not rank_logits:
        raise DataError(f"{bundle.data_root / split}: no exposure rows to evaluate")
    res: Dict[str, Any] = {
        "rank_auc": M.exact_auc(torch.cat(rank_logits), torch.cat(labels), torch.cat(weights)),
        "num_exposures": int((torch.cat(weights) > 0).sum()),
    }
    if recall:
        logits = torch.cat(recall, dim=1)  # [L, N]
        ylab, w = torch.cat(recall_labels), torch.cat(recall_weights)
        per_layer = [M.exact_auc(logits[l], ylab, w) for l in range(logits.shape[0])]
        res["recall_auc_per_layer"] = per_layer
        res["recall_auc"] = per_layer[-1]
    else:
        res["recall_auc"] = float("nan")
        res["recall_auc_per_layer"] = []
    res["recall_rank_auc_gap"] = res["recall_auc"] - res["rank_auc"]
    return res


# ---------------------------------------------------------------------- the full evaluation
def select_users(num: int, max_users: int, seed: int = 0) -> torch.Tensor:
    """Sorted rows of the seeded subset of ``max_users`` of ``num`` targets (all when 0 or >= num)."""
    if not max_users or max_users >= num:
        return torch.arange(num)
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(num, generator=g)[:max_users]).values


def evaluate(
    bundle: InferenceBundle,
    split: str = "test",
    *,
    exclude_history: Optional[bool] = None,
    max_users: Optional[int] = None,
    full_ranking: bool = True,
    exposures: bool = True,
    max_exposure_batches: int = 0,
    progress: bool = True,
) -> Dict[str, Any]:
    """All §4 metrics of one checkpoint on ``split``; flat keys first, details after.

    Args:
        bundle: the loaded model bundle.
        split: ``test`` or ``valid`` (leave-last-out targets of that split).
        exclude_history: drop history items from the candidates (default ``eval.exclude_history``).
        max_users: evaluate a seeded random subset of target users (default ``eval.max_users``; 0 = all).
        full_ranking: also run full-corpus ranking (exact item-space argmax; U x |V| rank calls).
        exposures: compute rank/recall AUC on the split's exposures.
        max_exposure_batches: cap on exposure batches (0: all).
        progress: show progress bars.
    """
    cfg = bundle.cfg
    if split not in ("test", "valid"):
        raise DataError(f"split must be 'test' or 'valid', got {split!r}")
    excl = cfg.eval.exclude_history if exclude_history is None else exclude_history
    targets = load_targets(bundle.data_root, split, bundle.schema)
    rows = select_users(int(targets.target_item.numel()), cfg.eval.max_users if max_users is None else max_users)
    ks = sorted(set(cfg.eval.topk))
    n = max(ks)
    modes = ["beam", "unified", "exhaustive", "popularity"] + (["full"] if full_ranking else [])
    t_start = time.perf_counter()
    run = retrieve_topn(bundle, targets, rows, modes, n, exclude_history=excl, progress=progress)
    tgt = targets.target_item[rows]
    res: Dict[str, Any] = {}
    if exposures:
        res.update(exposure_aucs(bundle, split, max_exposure_batches, progress=progress))
    else:
        res.update({"rank_auc": float("nan"), "recall_auc": float("nan"), "recall_rank_auc_gap": float("nan")})
    res.update(M.retrieval_metrics(run.items["beam"], tgt, ks))
    uni = M.retrieval_metrics(run.items["unified"], tgt, [k for k in ks if k <= cfg.eval.unified_top_n], prefix="unified_")
    res["unified_recall@10"] = M.recall_at_k(M.target_ranks(run.items["unified"], tgt), 10)
    res["beam_fidelity@10"] = M.overlap_at_k(run.items["beam"], run.items["exhaustive"], 10)
    stats = bundle.index.collision_stats()
    res["collision_rate"] = stats.collision_rate
    sids = bundle.index.item_sids
    res["sid_utilization_per_layer"] = [  # share of the K codes the catalog uses at each layer
        int(torch.unique(sids[:, l]).numel()) / bundle.index.num_codes for l in range(sids.shape[1])]
    res.update(uni)
    res.update(M.retrieval_metrics(run.items["exhaustive"], tgt, ks, prefix="exhaustive_"))
    if full_ranking:
        res.update(M.retrieval_metrics(run.items["full"], tgt, ks, prefix="full_ranking_"))
    res.update(M.retrieval_metrics(run.items["popularity"], tgt, ks, prefix="popularity_"))
    res["beam_leaf_fidelity@10"] = M.overlap_at_k(run.leaves["beam"], run.leaves["exhaustive"], 10)
    res["candidates"] = "exclude_history" if excl else "include_history"
    res["split"] = split
    res["num_users"] = int(rows.numel())
    res["beam_size"] = run.beam_size
    res["beam_size_config"] = cfg.eval.beam_size
    res["unified_top_n"] = cfg.eval.unified_top_n
    res["u2t_inference"] = cfg.u2t.inference
    res["collisions"] = stats.to_dict()
    res["num_items"] = bundle.items.num_items
    res["sid_shape"] = {"num_layers": bundle.index.num_layers, "num_codes": bundle.index.num_codes}
    res["users_per_second"] = {m: (rows.numel() / s if s > 0 else float("nan")) for m, s in run.seconds.items()}
    res["scored_rows_per_user"] = {m: run.scored_rows[m] / max(1, rows.numel()) for m in run.scored_rows}
    res["checkpoint"] = str(bundle.checkpoint)
    res["data"] = str(bundle.data_root)
    res["seconds"] = time.perf_counter() - t_start
    # the flat keys of the JSON contract first, then the details
    return {**{k: res[k] for k in FLAT_KEYS if k in res}, **{k: v for k, v in res.items() if k not in FLAT_KEYS}}


FLAT_KEYS = ("rank_auc", "recall_auc", "recall@10", "ndcg@10", "recall@50", "ndcg@50", "recall@100", "ndcg@100",
             "unified_recall@10", "beam_fidelity@10", "collision_rate")


def format_table(res: Dict[str, Any]) -> str:
    """A human-readable summary of :func:`evaluate`'s result."""
    def f(x: Any) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    lines = [f"split={res.get('split')}  users={res.get('num_users')}  candidates={res.get('candidates')}  "
             f"beam={res.get('beam_size')}  u2t={res.get('u2t_inference')}"]
    lines.append(f"rank AUC {f(res.get('rank_auc'))}   recall AUC {f(res.get('recall_auc'))}   "
                 f"gap {f(res.get('recall_rank_auc_gap'))}   (exact AUCs)")
    ks = sorted({int(k.split('@')[1]) for k in res if k.startswith("recall@")})
    header = f"{'method':<22}" + "".join(f"{'R@' + str(k):>9}{'N@' + str(k):>9}" for k in ks)
    lines.append(header)
    for name, prefix in (("beam search", ""), ("unified (rerank)", "unified_"), ("exhaustive leaf", "exhaustive_"),
                         ("full-corpus ranking", "full_ranking_"), ("popularity", "popularity_")):
        if f"{prefix}recall@{ks[0]}" not in res and f"{prefix}recall@10" not in res:
            continue
        lines.append(f"{name:<22}" + "".join(
            f"{f(res.get(f'{prefix}recall@{k}')):>9}{f(res.get(f'{prefix}ndcg@{k}')):>9}" for k in ks))
    lines.append(f"beam fidelity@10 {f(res.get('beam_fidelity@10'))}   collision rate {f(res.get('collision_rate'))}   "
                 f"max items/leaf {res.get('collisions', {}).get('max_items_per_leaf')}")
    return "\n".join(lines)


def write_json(res: Dict[str, Any], path: str | Path) -> None:
    """Write ``res`` as JSON (NaN written as null), creating parent folders."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    write_text_atomic(path, json.dumps(clean(res), indent=2), mkdir=True)
