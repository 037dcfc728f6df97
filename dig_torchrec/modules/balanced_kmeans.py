"""Balanced k-means tree initialisation of the RQ codebooks and collision tools (paper §3.2).

The paper initialises the codebooks with an offline balanced k-means *tree*: every node
splits its items into K equal-size children, so after L levels every leaf holds at most
``ceil(N / K^L)`` items, i.e. zero collisions whenever ``N <= K^L``.

RQ, however, has ONE codebook per layer shared by all parents (Eq. 2), while a tree has
K centroids per node. We resolve the tension by building the tree *around the shared
codebook*: at layer l

1. fit K shared centroids by k-means on (a sample of) the layer-l residuals r_{l-1};
2. inside every parent node (items sharing s_1..s_{l-1}) assign its items to those K
   shared centroids under a capacity constraint (each child gets floor or ceil of
   n_parent / K items, the extra slots going to the most demanded children), so the
   tree stays exactly balanced;
3. keep those shared centroids as c_{l,k} (default), or set c_{l,k} to the mean residual
   of the items given token k at layer l over all parents (``codebook_update=
   "assigned_mean"``); Eq. 3 then subtracts c_{l,s_l} to form the next residuals.

Token k therefore means "near shared centroid k" in every parent, so the Eq. 2 argmin
after init mostly agrees with the tree; where the capacity forced an item off its nearest
code it may not, and those items can collide under Eq. 2 (measured, see the README).

Everything is vectorised torch (no Python loop over nodes or items); the only loops are
over layers, k-means iterations, and "proposal rounds" of the capacity assignment, each
of which touches only the still-unassigned items.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

import torch

from dig_torchrec.errors import ConfigError

logger = logging.getLogger(__name__)

_INF = float("inf")


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``||x_n - c_k||^2`` for every pair.

    Args:
        x: ``[N, D]`` points.
        centroids: ``[K, D]`` centroids.

    Returns:
        ``[N, K]`` squared Euclidean distances (clamped at 0).
    """
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ centroids.t()) + (centroids * centroids).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _rank_within_runs(sorted_keys: torch.Tensor) -> torch.Tensor:
    """Position of each element inside its run of equal consecutive keys (0-based)."""
    n = sorted_keys.numel()
    if n == 0:
        return sorted_keys.new_zeros(0)
    _, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(n, device=sorted_keys.device) - torch.repeat_interleave(starts, counts)


def balanced_capacity(group_sizes: torch.Tensor, demand: torch.Tensor) -> torch.Tensor:
    """Per-(group, code) capacities ``floor(n/K)`` or ``ceil(n/K)`` summing to ``n``.

    The ``n mod K`` extra slots of a group go to its most demanded codes (ties: lower code).

    Args:
        group_sizes: ``[G]`` items per group.
        demand: ``[G, K]`` how many items of the group prefer each code.

    Returns:
        ``[G, K]`` int64 capacities.
    """
    g, k = demand.shape
    base = torch.div(group_sizes, k, rounding_mode="floor")
    extra = group_sizes - base * k
    order = torch.argsort(-demand.to(torch.float64), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k, device=demand.device).expand(g, k).contiguous())
    return base[:, None] + (rank < extra[:, None]).long()


