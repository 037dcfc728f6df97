"""Dataset metadata and the sparse-feature layout every layer shares.

A dataset root holds::

    meta.json          DatasetMeta (below)
    items.parquet      item_id + item static features, the whole corpus
    train/ valid/ test/            exposure rows (parquet)
    retrieval/valid.parquet, retrieval/test.parquet   held-out (user, positive item) targets

The KeyedJaggedTensor key order is fixed by :class:`FeatureSchema`:
``user_id, <user features>, <context features>, item_id, <item features>, hist_0 .. hist_{H-1}``.
``hist_j`` is the j-th most recent clicked item (a bag of 0 or 1 ids) and shares the
``item_id`` table, so DIN gets one embedding per history position from an
EmbeddingBagCollection.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
LABEL = "label"
HISTORY = "history"
U2I = "u2i"
USER_STATE = "user_state"
SPLITS = ("train", "valid", "test")


from dig_torchrec.errors import DataError  # noqa: E402  (re-exported)
from dig_torchrec.files import read_json_file  # noqa: E402


@dataclass
class DatasetMeta:
    name: str
    num_users: int
    num_items: int
    user_features: Dict[str, int]  # column name -> cardinality
    context_features: Dict[str, int]
    item_features: Dict[str, int]
    u2i_dim: int  # d_c
    history_length: int  # stored (maximum) history length
    u2i_fields: List[str] = field(default_factory=list)  # item fields u2i is computed over
    u2i_stats: List[str] = field(default_factory=list)  # per-key statistics kept in user_state
    extra: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | Path) -> "DatasetMeta":
        p = Path(root) / "meta.json"
        d = read_json_file(p, DataError, f"dataset metadata file not found (is '{root}' a dataset root made by `dig data`?)")
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("name", "num_users", "num_items", "user_features", "context_features",
                               "item_features", "u2i_dim", "history_length") if k not in d]
        if missing:
            raise DataError(f"{p}: missing keys {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, root: str | Path) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "meta.json").write_text(json.dumps(asdict(self), indent=2))


@dataclass(frozen=True)
class FeatureSchema:
    """The KJT key layout and the embedding table each key reads."""

    user_features: List[str]  # including user_id first
    context_features: List[str]
    item_features: List[str]  # including item_id first
    history_length: int
    cardinality: Dict[str, int]  # table name -> rows

    @classmethod
    def from_meta(cls, meta: DatasetMeta, history_length: int) -> "FeatureSchema":
        if history_length > meta.history_length:
            raise DataError(
                f"config key 'data.history_length' = {history_length} exceeds the dataset's stored "
                f"history length {meta.history_length} (meta.json of '{meta.name}')"
            )
        card = {USER_ID: meta.num_users, ITEM_ID: meta.num_items}
        card.update(meta.user_features)
        card.update(meta.context_features)
        card.update(meta.item_features)
        return cls(
            user_features=[USER_ID, *meta.user_features],
            context_features=list(meta.context_features),
            item_features=[ITEM_ID, *meta.item_features],
            history_length=history_length,
            cardinality=card,
        )

    @property
    def history_keys(self) -> List[str]:
        return [f"hist_{j}" for j in range(self.history_length)]

    @property
    def keys(self) -> List[str]:
        """KJT key order of a DIG batch."""
        return [*self.user_features, *self.context_features, *self.item_features, *self.history_keys]

    @property
    def user_side_keys(self) -> List[str]:
        """Request-level (Type-II) keys: user, context and history."""
        return [*self.user_features, *self.context_features, *self.history_keys]

    def table_for_key(self, key: str) -> str:
        return ITEM_ID if key.startswith("hist_") else key
