"""``u2t.inference=catalog_mean`` (and ``catalog_max``): the recall path's u2t input computed exactly at
serving time.

Eq. 13's training teacher for a row is the mean u2i of the batch rows under the row's SID prefix.
Under a large SID space (K=256, L=4) a deep-layer bucket almost always holds that one row, so the
recall path learns from the row's *exact* u2i, the user-item cross statistics that carry most
of the personal signal. At inference the paper replaces it with MLP_u2t's estimate from e_u and
e_sid (Eq. 14-16), which on our data recovers none of it (``benchmarks/results/u2t_serving.md``).

This module computes the quantity the teacher estimates, for the serving user, without any
learned approximation: for prefix ``p = s_1..s_l``,

    u2t_cm(u, p) = mean over the catalog items v whose SID starts with p of u2i(u, v)

with u2i the documented function of the user's state and the item's u2i keys
(:mod:`dig_torchrec.data.u2i`). ``catalog_max`` takes, per u2i feature, the largest value among
those items instead: an optimistic bound meant to keep a prefix's score near its best leaf's. At depth L with collision-free SIDs it is the item's exact u2i,
what the recall path saw in training; at shallower depths it is the user's own mean over
the subtree (the training teacher's population counterpart).

Cost: items with the same u2i keys in every field share one u2i for every user, so the catalog
is reduced once to its T distinct key groups (category x brand combinations, genre sets) and
per depth a CSR matrix ``[occupied prefixes, T]`` of item shares is kept. A user batch computes
u2i for its U users x T groups once; each scored (user, prefix) row then gathers its prefix's
CSR row: a depth-l beam step costs the nonzeros of the prefixes it scores.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from dig_torchrec.data.u2i import U2IFunction, UserStates
from dig_torchrec.modules.prefix_sampler import encode_prefix
from dig_torchrec.retrieval.sid_index import SidIndex

# u2t.inference values served from the catalog, and how each reduces the items under a prefix
CATALOG_MODES = {"catalog_mean": "mean", "catalog_max": "max"}


def item_key_groups(u2i_fn: U2IFunction) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group the catalog by u2i keys: ``(representative item per group [T], group of each item [V])``.

    Two items are in one group iff they have the same key set in every u2i field, so their
    u2i is the same for every user state.
    """
    num_items = u2i_fn.num_items
    if num_items == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    cols: List[torch.Tensor] = []
    for offsets, keys in u2i_fn._item_keys:  # per field: CSR (offsets [V+1], keys [nnz]) of each item's keys
        lens = offsets.diff()
        width = max(1, int(lens.max()))
        pad = torch.full((num_items, width), -1, dtype=torch.long)
        if keys.numel():
            row = torch.repeat_interleave(torch.arange(num_items), lens)
            pos = torch.arange(keys.numel()) - offsets[:-1][row]
            # a key set, not a list: sort each item's keys so the order they were stored in does not matter
            order = torch.argsort(row * (int(keys.max()) + 1) + keys.long(), stable=True)
            pad[row[order], pos] = keys.long()[order]
        cols.append(pad)
    table = torch.cat(cols, 1) if cols else torch.zeros(num_items, 1, dtype=torch.long)
    _, group = torch.unique(table, dim=0, return_inverse=True)
    num_groups = int(group.max()) + 1
    rep = torch.full((num_groups,), num_items, dtype=torch.long).scatter_reduce_(
        0, group, torch.arange(num_items), reduce="amin")
    return rep, group