def capacity_constrained_assign(
    points: torch.Tensor,
    group: torch.Tensor,
    centroids: torch.Tensor,
    capacity: Optional[torch.Tensor] = None,
    group_sizes: Optional[torch.Tensor] = None,
    fallback: Optional[torch.Tensor] = None,
    chunk_size: int = 65536,
    num_candidates: int = 32,
) -> torch.Tensor:
    """Assign each point to one of K shared centroids, respecting per-(group, code) capacities.

    Greedy "proposal rounds": every unassigned point proposes to its nearest code that
    still has room in its group; each (group, code) accepts its nearest proposers up to
    the remaining capacity; rejected points try again next round. Every round accepts at
    least one point per proposed (group, code), so it terminates. Each point's
    ``num_candidates`` nearest codes are computed once; only points whose candidates are
    all full get their full distance row recomputed.

    Args:
        points: ``[N, D]``.
        group: ``[N]`` int64 group id in ``[0, G)``.
        centroids: ``[K, D]`` shared by all groups.
        capacity: ``[G, K]`` capacities; or None with ``group_sizes`` given for the
            balanced capacities of :func:`balanced_capacity` (decided from the demand of
            the points' nearest codes).
        group_sizes: ``[G]`` (only with ``capacity=None``).
        fallback: ``[N]`` code for points left without room (all codes of their group
            full, possible only when the capacity is infeasible); default: nearest code.
        chunk_size: points per distance block (bounds memory at chunk_size * K floats).
        num_candidates: nearest codes kept per point between rounds.

    Returns:
        ``[N]`` int64 codes.
    """
    n = points.shape[0]
    k = centroids.shape[0]
    device = points.device
    t = min(k, num_candidates)
    cand_dist = torch.empty(n, t, dtype=points.dtype, device=device)
    cand_code = torch.empty(n, t, dtype=torch.long, device=device)
    for s in range(0, n, chunk_size):
        cand_dist[s : s + chunk_size], cand_code[s : s + chunk_size] = torch.topk(
            squared_distances(points[s : s + chunk_size], centroids), t, dim=1, largest=False
        )
    if capacity is None:
        assert group_sizes is not None, "capacity or group_sizes is required"
        demand = torch.zeros(group_sizes.numel() * k, dtype=torch.long, device=device)
        demand.index_add_(0, group * k + cand_code[:, 0], torch.ones(n, dtype=torch.long, device=device))
        capacity = balanced_capacity(group_sizes, demand.view(-1, k))
    flat_remaining = capacity.clone().reshape(-1)
    assigned = torch.full((n,), -1, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)
    while active.numel() > 0:
        g = group[active]
        room = flat_remaining[g[:, None] * k + cand_code[active]] > 0
        best_dist, pos = torch.where(room, cand_dist[active], _INF).min(1)
        best_code = cand_code[active].gather(1, pos[:, None]).squeeze(1)
        exhausted = torch.nonzero(torch.isinf(best_dist)).squeeze(1)
        for s in range(0, exhausted.numel(), chunk_size):  # candidates all full: full row
            e = exhausted[s : s + chunk_size]
            d = squared_distances(points[active[e]], centroids)
            d.masked_fill_(flat_remaining.view(-1, k)[g[e]] <= 0, _INF)
            best_dist[e], best_code[e] = d.min(1)
        stuck = torch.isinf(best_dist)
        if bool(stuck.any()):
            idx = active[stuck]
            assigned[idx] = fallback[idx] if fallback is not None else cand_code[idx, 0]
            active, g, best_code, best_dist = active[~stuck], g[~stuck], best_code[~stuck], best_dist[~stuck]
            if active.numel() == 0:
                break
        key = g * k + best_code
        order = torch.argsort(best_dist, stable=True)
        order = order[torch.argsort(key[order], stable=True)]
        sorted_key = key[order]
        accept = _rank_within_runs(sorted_key) < flat_remaining[sorted_key]
        acc = order[accept]
        assigned[active[acc]] = best_code[acc]
        flat_remaining.index_add_(0, sorted_key[accept], torch.full_like(sorted_key[accept], -1))
        active = active[order[~accept]]
    return assigned


def kmeans(
    x: torch.Tensor, num_clusters: int, iters: int, generator: torch.Generator, chunk_size: int = 65536
) -> torch.Tensor:
    """Lloyd k-means with k-means++ seeding; empty clusters are re-seeded with random points.

    Args:
        x: ``[N, D]`` points (N may be smaller than ``num_clusters``).
        num_clusters: K.
        iters: Lloyd iterations.
        generator: CPU generator for the seeding.
        chunk_size: points per distance block.

    Returns:
        ``[K, D]`` centroids.
    """
    n, dim = x.shape
    if n >= num_clusters:  # k-means++ seeds drawn from at most 16 K points (cost K * 16K * D)
        pool = x[torch.randperm(n, generator=generator)[: 16 * num_clusters].to(x.device)] if n > 16 * num_clusters else x
        c = _kmeans_plus_plus(pool, num_clusters, generator)
    else:
        c = x[torch.randint(n, (num_clusters,), generator=generator).to(x.device)].clone()
        c[n:] += 1e-4 * torch.randn(num_clusters - n, dim, generator=generator).to(x)  # keep duplicates apart
    for _ in range(iters):
        codes = torch.cat([squared_distances(x[s : s + chunk_size], c).argmin(1) for s in range(0, n, chunk_size)])
        sums = torch.zeros_like(c).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=num_clusters).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            reseed = torch.randint(n, (int(empty.sum()),), generator=generator).to(x.device)
            c[empty] = x[reseed]
    return c


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next seed drawn with probability ~ squared distance to the seeds so far."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    seeds = [int(torch.randint(n, (1,), generator=generator))]
    closest = (x_sq - 2.0 * (x @ x[seeds[0]]) + x_sq[seeds[0]]).clamp_min_(0.0)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:
            nxt = int(torch.randint(n, (1,), generator=generator))
        else:
            nxt = int(torch.multinomial((closest / total).cpu(), 1, generator=generator))
        seeds.append(nxt)
        closest = torch.minimum(closest, (x_sq - 2.0 * (x @ x[nxt]) + x_sq[nxt]).clamp_min_(0.0))
    return x[torch.tensor(seeds, device=x.device)].clone()


