"""Opening a dataset: meta.json, the feature schema, and a validation of every file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from dig_torchrec.config import DataConfig
from dig_torchrec.data.schema import DatasetMeta, FeatureSchema
from dig_torchrec.data.validate import validate_dataset


def open_dataset(root: str | Path, data_cfg: DataConfig, deep: Optional[bool] = None) -> Tuple[DatasetMeta, FeatureSchema]:
    """Load meta.json, build the schema and validate every file (raises DataError).

    Args:
        root: dataset root.
        data_cfg: data config (history length, hash_ids).
        deep: also scan values (NaN/inf u2i, id ranges, list lengths); default: yes, cached in
            ``ROOT/.dig_validated.json`` per file size/mtime.
    """
    meta = DatasetMeta.load(root)
    schema = FeatureSchema.from_meta(meta, data_cfg.history_length)
    validate_dataset(root, data_cfg, meta=meta, schema=schema, deep=True if deep is None else deep, use_cache=deep is None)
    return meta, schema
