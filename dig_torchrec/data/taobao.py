"""Taobao display-ad converter (``dig data convert taobao --src DIR --out DIR [--max-rows N]``).

Published layout (Alibaba "Ad Display/Click Data on Taobao.com"):

* ``raw_sample.csv``: ``user, time_stamp, adgroup_id, pid, nonclk, clk``;
* ``ad_feature.csv``: ``adgroup_id, cate_id, campaign_id, customer, brand, price``
  (``brand`` may be ``NULL``);
* ``user_profile.csv``: ``userid, cms_segid, cms_group_id, final_gender_code, age_level,
  pvalue_level, shopping_level, occupation, new_user_class_level`` (the last header name
  carries a trailing space in the published file; empty values are missing);
* ``behavior_log.csv``: ``user, time_stamp, btag, cate, brand`` with ``btag`` in
  ``pv | cart | fav | buy``.

Conversion:

* every raw_sample row is an exposure, ``label = clk``; users and ads get dense 0-based ids
  (sorted raw ids over raw_sample and the profile / ad tables);
* item (ad) features: ``cate_id``, ``campaign_id``, ``customer``, ``brand``, ``price_bucket``
  (log2 bucket); user features: the eight ``user_profile`` columns; context: ``pid``, ``hour``
  (UTC+8). Categorical values map to dense ids in sorted order, 0 = missing/unknown;
* u2i over (``cate_id``, ``brand``) x (impressions, clicks, purchases): per category and per
  brand the user's prefix CTR, impression count (log1p) and purchase count (log1p), d_c = 6
  (paper §4.1). Impressions and clicks accumulate from raw_sample; purchases from
  ``behavior_log`` rows with ``btag == "buy"`` (only their category/brand keys that occur
  in ad_feature; only for users of raw_sample). Only strictly earlier timestamps count.

The whole raw_sample is converted in memory; ``--max-rows`` keeps the first N rows for a
bounded run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dig_torchrec.data.rawcsv import Vocab, entity_ids, log_bucket, read_csv, require, stream_csv
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import DataError

logger = logging.getLogger(__name__)

PROFILE_COLUMNS = ["cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
                   "shopping_level", "occupation", "new_user_class_level"]
AD_COLUMNS = ["cate_id", "campaign_id", "customer", "brand"]
MAX_TIMESTAMP = 10**13  # Unix seconds or milliseconds (year 2286 in ms)


def convert(src: str | Path, out: str | Path, history_length: int = 20, max_rows: int = 0,
            row_group_size: int = 65536) -> Dict[str, object]:
    """Convert the Taobao raw CSVs into a dataset root.

    Args:
        src: directory with raw_sample.csv, ad_feature.csv, user_profile.csv, behavior_log.csv.
        out: output dataset root.
        history_length: stored history length.
        max_rows: read at most this many raw_sample rows (0: all).
        row_group_size: parquet row group size.
    """
    src, out = Path(src), Path(out)
    if (out / "meta.json").exists():
        raise DataError(f"{out}: already holds a dataset; choose an empty --out directory")
    spath = require(src, "raw_sample.csv", "Taobao")
    apath = require(src, "ad_feature.csv", "Taobao")
    ppath = require(src, "user_profile.csv", "Taobao")
    bpath = require(src, "behavior_log.csv", "Taobao")
    i64 = pa.int64()
    sample = read_csv(spath, ["user", "time_stamp", "adgroup_id", "pid", "clk"],
                      {"user": i64, "time_stamp": i64, "adgroup_id": i64, "pid": pa.string(), "clk": i64},
                      max_rows=max_rows, required=["user", "time_stamp", "adgroup_id", "clk"])
    if sample.num_rows == 0:
        raise DataError(f"{spath}: no rows")
    for col in ("user", "time_stamp", "adgroup_id", "clk"):
        if sample.column(col).null_count:
            row = int(np.flatnonzero(sample.column(col).is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{spath}: column '{col}' row {row}: missing value")
    ts_check = sample.column("time_stamp").to_numpy()
    if ts_check.size and (ts_check.min() < 0 or ts_check.max() > MAX_TIMESTAMP):
        row = int(np.flatnonzero((ts_check < 0) | (ts_check > MAX_TIMESTAMP))[0])
        raise DataError(f"{spath}: line {row + 2}: column 'time_stamp' value {int(ts_check[row])} is not a Unix time")
    ads = read_csv(apath, ["adgroup_id", *AD_COLUMNS, "price"],
                   {"adgroup_id": i64, **{c: i64 for c in AD_COLUMNS}, "price": pa.float64()}, required=["adgroup_id"])
    prof = read_csv(ppath, ["userid", *PROFILE_COLUMNS], {"userid": i64, **{c: i64 for c in PROFILE_COLUMNS}},
                    required=["userid"])
    user_vocab, (user, prow) = entity_ids(sample.column("user"), prof.column("userid"))
    item_vocab, (item, arow) = entity_ids(sample.column("adgroup_id"), ads.column("adgroup_id"))
    n_users, n_items = len(user_vocab) - 1, len(item_vocab) - 1
    # item features (ads missing from ad_feature keep 0 = unknown everywhere)
    item_cols: Dict[str, np.ndarray] = {"item_id": np.arange(n_items)}
    vocabs: Dict[str, Vocab] = {}
    for c in AD_COLUMNS:
        vocabs[c] = Vocab([ads.column(c)])
        v = np.zeros(n_items, dtype=np.int64)
        v[arow] = vocabs[c].ids(ads.column(c))
        item_cols[c] = v
    price = np.zeros(n_items)
    price[arow] = ads.column("price").fill_null(0.0).to_numpy()
    item_cols["price_bucket"] = log_bucket(price)
    # user features
    ufeat: Dict[str, np.ndarray] = {}
    ucard: Dict[str, int] = {}
    for c in PROFILE_COLUMNS:
        vocab = Vocab([prof.column(c)])
        v = np.zeros(n_users, dtype=np.int64)
        v[prow] = vocab.ids(prof.column(c))
        ufeat[c], ucard[c] = v, len(vocab)
    pid_vocab = Vocab([sample.column("pid")])
    ts = sample.column("time_stamp").to_numpy()
    label = (sample.column("clk").to_numpy() > 0).astype(np.int64)
    # the heavy modules (torch) only once the raw files have been read and checked
    from dig_torchrec.data.build import ExtraEvents, build_in_memory, item_key_csr
    from dig_torchrec.data.u2i import U2ISpec, describe

    meta = DatasetMeta(
        name="taobao_ad", num_users=n_users, num_items=n_items, user_features=ucard,
        context_features={"pid": len(pid_vocab), "hour": 24},
        item_features={**{c: len(vocabs[c]) for c in AD_COLUMNS}, "price_bucket": 31},
        u2i_dim=6, history_length=history_length, u2i_fields=["cate_id", "brand"],
        u2i_stats=["impressions", "clicks", "purchases"],
        extra={"source": "taobao-ad", "u2i_transforms": ["log1p", "rate", "log1p"], "click": "clk == 1"},
    )
    spec = U2ISpec.from_meta(meta)
    meta.extra["u2i"] = describe(spec)
    ar = np.arange(n_items + 1, dtype=np.int64)
    keys = item_key_csr(spec, [(ar, item_cols["cate_id"]), (ar, item_cols["brand"])])
    # purchases from behavior_log (streamed: the published file has ~700M rows)
    known_users = pa.array(user_vocab.values)
    b_user, b_ts, b_cate, b_brand = [], [], [], []
    for batch in stream_csv(bpath, ["user", "time_stamp", "btag", "cate", "brand"],
                            {"user": i64, "time_stamp": i64, "btag": pa.string(), "cate": i64, "brand": i64}):
        keep = pc.and_(pc.equal(batch.column("btag"), "buy"), pc.is_in(batch.column("user"), value_set=known_users))
        b = pa.Table.from_batches([batch]).filter(pc.fill_null(keep, False))
        if b.num_rows:
            b_user.append(user_vocab.ids(b.column("user")) - 1)
            b_ts.append(b.column("time_stamp").to_numpy(zero_copy_only=False))
            b_cate.append(vocabs["cate_id"].ids(b.column("cate")))
            b_brand.append(vocabs["brand"].ids(b.column("brand")))
    extra = None
    if b_user:
        bu, bt = np.concatenate(b_user), np.concatenate(b_ts)
        bc, bb = np.concatenate(b_cate), np.concatenate(b_brand)
        # keys of each purchase: its category and brand when known in ad_feature (id > 0)
        has = np.stack([bc > 0, bb > 0], 1)
        lens = has.sum(1)
        kv = np.stack([bc + spec.key_offsets[0], bb + spec.key_offsets[1]], 1)[has]
        k_off = np.zeros(len(bu) + 1, dtype=np.int64)
        np.cumsum(lens, out=k_off[1:])
        inc = np.zeros((len(bu), 3))
        inc[:, 2] = 1.0
        extra = ExtraEvents(bu, bt, k_off, kv, inc)
        meta.extra["purchases"] = int(len(bu))
    cols = {"user_id": user, "item_id": item, "timestamp": ts, "label": label, **{c: v[user] for c, v in ufeat.items()},
            "pid": pid_vocab.ids(sample.column("pid")), "hour": ((ts + 8 * 3600) // 3600) % 24}
    increments = np.stack([np.ones(len(user)), label.astype(np.float64), np.zeros(len(user))], 1)
    counts = build_in_memory(out, meta, cols, [*PROFILE_COLUMNS, "pid", "hour"], increments, keys, item_cols,
                             extra=extra, row_group_size=row_group_size)
    return {"rows": counts, "purchases": int(meta.extra.get("purchases", 0))}
