"""Preflight: every check fires before training starts, before the process group, before any write."""

from __future__ import annotations

import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch.distributed as dist

from dig_torchrec.config import DataConfig, load_config
from dig_torchrec.data.reader import ExposureReader
from dig_torchrec.errors import CheckpointError, ConfigError, DataError
from dig_torchrec.training.preflight import check_work_split, run_preflight

REPO = Path(__file__).resolve().parents[1]


def _cfg(data: Path, run: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny.yaml",
                       [f"data.path={data}", f"run_dir={run}", "data.history_length=5", "data.batch_size=64", *extra])


def test_clean_run_passes_and_mirrors_the_reader_split(tiny_dataset: Path, tmp_path: Path,
                                                       tiny_meta_schema) -> None:
    report = run_preflight(_cfg(tiny_dataset, tmp_path / "run"), world_size=2, device_type="cpu")
    _, schema = tiny_meta_schema
    cfg = DataConfig(path=str(tiny_dataset), batch_size=64, history_length=5)
    readers = [ExposureReader(tiny_dataset, "train", cfg, schema, rank=r, world_size=2) for r in range(2)]
    assert report.slot_rows["train"] == [r.rows for r in readers]  # same row-group assignment as the reader
    train_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (tiny_dataset / "train").glob("*.parquet"))
    assert sum(report.slot_rows["train"]) == train_rows and min(report.slot_rows["train"]) > 0
    assert report.resume_from is None and (tmp_path / "run").is_dir()


def test_trainer_fails_before_process_group_and_before_writing(tmp_path: Path, tiny_dataset: Path) -> None:
    from dig_torchrec.training.trainer import Trainer

    bad = tmp_path / "data"
    shutil.copytree(tiny_dataset, bad, ignore=shutil.ignore_patterns(".dig_validated.json"))
    (bad / "valid" / "part-00000.parquet").write_bytes(b"PAR1 not really")
    run = tmp_path / "run"
    joined = dist.is_initialized()
    with pytest.raises(DataError, match=r"valid/part-00000\.parquet: corrupt or truncated parquet file"):
        Trainer(_cfg(bad, run))
    assert dist.is_initialized() == joined  # failed before init_distributed
    assert not run.exists()  # and before the run directory was created


def test_workers_that_get_no_row_group_name_the_key(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_dataset, tmp_path, "data.num_workers=8")
    assert len(check_work_split(cfg, 1, "train")) == 8
    with pytest.raises(ConfigError, match=r"split 'train' .* 14 row group\(s\) .* 16 slots \(world size 2 x "
                                          r"max\(1, data\.num_workers=8\)\): rank 1 worker 6 would get no rows"):
        check_work_split(cfg, 2, "train")


def test_short_valid_split_only_warns(tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tiny_dataset, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dig_torchrec.training.preflight"):
        rows = check_work_split(cfg, 3, "valid", required=False)  # 2 row groups, 3 ranks
    assert sorted(rows)[0] == 0 and "split 'valid'" in caplog.text


def test_full_disk_is_refused_before_training(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (100 << 20), 100 << 20))
    with pytest.raises(ConfigError, match=r"'run_dir' = '.*': only 100 MB free on its disk, below "
                                          r"train\.min_free_disk_mb=512"):
        run_preflight(_cfg(tiny_dataset, tmp_path / "run"), device_type="cpu")


def test_incomplete_checkpoint_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    half = tmp_path / "run" / "checkpoints" / "step-5"
    half.mkdir(parents=True)
    (half / ".metadata").write_bytes(b"")  # tensors written, COMPLETE never was
    with pytest.raises(CheckpointError, match=r"step-5: checkpoint is incomplete \(no COMPLETE marker\)"):
        run_preflight(_cfg(tiny_dataset, tmp_path / "run"), resume=str(half), device_type="cpu")
    assert run_preflight(_cfg(tiny_dataset, tmp_path / "run"), resume="auto", device_type="cpu").resume_from is None


def test_config_built_in_code_gets_the_same_scalar_checks(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_dataset, tmp_path / "run")
    cfg.data.batch_size = 0  # bypasses load_config
    with pytest.raises(ConfigError, match=r"config key 'data\.batch_size' = 0; must be > 0"):
        run_preflight(cfg, device_type="cpu")
    assert not (tmp_path / "run").exists()
