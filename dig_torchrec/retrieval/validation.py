"""Retrieval metrics during training: beam-search Recall@10 / NDCG@10 on validation users.

:class:`RetrievalValidator` is what the trainer calls after each validation when
``train.val_retrieval_users > 0``: it assigns every catalog item its current SID through
the (possibly sharded) model, builds the SID index in memory, runs trie-constrained beam
search (Eq. 16) for a seeded subset of the valid split's leave-last-out users and scores
the top-10 against their targets. It also reports SID churn (the share of items whose SID
changed since the previous call), per-layer codebook utilisation over the catalog, and the
collision rate.

Every rank makes the same model calls on the same users, so the sharded embedding tables'
collectives line up; the metrics are identical on every rank.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from dig_torchrec.config import DIGConfig
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.reader import load_targets
from dig_torchrec.data.schema import DatasetMeta, FeatureSchema
from dig_torchrec.retrieval import metrics as M
from dig_torchrec.retrieval.beam_search import beam_search, leaves_to_items
from dig_torchrec.data.u2i import U2IFunction
from dig_torchrec.retrieval.evaluate import kjt_select_rows, recall_scorer, select_users
from dig_torchrec.retrieval.sid_index import SidIndex
from dig_torchrec.retrieval.u2t_catalog import CATALOG_MODES, CatalogPrefixU2T

logger = logging.getLogger(__name__)


class RetrievalValidator:
    """Beam-search retrieval metrics of the model in training.

    Args:
        cfg: the run's config (``train.val_retrieval_users``, ``train.val_retrieval_seed``,
            ``eval.beam_size``, ``eval.user_batch_size``, ``eval.score_chunk_rows``).
        meta, schema: the dataset's metadata and feature layout.
        device: the model's device (user batches are moved there).
    """

    def __init__(self, cfg: DIGConfig, meta: DatasetMeta, schema: FeatureSchema, device: torch.device) -> None:
        root = Path(cfg.data.path)
        self.cfg = cfg
        self.device = device
        self.items = ItemTable.load(root, schema, meta)
        self.targets = load_targets(root, "valid", schema, hash_ids=cfg.data.hash_ids)
        self.rows = select_users(len(self.targets), cfg.train.val_retrieval_users, seed=cfg.train.val_retrieval_seed)
        self.u2i_fn = U2IFunction(meta, self.items.u2i_keys)  # u2t.inference=catalog_mean|catalog_max
        self.previous_sids: Optional[torch.Tensor] = None
        logger.info("retrieval validation: beam search (B=%d) for %d of %d valid users", cfg.eval.beam_size,
                    self.rows.numel(), len(self.targets))

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> Dict[str, float]:
        """``valid/recall@10``, ``valid/ndcg@10``, ``valid/sid_churn``, utilisation and collisions.

        Args:
            model: the ``DIGModel`` (inside DMP; eval mode is set by the caller).
        """
        t0 = time.perf_counter()
        ev = self.cfg.eval
        sids = model.full_corpus_sids(self.items).cpu()
        index = SidIndex(sids, model.cfg.tokenizer.num_codes)
        mode = model.cfg.u2t.inference
        catalog = CatalogPrefixU2T(index, self.u2i_fn) if mode in CATALOG_MODES else None
        ranked = []
        for start in range(0, self.rows.numel(), max(1, ev.user_batch_size)):
            idx = self.rows[start:start + ev.user_batch_size]
            ctx = model.user_context(kjt_select_rows(self.targets.user_kjt, idx).to(self.device))
            users = (catalog.for_users(self.targets.states.select(idx), idx.numel(), CATALOG_MODES[mode])
                     if catalog is not None else None)
            score = recall_scorer(model, ctx, mode, users, device=self.device)
            beam = beam_search(score, idx.numel(), index, max(ev.beam_size, 10), max_rows=ev.score_chunk_rows)
            items, _ = leaves_to_items(beam, index, 10, max_rows=ev.score_chunk_rows)
            ranked.append(items)
        ranks = M.target_ranks(torch.cat(ranked), self.targets.target_item[self.rows])
        out = {"recall@10": M.recall_at_k(ranks, 10), "ndcg@10": M.ndcg_at_k(ranks, 10)}
        out["sid_churn"] = (
            float((sids != self.previous_sids).any(1).float().mean()) if self.previous_sids is not None else math.nan
        )
        self.previous_sids = sids
        for layer in range(sids.shape[1]):
            used = torch.unique(sids[:, layer]).numel()
            out[f"sid_utilization_l{layer + 1}"] = used / model.cfg.tokenizer.num_codes
        out["sid_collision_rate"] = index.collision_stats().collision_rate
        out["retrieval_seconds"] = time.perf_counter() - t0
        return out
