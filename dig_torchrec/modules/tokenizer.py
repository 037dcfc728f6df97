"""DIG's embedded tokenizer (paper §3.2): VQ encoder + residual quantizer + the SID table.

``DIGTokenizer`` owns

* ``encoder`` - Eq. 1, e_v = Enc(x_v^s) ``[N, F_enc, d]``;
* ``quantizer`` - Eq. 2-4 with EMA codebooks (buffers, no gradient);
* ``item_sid_table`` ``[num_items, L]`` - the latest SID of every item (-1 = never
  assigned). In ``tokenizer.frozen`` mode (Fixed SID ablation) it holds the balanced-tree
  SIDs and is never updated; the codebooks are never updated either.
* ``initialized`` - 0 until :meth:`initialize` ran the balanced k-means tree. A model
  materialised by DMP from ``meta`` has zeroed buffers, so the table is only meaningful
  once ``initialized`` is 1.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from dig_torchrec.config import TokenizerConfig
from dig_torchrec.modules.balanced_kmeans import (
    balanced_tree_assign,
    balanced_tree_init,
    check_catalog_fits,
    collision_rate,
    resolve_last_layer_collisions,
)
from dig_torchrec.modules.encoder import ItemEncoder
from dig_torchrec.modules.flags import BufferFlag
from dig_torchrec.modules.quantizer import QuantizerOutput, ResidualQuantizer, _dist_ready, _usage_stats

logger = logging.getLogger(__name__)


class DIGTokenizer(nn.Module):
    """VQ encoder + RQ quantizer + item SID table.

    Args:
        cfg: tokenizer config.
        num_fields: F_enc.
        dim: d.
        num_items: catalog size (rows of ``item_sid_table``).
        device: parameter/buffer device ("meta" allowed).
    """

    def __init__(
        self, cfg: TokenizerConfig, num_fields: int, dim: int, num_items: int,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        check_catalog_fits(num_items, cfg.num_codes, cfg.num_layers)
        self.cfg = cfg
        self.num_layers = cfg.num_layers
        self.num_codes = cfg.num_codes
        self.num_fields = num_fields
        self.dim = dim
        self.encoder = ItemEncoder(num_fields, dim, cfg.encoder_layers, cfg.encoder_heads, device=device)
        self.quantizer = ResidualQuantizer(
            cfg.num_layers, cfg.num_codes, num_fields * dim, decay=cfg.ema_decay, epsilon=cfg.laplace_epsilon,
            dead_code_threshold=cfg.dead_code_threshold, restart_dead_codes=cfg.restart_dead_codes, device=device,
            catalog_size=num_items if cfg.dead_code_rule == "catalog" else 0,
        )
        self.register_buffer(
            "item_sid_table", torch.full((num_items, cfg.num_layers), -1, dtype=torch.long, device=device)
        )
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("init_collision_rate", torch.zeros((), device=device))  # Eq. 2 right after init
        # EMA steps since init: drives tokenizer.freeze_after_steps and the Gumbel noise decay. A plain int
        # (no host sync, not in checkpoints): the trainer restores it from the step on resume.
        self.steps_since_init = 0
        self._collision_rate: Optional[float] = None
        self._step_stats: Optional[Dict[str, torch.Tensor]] = None
        self._initialized_flag = BufferFlag(False, self.initialized)  # Python-bool mirror: no sync per read
        # False: metrics() leaves collision_rate out (a catalog-wide computation); the trainer reads
        # collision_rate() at its log steps instead
        self.collision_rate_in_metrics = True

    @property
    def is_initialized(self) -> bool:
        """``initialized == 1``, read from a Python mirror that re-syncs only after the buffer changed."""
        return self._initialized_flag.read(self.initialized)

    def encode(self, fields: torch.Tensor) -> torch.Tensor:
        """Eq. 1: ``[N, F_enc, d]`` field embeddings -> e_v ``[N, F_enc, d]``."""
        return self.encoder(fields)

    def restore_schedule(self, step: int) -> None:
        """Set :attr:`steps_since_init` for a model saved after ``step`` training steps.

        One EMA step runs per training step from ``tokenizer.init_after_steps`` on, so the
        count is derived from the step (resume, and inference, where it decides whether the
        codebooks had stopped moving and the SID table is the item's SID).
        """
        self.steps_since_init = max(0, int(step) - self.cfg.init_after_steps)

    @property
    def ema_frozen(self) -> bool:
        """Codebooks no longer move: ``tokenizer.frozen``, or ``freeze_after_steps`` steps after init."""
        every = self.cfg.freeze_after_steps
        return self.cfg.frozen or (every > 0 and self.is_initialized and self.steps_since_init >= every)

    def gumbel_noise_scale(self) -> float:
        """Relative Gumbel noise of the training assignment (``tokenizer.assignment=gumbel``).

        ``gumbel_scale`` right after init, decayed linearly to 0 over ``gumbel_decay_steps``
        (DIGER's uncertainty decay): from then on the assignment is Eq. 2's argmin.
        """
        c = self.cfg
        if c.assignment != "gumbel" or c.gumbel_decay_steps <= 0 or not self.is_initialized:
            return 0.0
        return c.gumbel_scale * max(0.0, 1.0 - self.steps_since_init / c.gumbel_decay_steps)

    def quantize(self, e_v: torch.Tensor, item_ids: torch.Tensor) -> QuantizerOutput:
        """SIDs and residuals of a batch: Eq. 2 argmin (with exploration noise in training when
        ``tokenizer.assignment=gumbel``), or the item's table SID once the codebooks are frozen."""
        flat = e_v.reshape(e_v.shape[0], -1)
        if self.ema_frozen and self.is_initialized:
            return self.quantizer(flat, sids=self.item_sid_table[item_ids])
        noise = self.gumbel_noise_scale() if self.training else 0.0
        return self.quantizer(flat, noise_scale=noise)

    def assign(self, e_v: torch.Tensor) -> torch.Tensor:
        """Eq. 2-3 argmin on the current codebooks: ``[N, F, d]`` or ``[N, F*d]`` -> ``[N, L]``."""
        return self.quantizer.assign(e_v.reshape(e_v.shape[0], -1))

    @torch.no_grad()
    def training_update(self, out: QuantizerOutput, item_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """EMA codebook step (Eq. 2-4 codebooks) and SID-table refresh; no-op when frozen/uninitialised."""
        if self.cfg.frozen or not self.is_initialized:
            return
        if self.ema_frozen:  # tokenizer.freeze_after_steps reached: SIDs stay as they are
            return
        self.steps_since_init += 1
        self.quantizer.ema_update(out, mask)
        self._step_stats = self.quantizer.last_stats
        ids, sids = item_ids[mask], out.sids[mask]
        if _dist_ready():
            ids, sids = _all_gather_rows(ids, sids)
        self.item_sid_table[ids] = sids
        self._collision_rate = None

    def skip_step(self) -> None:
        """A training step was rejected: no EMA step, but the schedule clock
        (:attr:`steps_since_init`) advances as :meth:`restore_schedule` counts it."""
        if self.cfg.frozen or not self.is_initialized or self.ema_frozen:
            return
        self.steps_since_init += 1

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def initialize(self, e_v_all: torch.Tensor) -> None:
        """Balanced k-means tree init (§3.2) on rank 0, broadcast to every rank.

        Args:
            e_v_all: ``[num_items, F_enc*d]`` e_v of the whole catalog in item-id order.
        """
        num_items = self.item_sid_table.shape[0]
        if e_v_all.shape[0] != num_items:
            raise ValueError(f"initialize_tokenizer: e_v_all has {e_v_all.shape[0]} rows, catalog has {num_items} items")
        flat = e_v_all.reshape(num_items, -1).float()
        device = self.quantizer.codebooks.device
        rank = dist.get_rank() if _dist_ready() else 0
        codebooks = torch.zeros_like(self.quantizer.codebooks)
        sids = torch.zeros_like(self.item_sid_table)
        if rank == 0:
            start = time.time()
            cb, s = balanced_tree_init(
                flat, self.num_codes, self.num_layers, kmeans_iters=self.cfg.init_kmeans_iters, seed=0,
            )
            codebooks.copy_(cb.to(device))
            sids.copy_(s.to(device))
            logger.info("balanced k-means tree over %d items (K=%d, L=%d) in %.1fs",
                        num_items, self.num_codes, self.num_layers, time.time() - start)
        if _dist_ready():
            dist.broadcast(codebooks, src=0)
            dist.broadcast(sids, src=0)
        self.quantizer.load_initial_codebooks(codebooks, sids)
        self.item_sid_table.copy_(sids)
        self.initialized.fill_(1)
        self.steps_since_init = 0
        eq2 = self.quantizer.assign(flat.to(device))
        self.init_collision_rate.fill_(collision_rate(eq2, self.num_codes))
        self._collision_rate = None
        logger.info("tokenizer init: tree SIDs %.4f colliding items, Eq. 2 assignment %.4f",
                    collision_rate(sids, self.num_codes), float(self.init_collision_rate))

    # ------------------------------------------------------------------ corpus SIDs
    @torch.no_grad()
    def corpus_sids(self, e_v_all: torch.Tensor, resolution: Optional[str] = None) -> torch.Tensor:
        """SIDs of a whole catalog from its e_v, with the configured collision resolution.

        Args:
            e_v_all: ``[num_items, F_enc*d]`` (or ``[num_items, F, d]``).
            resolution: ``last_layer`` | ``none``; default ``tokenizer.collision_resolution``.
        """
        if self.ema_frozen and self.is_initialized:  # the table is every item's (training) SID
            return self.item_sid_table.clone()
        return self._assign_catalog(e_v_all, resolution)

    def _assign_catalog(self, e_v_all: torch.Tensor, resolution: Optional[str] = None) -> torch.Tensor:
        """Eq. 2 argmin of every item on the current codebooks, then the collision resolution."""
        flat = e_v_all.reshape(e_v_all.shape[0], -1).float().to(self.quantizer.codebooks.device)
        sids = self.quantizer.assign(flat)
        if (resolution or self.cfg.collision_resolution) == "last_layer":
            prefix = self.quantizer.codebooks[torch.arange(self.num_layers - 1, device=flat.device)[None], sids[:, :-1]]
            last_residual = flat - prefix.sum(1)
            sids = resolve_last_layer_collisions(sids, last_residual, self.quantizer.codebooks[-1])
        return sids

    def seal_mode(self) -> Optional[str]:
        """The re-assignment :meth:`seal` would run now: ``balanced``, ``argmin`` or None (keep the table).

        ``auto`` resolves to ``balanced`` only when more than ``tokenizer.seal_collision_threshold``
        of the items share a leaf in ``item_sid_table`` (identical on every rank, so every rank
        decides alike); the caller skips the whole-catalog e_v pass when this is None.
        """
        mode = self.cfg.seal
        if mode == "auto":
            self._collision_rate = None  # measured on the table as it is now
            return "balanced" if self.collision_rate() > self.cfg.seal_collision_threshold else None
        return mode if mode in ("balanced", "argmin") else None

    @torch.no_grad()
    def seal(self, e_v_all: Optional[torch.Tensor]) -> float:
        """At ``tokenizer.freeze_after_steps``: every item's SID re-assigned once on the frozen codebooks.

        Until the freeze, ``item_sid_table`` holds each item's argmin from the last batch it
        was in (older codebooks, or the init SID of items not seen since), with no collision
        handling; the frozen table is what the recall path trains on and beam search serves.
        ``tokenizer.seal``: ``balanced`` gives each node's items balanced shares of the K codes
        at every layer (:func:`balanced_tree_assign`; distinct leaves when N <= K^L, whatever
        the codebooks' utilisation), ``argmin`` is Eq. 2 plus ``tokenizer.collision_resolution``,
        ``auto`` is ``balanced`` when more than ``tokenizer.seal_collision_threshold`` of the
        items share a leaf at the freeze and keeps the table otherwise (re-assigning moves every
        item's SID, which costs the recall path what it learned on them).
        Rank 0's result is broadcast. Returns the table's collision rate after sealing.

        Args:
            e_v_all: ``[num_items, F_enc*d]`` e_v of the whole catalog in item-id order; may be
                None when :meth:`seal_mode` is None (nothing is re-assigned).
        """
        num_items = self.item_sid_table.shape[0]
        mode = self.seal_mode()
        self._collision_rate = None  # measured on the table as it is now
        before = self.collision_rate()
        if mode is None:
            logger.info("tokenizer.seal=%s: %.4f of items share a leaf at the freeze (threshold %.4f), table kept",
                        self.cfg.seal, before, self.cfg.seal_collision_threshold)
            return before
        if e_v_all is None or e_v_all.shape[0] != num_items:
            rows = "no e_v" if e_v_all is None else f"e_v_all has {e_v_all.shape[0]} rows"
            raise ValueError(f"seal ({mode}): {rows}, catalog has {num_items} items")
        if mode == "balanced":
            flat = e_v_all.reshape(num_items, -1).float().to(self.quantizer.codebooks.device)
            sids = balanced_tree_assign(flat, self.quantizer.codebooks)
        else:
            sids = self._assign_catalog(e_v_all)
        sids = sids.to(self.item_sid_table)
        if _dist_ready():
            dist.broadcast(sids, src=0)
        self.item_sid_table.copy_(sids)
        self._collision_rate = None
        after = self.collision_rate()
        logger.info("tokenizer SIDs sealed (%s) at the freeze: colliding items %.4f -> %.4f", mode, before, after)
        return after

    # ------------------------------------------------------------------ metrics
    def collision_rate(self) -> float:
        """Fraction of catalog items sharing their full SID in ``item_sid_table`` (cached)."""
        if self._collision_rate is None:
            self._collision_rate = collision_rate(self.item_sid_table, self.num_codes) if self.is_initialized else 0.0
        return self._collision_rate

    def metrics(self, batch_sids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Per-layer utilisation / perplexity, cumulative dead-code restarts, collision rates.

        Utilisation (fraction of the K codes used) and perplexity come from this step's EMA
        statistics (all ranks) when an EMA step just ran, else from ``batch_sids [N, L]``.
        """
        out: Dict[str, torch.Tensor] = {}
        stats = self._step_stats
        self._step_stats = None
        if stats is None and batch_sids is not None and batch_sids.numel():
            offsets = torch.arange(self.num_layers, device=batch_sids.device)[None] * self.num_codes
            counts = torch.bincount((batch_sids + offsets).flatten(), minlength=self.num_layers * self.num_codes)
            stats = _usage_stats(counts.view(self.num_layers, self.num_codes).float())
        for layer in range(self.num_layers):
            if stats:
                out[f"utilization_l{layer + 1}"] = stats["utilization"][layer].detach()
                out[f"perplexity_l{layer + 1}"] = stats["perplexity"][layer].detach()
            out[f"dead_restarts_l{layer + 1}"] = self.quantizer.dead_restarts[layer].detach().clone()
        if self.collision_rate_in_metrics:
            out["collision_rate"] = torch.tensor(self.collision_rate(), device=self.item_sid_table.device)
        out["init_collision_rate"] = self.init_collision_rate.detach().clone()
        return out


def _all_gather_rows(ids: torch.Tensor, sids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather variable-length ``(ids [n], sids [n, L])`` from every rank."""
    world = dist.get_world_size()
    n = torch.tensor([ids.numel()], dtype=torch.long, device=ids.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    max_n = int(max(int(s) for s in sizes))
    packed = torch.full((max_n, 1 + sids.shape[1]), -1, dtype=torch.long, device=ids.device)
    packed[: ids.numel(), 0] = ids
    packed[: ids.numel(), 1:] = sids
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    rows = torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)])
    return rows[:, 0], rows[:, 1:]
