"""Shard planning: which row groups each reader slot reads.

Row groups (found with ``pyarrow.dataset``) are the unit of work. They are assigned to
``world_size * W`` slots (``W = max(1, data.num_workers)``) by longest-processing-time
greedy on their row counts, so slots are disjoint and balanced; rank ``r`` owns slots
``r*W .. r*W+W-1`` and DataLoader worker ``w`` of rank ``r`` reads slot ``r*W + w``.

Every slot yields exactly ``P = max over all slots of ceil(rows_slot / B)`` batches, so
every rank runs ``W * P`` steps per epoch (:attr:`ShardLayout.batches_per_slot`).

"Slot" always means such a shard slot (a disjoint share of the split's row groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from dig_torchrec.errors import DataError


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int  # row group index in the file
    num_rows: int
    order: int  # position in the split's canonical (file, row group) order


def list_row_groups(split_dir: Path) -> List[RowGroup]:
    """Every row group of the split's parquet files, in (file name, row group) order."""
    if not split_dir.exists():
        raise DataError(f"{split_dir}: split directory not found")
    try:
        dataset = pads.dataset(str(split_dir), format="parquet")
        fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{split_dir}: cannot open parquet dataset ({e})") from e
    out: List[RowGroup] = []
    for frag in fragments:
        try:
            frag.ensure_complete_metadata()
            groups = frag.row_groups
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{frag.path}: corrupt or truncated parquet file ({e})") from e
        for rg in groups:
            if rg.num_rows > 0:
                out.append(RowGroup(frag.path, rg.id, rg.num_rows, len(out)))
    return out


def assign_slots(groups: Sequence[RowGroup], num_slots: int) -> List[List[RowGroup]]:
    """Longest-processing-time greedy: each row group to the currently lightest slot."""
    slots: List[List[RowGroup]] = [[] for _ in range(num_slots)]
    load = np.zeros(num_slots, dtype=np.int64)
    for g in sorted(groups, key=lambda g: (-g.num_rows, g.order)):
        s = int(np.argmin(load))
        slots[s].append(g)
        load[s] += g.num_rows
    return [sorted(s, key=lambda g: g.order) for s in slots]


class ShardLayout:
    """The split's row groups spread over every rank's slots, and the step count they imply.

    Args:
        row_groups: the split's row groups (:func:`list_row_groups`).
        world_size: number of ranks.
        slots_per_rank: W = max(1, data.num_workers).
        batch_size: exposure rows per batch.
    """

    def __init__(self, row_groups: Sequence[RowGroup], world_size: int, slots_per_rank: int, batch_size: int) -> None:
        self.slots_per_rank = slots_per_rank
        self.slots = assign_slots(row_groups, world_size * slots_per_rank)
        self.slot_rows = [sum(g.num_rows for g in s) for s in self.slots]
        self.batches_per_slot = max(1, max(math.ceil(r / batch_size) for r in self.slot_rows))

    def slot(self, rank: int, slot_in_rank: int) -> int:
        """Global index of worker ``slot_in_rank``'s slot on ``rank``."""
        return rank * self.slots_per_rank + slot_in_rank

    def rank_rows(self, rank: int) -> int:
        """Real rows of ``rank``'s slots."""
        W = self.slots_per_rank
        return sum(self.slot_rows[rank * W:(rank + 1) * W])
