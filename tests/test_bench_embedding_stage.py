"""benchmarks/embedding_stage.py end to end at a tiny size (slow: three fresh processes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_embedding_stage_smoke(tmp_path: Path) -> None:
    from benchmarks import embedding_stage

    out = tmp_path / "es.json"
    assert embedding_stage.main(["--users", "20000", "--items", "500", "--batch-size", "64", "--steps", "2",
                                 "--warmup", "1", "--rounds", "1", "--memory-wait-s", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["torchrec_embedding_stage_speedup"] > 0
    assert set(res["rss_gib_per_rank"]) == {"torchrec", "plain_adagrad"}
    tr = res["variants"]["torchrec"]
    assert tr["sharding"] == {"user_id": "table_wise", "item_id": "table_wise"}
    # the fused row-wise Adagrad ran: one state value per row, and it moved
    assert tr["optimizer_state_gib"] * 2**30 == (20000 + 500) * 4
    assert all(r["optimizer_state_abs_sum"] > 0 for r in res["raw_runs"])
    assert res["command"].startswith("python benchmarks/embedding_stage.py --users 20000")
