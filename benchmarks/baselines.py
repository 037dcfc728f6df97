"""Peer baselines from a library (cornac 3.0.1) on EXACTLY the project's split and metrics.

    pip install -e '.[baselines]'
    python benchmarks/baselines.py --data DIR --split test --seeds 3 --out benchmarks/results/baselines_ml100k.json

``DIR`` is a dataset root in the project's format (``dig data convert movielens ...``). The
peers (cornac's ``MostPop``, ``SASRec`` and ``TIGER``) see the same information as DIG:

* training sequences: each user's TRAIN-split clicks (``label > 0``), in the project's time order
  (stable sort by timestamp, ties in file order), one cornac session per user;
* model selection (cornac's ``model_selection="best"``, best checkpoint on validation): the
  project's validation targets (``retrieval/valid.parquet``), each user's input being its train
  clicks strictly earlier than the target (the project's leakage rule);
* final numbers: the project's test targets (``retrieval/test.parquet``, the same users), input =
  the user's train + valid clicks strictly earlier than the target. The last ``history_length``
  items of every input sequence are checked to equal the stored ``history`` column of the target
  row (so the peers' input is the project's history, untruncated);
* candidates: the full item corpus, history items kept (``include_history``), and the
  ``exclude_history`` variant that drops the target row's stored ``history`` items, the same
  items ``dig eval --exclude-history`` drops; top-``TOPN`` lists with ties broken by item id;
* metrics: :func:`dig_torchrec.retrieval.metrics.retrieval_metrics` (Recall@K / NDCG@K) on those
  lists, cross-checked against cornac's own ``Recall`` / ``NDCG`` on the same lists.

Each (peer, seed) run is cached as JSON under ``--work`` (keyed by the settings and data), so a
rerun only renders. ``peer_rows(path)`` turns the output JSON into rows for
``benchmarks/paper_tables.py --peers PATH``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dig_torchrec.retrieval.metrics import mean_std  # noqa: E402

logger = logging.getLogger("baselines")

KS = (10, 50, 100)
TOPN = 100
CANDIDATES = ("include_history", "exclude_history")
NOT_RETRIEVED = -1e9  # scores at or below this are "not retrieved" (TIGER beam: outside the beam)

# Peer settings. SASRec: d=64, max_len 50, CE loss as in the earlier hand run (20 epochs instead of
# 50 to fit the shared machine). TIGER: cornac's GRID recipe (residual k-means tokenizer, no
# tokenizer training, constant lr, best-on-val NDCG@10), shrunk to fit one CPU core (2+2 T5 layers,
# d_model 64, 10 history items); ``item_features`` (not a TIGER argument) picks the item vectors the
# tokenizer quantizes: "content" (items.parquet one-/multi-hot) and/or "svdN" (N-dim truncated SVD
# item factors of the TRAIN click matrix), joined with "+".
PEERS: Dict[str, Dict[str, Any]] = {
    "MostPop": {},
    "SASRec": dict(embedding_dim=64, max_len=50, loss="ce", num_blocks=2, num_heads=1, dropout=0.2,
                   batch_size=512, learning_rate=1e-3, n_sample=2048, sample_alpha=0.5, n_epochs=20,
                   model_selection="best", val_eval_every=1, val_metric="ndcg", val_k=10),
    "TIGER": dict(item_features="content+svd32", tokenizer="rkmeans", rqvae_num_levels=3, rqvae_codebook_size=32,
                  d_model=64, d_ff=256, num_heads=2, d_kv=32, num_enc_layers=2, num_dec_layers=2, dropout=0.1,
                  max_len=10, n_epochs=6, learning_rate=1e-3, weight_decay=1e-6, batch_size=256,
                  lr_schedule="constant", model_selection="best", val_metric="ndcg", val_k=10, val_eval_every=2,
                  val_sample=None, scoring="beam", n_beams=10, device="cpu"),
}
TIGER_TEST_BEAMS = TOPN  # beam width for the final top-100 lists (validation uses n_beams = val_k)
STOCHASTIC = {"SASRec", "TIGER"}


# ---------------------------------------------------------------------- the project's split
@dataclass
class Targets:
    """One retrieval split: a target per user plus that user's input sequence."""

    user: np.ndarray  # [U] user ids (project ids)
    item: np.ndarray  # [U] target item ids
    ts: np.ndarray  # [U] target timestamps
    inputs: List[np.ndarray]  # per target: clicks strictly before it, oldest first
    stored_history: List[np.ndarray]  # the target row's ``history`` column (last H clicks, oldest first)


