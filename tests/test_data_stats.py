"""`dig data stats`: numbers checked against a direct computation on the parquet files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads

from dig_torchrec.cli import main as dig_main


def test_stats_match_direct_computation(tiny_dataset, capsys):
    assert dig_main(["data", "stats", str(tiny_dataset), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    t = pads.dataset(str(tiny_dataset / "train")).to_table()
    s = st["splits"]["train"]
    label = t.column("label").to_numpy()
    u2i = np.stack(t.column("u2i").to_numpy(zero_copy_only=False))
    hist_len = t.column("history").combine_chunks().value_lengths().to_numpy()
    assert s["rows"] == t.num_rows
    assert abs(s["positive_rate"] - label.mean()) < 1e-12
    assert abs(s["u2i_coverage"] - (u2i != 0).any(1).mean()) < 1e-12
    assert abs(s["history_length"]["mean"] - round(hist_len.mean(), 3)) < 1e-9
    assert s["history_length"]["max"] == hist_len.max()
    users = t.column("user_id").to_numpy()
    assert s["ids"]["user_id"] == {"min": int(users.min()), "max": int(users.max()),
                                   "distinct": int(np.unique(users).size), "cardinality": 300}
    assert st["rows"] == sum(st["splits"][k]["rows"] for k in ("train", "valid", "test"))
    assert st["retrieval_test_targets"] == pads.dataset(str(tiny_dataset / "retrieval" / "test.parquet")).count_rows()


def test_stats_text_output(tiny_dataset, capsys):
    assert dig_main(["data", "stats", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert "positive rate" in out and "u2i coverage" in out and "history length" in out
    assert "user_id" in out and "cardinality 300" in out
