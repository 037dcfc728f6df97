"""Trie-constrained beam search over SIDs (paper §3.4, Eq. 16) and its exhaustive references.

Everything here is written against two scoring callables, so it can be tested with a fake
scorer and run with the real model unchanged:

* ``PrefixScoreFn(user_index [N], sid_prefix [N, l]) -> logits [N]`` -- the recall path at
  depth ``l`` (Eq. 16: the shared Mixer over e_u, e_sid^(1:l) and u2t^(1:l)) for the user
  ``user_index[n]`` of the current user batch;
* ``ItemScoreFn(user_index [N], item_ids [N]) -> logits [N]`` -- the rank path (Eq. 17, u2i
  computed from the user's state) or any other item scorer.

The user-side work (e_u, history embeddings) is done once per user batch by whoever builds
the callables; here users are only indices. No function loops in Python over users or
beams: candidates are whole tensors, validity is a ``searchsorted`` on sorted prefix codes
(:mod:`dig_torchrec.retrieval.sid_index`), and ties are broken deterministically by
(score descending, code / item id ascending).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from dig_torchrec.retrieval.sid_index import SidIndex, decode_prefix, sorted_membership

logger = logging.getLogger(__name__)

PrefixScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ItemScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NEG_INF = float("-inf")


@dataclass
class BeamResult:
    """Top leaves per user.

    Attributes:
        codes: ``[U, B]`` leaf codes in rank order; -1 marks an empty slot.
        scores: ``[U, B]`` leaf logits; -inf on empty slots.
        num_scored: (user, prefix) pairs the scorer evaluated.
    """

    codes: torch.Tensor
    scores: torch.Tensor
    num_scored: int


# ---------------------------------------------------------------------- ordering helpers
def topk_deterministic(scores: torch.Tensor, keys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-``k`` by (score descending, key ascending).

    ``torch.topk`` leaves the order of tied scores unspecified; two stable sorts make it
    reproducible. Entries scored -inf are invalid: their key comes back as -1.

    Args:
        scores: ``[U, C]`` float scores.
        keys: ``[U, C]`` int64 tie-break keys (codes or item ids), unique within a row.
        k: how many to keep (the result is padded with -1 / -inf when C < k).

    Returns:
        ``(keys [U, k], scores [U, k])``.
    """
    U, C = scores.shape
    by_key = torch.sort(keys, dim=1, stable=True)
    s = torch.gather(scores, 1, by_key.indices)
    by_score = torch.sort(s, dim=1, descending=True, stable=True)
    kk = min(k, C)
    top_scores = by_score.values[:, :kk]
    top_keys = torch.gather(by_key.values, 1, by_score.indices[:, :kk])
    top_keys = torch.where(torch.isneginf(top_scores), torch.full_like(top_keys, -1), top_keys)
    if kk < k:
        top_keys = torch.cat([top_keys, top_keys.new_full((U, k - kk), -1)], dim=1)
        top_scores = torch.cat([top_scores, top_scores.new_full((U, k - kk), NEG_INF)], dim=1)
    return top_keys, top_scores


def segment_topk(
    group: torch.Tensor, score: torch.Tensor, key: torch.Tensor, num_groups: int, k: int
) -> torch.Tensor:
    """Per-group top-``k`` of a flat list by (score descending, key ascending).

    Args:
        group: ``[M]`` group (user) of every element, in ``[0, num_groups)``.
        score: ``[M]`` scores, higher first.
        key: ``[M]`` int64 tie-break keys, lower first.
        num_groups: G.
        k: kept per group.

    Returns:
        ``[G, k]`` positions into the flat list, -1 padded.
    """
    out = torch.full((num_groups, k), -1, dtype=torch.long, device=group.device)
    if group.numel() == 0:
        return out
    order = torch.sort(key, stable=True).indices
    order = order[torch.sort(score[order], descending=True, stable=True).indices]
    order = order[torch.sort(group[order], stable=True).indices]
    g = group[order]
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(order.numel(), device=group.device) - starts[g]
    keep = pos < k
    out[g[keep], pos[keep]] = order[keep]
    return out