def check_catalog_fits(num_items: int, num_codes: int, num_layers: int) -> None:
    """Raise :class:`ConfigError` when the tree cannot give every item its own leaf."""
    if num_items > num_codes**num_layers:
        raise ConfigError(
            f"catalog of {num_items} items exceeds tokenizer.num_codes ** tokenizer.num_layers = "
            f"{num_codes}^{num_layers} = {num_codes ** num_layers} leaves; raise tokenizer.num_codes or "
            f"tokenizer.num_layers"
        )


@torch.no_grad()
def balanced_tree_init(
    e_v: torch.Tensor,
    num_codes: int,
    num_layers: int,
    kmeans_iters: int = 10,
    sample_size: int = 0,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
    codebook_update: str = "centroids",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means tree over the catalog with shared per-layer codebooks (§3.2).

    Args:
        e_v: ``[N, D]`` item representations (flattened Eq. 1 output).
        num_codes: K.
        num_layers: L.
        kmeans_iters: Lloyd iterations of the shared-centroid fit per layer.
        sample_size: residuals used for that fit (0: ``64 * K``); the balanced assignment
            always uses all items.
        seed: seed of the k-means seeding and sampling.
        progress: optional callback called with the layer index after each layer.
        codebook_update: ``centroids`` keeps the shared k-means centroids as c_{l,k} (a
            Lloyd fixed point of the unconstrained Eq. 2 assignment, so the first EMA steps
            barely move it); ``assigned_mean`` sets c_{l,k} to the mean residual of the items
            the capacity-constrained tree gave token k. Measured on synthetic field-structured
            e_v, ``centroids`` gives equal or fewer Eq. 2 collisions right after init (e.g.
            8% vs 22% at 40K items, K=256, L=4).

    Returns:
        ``(codebooks [L, K, D], sids [N, L])``; every item has its own full SID when
        ``N <= K^L`` (zero collisions) and every node's children differ in size by <= 1.
    """
    n, dim = e_v.shape
    check_catalog_fits(n, num_codes, num_layers)
    gen = torch.Generator().manual_seed(seed)
    residual = e_v.detach().float().clone()
    device = residual.device
    codebooks = torch.zeros(num_layers, num_codes, dim, device=device)
    sids = torch.zeros(n, num_layers, dtype=torch.long, device=device)
    group = torch.zeros(n, dtype=torch.long, device=device)
    num_groups = 1
    sample_size = sample_size or 64 * num_codes
    for layer in range(num_layers):
        if n > sample_size:
            sample = residual[torch.randperm(n, generator=gen)[:sample_size].to(device)]
        else:
            sample = residual
        centroids = kmeans(sample, num_codes, kmeans_iters, gen)
        codes = _balanced_layer_codes(residual, group, num_groups, centroids)
        # assigned_mean: c_{l,k} := mean residual of the items given token k at layer l (all parents).
        sums = torch.zeros_like(centroids).index_add_(0, codes, residual)
        counts = torch.bincount(codes, minlength=num_codes).to(residual.dtype)
        codebook = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], centroids)
        if codebook_update == "centroids":
            codebook = centroids
        codebooks[layer] = codebook
        sids[:, layer] = codes
        residual -= codebook[codes]  # Eq. 3
        group, num_groups = _compact(group * num_codes + codes)
        if progress is not None:
            progress(layer)
    return codebooks, sids


def _balanced_layer_codes(
    residual: torch.Tensor, group: torch.Tensor, num_groups: int, centroids: torch.Tensor
) -> torch.Tensor:
    """One layer of the balanced tree: each node's items spread over the K codes (sizes differ by <= 1)."""
    n = residual.shape[0]
    sizes = torch.bincount(group, minlength=num_groups)
    # A single-item node just takes its nearest code; only larger nodes need capacities.
    shared = sizes[group] > 1
    codes = torch.zeros(n, dtype=torch.long, device=residual.device)
    alone = torch.nonzero(~shared).squeeze(1)
    for s in range(0, alone.numel(), 65536):
        codes[alone[s : s + 65536]] = squared_distances(residual[alone[s : s + 65536]], centroids).argmin(1)
    if bool(shared.any()):
        sub_group, _ = _compact(group[shared])
        codes[shared] = capacity_constrained_assign(
            residual[shared], sub_group, centroids, group_sizes=torch.bincount(sub_group)
        )
    return codes


def balanced_tree_assign(e_v: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Balanced-tree SIDs of a catalog on fixed codebooks: :func:`balanced_tree_init` without the k-means.

    Layer by layer, the items of every node (shared prefix) go to their nearest codes of
    ``codebooks[l]`` under balanced capacities, and the residual moves on by the chosen
    code (Eq. 3). Every item gets its own full SID when ``N <= K^L``.

    Args:
        e_v: ``[N, D]`` item representations.
        codebooks: ``[L, K, D]``.

    Returns:
        ``[N, L]`` SIDs.
    """
    n = e_v.shape[0]
    num_layers, num_codes, _ = codebooks.shape
    check_catalog_fits(n, num_codes, num_layers)
    residual = e_v.detach().float().clone()
    books = codebooks.to(residual)
    sids = torch.zeros(n, num_layers, dtype=torch.long, device=residual.device)
    group = torch.zeros(n, dtype=torch.long, device=residual.device)
    num_groups = 1
    for layer in range(num_layers):
        codes = _balanced_layer_codes(residual, group, num_groups, books[layer])
        sids[:, layer] = codes
        residual -= books[layer][codes]
        group, num_groups = _compact(group * num_codes + codes)
    return sids


def _compact(keys: torch.Tensor) -> Tuple[torch.Tensor, int]:
    uniq, inverse = torch.unique(keys, return_inverse=True)
    return inverse, int(uniq.numel())


def sid_keys(sids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """One int64 key per full SID (exact when K^L < 2^63, else a compacted id)."""
    num_layers = sids.shape[1]
    if num_codes**num_layers < 2**62:
        key = torch.zeros(sids.shape[0], dtype=torch.long, device=sids.device)
        for layer in range(num_layers):
            key = key * num_codes + sids[:, layer]
        return key
    key = torch.zeros(sids.shape[0], dtype=torch.long, device=sids.device)
    for layer in range(num_layers):
        key, _ = _compact(key * num_codes + sids[:, layer])
    return key


def collision_rate(sids: torch.Tensor, num_codes: int) -> float:
    """Fraction of items whose full SID is shared with at least one other item.

    Args:
        sids: ``[N, L]`` (rows with any -1 are ignored).
        num_codes: K.
    """
    valid = (sids >= 0).all(1)
    s = sids[valid]
    if s.shape[0] == 0:
        return 0.0
    _, inverse, counts = torch.unique(sid_keys(s, num_codes), return_inverse=True, return_counts=True)
    return float((counts[inverse] > 1).float().mean())


@torch.no_grad()
def resolve_last_layer_collisions(
    sids: torch.Tensor, last_residual: torch.Tensor, last_codebook: torch.Tensor, chunk_size: int = 65536
) -> torch.Tensor:
    """Collision-aware last-layer assignment: give colliding items distinct last tokens.

    Items sharing the prefix s_1..s_{L-1} form a group; each last-layer code holds at most
    one item of a group. In every colliding leaf the item nearest to the code keeps it;
    the displaced items take the nearest code still free in their group (greedy proposal
    rounds, :func:`capacity_constrained_assign`). A group with more than K items cannot be
    made collision-free at the last layer; its surplus items keep their Eq. 2 code.

    Args:
        sids: ``[N, L]`` Eq. 2 assignment.
        last_residual: ``[N, D]`` residual r_{L-1} entering the last layer.
        last_codebook: ``[K, D]`` codebook of the last layer.
        chunk_size: points per distance block.

    Returns:
        ``[N, L]`` SIDs with only the last column changed.
    """
    n, num_layers = sids.shape
    k = last_codebook.shape[0]
    out = sids.clone()
    if n == 0:
        return out
    prefix = sid_keys(sids[:, :-1], k) if num_layers > 1 else torch.zeros(n, dtype=torch.long, device=sids.device)
    group, num_groups = _compact(prefix)
    leaf = group * k + sids[:, -1]
    _, leaf_inv, leaf_counts = torch.unique(leaf, return_inverse=True, return_counts=True)
    colliding = leaf_counts[leaf_inv] > 1
    if not bool(colliding.any()):
        return out
    # Inside each colliding leaf the nearest item keeps the code.
    own_dist = ((last_residual - last_codebook[sids[:, -1]]) ** 2).sum(1)
    idx = torch.nonzero(colliding).squeeze(1)
    order = torch.argsort(own_dist[idx], stable=True)
    order = order[torch.argsort(leaf[idx][order], stable=True)]
    keeper_rank = _rank_within_runs(leaf[idx][order])
    displaced = idx[order[keeper_rank > 0]]
    taken = torch.zeros(num_groups * k, dtype=torch.long, device=sids.device)
    keep_mask = torch.ones(n, dtype=torch.bool, device=sids.device)
    keep_mask[displaced] = False
    taken.index_fill_(0, leaf[keep_mask], 1)
    disp_groups = torch.unique(group[displaced])
    disp_group_index = torch.searchsorted(disp_groups, group[displaced])
    capacity = (1 - taken.view(num_groups, k))[disp_groups]
    new_codes = capacity_constrained_assign(
        last_residual[displaced], disp_group_index, last_codebook, capacity=capacity,
        fallback=sids[displaced, -1], chunk_size=chunk_size,
    )
    out[displaced, -1] = new_codes
    return out