class CatalogPrefixU2T:
    """The per-depth item-share matrices of one SID index (build once per index).

    Args:
        index: the SID index (item SIDs and occupied prefixes).
        u2i_fn: the dataset's u2i function (items' u2i keys).
    """

    def __init__(self, index: SidIndex, u2i_fn: U2IFunction) -> None:
        if u2i_fn.num_items != index.num_items:
            raise ValueError(f"u2i keys cover {u2i_fn.num_items} items but the SID index {index.num_items}")
        self.index = index
        self.u2i_fn = u2i_fn
        self.rep_items, group = item_key_groups(u2i_fn)
        T = max(1, int(self.rep_items.numel()))
        self.num_groups = int(self.rep_items.numel())
        self.crow: List[torch.Tensor] = []
        self.col: List[torch.Tensor] = []
        self.share: List[torch.Tensor] = []
        for depth in range(1, index.num_layers + 1):
            codes = index.valid_codes(depth)
            row = torch.searchsorted(codes, encode_prefix(index.item_sids[:, :depth], index.num_codes))
            pair, count = torch.unique(row * T + group, sorted=True, return_counts=True)
            r, c = pair // T, pair % T
            size = index.prefix_counts[depth - 1].to(torch.float64)
            crow = torch.zeros(codes.numel() + 1, dtype=torch.long)
            crow[1:] = torch.cumsum(torch.bincount(r, minlength=codes.numel()), 0)
            self.crow.append(crow)
            self.col.append(c)
            self.share.append((count.to(torch.float64) / size[r]).to(torch.float32))

    @property
    def nnz(self) -> List[int]:
        """Nonzeros (prefix, key group) of each depth's share matrix."""
        return [int(c.numel()) for c in self.col]

    def for_users(self, states: UserStates, num_users: int, reduce: str = "mean") -> "UserCatalogU2T":
        """u2i of ``num_users`` users (``states[0..U-1]``) on every key group, ready to look up.

        Args:
            states: the users' states.
            num_users: U.
            reduce: ``mean`` (``catalog_mean``: item-weighted mean over the prefix's items) or ``max``
                (``catalog_max``: per u2i feature, the largest value among the prefix's items).
        """
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        T = self.num_groups
        user = torch.arange(num_users).repeat_interleave(T)
        items = self.rep_items.repeat(num_users)
        table = self.u2i_fn(states, user, items).view(num_users, T, -1) if T else torch.zeros(num_users, 0, 1)
        return UserCatalogU2T(self, table, reduce)


class UserCatalogU2T:
    """u2t lookups for one user batch (:meth:`CatalogPrefixU2T.for_users`)."""

    def __init__(self, catalog: CatalogPrefixU2T, table: torch.Tensor, reduce: str = "mean") -> None:
        self.catalog = catalog
        self.table = table  # [U, T, d_c]
        self.reduce = reduce

    def __call__(self, user_index: torch.Tensor, sid_prefix: torch.Tensor) -> torch.Tensor:
        """``[N, d_c]`` mean (or max) u2i of row ``n``'s user over the items under ``sid_prefix[n]``
        (``[N, l]``); 0 for a prefix that holds no item."""
        cat = self.catalog
        depth = sid_prefix.shape[1]
        user_index = user_index.long().cpu()
        code = encode_prefix(sid_prefix.long().cpu(), cat.index.num_codes)
        codes = cat.index.valid_codes(depth)
        n = code.numel()
        out = torch.zeros(n, self.table.shape[-1], dtype=torch.float32)
        if n == 0 or codes.numel() == 0:
            return out
        pos = torch.searchsorted(codes, code).clamp_(max=codes.numel() - 1)
        found = codes[pos] == code
        crow = cat.crow[depth - 1]
        start = crow[pos]
        lens = torch.where(found, crow[pos + 1] - start, torch.zeros_like(start))
        query = torch.repeat_interleave(torch.arange(n), lens)
        offs = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(lens, 0, out=offs[1:])
        entry = start[query] + (torch.arange(int(offs[-1])) - offs[:-1][query])
        values = self.table[user_index[query], cat.col[depth - 1][entry]]
        if self.reduce == "max":
            out.fill_(float("-inf")).scatter_reduce_(0, query[:, None].expand_as(values), values, "amax")
            return out.masked_fill_(~found[:, None], 0.0)
        return out.index_add_(0, query, values * cat.share[depth - 1][entry, None])
