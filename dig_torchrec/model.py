"""The DIG model (paper §3): a DIN+DCNv2+MoE ranker with an embedded RQ tokenizer.

One forward pass on a :class:`DIGBatch` computes

* the rank path (Eq. 6) on the B exposure rows;
* the recall path (Eq. 7) for every layer l = 1..L in ONE batched Mixer call, on the
  retrieval rows (``loss.recall_samples=retrieval``) or the exposure rows (``=exposure``);
* and hands what the five-part loss of Eq. 8 needs to :class:`~dig_torchrec.losses.DIGLoss`
  (``L = L_rank + w_recall L_recall + l1 L_commit + l2 L_sem + l3 L_u2t``) as
  :class:`~dig_torchrec.losses.LossInputs`, as torchrec's DLRM / DLRMTrain split model and loss.

A training forward updates no buffer. The tokenizer's EMA codebook step, dead-code
restarts and SID-table refresh, the u2t statistics and the BatchNorm running statistics
of the step are applied by :meth:`DIGModel.on_step_accepted`, which the trainer calls once
the step's loss passed ``train.nan_policy`` (:meth:`DIGModel.on_step_skipped` drops them).

``DIGModel(..., rank_only=True)`` is the rank path alone (Eq. 1, 6, 9): no SID embeddings,
u2t, recall path or quantizer call (the training-throughput benchmark's baseline).

Embeddings. ``embedding_bags`` is the single EmbeddingBagCollection over every batch
feature (tables named by column; ``hist_*`` read ``item_id``), called once per step on
``batch.sparse_features`` so ``TrainPipelineSparseDist`` can pipeline it.
``sid_embedding_bags`` holds the SID embeddings: table ``sid`` with L*K rows (layer-offset
ids ``(l-1)*K + s_l``), width F_enc*d (per-field SID embeddings, reshaped to
``[F_enc, d]``), and features ``sid_prefix_l`` = the bag of the first l tokens, so its
sum pooling is Eq. 5's e_sid^(1:l) directly.

Gradient flow (tested in ``tests/test_model_gradients.py``):

* codebooks: buffers, EMA only;
* encoder: L_rank (through e_v on the rank path), L_commit, L_sem;
* SID embeddings: L_recall and L_u2t, never L_rank;
* the recall path sees the target only through SID embeddings and u2t (argmin blocks e_v).

Before :meth:`DIGModel.initialize_tokenizer` (the ``tokenizer.init_after_steps`` rank-path
warm-up) the recall/commit/sem/u2t terms are computed but weighted 0, so every
parameter is in the graph on every step (DDP's ``static_graph`` needs that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dig_torchrec.config import DIGConfig
from dig_torchrec.data.batch import DIGBatch, make_kjt
from dig_torchrec.data.schema import ITEM_ID, USER_ID, DatasetMeta, FeatureSchema
from dig_torchrec.errors import ConfigError, DataError
from dig_torchrec.losses import LOSS_KEYS, DIGLoss, LossInputs, LossTerms
from dig_torchrec.modules.batchnorm import StepBatchNorm1d
from dig_torchrec.modules.din import HistoryPositionEmbedding
from dig_torchrec.modules.mixer import Mixer
from dig_torchrec.modules.prefix_sampler import CatalogPrefixIndex, encode_prefix
from dig_torchrec.modules.quantizer import QuantizerOutput
from dig_torchrec.modules.tokenizer import DIGTokenizer
from dig_torchrec.modules.u2t import U2TMLP, U2TStatTable, u2t_teacher

if TYPE_CHECKING:  # pragma: no cover
    from dig_torchrec.data.items import ItemTable

logger = logging.getLogger(__name__)

__all__ = ["DIGModel", "DIGOutput", "DIGForward", "StepParts", "StepUpdate", "UserContext", "LOSS_KEYS",
           "sid_prefix_key"]

SID_TABLE = "sid"
SID_PREFIX_TABLE = "sid_prefix"  # tokenizer.sid_embedding=sum+prefix: hashed (c_1..c_l) embeddings
HISTORY_SID_TABLE = "hist_sid"  # model.history_sid: SID-token embeddings of the history items (DIN keys)
_PREFIX_HASH_MULT = 0x9E3779B97F4A7C15 - (1 << 64)  # 64-bit golden-ratio multiplier, as a signed int64


def sid_prefix_hash_key(layer: int) -> str:
    """KJT key of the hashed whole-prefix id of depth ``layer`` (1-based)."""
    return f"sid_prefix_hash_{layer}"


def prefix_buckets(num_items: int, num_layers: int, configured: int) -> int:
    """Rows of the hashed prefix table: ``tokenizer.sid_prefix_buckets`` or ``min(|V| L, 2^20)``.

    A catalog has at most ``|V| L`` occupied prefixes over all depths, so the auto size is
    that, capped at 2^20 rows (at 500K items and F_enc*d = 256: 1.07 GB of fp32, sharded
    like the other tables).
    """
    return configured if configured > 0 else min(num_items * num_layers, 1 << 20)


def hash_prefix(prefix: torch.Tensor, num_codes: int, buckets: int) -> torch.Tensor:
    """``[N, l]`` tokens -> ``[N]`` bucket ids in ``[0, buckets)``, a different hash per depth l.

    The prefix is packed into an int64 (K^L < 2^62 is checked at model build), mixed by a
    multiplicative hash that wraps in int64 arithmetic, and reduced modulo ``buckets``.
    """
    depth = prefix.shape[1]
    mixed = (encode_prefix(prefix, num_codes) + depth * 0x632BE5AB) * _PREFIX_HASH_MULT
    mixed = mixed ^ (mixed >> 29)
    return torch.remainder(mixed, buckets)


def history_sid_key(position: int) -> str:
    """Feature name of the SID bag of history position ``position`` (table ``hist_sid``)."""
    return f"hist_sid_{position}"


def sid_prefix_key(layer: int) -> str:
    """KJT key of the bag s_1..s_l (1-based ``layer``)."""
    return f"sid_prefix_{layer}"


@dataclass
class UserContext:
    """Request-level (Type-II) inputs, computed once per user for inference.

    Attributes:
        user_embedding: ``[U, F_u*d]`` e_u (user_id + user + context field embeddings).
        user_normalized: ``[U, F_u*d]`` BN_u(e_u) (eval-mode BN).
        history_keys: ``[U, H, d]`` item_id embeddings of the history (DIN keys).
        history_mask: ``[U, H]`` True where a history position holds a click.
    """

    user_embedding: torch.Tensor
    user_normalized: torch.Tensor
    history_keys: torch.Tensor
    history_mask: torch.Tensor

    @property
    def num_users(self) -> int:
        return int(self.user_embedding.shape[0])

    def select(self, index: torch.Tensor) -> "UserContext":
        """Rows ``index`` of every field."""
        return UserContext(
            self.user_embedding[index], self.user_normalized[index], self.history_keys[index], self.history_mask[index]
        )


@dataclass
class StepUpdate:
    """A training forward's buffer updates, applied by :meth:`DIGModel.on_step_accepted`.

    Attributes:
        quantized: the quantizer output of every row (None for a rank-only model).
        item_ids: ``[B+R]`` item of each row (the SID table rows to refresh).
        real_rows: ``[B+R]`` rows with weight > 0 (the EMA statistics count them only).
        recall_sids, recall_u2i, recall_weights: the recall rows (u2t statistics, Eq. 13/16).
    """

    quantized: Optional[QuantizerOutput] = None
    item_ids: Optional[torch.Tensor] = None
    real_rows: Optional[torch.Tensor] = None
    recall_sids: Optional[torch.Tensor] = None
    recall_u2i: Optional[torch.Tensor] = None
    recall_weights: Optional[torch.Tensor] = None


@dataclass
class DIGForward:
    """What :meth:`DIGModel.compute` returns: the loss inputs, intermediates and pending updates.

    Attributes:
        loss_inputs: rank and recall logits and everything else Eq. 8 needs.
        e_v: ``[B+R, F_enc, d]`` Eq. 1 (``[B, ...]`` for a rank-only model).
        sids: ``[B+R, L]`` SID of every row's item.
        e_sid: ``[L, N, F_enc*d]`` Eq. 5 on the recall rows.
        u2t_hat: ``[L, N, d_c]`` MLP_u2t's estimate (Eq. 14).
        u2t_in: ``[L, N, d_c]`` the u2t input of the recall path.
        update: the buffer updates of a training forward (None outside training).
    """

    loss_inputs: LossInputs
    e_v: torch.Tensor
    sids: Optional[torch.Tensor] = None
    e_sid: Optional[torch.Tensor] = None
    u2t_hat: Optional[torch.Tensor] = None
    u2t_in: Optional[torch.Tensor] = None
    update: Optional[StepUpdate] = None


@dataclass
class DIGOutput:
    """Detached outputs of one forward pass (what the trainer logs and evaluates).

    Attributes:
        losses: ``total, rank, recall, commit, sem, u2t`` (unweighted terms; ``total`` is Eq. 8).
        rank_logits: ``[B]`` rank path (Eq. 6) on the exposure rows.
        labels: ``[B]``.
        weights: ``[B]`` (0 = padding).
        recall_logits: ``[L, N]`` recall path (Eq. 7) per layer.
        recall_labels: ``[N]``.
        recall_weights: ``[N]``.
        tokenizer_metrics: per-layer ``utilization_l{l}``, ``perplexity_l{l}``,
            ``dead_restarts_l{l}``, and ``collision_rate``, ``init_collision_rate``
            (of a training step: filled by :meth:`DIGModel.on_step_accepted`).
        update: a training forward's pending buffer updates (see :class:`StepUpdate`);
            None outside training and once a step hook consumed it.
    """

    losses: Dict[str, torch.Tensor]
    rank_logits: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    recall_logits: torch.Tensor
    recall_labels: torch.Tensor
    recall_weights: torch.Tensor
    tokenizer_metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    update: Optional[StepUpdate] = None


@dataclass
class StepParts:
    """:meth:`DIGModel.forward_parts`: the model's computation, the loss terms and the output."""

    computed: DIGForward
    terms: LossTerms
    output: DIGOutput


