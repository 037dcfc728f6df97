"""Synthetic exposure logs with planted structure (``dig data synth``).

Generative story (everything seeded):

* Items: ``category`` centers ``c ~ N(0, I_k)``; each brand belongs to one category and has
  center ``c + 0.6 N(0, I)``; each item belongs to a (Zipf-popular) brand and has latent
  factor ``v = brand_center + 0.6 N(0, I)``. ``price_bucket`` is a noisy decile of ``v[0]``.
  So every static item feature correlates with the item factors (what the tokenizer sees).
* Users: two favourite categories; ``u = 0.8 (c_a + c_b) / sqrt(2) + 0.6 N(0, I)``.
  ``age_bucket`` and ``gender`` are noisy functions of ``u[1]``, ``u[2]``; ``city`` is Zipf;
  ``interest`` (a declared profile tag) is the first favourite category 85% of the time,
  so request-level features carry part of the user factor, as profile features do.
* Activity: rows per user ~ Poisson(N * w_u / sum w), ``w_u`` log-normal (heavy tail).
* Exposures (time-ordered per user, strictly increasing timestamps): with probability
  ``p_personal`` an item of one of the user's favourite categories, else an item drawn by
  global popularity (an upstream retrieval stage's candidate pool).
* Retrieval signal (``p_brand > 0``; the ``industrial_*`` presets): each user also has one
  favourite brand inside each favourite category, the user factor is built from those two
  brand centers instead of the category centers, and a personal exposure is an item of the
  favourite brand with probability ``p_brand`` (else any item of the category). The next
  click is then predictable from the user's history (earlier items of the same brands) and
  profile (``interest``), not only from the exposure pool, and it is concentrated enough
  for a top-10 list to find it. With ``p_brand = 0`` (``micro``/``tiny``) no extra random
  draw is made, so those presets are bit-identical to earlier versions.
* Clicks: ``P(click) = sigmoid(a cos(u, v) + b log pop_v + device_bias + bias)`` --
  latent factors drive clicks. Click rows get a dwell value in 1..5 that grows with
  ``<u, v>``.
* Oracle: ``meta.json`` -> ``extra.retrieval_oracle`` records the Recall@10 of the
  Bayes ranking that knows the latent factors (score of item i for a test user =
  P(exposure of i | user) x P(click | user, i, the target row's device)) on the
  leave-last-out test targets, next to the Recall@10 of the train-click popularity list on
  the same targets and their ratio (:func:`oracle_scores`).
* u2i over (``category``, ``brand``) x (exposures, clicks, value_sum) is the prefix
  statistic of earlier events (``dig_torchrec.data.u2i``): informative (it estimates the
  user's affinity to the item's category/brand) but noisy (few events per key).

Generation is chunked by user range; chunks run in a ``multiprocessing`` pool (both
cores) and stream their parquet parts to disk, so industrial_large never sits in memory.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from dig_torchrec.data.build import (DatasetWriter, compute_prefix_features, exposure_schema, item_key_csr,
                                     leave_last_out, rows_table, write_splits)
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.data.u2i import U2ISpec, describe
from dig_torchrec.errors import DataError

logger = logging.getLogger(__name__)

USER_FEATURES = {"age_bucket": 7, "gender": 3, "city": 0, "interest": 0}  # 0: set from the preset
CONTEXT_FEATURES = {"hour": 24, "device": 4}
U2I_FIELDS = ["category", "brand"]
U2I_STATS = ["exposures", "clicks", "value_sum"]


@dataclass
class SynthConfig:
    """Sizes and knobs of one synthetic dataset."""

    name: str = "tiny"
    num_users: int = 2000
    num_items: int = 600
    num_rows: int = 60_000
    num_categories: int = 20
    num_brands: int = 80
    num_cities: int = 50
    price_buckets: int = 10
    latent_dim: int = 16
    history_length: int = 20
    activity_sigma: float = 0.8  # log-normal spread of rows per user
    p_personal: float = 0.6
    affinity_scale: float = 5.0  # a
    popularity_scale: float = 0.3  # b
    bias: float = -4.0
    p_brand: float = 0.0  # share of personal exposures from the user's favourite brand (retrieval signal)
    oracle_users: int = 20_000  # test users the oracle Recall@10 is computed on (a seeded sample)
    row_group_size: int = 2048
    chunk_rows: int = 400_000  # rows per generation chunk
    seed: int = 0


PRESETS: Dict[str, SynthConfig] = {
    "micro": SynthConfig(name="micro", num_users=300, num_items=150, num_rows=9000, num_categories=8,
                         num_brands=24, num_cities=10, row_group_size=512),
    # tiny: a stronger planted signal (CTR ~8%, GBDT valid AUC ~0.75) so a CI-sized run can
    # tell a learning ranker (> 0.7) from a broken one (~0.5)
    "tiny": SynthConfig(affinity_scale=8.0, bias=-6.0),
    # industrial_*: a retrieval signal a model can learn (favourite brands; see the module
    # docstring), with the oracle and popularity Recall@10 recorded in meta.json
    "industrial_small": SynthConfig(name="industrial_small", num_users=12_000, num_items=40_000, num_rows=1_500_000,
                                    num_categories=200, num_brands=2000, num_cities=300, activity_sigma=1.0,
                                    p_brand=0.7, row_group_size=32_768, chunk_rows=250_000),
    "industrial_large": SynthConfig(name="industrial_large", num_users=20_000_000, num_items=500_000,
                                    num_rows=7_500_000, num_categories=1000, num_brands=20_000, num_cities=1000,
                                    activity_sigma=2.0, p_brand=0.7, oracle_users=2000, row_group_size=65_536,
                                    chunk_rows=750_000),
}


def preset(name: str, **overrides: object) -> SynthConfig:
    """A preset with overrides (``None`` values are ignored)."""
    if name not in PRESETS:
        raise DataError(f"unknown synth preset '{name}'; valid presets are: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------- items
@dataclass
class ItemWorld:
    factors: np.ndarray  # [I, k] float32
    unit_factors: np.ndarray  # factors / |factors|
    category: np.ndarray
    brand: np.ndarray
    price_bucket: np.ndarray
    log_pop: np.ndarray  # [I]
    pop_cdf: np.ndarray  # exposure draw by popularity
    cat_items: np.ndarray  # items sorted by category
    cat_start: np.ndarray  # [C+1]
    cat_centers: np.ndarray  # [C, k]
    brand_centers: np.ndarray  # [B, k]
    brand_cat: np.ndarray  # [B] category of each brand
    brand_items: np.ndarray  # items sorted by brand
    brand_start: np.ndarray  # [B+1]
    cat_brands: np.ndarray  # brands sorted by category
    cat_brand_start: np.ndarray  # [C+1]


def make_items(cfg: SynthConfig) -> ItemWorld:
    rng = np.random.default_rng([cfg.seed, 1])
    k, C, Bn, I = cfg.latent_dim, cfg.num_categories, cfg.num_brands, cfg.num_items
    cat_centers = rng.standard_normal((C, k)).astype(np.float32)
    brand_cat = np.arange(Bn) % C
    rng.shuffle(brand_cat)
    brand_centers = cat_centers[brand_cat] + 0.6 * rng.standard_normal((Bn, k)).astype(np.float32)
    brand_w = 1.0 / np.arange(1, Bn + 1) ** 0.8
    brand = rng.choice(Bn, size=I, p=brand_w / brand_w.sum())
    brand[: min(I, Bn)] = rng.permutation(Bn)[: min(I, Bn)]  # every brand used when I >= B
    factors = (brand_centers[brand] + 0.6 * rng.standard_normal((I, k))).astype(np.float32)
    category = brand_cat[brand]
    noisy = factors[:, 0] + 0.3 * rng.standard_normal(I)
    price_bucket = np.searchsorted(np.quantile(noisy, np.linspace(0, 1, cfg.price_buckets + 1)[1:-1]), noisy)
    log_pop = rng.normal(0.0, 1.0, size=I)
    pop = np.exp(log_pop)
    pop_cdf = np.cumsum(pop) / pop.sum()
    cat_items = np.argsort(category, kind="stable")
    cat_start = np.zeros(C + 1, dtype=np.int64)
    np.cumsum(np.bincount(category, minlength=C), out=cat_start[1:])
    unit = factors / np.linalg.norm(factors, axis=1, keepdims=True)
    brand_items = np.argsort(brand, kind="stable")
    brand_start = np.zeros(Bn + 1, dtype=np.int64)
    np.cumsum(np.bincount(brand, minlength=Bn), out=brand_start[1:])
    cat_brands = np.argsort(brand_cat, kind="stable")
    cat_brand_start = np.zeros(C + 1, dtype=np.int64)
    np.cumsum(np.bincount(brand_cat, minlength=C), out=cat_brand_start[1:])
    return ItemWorld(factors, unit, category.astype(np.int64), brand.astype(np.int64), price_bucket.astype(np.int64),
                     log_pop, pop_cdf, cat_items, cat_start, cat_centers, brand_centers, brand_cat, brand_items,
                     brand_start, cat_brands, cat_brand_start)


def rows_per_user(cfg: SynthConfig) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, 2])
    w = rng.lognormal(0.0, cfg.activity_sigma, size=cfg.num_users)
    return rng.poisson(cfg.num_rows * w / w.sum()).astype(np.int64)


def meta_for(cfg: SynthConfig) -> DatasetMeta:
    user_feats = dict(USER_FEATURES, city=cfg.num_cities, interest=cfg.num_categories)
    meta = DatasetMeta(
        name=cfg.name, num_users=cfg.num_users, num_items=cfg.num_items, user_features=user_feats,
        context_features=dict(CONTEXT_FEATURES),
        item_features={"category": cfg.num_categories, "brand": cfg.num_brands, "price_bucket": cfg.price_buckets},
        u2i_dim=len(U2I_FIELDS) * len(U2I_STATS), history_length=cfg.history_length,
        u2i_fields=list(U2I_FIELDS), u2i_stats=list(U2I_STATS),
        extra={"source": "synthetic", "synth": asdict(cfg)},
    )
    meta.extra["u2i"] = describe(U2ISpec.from_meta(meta))
    return meta


# ----------------------------------------------------------------------------- chunks
_WORLD: Optional[Tuple[int, ItemWorld]] = None


def _world(cfg: SynthConfig) -> ItemWorld:
    global _WORLD
    key = hash((cfg.seed, cfg.num_items, cfg.num_categories, cfg.num_brands, cfg.latent_dim))
    if _WORLD is None or _WORLD[0] != key:
        _WORLD = (key, make_items(cfg))
    return _WORLD[1]


DEVICE_BIAS = np.array([0.0, 0.2, -0.2, -0.5])
ORACLE_K = 10


@dataclass
class ChunkUsers:
    """The latent side of one chunk's users (what only the oracle may look at)."""

    fav: np.ndarray  # [n, 2] favourite categories
    fav_brand: np.ndarray  # [n, 2] favourite brand in each (-1: none; p_brand = 0)
    unit: np.ndarray  # [n, k] unit user factors


