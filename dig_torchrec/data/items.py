"""The item table: every item of the corpus with its static (Type-I) features.

``items.parquet`` holds ``item_id`` (0..num_items-1, each exactly once) and the int64 item
feature columns named in ``meta.item_features``. It may also hold

* multi-valued u2i fields as ``list<int64>`` columns (``meta.extra["u2i_field_cardinality"]``),
* ``train_clicks`` (int64): the item's click count in the train split (negative sampling
  by popularity); computed from the train split when absent.

The tokenizer and the retrieval index read the whole corpus from here, including items
that were never exposed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from dig_torchrec.data.schema import ITEM_ID, LABEL, DatasetMeta, FeatureSchema
from dig_torchrec.data.u2i import ItemU2IKeys, U2ISpec, item_u2i_keys
from dig_torchrec.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

logger = logging.getLogger(__name__)

ITEMS_FILE = "items.parquet"
TRAIN_CLICKS = "train_clicks"


class ItemTable:
    """Item features of the whole corpus, in memory.

    Attributes:
        features: LongTensor ``[num_items, len(schema.item_features)]`` (column 0 = item_id).
        feature_names: the column names, ``schema.item_features`` order.
        popularity: FloatTensor ``[num_items]`` train click counts.
        u2i_keys: per u2i field, ``(offsets [num_items+1], keys [nnz])`` global u2i keys.
    """

    def __init__(self, features: torch.Tensor, feature_names: List[str], popularity: torch.Tensor,
                 u2i_keys: ItemU2IKeys) -> None:
        self.features = features
        self.feature_names = list(feature_names)
        self.popularity = popularity
        self.u2i_keys = u2i_keys

    @property
    def num_items(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def load(cls, root: str | Path, schema: FeatureSchema, meta: Optional[DatasetMeta] = None) -> "ItemTable":
        """Read ``ROOT/items.parquet``.

        Args:
            root: dataset root.
            schema: feature layout (item feature column order).
            meta: dataset metadata; read from ``ROOT/meta.json`` when omitted.
        """
        root = Path(root)
        meta = meta or DatasetMeta.load(root)
        path = root / ITEMS_FILE
        if not path.exists():
            raise DataError(f"{path}: item table not found")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: cannot read parquet ({e})") from e
        n = table.num_rows
        if n == 0:
            raise DataError(f"{path}: empty item table")
        if n != meta.num_items:
            raise DataError(f"{path}: has {n} rows but meta.json num_items={meta.num_items}")
        cols = []
        for name in schema.item_features:
            if name not in table.column_names:
                raise DataError(f"{path}: missing column '{name}'")
            col = table.column(name)
            if col.null_count:
                raise DataError(f"{path}: column '{name}' has {col.null_count} nulls")
            cols.append(col.to_numpy().astype(np.int64))
        feats = np.stack(cols, axis=1)
        ids = feats[:, 0]
        if not np.array_equal(ids, np.arange(n)):
            order = np.argsort(ids, kind="stable")
            if not np.array_equal(ids[order], np.arange(n)):
                bad = int(np.flatnonzero(np.sort(ids) != np.arange(n))[0])
                raise DataError(f"{path}: column 'item_id' must hold every id 0..{n - 1} once (first gap/duplicate near sorted row {bad})")
            feats = feats[order]
            table = table.take(pa.array(order))
        for j, name in enumerate(schema.item_features):
            card = schema.cardinality[name]
            bad = np.flatnonzero((feats[:, j] < 0) | (feats[:, j] >= card))
            if bad.size:
                raise DataError(
                    f"{path}: column '{name}' row {int(bad[0])}: id {int(feats[bad[0], j])} outside [0, {card})"
                )
        u2i_keys = item_u2i_keys(table, U2ISpec.from_meta(meta), path)
        if TRAIN_CLICKS in table.column_names:
            pop = table.column(TRAIN_CLICKS).to_numpy().astype(np.float32)
        else:
            pop = train_click_counts(root, n).astype(np.float32)
        return cls(torch.from_numpy(feats), list(schema.item_features), torch.from_numpy(pop), u2i_keys)

    def kjt(self, item_ids: torch.Tensor) -> "KeyedJaggedTensor":
        """A KJT holding only the item keys (``schema.item_features``), one id per key and row."""
        from dig_torchrec.data.batch import make_kjt  # torchrec import kept off the `dig data` path

        item_ids = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1)
        rows = self.features[item_ids]  # [N, F]
        ones = torch.ones(item_ids.numel(), dtype=torch.int32)
        return make_kjt(self.feature_names, [rows[:, j].contiguous() for j in range(rows.shape[1])],
                        [ones] * rows.shape[1])


def train_click_counts(root: Path, num_items: int) -> np.ndarray:
    """Per-item click counts of the train split (scan of ``item_id`` and ``label``)."""
    counts = np.zeros(num_items, dtype=np.int64)
    train = Path(root) / "train"
    if not train.exists():
        return counts
    dataset = pads.dataset(str(train), format="parquet")
    for batch in dataset.to_batches(columns=[ITEM_ID, LABEL]):
        items = batch.column(0).to_numpy()
        labels = batch.column(1).to_numpy()
        counts += np.bincount(items[labels > 0], minlength=num_items)[:num_items]
    return counts
