"""u2i cross features as a documented function of (``user_state``, item features).

Paper §3.1 / §4.1: u2i (``c_{u,v}``) are user-item cross features built from *prefix
accumulated* statistics, so a row never sees its own or later events. Here they are an
explicit function, so they can be recomputed for ANY candidate item: the random negatives
of the retrieval rows, full-corpus ranking and reranking (Eq. 6 / Eq. 17 input).

Definitions
-----------
* ``meta.u2i_fields`` = ``[f_1 .. f_F]``: item-side fields u2i is computed over (for example
  ``category``, ``brand``). A field is either an int64 item feature column (one value per
  item) or a multi-valued ``list<int64>`` column of ``items.parquet`` (for example MovieLens
  ``genres``) whose cardinality is in ``meta.extra["u2i_field_cardinality"]``.
* A *u2i key* is a global int64 id of a (field, value) pair:
  ``key = key_offset[f] + value`` with ``key_offset`` the running sum of the fields'
  cardinalities in ``u2i_fields`` order (``U2ISpec.key_offsets``).
* ``meta.u2i_stats`` = ``[s_0 .. s_{S-1}]``: the per-key statistics a user accumulates;
  ``s_0`` is always the exposure (impression) count ``n``; the others are sums such as
  clicks or rating sum.
* ``user_state`` (stored on every click row): the user's statistics on every key seen at an
  event with a timestamp STRICTLY earlier than the row's, as a parquet
  ``list<struct<key: int64, <s_0>: float32, ..., <s_{S-1}>: float32>>`` with keys sorted
  ascending. Non-click rows store null (their u2i is still stored).
* For candidate item ``v`` and field ``f``: ``agg_f = sum over v's keys k in f of
  float64(state[k])`` (a missing key contributes 0; single-valued fields have one key),
  and with ``n = agg_f[s_0]``::

      u2i[f*S + 0] = log1p(n)
      u2i[f*S + j] = agg_f[s_j] / max(n, 1)      (transform "rate", the default, j >= 1)
      u2i[f*S + j] = log1p(agg_f[s_j])           (transform "log1p", j >= 1)

  computed in float64 and cast to float32. ``d_c = F * S``. Per-stat transforms come from
  ``meta.extra["u2i_transforms"]`` (a list of S names; entry 0 is always ``log1p``).

The dataset builders compute the stored ``u2i`` column with :func:`u2i_from_field_stats`
on the same float32-rounded statistics they store in ``user_state``, so recomputing from
``user_state`` gives the stored column bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from dig_torchrec.data import kernels
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import DataError

STATE_KEY = "key"
TRANSFORMS = ("log1p", "rate")


@dataclass(frozen=True)
class U2ISpec:
    """The u2i layout of one dataset (derived from :class:`DatasetMeta`)."""

    fields: List[str]
    stats: List[str]
    transforms: List[str]
    field_cardinality: List[int]

    @property
    def key_offsets(self) -> List[int]:
        """``key_offset[f]``: first global u2i key of field f (length F + 1)."""
        out = [0]
        for c in self.field_cardinality:
            out.append(out[-1] + int(c))
        return out

    @property
    def num_keys(self) -> int:
        return self.key_offsets[-1]

    @property
    def dim(self) -> int:
        """d_c = F * S."""
        return len(self.fields) * len(self.stats)

    def feature_names(self) -> List[str]:
        return [f"{f}.{'log1p_' + s if t == 'log1p' else s + '_rate'}"
                for f in self.fields for s, t in zip(self.stats, self.transforms)]

    @classmethod
    def from_meta(cls, meta: DatasetMeta) -> "U2ISpec":
        fields = list(meta.u2i_fields)
        stats = list(meta.u2i_stats)
        if not fields or not stats:
            raise DataError(f"meta.json of '{meta.name}': u2i_fields and u2i_stats must be non-empty")
        multi = dict(meta.extra.get("u2i_field_cardinality", {}) or {})
        card = []
        for f in fields:
            if f in multi:
                card.append(int(multi[f]))
            elif f in meta.item_features:
                card.append(int(meta.item_features[f]))
            else:
                raise DataError(
                    f"meta.json of '{meta.name}': u2i field '{f}' is neither an item feature nor listed in "
                    f"extra.u2i_field_cardinality"
                )
        transforms = list(meta.extra.get("u2i_transforms", []) or default_transforms(len(stats)))
        if len(transforms) != len(stats) or transforms[0] != "log1p" or any(t not in TRANSFORMS for t in transforms):
            raise DataError(
                f"meta.json of '{meta.name}': extra.u2i_transforms={transforms} must have {len(stats)} entries "
                f"from {TRANSFORMS}, the first 'log1p'"
            )
        spec = cls(fields=fields, stats=stats, transforms=transforms, field_cardinality=card)
        if meta.u2i_dim != spec.dim:
            raise DataError(
                f"meta.json of '{meta.name}': u2i_dim={meta.u2i_dim} but len(u2i_fields) * len(u2i_stats) = {spec.dim}"
            )
        return spec


ItemU2IKeys = List[Tuple[torch.Tensor, torch.Tensor]]  # per u2i field: (offsets [num_items+1], global keys [nnz])


def item_u2i_keys(table: pa.Table, spec: U2ISpec, path: object) -> ItemU2IKeys:
    """Each item's global u2i keys, per field, from the item table's u2i field columns.

    A field column is an int64 item feature (one key per item) or a multi-valued
    ``list<int64>`` column; field ``f``'s keys are shifted by ``spec.key_offsets[f]``.

    Args:
        table: ``items.parquet`` rows in item id order.
        spec: the dataset's u2i layout.
        path: the table's file (named in errors).
    """
    n = table.num_rows
    out: ItemU2IKeys = []
    for f, (field, off) in enumerate(zip(spec.fields, spec.key_offsets)):
        if field not in table.column_names:
            raise DataError(f"{path}: missing column '{field}' (u2i field)")
        col = table.column(field).combine_chunks()
        card = spec.field_cardinality[f]
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lens = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            vals = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            lens = np.ones(n, dtype=np.int64)
            vals = col.to_numpy(zero_copy_only=False).astype(np.int64)
        if vals.size and (vals.min() < 0 or vals.max() >= card):
            raise DataError(f"{path}: column '{field}' has values outside [0, {card})")
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        out.append((torch.from_numpy(offsets), torch.from_numpy(vals + off)))
    return out


def default_transforms(num_stats: int) -> List[str]:
    return ["log1p"] + ["rate"] * (num_stats - 1)


def u2i_from_field_stats(agg: torch.Tensor, transforms: Sequence[str]) -> torch.Tensor:
    """The u2i formula (module docstring) on per-field aggregated statistics.

    Args:
        agg: float64 ``[N, F, S]`` statistics of each candidate's keys, summed per field.
        transforms: S transform names; entry 0 applies to the exposure count ``n``.

    Returns:
        float32 ``[N, F * S]``.
    """
    agg = agg.to(torch.float64)
    n = agg[..., 0]
    denom = n.clamp(min=1.0)
    cols = [torch.log1p(n)]
    for j in range(1, agg.shape[-1]):
        cols.append(torch.log1p(agg[..., j]) if transforms[j] == "log1p" else agg[..., j] / denom)
    out = torch.stack(cols, dim=-1)  # [N, F, S]
    return out.reshape(agg.shape[0], -1).to(torch.float32)


class UserStates:
    """Jagged user states of S users: ``offsets [S+1]``, ``keys [T]`` (ascending within a
    state), ``stats [T, num_stats]`` float32. An absent (null) state is empty."""

    def __init__(self, offsets: torch.Tensor, keys: torch.Tensor, stats: torch.Tensor) -> None:
        self.offsets = offsets.to(torch.long)
        self.keys = keys.to(torch.long)
        self.stats = stats.to(torch.float32)
        self._composite: Optional[torch.Tensor] = None
        self._stride: int = 0

    def __len__(self) -> int:
        return int(self.offsets.numel()) - 1

    def _num_entries(self) -> int:
        return int(self.keys.numel())

    @property
    def num_stats(self) -> int:
        return int(self.stats.shape[1])

    @classmethod
    def empty(cls, num_states: int, num_stats: int) -> "UserStates":
        return cls(torch.zeros(num_states + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, num_stats, dtype=torch.float32))

    @classmethod
    def from_arrow(cls, array: pa.Array | pa.ChunkedArray, stat_names: Optional[Sequence[str]] = None) -> "UserStates":
        """Parse a ``user_state`` column (``list<struct<key, s_0..s_{S-1}>>``; nulls -> empty).

        Args:
            array: the column (a slice is fine).
            stat_names: the stat fields to read, in order; default all non-key struct fields.
        """
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
        struct_type = array.type.value_type
        names = list(stat_names) if stat_names is not None else [
            struct_type.field(i).name for i in range(struct_type.num_fields) if struct_type.field(i).name != STATE_KEY
        ]
        lengths = array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = array.flatten()  # honours the slice offset and skips null entries
        if len(flat) != offsets[-1]:
            raise DataError(f"user_state column: {len(flat)} entries but list lengths sum to {offsets[-1]}")
        keys = flat.field(STATE_KEY).to_numpy(zero_copy_only=False).astype(np.int64)  # writable copy for torch
        stats = np.empty((len(keys), len(names)), dtype=np.float32)  # [T, S]: one row per lookup hit
        for j, n in enumerate(names):
            stats[:, j] = flat.field(n).to_numpy(zero_copy_only=False)
        return cls(torch.from_numpy(offsets), torch.from_numpy(keys), torch.from_numpy(stats))

    def to_arrow(self, stat_names: Sequence[str], valid: Optional[np.ndarray] = None) -> pa.Array:
        """Inverse of :meth:`from_arrow` (``valid[i]`` False writes a null)."""
        return states_to_arrow(self.offsets.numpy(), self.keys.numpy(), self.stats.numpy(), stat_names, valid)

    def select(self, idx: torch.Tensor) -> "UserStates":
        """States ``idx[0], idx[1], ...`` as a new :class:`UserStates` (vectorized gather)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        starts = self.offsets[idx]
        lens = self.offsets[idx + 1] - starts
        new_offsets = torch.zeros(idx.numel() + 1, dtype=torch.long)
        torch.cumsum(lens, 0, out=new_offsets[1:])
        flat = _expand_ranges(starts, lens, new_offsets)
        return UserStates(new_offsets, self.keys[flat], self.stats[flat])

    def composite(self, stride: int) -> torch.Tensor:
        """Globally sorted ``state_index * stride + key`` (cached) for vectorized lookup."""
        if self._composite is None or self._stride != stride:
            seg = torch.repeat_interleave(torch.arange(len(self), dtype=torch.long), self.offsets.diff())
            self._composite = seg * stride + self.keys
            self._stride = stride
        return self._composite

    def lookup(self, state_index: torch.Tensor, keys: torch.Tensor, stride: int) -> torch.Tensor:
        """float32 stats ``[M, num_stats]`` of ``keys[m]`` in state ``state_index[m]`` (0 if absent).

        Two exact strategies (they return the same stored values): fewer queries than stored
        entries (a reader window: a few negatives per click over all the window's states)
        binary-search each query inside its own state (:meth:`lookup_segmented`, no index to
        build); many queries (full-corpus scoring of few users) search the cached globally
        sorted :meth:`composite` index.
        """
        state_index = torch.as_tensor(state_index, dtype=torch.long).reshape(-1)
        keys = torch.as_tensor(keys, dtype=torch.long).reshape(-1)
        if self.prefers_segmented(state_index.numel()):
            return torch.from_numpy(self.lookup_segmented(state_index.numpy(), keys.numpy()))
        comp = self.composite(stride)
        query = state_index * stride + keys
        out = torch.zeros(query.numel(), self.num_stats, dtype=torch.float32)
        if comp.numel() == 0 or query.numel() == 0:
            return out
        pos = torch.searchsorted(comp, query).clamp(max=comp.numel() - 1)
        hit = comp[pos] == query
        out[hit] = self.stats[pos[hit]]
        return out

    def prefers_segmented(self, num_queries: int) -> bool:
        """Whether :meth:`lookup` searches each query inside its state (fewer queries than
        stored entries, and no composite index built yet)."""
        return self._composite is None and num_queries < self._num_entries()

    def stat_columns(self) -> Tuple[np.ndarray, ...]:
        """The S float32 stat columns (strided views, no copy), aligned with the keys of
        :meth:`_search_arrays`."""
        stats = self.stats.numpy()
        return tuple(stats[:, j] for j in range(stats.shape[1]))

    def lookup_segmented(self, state_index: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """:meth:`lookup` by a (compiled) binary search of each query inside its
        state's (ascending) keys: O(M log(state length)), no O(total entries) index.

        Args:
            state_index: int64 ``[M]`` into the states.
            keys: int64 ``[M]`` u2i keys.

        Returns:
            float32 numpy ``[M, num_stats]`` (0 where the key is absent).
        """
        state_index = np.asarray(state_index, dtype=np.int64)
        keys = np.asarray(keys, dtype=np.int64)
        out = np.zeros((keys.size, self.num_stats), dtype=np.float32)
        found = _segmented_search(*self._search_arrays(), state_index, keys)
        if found is not None:
            hit, safe = found
            out[hit] = self._stats_at(safe[hit])
        return out

    def _search_arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """(offsets ``[S+1]``, keys ``[T]``) as numpy, for :func:`_segmented_search`."""
        return self.offsets.numpy(), self.keys.numpy()

    def _stats_at(self, entries: np.ndarray) -> np.ndarray:
        """float32 stats ``[len(entries), num_stats]`` of the given entry indices."""
        return self.stats.numpy()[entries]


def _segmented_search(offsets: np.ndarray, all_keys: np.ndarray, state_index: np.ndarray, keys: np.ndarray
                      ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The binary search of :meth:`UserStates.lookup_segmented`: ``(hit, entry)`` = the queries
    whose key is in their state and, at those queries, the entry index (None: no entries/queries).

    One compiled binary search per query (:func:`kernels.segmented_search`, no GIL held).
    """
    if all_keys.size == 0 or keys.size == 0:
        return None
    entry = kernels.segmented_search(np.asarray(offsets, dtype=np.int64), np.asarray(all_keys, dtype=np.int64),
                                     state_index, keys)
    hit = np.flatnonzero(entry >= 0)
    return hit, entry


class ArrowUserStates(UserStates):
    """:class:`UserStates` over the arrow column's own buffers (no copy): what the reader's
    per-window lookups need (:meth:`lookup_segmented`). The torch tensors (``offsets``,
    ``keys``, ``stats``, for :meth:`select` / the composite index) are copied on first use,
    equal to :meth:`UserStates.from_arrow`'s.

    Build with :meth:`from_arrow_view`, which falls back to a copying :class:`UserStates`
    when the column has nulls or is not one contiguous chunk.
    """

    def __init__(self, offsets: np.ndarray, keys: np.ndarray, stat_cols: Sequence[np.ndarray]) -> None:
        self._np_offsets, self._np_keys, self._stat_cols = offsets, keys, list(stat_cols)
        self._tensors: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._composite = None
        self._stride = 0

    @classmethod
    def from_arrow_view(cls, array: pa.Array | pa.ChunkedArray, stat_names: Sequence[str]) -> UserStates:
        if isinstance(array, pa.ChunkedArray):
            if array.num_chunks != 1:
                return UserStates.from_arrow(array, stat_names)
            array = array.chunk(0)
        if not isinstance(array, pa.ListArray):
            return UserStates.from_arrow(array, stat_names)
        struct = array.values
        try:
            offsets = array.offsets.to_numpy(zero_copy_only=True).astype(np.int64)  # [S+1], small
            if array.null_count:  # a null must own no entries (parquet writes it so) to read as empty
                nulls = array.is_null().to_numpy(zero_copy_only=False)
                if (offsets[1:][nulls] != offsets[:-1][nulls]).any():
                    return UserStates.from_arrow(array, stat_names)
            keys = struct.field(STATE_KEY)
            cols = [struct.field(n) for n in stat_names]
            if struct.offset or any(c.null_count or c.offset for c in [keys, *cols]):
                return UserStates.from_arrow(array, stat_names)
            keys = keys.to_numpy(zero_copy_only=True)
            cols = [c.to_numpy(zero_copy_only=True) for c in cols]
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError):
            return UserStates.from_arrow(array, stat_names)
        if keys.dtype != np.int64 or any(c.dtype != np.float32 for c in cols):
            return UserStates.from_arrow(array, stat_names)
        return cls(offsets, keys, cols)

    def _materialize(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            off = self._np_offsets.astype(np.int64)
            lo, hi = int(off[0]), int(off[-1])
            stats = np.empty((hi - lo, len(self._stat_cols)), dtype=np.float32)
            for j, c in enumerate(self._stat_cols):
                stats[:, j] = c[lo:hi]
            self._tensors = (torch.from_numpy(off - lo), torch.from_numpy(self._np_keys[lo:hi].copy()),
                             torch.from_numpy(stats))
        return self._tensors

    @property
    def offsets(self) -> torch.Tensor:  # type: ignore[override]
        return self._materialize()[0]

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        return self._materialize()[1]

    @property
    def stats(self) -> torch.Tensor:  # type: ignore[override]
        return self._materialize()[2]

    def __len__(self) -> int:
        return int(self._np_offsets.size) - 1

    @property
    def num_stats(self) -> int:
        return len(self._stat_cols)

    def _num_entries(self) -> int:
        return int(self._np_offsets[-1]) - int(self._np_offsets[0])

    def _search_arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        return self._np_offsets, self._np_keys

    def stat_columns(self) -> Tuple[np.ndarray, ...]:
        return tuple(self._stat_cols)

    def _stats_at(self, entries: np.ndarray) -> np.ndarray:
        out = np.empty((entries.size, len(self._stat_cols)), dtype=np.float32)
        for j, c in enumerate(self._stat_cols):
            out[:, j] = c[entries]
        return out


def _expand_ranges(starts: torch.Tensor, lens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Flat indices ``[starts[i], starts[i] + lens[i])`` concatenated over i."""
    total = int(offsets[-1])
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(lens.numel(), dtype=torch.long), lens)
    return starts[seg] + (torch.arange(total, dtype=torch.long) - offsets[:-1][seg])


def states_to_arrow(offsets: np.ndarray, keys: np.ndarray, stats: np.ndarray, stat_names: Sequence[str],
                    valid: Optional[np.ndarray] = None) -> pa.Array:
    """Build the ``user_state`` parquet column from jagged numpy arrays."""
    children = [pa.array(keys.astype(np.int64), type=pa.int64())]
    children += [pa.array(stats[:, j].astype(np.float32), type=pa.float32()) for j in range(len(stat_names))]
    struct = pa.StructArray.from_arrays(children, names=[STATE_KEY, *stat_names])
    mask = None if valid is None else pa.array(~valid.astype(bool))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), struct, mask=mask)