@torch.fx.wrap
def _forward_from_pooled(
    model: "DIGModel", batch: DIGBatch, pooled: KeyedTensor
) -> Tuple[torch.Tensor, DIGOutput]:
    """Everything after the ``embedding_bags`` call; a leaf for ``torch.fx`` tracing."""
    parts = model.forward_parts(batch, pooled)
    return parts.terms.total, parts.output


class DIGModel(nn.Module):
    """DIN + DCNv2 + MoE ranker with the embedded DIG tokenizer.

    Args:
        cfg: the full config (model, tokenizer, u2t, loss and data.history_length are used).
        meta: dataset metadata (cardinalities, d_c, catalog size).
        device: parameter device; ``"meta"`` builds an unmaterialised model for DMP.
        rank_only: the rank path alone (Eq. 1, 6, 9): the SID embeddings, u2t MLP and
            statistics, BN_sid and BN_u2t are not built and the retrieval rows are ignored.
    """

    def __init__(
        self, cfg: DIGConfig, meta: DatasetMeta, device: torch.device | str = "cpu", *, rank_only: bool = False
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.rank_only = rank_only
        self.meta = meta
        self.schema = FeatureSchema.from_meta(meta, cfg.data.history_length)
        device = torch.device(device)
        d = cfg.model.embedding_dim
        tok = cfg.tokenizer
        self.embedding_dim = d
        self.num_layers = tok.num_layers
        self.num_codes = tok.num_codes
        self.u2i_dim = meta.u2i_dim
        self.user_keys: List[str] = [*self.schema.user_features, *self.schema.context_features]
        self.encoder_keys: List[str] = (
            list(self.schema.item_features) if tok.include_item_id else list(self.schema.item_features[1:])
        )
        if not self.encoder_keys:
            raise ConfigError(
                "tokenizer.include_item_id=false but the dataset has no item feature besides item_id: "
                "the VQ encoder would have no input field"
            )
        self.history_keys: List[str] = self.schema.history_keys
        num_fields = len(self.encoder_keys)
        self.num_encoder_fields = num_fields
        user_dim = len(self.user_keys) * d
        target_dim = num_fields * d

        # --- embeddings (TorchRec, shardable) ---
        r = cfg.model.embedding_init_range
        init = {"weight_init_min": -r, "weight_init_max": r} if r > 0 else {}
        tables = []
        for name in [*self.user_keys, *self.schema.item_features]:
            features = [name, *self.history_keys] if name == ITEM_ID else [name]
            tables.append(EmbeddingBagConfig(
                name=name, embedding_dim=d, num_embeddings=self.schema.cardinality[name],
                feature_names=features, pooling=PoolingType.SUM, **init,
            ))
        self.embedding_bags = EmbeddingBagCollection(tables=tables, device=device)
        sid_tables = [EmbeddingBagConfig(
            name=SID_TABLE, embedding_dim=target_dim, num_embeddings=tok.num_layers * tok.num_codes,
            feature_names=[sid_prefix_key(l) for l in range(1, tok.num_layers + 1)], pooling=PoolingType.SUM,
            **init,
        )]
        self.prefix_conditioned = tok.sid_embedding == "sum+prefix"
        self.num_prefix_buckets = 0
        if self.prefix_conditioned:
            if tok.num_codes ** tok.num_layers >= 2**62:
                raise ConfigError("tokenizer.sid_embedding=sum+prefix needs num_codes ** num_layers < 2^62")
            self.num_prefix_buckets = prefix_buckets(meta.num_items, tok.num_layers, tok.sid_prefix_buckets)
            sid_tables.append(EmbeddingBagConfig(
                name=SID_PREFIX_TABLE, embedding_dim=target_dim, num_embeddings=self.num_prefix_buckets,
                feature_names=[sid_prefix_hash_key(l) for l in range(1, tok.num_layers + 1)],
                pooling=PoolingType.SUM, **init,
            ))
        if not rank_only:
            self.sid_embedding_bags = EmbeddingBagCollection(tables=sid_tables, device=device)
        # model.history_sid: a DIN key is the history item's item_id embedding + the sum of its SID tokens'
        # embeddings, so history items that share a SID prefix share that part of their key
        self.history_sid = cfg.model.history_sid and bool(self.history_keys) and not rank_only
        if self.history_sid:
            self.history_sid_bags = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name=HISTORY_SID_TABLE, embedding_dim=d, num_embeddings=tok.num_layers * tok.num_codes,
                feature_names=[history_sid_key(j) for j in range(len(self.history_keys))],
                pooling=PoolingType.SUM, **init,
            )], device=device)
        # model.history_position: a learned recency vector per history slot, added to the DIN keys (both paths)
        self.history_position: Optional[HistoryPositionEmbedding] = (
            HistoryPositionEmbedding(len(self.history_keys), d, device=device)
            if cfg.model.history_position and self.history_keys else None
        )
        self._all_keys: List[str] = self.schema.keys

        # --- tokenizer (Eq. 1-4) ---
        self.tokenizer = DIGTokenizer(tok, num_fields, d, meta.num_items, device=device)

        # --- BNs: BN_u shared, the rest path-specific (Eq. 6/7); statistics move in on_step_accepted ---
        self.bn_u = StepBatchNorm1d(user_dim, device=device)
        self.bn_v = StepBatchNorm1d(target_dim, device=device)
        self.bn_u2i = StepBatchNorm1d(meta.u2i_dim, device=device)
        if not rank_only:
            self.bn_sid = StepBatchNorm1d(target_dim, device=device)
            self.bn_u2t = StepBatchNorm1d(meta.u2i_dim, device=device)

        # --- shared Mixer and u2t ---
        self.mixer = Mixer(user_dim, target_dim, meta.u2i_dim, d, cfg.model, device=device)
        if not rank_only:
            self.u2t_mlp = U2TMLP(tok.num_layers, user_dim + target_dim, cfg.u2t.hidden_dim, meta.u2i_dim,
                                  device=device)
            self.u2t_stats = U2TStatTable(tok.num_layers, tok.num_codes, meta.u2i_dim, device=device)

        # --- Eq. 8 and the recall-objective options (dig_torchrec/losses.py) ---
        self.criterion = DIGLoss(cfg.loss, meta.num_items, 1 + cfg.data.negatives_per_positive, device=device)

    # ================================================================== helpers
    def _complete_kjt(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Add empty bags for every schema key missing from ``kjt`` (in schema key order)."""
        keys = kjt.keys()
        if keys == self._all_keys:
            return kjt
        stride = kjt.stride()
        present = kjt.to_dict()
        values, lengths = [], []
        for key in self._all_keys:
            if key in present:
                jt = present[key]
                values.append(jt.values())
                lengths.append(jt.lengths())
            else:
                values.append(torch.empty(0, dtype=torch.long, device=kjt.device()))
                lengths.append(torch.zeros(stride, dtype=torch.int32, device=kjt.device()))
        return make_kjt(self._all_keys, values, lengths)

    def _embed(self, kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
        """The one ``embedding_bags`` call: pooled ``[rows, d]`` per feature key."""
        return self.embedding_bags(kjt).to_dict()

    def _history(self, kjt: KeyedJaggedTensor, pooled: Dict[str, torch.Tensor]) -> torch.Tensor:
        """DIN keys ``[rows, H, d]``: the history items' item_id embeddings (+ their SID part, ``model.history_sid``,
        + a recency vector per slot, ``model.history_position``)."""
        if not self.history_keys:
            return pooled[self.user_keys[0]].new_zeros(kjt.stride(), 0, self.embedding_dim)
        hist = torch.stack([pooled[k] for k in self.history_keys], 1)
        if self.history_sid:
            hist = hist + self._history_sid_embeddings(kjt)
        if self.history_position is not None:
            hist = self.history_position(hist)
        return hist

    def _history_sid_embeddings(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """``[rows, H, d]``: sum over l of hist_sid[(l-1)K + c_l] for each history item's SID c (from
        ``tokenizer.item_sid_table``); zero where the position is empty or the item has no SID yet."""
        table = self.tokenizer.item_sid_table  # [V, L], -1 = no SID yet (before init)
        rows, L = kjt.stride(), self.num_layers
        offsets = torch.arange(L, device=table.device) * self.num_codes
        keys, values, lengths = [], [], []
        for j, key in enumerate(self.history_keys):
            jt = kjt[key]  # a bag of 0 or 1 item ids per row
            present = jt.lengths() > 0
            sids = table[jt.values()]  # [n_j, L]
            known = (sids >= 0).all(-1)
            length = torch.zeros(rows, dtype=torch.int32, device=table.device)
            length[present] = known.to(torch.int32) * L
            keys.append(history_sid_key(j))
            values.append((sids[known] + offsets).reshape(-1))
            lengths.append(length)
        pooled = self.history_sid_bags(make_kjt(keys, values, lengths)).to_dict()
        return torch.stack([pooled[history_sid_key(j)] for j in range(len(self.history_keys))], 1)

    def _history_mask(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """``[rows, H]`` True where hist_j has a click (bag length > 0)."""
        if not self.history_keys:
            return torch.zeros(kjt.stride(), 0, dtype=torch.bool, device=kjt.device())
        lengths = kjt.lengths().view(len(kjt.keys()), -1)
        idx = [kjt.keys().index(k) for k in self.history_keys]
        return lengths[idx].t() > 0

    def _sid_kjt(self, prefixes: Dict[int, torch.Tensor], n: int, device: torch.device) -> KeyedJaggedTensor:
        """The SID KJT for the given depths ``{l: [n, l] tokens}``; other depths get empty bags."""
        keys, values, lengths = [], [], []
        empty = torch.empty(0, dtype=torch.long, device=device)
        zeros = torch.zeros(n, dtype=torch.int32, device=device)
        for l in range(1, self.num_layers + 1):
            keys.append(sid_prefix_key(l))
            if l in prefixes:
                offsets = torch.arange(l, device=device) * self.num_codes
                values.append((prefixes[l] + offsets[None]).reshape(-1))
                lengths.append(torch.full((n,), l, dtype=torch.int32, device=device))
            else:
                values.append(empty)
                lengths.append(zeros)
        if self.prefix_conditioned:
            for l in range(1, self.num_layers + 1):
                keys.append(sid_prefix_hash_key(l))
                if l in prefixes:
                    values.append(hash_prefix(prefixes[l], self.num_codes, self.num_prefix_buckets))
                    lengths.append(torch.ones(n, dtype=torch.int32, device=device))
                else:
                    values.append(empty)
                    lengths.append(zeros)
        return make_kjt(keys, values, lengths)

    def _pooled_prefix(self, pooled: Dict[str, torch.Tensor], l: int) -> torch.Tensor:
        """Eq. 5 at depth l from the pooled SID features (plus the whole-prefix embedding if enabled)."""
        e = pooled[sid_prefix_key(l)]
        return e + pooled[sid_prefix_hash_key(l)] if self.prefix_conditioned else e

    def _sid_prefix_embeddings(self, sids: torch.Tensor) -> torch.Tensor:
        """Eq. 5 for every layer: ``sids [N, L]`` -> e_sid^(1:l) ``[L, N, F_enc*d]``."""
        n, num_layers = sids.shape
        kjt = self._sid_kjt({l: sids[:, :l] for l in range(1, num_layers + 1)}, n, sids.device)
        pooled = self.sid_embedding_bags(kjt).to_dict()
        return torch.stack([self._pooled_prefix(pooled, l) for l in range(1, num_layers + 1)], 0)

    def _sid_prefix_embedding_at(self, sid_prefix: torch.Tensor) -> torch.Tensor:
        """Eq. 5 at one depth: ``sid_prefix [N, l]`` -> e_sid^(1:l) ``[N, F_enc*d]``."""
        n, depth = sid_prefix.shape
        pooled = self.sid_embedding_bags(self._sid_kjt({depth: sid_prefix}, n, sid_prefix.device)).to_dict()
        return self._pooled_prefix(pooled, depth)

    def _loss_gate(self) -> float:
        """1 once the tokenizer is initialised, 0 during the rank-path warm-up."""
        return 1.0 if self.tokenizer.is_initialized else 0.0

    # ================================================================== forward
    def forward(self, batch: DIGBatch) -> Tuple[torch.Tensor, DIGOutput]:
        """One step: ``(total loss, DIGOutput)`` as ``TrainPipelineSparseDist`` expects.

        :meth:`compute` then :attr:`criterion` (Eq. 8). The ``embedding_bags`` call on
        ``batch.sparse_features`` is the first statement and the rest runs in an
        ``fx``-opaque function, so torchrec's pipeline tracer sees exactly one
        sharded-module call fed straight from the batch and pipelines its input dist.

        A training forward changes no buffer: the step's tokenizer EMA, SID-table, u2t
        statistics and BatchNorm updates wait in ``DIGOutput.update`` until the trainer
        calls :meth:`on_step_accepted` (or :meth:`on_step_skipped`).

        Args:
            batch: B exposure rows then R retrieval rows in ``sparse_features``.
        """
        pooled = self.embedding_bags(batch.sparse_features)  # the one EBC call per step
        return _forward_from_pooled(self, batch, pooled)

    def forward_parts(
        self, batch: DIGBatch, pooled: Optional[KeyedTensor] = None, u2t_mode: Optional[str] = None
    ) -> StepParts:
        """:meth:`forward` with the intermediates exposed (tests, diagnostics, evaluation).

        ``u2t_mode``: outside training, the recall path's u2t input (see :meth:`compute`).
        """
        computed = self.compute(batch, pooled, u2t_mode=u2t_mode)
        terms = self.criterion(computed.loss_inputs)
        return StepParts(computed, terms, self._output(batch, computed, terms))

    def _output(self, batch: DIGBatch, computed: "DIGForward", terms: LossTerms) -> DIGOutput:
        li = computed.loss_inputs
        tokenizer_metrics: Dict[str, torch.Tensor] = {}
        if computed.update is None and not self.rank_only:  # outside training: this batch's SID usage
            tokenizer_metrics = self.tokenizer.metrics(computed.sids[li.real_rows])
        empty = li.rank_logits.new_zeros(self.num_layers, 0)
        return DIGOutput(
            losses={k: v.detach() for k, v in terms.as_dict().items()},
            rank_logits=li.rank_logits.detach(),
            labels=batch.labels,
            weights=batch.weights,
            recall_logits=li.recall_logits.detach() if li.recall_logits is not None else empty,
            recall_labels=li.recall_labels if li.recall_labels is not None else batch.retrieval_labels,
            recall_weights=li.recall_weights if li.recall_weights is not None else batch.retrieval_weights,
            tokenizer_metrics=tokenizer_metrics,
            update=computed.update,
        )

    def _step_batch_norms(self) -> List[StepBatchNorm1d]:
        return [m for m in self.modules() if isinstance(m, StepBatchNorm1d)]

    def compute(
        self, batch: DIGBatch, pooled: Optional[KeyedTensor] = None, u2t_mode: Optional[str] = None
    ) -> DIGForward:
        """The rank and recall paths of one batch and everything Eq. 8 needs; no loss, no buffer update.

        Args:
            batch: the batch.
            pooled: the ``embedding_bags`` output for ``batch.sparse_features`` (computed if None).
            u2t_mode: outside training, the recall path's u2t input (``mlp`` | ``stat_mean`` | ``none`` |
                ``catalog_mean`` | ``catalog_max``); default ``u2t.inference``. A batch of exposure rows stores
                each row's u2i but not the user's state, so the catalog modes are scored here with the Eq. 13 bucket mean of the
                batch's u2i rows: at depth L with collision-free SIDs that is the row's exact u2i, which is the
                catalog mean of its one-item leaf; at shallower depths it is the batch's estimate of it.
        """
        cfg = self.cfg
        kjt = batch.sparse_features
        B, R = batch.batch_size, batch.retrieval_size
        training = self.training
        if training:  # a new step: BatchNorm statistics of an unaccepted earlier forward are dropped
            for bn in self._step_batch_norms():
                bn.discard()
        pooled_dict = (pooled if pooled is not None else self.embedding_bags(kjt)).to_dict()
        e_u = torch.cat([pooled_dict[k] for k in self.user_keys], -1)  # [B+R, F_u*d]
        item_fields = torch.stack([pooled_dict[k] for k in self.encoder_keys], 1)  # [B+R, F_enc, d]
        hist = self._history(kjt, pooled_dict)  # [B+R, H, d] DIN keys
        hist_mask = self._history_mask(kjt)
        if self.rank_only:  # Eq. 1 and Eq. 6 on the exposure rows; the retrieval rows are ignored
            e_v = self.tokenizer.encode(item_fields[:B])
            rank_logits = self.mixer(self.bn_u(e_u[:B]), self.bn_v(e_v.flatten(1)), self.bn_u2i(batch.u2i), hist[:B],
                                     hist_mask[:B])
            update = StepUpdate() if training else None
            return DIGForward(LossInputs(rank_logits, batch.labels, batch.weights), e_v=e_v, update=update)
        item_ids = kjt[ITEM_ID].values()
        if item_ids.numel() != B + R:
            raise DataError(
                f"batch key '{ITEM_ID}' holds {item_ids.numel()} ids for {B + R} rows; every row needs exactly one item"
            )
        row_weights = torch.cat([batch.weights, batch.retrieval_weights])

        # Eq. 1 and Eq. 2-4
        e_v = self.tokenizer.encode(item_fields)
        q = self.tokenizer.quantize(e_v, item_ids)
        real_rows = row_weights > 0

        # Eq. 6: rank path on the exposure rows
        user_norm_exp = self.bn_u(e_u[:B])
        rank_logits = self.mixer(
            user_norm_exp, self.bn_v(e_v[:B].flatten(1)), self.bn_u2i(batch.u2i), hist[:B], hist_mask[:B]
        )

        # which rows feed L_recall, the teacher and L_u2t: the retrieval rows (click groups), the
        # exposure rows, or both (loss.recall_samples=retrieval+exposure: groups first, then exposures)
        mode = cfg.loss.recall_samples if training else "exposure"
        if mode != "exposure" and R == 0:
            raise DataError(
                "training batch has no retrieval rows (batch.retrieval_labels is empty) but "
                f"loss.recall_samples={mode}; read it with with_retrieval=True"
            )
        parts = []  # (row indices, u2i, labels, weights, are retrieval rows)
        if mode != "exposure":
            parts.append((torch.arange(B, B + R, device=e_u.device), batch.retrieval_u2i, batch.retrieval_labels,
                          batch.retrieval_weights, True))
        if mode != "retrieval":
            parts.append((torch.arange(0, B, device=e_u.device), batch.u2i, batch.labels, batch.weights, False))
        # the recall path runs on the real (weight > 0) rows only: padding slots (a batch with
        # fewer clicks than retrieval slots) add nothing to the losses, and would both cost
        # L Mixer passes each and pollute the BN_u / BN_sid / BN_u2t batch statistics
        kept = []
        for idx, u2i_p, lab_p, w_p, is_ret in parts:
            keep = (w_p > 0).nonzero().squeeze(-1)
            if 2 <= keep.numel() < w_p.numel():  # BN in training needs 2 rows; else keep all
                idx, u2i_p, lab_p, w_p = idx[keep], u2i_p[keep], lab_p[keep], w_p[keep]
            # exposure rows reuse the rank path's BN_u call (they are rows 0..B-1 of it)
            kept.append((idx, u2i_p, lab_p, w_p, self.bn_u(e_u[idx]) if is_ret else user_norm_exp[idx]))
        rows = torch.cat([k[0] for k in kept])
        u2i_r, labels_r, weights_r = (torch.cat([k[i] for k in kept]) for i in (1, 2, 3))
        user_norm_r = torch.cat([k[4] for k in kept]) if len(kept) > 1 else kept[0][4]
        num_grouped = kept[0][0].numel() if mode != "exposure" else 0  # leading rows that are click groups
        sids_r = q.sids[rows]
        n = sids_r.shape[0]
        L = self.num_layers
        e_sid = self._sid_prefix_embeddings(sids_r)  # Eq. 5, [L, N, F*d]
        u2t_hat = self.u2t_mlp(e_u[rows], e_sid)  # Eq. 14, [L, N, d_c]
        user_ids = kjt[USER_ID].values()[rows] if cfg.u2t.grouping == "user_bucket" else None
        leave_one_out = cfg.u2t.teacher == "leave_one_out"
        teacher = u2t_teacher(u2i_r, sids_r, weights_r, self.num_codes, user_ids, leave_one_out)  # Eq. 13 (no grad)
        if training:
            u2t_in = teacher if cfg.u2t.train_side else torch.zeros_like(teacher)
            if cfg.u2t.train_side and cfg.u2t.train_mlp_prob > 0:
                # per row, the inference-side input (MLP_u2t's estimate) instead of the teacher
                use_mlp = torch.rand(n, device=teacher.device) < cfg.u2t.train_mlp_prob
                u2t_in = torch.where(use_mlp[None, :, None], u2t_hat.detach(), u2t_in)
        else:
            mode_in = u2t_mode or cfg.u2t.inference
            if mode_in in ("catalog_mean", "catalog_max"):  # the plain bucket mean (a leave-one-out teacher would drop the row)
                u2t_in = teacher if not leave_one_out else u2t_teacher(u2i_r, sids_r, weights_r, self.num_codes, user_ids)
            else:
                u2t_in = self._inference_u2t(mode_in, u2t_hat, sids_r)

        # Eq. 7 for l = 1..L in one Mixer call (a leading L: the passes share user and history)
        recall_logits = self.mixer(
            user_norm_r,
            self.bn_sid(e_sid.reshape(L * n, -1)).view(L, n, -1),
            self.bn_u2t(u2t_in.reshape(L * n, -1)).view(L, n, -1),
            hist[rows],
            hist_mask[rows],
        )
        # click groups (positive + negatives) lead the rows; padding slots drop whole groups
        crit = self.criterion
        grouped = num_grouped > 0
        prefix_index = None
        needs_index = grouped and (crit.needs_prefix_index or cfg.loss.prefix_negatives > 0)
        if needs_index and self.tokenizer.is_initialized:
            prefix_index = CatalogPrefixIndex(
                self.tokenizer.item_sid_table, self.num_codes, crit.sampling_prob if crit.has_sampling_prob else None
            )
        sib_logits = sib_weights = None
        if training and grouped and cfg.loss.prefix_negatives > 0 and prefix_index is not None:
            g = slice(0, num_grouped)
            sib_logits, sib_weights = self._prefix_negative_logits(
                e_u[rows[g]], user_norm_r[g], hist[rows[g]], hist_mask[rows[g]], sids_r[g], weights_r[g], prefix_index)
        loss_inputs = LossInputs(
            rank_logits, batch.labels, batch.weights, quantized=q, real_rows=real_rows, recall_logits=recall_logits,
            recall_labels=labels_r, recall_weights=weights_r, recall_sids=sids_r, num_grouped=num_grouped,
            prefix_index=prefix_index, prefix_negative_logits=sib_logits, prefix_negative_weights=sib_weights,
            u2t_hat=u2t_hat, u2t_teacher=teacher, gate=self._loss_gate(),
        )
        update = StepUpdate(q, item_ids, real_rows, sids_r, u2i_r, weights_r) if training else None
        return DIGForward(loss_inputs, e_v=e_v, sids=q.sids, e_sid=e_sid, u2t_hat=u2t_hat, u2t_in=u2t_in,
                          update=update)

    # ================================================================== step hooks
    @torch.no_grad()
    def on_step_accepted(self, output: DIGOutput) -> None:
        """Apply a training step's buffer updates (the trainer calls it once the step's loss passed
        ``train.nan_policy``; a caller training the bare model calls it after each step).

        In order: the BatchNorm running statistics; the tokenizer's EMA codebook step with
        dead-code restarts and SID-table refresh (Eq. 2-4; a collective across ranks); the u2t
        statistics of Eq. 13/16 (once the tokenizer is initialised). Fills
        ``output.tokenizer_metrics`` with this step's codebook usage and clears ``output.update``.
        """
        for bn in self._step_batch_norms():
            bn.commit()
        u = output.update
        output.update = None
        if u is None or u.quantized is None:  # not a training forward, or a rank-only model
            return
        self.tokenizer.training_update(u.quantized, u.item_ids, u.real_rows)
        if self.tokenizer.is_initialized:
            self.u2t_stats.update(u.recall_sids, u.recall_u2i, u.recall_weights)
        output.tokenizer_metrics = self.tokenizer.metrics(u.quantized.sids[u.real_rows])

    def on_step_skipped(self, output: DIGOutput) -> None:
        """Drop a rejected training step's buffer updates (``train.nan_policy=skip``).

        The tokenizer's schedule clock (``freeze_after_steps``, the Gumbel decay) still
        advances: it counts training steps, as :meth:`DIGTokenizer.restore_schedule` does on resume.
        """
        for bn in self._step_batch_norms():
            bn.discard()
        u = output.update
        output.update = None
        if u is None or u.quantized is None:
            return
        self.tokenizer.skip_step()
        output.tokenizer_metrics = self.tokenizer.metrics(u.quantized.sids[u.real_rows])

    def _prefix_negative_logits(
        self,
        e_u: torch.Tensor,
        user_norm: torch.Tensor,
        hist: torch.Tensor,
        hist_mask: torch.Tensor,
        sids: torch.Tensor,
        weights: torch.Tensor,
        index: CatalogPrefixIndex,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[L, S, 1 + M]`` of each click's prefix and ``M = loss.prefix_negatives``
        sibling prefixes per layer, with their weights ``[L, S]`` (the softmax is in :class:`DIGLoss`).

        At layer l the siblings are catalog items sharing the positive's c_<l and differing at
        c_l, each standing for its depth-l prefix (c_<l, c'_l): the alternatives beam search
        compares with the positive's token at depth l. Every candidate, the positive
        included, is scored with MLP_u2t's (detached) estimate and eval-mode BN, i.e. as
        beam search scores it. A click whose prefix has no sibling at a layer is left out there.

        Args:
            e_u, user_norm, hist, hist_mask, sids, weights: the retrieval rows (click groups).
            index: the catalog prefix index.
        """
        L, G, M = self.num_layers, self.criterion.group_size, self.cfg.loss.prefix_negatives
        pos = torch.arange(0, sids.shape[0], G, device=sids.device)  # the click of each group
        pos_sids = sids[pos]
        S, C = pos.numel(), 1 + M
        expand = torch.arange(S, device=sids.device).repeat_interleave(C)  # candidate -> click
        targets, u2ts, valids = [], [], []
        for depth in range(1, L + 1):
            items, valid = index.sample_siblings(pos_sids, depth, M)  # [S, M]
            sib_prefix = self.tokenizer.item_sid_table[items][..., :depth]  # [S, M, depth], shares c_<l
            cand = torch.cat([pos_sids[:, None, :depth], sib_prefix], 1).reshape(S * C, depth)
            e_sid = self._sid_prefix_embedding_at(cand)  # Eq. 5 at depth l
            targets.append(e_sid)
            u2ts.append(self.u2t_mlp.forward_layer(depth - 1, e_u[pos][expand], e_sid).detach())  # Eq. 14
            valids.append(valid)
        target = torch.stack(targets)  # [L, S*C, T]
        u2t = torch.stack(u2ts)
        logits = self.mixer(
            user_norm[pos][expand],
            self.bn_sid.eval_forward(target.reshape(L * S * C, -1)).view(L, S * C, -1),
            self.bn_u2t.eval_forward(u2t.reshape(L * S * C, -1)).view(L, S * C, -1),
            hist[pos][expand],
            hist_mask[pos][expand],
        ).view(L, S, C)
        w = weights[pos][None] * torch.stack(valids).to(weights.dtype)  # [L, S]
        return logits, w

    def _inference_u2t(self, mode: str, u2t_hat: torch.Tensor, sids: torch.Tensor) -> torch.Tensor:
        """u2t on the recall path outside training, ``[L, N, d_c]`` (Eq. 16)."""
        if mode == "mlp":
            return u2t_hat.detach()
        if mode == "stat_mean":
            return torch.stack([self.u2t_stats.lookup(l, sids[:, l]) for l in range(self.num_layers)], 0).to(u2t_hat)
        if mode == "none":
            return torch.zeros_like(u2t_hat)
        raise ConfigError(f"config key 'u2t.inference' = {mode!r}; must be one of mlp, stat_mean, none, catalog_mean, "
                          "catalog_max")

    # ================================================================== inference API
    @torch.no_grad()
    def user_context(self, user_kjt: KeyedJaggedTensor) -> UserContext:
        """e_u, BN_u(e_u) and the DIN history of each row of ``user_kjt`` (user-side keys)."""
        kjt = self._complete_kjt(user_kjt)
        pooled = self._embed(kjt)
        e_u = torch.cat([pooled[k] for k in self.user_keys], -1)
        hist = self._history(kjt, pooled)
        return UserContext(e_u, self.bn_u(e_u), hist, self._history_mask(kjt))

    @torch.no_grad()
    def item_representation(self, item_kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Eq. 1: e_v ``[N, F_enc, d]`` of the items in ``item_kjt`` (item keys)."""
        pooled = self._embed(self._complete_kjt(item_kjt))
        return self.tokenizer.encode(torch.stack([pooled[k] for k in self.encoder_keys], 1))

    @torch.no_grad()
    def assign_sids(self, e_v: torch.Tensor) -> torch.Tensor:
        """Eq. 2-3 argmin: ``e_v [N, F, d]`` (or flattened) -> ``[N, L]``."""
        return self.tokenizer.assign(e_v)

    @torch.no_grad()
    def corpus_item_representations(
        self, items: "ItemTable", batch_size: int = 4096, ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """e_v (Eq. 1) of the items ``ids`` (default: every catalog item, in item-id order), ``[n, F_enc*d]``,
        ``batch_size`` items per encoder call; through sharded tables every rank must make the same calls."""
        device = self.tokenizer.quantizer.codebooks.device
        ids = torch.arange(items.num_items) if ids is None else ids
        out = [self.item_representation(items.kjt(ids[start:start + batch_size]).to(device)).flatten(1)
               for start in range(0, ids.numel(), batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def full_corpus_sids(self, items: "ItemTable", batch_size: int = 4096) -> torch.Tensor:
        """SIDs of every item, ``[num_items, L]``, with ``tokenizer.collision_resolution`` applied.

        Once the codebooks no longer move (``tokenizer.frozen``: the balanced-tree table;
        ``tokenizer.freeze_after_steps`` reached) this is the item SID table the recall path
        was trained on, not a fresh argmin of the still-training encoder's e_v.
        """
        if self.tokenizer.ema_frozen and self.tokenizer.is_initialized:
            return self.tokenizer.item_sid_table.clone()
        return self.tokenizer.corpus_sids(self.corpus_item_representations(items, batch_size))

    @torch.no_grad()
    def rank_logits(
        self, ctx: UserContext, user_index: torch.Tensor, e_v: torch.Tensor, u2i: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 6/17 logits ``[N]`` for (user ``ctx[user_index[n]]``, item ``e_v[n]``, ``u2i[n]``)."""
        c = ctx.select(user_index)
        return self.mixer(c.user_normalized, self.bn_v(e_v.flatten(1)), self.bn_u2i(u2i), c.history_keys, c.history_mask)

    @torch.no_grad()
    def recall_logits(
        self, ctx: UserContext, user_index: torch.Tensor, sid_prefix: torch.Tensor, u2t_mode: Optional[str] = None,
        u2t: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Eq. 7/16 logits ``[N]`` at layer l = ``sid_prefix.shape[1]``.

        Args:
            ctx: user contexts.
            user_index: ``[N]`` row of ``ctx`` for each candidate.
            sid_prefix: ``[N, l]`` tokens s_1..s_l.
            u2t_mode: ``mlp`` | ``stat_mean`` | ``none`` | ``catalog_mean`` | ``catalog_max``; default
                ``u2t.inference``.
            u2t: ``[N, d_c]`` the u2t input itself (``catalog_mean``: the caller computes it from the users'
                states, :class:`~dig_torchrec.retrieval.u2t_catalog.CatalogPrefixU2T`).
        """
        mode = u2t_mode or self.cfg.u2t.inference
        depth = sid_prefix.shape[1]
        if not 1 <= depth <= self.num_layers:
            raise ValueError(f"sid_prefix has {depth} tokens; expected 1..{self.num_layers}")
        c = ctx.select(user_index)
        e_sid = self._sid_prefix_embedding_at(sid_prefix)  # Eq. 5
        if u2t is not None:
            u2t = u2t.to(e_sid)
        elif mode in ("catalog_mean", "catalog_max"):
            raise ConfigError(f"u2t.inference={mode}: recall_logits needs the u2t rows (computed from the "
                              "users' states by dig_torchrec.retrieval.u2t_catalog)")
        elif mode == "mlp":
            u2t = self.u2t_mlp.forward_layer(depth - 1, c.user_embedding, e_sid)  # Eq. 14
        elif mode == "stat_mean":
            u2t = self.u2t_stats.lookup(depth - 1, sid_prefix[:, -1]).to(e_sid)
        elif mode == "none":
            u2t = e_sid.new_zeros(e_sid.shape[0], self.u2i_dim)
        else:
            raise ConfigError(f"u2t mode {mode!r}; must be one of mlp, stat_mean, none, catalog_mean, catalog_max")
        return self.mixer(c.user_normalized, self.bn_sid(e_sid), self.bn_u2t(u2t), c.history_keys, c.history_mask)

    @torch.no_grad()
    def initialize_tokenizer(self, e_v_all: torch.Tensor) -> None:
        """Balanced k-means tree init on ``e_v_all [num_items, F_enc*d]`` (rank 0, broadcast)."""
        self.tokenizer.initialize(e_v_all)
