"""Every bad input of issue 2 gets an error naming the file and the column, exit status 2."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dig_torchrec.cli import main as dig_main
from dig_torchrec.data.reader import ExposureReader, open_dataset
from dig_torchrec.errors import DataError

PART = Path("train") / "part-00000.parquet"


@pytest.fixture()
def dataset_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    (root / ".dig_validated.json").unlink(missing_ok=True)
    return root


def _rewrite(root: Path, fn: Callable[[pa.Table], pa.Table]) -> Path:
    path = root / PART
    table = pq.read_table(path)
    pq.write_table(fn(table), path, row_group_size=512)
    return path


def _set(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, array)


def _int_col_with(table: pa.Table, name: str, row: int, value) -> pa.Array:
    v = table.column(name).to_pylist()
    v[row] = value
    return pa.array(v, type=pa.int64())


def _u2i_with(table: pa.Table, row: int, values) -> pa.Array:
    v = table.column("u2i").to_pylist()
    v[row] = values
    return pa.array(v, type=pa.list_(pa.float32()))


def _expect_error(capsys, root: Path, *needles: str, extra=()) -> str:
    assert dig_main(["data", "validate", str(root), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert str(root / PART) in err or "train" in err, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    return err


def test_missing_column(dataset_copy, capsys):
    _rewrite(dataset_copy, lambda t: t.drop_columns(["device"]))
    _expect_error(capsys, dataset_copy, str(dataset_copy / PART), "missing column 'device'")


def test_wrong_dtype(dataset_copy, capsys):
    _rewrite(dataset_copy, lambda t: _set(t, "age_bucket", t.column("age_bucket").cast(pa.float64())))
    _expect_error(capsys, dataset_copy, str(dataset_copy / PART), "column 'age_bucket'", "dtype double")


def test_null_in_required_column(dataset_copy, capsys):
    _rewrite(dataset_copy, lambda t: _set(t, "user_id", _int_col_with(t, "user_id", 5, None)))
    _expect_error(capsys, dataset_copy, str(dataset_copy / PART), "column 'user_id' row 5", "null")


def test_negative_id(dataset_copy, capsys):
    _rewrite(dataset_copy, lambda t: _set(t, "item_id", _int_col_with(t, "item_id", 3, -1)))
    _expect_error(capsys, dataset_copy, str(dataset_copy / PART), "column 'item_id' row 3", "negative id -1")


def test_id_beyond_table_size_unless_hashing(dataset_copy, capsys, tiny_data_config):
    big = 300 + 5  # micro preset: 300 users
    _rewrite(dataset_copy, lambda t: _set(t, "user_id", _int_col_with(t, "user_id", 7, big)))
    _expect_error(capsys, dataset_copy, str(dataset_copy / PART), "column 'user_id' row 7", "beyond table size 300")
    # with hashing the same file is accepted and the id is taken modulo the table size
    assert dig_main(["data", "validate", str(dataset_copy), "--hash-ids"]) == 0
    cfg = dataclasses.replace(tiny_data_config, path=str(dataset_copy), hash_ids=True, shuffle_buffer=0)
    meta, schema = open_dataset(dataset_copy, cfg)
    batch = next(iter(ExposureReader(dataset_copy, "train", cfg, schema, shuffle=False)))
    assert int(batch.sparse_features["user_id"].values()[7]) == big % 300
    # and without hashing the reader itself refuses it too
    cfg2 = dataclasses.replace(cfg, hash_ids=False)
    with pytest.raises(DataError, match="column 'user_id' row 7"):
        next(iter(ExposureReader(dataset_copy, "train", cfg2, schema, shuffle=False)))


def test_nan_and_inf_in_u2i(dataset_copy, capsys, tiny_data_config):
    def nan_row(t):
        u = np.stack(t.column("u2i").to_numpy(zero_copy_only=False)).astype(np.float32)
        u[4, 2] = np.nan
        u[9, 0] = np.inf
        return _set(t, "u2i", pa.FixedSizeListArray.from_arrays(pa.array(u.reshape(-1)), 6))

    _rewrite(dataset_copy, nan_row)
    _expect_error(capsys, dataset_copy, str(dataset_copy / PART), "column 'u2i' row 4", "NaN or inf")
    # the training entry point refuses it before any step
    with pytest.raises(DataError, match="column 'u2i' row 4"):
        open_dataset(dataset_copy, dataclasses.replace(tiny_data_config, path=str(dataset_copy)))


def test_u2i_of_wrong_fixed_length(dataset_copy, capsys):
    def five(t):
        u = np.stack(t.column("u2i").to_numpy(zero_copy_only=False)).astype(np.float32)[:, :5]
        return _set(t, "u2i", pa.FixedSizeListArray.from_arrays(pa.array(u.reshape(-1)), 5))

    _rewrite(dataset_copy, five)
    _expect_error(capsys, dataset_copy, str(dataset_copy / PART), "column 'u2i'", "list length 5", "d_c=6")


def test_u2i_row_of_wrong_length(dataset_copy, capsys):
    _rewrite(dataset_copy, lambda t: _set(t, "u2i", _u2i_with(t, 2, [0.0] * 5)))
    _expect_error(capsys, dataset_copy, str(dataset_copy / PART), "column 'u2i' row 2", "list length 5")


def test_empty_dataset(dataset_copy, capsys):
    _rewrite(dataset_copy, lambda t: t.slice(0, 0))
    _expect_error(capsys, dataset_copy, "empty dataset", str(dataset_copy / "train"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_parquet(dataset_copy, capsys, damage):
    path = dataset_copy / PART
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a parquet file" * 100)
    _expect_error(capsys, dataset_copy, str(path), "corrupt or truncated parquet")


def test_user_state_missing_on_click(dataset_copy, capsys):
    def drop_state(t):
        lab = t.column("label").to_numpy()
        row = int(np.flatnonzero(lab > 0)[0])
        s = t.column("user_state").to_pylist()
        s[row] = None
        return _set(t, "user_state", pa.array(s, type=t.schema.field("user_state").type)), row

    holder = {}

    def fn(t):
        out, holder["row"] = drop_state(t)
        return out

    _rewrite(dataset_copy, fn)
    _expect_error(capsys, dataset_copy, f"column 'user_state' row {holder['row']}", "null on a click row")


def test_missing_meta_and_missing_split(tmp_path, capsys, dataset_copy):
    assert dig_main(["data", "validate", str(tmp_path)]) == 2
    assert "meta.json" in capsys.readouterr().err
    shutil.rmtree(dataset_copy / "train")
    _expect_error(capsys, dataset_copy, "empty dataset")


def test_real_cli_exit_status(dataset_copy):
    _rewrite(dataset_copy, lambda t: t.drop_columns(["label"]))
    proc = subprocess.run([sys.executable, "-m", "dig_torchrec.cli", "data", "validate", str(dataset_copy)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"error: {dataset_copy / PART}: missing column 'label'" in proc.stderr
