"""DIG's training objective (paper §3.3, Eq. 8-15), kept apart from the model's forward.

:class:`DIGLoss` turns what the model computed (logits, quantizer residuals, u2t estimates
and teachers) into the five terms of Eq. 8:

    L = L_rank + w_recall L_recall + l1 L_commit + l2 L_sem + l3 L_u2t      (Eq. 8)

* ``L_rank`` (Eq. 9): weighted BCE of the rank path on the exposure rows.
* ``L_recall`` (Eq. 10): the recall path's per-layer objective, averaged over the L layers
  (or the last one only, ``loss.recall_supervision=last_layer``). Two forms
  (``loss.recall_objective``):

  - ``bce``: the paper's BCE on every retrieval row (click = 1, sampled negative = 0);
  - ``softmax``: a sampled softmax per click over its positive and its
    ``data.negatives_per_positive`` negatives, per layer. With popularity-sampled negatives
    (``data.negative_sampling=popularity``) the logits are corrected by ``log Q(v)``, the
    reader's sampling log-probability (``loss.logq_correction``; Yi et al., RecSys 2019), so
    the softmax estimates the full-corpus one instead of one biased against popular items.

  Negatives whose prefix c_1..c_l equals the positive's are left out of the depth-l softmax
  (accidental hits), and the logQ correction at depth l uses the sampling mass of the
  whole prefix, since a sampled item stands for its prefix there.

  An optional extra softmax term over candidates the reader did not draw, prefix-aware
  negatives (``loss.prefix_negatives``): at layer l, items that share the positive's prefix
  c_<l and differ at c_l (the decision beam search takes at depth l). The term scores every
  candidate, the positive included, with the inference-side u2t (MLP_u2t's estimate) and
  eval-mode BN, so it cannot tell candidates apart by where their u2t came from.

  An optional descendant distillation (``loss.descendant_distill_weight``, softmax only): at
  depth l < L the softmax over a click group's prefixes is pulled toward the softmax of their
  sampled descendants' (stop-gradient) leaf logits, so prefix scores rank like the best leaf
  under them (:func:`descendant_distillation`).
* ``L_commit`` (Eq. 11), ``L_sem`` (Eq. 12): from :class:`~dig_torchrec.modules.quantizer.QuantizerOutput`.
* ``L_u2t`` (Eq. 15): MSE of MLP_u2t's estimate against the (stop-gradient) Eq. 13 teacher.

Before tokenizer init the recall-side terms are computed but weighted 0 (``gate``).

The model computes logits and hands :class:`LossInputs` to :class:`DIGLoss`, which returns
the terms as :class:`LossTerms` (torchrec's DLRM / DLRMTrain split). A rank-only model
(``DIGModel(..., rank_only=True)``) fills only the rank fields: its objective is Eq. 9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dig_torchrec.config import LossConfig
from dig_torchrec.errors import ConfigError
from dig_torchrec.modules.prefix_sampler import CatalogPrefixIndex
from dig_torchrec.modules.quantizer import QuantizerOutput

LOSS_KEYS = ("total", "rank", "recall", "commit", "sem", "u2t")


@dataclass
class LossInputs:
    """What the model computed for one batch that Eq. 8 needs (graph-attached tensors).

    Attributes:
        rank_logits: ``[B]`` rank path (Eq. 6) on the exposure rows.
        labels, weights: ``[B]`` exposure labels and weights (0 = padding).
        quantized: the tokenizer's quantizer output on every row (Eq. 11/12 residuals);
            None for a rank-only model (then every field below is None too).
        real_rows: ``[B+R]`` True for rows with weight > 0 (Eq. 11/12 average over them).
        recall_logits: ``[L, N]`` recall path (Eq. 7) per layer on the recall rows.
        recall_labels, recall_weights: ``[N]``.
        recall_sids: ``[N, L]`` SID of each recall row's item.
        num_grouped: leading recall rows that are click groups (positive + negatives); the
            rest are exposure rows (``loss.recall_samples``).
        prefix_index: the catalog prefix index (prefix-level logQ); None when not needed or
            before tokenizer init.
        prefix_negative_logits: ``[L, S, 1 + loss.prefix_negatives]`` logits of each click's
            prefix and its sibling prefixes, positive first; None when the term is off.
        prefix_negative_weights: ``[L, S]`` (0 = padding click or no sibling at that layer).
        u2t_hat: ``[L, N, d_c]`` MLP_u2t's estimate (Eq. 14).
        u2t_teacher: ``[L, N, d_c]`` the Eq. 13 teacher (no gradient).
        gate: 1 once the tokenizer is initialised, 0 during the rank-path warm-up.
    """

    rank_logits: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    quantized: Optional[QuantizerOutput] = None
    real_rows: Optional[torch.Tensor] = None
    recall_logits: Optional[torch.Tensor] = None
    recall_labels: Optional[torch.Tensor] = None
    recall_weights: Optional[torch.Tensor] = None
    recall_sids: Optional[torch.Tensor] = None
    num_grouped: int = 0
    prefix_index: Optional[CatalogPrefixIndex] = None
    prefix_negative_logits: Optional[torch.Tensor] = None
    prefix_negative_weights: Optional[torch.Tensor] = None
    u2t_hat: Optional[torch.Tensor] = None
    u2t_teacher: Optional[torch.Tensor] = None
    gate: float = 1.0

    @property
    def rank_only(self) -> bool:
        return self.quantized is None


@dataclass
class LossTerms:
    """The terms of Eq. 8 (graph-attached; unweighted except ``total``).

    Attributes:
        total: Eq. 8.
        rank: Eq. 9.
        recall: Eq. 10 (the layer mean of ``recall_per_layer``); None for a rank-only model,
            as are the terms below.
        commit: Eq. 11.
        sem: Eq. 12.
        u2t: Eq. 15.
        recall_per_layer: ``[L]`` the recall objective per layer.
    """

    total: torch.Tensor
    rank: torch.Tensor
    recall: Optional[torch.Tensor] = None
    commit: Optional[torch.Tensor] = None
    sem: Optional[torch.Tensor] = None
    u2t: Optional[torch.Tensor] = None
    recall_per_layer: Optional[torch.Tensor] = None

    def as_dict(self) -> Dict[str, torch.Tensor]:
        """The terms present, in :data:`LOSS_KEYS` order."""
        return {k: getattr(self, k) for k in LOSS_KEYS if getattr(self, k) is not None}


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 9/10 BCE averaged over the real rows (weights mask padding); leading dims are kept."""
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return (loss * weights).sum(-1) / weights.sum().clamp_min(1.0)


