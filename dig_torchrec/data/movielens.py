"""MovieLens 100K converter (``dig data convert movielens --src DIR --out DIR``).

Reads ``u.data`` (user | item | rating | timestamp, tab separated), ``u.item`` (pipe
separated, latin-1: id | title | release date | video date | url | 19 genre flags),
``u.user`` (id | age | gender | occupation | zip) and ``u.occupation``.

* Every rating is an exposure row; ``label = rating >= 4``. Ids become 0-based
  (``user_id = raw - 1``, ``item_id = raw - 1``).
* Item features (int64, embedded): ``primary_genre`` = index of the first set genre flag
  (0 = "unknown" when no flag is set), ``genre_set`` = id of the item's exact genre
  combination (ids by first appearance in ``u.item`` order), ``year_bucket`` of the release
  year (:data:`YEAR_EDGES`; 0 = missing date). The multi-hot genres themselves are the
  ``list<int64>`` column ``genres`` of ``items.parquet`` (the u2i field; not embedded).
* User features: ``age_bucket`` (:data:`AGE_EDGES`: <18, 18-24, 25-34, 35-44, 45-49,
  50-55, 56+), ``gender`` (M=0, F=1), ``occupation`` (line index in ``u.occupation``),
  ``zip_prefix`` (first zip character if a digit, else 10).
* u2i over field ``genres`` with stats (exposures, clicks, rating_sum): for a candidate
  movie, sum the user's prefix statistics over the movie's genres, then
  ``[log1p(exposures), clicks / exposures, rating_sum / exposures]`` (d_c = 3): the user's
  prefix-accumulated exposure count, click rate and mean rating on the item's genres.
  Only ratings with a strictly earlier timestamp count.
* Split: leave-last-out as in ``dig_torchrec.data.build`` (stable sort by timestamp, ties in
  file order; users with < 3 clicks stay in train).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import DataError

logger = logging.getLogger(__name__)

NUM_GENRES = 19
AGE_EDGES = [18, 25, 35, 45, 50, 56]  # bucket = number of edges <= age
YEAR_EDGES = [1950, 1970, 1980, 1990, 1995, 1996, 1997, 1998]  # bucket = 1 + number of edges <= year


def _require(src: Path, name: str) -> Path:
    p = src / name
    if not p.exists():
        raise DataError(f"{p}: MovieLens 100K file not found (expected u.data, u.item, u.user, u.occupation in {src})")
    return p


def age_bucket(age: int) -> int:
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def year_bucket(release_date: str) -> int:
    date = release_date.strip()
    if not date:
        return 0
    try:
        year = int(date.rsplit("-", 1)[-1])
    except ValueError:
        return 0
    return 1 + int(np.searchsorted(YEAR_EDGES, year, side="right"))


def read_items(path: Path) -> Dict[str, object]:
    ids: List[int] = []
    genres: List[List[int]] = []
    years: List[int] = []
    for lineno, line in enumerate(path.read_text(encoding="latin-1").splitlines()):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 5 + NUM_GENRES:
            raise DataError(f"{path}: line {lineno + 1}: expected {5 + NUM_GENRES} '|' fields, got {len(parts)}")
        try:
            ids.append(int(parts[0]) - 1)
            flags = [int(x) for x in parts[-NUM_GENRES:]]
        except ValueError as e:
            raise DataError(f"{path}: line {lineno + 1}: bad id or genre flag ({e})") from e
        if ids[-1] < 0 or any(f not in (0, 1) for f in flags):
            raise DataError(f"{path}: line {lineno + 1}: movie id must be >= 1 and genre flags 0 or 1")
        genres.append([g for g, f in enumerate(flags) if f] or [0])
        years.append(year_bucket(parts[2]))
    if not ids:
        raise DataError(f"{path}: no movies (empty file)")
    n = max(ids) + 1
    if sorted(ids) != list(range(n)):
        raise DataError(f"{path}: movie ids must be 1..{n} without gaps")
    order = np.argsort(ids)
    genres = [genres[i] for i in order]
    years_arr = np.asarray(years)[order]
    combo_ids: Dict[Tuple[int, ...], int] = {}
    combo = [combo_ids.setdefault(tuple(g), len(combo_ids)) for g in genres]
    return {"num_items": n, "genres": genres, "primary_genre": np.array([g[0] for g in genres]),
            "genre_set": np.array(combo), "num_genre_sets": len(combo_ids), "year_bucket": years_arr}


def read_users(path: Path, occupations: List[str]) -> Dict[str, np.ndarray]:
    occ = {o: i for i, o in enumerate(occupations)}
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="latin-1").splitlines()):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 5:
            raise DataError(f"{path}: line {lineno + 1}: expected 5 '|' fields, got {len(parts)}")
        uid, age, gender, occupation, zipcode = parts
        if occupation not in occ:
            raise DataError(f"{path}: line {lineno + 1}: occupation '{occupation}' not in u.occupation")
        z = zipcode.strip()[:1]
        try:
            uid_i, age_i = int(uid), int(age)
        except ValueError as e:
            raise DataError(f"{path}: line {lineno + 1}: bad user id or age ({e})") from e
        if gender not in ("M", "F"):
            raise DataError(f"{path}: line {lineno + 1}: gender {gender!r} is not M or F")
        rows.append((uid_i - 1, age_bucket(age_i), 0 if gender == "M" else 1, occ[occupation],
                     int(z) if z.isdigit() else 10))
    if not rows:
        raise DataError(f"{path}: no users (empty file)")
    rows.sort()
    arr = np.array(rows, dtype=np.int64)
    if not np.array_equal(arr[:, 0], np.arange(len(arr))):
        raise DataError(f"{path}: user ids must be 1..{len(arr)} without gaps")
    return {"age_bucket": arr[:, 1], "gender": arr[:, 2], "occupation": arr[:, 3], "zip_prefix": arr[:, 4]}


RATING_COLUMNS = ("user", "item", "rating", "timestamp")
MAX_TIMESTAMP = 10**13  # Unix seconds (or milliseconds until the year 2286)


def read_ratings(path: Path) -> Dict[str, np.ndarray]:
    """``u.data``: user, item, rating (1-5), Unix timestamp, tab-separated, every field required.

    A missing, empty or unparsable field, or an out-of-range rating or timestamp, raises
    :class:`DataError` naming the file and the line.
    """
    from dig_torchrec.data.rawcsv import check_required, find_bad_line

    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (expected user<TAB>item<TAB>rating<TAB>timestamp lines)")
    types = {c: pa.int64() for c in RATING_COLUMNS}
    opts = pacsv.ReadOptions(column_names=list(RATING_COLUMNS))
    parse = pacsv.ParseOptions(delimiter="\t")
    conv = pacsv.ConvertOptions(column_types=types)
    try:
        t = pacsv.read_csv(path, read_options=opts, parse_options=parse, convert_options=conv)
    except (pa.ArrowInvalid, OSError) as e:
        bad = find_bad_line(path, RATING_COLUMNS, types, RATING_COLUMNS, delimiter="\t", header=False)
        raise DataError(f"{path}: {bad or f'cannot parse ({e})'}") from e
    check_required(path, t, RATING_COLUMNS, types, RATING_COLUMNS, delimiter="\t", header=False)
    out = {c: t.column(c).to_numpy() for c in t.column_names}
    for col, lo, hi in (("rating", 1, 5), ("timestamp", 0, MAX_TIMESTAMP), ("user", 1, None), ("item", 1, None)):
        v = out[col]
        bad_rows = (v < lo) | (v > hi) if hi is not None else (v < lo)
        if bad_rows.any():
            r = int(np.flatnonzero(bad_rows)[0])
            line = _data_line(path, r)
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise DataError(f"{path}: line {line}: column '{col}' value {int(v[r])} outside {rng}")
    return out


def _data_line(path: Path, row: int) -> int:
    """1-based line number of data row ``row`` (blank lines are skipped by the reader)."""
    seen = -1
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return lineno
    return row + 1


def convert(src: str | Path, out: str | Path, history_length: int = 20, row_group_size: int = 8192) -> Dict[str, object]:
    """Convert MovieLens 100K raw files into a dataset root.

    Args:
        src: directory holding u.data, u.item, u.user, u.occupation.
        out: output dataset root.
        history_length: stored history length.
        row_group_size: parquet row group size.
    """
    src, out = Path(src), Path(out)
    if (out / "meta.json").exists():
        raise DataError(f"{out}: already holds a dataset; choose an empty --out directory")
    occupations = [l.strip() for l in _require(src, "u.occupation").read_text(encoding="latin-1").splitlines() if l.strip()]
    items = read_items(_require(src, "u.item"))
    users = read_users(_require(src, "u.user"), occupations)
    r = read_ratings(_require(src, "u.data"))
    user, item = r["user"] - 1, r["item"] - 1
    n_users, n_items = len(users["gender"]), int(items["num_items"])
    for name, v, n in (("user id", user, n_users), ("item id", item, n_items)):
        if v.min() < 0 or v.max() >= n:
            raise DataError(f"{src / 'u.data'}: {name} outside 1..{n}")
    label = (r["rating"] >= 4).astype(np.int64)
    # the heavy modules (torch) only once the raw files have been read and checked
    from dig_torchrec.data.build import build_in_memory, item_key_csr
    from dig_torchrec.data.u2i import U2ISpec, describe

    meta = DatasetMeta(
        name="ml100k", num_users=n_users, num_items=n_items,
        user_features={"age_bucket": len(AGE_EDGES) + 1, "gender": 2, "occupation": len(occupations), "zip_prefix": 11},
        context_features={},
        item_features={"primary_genre": NUM_GENRES, "genre_set": int(items["num_genre_sets"]),
                       "year_bucket": len(YEAR_EDGES) + 2},
        u2i_dim=3, history_length=history_length, u2i_fields=["genres"],
        u2i_stats=["exposures", "clicks", "rating_sum"],
        extra={"source": "movielens-100k", "u2i_field_cardinality": {"genres": NUM_GENRES},
               "click": "rating >= 4"},
    )
    spec = U2ISpec.from_meta(meta)
    meta.extra["u2i"] = describe(spec)
    g_len = np.array([len(g) for g in items["genres"]])
    g_off = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(g_len, out=g_off[1:])
    g_vals = np.concatenate([np.asarray(g, dtype=np.int64) for g in items["genres"]])
    keys = item_key_csr(spec, [(g_off, g_vals)])
    cols = {"user_id": user, "item_id": item, "timestamp": r["timestamp"], "label": label,
            **{k: v[user] for k, v in users.items()}}
    increments = np.stack([np.ones(len(user)), label.astype(np.float64), r["rating"].astype(np.float64)], 1)
    genres_arr = pa.ListArray.from_arrays(pa.array(g_off.astype(np.int32)), pa.array(g_vals, type=pa.int64()))
    item_cols = {"item_id": np.arange(n_items), "primary_genre": items["primary_genre"], "genre_set": items["genre_set"],
                 "year_bucket": items["year_bucket"], "genres": genres_arr}
    counts = build_in_memory(out, meta, cols, list(users), increments, keys, item_cols, row_group_size=row_group_size)
    return {"rows": counts}
