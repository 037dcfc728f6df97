"""KuaiRec converter (``dig data convert kuairec --src DIR --out DIR [--matrix big_matrix.csv]``).

Published layout (KuaiRec 2.0 ``data/``):

* ``small_matrix.csv`` / ``big_matrix.csv``: ``user_id, video_id, play_duration,
  video_duration, time, date, timestamp, watch_ratio`` (timestamp in seconds, float);
* ``item_categories.csv``: ``video_id, feat`` with ``feat`` a list such as ``"[27, 9]"``;
* ``user_features.csv``: ``user_id, user_active_degree, is_lowactive_period,
  is_live_streamer, is_video_author, follow_user_num, follow_user_num_range, fans_user_num,
  fans_user_num_range, friend_user_num, friend_user_num_range, register_days,
  register_days_range, onehot_feat0..onehot_feat17``.

Conversion:

* every play is an exposure row; a click is ``watch_ratio >= 0.7`` (paper §4.1); rows
  without a timestamp are dropped (logged); the timestamp is stored in milliseconds;
* users and videos get dense 0-based ids (sorted raw ids, over the matrix, the user table and
  the category table, so never-played videos are in the corpus);
* item features: ``primary_tag`` (first tag of ``feat``, +1; 0 = none), ``tag_set`` (id of the
  exact tag list), ``duration_bucket`` (log2 bucket of the video duration in seconds);
  ``tags`` (``list<int64>``, multi-valued) is the u2i field;
* user features: ``active_degree``, ``is_video_author``, ``is_live_streamer``,
  ``follow_range``, ``fans_range``, ``friend_range``, ``register_range`` (dense ids of the
  raw values, 0 = missing); context: ``hour`` (Beijing time, UTC+8);
* u2i over ``tags`` with stats (exposures, clicks, watch_ratio_sum): the user's prefix
  exposure count (log1p), "like" rate (clicks / exposures; the matrices carry no like flag,
  so the rate of plays with watch_ratio >= 0.7 stands for it) and mean watch ratio
  (watch_ratio clipped to [0, 5] before summing), d_c = 3.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dig_torchrec.data.rawcsv import Vocab, entity_ids, log_bucket, read_csv, require
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import DataError

logger = logging.getLogger(__name__)

CLICK_WATCH_RATIO = 0.7
WATCH_RATIO_CLIP = 5.0
USER_COLUMNS = {"active_degree": "user_active_degree", "is_video_author": "is_video_author",
                "is_live_streamer": "is_live_streamer", "follow_range": "follow_user_num_range",
                "fans_range": "fans_user_num_range", "friend_range": "friend_user_num_range",
                "register_range": "register_days_range"}


def parse_tags(feat: List[str | None], path: Path) -> List[List[int]]:
    out = []
    for i, f in enumerate(feat):
        text = (f or "").strip().strip("[]")
        try:
            out.append([int(x) for x in text.split(",") if x.strip()])
        except ValueError as e:
            raise DataError(f"{path}: line {i + 2}: column 'feat': cannot parse tag list {f!r}") from e
    return out


def convert(src: str | Path, out: str | Path, history_length: int = 20, matrix: str = "small_matrix.csv",
            row_group_size: int = 65536) -> Dict[str, object]:
    """Convert KuaiRec raw CSVs into a dataset root.

    Args:
        src: directory with the matrix, item_categories.csv and user_features.csv.
        out: output dataset root.
        history_length: stored history length.
        matrix: ``small_matrix.csv`` or ``big_matrix.csv``.
        row_group_size: parquet row group size.
    """
    src, out = Path(src), Path(out)
    if (out / "meta.json").exists():
        raise DataError(f"{out}: already holds a dataset; choose an empty --out directory")
    mpath = require(src, matrix, "KuaiRec")
    ipath = require(src, "item_categories.csv", "KuaiRec")
    upath = require(src, "user_features.csv", "KuaiRec")
    m = read_csv(mpath, ["user_id", "video_id", "video_duration", "timestamp", "watch_ratio"],
                 {"user_id": pa.int64(), "video_id": pa.int64(), "video_duration": pa.float64(),
                  "timestamp": pa.float64(), "watch_ratio": pa.float64()}, required=["user_id", "video_id"])
    ok = pc.and_(pc.is_valid(m.column("timestamp")), pc.is_valid(m.column("watch_ratio")))
    dropped = m.num_rows - int(pc.sum(ok).as_py() or 0)
    if dropped:
        logger.warning("%s: dropping %d rows without timestamp or watch_ratio", mpath, dropped)
        m = m.filter(ok)
    if m.num_rows == 0:
        raise DataError(f"{mpath}: no usable rows")
    cats = read_csv(ipath, ["video_id", "feat"], {"video_id": pa.int64(), "feat": pa.string()}, required=["video_id"])
    users = read_csv(upath, ["user_id", *USER_COLUMNS.values()], {"user_id": pa.int64()}, required=["user_id"])
    user_vocab, (user, urow) = entity_ids(m.column("user_id"), users.column("user_id"))
    item_vocab, (item, irow) = entity_ids(m.column("video_id"), cats.column("video_id"))
    n_users, n_items = len(user_vocab) - 1, len(item_vocab) - 1
    # item features
    tags_per_row = parse_tags(cats.column("feat").to_pylist(), ipath)
    tags: List[List[int]] = [[] for _ in range(n_items)]
    for r, t in zip(irow, tags_per_row):
        tags[r] = t
    max_tag = max([max(t) for t in tags if t] + [0])
    primary = np.array([t[0] + 1 if t else 0 for t in tags], dtype=np.int64)
    combos: Dict[Tuple[int, ...], int] = {}
    tag_set = np.array([combos.setdefault(tuple(t), len(combos)) for t in tags], dtype=np.int64)
    duration = np.zeros(n_items)
    dur = m.column("video_duration").to_numpy(zero_copy_only=False)
    duration[item] = np.nan_to_num(dur, nan=0.0) / 1000.0  # ms -> s (any play's value)
    duration_bucket = log_bucket(duration)
    # u2i key lists: videos without tags use a reserved "no tag" key (max_tag + 1)
    key_lists = [t if t else [max_tag + 1] for t in tags]
    k_off = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum([len(k) for k in key_lists], out=k_off[1:])
    k_vals = np.concatenate([np.asarray(k, dtype=np.int64) for k in key_lists])
    # user features
    ufeat = {}
    for name, col in USER_COLUMNS.items():
        vocab = Vocab([users.column(col)])
        v = np.zeros(n_users, dtype=np.int64)
        v[urow] = vocab.ids(users.column(col))
        ufeat[name] = (v, len(vocab))
    ts_s = m.column("timestamp").to_numpy()
    ts_ms = np.round(ts_s * 1000).astype(np.int64)
    hour = ((np.floor(ts_s).astype(np.int64) + 8 * 3600) // 3600) % 24
    wr = m.column("watch_ratio").to_numpy()
    label = (wr >= CLICK_WATCH_RATIO).astype(np.int64)
    # the heavy modules (torch) only once the raw files have been read and checked
    from dig_torchrec.data.build import build_in_memory, item_key_csr
    from dig_torchrec.data.u2i import U2ISpec, describe

    meta = DatasetMeta(
        name=f"kuairec_{matrix.split('_')[0]}", num_users=n_users, num_items=n_items,
        user_features={k: c for k, (_, c) in ufeat.items()}, context_features={"hour": 24},
        item_features={"primary_tag": max_tag + 2, "tag_set": len(combos), "duration_bucket": 31},
        u2i_dim=3, history_length=history_length, u2i_fields=["tags"],
        u2i_stats=["exposures", "clicks", "watch_ratio_sum"],
        extra={"source": f"kuairec/{matrix}", "u2i_field_cardinality": {"tags": max_tag + 2},
               "u2i_transforms": ["log1p", "rate", "rate"], "click": f"watch_ratio >= {CLICK_WATCH_RATIO}",
               "user_id_raw": "sorted raw user_id", "item_id_raw": "sorted raw video_id"},
    )
    spec = U2ISpec.from_meta(meta)
    meta.extra["u2i"] = describe(spec)
    keys = item_key_csr(spec, [(k_off, k_vals)])
    cols = {"user_id": user, "item_id": item, "timestamp": ts_ms, "label": label,
            **{k: v[user] for k, (v, _) in ufeat.items()}, "hour": hour}
    increments = np.stack([np.ones(len(user)), label.astype(np.float64), np.clip(wr, 0.0, WATCH_RATIO_CLIP)], 1)
    tags_arr = pa.ListArray.from_arrays(pa.array(k_off.astype(np.int32)), pa.array(k_vals, type=pa.int64()))
    item_cols = {"item_id": np.arange(n_items), "primary_tag": primary, "tag_set": tag_set,
                 "duration_bucket": duration_bucket, "tags": tags_arr}
    counts = build_in_memory(out, meta, cols, [*ufeat, "hour"], increments, keys, item_cols,
                             row_group_size=row_group_size)
    return {"rows": counts, "dropped_rows": dropped}
