"""Type-III features on the recall path (paper §3.3, Eq. 13-15).

* :func:`u2t_teacher` - Eq. 13, the batch statistic: for every row and layer l, the mean
  u2i of the batch rows whose SID prefix s_1..s_l matches (optionally also the user).
* :class:`U2TMLP` - Eq. 14, one 2-layer MLP per layer over [e_u; e_sid^(1:l)] -> d_c,
  evaluated for all L layers in one batched matmul.
* :class:`U2TStatTable` - the ``u2t.inference=stat_mean`` ablation: a per-(layer, token)
  running mean of u2i gathered in training.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def _compact(keys: torch.Tensor) -> torch.Tensor:
    return torch.unique(keys, return_inverse=True)[1]


@torch.no_grad()
def u2t_teacher(
    u2i: torch.Tensor,
    sids: torch.Tensor,
    weights: torch.Tensor,
    num_codes: int,
    user_ids: Optional[torch.Tensor] = None,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """Eq. 13: bucket mean of u2i over the batch, for every row and layer (stop-gradient).

    Args:
        u2i: ``[N, d_c]`` u2i of every row.
        sids: ``[N, L]`` SID of every row's item.
        weights: ``[N]``; only rows with weight > 0 contribute to a mean (padding rows
            still receive the mean of their group, 0 if it has no real row).
        num_codes: K.
        user_ids: ``[N]`` for ``u2t.grouping=user_bucket`` (group by user AND prefix);
            None groups by prefix only (``bucket``).
        leave_one_out: exclude the row's own u2i from its mean (``u2t.teacher=leave_one_out``):
            a row alone in its bucket (most rows at deep layers of a large SID space) gets 0
            instead of its own exact u2i, which the recall path never has at inference.

    Returns:
        ``[L, N, d_c]`` teacher u2t^(1:l) for l = 1..L (detached).
    """
    n, num_layers = sids.shape
    d_c = u2i.shape[1]
    # Prefix keys s_1..s_l, compacted after every layer so they never overflow int64.
    keys = []
    key = torch.zeros(n, dtype=torch.long, device=sids.device)
    for layer in range(num_layers):
        key = _compact(key * num_codes + sids[:, layer])
        keys.append(key)
    prefix = torch.stack(keys, 0)  # [L, N], each < N
    group = torch.arange(num_layers, device=sids.device)[:, None] * n + prefix
    if user_ids is not None:
        group = group * n + _compact(user_ids)[None, :]
    group = _compact(group.reshape(-1))  # [L*N] segment id
    num_groups = group.numel()  # an upper bound of the segment ids: no host sync for group.max()
    w = (weights > 0).to(u2i.dtype).repeat(num_layers)
    values = u2i.detach().repeat(num_layers, 1) * w[:, None]
    sums = torch.zeros(num_groups, d_c, dtype=u2i.dtype, device=u2i.device).index_add_(0, group, values)
    counts = torch.zeros(num_groups, dtype=u2i.dtype, device=u2i.device).index_add_(0, group, w)
    if not leave_one_out:
        mean = sums / counts.clamp_min(1.0)[:, None]
        return mean[group].view(num_layers, n, d_c)
    own_sum = sums[group] - values  # [L*N, d_c] the bucket without this row
    own_count = counts[group] - w
    return (own_sum / own_count.clamp_min(1.0)[:, None]).view(num_layers, n, d_c)


class U2TMLP(nn.Module):
    """Eq. 14: u2t_hat^(l) = MLP_u2t^(l)([e_u; e_sid^(1:l)]), one 2-layer MLP per layer.

    The L MLPs are stored as stacked weights and applied with batched matmuls.

    Args:
        num_layers: L.
        in_features: width of [e_u; e_sid] (F_u*d + F_enc*d).
        hidden: hidden width (``u2t.hidden_dim``).
        out_features: d_c.
        device: parameter device ("meta" allowed).
    """

    def __init__(
        self, num_layers: int, in_features: int, hidden: int, out_features: int,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_layers, in_features, hidden, device=device))
        self.b1 = nn.Parameter(torch.empty(num_layers, 1, hidden, device=device))
        self.w2 = nn.Parameter(torch.empty(num_layers, hidden, out_features, device=device))
        self.b2 = nn.Parameter(torch.empty(num_layers, 1, out_features, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, per layer."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, user: torch.Tensor, sid_prefix: torch.Tensor) -> torch.Tensor:
        """All layers: ``user [N, U]``, ``sid_prefix [L, N, T]`` -> ``[L, N, d_c]``."""
        x = torch.cat([user[None].expand(sid_prefix.shape[0], -1, -1), sid_prefix], -1)
        return torch.baddbmm(self.b2, torch.relu(torch.baddbmm(self.b1, x, self.w1)), self.w2)

    def forward_layer(self, layer: int, user: torch.Tensor, sid_prefix: torch.Tensor) -> torch.Tensor:
        """One layer (0-based ``layer``): ``user [N, U]``, ``sid_prefix [N, T]`` -> ``[N, d_c]``."""
        x = torch.cat([user, sid_prefix], -1)
        h = torch.relu(torch.addmm(self.b1[layer], x, self.w1[layer]))
        return torch.addmm(self.b2[layer], h, self.w2[layer])


class U2TStatTable(nn.Module):
    """Running mean of u2i per (layer, token) gathered in training (``u2t.inference=stat_mean``).

    Sums and counts are float64 buffers, all-reduced over ranks at every update so every
    rank holds the same table.

    Args:
        num_layers: L.
        num_codes: K.
        dim: d_c.
        device: buffer device ("meta" allowed).
    """

    def __init__(self, num_layers: int, num_codes: int, dim: int, device: Optional[torch.device | str] = None) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.register_buffer("u2i_sum", torch.zeros(num_layers, num_codes, dim, dtype=torch.float64, device=device))
        self.register_buffer("u2i_count", torch.zeros(num_layers, num_codes, dtype=torch.float64, device=device))

    @torch.no_grad()
    def update(self, sids: torch.Tensor, u2i: torch.Tensor, weights: torch.Tensor) -> None:
        """Add the rows with weight > 0: ``sids [N, L]``, ``u2i [N, d_c]``."""
        num_layers = sids.shape[1]
        mask = weights > 0
        s, x = sids[mask], u2i[mask].detach().double()
        flat = (s + torch.arange(num_layers, device=s.device)[None] * self.num_codes).t().reshape(-1)
        sums = torch.zeros_like(self.u2i_sum).view(-1, x.shape[1]).index_add_(0, flat, x.repeat(num_layers, 1))
        counts = torch.zeros_like(self.u2i_count).view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([counts[:, None], sums], 1)
            dist.all_reduce(packed)
            counts, sums = packed[:, 0], packed[:, 1:]
        self.u2i_sum.add_(sums.view_as(self.u2i_sum))
        self.u2i_count.add_(counts.view_as(self.u2i_count))

    def lookup(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """Mean u2i of token ``tokens [N]`` at (0-based) ``layer`` -> ``[N, d_c]`` (0 if never seen)."""
        mean = self.u2i_sum[layer] / self.u2i_count[layer].clamp_min(1.0)[:, None]
        return mean[tokens].float()
