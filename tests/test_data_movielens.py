"""MovieLens 100K converter: hand-checked rows on a tiny fixture and on the real files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from dig_torchrec.cli import main as dig_main
from dig_torchrec.data.schema import DatasetMeta

GENRE_FLAGS = 19


def _flags(*on: int) -> str:
    return "|".join("1" if g in on else "0" for g in range(GENRE_FLAGS))


@pytest.fixture()
def ml_fixture(tmp_path: Path) -> Path:
    src = tmp_path / "ml-mini"
    src.mkdir()
    (src / "u.occupation").write_text("administrator\nartist\nother\n")
    (src / "u.user").write_text("1|24|M|artist|55105\n2|53|F|other|L9G2B\n")
    (src / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags(3, 4, 5)}\n"
        f"2|Star Wars (1977)|01-Jan-1977||http://y|{_flags(1)}\n"
        f"3|Mystery||| |{_flags()}\n", encoding="latin-1")
    # file order deliberately not time order; user 1 has a timestamp tie at 200
    (src / "u.data").write_text("\n".join("\t".join(map(str, r)) for r in [
        (1, 2, 5, 400), (2, 2, 4, 50), (1, 2, 3, 200), (1, 1, 5, 100), (1, 1, 4, 200),
        (2, 3, 1, 60), (1, 3, 4, 300), (1, 1, 2, 500)]) + "\n")
    return src


def _rows(root: Path, split: str):
    return pads.dataset(str(root / split)).to_table().to_pylist()


def test_hand_checked_conversion(ml_fixture, tmp_path):
    out = tmp_path / "out"
    assert dig_main(["data", "convert", "movielens", "--src", str(ml_fixture), "--out", str(out)]) == 0
    meta = DatasetMeta.load(out)
    assert (meta.num_users, meta.num_items, meta.u2i_dim) == (2, 3, 3)
    assert meta.user_features == {"age_bucket": 7, "gender": 2, "occupation": 3, "zip_prefix": 11}
    assert meta.u2i_fields == ["genres"] and meta.u2i_stats == ["exposures", "clicks", "rating_sum"]
    items = pq.read_table(out / "items.parquet").to_pydict()
    assert items["primary_genre"] == [3, 1, 0]
    assert items["genre_set"] == [0, 1, 2]
    assert items["year_bucket"] == [6, 3, 0]  # 1995 -> 1 + 5 edges, 1977 -> 1 + 2, missing -> 0
    assert items["genres"] == [[3, 4, 5], [1], [0]]
    train, valid, test = (_rows(out, s) for s in ("train", "valid", "test"))
    u0 = lambda rows: [(r["timestamp"], r["item_id"]) for r in rows if r["user_id"] == 0]
    # user 1 (id 0): clicks at 100, 200 (item 0), 300, 400 -> valid starts at 300, test at 400
    assert u0(train) == [(100, 0), (200, 1), (200, 0)]  # tie at 200 kept in file order
    assert u0(valid) == [(300, 2)]
    assert u0(test) == [(400, 1), (500, 0)]
    # user 2 (id 1) has one click: train only
    assert [(r["timestamp"], r["label"]) for r in train if r["user_id"] == 1] == [(50, 1), (60, 0)]
    assert not [r for r in valid + test if r["user_id"] == 1]
    by_ts = {r["timestamp"]: r for r in train + valid + test if r["user_id"] == 0 and r["timestamp"] != 200}
    tie = [r for r in train if r["user_id"] == 0 and r["timestamp"] == 200]
    # row (item 0, ts 200): only ts 100 is strictly earlier: 3 genres x (1 exposure, 1 click, rating 5)
    np.testing.assert_allclose(tie[1]["u2i"], [math.log1p(3), 1.0, 5.0], rtol=1e-6)
    assert tie[1]["history"] == [0] and tie[0]["history"] == [0]
    # row (item 1 = Action, ts 400): Action seen once before (ts 200, rating 3, no click)
    np.testing.assert_allclose(by_ts[400]["u2i"], [math.log1p(1), 0.0, 3.0], rtol=1e-6)
    # row (item 0, ts 500): genres 3,4,5 each (2 exposures, 2 clicks, ratings 9)
    np.testing.assert_allclose(by_ts[500]["u2i"], [math.log1p(6), 1.0, 4.5], rtol=1e-6)
    assert by_ts[500]["history"] == [0, 0, 2, 1]
    assert by_ts[100]["u2i"] == [0.0, 0.0, 0.0] and by_ts[100]["history"] == []
    # user features
    assert (by_ts[100]["age_bucket"], by_ts[100]["gender"], by_ts[100]["occupation"], by_ts[100]["zip_prefix"]) == (1, 0, 1, 5)
    u1 = [r for r in train if r["user_id"] == 1][0]
    assert (u1["age_bucket"], u1["gender"], u1["occupation"], u1["zip_prefix"]) == (5, 1, 2, 10)
    # click rows carry the state keyed by genre; the ts 400 click sees genres 0,1,3,4,5
    state = {d["key"]: (d["exposures"], d["clicks"], d["rating_sum"]) for d in by_ts[400]["user_state"]}
    assert state == {0: (1, 1, 4), 1: (1, 0, 3), 3: (2, 2, 9), 4: (2, 2, 9), 5: (2, 2, 9)}
    assert by_ts[500]["user_state"] is None  # not a click
    # retrieval targets: second-to-last (valid) and last (test) clicks
    rv = _rows(out, "retrieval/valid.parquet")
    rt = _rows(out, "retrieval/test.parquet")
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in rv] == [(0, 2, 300)]
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in rt] == [(0, 1, 400)]
    assert dig_main(["data", "validate", str(out)]) == 0


def test_missing_source_file_is_an_error(ml_fixture, tmp_path, capsys):
    (ml_fixture / "u.user").unlink()
    assert dig_main(["data", "convert", "movielens", "--src", str(ml_fixture), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "u.user" in err and "not found" in err


def _ml100k_dir() -> Path | None:
    candidates = [os.environ.get("DIG_ML100K", ""), str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ml-100k"),
                  "/work/shared/data/ml-100k"]
    for c in candidates:
        if c and (Path(c) / "u.data").exists():
            return Path(c)
    return None


ML100K = _ml100k_dir()


@pytest.mark.skipif(ML100K is None, reason="MovieLens 100K not found: looked in $DIG_ML100K, ../shared/data/ml-100k "
                                            "(relative to the repo) and /work/shared/data/ml-100k")
def test_real_ml100k_matches_independent_recomputation(tmp_path):
    from dig_torchrec.data.movielens import convert

    out = tmp_path / "ml100k"
    convert(ML100K, out)
    meta = DatasetMeta.load(out)
    assert (meta.num_users, meta.num_items) == (943, 1682)
    splits = {s: pads.dataset(str(out / s)).to_table() for s in ("train", "valid", "test")}
    assert sum(t.num_rows for t in splits.values()) == 100_000
    # independent recomputation for a few users straight from the raw files
    ratings = [tuple(map(int, l.split("\t"))) for l in (ML100K / "u.data").read_text().splitlines()]
    genres = {}
    for line in (ML100K / "u.item").read_text(encoding="latin-1").splitlines():
        p = line.split("|")
        genres[int(p[0]) - 1] = [g for g, f in enumerate(p[-19:]) if f == "1"] or [0]
    for raw_user in (1, 2, 100):
        rows = sorted([r for r in ratings if r[0] == raw_user], key=lambda r: r[3])  # stable: file order on ties
        clicks = [i for i, r in enumerate(rows) if r[2] >= 4]
        codes = [0] * len(rows)
        if len(clicks) >= 3:
            for i in range(len(rows)):
                codes[i] = 2 if i >= clicks[-1] else 1 if i >= clicks[-2] else 0
        got = []
        for code, s in enumerate(("train", "valid", "test")):
            t = splits[s].filter(pads.field("user_id") == raw_user - 1).to_pylist()
            got += [(r["timestamp"], r["item_id"], code, r["u2i"]) for r in t]
        got.sort(key=lambda g: g[0])  # parquet keeps the stable order within a split
        assert [(g[0], g[1], g[2]) for g in got] == [(r[3], r[1] - 1, c) for r, c in zip(rows, codes)]
        for i, r in enumerate(rows):
            n = c = s_ = 0
            for e in rows:
                if e[3] < r[3]:
                    for g in genres[e[1] - 1]:
                        if g in genres[r[1] - 1]:
                            n, c, s_ = n + 1, c + (e[2] >= 4), s_ + e[2]
            expect = [math.log1p(n), c / max(n, 1), s_ / max(n, 1)]
            np.testing.assert_allclose(got[i][3], expect, rtol=1e-6, atol=1e-7)
