"""Synthetic generator: sizes, time order, leave-last-out split, planted structure, chunking."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from dig_torchrec.cli import main as dig_main
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.data.synthetic import generate, preset, rows_per_user


def _table(root, split):
    return pads.dataset(str(root / split)).to_table()


def test_tiny_preset_via_cli_is_sized(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert dig_main(["data", "synth", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    total = sum(summary["rows"].values())
    assert 55_000 < total < 65_000
    meta = DatasetMeta.load(out)
    assert (meta.num_users, meta.num_items, meta.u2i_dim) == (2000, 600, 6)
    assert meta.u2i_fields == ["category", "brand"] and meta.u2i_stats == ["exposures", "clicks", "value_sum"]
    items = pads.dataset(str(out / "items.parquet")).to_table()
    assert items.column("item_id").to_pylist() == list(range(600))  # the whole corpus
    assert (out / "retrieval" / "valid.parquet").exists() and (out / "retrieval" / "test.parquet").exists()
    # an existing dataset is never overwritten
    assert dig_main(["data", "synth", "--preset", "tiny", "--out", str(out)]) == 2
    assert "already holds a dataset" in capsys.readouterr().err


def test_rows_override(tmp_path):
    summary = generate(preset("micro", num_rows=3000), tmp_path / "d")
    assert 2500 < sum(summary["rows"].values()) < 3500


def test_time_order_and_leave_last_out_split(tiny_dataset):
    splits = {s: _table(tiny_dataset, s).to_pydict() for s in ("train", "valid", "test")}
    targets = {s: _table(tiny_dataset, f"retrieval/{s}.parquet").to_pydict() for s in ("valid", "test")}
    per_user = {}
    for code, s in enumerate(("train", "valid", "test")):
        d = splits[s]
        for i in range(len(d["user_id"])):
            per_user.setdefault(d["user_id"][i], []).append((d["timestamp"][i], code, d["label"][i], d["item_id"][i]))
    tgt = {s: dict(zip(targets[s]["user_id"], zip(targets[s]["timestamp"], targets[s]["item_id"]))) for s in targets}
    for user, rows in per_user.items():
        rows.sort()
        ts = [r[0] for r in rows]
        assert len(set(ts)) == len(ts), "synthetic timestamps are strictly increasing per user"
        codes = [r[1] for r in rows]
        assert codes == sorted(codes), f"user {user}: splits not in time order"
        clicks = [r for r in rows if r[2] == 1]
        if len(clicks) < 3:
            assert set(codes) == {0} and user not in tgt["valid"] and user not in tgt["test"]
            continue
        second, last = clicks[-2], clicks[-1]
        assert all(r[1] == 0 for r in rows if r[0] < second[0])
        assert all(r[1] == 1 for r in rows if second[0] <= r[0] < last[0])
        assert all(r[1] == 2 for r in rows if r[0] >= last[0])
        assert tgt["valid"][user] == (second[0], second[3])
        assert tgt["test"][user] == (last[0], last[3])
    assert len(tgt["test"]) > 20


def test_planted_structure_is_learnable_and_shuffled_labels_are_not(tiny_dataset):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    def xy(split):
        t = _table(tiny_dataset, split)
        u2i = np.stack(t.column("u2i").to_numpy(zero_copy_only=False))
        dev = np.eye(4)[t.column("device").to_numpy()]
        return np.hstack([u2i, dev]), t.column("label").to_numpy()

    x, y = xy("train")
    x2, y2 = np.vstack([xy("valid")[0], xy("test")[0]]), np.concatenate([xy("valid")[1], xy("test")[1]])
    x, y = np.vstack([x, x2]), np.concatenate([y, y2])
    rng = np.random.default_rng(0)
    fit = rng.random(len(y)) < 0.5

    def auc_of(labels):
        model = LogisticRegression(max_iter=1000).fit(x[fit], labels[fit])
        return roc_auc_score(labels[~fit], model.predict_proba(x[~fit])[:, 1])

    auc = auc_of(y)
    assert auc > 0.6, auc
    auc_shuffled = auc_of(rng.permutation(y))  # null distribution: std ~0.01 at this size
    assert abs(auc_shuffled - 0.5) < 0.04, auc_shuffled


def test_item_features_correlate_with_item_factors():
    from dig_torchrec.data.synthetic import make_items

    world = make_items(preset("tiny"))
    f = world.unit_factors
    same_cat = world.category[:, None] == world.category[None, :]
    sims = f @ f.T
    off = ~np.eye(len(f), dtype=bool)
    assert sims[same_cat & off].mean() > sims[~same_cat].mean() + 0.2


def test_chunked_multiprocess_generation_is_deterministic(tmp_path):
    many = generate(preset("micro", chunk_rows=2500), tmp_path / "many", processes=2)
    assert many["chunks"] > 1
    assert len(list((tmp_path / "many" / "train").glob("*.parquet"))) == many["chunks"]
    rows = pa.concat_tables([_table(tmp_path / "many", s) for s in ("train", "valid", "test")]).num_rows
    assert rows == sum(rows_per_user(preset("micro")))
    again = generate(preset("micro", chunk_rows=2500), tmp_path / "again", processes=1)
    assert again["rows"] == many["rows"]
    a = _table(tmp_path / "many", "train").sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    b = _table(tmp_path / "again", "train").sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    assert a.equals(b)


def test_unknown_preset_is_an_error(tmp_path, capsys):
    assert dig_main(["data", "synth", "--preset", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "unknown synth preset 'huge'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- retrieval signal + oracle
def test_retrieval_signal_is_opt_in_and_on_for_the_industrial_presets():
    """micro/tiny keep p_brand = 0 (their data is unchanged); the industrial presets plant it."""
    assert preset("micro").p_brand == 0 and preset("tiny").p_brand == 0
    assert preset("industrial_small").p_brand > 0 and preset("industrial_large").p_brand > 0


def _brand_chunk(p_brand, rows_per_user=40_000, users=3):
    from dig_torchrec.data.synthetic import _world, generate_chunk

    cfg = preset("micro", p_brand=p_brand, num_users=users)
    chunk = generate_chunk(cfg, 0, 0, np.full(users, rows_per_user))
    return cfg, _world(cfg), chunk


def test_oracle_exposure_matches_the_sampled_exposures():
    """The oracle's P(exposure | user) is the generator's real exposure law (total variation
    against 40K sampled exposures per user), and misses it when the brand draw is ignored."""
    from dataclasses import replace

    from dig_torchrec.data.synthetic import oracle_exposure

    cfg, world, chunk = _brand_chunk(0.7)
    assert (chunk.users.fav_brand >= 0).all()
    user = chunk.table.column("user_id").to_numpy()
    item = chunk.table.column("item_id").to_numpy()
    expo = oracle_exposure(cfg, world, chunk.users, np.arange(3))
    np.testing.assert_allclose(expo.sum(axis=1), 1.0, atol=1e-9)
    no_brand = oracle_exposure(replace(cfg, p_brand=0.0), world, chunk.users, np.arange(3))
    for u in range(3):
        emp = np.bincount(item[user == u], minlength=cfg.num_items) / (user == u).sum()
        assert 0.5 * np.abs(emp - expo[u]).sum() < 0.04  # sampling noise alone: ~0.02
        assert 0.5 * np.abs(emp - no_brand[u]).sum() > 0.1  # the brand draw moves real mass (~0.16 here)


def test_oracle_ranks_the_users_clicks_far_above_popularity():
    """Items the oracle puts in a user's top-10 collect most of that user's clicks; the
    world's 10 most popular items collect few."""
    from dig_torchrec.data.synthetic import oracle_scores

    cfg, world, chunk = _brand_chunk(0.7)
    user = chunk.table.column("user_id").to_numpy()
    item = chunk.table.column("item_id").to_numpy()
    label = chunk.table.column("label").to_numpy()
    top_pop = np.argsort(-world.log_pop)[:10]
    for u in range(3):
        clicked = item[(user == u) & (label > 0)]
        dev = np.bincount(chunk.table.column("device").to_numpy()[user == u]).argmax()
        top_oracle = np.argsort(-oracle_scores(cfg, world, chunk.users, np.array([u]), np.array([dev]))[0])[:10]
        assert np.isin(clicked, top_oracle).mean() > max(0.5, 2 * np.isin(clicked, top_pop).mean())


def test_meta_records_the_oracle_and_popularity_stays_a_small_fraction(tmp_path, capsys):
    """`dig data synth --p-brand` plants a learnable signal; meta.json states the oracle R@10,
    popularity's R@10 on the same targets, and popularity stays <= 0.25 of the oracle."""
    out = tmp_path / "brand"
    assert dig_main(["data", "synth", "--preset", "tiny", "--p-brand", "0.7", "--out", str(out)]) == 0
    oracle = DatasetMeta.load(out).extra["retrieval_oracle"]
    assert oracle["users"] == oracle["test_users"] > 500
    assert oracle["recall@10"] > 0.6
    assert oracle["popularity_fraction_of_oracle"] <= 0.25
    plain = generate(preset("tiny"), tmp_path / "plain")["retrieval_oracle"]
    assert oracle["recall@10"] > plain["recall@10"] + 0.1  # the brand signal concentrates the next click
    capsys.readouterr()
    assert dig_main(["data", "synth", "--preset", "tiny", "--p-brand", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--p-brand must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