@dataclass
class SplitData:
    root: Path
    num_users: int
    num_items: int
    history_length: int
    train_user: np.ndarray  # train clicks, sorted by (user, time), ties in file order
    train_item: np.ndarray
    train_ts: np.ndarray
    valid: Targets
    test: Targets
    item_features: np.ndarray = field(repr=False)  # [V, F] float32 content one-/multi-hot

    def sequences(self) -> Dict[int, np.ndarray]:
        """Train click sequence of every user that has one."""
        bounds = np.flatnonzero(np.diff(self.train_user)) + 1
        return {int(u[0]): it for u, it in zip(np.split(self.train_user, bounds), np.split(self.train_item, bounds))
                if len(u)}

    def targets(self, split: str) -> Targets:
        return self.valid if split == "valid" else self.test


def _read_split_clicks(root: Path, split: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = sorted((root / split).glob("*.parquet"))
    if not parts:
        z = np.zeros(0, np.int64)
        return z, z, z
    t = pa.concat_tables([pq.read_table(p, columns=["user_id", "item_id", "timestamp", "label"]) for p in parts])
    keep = t.column("label").to_numpy() > 0
    return tuple(t.column(c).to_numpy()[keep].astype(np.int64) for c in ("user_id", "item_id", "timestamp"))  # type: ignore


def _sequences_before(user: np.ndarray, item: np.ndarray, ts: np.ndarray, q_user: np.ndarray,
                      q_ts: np.ndarray) -> List[np.ndarray]:
    """For each query (user, ts): the user's clicks with timestamp < ts, in the given order
    (which must be sorted by (user, time) with ties in file order)."""
    out = []
    starts = np.searchsorted(user, q_user, side="left")
    ends = np.searchsorted(user, q_user, side="right")
    for s, e, t in zip(starts, ends, q_ts):
        u_ts, u_it = ts[s:e], item[s:e]
        out.append(u_it[u_ts < t])
    return out


def _item_content(root: Path, num_items: int) -> np.ndarray:
    """One-hot of every int item column and multi-hot of every list column of items.parquet
    (ML-100K: primary_genre, genre_set, year_bucket, genres); ``train_clicks`` is not content."""
    t = pq.read_table(root / "items.parquet")
    order = np.argsort(t.column("item_id").to_numpy())
    blocks = []
    for name in t.column_names:
        if name in ("item_id", "train_clicks"):
            continue
        col = t.column(name)
        if pa.types.is_list(col.type):
            lists = col.to_pylist()
            width = max((max(v) for v in lists if v), default=-1) + 1
            m = np.zeros((num_items, width), np.float32)
            for i, v in enumerate(lists):
                m[i, v] = 1.0
        else:
            v = col.to_numpy().astype(np.int64)
            m = np.zeros((num_items, int(v.max()) + 1), np.float32)
            m[np.arange(num_items), v] = 1.0
        blocks.append(m[order])
    if not blocks:
        return np.eye(num_items, dtype=np.float32)
    return np.concatenate(blocks, axis=1)


def svd_item_factors(data: "SplitData", k: int) -> np.ndarray:
    """``[V, k]`` item factors ``V_k sqrt(S_k)`` of the binary TRAIN user x item click matrix
    (train clicks only: nothing from the valid/test targets)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    m = sp.csr_matrix((np.ones(len(data.train_item)), (data.train_user, data.train_item)),
                      shape=(data.num_users, data.num_items))
    m.data[:] = 1.0
    k = max(1, min(k, min(m.shape) - 1))
    _, sv, vt = svds(m, k=k, random_state=0)
    return (vt.T * np.sqrt(sv)).astype(np.float32)


def tiger_item_features(data: "SplitData", spec: str) -> np.ndarray:
    """Item vectors for TIGER's tokenizer from ``spec`` ("content", "svd32", "content+svd32")."""
    blocks = []
    for part in spec.split("+"):
        part = part.strip()
        if part == "content":
            f = data.item_features
        elif part.startswith("svd"):
            f = svd_item_factors(data, int(part[3:] or 32))
        else:
            raise ValueError(f"unknown item feature block {part!r} (content, svdN)")
        blocks.append(f / max(float(np.linalg.norm(f, axis=1).mean()), 1e-12))  # each block: unit mean norm
    return np.concatenate(blocks, axis=1).astype(np.float32)


def load_split(root: str | Path) -> SplitData:
    """The project's split of dataset ``root`` as sequences for a sequential recommender."""
    from dig_torchrec.data.reader import load_targets
    from dig_torchrec.data.schema import DatasetMeta, FeatureSchema

    root = Path(root)
    meta = DatasetMeta.load(root)
    schema = FeatureSchema.from_meta(meta, meta.history_length)
    tu, ti, tt = _read_split_clicks(root, "train")
    vu, vi, vt = _read_split_clicks(root, "valid")
    # the project's time order: stable by (user, timestamp), ties in file order
    o = np.lexsort((np.arange(len(tu)), tt, tu))
    tu, ti, tt = tu[o], ti[o], tt[o]
    au, ai, at = (np.concatenate([a, b]) for a, b in ((tu, vu), (ti, vi), (tt, vt)))
    o = np.lexsort((np.arange(len(au)), at, au))
    au, ai, at = au[o], ai[o], at[o]

    def targets(split: str, seq_src: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> Targets:
        rt = load_targets(root, split, schema)
        user = rt.user_id.numpy().astype(np.int64)
        item = rt.target_item.numpy().astype(np.int64)
        ts = pq.read_table(root / "retrieval" / f"{split}.parquet", columns=["timestamp"]).column(0).to_numpy()
        hist = rt.history.numpy()
        stored = [h[h >= 0][::-1].copy() for h in hist]  # load_targets: most recent first -> oldest first
        inputs = _sequences_before(*seq_src, user, ts)
        H = hist.shape[1]
        for u, x, h in zip(user, inputs, stored):
            if not np.array_equal(x[-H:] if H else x[:0], h):
                raise RuntimeError(f"{root}: user {u} {split}: rebuilt input {x[-H:].tolist()} != stored history "
                                   f"{h.tolist()} (split/order mismatch)")
        return Targets(user, item, ts.astype(np.int64), inputs, stored)

    valid = targets("valid", (tu, ti, tt))
    test = targets("test", (au, ai, at))
    return SplitData(root, meta.num_users, meta.num_items, schema.history_length, tu, ti, tt, valid, test,
                     _item_content(root, meta.num_items))


# ---------------------------------------------------------------------- cornac inputs
def cornac_datasets(data: SplitData, item_features: Optional[np.ndarray] = None):
    """``(train_set, val_set)`` cornac SequentialDatasets (USIT, one session per user) whose
    internal user/item indices ARE the project's ids (maps pre-filled with every id), so the
    candidate set is the whole corpus even for items with no train click."""
    from collections import OrderedDict

    from cornac.data import SequentialDataset

    uid_map = OrderedDict((u, u) for u in range(data.num_users))
    iid_map = OrderedDict((i, i) for i in range(data.num_items))
    train = [(int(u), f"train-{u}", int(i), int(t)) for u, i, t in zip(data.train_user, data.train_item, data.train_ts)]
    val = []
    for u, x, tgt, ts in zip(data.valid.user, data.valid.inputs, data.valid.item, data.valid.ts):
        val += [(int(u), f"valid-{u}", int(i), int(ts) - 1) for i in x] + [(int(u), f"valid-{u}", int(tgt), int(ts))]
    train_set = SequentialDataset.build(train, fmt="USIT", global_uid_map=uid_map, global_iid_map=iid_map,
                                        global_sid_map=OrderedDict())
    val_set = SequentialDataset.build(val, fmt="USIT", global_uid_map=uid_map, global_iid_map=iid_map,
                                      global_sid_map=OrderedDict()) if val else None
    if len(iid_map) != data.num_items or len(uid_map) != data.num_users:
        raise RuntimeError("cornac id maps grew: an id outside the dataset's range")
    if item_features is not None:
        from cornac.data import FeatureModality

        fm = FeatureModality(features=item_features, ids=list(range(data.num_items)))
        fm.build(id_map=iid_map)
        train_set.add_modalities(item_feature=fm)
        if val_set is not None:
            val_set.add_modalities(item_feature=fm)
    return train_set, val_set


# ---------------------------------------------------------------------- ranking + metrics
def top_lists(scores: np.ndarray, topn: int, exclude: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
    """``[U, topn]`` item ids by descending score, ties by ascending item id; excluded items and
    items scored <= NOT_RETRIEVED are dropped (the slot is -1 when fewer remain)."""
    U, V = scores.shape
    s = scores.astype(np.float64).copy()
    if exclude is not None:
        for r, ex in enumerate(exclude):
            if len(ex):
                s[r, ex] = -np.inf
    out = np.full((U, topn), -1, dtype=np.int64)
    ids = np.arange(V)
    for r in range(U):
        order = np.lexsort((ids, -s[r]))[:topn]
        order = order[s[r, order] > NOT_RETRIEVED]
        out[r, : len(order)] = order
    return out


def project_metrics(lists: np.ndarray, targets: np.ndarray, ks: Sequence[int] = KS) -> Dict[str, float]:
    """Recall@K / NDCG@K with the project's metric code."""
    import torch

    from dig_torchrec.retrieval.metrics import retrieval_metrics

    return retrieval_metrics(torch.from_numpy(lists), torch.from_numpy(targets), ks)


def cornac_metrics(lists: np.ndarray, targets: np.ndarray, k: int = 10) -> Dict[str, float]:
    """Recall@k and NDCG@k computed by cornac's metric classes on the same lists (one
    ground-truth item per user, averaged over users as cornac's ranking_eval does)."""
    from cornac.metrics import NDCG, Recall

    rec, ndcg = Recall(k=k), NDCG(k=k)
    r, n = [], []
    for row, t in zip(lists, targets):
        pd_rank = row[row >= 0]
        gt = np.array([t])
        r.append(rec.compute(gt_pos=gt, pd_rank=pd_rank))
        n.append(ndcg.compute(gt_pos=gt, pd_rank=pd_rank))
    return {f"recall@{k}": float(np.mean(r)), f"ndcg@{k}": float(np.mean(n))}


def cross_check(lists: np.ndarray, targets: np.ndarray, k: int = 10, tol: float = 1e-9) -> Dict[str, Any]:
    """Project vs cornac Recall@k / NDCG@k on the same lists; ``agree`` when within ``tol``."""
    ours = project_metrics(lists, targets, (k,))
    theirs = cornac_metrics(lists, targets, k)
    diff = max(abs(ours[key] - theirs[key]) for key in theirs)
    return {"k": k, "project": ours, "cornac": theirs, "max_abs_diff": diff, "agree": bool(diff <= tol)}


# ---------------------------------------------------------------------- peers
class _ValTrace:
    """Records the validation score of every validation round of a cornac model."""

    def __init__(self) -> None:
        self.scores: List[float] = []

    def sasrec(self):
        import cornac.models.sasrec.recom_sasrec as mod

        orig = mod.val_score

        def wrapped(*a, **kw):
            v = orig(*a, **kw)
            self.scores.append(float("nan") if v is None else float(v))
            return v

        return mod, orig, wrapped


def make_model(peer: str, seed: int, settings: Dict[str, Any]):
    import cornac.models as cm

    if peer == "MostPop":
        return cm.MostPop()
    if peer == "SASRec":
        return cm.SASRec(seed=seed, **settings)
    if peer == "TIGER":
        from cornac.models import TIGER

        trace: List[float] = []

        class TracedTIGER(TIGER):
            def _validate(self, val_sessions, metric):  # noqa: D401 - record every validation round
                v = super()._validate(val_sessions, metric)
                trace.append(float(v))
                return v

        m = TracedTIGER(seed=seed, **settings)
        m._trace = trace
        return m
    raise ValueError(f"unknown peer {peer!r}; choose from {sorted(PEERS)}")


def score_users(peer: str, model, targets: Targets, num_items: int) -> np.ndarray:
    """``[U, V]`` scores of every item for every target user from the model's input sequence."""
    S = np.empty((len(targets.user), num_items), dtype=np.float64)
    for r, (u, x) in enumerate(zip(targets.user, targets.inputs)):
        if peer == "MostPop":
            s = model.score(int(u))
        else:
            s = model.score(int(u), history_items=[int(i) for i in x])
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if s.shape[0] != num_items:
            raise RuntimeError(f"{peer}: {s.shape[0]} scores for {num_items} items")
        S[r] = s
    return S


def run_peer(data: SplitData, peer: str, seed: int, split: str = "test", settings: Optional[Dict[str, Any]] = None,
             candidates: Sequence[str] = CANDIDATES, topn: int = TOPN, keep_lists: bool = False) -> Dict[str, Any]:
    """Train ``peer`` on ``data``'s train clicks (selection on its validation targets), rank the
    corpus for ``split``'s target users and score it with the project's metrics.

    ``keep_lists``: also return the top-``topn`` lists (numpy, per protocol) and the model under
    ``res["lists"]`` / ``res["model"]`` (not JSON-serializable; for tests)."""
    import torch

    settings = dict(PEERS[peer] if settings is None else settings)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    model_args = {k: v for k, v in settings.items() if k != "item_features"}
    feats = tiger_item_features(data, settings.get("item_features", "content")) if peer == "TIGER" else None
    train_set, val_set = cornac_datasets(data, feats)
    model = make_model(peer, seed, model_args)
    trace = _ValTrace()
    patched = None
    if peer == "SASRec":
        mod, orig, wrapped = trace.sasrec()
        mod.val_score, patched = wrapped, (mod, orig)
    t0, c0 = time.time(), time.process_time()
    try:
        model.fit(train_set, val_set)
    finally:
        if patched:
            patched[0].val_score = patched[1]
    train_time, train_cpu = time.time() - t0, time.process_time() - c0
    val_curve = trace.scores if peer == "SASRec" else list(getattr(model, "_trace", []))
    if peer == "TIGER":
        model.n_beams = max(TIGER_TEST_BEAMS, topn)
    tg = data.targets(split)
    t0 = time.time()
    scores = score_users(peer, model, tg, data.num_items)
    score_time = time.time() - t0
    res: Dict[str, Any] = {
        "peer": peer, "seed": seed, "split": split, "num_users": int(len(tg.user)), "num_items": data.num_items,
        "settings": settings, "train_time_s": train_time, "train_cpu_s": train_cpu, "score_time_s": score_time, "topn": topn,
        "val_curve": val_curve, "val_every_epochs": settings.get("val_eval_every"),
        "cornac_version": _cornac_version(), "metrics": {},
    }
    if peer == "TIGER":
        res["test_n_beams"] = model.n_beams
        res["sid_levels"] = [int(x) for x in model.level_sizes]
        res["sid_collisions"] = int((model.sid_table[:, -1] > 0).sum())
    if val_curve:
        best = int(np.nanargmax(val_curve))
        res["best_val"] = float(val_curve[best])
        res["best_epoch"] = (best + 1) * int(settings.get("val_eval_every") or 1)
    for cand in candidates:
        exclude = tg.stored_history if cand == "exclude_history" else None
        lists = top_lists(scores, topn, exclude)
        m = project_metrics(lists, tg.item)
        m["cross_check"] = cross_check(lists, tg.item, 10)
        m["mean_list_len"] = float((lists >= 0).sum(1).mean())
        res["metrics"][cand] = m
        if keep_lists:
            res.setdefault("lists", {})[cand] = lists
    if keep_lists:
        res["model"], res["train_set"], res["val_set"] = model, train_set, val_set
    return res


def _cornac_version() -> str:
    try:
        import cornac

        return str(cornac.__version__)
    except Exception:  # pragma: no cover
        return "unknown"


# ---------------------------------------------------------------------- cached driver
def _data_key(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted([root / "meta.json", root / "items.parquet", *root.glob("*/*.parquet")]):
        st = p.stat()
        h.update(f"{p.relative_to(root)}:{st.st_size}".encode())
    return h.hexdigest()[:12]


def cached_run(data: SplitData, peer: str, seed: int, split: str, work: Path, force: bool = False,
               candidates: Sequence[str] = CANDIDATES, cached_only: bool = False) -> Optional[Dict[str, Any]]:
    settings = PEERS[peer]
    key = hashlib.sha1(json.dumps([peer, settings, split, list(candidates), _data_key(data.root), TOPN],
                                  sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = work / f"seed{seed}" / f"{peer.lower()}_{split}_{key}.json"
    if path.exists() and not force:
        logger.info("reusing %s", path)
        return json.loads(path.read_text())
    if cached_only:
        logger.info("%s seed %d: no cached run (%s), skipped (--cached-only)", peer, seed, path)
        return None
    logger.info("running %s seed %d on %s ...", peer, seed, split)
    res = run_peer(data, peer, seed, split, settings, candidates)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    logger.info("  %s seed %d: R@10 %.4f N@10 %.4f, train %.0fs, score %.0fs (%s)", peer, seed,
                res["metrics"][candidates[0]]["recall@10"], res["metrics"][candidates[0]]["ndcg@10"],
                res["train_time_s"], res["score_time_s"], path)
    return res


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and sample std over seeds of every metric, per candidate protocol."""
    out: Dict[str, Any] = {"seeds": [r["seed"] for r in runs], "settings": runs[0]["settings"],
                           "train_time_s": mean_std([r["train_time_s"] for r in runs]),
                           "score_time_s": mean_std([r["score_time_s"] for r in runs]), "metrics": {}}
    for cand in runs[0]["metrics"]:
        keys = [k for k in runs[0]["metrics"][cand] if k.startswith(("recall@", "ndcg@"))]
        out["metrics"][cand] = {k: mean_std([r["metrics"][cand][k] for r in runs]) for k in keys}
        out["metrics"][cand]["cross_check_agree"] = all(r["metrics"][cand]["cross_check"]["agree"] for r in runs)
    if "best_epoch" in runs[0]:
        out["best_epochs"] = [r.get("best_epoch") for r in runs]
    return out


# ---------------------------------------------------------------------- paper_tables integration
@dataclass
class PeerRow:
    name: str
    candidates: str
    metrics: Dict[str, Tuple[float, float]]  # key -> (mean, std)
    n_seeds: int
    settings: Dict[str, Any]
    train_time_s: Tuple[float, float]
    note: str = ""
    peer: str = ""

    def fmt(self, key: str, digits: int = 4) -> str:
        if key not in self.metrics:
            return "n/a"
        m, s = self.metrics[key]
        return f"{m:.{digits}f}" if self.n_seeds == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def peer_rows(path: str | Path | Dict[str, Any], candidates: Optional[str] = None) -> List[PeerRow]:
    """Rows of the peers in a ``baselines.py`` output JSON (a path or the loaded document): name,
    metric mean ± std over seeds, settings and train time; every candidate protocol unless
    ``candidates`` names one (``include_history`` / ``exclude_history``)."""
    doc = path if isinstance(path, dict) else json.loads(Path(path).read_text())
    rows = []
    for cand in CANDIDATES:
        if candidates and cand != candidates:
            continue
        for name, s in doc["peers"].items():
            if cand not in s["metrics"]:
                continue
            label = f"{name} (cornac)" + (", exclude history" if cand == "exclude_history" else "")
            mets = {k: tuple(v) for k, v in s["metrics"][cand].items() if k.startswith(("recall@", "ndcg@"))}
            note = f"best epoch(s) {s['best_epochs']}" if s.get("best_epochs") else ""
            rows.append(PeerRow(label, cand, mets, len(s["seeds"]), s["settings"], tuple(s["train_time_s"]), note,
                                peer=name))
    return rows


def peer_markdown(path: str | Path) -> Tuple[List[str], List[str]]:
    """``(main-table lines, 'Peers' section lines)`` for paper_tables.py's markdown."""
    doc = json.loads(Path(path).read_text())
    table = [f"| {r.name} | {r.fmt('recall@10')} | {r.fmt('ndcg@10')} | {r.fmt('recall@50')} | {r.fmt('ndcg@50')} | "
             f"{r.fmt('recall@100')} | {r.fmt('ndcg@100')} | – | – |" for r in peer_rows(path)]
    sec = ["## Peers (cornac baselines, same split, targets and metric code)", "",
           f"From `{Path(path).name}` (`{doc.get('command', '')}`); cornac {doc.get('cornac_version')}. "
           "Mean ± std over seeds; train time per run on one CPU core.", "",
           "| Peer | seeds | train time (s) | settings |", "|---|---|---|---|"]
    for name, s in doc["peers"].items():
        t = s["train_time_s"]
        extra = f"; best epoch(s) {s['best_epochs']}" if s.get("best_epochs") else ""
        sets = ", ".join(f"{k}={v}" for k, v in s["settings"].items()) or "–"
        sec.append(f"| {name} | {len(s['seeds'])} | {t[0]:.0f} ± {t[1]:.0f} | {sets}{extra} |")
    return table, sec + [""]


# ---------------------------------------------------------------------- CLI
def render_md(doc: Dict[str, Any]) -> str:
    lines = [f"# cornac peer baselines on {doc['data']['name']} ({doc['split']} split)", "", "Produced by:", "",
             "```", doc["command"], "```", "",
             f"- date {doc['date']}; {doc['machine']}; cornac {doc['cornac_version']}; OMP_NUM_THREADS="
             f"{doc['omp_num_threads']}",
             f"- {doc['num_users']} target users, {doc['data']['num_items']} items (full corpus); protocol: "
             f"{doc['protocol']}", ""]
    for cand in CANDIDATES:
        if not any(cand in s["metrics"] for s in doc["peers"].values()):
            continue
        lines += [f"## candidates: `{cand}`", "", "| Peer | R@10 | N@10 | R@50 | N@50 | R@100 | N@100 | "
                  "cornac-metric R@10 / N@10 agree |", "|---|---|---|---|---|---|---|---|"]
        for r in peer_rows(doc, cand):
            agree = doc["peers"][r.peer]["metrics"][cand]["cross_check_agree"]
            lines.append(f"| {r.name} | {r.fmt('recall@10')} | {r.fmt('ndcg@10')} | {r.fmt('recall@50')} | "
                         f"{r.fmt('ndcg@50')} | {r.fmt('recall@100')} | {r.fmt('ndcg@100')} | {'yes' if agree else '**NO**'} |")
        lines.append("")
    lines += ["## Settings and train time", "", "| Peer | seeds | train time (s) | scoring time (s) | best epoch(s) | "
              "settings |", "|---|---|---|---|---|---|"]
    for name, s in doc["peers"].items():
        t, st = s["train_time_s"], s["score_time_s"]
        sets = ", ".join(f"{k}={v}" for k, v in s["settings"].items()) or "–"
        lines.append(f"| {name} | {len(s['seeds'])} | {t[0]:.0f} ± {t[1]:.0f} | {st[0]:.0f} | {s.get('best_epochs', '–')} | "
                     f"{sets} |")
    lines.append("")
    for n in doc.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset root in the project's format")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--seeds", type=int, default=3, help="seeds of the stochastic peers (SASRec, TIGER)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--peers", default="MostPop,SASRec,TIGER", help="comma-separated subset of " + ",".join(PEERS))
    p.add_argument("--exclude-history", action="store_true",
                   help="only the exclude-history candidate protocol (default: both protocols)")
    p.add_argument("--work", default=None, help="cache dir (default runs/baselines/<dataset name>)")
    p.add_argument("--out", default=None, help="output JSON (a .md is written next to it)")
    p.add_argument("--peer-seeds", default="", help="per-peer seed counts overriding --seeds, e.g. 'TIGER=1'")
    p.add_argument("--note", action="append", default=[], help="a line added to the notes of the output (repeatable)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--cached-only", action="store_true", help="only render runs already cached under --work")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(args.data)
    data = load_split(root)
    from dig_torchrec.data.schema import DatasetMeta

    meta = DatasetMeta.load(root)
    work = Path(args.work or REPO / "runs" / "baselines" / meta.name).resolve()
    cands = ("exclude_history",) if args.exclude_history else CANDIDATES
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for x in peers:
        if x not in PEERS:
            p.error(f"unknown peer {x!r}")
    n_seeds = {k.strip(): int(v) for k, v in (x.split("=") for x in args.peer_seeds.split(",") if x.strip())}
    t0 = time.time()
    summary: Dict[str, Any] = {}
    for peer in peers:
        n = n_seeds.get(peer, args.seeds) if peer in STOCHASTIC else 1
        seeds = range(args.first_seed, args.first_seed + n)
        runs = [r for r in (cached_run(data, peer, s, args.split, work, args.force, cands, args.cached_only)
                            for s in seeds) if r is not None]
        if runs:
            summary[peer] = {**summarize(runs), "runs": runs}
    command = "python benchmarks/baselines.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    tg = data.targets(args.split)
    doc = {
        "command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cornac_version": _cornac_version(),
        "data": {"name": meta.name, "num_users": meta.num_users, "num_items": meta.num_items,
                 "train_clicks": int(len(data.train_item))},
        "split": args.split, "num_users": int(len(tg.user)),
        "protocol": "leave-last-out targets of the project; train = train-split clicks in time order; "
                    "selection = best-on-validation-targets; input = clicks strictly before the target; "
                    "full corpus; exclude_history drops the target row's stored history",
        "wall_time_s": time.time() - t0, "peers": summary,
    }
    doc["notes"] = [f"{k}: {v}" for k, v in NOTES.items() if k in summary] + list(args.note)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))
        out.with_suffix(".md").write_text(render_md(doc))
        logger.info("wrote %s and %s", out, out.with_suffix(".md"))
    print(render_md(doc))
    return 0


NOTES = {
    "MostPop": "cornac MostPop scores an item by its number of distinct train users (equal to the project's "
               "train click count on ML-100K, where no user rates a movie twice); deterministic (one run); ties "
               "by item id",
    "SASRec": "fixed epoch budget with cornac's best-on-validation checkpoint (model_selection='best', "
              "validated every val_eval_every epochs on all validation targets); cornac has no early exit",
    "TIGER": "item vectors for the tokenizer (settings.item_features): 'content' = one-/multi-hot of the "
             "items.parquet columns (ML-100K: genres, primary genre, genre combination, release-year bucket; no "
             "text embeddings are available offline), 'svdN' = N-dim SVD item factors of the TRAIN click matrix, "
             "each block scaled to unit mean norm; residual k-means SIDs + cornac's collision level; validation "
             "beam = val_k, test beam = 100; items outside the beam are not retrieved (-1 slots, count as misses)",
}


if __name__ == "__main__":
    sys.exit(main())
