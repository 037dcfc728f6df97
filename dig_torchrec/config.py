"""Typed configuration: one dataclass per component, composed into :class:`DIGConfig`.

Configs are filled from YAML files in ``configs/`` and changed with dotted overrides
(``data.batch_size=1024``). An unknown key or a value of the wrong type raises
:class:`ConfigError`, which names the key and lists the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml


from dig_torchrec.errors import ConfigError  # noqa: E402  (re-exported)


@dataclass
class DataConfig:
    """Where the exposure logs live and how batches are made."""

    path: str = "data/tiny"  # dataset root: meta.json, items.parquet, train/ valid/ test/
    batch_size: int = 512
    eval_batch_size: int = 2048
    history_length: int = 20  # must be <= the dataset's stored history length
    shuffle_buffer: int = 4096  # rows; 0 disables shuffling
    num_workers: int = 0  # DataLoader workers per rank
    reader_threads: int = 0  # threads decoding/batching windows ahead in the rank's process; 0 = auto:
    # usable cores / LOCAL_WORLD_SIZE - 1 (at least 1), leaving a core to the training step. Ignored inside DataLoader workers (1 each).
    negatives_per_positive: int = 4  # full-corpus random negatives per click (paper §4.1)
    retrieval_positives: int = 0  # click slots per batch in the retrieval rows; 0 = auto: ceil(2 x train click rate
    # x batch size) in [1, batch size] (rate from items.parquet train clicks / train rows; same on every rank).
    # A batch with more clicks fills the slots with a seeded random subset; the rest stay exposure rows only.
    negative_sampling: str = "uniform"  # uniform | popularity
    popularity_alpha: float = 0.75  # popularity-smoothed draw: p(v) ~ count(v)^alpha
    hash_ids: bool = False  # hash ids beyond the table size instead of erroring
    u2i_dim: int = 0  # d_c the run expects; 0: take meta.json's u2i_dim (checked before training)
    seed: int = 0


@dataclass
class TokenizerConfig:
    """VQ encoder (Eq. 1) and residual quantizer (Eq. 2-4)."""

    num_layers: int = 4  # L
    num_codes: int = 256  # K
    encoder_layers: int = 4  # Transformer layers of the VQ encoder
    encoder_heads: int = 4
    include_item_id: bool = True  # item id is one of the encoder's fields (keeps twins apart)
    # alpha in c <- alpha c + (1 - alpha) e_bar (why 0.95: docs/benchmarks.md)
    ema_decay: float = 0.95
    laplace_epsilon: float = 1e-5  # Laplace smoothing of EMA cluster sizes
    dead_code_threshold: float = 0.5  # EMA count (items per step, all ranks) below which a code is restarted
    restart_dead_codes: bool = True
    init_after_steps: int = 0  # rank-path warm-up steps before balanced k-means init
    init_kmeans_iters: int = 10
    frozen: bool = False  # Fixed SID ablation: keep the balanced-tree SIDs, no EMA
    # stop the EMA codebook updates (and so SID changes) after this many training steps; 0 = never
    freeze_after_steps: int = 0
    # at the freeze, every item's SID is re-assigned once on the frozen codebooks (the table then serves
    # training and retrieval): balanced = the balanced-tree assignment (distinct leaves when N <= K^L),
    # argmin = Eq. 2 + collision_resolution, none = keep each item's last-batch argmin (or its init SID),
    # auto = balanced only when more than seal_collision_threshold of the items share a leaf at the freeze
    seal: str = "auto"
    seal_collision_threshold: float = 0.01
    # dead-code threshold unit: per_step = EMA items per step (dead_code_threshold as is); catalog = a share
    # of an average catalog item's traffic (threshold x rows per step / num_items), which scales with the catalog
    dead_code_rule: str = "per_step"
    # Eq. 5's e_sid^(1:l): sum of per-layer token embeddings, or that sum plus a hashed embedding of the whole
    # prefix (c_1..c_l), so a depth-l embedding depends on every earlier token (table sid_prefix, sid_prefix_buckets rows)
    sid_embedding: str = "sum"  # sum | sum+prefix
    sid_prefix_buckets: int = 0  # rows of the hashed prefix table; 0 = auto: min(num_items x L, 2^20)
    assignment: str = "argmin"  # argmin (Eq. 2) | gumbel (DIGER-style exploration noise, decayed to argmin)
    gumbel_scale: float = 1.0  # initial Gumbel noise scale, relative to the mean squared distance to codes
    gumbel_decay_steps: int = 0  # linear decay of the noise to 0 over this many steps after init (0 = no noise)
    collision_resolution: str = "last_layer"  # last_layer | none


@dataclass
class U2TConfig:
    """Type-III features on the recall path (Eq. 13-15)."""

    train_side: bool = True  # feed the Eq. 13 batch teacher to the recall path in training
    # Eq. 13 teacher: bucket_mean (the paper's), or leave_one_out (a row's own u2i is excluded from its bucket
    # mean, so at a depth where a bucket holds one row the teacher is 0 instead of the row's exact u2i)
    teacher: str = "bucket_mean"
    train_mlp_prob: float = 0.0  # per row, feed MLP_u2t's (detached) estimate instead of the teacher in training
    # recall-path u2t at inference: mlp (Eq. 14-16) | stat_mean | none | catalog_mean (the user's exact mean u2i over
    # the catalog items under each prefix, computed from the user's state: dig_torchrec/retrieval/u2t_catalog.py) |
    # catalog_max (the same items, per u2i feature the largest value)
    inference: str = "mlp"
    grouping: str = "bucket"  # bucket | user_bucket (Eq. 13 grouping)
    hidden_dim: int = 64  # MLP_u2t hidden size (Eq. 14)


@dataclass
class ModelConfig:
    """DIN + DCNv2 + MoE ranker (the Mixer) and embedding sizes."""

    embedding_dim: int = 64  # d
    din_hidden: List[int] = field(default_factory=lambda: [64, 32])
    cross_layers: int = 3
    cross_low_rank: int = 0  # 0: full-rank CrossNet, >0: LowRankCrossNet rank
    num_experts: int = 4
    expert_hidden: List[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0
    # uniform(-r, r) init of every embedding table; 0 = torchrec's +-sqrt(1/rows), which makes a
    # 40K-row item_id table ~60x smaller than a 10-row feature table inside the VQ encoder
    embedding_init_range: float = 0.05
    # DIN keys (both paths): each history item's item_id embedding, plus (true) the sum of its SID tokens'
    # embeddings from table hist_sid (L*K rows, width d), so history items sharing a SID prefix share that part
    history_sid: bool = False
    # DIN keys (both paths) add a learned vector per history position (hist_j = the j-th most recent click),
    # so the target attention can weigh recent clicks over old ones; zero-initialised
    history_position: bool = False


@dataclass
class LossConfig:
    """Eq. 8: L = L_rank + w_recall L_recall + l1 L_commit + l2 L_sem + l3 L_u2t."""

    recall_loss_weight: float = 1.0  # 0 gives the rank-only Base
    commit_weight: float = 0.25  # lambda_1
    sem_weight: float = 0.1  # lambda_2
    u2t_weight: float = 0.1  # lambda_3
    recall_supervision: str = "all_layers"  # all_layers | last_layer
    recall_samples: str = "retrieval"  # retrieval | exposure | retrieval+exposure
    exposure_recall_weight: float = 1.0  # retrieval+exposure: weight of the exposure rows' BCE inside L_recall
    recall_objective: str = "bce"  # bce (Eq. 10) | softmax (sampled softmax per click over its negatives, per layer)
    logq_correction: bool = True  # softmax: subtract log Q(prefix) of the negative sampler (popularity sampling)
    prefix_negatives: int = 0  # extra softmax term: per click and layer l, items sharing c_<l but not c_l
    prefix_negatives_weight: float = 1.0  # weight of that term inside L_recall
    # softmax only: at depth l < L, cross-entropy of the click group's prefix softmax against the softmax of the
    # largest stop-gradient leaf logit under each prefix (max-heap distillation for beam search); 0 = off
    descendant_distill_weight: float = 0.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    epochs: int = 1
    max_steps: int = 0  # 0: run the epochs
    lr: float = 1e-3  # dense Adam (paper §4.1)
    sparse_optimizer: str = "rowwise_adagrad"  # rowwise_adagrad | adam | sgd
    sparse_lr: float = 0.05
    grad_clip: float = 0.0  # 0 disables
    warmup_steps: int = 0
    log_every: int = 50
    val_every: int = 0  # 0: validate at the end of each epoch
    val_max_batches: int = 0  # 0: the whole valid split
    # beam-search Recall@10 / NDCG@10 on this many seeded valid users at every validation (0 = off)
    val_retrieval_users: int = 0
    val_retrieval_seed: int = 0
    select_metric: str = "rank_auc"  # rank_auc | recall@10: which validation metric picks checkpoints/best
    checkpoint_every: int = 0  # 0: only at the end
    keep_latest_k: int = 3
    seed: int = 0
    deterministic: bool = False
    nan_policy: str = "error"  # error | skip
    device: str = "auto"  # auto | cpu | cuda
    min_free_disk_mb: int = 512  # checked before training starts
    # Schedule keys in data instead of steps (0 = unset; at most one form per event). Resolved to
    # steps by preflight from the row-group metadata and the world size (global batch = batch_size x world).
    tokenizer_init_after_samples: int = 0  # exposure rows before the tokenizer init (sets tokenizer.init_after_steps)
    tokenizer_init_after_epochs: float = 0.0  # the same as a fraction of an epoch
    checkpoint_every_samples: int = 0  # sets checkpoint_every
    checkpoint_every_epochs: float = 0.0
    val_every_samples: int = 0  # sets val_every
    val_every_epochs: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 (autocast of the dense Mixer; losses, EMA and tables stay fp32)
    tf32: bool = True  # TF32 matmuls/convolutions on CUDA (no effect on CPU)
    pin_memory: bool = True  # pin host batches on CUDA so the pipeline's non_blocking copies are asynchronous
    collective_timeout_s: int = 1800  # process-group timeout (k-means init, checkpoints); env DIG_DIST_TIMEOUT_S overrides


@dataclass
class ShardingConfig:
    """Planner constraints. Per-table sharding types override the device defaults."""

    compute_kernel: str = "fused"  # fused | dense
    # table name -> allowed sharding types, e.g. {"user_id": ["table_wise"]}
    constraints: Dict[str, List[str]] = field(default_factory=dict)
    # device defaults; pinned so a table is never data-parallel in one plan and sharded in another
    cpu_sharding_types: List[str] = field(default_factory=lambda: ["table_wise"])
    cuda_sharding_types: List[str] = field(default_factory=lambda: ["row_wise", "table_wise"])
    # on CUDA, tables with at least this many rows and no constraint are row_wise only (a 20M-row
    # table table_wise puts every lookup of it on one GPU); 0 disables the rule
    cuda_row_wise_min_rows: int = 1_000_000


@dataclass
class EvalConfig:
    beam_size: int = 64
    topk: List[int] = field(default_factory=lambda: [10, 50, 100])
    unified_top_n: int = 100  # beam candidates reranked by the rank path
    exclude_history: bool = False
    max_users: int = 0  # 0: all retrieval targets
    user_batch_size: int = 64
    score_chunk_rows: int = 65536  # largest (user, prefix/item) batch per Mixer call in retrieval


@dataclass
class DIGConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    u2t: U2TConfig = field(default_factory=U2TConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/default"  # alias of train.run_dir kept in sync by load_config

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.negative_sampling": ("uniform", "popularity"),
    "tokenizer.collision_resolution": ("last_layer", "none"),
    "tokenizer.seal": ("auto", "balanced", "argmin", "none"),
    "u2t.inference": ("mlp", "stat_mean", "none", "catalog_mean", "catalog_max"),
    "u2t.grouping": ("bucket", "user_bucket"),
    "loss.recall_supervision": ("all_layers", "last_layer"),
    "loss.recall_samples": ("retrieval", "exposure", "retrieval+exposure"),
    "loss.recall_objective": ("bce", "softmax"),
    "u2t.teacher": ("bucket_mean", "leave_one_out"),
    "tokenizer.dead_code_rule": ("per_step", "catalog"),
    "tokenizer.assignment": ("argmin", "gumbel"),
    "tokenizer.sid_embedding": ("sum", "sum+prefix"),
    "train.sparse_optimizer": ("rowwise_adagrad", "adam", "sgd"),
    "train.nan_policy": ("error", "skip"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.select_metric": ("rank_auc", "recall@10"),
    "train.precision": ("fp32", "bf16"),
    "sharding.compute_kernel": ("fused", "dense"),
}
_POSITIVE = (
    "data.batch_size",
    "data.eval_batch_size",
    "tokenizer.num_layers",
    "tokenizer.num_codes",
    "model.embedding_dim",
    "eval.beam_size",
    "eval.score_chunk_rows",
    "train.keep_latest_k",
    "tokenizer.encoder_heads",
    "train.collective_timeout_s",
)
_NON_NEGATIVE_EXTRA = ("sharding.cuda_row_wise_min_rows",)
_NON_NEGATIVE = (
    "data.history_length",
    "data.num_workers",
    "data.reader_threads",
    "data.negatives_per_positive",
    "train.max_steps",
    "train.epochs",
    "loss.recall_loss_weight",
    "loss.commit_weight",
    "loss.sem_weight",
    "loss.u2t_weight",
    "tokenizer.init_after_steps",
    "train.val_retrieval_users",
    "tokenizer.freeze_after_steps",
    "tokenizer.seal_collision_threshold",
    "tokenizer.gumbel_decay_steps",
    "tokenizer.sid_prefix_buckets",
    "tokenizer.gumbel_scale",
    "loss.prefix_negatives",
    "loss.prefix_negatives_weight",
    "loss.descendant_distill_weight",
    "loss.exposure_recall_weight",
    "train.tokenizer_init_after_samples",
    "train.tokenizer_init_after_epochs",
    "train.checkpoint_every_samples",
    "train.checkpoint_every_epochs",
    "train.val_every_samples",
    "train.val_every_epochs",
)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin in (list, List, Sequence):
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} ({value!r})")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__} ({value!r})")
        return {_coerce(f"{key}.<key>", k, kt): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected bool, got {type(value).__name__} ({value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected int, got {type(value).__name__} ({value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected float, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected str, got {type(value).__name__} ({value!r})")
        return value
    return value


def _apply(obj: Any, values: Dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(
                f"unknown config key '{key}'; valid keys under '{prefix.rstrip('.') or '<root>'}' are: {', '.join(names)}"
            )
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}': expected a mapping of {', '.join(f.name for f in dataclasses.fields(cur))}")
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _dotted_to_nested(key: str, value: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> Dict[str, Any]:
    """``a.b=c`` -> ``{"a": {"b": <yaml value of c>}}``."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. data.batch_size=1024)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from e
    return _dotted_to_nested(key, value)