def _score_chunked(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor,
                   max_rows: int) -> torch.Tensor:
    """Call ``fn(a[i:j], b[i:j])`` over row chunks of at most ``max_rows`` (bounds memory)."""
    if a.numel() == 0:
        return torch.empty(0)
    outs = [fn(a[i:i + max_rows], b[i:i + max_rows]).reshape(-1).float() for i in range(0, a.shape[0], max_rows)]
    return torch.cat(outs)


# ---------------------------------------------------------------------- beam search
def beam_search(
    score_fn: PrefixScoreFn, num_users: int, index: SidIndex, beam_size: int, max_rows: int = 65536
) -> BeamResult:
    """Trie-constrained beam search (Eq. 16), batched over ``num_users`` users.

    Layer 1 scores every valid first token; layer ``l`` expands each of the B kept prefixes
    by all K tokens, drops children that prefix no item (``searchsorted`` on the sorted
    depth-``l`` codes), scores the rest with ``score_fn`` and keeps the top B by
    (logit at depth ``l``, prefix code). The beam is ranked by the depth-``l`` recall logit
    itself, since Eq. 16 scores each prefix as a whole (sigma(Mixer(...)) is the click
    probability of the prefix, not a conditional of its last token).

    Args:
        score_fn: recall-path scorer for the current user batch.
        num_users: U.
        index: the SID index (valid prefixes and leaves).
        beam_size: B.
        max_rows: largest number of (user, prefix) rows per scorer call.
    """
    K, L = index.num_codes, index.num_layers
    dev = index.leaf_codes.device
    users = torch.arange(num_users, device=dev)
    # layer 1: all K tokens for every user
    codes = torch.arange(K, device=dev).expand(num_users, K)
    scored = 0
    beam_codes: Optional[torch.Tensor] = None
    beam_scores: Optional[torch.Tensor] = None
    for depth in range(1, L + 1):  # loop over SID depth only
        if depth > 1:
            assert beam_codes is not None
            codes = (beam_codes.unsqueeze(-1) * K + torch.arange(K, device=dev)).reshape(num_users, -1)
            alive = (beam_codes >= 0).unsqueeze(-1).expand(-1, -1, K).reshape(num_users, -1)
        else:
            alive = torch.ones_like(codes, dtype=torch.bool)
        valid = alive & sorted_membership(index.valid_codes(depth), codes.clamp(min=0))
        rows, cols = valid.nonzero(as_tuple=True)
        child = codes[rows, cols]
        logits = _score_chunked(score_fn, users[rows], decode_prefix(child, depth, K), max_rows)
        scored += int(rows.numel())
        full = torch.full(codes.shape, NEG_INF, dtype=torch.float32, device=dev)
        full[rows, cols] = logits.to(dev)
        keys = torch.where(valid, codes, torch.full_like(codes, torch.iinfo(torch.long).max))
        beam_codes, beam_scores = topk_deterministic(full, keys, beam_size)
    assert beam_codes is not None and beam_scores is not None
    return BeamResult(beam_codes, beam_scores, scored)


