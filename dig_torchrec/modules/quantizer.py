"""Residual quantizer with EMA codebooks (paper §3.2, Eq. 2-4, 11, 12).

Codebooks only *address* items: they are buffers, updated by an exponential moving
average of the residuals assigned to them, and never receive a gradient. The SID
embeddings that *express* items live in a separate embedding table (see ``model.py``).

Multi-rank consistency: the per-step code counts and residual sums are all-reduced (SUM)
over the default process group before the EMA step, so every rank applies the same
update; dead-code restarts are chosen on rank 0 and broadcast. The codebooks therefore
stay bitwise identical on every rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from dig_torchrec.modules.balanced_kmeans import squared_distances
from dig_torchrec.modules.flags import BufferFlag

logger = logging.getLogger(__name__)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class QuantizerOutput:
    """Result of residual quantisation of a batch.

    Attributes:
        sids: ``[N, L]`` token per layer (Eq. 2).
        residuals: ``[L + 1, N, D]`` r_0 = e_v, ..., r_L (Eq. 3); differentiable w.r.t. e_v,
            constant w.r.t. the codebooks.
    """

    sids: torch.Tensor
    residuals: torch.Tensor

    def commitment_loss(self, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 11: sum_l ||sg[c_{l,s_l}] - r_{l-1}||^2, i.e. sum_l ||r_l||^2.

        The squared norm is averaged over the D dimensions and over the rows in ``mask``
        (so the term does not scale with F*d); gradient reaches e_v only.
        """
        per_layer = (self.residuals[1:] ** 2).mean(-1)  # [L, N]
        return (_masked_mean(per_layer, mask)).sum()

    def semantic_loss(self, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 12: ||e_v - hat e_v^(1:L)||^2 = ||r_L||^2 (per-dimension mean over rows in ``mask``).

        hat e_v^(1:L) is a sum of codebook vectors, which are EMA buffers, so the gradient
        of this term reaches the encoder through e_v only; the codebooks follow e_v by EMA.
        """
        return _masked_mean((self.residuals[-1] ** 2).mean(-1)[None], mask).sum()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of ``x [..., N]`` restricted to ``mask [N]``."""
    w = mask.to(x.dtype)
    return (x * w).sum(-1) / w.sum().clamp_min(1.0)


class ResidualQuantizer(nn.Module):
    """L-layer residual quantizer over D-dim vectors with K-code EMA codebooks.

    Args:
        num_layers: L.
        num_codes: K.
        dim: D (= F_enc * d, the flattened e_v).
        decay: EMA decay alpha.
        epsilon: Laplace smoothing of the EMA cluster sizes.
        dead_code_threshold: EMA count (items per step) below which a code is restarted.
        restart_dead_codes: enable dead-code restarts.
        device: where the buffers live ("meta" allowed).
        catalog_size: > 0 scales the threshold with the catalog (``tokenizer.dead_code_rule=catalog``):
            a code is dead when its EMA count is below ``dead_code_threshold`` x the traffic of an
            average catalog item (the layer's EMA rows per step / ``catalog_size``).
    """

    def __init__(
        self,
        num_layers: int,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 0.03,
        restart_dead_codes: bool = True,
        device: Optional[torch.device | str] = None,
        catalog_size: int = 0,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.epsilon = epsilon
        self.dead_code_threshold = dead_code_threshold
        self.restart_dead_codes = restart_dead_codes
        self.catalog_size = catalog_size
        self.register_buffer("codebooks", torch.zeros(num_layers, num_codes, dim, device=device))
        self.register_buffer("ema_count", torch.zeros(num_layers, num_codes, device=device))
        self.register_buffer("ema_sum", torch.zeros(num_layers, num_codes, dim, device=device))
        # 0 until the first EMA step rescales the init fractions to per-step counts.
        self.register_buffer("ema_primed", torch.zeros((), dtype=torch.long, device=device))
        self._primed_flag = BufferFlag(False, self.ema_primed)  # read without a host sync per step
        self.register_buffer("dead_restarts", torch.zeros(num_layers, dtype=torch.long, device=device))
        self.last_stats: Dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ assignment
    @torch.no_grad()
    def assign(self, x: torch.Tensor, noise_scale: float = 0.0) -> torch.Tensor:
        """Eq. 2-3: greedy residual argmin, ``[N, D] -> [N, L]`` tokens.

        Args:
            x: ``[N, D]``.
            noise_scale: > 0 draws the code by Gumbel-max instead (DIGER-style exploration):
                ``argmin_k d_k - tau g_k`` with ``g_k ~ Gumbel(0, 1)`` and ``tau = noise_scale``
                times the row's standard deviation of ``d_k`` over codes; 0 is Eq. 2's argmin.
        """
        r = x.detach().float()
        sids = []
        for layer in range(self.num_layers):
            dist_k = squared_distances(r, self.codebooks[layer])
            if noise_scale > 0:
                gumbel = -torch.log(-torch.log(torch.rand_like(dist_k).clamp(1e-10, 1.0 - 1e-7)))
                dist_k = dist_k - noise_scale * dist_k.std(1, keepdim=True) * gumbel
            code = dist_k.argmin(1)  # Eq. 2
            sids.append(code)
            r = r - self.codebooks[layer][code]  # Eq. 3
        return torch.stack(sids, 1) if sids else torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)

    def residuals_for(self, x: torch.Tensor, sids: torch.Tensor) -> torch.Tensor:
        """r_0..r_L (Eq. 3) for given tokens: ``[L + 1, N, D]``; gradient flows to ``x`` only."""
        quantized = self.codebooks[torch.arange(self.num_layers, device=x.device)[None, :], sids]  # [N, L, D]
        prefix = torch.cumsum(quantized, 1)  # Eq. 4: hat e^(1:l)
        return torch.cat([x[None], x[None] - prefix.transpose(0, 1)], 0)

    def forward(self, x: torch.Tensor, sids: Optional[torch.Tensor] = None, noise_scale: float = 0.0) -> QuantizerOutput:
        """Quantise ``x [N, D]``; with ``sids`` given (frozen SIDs) only the residuals are computed."""
        if sids is None:
            sids = self.assign(x, noise_scale)
        return QuantizerOutput(sids=sids, residuals=self.residuals_for(x, sids))

    # ------------------------------------------------------------------ init / EMA
    @torch.no_grad()
    def load_initial_codebooks(self, codebooks: torch.Tensor, sids: torch.Tensor) -> None:
        """Set the codebooks from the balanced tree and the EMA state from its code usage.

        ``ema_count`` holds usage *fractions* until the first EMA step, which rescales them
        to that step's item count (the per-step scale the dead-code threshold refers to).
        """
        self.codebooks.copy_(codebooks)
        frac = torch.zeros_like(self.ema_count)
        for layer in range(self.num_layers):
            frac[layer] = torch.bincount(sids[:, layer], minlength=self.num_codes).float() / max(sids.shape[0], 1)
        self.ema_count.copy_(frac)
        self.ema_sum.copy_(codebooks * frac[..., None])
        self.ema_primed.zero_()
        self.dead_restarts.zero_()

    @torch.no_grad()
    def batch_statistics(self, out: QuantizerOutput, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(layer, code) counts ``[L, K]`` and residual sums ``[L, K, D]`` of the rows in ``mask``."""
        L, K = self.num_layers, self.num_codes
        sids = out.sids[mask]
        r_in = out.residuals[:-1, mask].detach().float()  # r_{l-1} entering layer l
        flat = (sids + torch.arange(L, device=sids.device)[None, :] * K).t().reshape(-1)  # [L*n]
        counts = torch.zeros(L * K, device=r_in.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        sums = torch.zeros(L * K, self.dim, device=r_in.device).index_add_(0, flat, r_in.reshape(-1, self.dim))
        return counts.view(L, K), sums.view(L, K, self.dim)

    @torch.no_grad()
    def ema_update(self, out: QuantizerOutput, mask: torch.Tensor) -> None:
        """One EMA step of every codebook from the batch (all-reduced over ranks).

        N_k <- a N_k + (1-a) n_k;  m_k <- a m_k + (1-a) sum r;  c_k = m_k / N~_k with the
        Laplace-smoothed N~_k = (N_k + eps) / (sum N + K eps) * sum N.
        """
        counts, sums = self.batch_statistics(out, mask)
        if _dist_ready():
            packed = torch.cat([counts[..., None], sums], -1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            counts, sums = packed[..., 0], packed[..., 1:]
        if float(counts.sum()) == 0.0:  # no real row on any rank: keep every code (EMA never divides by 0)
            self.last_stats = _usage_stats(counts)
            return
        a = self.decay
        if not self._primed_flag.read(self.ema_primed):
            self.ema_count.mul_(counts.sum(1, keepdim=True))
            self.ema_sum.copy_(self.codebooks * self.ema_count[..., None])
            self.ema_primed.fill_(1)
        self.ema_count.mul_(a).add_(counts, alpha=1 - a)
        self.ema_sum.mul_(a).add_(sums, alpha=1 - a)
        total = self.ema_count.sum(1, keepdim=True)
        smoothed = (self.ema_count + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.codebooks.copy_(self.ema_sum / smoothed[..., None])
        self.last_stats = _usage_stats(counts)
        if self.restart_dead_codes:
            self._restart_dead_codes(out, mask)

    @torch.no_grad()
    def _restart_dead_codes(self, out: QuantizerOutput, mask: torch.Tensor) -> None:
        """Move codes whose EMA count fell below the threshold onto current batch residuals.

        The dead set is identical on every rank (it comes from all-reduced counts); rank 0
        draws the replacement residuals and broadcasts the updated codebook state.
        """
        threshold = torch.full_like(self.ema_count[:, :1], self.dead_code_threshold)
        if self.catalog_size > 0:  # a share of an average catalog item's traffic per step
            threshold = threshold * self.ema_count.sum(1, keepdim=True) / self.catalog_size
        dead = self.ema_count < threshold  # [L, K]
        num_dead = dead.sum(1)
        if int(num_dead.sum()) == 0:
            return
        rank = dist.get_rank() if _dist_ready() else 0
        if rank == 0:
            r_in = out.residuals[:-1, mask].detach().float()  # [L, n, D]
            n = r_in.shape[1]
            for layer in torch.nonzero(num_dead).flatten().tolist():
                k = int(num_dead[layer])
                if n == 0:
                    continue
                pick = torch.randint(n, (k,), device=r_in.device)
                new = r_in[layer, pick]
                if n < k:
                    new = new + 1e-4 * torch.randn_like(new)
                self.codebooks[layer, dead[layer]] = new
                self.ema_count[layer, dead[layer]] = 1.0
                self.ema_sum[layer, dead[layer]] = new
        if _dist_ready():
            for buf in (self.codebooks, self.ema_count, self.ema_sum):
                dist.broadcast(buf, src=0)
        self.dead_restarts.add_(num_dead)
        logger.debug("restarted %s dead codes per layer", num_dead.tolist())


def _usage_stats(counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Utilisation (fraction of codes used) and perplexity per layer from ``[L, K]`` counts."""
    p = counts / counts.sum(1, keepdim=True).clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return {"utilization": (counts > 0).float().mean(1), "perplexity": torch.exp(entropy)}
