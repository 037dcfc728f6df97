"""KuaiRec and Taobao converters on tiny fixtures written in the published column layouts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from dig_torchrec.cli import main as dig_main
from dig_torchrec.data.schema import DatasetMeta


def _all(root: Path, split: str):
    return pads.dataset(str(root / split)).to_table().to_pylist()


# ----------------------------------------------------------------------------- KuaiRec
@pytest.fixture()
def kuairec_src(tmp_path: Path) -> Path:
    src = tmp_path / "KuaiRec" / "data"
    src.mkdir(parents=True)
    header = "user_id,video_id,play_duration,video_duration,time,date,timestamp,watch_ratio\n"
    rows = [  # (user, video, duration ms, timestamp s, watch_ratio); file order != time order
        (14, 183, 8000, "500.0", 2.0), (14, 148, 10000, "100.0", 1.2), (21, 148, 10000, "50.0", 0.1),
        (14, 183, 8000, "200.5", 0.5), (14, 3649, 60000, "300.0", 0.8), (14, 148, 10000, "", 0.9),
        (14, 148, 10000, "400.0", 0.9)]
    (src / "small_matrix.csv").write_text(header + "".join(
        f"{u},{v},{int(w * d)},{d},2020-07-05 05:27:48.378,20200705,{t},{w}\n" for u, v, d, t, w in rows))
    (src / "item_categories.csv").write_text('video_id,feat\n9,[8]\n148,[11]\n183,"[27, 9]"\n3649,"[8, 11]"\n')
    (src / "user_features.csv").write_text(
        "user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,follow_user_num,"
        "follow_user_num_range,fans_user_num,fans_user_num_range,friend_user_num,friend_user_num_range,"
        "register_days,register_days_range,onehot_feat0,onehot_feat1\n"
        '14,high_active,0,0,0,5,"(0,10]",1,"[1,10)",0,0,107,61-90,0,3\n'
        '21,full_active,0,0,1,386,"(250,500]",4,"[1,10)",2,"[1,5)",327,181-365,1,7\n')
    return src


def test_kuairec_hand_checked(kuairec_src, tmp_path):
    out = tmp_path / "kr"
    assert dig_main(["data", "convert", "kuairec", "--src", str(kuairec_src), "--out", str(out)]) == 0
    meta = DatasetMeta.load(out)
    assert (meta.num_users, meta.num_items, meta.u2i_dim) == (2, 4, 3)  # video 9 never played but in corpus
    items = pq.read_table(out / "items.parquet").to_pydict()
    assert items["tags"] == [[8], [11], [27, 9], [8, 11]]  # raw ids 9, 148, 183, 3649 -> 0..3
    assert items["primary_tag"] == [9, 12, 28, 9]
    train, valid, test = (_all(out, s) for s in ("train", "valid", "test"))
    seq = lambda rows: [(r["timestamp"], r["item_id"], r["label"]) for r in rows if r["user_id"] == 0]
    # the row without a timestamp is dropped; clicks = watch_ratio >= 0.7 at 100, 300, 400, 500 s
    assert seq(train) == [(100_000, 1, 1), (200_500, 2, 0), (300_000, 3, 1)]
    assert seq(valid) == [(400_000, 1, 1)]
    assert seq(test) == [(500_000, 2, 1)]
    assert [r["user_id"] for r in train].count(1) == 1 and not [r for r in valid + test if r["user_id"] == 1]
    d = valid[0]
    # tag 11 before 400 s: plays at 100 (wr 1.2, click) and 300 (wr 0.8, click)
    np.testing.assert_allclose(d["u2i"], [math.log1p(2), 1.0, 1.0], rtol=1e-6)
    e = test[0]
    # tags 27 and 9 before 500 s: one play each at 200.5 (wr 0.5, no click)
    np.testing.assert_allclose(e["u2i"], [math.log1p(2), 0.0, 0.5], rtol=1e-6)
    assert e["history"] == [1, 3, 1]
    assert d["active_degree"] == 2 and d["is_video_author"] == 1  # sorted dense ids, 0 = missing
    assert d["hour"] == ((400 + 8 * 3600) // 3600) % 24
    assert dig_main(["data", "validate", str(out)]) == 0


def test_kuairec_missing_column_is_named(kuairec_src, tmp_path, capsys):
    p = kuairec_src / "small_matrix.csv"
    p.write_text(p.read_text().replace("watch_ratio", "ratio"))
    assert dig_main(["data", "convert", "kuairec", "--src", str(kuairec_src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "missing column 'watch_ratio'" in err


# ----------------------------------------------------------------------------- Taobao
@pytest.fixture()
def taobao_src(tmp_path: Path) -> Path:
    src = tmp_path / "taobao"
    src.mkdir()
    (src / "raw_sample.csv").write_text(
        "user,time_stamp,adgroup_id,pid,nonclk,clk\n"
        "581738,300,1,430548_1007,0,1\n581738,100,1,430548_1007,0,1\n7,150,3,430539_1007,1,0\n"
        "581738,200,2,430539_1007,1,0\n581738,500,2,430548_1007,0,1\n581738,400,3,430548_1007,0,1\n")
    (src / "ad_feature.csv").write_text(
        "adgroup_id,cate_id,campaign_id,customer,brand,price\n"
        "1,6406,83237,1,95471,170.0\n2,6406,83238,2,NULL,99.0\n3,4520,83239,3,95471,10.0\n4,1,1,1,1,1.0\n")
    (src / "user_profile.csv").write_text(
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
        "new_user_class_level \n581738,0,5,2,5,,3,0,3\n7,0,1,1,2,1,2,1,\n")
    (src / "behavior_log.csv").write_text(
        "user,time_stamp,btag,cate,brand\n581738,250,buy,6406,95471\n581738,250,pv,6406,95471\n"
        "581738,500,buy,4520,1\n99,10,buy,6406,95471\n")
    return src


def test_taobao_hand_checked(taobao_src, tmp_path):
    out = tmp_path / "tb"
    assert dig_main(["data", "convert", "taobao", "--src", str(taobao_src), "--out", str(out)]) == 0
    meta = DatasetMeta.load(out)
    assert (meta.num_users, meta.num_items, meta.u2i_dim) == (2, 4, 6)
    assert meta.u2i_fields == ["cate_id", "brand"] and meta.u2i_stats == ["impressions", "clicks", "purchases"]
    items = pq.read_table(out / "items.parquet").to_pydict()
    # dense ids, sorted, 0 = missing: cate 1 -> 1, 4520 -> 2, 6406 -> 3; brand NULL -> 0, 1 -> 1, 95471 -> 2
    assert items["cate_id"] == [3, 3, 2, 1] and items["brand"] == [2, 0, 2, 1]
    train, valid, test = (_all(out, s) for s in ("train", "valid", "test"))
    u = lambda rows: [(r["timestamp"], r["item_id"], r["label"]) for r in rows if r["user_id"] == 1]  # 581738 -> 1
    assert u(train) == [(100, 0, 1), (200, 1, 0), (300, 0, 1)]
    assert u(valid) == [(400, 2, 1)] and u(test) == [(500, 1, 1)]
    # ad 3 at 400 (cate 4520 unseen; brand 95471: 2 impressions, 2 clicks, 1 purchase at 250)
    np.testing.assert_allclose(valid[0]["u2i"], [0, 0, 0, math.log1p(2), 1.0, math.log1p(1)], rtol=1e-6)
    # ad 2 at 500 (cate 6406: 3 impressions, 2 clicks, 1 purchase; the purchase at 500 is not earlier;
    # brand unknown: the NULL-brand impression at 200)
    np.testing.assert_allclose(test[0]["u2i"], [math.log1p(3), 2 / 3, math.log1p(1), math.log1p(1), 0.0, 0.0],
                               rtol=1e-6)
    state = {d["key"]: (d["impressions"], d["clicks"], d["purchases"]) for d in test[0]["user_state"]}
    off = 4  # key offset of brand = cate_id cardinality (3 known + unknown)
    assert state == {3: (3, 2, 1), 2: (1, 1, 0), off + 2: (3, 3, 1), off + 0: (1, 0, 0)}
    r = valid[0]
    assert (r["final_gender_code"], r["age_level"], r["pvalue_level"]) == (2, 2, 0)  # pvalue missing -> 0
    assert r["pid"] == 2 and r["hour"] == ((400 + 8 * 3600) // 3600) % 24
    assert dig_main(["data", "validate", str(out)]) == 0


def test_taobao_max_rows(taobao_src, tmp_path):
    from dig_torchrec.data.taobao import convert

    summary = convert(taobao_src, tmp_path / "tb2", max_rows=3)
    assert sum(summary["rows"].values()) == 3