def validate(cfg: DIGConfig) -> None:
    """Impossible values: raise naming the key."""
    flat = flatten(cfg.to_dict())
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}' = {flat[key]!r}; must be one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"config key '{key}' = {flat[key]!r}; must be > 0")
    for key in (*_NON_NEGATIVE, *_NON_NEGATIVE_EXTRA):
        if flat[key] < 0:
            raise ConfigError(f"config key '{key}' = {flat[key]!r}; must be >= 0")
    if cfg.loss.recall_samples == "exposure" and (cfg.loss.recall_objective == "softmax" or cfg.loss.prefix_negatives):
        raise ConfigError(
            "config key 'loss.recall_samples' = 'exposure' has no click groups; loss.recall_objective=softmax and "
            "loss.prefix_negatives need loss.recall_samples=retrieval"
        )
    if cfg.loss.descendant_distill_weight > 0 and cfg.loss.recall_objective != "softmax":
        raise ConfigError(
            f"config key 'loss.descendant_distill_weight' = {cfg.loss.descendant_distill_weight} needs the click "
            f"groups of loss.recall_objective=softmax (got {cfg.loss.recall_objective!r})"
        )
    if cfg.train.select_metric == "recall@10" and cfg.train.val_retrieval_users <= 0:
        raise ConfigError(
            "config key 'train.select_metric' = 'recall@10' needs retrieval validation: set train.val_retrieval_users > 0"
        )
    if not 0.0 <= cfg.u2t.train_mlp_prob <= 1.0:
        raise ConfigError(f"config key 'u2t.train_mlp_prob' = {cfg.u2t.train_mlp_prob}; must be in [0, 1]")
    if not 0.0 < cfg.tokenizer.ema_decay < 1.0:
        raise ConfigError(f"config key 'tokenizer.ema_decay' = {cfg.tokenizer.ema_decay}; must be in (0, 1)")
    if cfg.model.embedding_dim % cfg.tokenizer.encoder_heads:
        raise ConfigError(
            f"config key 'tokenizer.encoder_heads' = {cfg.tokenizer.encoder_heads} must divide "
            f"'model.embedding_dim' = {cfg.model.embedding_dim}"
        )


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("constraints",):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _apply_sources(cfg: DIGConfig, sources: Sequence[Dict[str, Any]]) -> None:
    """Apply nested mappings to ``cfg`` in order, then sync the ``run_dir`` alias."""
    root_run_dir = False
    for values in sources:
        _apply(cfg, values)
        root_run_dir = root_run_dir or "run_dir" in values
    # run_dir is settable at the root (run_dir=/x) or as train.run_dir; the root wins if set.
    if root_run_dir:
        cfg.train.run_dir = cfg.run_dir
    else:
        cfg.run_dir = cfg.train.run_dir