@dataclass
class Chunk:
    """One generated chunk: its rows, their split, and the oracle's view of its users."""

    table: pa.Table  # rows sorted by (user, time)
    code: np.ndarray  # split code per row (0 train, 1 valid, 2 test)
    valid_t: np.ndarray  # valid target rows
    test_t: np.ndarray  # test target rows
    oracle: np.ndarray  # [m, 2] (test target row, 1 if the oracle's top-10 holds its item), a seeded sample
    users: ChunkUsers


def generate_chunk(cfg: SynthConfig, chunk: int, user_lo: int, counts: np.ndarray) -> Chunk:
    """Rows of users ``user_lo .. user_lo + len(counts) - 1`` (sorted by user, time)."""
    world = _world(cfg)
    meta = meta_for(cfg)
    spec = U2ISpec.from_meta(meta)
    rng = np.random.default_rng([cfg.seed, 3, chunk])
    nu = len(counts)
    k = cfg.latent_dim
    # users of this chunk
    fav = rng.integers(0, cfg.num_categories, size=(nu, 2))
    fav_brand = np.full((nu, 2), -1, dtype=np.int64)
    centers = world.cat_centers[fav]
    if cfg.p_brand > 0:  # one favourite brand per favourite category; the user factor follows the brands
        lo, hi = world.cat_brand_start[fav], world.cat_brand_start[fav + 1]
        pick = world.cat_brands[np.minimum(lo + (rng.random((nu, 2)) * (hi - lo)).astype(np.int64),
                                           len(world.cat_brands) - 1)]
        fav_brand = np.where(hi > lo, pick, -1)
        centers = np.where((fav_brand >= 0)[..., None], world.brand_centers[np.maximum(fav_brand, 0)], centers)
    uf = (0.8 * (centers[:, 0] + centers[:, 1]) / math.sqrt(2)
          + 0.6 * rng.standard_normal((nu, k))).astype(np.float32)
    age = np.clip(np.round(3 + 1.2 * uf[:, 1] + rng.standard_normal(nu)), 0, 6).astype(np.int64)
    gender = np.where(rng.random(nu) < 0.05, 2, (uf[:, 2] + 0.5 * rng.standard_normal(nu) > 0).astype(np.int64))
    city_w = 1.0 / np.arange(1, cfg.num_cities + 1)
    city = rng.choice(cfg.num_cities, size=nu, p=city_w / city_w.sum())
    device_pref = rng.integers(0, 4, size=nu)
    # declared interest (a profile tag): the first favourite category, right 85% of the time
    interest = np.where(rng.random(nu) < 0.85, fav[:, 0], rng.integers(0, cfg.num_categories, size=nu))
    # rows
    local = np.repeat(np.arange(nu), counts)
    n = len(local)
    start = np.zeros(nu + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    gaps = 1 + rng.exponential(1800.0, size=n).astype(np.int64)
    t0 = 1_600_000_000 + rng.integers(0, 30 * 86400, size=nu)
    csum = np.cumsum(gaps)
    ts = t0[local] + csum - (csum[start[local]] - gaps[start[local]])  # strictly increasing per user
    personal = rng.random(n) < cfg.p_personal
    which = rng.integers(0, 2, size=n)
    cat = fav[local, which]
    within = world.cat_start[cat] + (rng.random(n) * (world.cat_start[cat + 1] - world.cat_start[cat])).astype(np.int64)
    item_personal = world.cat_items[np.minimum(within, world.cat_start[cat + 1] - 1)]
    empty_cat = world.cat_start[cat + 1] == world.cat_start[cat]
    item_global = np.minimum(np.searchsorted(world.pop_cdf, rng.random(n)), cfg.num_items - 1)
    if cfg.p_brand > 0:
        b = fav_brand[local, which]
        blo, bhi = world.brand_start[np.maximum(b, 0)], world.brand_start[np.maximum(b, 0) + 1]
        use_brand = (rng.random(n) < cfg.p_brand) & (b >= 0) & (bhi > blo)
        in_brand = world.brand_items[np.minimum(blo + (rng.random(n) * (bhi - blo)).astype(np.int64),
                                                np.maximum(bhi - 1, 0))]
        item_personal = np.where(use_brand, in_brand, item_personal)
    item = np.where(personal & ~empty_cat, item_personal, item_global).astype(np.int64)
    device = np.where(rng.random(n) < 0.8, device_pref[local], rng.integers(0, 4, size=n)).astype(np.int64)
    hour = ((ts // 3600) % 24).astype(np.int64)
    unorm = uf / np.linalg.norm(uf, axis=1, keepdims=True)
    affinity = np.einsum("nk,nk->n", unorm[local], world.unit_factors[item])  # cosine in [-1, 1]
    logit = (cfg.affinity_scale * affinity + cfg.popularity_scale * world.log_pop[item]
             + DEVICE_BIAS[device] + cfg.bias)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    value = np.where(label > 0, np.clip(np.round(2 + 3 * affinity + rng.standard_normal(n)), 1, 5), 0.0)
    increments = np.stack([np.ones(n), label.astype(np.float64), value], axis=1)
    ones = np.arange(cfg.num_items + 1, dtype=np.int64)
    item_keys = item_key_csr(spec, [(ones, world.category), (ones, world.brand)])
    user = (user_lo + local).astype(np.int64)
    pf = compute_prefix_features(user, ts, item, label, increments, item_keys, spec, cfg.history_length)
    cols = {"user_id": user, "item_id": item, "timestamp": ts, "label": label, "age_bucket": age[local],
            "gender": gender[local], "city": city[local], "interest": interest[local], "hour": hour, "device": device}
    table = rows_table(cols, feature_columns(), pf, spec.stats, spec.dim)
    code, valid_t, test_t = leave_last_out(user, label)
    # the oracle, on a seeded sample of this chunk's test targets (its own RNG stream)
    want = min(len(test_t), int(math.ceil(cfg.oracle_users * nu / cfg.num_users)))
    sample = np.sort(np.random.default_rng([cfg.seed, 4, chunk]).choice(len(test_t), size=want, replace=False))
    rows_o = test_t[sample]
    users = ChunkUsers(fav, fav_brand, unorm)
    hits = oracle_hits(cfg, world, users, local[rows_o], device[rows_o], item[rows_o])
    return Chunk(table, code, valid_t, test_t, np.stack([rows_o, hits], axis=1).astype(np.int64), users)


def oracle_exposure(cfg: SynthConfig, world: ItemWorld, users: ChunkUsers, rows: np.ndarray) -> np.ndarray:
    """``P(exposure of i | user)`` for ``rows`` (local user ids): ``[len(rows), num_items]`` float64.

    Exact: the personal category/brand draws plus the popularity draw of ``generate_chunk``.
    """
    pop = np.diff(np.concatenate([[0.0], world.pop_cdf]))
    m = len(rows)
    expo = np.tile((1.0 - cfg.p_personal) * pop, (m, 1))
    half = 0.5 * cfg.p_personal
    for r, u in enumerate(rows):
        for j in range(2):
            c = users.fav[u, j]
            lo, hi = world.cat_start[c], world.cat_start[c + 1]
            if hi == lo:  # an empty category falls back to the popularity draw
                expo[r] += half * pop
                continue
            share = half
            b = users.fav_brand[u, j]
            if cfg.p_brand > 0 and b >= 0 and world.brand_start[b + 1] > world.brand_start[b]:
                blo, bhi = world.brand_start[b], world.brand_start[b + 1]
                expo[r, world.brand_items[blo:bhi]] += half * cfg.p_brand / (bhi - blo)
                share = half * (1.0 - cfg.p_brand)
            expo[r, world.cat_items[lo:hi]] += share / (hi - lo)
    return expo


def oracle_scores(cfg: SynthConfig, world: ItemWorld, users: ChunkUsers, rows: np.ndarray,
                  device: np.ndarray) -> np.ndarray:
    """The generative story's next-click score of every item for ``rows`` (local user ids).

    ``P(exposure of i | user) * P(click | user, i, device)`` (:func:`oracle_exposure` times
    the sigmoid of the planted click logit): ``[len(rows), num_items]`` float64.
    """
    expo = oracle_exposure(cfg, world, users, rows)
    cos = users.unit[rows].astype(np.float64) @ world.unit_factors.T.astype(np.float64)
    logit = (cfg.affinity_scale * cos + cfg.popularity_scale * world.log_pop[None, :]
             + DEVICE_BIAS[device][:, None] + cfg.bias)
    return expo / (1.0 + np.exp(-logit))


def oracle_hits(cfg: SynthConfig, world: ItemWorld, users: ChunkUsers, rows: np.ndarray, device: np.ndarray,
                target: np.ndarray, block: int = 64) -> np.ndarray:
    """1 where the target item is in the top-``ORACLE_K`` of :func:`oracle_scores`, else 0."""
    hits = np.zeros(len(rows), dtype=np.int64)
    for a in range(0, len(rows), block):
        s = oracle_scores(cfg, world, users, rows[a:a + block], device[a:a + block])
        t = s[np.arange(len(s)), target[a:a + block]]
        hits[a:a + block] = (s > t[:, None]).sum(axis=1) < ORACLE_K
    return hits


def feature_columns() -> List[str]:
    return [*USER_FEATURES, *CONTEXT_FEATURES]


def _chunk_job(args: Tuple[SynthConfig, int, int, np.ndarray, str]
               ) -> Tuple[Dict[str, int], np.ndarray, pa.Table, pa.Table, np.ndarray, np.ndarray]:
    """Pool worker: generate one chunk, write its split parts, return targets + counts + oracle hits."""
    cfg, chunk, user_lo, counts, root = args
    c = generate_chunk(cfg, chunk, user_lo, counts)
    table, code, valid_t, test_t, oracle = c.table, c.code, c.valid_t, c.test_t, c.oracle
    meta = meta_for(cfg)
    table = table.cast(exposure_schema(feature_columns(), meta.u2i_stats, meta.u2i_dim))
    split_counts = write_splits(Path(root), table, code, valid_t, test_t, f"part-{chunk:05d}", cfg.row_group_size)
    items = table.column("item_id").to_numpy()
    lab = table.column("label").to_numpy()
    clicks = np.bincount(items[(code == 0) & (lab > 0)], minlength=cfg.num_items)
    oracle_items = items[oracle[:, 0]] if len(oracle) else np.zeros(0, np.int64)
    return (split_counts, clicks, table.take(pa.array(valid_t)), table.take(pa.array(test_t)), oracle[:, 1],
            oracle_items)


def generate(cfg: SynthConfig, out: str | Path, processes: Optional[int] = None) -> Dict[str, object]:
    """Generate a dataset root at ``out`` (see the module docstring).

    Args:
        cfg: sizes and seed.
        out: output directory (must not already hold a dataset).
        processes: worker processes; default ``min(2, cpu_count)`` when there are several chunks.

    Returns:
        a summary dict (rows per split, seconds, ...).
    """
    t_start = time.perf_counter()
    root = Path(out)
    if (root / "meta.json").exists() or any((root / s).exists() for s in ("train", "valid", "test")):
        raise DataError(f"{root}: already holds a dataset; choose an empty --out directory")
    if cfg.num_rows <= 0 or cfg.num_users <= 0 or cfg.num_items <= 0:
        raise DataError(f"synth sizes must be positive (users={cfg.num_users}, items={cfg.num_items}, rows={cfg.num_rows})")
    meta = meta_for(cfg)
    writer = DatasetWriter(root, meta, feature_columns(), cfg.row_group_size)
    counts = rows_per_user(cfg)
    # chunk boundaries: contiguous user ranges with ~chunk_rows rows each
    cum = np.cumsum(counts)
    n_chunks = max(1, int(math.ceil(cum[-1] / cfg.chunk_rows)))
    bounds = np.searchsorted(cum, np.arange(1, n_chunks) * (cum[-1] / n_chunks))
    edges = [0, *[int(b) + 1 for b in bounds], cfg.num_users]
    edges = sorted(set(min(e, cfg.num_users) for e in edges))
    jobs = [(cfg, i, lo, counts[lo:hi], str(root)) for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    procs = processes if processes is not None else min(2, os.cpu_count() or 1)
    logger.info("synth %s: %d users, %d items, ~%d rows in %d chunk(s), %d process(es)",
                cfg.name, cfg.num_users, cfg.num_items, int(cum[-1]), len(jobs), procs if len(jobs) > 1 else 1)
    if len(jobs) > 1 and procs > 1:
        # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool
        # can deadlock in its first parallel region.
        ctx = mp.get_context("spawn")
        with ctx.Pool(procs) as pool:
            results = pool.imap(_chunk_job, jobs)
            oracle = _collect(writer, results, len(jobs))
    else:
        oracle = _collect(writer, map(_chunk_job, jobs), len(jobs))
    writer.meta.extra["retrieval_oracle"] = oracle
    logger.info("synth %s: oracle Recall@%d %.4f, popularity %.4f (%.3f of the oracle) on %d test users",
                cfg.name, ORACLE_K, oracle["recall@10"], oracle["popularity_recall@10"],
                oracle["popularity_fraction_of_oracle"], oracle["users"])
    world = _world(cfg)
    writer.close({"item_id": np.arange(cfg.num_items), "category": world.category, "brand": world.brand,
                  "price_bucket": world.price_bucket})
    secs = time.perf_counter() - t_start
    logger.info("synth %s done in %.1fs: %s", cfg.name, secs, writer.counts)
    return {"rows": dict(writer.counts), "seconds": round(secs, 2), "chunks": len(jobs), "retrieval_oracle": oracle}


def _collect(writer: DatasetWriter, results: Iterable[Tuple[Any, ...]], total: int) -> Dict[str, Any]:
    """Write every chunk's targets; return the oracle summary (``meta.json`` -> ``retrieval_oracle``)."""
    hits, sample_items, test_items = [], [], []
    for split_counts, clicks, valid_tab, test_tab, o_hits, o_items in tqdm(results, total=total, desc="synth chunks",
                                                                          disable=total < 4):
        for s, c in split_counts.items():
            writer.counts[s] += c
        writer.train_clicks += clicks
        writer.add_targets(pa.concat_tables([valid_tab]), np.arange(valid_tab.num_rows), np.zeros(0, np.int64))
        writer.add_targets(test_tab, np.zeros(0, np.int64), np.arange(test_tab.num_rows))
        hits.append(o_hits)
        sample_items.append(o_items)
        test_items.append(test_tab.column("item_id").to_numpy())
    # most clicked train items first, ties by item id (the popularity baseline's list)
    top = np.lexsort((np.arange(len(writer.train_clicks)), -writer.train_clicks))[:ORACLE_K]
    h = np.concatenate(hits) if hits else np.zeros(0, np.int64)
    si = np.concatenate(sample_items) if sample_items else np.zeros(0, np.int64)
    ti = np.concatenate(test_items) if test_items else np.zeros(0, np.int64)
    oracle = float(h.mean()) if len(h) else 0.0
    pop = float(np.isin(si, top).mean()) if len(si) else 0.0
    return {
        "recall@10": round(oracle, 4),
        "popularity_recall@10": round(pop, 4),
        "popularity_fraction_of_oracle": round(pop / oracle, 4) if oracle > 0 else None,
        "popularity_recall@10_all_test_users": round(float(np.isin(ti, top).mean()), 4) if len(ti) else 0.0,
        "users": int(len(h)),
        "test_users": int(len(ti)),
        "definition": "top-10 of P(exposure | latent user) x P(click | latent user, item, target device) over the "
                      "whole catalog, on a seeded sample of leave-last-out test targets; popularity = top-10 train "
                      "clicks on the same targets",
    }