def sampled_softmax(
    logits: torch.Tensor,
    weights: torch.Tensor,
    log_q: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-layer sampled softmax cross-entropy with the positive in column 0.

    Args:
        logits: ``[L, S, G]``: S groups (one per click) of G candidates, positive first.
        weights: ``[S]`` or ``[L, S]`` group weights (0 = padding group, or no candidate at that layer).
        log_q: ``[S, G]`` or ``[L, S, G]`` log sampling probability of each candidate (logQ
            correction), or None.
        valid: ``[L, S, G]`` False for candidates left out of the softmax (accidental hits:
            a negative whose prefix equals the positive's at that depth), or None.

    Returns:
        ``[L]``: the weighted mean over groups of ``-log softmax(logits - log_q)[..., 0]``.
    """
    z = logits if log_q is None else logits - log_q.to(logits.dtype)
    if valid is not None:
        z = z.masked_fill(~valid, float("-inf"))
    ce = torch.logsumexp(z, -1) - z[..., 0]  # [L, S]
    w = weights.to(ce.dtype).expand_as(ce)
    return (ce * w).sum(-1) / w.sum(-1).clamp_min(1.0)


def descendant_distillation(
    logits: torch.Tensor, valid: torch.Tensor, same_prefix: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per-layer distillation of each depth's prefix softmax toward its descendants' leaf scores.

    Beam search keeps a depth-l prefix only if its depth-l score ranks it in the beam, so the
    depth-l scores should order prefixes like their best descendants' leaf scores (the max-heap
    property of TDM/JTM). For each click group the sampled rows are the descendants the batch
    has: at depth l < L a prefix's target score is the largest stop-gradient depth-L logit among
    the group's rows under it (the positive's prefix takes the max over the positive and the
    negatives that share it up to l; a negative's prefix, its own leaf). The term is the
    cross-entropy of the depth-l softmax over the group's distinct prefixes against the softmax
    of those targets; depth L gets 0.

    Args:
        logits: ``[L, S, G]`` recall logits of S click groups, positive first.
        valid: ``[L, S, G]`` False for negatives that share the positive's prefix at that depth
            (they are the positive's prefix, not a candidate of their own).
        same_prefix: ``[L, S, G-1]`` True where negative j's prefix c_1..c_l equals the positive's.
        weights: ``[S]`` click weights (0 = padding).

    Returns:
        ``[L]``: the weighted mean over clicks of the cross-entropy, 0 at depth L.
    """
    L = logits.shape[0]
    leaf = logits[-1].detach()  # [S, G]
    under_pos = leaf[None, :, 1:].masked_fill(~same_prefix, float("-inf")).amax(-1)  # [L, S]
    target = leaf[None].expand(L, -1, -1).clone()
    target[..., 0] = torch.maximum(leaf[None, :, 0], under_pos)
    neg_inf = float("-inf")
    t = torch.softmax(target.masked_fill(~valid, neg_inf), -1)
    log_p = torch.log_softmax(logits.masked_fill(~valid, neg_inf), -1)
    ce = -(t * log_p.masked_fill(~valid, 0.0)).sum(-1)  # [L, S]
    ce = ce * (torch.arange(L, device=logits.device) < L - 1).to(ce.dtype)[:, None]
    w = weights.to(ce.dtype)[None].expand_as(ce)
    return (ce * w).sum(-1) / w.sum(-1).clamp_min(1.0)


def u2t_distillation(u2t_hat: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 15: mean over layers of the row-weighted MSE ``||u2t_hat - sg[teacher]||^2 / d_c``."""
    real = (weights > 0).to(u2t_hat.dtype)
    per_layer = (((u2t_hat - teacher.detach()) ** 2).mean(-1) * real).sum(-1) / real.sum().clamp_min(1.0)
    return per_layer.mean()


class DIGLoss(nn.Module):
    """Eq. 8 with the recall-objective options of :class:`~dig_torchrec.config.LossConfig`.

    Args:
        cfg: loss config.
        num_items: catalog size (rows of the sampling log-probability table).
        group_size: 1 + ``data.negatives_per_positive`` (rows per click in the retrieval rows).
        device: buffer device ("meta" allowed).
    """

    def __init__(self, cfg: LossConfig, num_items: int, group_size: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if cfg.recall_objective not in ("bce", "softmax"):
            raise ConfigError(f"config key 'loss.recall_objective' = {cfg.recall_objective!r}; must be bce or softmax")
        self.cfg = cfg
        self.group_size = group_size
        # p(v) of the reader's negative sampler; set by set_sampling_distribution (the trainer).
        # Not persistent: it is a function of the dataset and config, rebuilt at every start.
        self.register_buffer("sampling_prob", torch.zeros(num_items, device=device), persistent=False)
        self.has_sampling_prob = False

    @torch.no_grad()
    def set_sampling_distribution(self, sampling_prob: Optional[torch.Tensor], device: torch.device) -> None:
        """Install the reader's negative-sampling ``p(v)`` ``[num_items]``; None = uniform (no correction needed).

        Args:
            sampling_prob: the reader's ``negative_sampling_prob()``.
            device: the model's device (the buffer may still be on ``meta`` after DMP).
        """
        n = self.sampling_prob.shape[0]
        if sampling_prob is None:
            self.sampling_prob = torch.zeros(n, device=device)
            self.has_sampling_prob = False
            return
        if sampling_prob.shape != (n,):
            raise ValueError(f"sampling_prob has shape {tuple(sampling_prob.shape)}; the catalog has {n} items")
        self.sampling_prob = sampling_prob.to(device=device, dtype=torch.float32)
        self.has_sampling_prob = True

    @property
    def needs_prefix_index(self) -> bool:
        """Whether :meth:`recall_per_layer` needs a :class:`CatalogPrefixIndex` (logQ at prefix level)."""
        c = self.cfg
        return c.recall_objective == "softmax" and c.logq_correction and self.has_sampling_prob

    # ------------------------------------------------------------------ Eq. 8
    def forward(self, inputs: LossInputs) -> LossTerms:
        """Every term of Eq. 8 from what the model computed."""
        rank = self.rank(inputs.rank_logits, inputs.labels, inputs.weights)  # Eq. 9
        if inputs.rank_only:
            return LossTerms(total=rank, rank=rank)
        q, real = inputs.quantized, inputs.real_rows
        assert q is not None and real is not None and inputs.recall_logits is not None
        commit = q.commitment_loss(real)  # Eq. 11
        sem = q.semantic_loss(real)  # Eq. 12
        per_layer = self.recall_loss_per_layer(inputs)
        recall = self.reduce_layers(per_layer)  # Eq. 10
        u2t = u2t_distillation(inputs.u2t_hat, inputs.u2t_teacher, inputs.recall_weights)  # Eq. 15
        terms = {"rank": rank, "recall": recall, "commit": commit, "sem": sem, "u2t": u2t}
        total = self.combine(terms, inputs.gate)  # Eq. 8
        return LossTerms(total=total, recall_per_layer=per_layer, **terms)

    def recall_loss_per_layer(self, inputs: LossInputs) -> torch.Tensor:
        """``[L]`` L_recall per layer: the click groups' objective, plus the exposure rows' BCE
        (``loss.recall_samples=retrieval+exposure``), plus the prefix-negative softmax."""
        logits, labels, weights, sids = inputs.recall_logits, inputs.recall_labels, inputs.recall_weights, inputs.recall_sids
        n = logits.shape[1]
        grouped = inputs.num_grouped > 0
        g_rows = slice(0, inputs.num_grouped) if grouped else slice(0, n)
        per_layer = self.recall_per_layer(logits[:, g_rows], labels[g_rows], weights[g_rows], sids[g_rows], grouped,
                                          inputs.prefix_index)
        if grouped and inputs.num_grouped < n:  # retrieval+exposure: Eq. 10's BCE on the exposure rows as well
            e_rows = slice(inputs.num_grouped, n)
            per_layer = per_layer + self.cfg.exposure_recall_weight * self.recall_per_layer(
                logits[:, e_rows], labels[e_rows], weights[e_rows], sids[e_rows], False)
        if inputs.prefix_negative_logits is not None:
            sib = sampled_softmax(inputs.prefix_negative_logits, inputs.prefix_negative_weights)
            per_layer = per_layer + self.cfg.prefix_negatives_weight * sib
        return per_layer

    # ------------------------------------------------------------------ terms
    def rank(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Eq. 9."""
        return weighted_bce(logits, labels, weights)

    def recall_per_layer(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        sids: torch.Tensor,
        grouped: bool,
        prefix_index: Optional[CatalogPrefixIndex] = None,
    ) -> torch.Tensor:
        """The recall objective per layer ``[L]`` (Eq. 10 before the mean over layers).

        Args:
            logits: ``[L, N]`` recall logits of the rows.
            labels, weights: ``[N]``.
            sids: ``[N, L]`` SID of each row's item (accidental hits, prefix-level logQ).
            grouped: the rows are click groups (positive then ``group_size - 1`` negatives).
                ``softmax`` needs them; exposure rows (validation) get the BCE of Eq. 10.
            prefix_index: the catalog index built with the sampling probabilities (when
                :attr:`needs_prefix_index`); None before tokenizer init, when the term is
                weighted 0 and no SID table exists yet: no logQ correction then.
        """
        if self.cfg.recall_objective == "bce" or not grouped:  # exposure rows (validation): Eq. 10's BCE
            return weighted_bce(logits, labels[None].expand_as(logits), weights)
        L, n = logits.shape
        G = self.group_size
        if n % G:
            raise ValueError(f"{n} retrieval rows are not whole groups of {G} (1 + negatives_per_positive)")
        S = n // G
        groups = logits.view(L, S, G)
        gsids = sids.view(S, G, L)
        # a negative whose prefix c_1..c_l equals the positive's IS the positive's candidate at depth l
        same = (gsids[:, 1:, :] == gsids[:, :1, :]).long().cumprod(-1).permute(2, 0, 1).bool()  # [L, S, G-1]
        valid = torch.ones(L, S, G, dtype=torch.bool, device=sids.device)
        valid[:, :, 1:] = ~same
        log_q = None
        if self.needs_prefix_index and prefix_index is not None:
            flat = sids.view(n, L)
            log_q = torch.stack([prefix_index.prefix_mass(flat, l).clamp_min(1e-12).log() for l in range(1, L + 1)])
            log_q = log_q.view(L, S, G)
        click_w = weights.view(S, G)[:, 0]
        per_layer = sampled_softmax(groups, click_w, log_q, valid)
        if self.cfg.descendant_distill_weight > 0:
            per_layer = per_layer + self.cfg.descendant_distill_weight * descendant_distillation(groups, valid, same, click_w)
        return per_layer

    def combine(self, terms: Dict[str, torch.Tensor], gate: float) -> torch.Tensor:
        """Eq. 8 from the unweighted terms; ``gate`` is 0 during the rank-path warm-up, else 1."""
        c = self.cfg
        return (
            terms["rank"]
            + gate * c.recall_loss_weight * terms["recall"]
            + gate * c.commit_weight * terms["commit"]
            + gate * c.sem_weight * terms["sem"]
            + gate * c.u2t_weight * terms["u2t"]
        )

    def reduce_layers(self, per_layer: torch.Tensor) -> torch.Tensor:
        """Eq. 10's mean over layers, or the last layer only (Ablation 4)."""
        return per_layer.mean() if self.cfg.recall_supervision == "all_layers" else per_layer[-1]
