"""Dataset statistics (``dig data stats``): rows, positive rate, id ranges/cardinalities,
history length distribution and u2i coverage (fraction of rows with a non-zero u2i,
paper §4.6 "u2i completeness")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pyarrow.dataset as pads

from dig_torchrec.data.schema import HISTORY, ITEM_ID, LABEL, SPLITS, U2I, USER_ID, DatasetMeta
from dig_torchrec.data.u2i import U2ISpec


def split_stats(root: Path, split: str, meta: DatasetMeta) -> Dict[str, Any]:
    """Statistics of one split (streams the split's record batches)."""
    d = root / split
    if not d.exists() or not any(d.glob("*.parquet")):
        return {"rows": 0}
    id_cols = [USER_ID, ITEM_ID, *meta.user_features, *meta.context_features]
    dataset = pads.dataset(str(d), format="parquet")
    rows = clicks = nonzero = 0
    mins = {c: np.iinfo(np.int64).max for c in id_cols}
    maxs = {c: np.iinfo(np.int64).min for c in id_cols}
    card = {USER_ID: meta.num_users, ITEM_ID: meta.num_items, **meta.user_features, **meta.context_features}
    seen = {c: np.zeros(card[c], dtype=bool) for c in id_cols}  # distinct ids (in-range ones)
    hist_counts = np.zeros(meta.history_length + 1, dtype=np.int64)
    per_feature_nonzero = np.zeros(meta.u2i_dim, dtype=np.int64)
    for batch in dataset.to_batches(columns=[*id_cols, LABEL, HISTORY, U2I]):
        n = batch.num_rows
        rows += n
        clicks += int(batch.column(LABEL).to_numpy().sum())
        for c in id_cols:
            v = batch.column(c).to_numpy()
            if v.size:
                mins[c] = min(mins[c], int(v.min()))
                maxs[c] = max(maxs[c], int(v.max()))
                seen[c][v[(v >= 0) & (v < card[c])]] = True
        lens = batch.column(HISTORY).value_lengths().to_numpy(zero_copy_only=False)
        hist_counts += np.bincount(np.minimum(lens, meta.history_length), minlength=meta.history_length + 1)
        u = batch.column(U2I).flatten().to_numpy(zero_copy_only=False).reshape(n, meta.u2i_dim)
        nz = u != 0
        nonzero += int(nz.any(1).sum())
        per_feature_nonzero += nz.sum(0)
    lengths = np.arange(meta.history_length + 1)
    mean_len = float((hist_counts * lengths).sum() / max(rows, 1))
    cdf = np.cumsum(hist_counts) / max(rows, 1)
    pct = {f"p{q}": int(np.searchsorted(cdf, q / 100.0)) for q in (10, 50, 90)}
    try:
        names: List[str] = U2ISpec.from_meta(meta).feature_names()
    except Exception:  # a malformed meta still gets its row statistics
        names = [f"u2i_{j}" for j in range(meta.u2i_dim)]
    return {
        "rows": rows,
        "clicks": clicks,
        "positive_rate": clicks / max(rows, 1),
        "ids": {c: {"min": mins[c] if rows else None, "max": maxs[c] if rows else None, "distinct": int(seen[c].sum()),
                    "cardinality": card[c]} for c in id_cols},
        "history_length": {"mean": round(mean_len, 3), **pct, "max": int(np.flatnonzero(hist_counts)[-1]) if rows else 0,
                           "zero_fraction": float(hist_counts[0] / max(rows, 1))},
        "u2i_coverage": nonzero / max(rows, 1),
        "u2i_feature_coverage": {nm: float(c / max(rows, 1)) for nm, c in zip(names, per_feature_nonzero)},
    }


def dataset_stats(root: str | Path) -> Dict[str, Any]:
    """Statistics of every split plus the item table and retrieval target counts."""
    import pyarrow.parquet as pq

    root = Path(root)
    meta = DatasetMeta.load(root)
    out: Dict[str, Any] = {"name": meta.name, "num_users": meta.num_users, "num_items": meta.num_items,
                           "u2i_dim": meta.u2i_dim, "history_length": meta.history_length, "splits": {}}
    for split in SPLITS:
        out["splits"][split] = split_stats(root, split, meta)
    for split in ("valid", "test"):
        p = root / "retrieval" / f"{split}.parquet"
        out[f"retrieval_{split}_targets"] = pq.ParquetFile(p).metadata.num_rows if p.exists() else 0
    total = sum(s.get("rows", 0) for s in out["splits"].values())
    out["rows"] = total
    return out
