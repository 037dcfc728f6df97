"""Evaluation targets: the held-out (user, positive item) pairs of ``ROOT/retrieval/{split}.parquet``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dig_torchrec.data.batch import make_kjt
from dig_torchrec.data.decode import RowDecoder
from dig_torchrec.data.schema import USER_STATE, DatasetMeta, FeatureSchema
from dig_torchrec.data.shards import RowGroup
from dig_torchrec.data.u2i import UserStates
from dig_torchrec.errors import DataError


@dataclass
class RetrievalTargets:
    """Held-out (user, positive item) pairs with the user's features as of that moment."""

    user_kjt: KeyedJaggedTensor  # keys = schema.user_side_keys, U rows
    target_item: torch.Tensor  # [U]
    history: torch.Tensor  # [U, H] -1 padded, most recent first (aligned with hist_j)
    states: UserStates
    user_id: torch.Tensor  # [U]
    u2i: torch.Tensor  # [U, d_c] stored u2i of (user, target)
    context: torch.Tensor  # [U, n_user_ctx] user + context feature ids (schema order)

    def __len__(self) -> int:
        return int(self.target_item.numel())


def load_targets(root: str | Path, split: str, schema: FeatureSchema, hash_ids: bool = False) -> RetrievalTargets:
    """Read ``ROOT/retrieval/{split}.parquet``.

    Args:
        root: dataset root.
        split: ``valid`` or ``test``.
        schema: the feature layout (history length H).
        hash_ids: hash ids beyond the table size instead of raising.
    """
    root = Path(root)
    path = root / "retrieval" / f"{split}.parquet"
    if not path.exists():
        raise DataError(f"{path}: retrieval targets not found")
    meta = DatasetMeta.load(root)
    decoder = RowDecoder(schema, meta, hash_ids, with_state=True)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read parquet ({e})") from e
    g = RowGroup(str(path), 0, table.num_rows, 0)
    for col in decoder.columns():
        if col not in table.column_names:
            raise DataError(f"{path}: missing column '{col}'")
    sparse, item, _label, hist, u2i = decoder.decode(table, g)
    states = UserStates.from_arrow(table.column(USER_STATE), meta.u2i_stats)
    U = len(item)
    ones = torch.ones(U, dtype=torch.int32)
    values, lengths = [], []
    for j in range(sparse.shape[1]):
        values.append(torch.from_numpy(sparse[:, j].copy()))
        lengths.append(ones)
    hist_t = torch.from_numpy(hist)
    for j in range(hist_t.shape[1]):
        mask = hist_t[:, j] >= 0
        values.append(hist_t[mask, j])
        lengths.append(mask.to(torch.int32))
    kjt = make_kjt(schema.user_side_keys, values, lengths)
    return RetrievalTargets(user_kjt=kjt, target_item=torch.from_numpy(item.copy()), history=hist_t, states=states,
                            user_id=torch.from_numpy(sparse[:, 0].copy()), u2i=torch.from_numpy(u2i.copy()),
                            context=torch.from_numpy(sparse))