def apply_overrides(cfg: DIGConfig, overrides: Sequence[str], *, check: bool = True) -> DIGConfig:
    """A copy of ``cfg`` with dotted ``key=value`` overrides applied in order.

    The one override path: ``load_config``, ``dig eval`` / ``dig retrieve`` / ``dig export``
    and the inference loader all go through it.

    Args:
        cfg: the config to start from (not modified).
        overrides: e.g. ``["eval.beam_size=128", "data.path=/x"]``; an unknown key or a wrong
            type raises :class:`ConfigError` naming it.
        check: validate the result (:func:`validate`); off to check only keys and types.
    """
    out = copy.deepcopy(cfg)
    _apply_sources(out, [parse_override(o) for o in overrides])
    if check:
        validate(out)
    return out


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DIGConfig:
    """Build a :class:`DIGConfig` from an optional YAML file plus dotted overrides."""
    sources: List[Dict[str, Any]] = []
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        sources.append(data)
    cfg = DIGConfig()
    _apply_sources(cfg, sources + [parse_override(o) for o in overrides])
    validate(cfg)
    return cfg


def config_from_dict(d: Dict[str, Any]) -> DIGConfig:
    """Rebuild a config saved with :meth:`DIGConfig.to_dict` (e.g. beside a checkpoint)."""
    cfg = DIGConfig()
    _apply(cfg, d)
    validate(cfg)
    return cfg


def save_config(cfg: DIGConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
