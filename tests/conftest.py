"""Shared test fixtures.

``tiny_dataset``: a session-scoped synthetic dataset root (the ``micro`` preset: 300 users,
150 items, ~9K rows, row groups of 512 rows, history length 20, d_c = 6), generated once
per test session into a temp dir in well under a second. Use it with e.g.
``DataConfig(path=str(tiny_dataset), batch_size=64, history_length=5)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dig_torchrec.config import DataConfig


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a micro synthetic dataset (meta.json, items.parquet, train/valid/test, retrieval/)."""
    from dig_torchrec.data.synthetic import generate, preset

    root = tmp_path_factory.mktemp("data") / "micro"
    generate(preset("micro", seed=0), root, processes=1)
    return root


@pytest.fixture(scope="session")
def tiny_data_config(tiny_dataset: Path) -> DataConfig:
    """A DataConfig reading ``tiny_dataset`` with small batches."""
    return DataConfig(path=str(tiny_dataset), batch_size=64, eval_batch_size=256, history_length=5,
                      shuffle_buffer=1024, negatives_per_positive=3, retrieval_positives=16)


@pytest.fixture(scope="session")
def tiny_meta_schema(tiny_dataset: Path, tiny_data_config: DataConfig):
    """``(DatasetMeta, FeatureSchema)`` of ``tiny_dataset`` (validated with ``open_dataset``)."""
    from dig_torchrec.data.reader import open_dataset

    return open_dataset(tiny_dataset, tiny_data_config)


def untrained_bundle(data: Path, checkpoint_dir: Path, *overrides: str):
    """An :class:`InferenceBundle` of an untrained, seeded ``DIGModel`` on ``configs/tiny.yaml`` + ``overrides``
    (tokenizer initialized on the catalog; the SID index saved under ``checkpoint_dir``)."""
    import torch

    from dig_torchrec.config import load_config
    from dig_torchrec.data.items import ItemTable
    from dig_torchrec.data.reader import open_dataset
    from dig_torchrec.model import DIGModel
    from dig_torchrec.retrieval.evaluate import bundle_from_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [f"data.path={data}", *overrides])
    meta, schema = open_dataset(data, cfg.data)
    torch.manual_seed(0)
    model = DIGModel(cfg, meta)
    model.eval()
    items = ItemTable.load(data, schema, meta)
    model.initialize_tokenizer(model.corpus_item_representations(items))
    return bundle_from_model(model, cfg, checkpoint_dir)
