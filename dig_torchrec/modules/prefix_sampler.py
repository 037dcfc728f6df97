"""The catalog's SIDs sorted by prefix: prefix ranges, prefix sampling mass, sibling draws.

:func:`encode_prefix` is the base-K code of a prefix (the SID index, the hashed prefix
embedding). Used by the recall objective (``dig_torchrec/losses.py``) during training:

* :meth:`CatalogPrefixIndex.prefix_mass` - ``Q(c_1..c_l)``, the sampling probability of a
  prefix under an item-level proposal (the logQ correction at depth l, where a sampled
  item stands for its whole prefix);
* :meth:`CatalogPrefixIndex.sample_siblings` - prefix-aware negatives: items that share
  the positive's prefix c_<l and differ at c_l, i.e. the alternatives beam search weighs
  against the positive's token at depth l.

The index is a lexicographic sort of ``item_sid_table`` (``[num_items, L]``, the latest SID
of every item) by a packed integer key; a prefix of length j is the contiguous range whose
keys agree on their top ``j * bits`` bits. Rebuilding it is one sort of ``num_items`` keys.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from dig_torchrec.errors import ConfigError


def encode_prefix(tokens: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Prefix tokens ``[..., l]`` -> prefix codes ``[...]`` (base-``num_codes`` digits).

    Args:
        tokens: int64 tokens in ``[0, num_codes)``, last dim = depth ``l``.
        num_codes: K.
    """
    code = torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
    for i in range(tokens.shape[-1]):  # loop over depth (<= L), not over items
        code = code * num_codes + tokens[..., i].long()
    return code


def _bits_per_token(num_codes: int) -> int:
    return max(1, int(num_codes - 1).bit_length())


def check_packable(num_codes: int, num_layers: int) -> None:
    """Raise unless a whole SID packs into 62 bits (the index's key)."""
    if _bits_per_token(num_codes) * num_layers > 62:
        raise ConfigError(
            f"tokenizer.num_codes={num_codes} x tokenizer.num_layers={num_layers} SIDs do not pack into a 62-bit key; "
            "loss.prefix_negatives and the prefix logQ correction need K^L < 2^62"
        )


class CatalogPrefixIndex:
    """Sorted view of a catalog's SIDs.

    Args:
        item_sids: ``[num_items, L]`` SID of every item (tokens in ``0..K-1``).
        num_codes: K.
        item_prob: ``[num_items]`` optional item-level sampling probabilities (for
            :meth:`prefix_mass`).
    """

    def __init__(self, item_sids: torch.Tensor, num_codes: int, item_prob: Optional[torch.Tensor] = None) -> None:
        n, L = item_sids.shape
        check_packable(num_codes, L)
        self.num_layers = L
        self.bits = _bits_per_token(num_codes)
        keys = self.pack(item_sids.clamp_min(0))
        self.sorted_keys, self.order = torch.sort(keys)
        self.num_items = n
        if item_prob is not None:
            p = item_prob.to(torch.float64)[self.order]
            self.cum_prob = torch.cat([p.new_zeros(1), torch.cumsum(p, 0)])
        else:
            self.cum_prob = None

    def pack(self, sids: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` tokens -> ``[N]`` int64 keys, lexicographic order preserved."""
        key = torch.zeros(sids.shape[0], dtype=torch.long, device=sids.device)
        for layer in range(sids.shape[1]):
            key = (key << self.bits) | sids[:, layer].long()
        return key

    def _shift(self, depth: int) -> int:
        return self.bits * (self.num_layers - depth)

    def prefix_range(self, sids: torch.Tensor, depth: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[lo, hi)`` positions in the sorted catalog of the items sharing ``sids[:, :depth]``."""
        if depth == 0:
            lo = torch.zeros(sids.shape[0], dtype=torch.long, device=sids.device)
            return lo, torch.full_like(lo, self.num_items)
        shift = self._shift(depth)
        prefix_keys = self.sorted_keys >> shift
        q = self.pack(sids) >> shift
        lo = torch.searchsorted(prefix_keys, q, right=False)
        hi = torch.searchsorted(prefix_keys, q, right=True)
        return lo, hi

    def prefix_mass(self, sids: torch.Tensor, depth: int) -> torch.Tensor:
        """``[N]`` total item probability under the prefix ``sids[:, :depth]`` (needs ``item_prob``)."""
        if self.cum_prob is None:
            raise ValueError("CatalogPrefixIndex built without item_prob")
        lo, hi = self.prefix_range(sids, depth)
        return (self.cum_prob[hi] - self.cum_prob[lo]).float()

    def sample_siblings(
        self, sids: torch.Tensor, depth: int, num: int, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Items sharing ``sids[:, :depth-1]`` whose token at ``depth`` differs (uniform over such items).

        Args:
            sids: ``[N, L]`` SIDs of the positives.
            depth: l in ``1..L``.
            num: draws per row (with replacement).

        Returns:
            ``(items [N, num], valid [N])``: ``valid`` is False where the prefix has no
            sibling item (then the row's items are arbitrary and must be masked).
        """
        lo_p, hi_p = self.prefix_range(sids, depth - 1)
        lo_s, hi_s = self.prefix_range(sids, depth)
        own = hi_s - lo_s
        count = (hi_p - lo_p) - own  # items under c_<l but not under c_<=l
        valid = count > 0
        u = torch.rand(sids.shape[0], num, generator=generator, device=sids.device)
        r = (u * count.clamp_min(1)[:, None].to(u.dtype)).long().clamp_max((count.clamp_min(1) - 1)[:, None])
        pos = lo_p[:, None] + r
        pos = torch.where(pos >= lo_s[:, None], pos + own[:, None], pos)
        pos = pos.clamp_max(self.num_items - 1)
        return self.order[pos], valid