def exhaustive_leaf_search(
    score_fn: PrefixScoreFn, num_users: int, index: SidIndex, topn: int, max_rows: int = 65536
) -> BeamResult:
    """Exact argmax in token space: score every occupied leaf (full SID) with the depth-L
    recall path and keep the top ``topn`` with the same tie-breaking as :func:`beam_search`.

    Args:
        score_fn: recall-path scorer for the current user batch.
        num_users: U.
        index: the SID index.
        topn: leaves kept per user.
        max_rows: largest number of (user, leaf) rows per scorer call.
    """
    leaves = index.leaf_codes
    M = leaves.numel()
    tokens = decode_prefix(leaves, index.num_layers, index.num_codes)
    user_index = torch.arange(num_users).repeat_interleave(M)
    logits = torch.empty(num_users * M)
    # chunk by whole rows of the [U, M] grid so the leaf tokens are never replicated U times
    per = max(1, max_rows // M)
    for u0 in range(0, num_users, per):
        u1 = min(num_users, u0 + per)
        logits[u0 * M:u1 * M] = _score_chunked(
            score_fn, user_index[u0 * M:u1 * M], tokens.repeat(u1 - u0, 1), max_rows)
    codes, scores = topk_deterministic(logits.view(num_users, M), leaves.expand(num_users, M), topn)
    return BeamResult(codes, scores, num_users * M)


def ancestor_ranks(score_fn: PrefixScoreFn, index: SidIndex, leaf_codes: torch.Tensor, max_rows: int = 65536
                   ) -> List[List[int]]:
    """Why beam search misses a leaf: the rank (0 = best) of each leaf's depth-``l`` ancestor
    among ALL occupied depth-``l`` prefixes, by the depth-``l`` recall logit, for l = 1..L-1.

    Beam search with beam B keeps a leaf reachable only while its ancestor stays in the top
    B at every depth (a rank >= B at depth 1 loses it for certain). Costs one scorer call
    per occupied prefix of depths 1..L-1 (at 500K items about as much as exhaustive search).

    Args:
        score_fn: recall-path scorer of ONE user (user index 0).
        index: the SID index.
        leaf_codes: ``[n]`` leaf codes (e.g. the exhaustive top-10; -1 entries are skipped).

    Returns:
        ``[L-1][n']`` ranks per depth, in the order of the valid ``leaf_codes``.
    """
    K, L = index.num_codes, index.num_layers
    leaves = leaf_codes[leaf_codes >= 0].to(index.leaf_codes.device)
    out: List[List[int]] = []
    for depth in range(1, L):
        valid = index.valid_codes(depth)
        logits = _score_chunked(score_fn, torch.zeros(valid.numel(), dtype=torch.long, device=valid.device),
                                decode_prefix(valid, depth, K), max_rows)
        order = topk_deterministic(logits.unsqueeze(0), valid.unsqueeze(0), valid.numel())[0][0]  # beam's tie-break
        rank_of_code = torch.empty(valid.numel(), dtype=torch.long, device=valid.device)
        rank_of_code[torch.searchsorted(valid, order)] = torch.arange(valid.numel(), device=valid.device)
        ancestors = leaves // (K ** (L - depth))
        out.append(rank_of_code[torch.searchsorted(valid, ancestors)].tolist())
    return out


# ---------------------------------------------------------------------- leaves -> items
def _exclusion_mask(user: torch.Tensor, item: torch.Tensor, exclude: Optional[torch.Tensor], num_items: int) -> torch.Tensor:
    """True where (user[n], item[n]) is listed in ``exclude [U, H]`` (-1 padded)."""
    if exclude is None or exclude.numel() == 0:
        return torch.zeros_like(item, dtype=torch.bool)
    U, H = exclude.shape
    ex_user = torch.arange(U).unsqueeze(1).expand(U, H)
    ok = exclude >= 0
    banned = torch.unique(ex_user[ok] * num_items + exclude[ok])
    return sorted_membership(banned, user * num_items + item)


def leaves_to_items(
    result: BeamResult,
    index: SidIndex,
    n: int,
    *,
    item_score_fn: Optional[ItemScoreFn] = None,
    exclude: Optional[torch.Tensor] = None,
    max_rows: int = 65536,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Map ranked leaves to ranked items through the inverted index.

    Pure retrieval (``item_score_fn is None``): items follow their leaf's rank; items that
    share a leaf follow ascending item id; the item score is its leaf score.
    Unified (``item_score_fn`` given, the rank path of Eq. 17): the smallest run of
    top leaves that holds ``n`` items is scored item by item and the items are ordered by
    that score (ties by item id), so when colliding items overflow the list the rank path
    decides which stay.

    Args:
        result: ranked leaves per user.
        index: the SID index.
        n: items returned per user.
        item_score_fn: rank-path scorer, or ``None`` for pure retrieval.
        exclude: ``[U, H]`` item ids to drop per user (-1 padded), e.g. the history.
        max_rows: largest number of (user, item) rows per scorer call.

    Returns:
        ``(items [U, n], scores [U, n])``, -1 / -inf padded.
    """
    U, B = result.codes.shape
    j = index.leaf_index(result.codes.clamp(min=0))
    j = torch.where(result.codes >= 0, j, torch.full_like(j, -1))
    sizes = torch.where(j >= 0, index.leaf_sizes[j.clamp(min=0)], torch.zeros_like(j))
    flat_sizes = sizes.reshape(-1)
    total = int(flat_sizes.sum())
    slot_flat = torch.arange(U * B).repeat_interleave(flat_sizes)  # which (user, slot) each item came from
    user = slot_flat // B
    first = torch.cumsum(flat_sizes, 0) - flat_sizes
    within = torch.arange(total) - first.repeat_interleave(flat_sizes)
    item = index.leaf_items[index.leaf_offsets[j.reshape(-1).clamp(min=0)].repeat_interleave(flat_sizes) + within]
    leaf_score = result.scores.reshape(-1)[slot_flat]
    keep = ~_exclusion_mask(user, item, exclude, index.num_items)
    user, item, slot_flat, leaf_score = user[keep], item[keep], slot_flat[keep], leaf_score[keep]
    if item_score_fn is None:
        # the flat list is already in (user, leaf rank, item id) order
        sel = segment_topk(user, torch.zeros_like(leaf_score), slot_flat * index.num_items + item, U, n)
        scores = leaf_score
    else:
        # keep every leaf that starts before position n of its user's (post-exclusion) list
        kept_per_slot = torch.bincount(slot_flat, minlength=U * B).view(U, B)
        start = torch.cumsum(kept_per_slot, 1) - kept_per_slot
        in_run = start.reshape(-1)[slot_flat] < n
        user, item = user[in_run], item[in_run]
        scores = _score_chunked(item_score_fn, user, item, max_rows)
        sel = segment_topk(user, scores, item, U, n)
    ok = sel >= 0
    out_items = torch.where(ok, item[sel.clamp(min=0)] if item.numel() else sel, torch.full_like(sel, -1))
    out_scores = torch.where(ok, scores[sel.clamp(min=0)] if scores.numel() else sel.float(),
                             torch.full(sel.shape, NEG_INF))
    return out_items, out_scores


def rank_all_items(
    item_score_fn: ItemScoreFn,
    num_users: int,
    num_items: int,
    topn: int,
    *,
    exclude: Optional[torch.Tensor] = None,
    max_rows: int = 65536,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact argmax in item space: score every (user, item) pair and keep the top ``topn``
    per user by (score descending, item id ascending).

    Args:
        item_score_fn: item scorer (e.g. the rank path with u2i from the user's state).
        num_users: U.
        num_items: |V|.
        topn: items kept per user.
        exclude: ``[U, H]`` items to drop per user (-1 padded).
        max_rows: largest number of rows per scorer call.
    """
    user = torch.arange(num_users).repeat_interleave(num_items)
    item = torch.arange(num_items).repeat(num_users)
    scores = _score_chunked(item_score_fn, user, item, max_rows).view(num_users, num_items)
    return top_items_from_scores(scores, topn, exclude=exclude)


def top_items_from_scores(
    scores: torch.Tensor, topn: int, *, exclude: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top items of a dense ``[U, num_items]`` score matrix with history exclusion.

    Args:
        scores: ``[U, num_items]``.
        topn: items kept per user.
        exclude: ``[U, H]`` items to drop per user (-1 padded).
    """
    U, V = scores.shape
    scores = scores.float().clone()
    if exclude is not None and exclude.numel():
        rows = torch.arange(U).unsqueeze(1).expand_as(exclude)
        ok = exclude >= 0
        scores[rows[ok], exclude[ok]] = NEG_INF
    return topk_deterministic(scores, torch.arange(V).expand(U, V), topn)
