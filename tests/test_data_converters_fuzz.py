"""Seeded fuzzing of the three converters: truncated, garbled and emptied raw files.

Each damaged input either converts into a dataset that `dig data validate` accepts (a cut
exactly at a line end is a valid, shorter file) or fails with exit 2 and one line naming
the raw file (and the line, where there is one). Never a traceback, never a dataset that
does not validate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reliability_cases as rc
from dig_torchrec.cli import main as dig_main

FILES = {"movielens": ["u.data", "u.item", "u.user"], "kuairec": ["small_matrix.csv", "item_categories.csv",
                                                                  "user_features.csv"],
         "taobao": ["raw_sample.csv", "ad_feature.csv", "user_profile.csv", "behavior_log.csv"]}
DAMAGES = ("truncate", "garble", "empty", "drop_field", "binary")


def _damage(path: Path, how: str, rng: np.random.Generator) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: int(rng.integers(1, len(data)))])
    elif how == "garble":
        b = bytearray(data)
        for _ in range(3):
            i = int(rng.integers(0, len(b)))
            b[i] = int(rng.choice(list(b"xQ#.-,\t|\"")))
        path.write_bytes(bytes(b))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "drop_field":
        lines = data.decode("latin-1").splitlines()
        j = int(rng.integers(1 if path.suffix == ".csv" else 0, len(lines)))
        sep = "," if path.suffix == ".csv" else ("|" if path.name in ("u.item", "u.user") else "\t")
        parts = lines[j].split(sep)
        del parts[int(rng.integers(0, len(parts)))]
        lines[j] = sep.join(parts)
        path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    else:  # binary garbage of the same size
        path.write_bytes(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())


CASES = [(src, name, how, seed) for seed in range(2) for src, names in FILES.items() for name in names
         for how in DAMAGES]


@pytest.mark.parametrize("source,name,how,seed", CASES, ids=[f"{s}-{n}-{h}-{k}" for s, n, h, k in CASES])
def test_damaged_raw_file_converts_cleanly_or_fails_with_one_named_line(
        source: str, name: str, how: str, seed: int, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "raw"
    rc._RAW[source](src)
    _damage(src / name, how, np.random.default_rng([seed, len(name), DAMAGES.index(how)]))
    out = tmp_path / "out"
    code = dig_main(["data", "convert", source, "--src", str(src), "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert code in (0, 2)
    if code == 2:
        assert len(err) == 1 and err[0].startswith(f"error: {src}/"), err
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    else:
        assert dig_main(["data", "validate", str(out)]) == 0