def user_state_type(stat_names: Sequence[str]) -> pa.DataType:
    return pa.list_(pa.struct([pa.field(STATE_KEY, pa.int64())] + [pa.field(n, pa.float32()) for n in stat_names]))


class U2IFunction:
    """u2i of candidate items for given user states (module docstring), fully vectorized.

    Args:
        meta: the dataset metadata (u2i fields, stats, transforms).
        item_keys: each item's u2i keys per field (:func:`item_u2i_keys`, ``ItemTable.u2i_keys``).
    """

    def __init__(self, meta: DatasetMeta, item_keys: ItemU2IKeys) -> None:
        self.spec = U2ISpec.from_meta(meta)
        self.stride = max(self.spec.num_keys, 1)
        self._item_keys = item_keys
        self.num_items = int(item_keys[0][0].numel() - 1) if item_keys else 0
        # every field single-valued for every item (the common case): the key of each (field,
        # item) as one [F, num_items] table, so a call gathers all its queries at once
        self._single_keys: Optional[np.ndarray] = None
        if self._item_keys and all(bool((off.diff() == 1).all()) for off, _ in self._item_keys):
            self._single_keys = np.stack([keys[off[:-1]].numpy() for off, keys in self._item_keys])

    @property
    def dim(self) -> int:
        return self.spec.dim

    def __call__(self, states: UserStates, state_index: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """u2i ``[N, d_c]`` of ``item_ids[n]`` for the user whose state is ``states[state_index[n]]``.

        Args:
            states: jagged user states.
            state_index: LongTensor ``[N]`` into ``states``.
            item_ids: LongTensor ``[N]`` of candidate items.
        """
        state_index = torch.as_tensor(state_index, dtype=torch.long).reshape(-1)
        item_ids = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1)
        if state_index.numel() == 1 and item_ids.numel() > 1:
            state_index = state_index.expand(item_ids.numel())
        n = item_ids.numel()
        if state_index.numel() != n:
            raise ValueError(f"state_index has {state_index.numel()} entries, item_ids {n}")
        F, S = len(self.spec.fields), len(self.spec.stats)
        if self._single_keys is not None and states.prefers_segmented(n * F):  # a reader window
            agg = kernels.single_key_stats(*states._search_arrays(), states.stat_columns(), state_index.numpy(),
                                           item_ids.numpy(), self._single_keys)
            return u2i_from_field_stats(torch.from_numpy(agg), self.spec.transforms)
        if self._single_keys is not None:  # same queries and values as the per-field loop below
            query = torch.from_numpy(self._single_keys[:, item_ids.numpy()].reshape(-1))  # field-major
            stats = states.lookup(state_index.repeat(F), query, self.stride).reshape(F, n, S)
            agg = torch.empty(n, F, S, dtype=torch.float64)
            agg.copy_(stats.permute(1, 0, 2))  # float32 -> float64, exact
            return u2i_from_field_stats(agg, self.spec.transforms)
        agg = torch.zeros(n, F, S, dtype=torch.float64)
        single: List[Tuple[int, torch.Tensor]] = []  # single-valued fields: one lookup for all of them
        for f, (key_offsets, keys) in enumerate(self._item_keys):
            starts = key_offsets[item_ids]
            lens = key_offsets[item_ids + 1] - starts
            if bool((lens == 1).all()):
                single.append((f, keys[starts]))
            else:
                offs = torch.zeros(n + 1, dtype=torch.long)
                torch.cumsum(lens, 0, out=offs[1:])
                flat = _expand_ranges(starts, lens, offs)
                row = torch.repeat_interleave(torch.arange(n, dtype=torch.long), lens)
                stats = states.lookup(state_index[row], keys[flat], self.stride)
                agg[:, f, :].index_add_(0, row, stats.to(torch.float64))
        if single:
            query = torch.cat([k for _, k in single]) if len(single) > 1 else single[0][1]
            stats = states.lookup(state_index.repeat(len(single)), query, self.stride).reshape(len(single), n, S)
            for i, (f, _) in enumerate(single):
                agg[:, f, :] = stats[i]  # float32 -> float64, exact
        return u2i_from_field_stats(agg, self.spec.transforms)


def field_of_key(spec: U2ISpec, keys: np.ndarray) -> np.ndarray:
    """Field index of each global u2i key."""
    return np.searchsorted(np.asarray(spec.key_offsets[1:]), keys, side="right")


def describe(spec: U2ISpec) -> Dict[str, object]:
    """A JSON-able description (written to ``meta.extra['u2i']``)."""
    return {"features": spec.feature_names(), "key_offsets": spec.key_offsets, "transforms": spec.transforms}
