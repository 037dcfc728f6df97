"""The DIG trainer: DMP-sharded model, fused sparse + dense Adam, pipelined training loop.

Wiring (after torchrec's DLRM example):

1. ``DIGModel`` is built on ``meta``; its embedding tables get a fused optimizer with
   ``apply_optimizer_in_backward`` (row-wise Adagrad by default).
2. ``EmbeddingShardingPlanner.collective_plan`` plans with per-table constraints from the
   config (``dig_torchrec.distributed.planner``); rank 0 logs the plan.
3. ``DistributedModelParallel`` shards the tables and wraps the dense part in DDP.
4. Dense Adam via ``KeyedOptimizerWrapper``; both joined in ``CombinedOptimizer``.
5. ``TrainPipelineSparseDist`` runs the steps (the model's forward is fx-traceable up to
   the ``embedding_bags`` call, whose input all-to-all is prefetched).

The loop runs in *segments* that end at every event step (tokenizer init, validation,
checkpoint, epoch end, the last step). The pipeline prefetches two batches ahead; ending
each segment drains it, so at an event the reader has yielded exactly the batches that
were trained on, and a checkpoint's reader position is exact.

Tokenizer init (``tokenizer.init_after_steps``): every rank computes e_v (Eq. 1) for a
disjoint, equal-sized chunk of the catalog through the sharded embedding tables (same
number of collective calls on every rank), the chunks are all-gathered, and
``DIGModel.initialize_tokenizer`` runs the balanced k-means tree on rank 0 and broadcasts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from dig_torchrec.config import DIGConfig, save_config
from dig_torchrec.data.batch import DIGBatch
from dig_torchrec.data.reader import ExposureReader, open_dataset
from dig_torchrec.data.schema import DatasetMeta, FeatureSchema
from dig_torchrec.distributed.env import DistEnv, init_distributed, shutdown
from dig_torchrec.distributed.planner import (
    check_sharding_config,
    describe_plan,
    feature_pooling_factors,
    plan_sharding_types,
)
from dig_torchrec.distributed.sharding import shard_model
from dig_torchrec.distributed.shared_fs import broadcast_from_rank0, check_shared_run_dir
from dig_torchrec.distributed.sync import average_batchnorm_stats
from dig_torchrec.errors import ConfigError, NumericalError
from dig_torchrec.eval_loop import run_eval_loop
from dig_torchrec.model import DIGModel, DIGOutput
from dig_torchrec.training.checkpoint import CheckpointManager, check_compatible, check_run_dir, check_sharding
from dig_torchrec.training import accounting, faults, preflight
from dig_torchrec.training.guards import check_loss_terms
from dig_torchrec.training.metrics import AUCSet, MeanSet, MetricsLogger, TrainMetrics, format_metrics, output_scalars
from dig_torchrec.training.optim import LinearWarmup, build_optimizer, sparse_optimizer_spec
from dig_torchrec.training.precision import configure_precision

logger = logging.getLogger(__name__)

FINAL_METRICS_FILE = "final_metrics.json"
RetrievalCheck = Callable[[torch.nn.Module], Dict[str, float]]


def pin_batch(batch: DIGBatch) -> DIGBatch:
    """``batch`` in pinned host memory (unchanged when it already is, e.g. from a pinning DataLoader)."""
    return batch if batch.labels.is_pinned() else batch.pin_memory()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """This process's RNG states (saved per rank in checkpoints).

    Args:
        device: this rank's compute device. On CUDA only *its* generator is saved (not
            ``get_rng_state_all()`` over every visible GPU): a resumed job may see fewer GPUs
            per process or node, and a rank only ever draws on its own device.
    """
    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    """Restore :func:`rng_state` on this rank (its CUDA generator only, when it has one).

    Checkpoints written before the per-device format hold a list of every visible GPU's
    state; the entry of this rank's device index is used when it exists, else the CUDA
    generator keeps its seed (with a warning).
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # old format: get_rng_state_all()
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            logger.warning("checkpoint holds CUDA RNG states of %d device(s); none for %s: keeping its seed",
                           len(cuda), device)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


class RNGState:
    """This rank's RNG streams as a checkpoint ``Stateful`` (:func:`rng_state` / :func:`set_rng_state`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> Dict[str, Any]:
        return rng_state(self.device)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        set_rng_state(state, self.device)


class SkippedSteps:
    """The dense optimizer's count of skipped steps as a checkpoint ``Stateful`` (saved as a bare int)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> int:  # type: ignore[override]
        return int(self.optimizer.skipped_steps)

    def load_state_dict(self, state: int) -> None:
        self.optimizer.skipped_steps = int(state)


class TrainProgress:
    """The trainer's step, epoch and last validation as a checkpoint ``Stateful`` (``train_state.json``)."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def state_dict(self) -> Dict[str, Any]:
        t = self.trainer
        reader = t.train_reader
        return {"step": t.step, "epoch": reader.epoch,
                "epoch_fraction": reader.batches_in_epoch / max(1, reader.num_batches),
                "validation": t.last_validation}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.trainer.step = int(state["step"])


class Trainer:
    """Trains DIG on one process or many (``torchrun`` / TorchX), from a resolved config.

    Args:
        cfg: the resolved config (``load_config``).
        resume: ``None`` (fresh), ``auto`` (newest complete checkpoint of ``run_dir`` if any),
            or a checkpoint directory.
        env: an already-initialised distributed environment (default: create one).
        retrieval_validator: factory ``(cfg, meta, schema, device) -> callable(model) -> metrics``
            of the beam-search validation run when ``train.val_retrieval_users > 0``
            (``dig_torchrec.retrieval.validation.RetrievalValidator``; the CLI passes it).
    """

    def __init__(
        self,
        cfg: DIGConfig,
        resume: Optional[str] = None,
        env: Optional[DistEnv] = None,
        retrieval_validator: Optional[Callable[[DIGConfig, DatasetMeta, FeatureSchema, torch.device], RetrievalCheck]] = None,
    ) -> None:
        self.cfg = cfg
        self.resume = resume
        self._make_retrieval_check = retrieval_validator
        self.retrieval_check: Optional[RetrievalCheck] = None
        self.best: Optional[Dict[str, Any]] = None  # {"step", "metric", "value"} of checkpoints/best
        # fail before joining the process group or writing anything (training/preflight.py)
        self.preflight = preflight.run_preflight(
            cfg, resume=resume, world_size=env.world_size if env else None,
            device_type=env.device.type if env else None, rank=env.rank if env else None)
        self.env = env or init_distributed(cfg.train.device, timeout_s=cfg.train.collective_timeout_s)
        self.run_dir = Path(cfg.train.run_dir)
        self.is_rank0 = self.env.is_rank_zero
        self.step = 0
        self.total_steps = 0
        self.last_validation: Dict[str, float] = {}
        self.last_checkpoint: Optional[Path] = None
        self.last_checkpoint_step = -1
        self.last_validation_step = -1
        self._step_rejected = False  # the last training forward's loss failed train.nan_policy=skip
        self._setup()

    # ================================================================== setup
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        check_run_dir(self.run_dir, cfg.train.min_free_disk_mb)  # fail now, not after hours of training
        check_shared_run_dir(self.run_dir)  # every rank writes where rank 0 renames checkpoints
        check_sharding_config(cfg.sharding, env.device.type)
        sparse_optimizer_spec(cfg.train, env.device.type)  # e.g. adam has no CPU kernel
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.train.seed)  # same dense init on every rank
        self.meta, self.schema = open_dataset(cfg.data.path, cfg.data)
        model = DIGModel(cfg, self.meta, device="meta")
        self.train_reader = accounting.RowAccounting(ExposureReader(
            cfg.data.path, "train", cfg.data, self.schema, rank=env.rank, world_size=env.world_size
        ), self.run_dir, self.schema)  # per-epoch row counts + fingerprint (training/accounting.py)
        # the planner's cost model: every row of a step (B exposure + R retrieval rows) and the
        # ids per row of each feature
        rows_per_step = cfg.data.batch_size + self.train_reader.retrieval_size
        self.model, self.plan = shard_model(model, cfg, env, rows_per_step, pooling=feature_pooling_factors(model))
        self.sharding_types = plan_sharding_types(self.plan)
        if self.is_rank0:
            logger.info("%s", describe_plan(self.plan))
        self.optimizer, self.dense_optimizer = build_optimizer(self.model, cfg.train)
        self.warmup = LinearWarmup(self.optimizer, cfg.train.warmup_steps)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.train.keep_latest_k, rank=env.rank,
                                             world_size=env.world_size, config=cfg, dataset_meta=self.meta,
                                             sharding=self.sharding_types)
        # what a checkpoint holds (training/checkpoint.py): a new piece of state is one line here
        self.checkpoint_states: Dict[str, Any] = {"model": self.model, "optim": self.optimizer}  # DCP, resharded
        self.rank_states: Dict[str, Any] = {  # this rank's own, restored at the same world size
            "reader": self.train_reader, "rng": RNGState(env.device), "skipped_steps": SkippedSteps(self.dense_optimizer)}
        self.train_state = TrainProgress(self)  # train_state.json
        # the recall objective's logQ correction needs the reader's negative-sampling distribution
        self.dig.criterion.set_sampling_distribution(self.train_reader.negative_sampling_prob(), env.device)
        self.valid_reader: Optional[ExposureReader] = None
        if cfg.train.val_retrieval_users > 0:
            if self._make_retrieval_check is None:
                raise ConfigError(
                    "config key 'train.val_retrieval_users' > 0 but this Trainer was built without a retrieval "
                    "validator (pass retrieval_validator=RetrievalValidator, as `dig train` does)"
                )
            self.retrieval_check = self._make_retrieval_check(cfg, self.meta, self.schema, env.device)
        steps_per_epoch = self.train_reader.num_batches
        self.total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
        sched = self.preflight.schedule
        if sched is not None and sched.steps_per_epoch != steps_per_epoch:  # same formula; a guard against drift
            logger.warning("preflight computed %d steps per epoch, the reader runs %d", sched.steps_per_epoch,
                           steps_per_epoch)
        if self.is_rank0:
            logger.info(
                "global batch %d exposure rows per step (data.batch_size %d x %d rank(s); + %d retrieval rows per rank); "
                "LRs are not scaled with it (train.lr=%g, train.sparse_lr=%g)",
                cfg.data.batch_size * env.world_size, cfg.data.batch_size, env.world_size,
                self.train_reader.retrieval_size, cfg.train.lr, cfg.train.sparse_lr,
            )
        self.pin_memory = cfg.train.pin_memory and env.device.type == "cuda"
        self.train_reader.reader.pin_memory = self.pin_memory  # data.num_workers > 0: the DataLoader pins
        configure_precision(self.dig, cfg.train, env.device)
        # the collision rate scans the whole SID table: read it at log steps, not in every forward
        self.dig.tokenizer.collision_rate_in_metrics = False
        self.metrics = TrainMetrics(cfg.tokenizer.num_layers)
        # DIGModel.forward calls embedding_bags(batch.sparse_features) first and hides the rest
        # behind torch.fx.wrap, so the pipeline prefetches that call's input all-to-all;
        # sid_embedding_bags (fed by SIDs computed in the step) runs unpipelined inside it.
        self.pipeline = TrainPipelineSparseDist(self.model, self.optimizer, env.device, custom_model_fwd=self._guarded_forward)
        # after the model is built: per-rank streams for dropout / sampling
        seed_everything(cfg.train.seed + 1000 * env.rank + 1)
        self._maybe_resume()  # before the first write to run_dir: a damaged checkpoint leaves it untouched
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_rank0)
        if self.is_rank0:
            save_config(cfg, self.run_dir / "config.yaml")
        logger.info(
            "rank %d: %d steps per epoch, %d steps total, starting at step %d",
            env.rank, steps_per_epoch, self.total_steps, self.step,
        )

    @property
    def dig(self) -> DIGModel:
        """The DIG module inside DMP (sharded tables, unwrapped from DDP)."""
        return self.model.module  # type: ignore[return-value]

    def _maybe_resume(self) -> None:
        # resolved once, on rank 0, and broadcast: every rank loads the same checkpoint even if
        # a newer one completes while the ranks start, or another node's view of run_dir lags
        chosen = broadcast_from_rank0(
            str(self.checkpoints.resolve(self.resume) or "") if self.is_rank0 else None)
        path = Path(chosen) if chosen else None
        if path is None:
            return
        check_compatible(path, self.cfg, self.meta, for_training=True)
        check_sharding(path, self.sharding_types)
        info = self.checkpoints.load(path, self.checkpoint_states, rank_states=self.rank_states,
                                     train_state=self.train_state)
        # EMA steps since the tokenizer init (tokenizer.freeze_after_steps, the Gumbel decay): one per step after it
        self.dig.tokenizer.restore_schedule(self.step)
        reader = self.train_reader
        if not info.rank_states_restored:
            # World size changed: the row order depends on it, so resume at the same fraction
            # of the epoch (rows are not matched one to one).
            frac = float(info.extra.get("epoch_fraction", 0.0))
            reader.set_epoch(info.epoch)
            reader.load_state_dict({"epoch": info.epoch, "batches_in_epoch": int(round(frac * reader.num_batches))})
            logger.warning(
                "checkpoint %s was written by %d ranks, this run has %d: model and optimizer are resharded exactly; "
                "the reader restarts epoch %d at %.0f%% (the row order depends on the world size)",
                path, info.world_size, self.env.world_size, info.epoch, 100 * frac,
            )
        self.last_checkpoint, self.last_checkpoint_step = path, self.step
        best = self.checkpoints.read_best()
        if best is not None and best.get("metric") == self.cfg.train.select_metric and int(best["step"]) <= self.step:
            self.best = best
        logger.info("resumed from %s at step %d (epoch %d)", path, self.step, reader.epoch)

    # ================================================================== step
    def _guarded_forward(self, batch: Optional[DIGBatch]) -> Tuple[torch.Tensor, DIGOutput]:
        """Forward with the NaN/inf policy (``train.nan_policy``) applied before backward.

        ``skip``: backward runs on a zero loss over the dense parameters only, so neither the
        fused (in-backward) sparse optimizer nor Adam moves, and DDP still sees every
        parameter's gradient; :meth:`_run_segment` then drops the step's buffer updates
        (``DIGModel.on_step_skipped``) instead of applying them.
        """
        training = self.model.training
        loss, output = self.model(batch)
        if not training:
            return loss, output
        # all ranks agree; raises NumericalError under nan_policy=error (training/guards.py)
        self._step_rejected = check_loss_terms(self.step + 1, output.losses, self.cfg.train.nan_policy)
        if self._step_rejected:
            self.dense_optimizer.skip_next = True
            dense = [p for p in self.dense_optimizer.params.values() if p.requires_grad]
            loss = torch.stack([p.sum() for p in dense]).sum() * 0.0  # no path to the embedding tables
        return loss, output

    # ================================================================== tokenizer init
    @torch.no_grad()
    def _catalog_e_v(self, chunk_size: int = 4096) -> torch.Tensor:
        """e_v ``[num_items, F*d]`` of the whole catalog through the sharded tables, all-gathered.

        Every rank embeds ``ceil(num_items / world)`` items (padded with item 0), in the same
        number of sub-batches, so the sharded tables' all-to-alls line up across ranks.
        """
        world, rank = self.env.world_size, self.env.rank
        items = self.train_reader.items
        n = items.num_items
        per_rank = -(-n // world)
        ids = torch.arange(rank * per_rank, (rank + 1) * per_rank)
        ids = torch.where(ids < n, ids, torch.zeros_like(ids))
        was_training = self.model.training
        self.model.eval()
        local = self.dig.corpus_item_representations(items, chunk_size, ids=ids)  # [per_rank, F*d]
        self.model.train(was_training)
        if world > 1:
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local.contiguous())
            return torch.cat(gathered)[:n]
        return local[:n]

    @torch.no_grad()
    def initialize_tokenizer(self, chunk_size: int = 4096) -> None:
        """Balanced k-means tree init on the catalog's e_v (rank 0, broadcast)."""
        t0 = time.perf_counter()
        self.dig.initialize_tokenizer(self._catalog_e_v(chunk_size))
        logger.info("tokenizer initialised at step %d (%.1fs)", self.step, time.perf_counter() - t0)

    @property
    def seal_step(self) -> int:
        """The step at which ``tokenizer.freeze_after_steps`` freezes the codebooks (0: never)."""
        tok = self.cfg.tokenizer
        if tok.frozen or tok.freeze_after_steps <= 0 or tok.seal == "none" or self.dig.rank_only:
            return 0
        return tok.init_after_steps + tok.freeze_after_steps

    def _seal_if_due(self) -> None:
        if self.seal_step and self.step == self.seal_step and self.dig.tokenizer.is_initialized:
            self.seal_tokenizer()

    @torch.no_grad()
    def seal_tokenizer(self, chunk_size: int = 4096) -> None:
        """At the freeze: every item's SID from the frozen codebooks, collisions resolved (``DIGTokenizer.seal``)."""
        t0 = time.perf_counter()
        tokenizer = self.dig.tokenizer
        # the whole-catalog e_v pass only when something is re-assigned (seal=auto below the threshold keeps the table)
        rate = tokenizer.seal(self._catalog_e_v(chunk_size) if tokenizer.seal_mode() else None)
        self.logger.log(self.step, {"tokenizer/sealed_collision_rate": rate}, kind="tokenizer")
        logger.info("tokenizer SIDs sealed at step %d (%.1fs)", self.step, time.perf_counter() - t0)

    # ================================================================== validation
    @torch.no_grad()
    def validate(self, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Rank AUC, per-layer recall AUC and loss terms on the valid split (all ranks).

        Args:
            max_batches: cap per rank (default ``train.val_max_batches``; 0 = whole split).
        """
        cfg = self.cfg
        if self.valid_reader is None:
            self.valid_reader = ExposureReader(
                cfg.data.path, "valid", cfg.data, self.schema, rank=self.env.rank, world_size=self.env.world_size,
                with_retrieval=False, shuffle=False,
            )
        reader = self.valid_reader
        reader.set_epoch(0)
        limit = max_batches if max_batches is not None else cfg.train.val_max_batches
        n_batches = reader.num_batches if not limit else min(limit, reader.num_batches)
        average_batchnorm_stats(self.model)  # eval mode reads them: same values on every rank
        aucs, means = AUCSet(cfg.tokenizer.num_layers), MeanSet()  # binned AUCs (training/metrics.py)
        keys: List[str] = []

        def accumulate(out: DIGOutput) -> None:
            aucs.update(out)
            scalars = {k: v for k, v in output_scalars(out).items() if k.startswith("loss/")}
            keys[:] = keys or sorted(scalars)
            means.update(scalars)

        was_training = self.model.training
        t0 = time.perf_counter()
        run_eval_loop(self.model, reader, n_batches, lambda b: self.model(b)[1], accumulate, device=self.env.device)
        result = {f"valid/{k}": v for k, v in aucs.compute().items()}
        result.update({f"valid/{k}": v for k, v in means.compute(keys).items()})
        if self.retrieval_check is not None and self.dig.tokenizer.is_initialized:
            self.model.eval()  # the check scores with the model's eval-mode forward
            result.update({f"valid/{k}": v for k, v in self.retrieval_check(self.dig).items()})
        result["valid/seconds"] = time.perf_counter() - t0
        self.model.train(was_training)
        self.last_validation = result
        self.last_validation_step = self.step
        self.logger.log(self.step, result, kind="valid")
        return result

    # ================================================================== checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``run_dir/checkpoints/step-<step>`` (collective)."""
        average_batchnorm_stats(self.model)  # one value per replicated buffer in the checkpoint
        path = self.checkpoints.save(self.step, self.checkpoint_states, rank_states=self.rank_states,
                                     train_state=self.train_state)
        self.last_checkpoint, self.last_checkpoint_step = path, self.step
        return path

    # ================================================================== loop
    def _event_steps(self) -> List[int]:
        cfg = self.cfg.train
        out = [self.total_steps]
        for every in (cfg.checkpoint_every, cfg.val_every, cfg.log_every):
            if every > 0:
                out.append((self.step // every + 1) * every)
        if self.cfg.tokenizer.init_after_steps > self.step:
            out.append(self.cfg.tokenizer.init_after_steps)
        if self.seal_step > self.step:
            out.append(self.seal_step)
        reader = self.train_reader
        left_in_epoch = reader.num_batches - reader.batches_in_epoch
        out.append(self.step + max(left_in_epoch, 1) if left_in_epoch > 0 else self.step + reader.num_batches)
        return [s for s in out if s > self.step]

    def _segment(self, source: Iterator[DIGBatch], n: int) -> Iterator[DIGBatch]:
        """The next ``n`` batches, pinned on CUDA (``train.pin_memory``).

        Pinned here, as the pipeline pulls them, and not in a thread ahead of it: the reader
        must not yield past a segment's end (its position is checkpointed). A pinned batch
        makes the pipeline's ``to(device, non_blocking=True)`` a real asynchronous copy on
        its memcpy stream; from pageable memory it would be synchronous.
        """
        for _ in range(n):
            batch = next(source, None)
            if batch is None:
                return
            yield pin_batch(batch) if self.pin_memory else batch

    def _epoch_iterator(self) -> Iterator[DIGBatch]:
        reader = self.train_reader
        if reader.epoch_done:
            reader.set_epoch(reader.epoch + 1)
        return iter(reader)

    def _handle_events(self, epoch_done: bool, init_only: bool = False) -> None:
        cfg = self.cfg.train
        if not self.dig.tokenizer.is_initialized and self.step >= self.cfg.tokenizer.init_after_steps:
            self.initialize_tokenizer()
        if init_only:
            return
        self._seal_if_due()
        if cfg.log_every > 0 and self.step % cfg.log_every == 0 and self.step > 0:
            self._log_train()
        validated = (cfg.val_every > 0 and self.step % cfg.val_every == 0 and self.step > 0) or (
            cfg.val_every == 0 and epoch_done)
        if validated:
            self.validate()
        if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0 and self.step > 0:
            self.save_checkpoint()
        if validated:
            self._track_best()

    def _track_best(self) -> None:
        """Point ``checkpoints/best`` at this step's checkpoint if its ``train.select_metric`` is the best yet.

        Called after a validation; saves a checkpoint at this step first if there is none.
        The metric is the same on every rank (validation is all-reduced), so every rank
        takes the same branch of this collective code.
        """
        metric = self.cfg.train.select_metric
        value = self.last_validation.get(f"valid/{metric}")
        if value is None or not math.isfinite(float(value)) or not self.dig.tokenizer.is_initialized:
            return
        if self.best is not None and float(value) <= float(self.best["value"]):
            return
        # a checkpoint at this step in this run (after a resume from another run's final
        # checkpoint, the last one lives in that run's directory: ``best`` must not point there)
        here = self.last_checkpoint is not None and self.last_checkpoint.parent == self.checkpoints.dir
        if self.last_checkpoint_step != self.step or not here:
            self.save_checkpoint()
        assert self.last_checkpoint is not None
        self.checkpoints.mark_best(self.last_checkpoint, metric, float(value), self.step)
        self.best = {"step": self.step, "metric": metric, "value": float(value)}

    def _log_train(self) -> None:
        tokenizer = self.dig.tokenizer
        values = self.metrics.compute(extra={"tokenizer/collision_rate": tokenizer.collision_rate()})
        values["train/skipped_steps"] = float(self.dense_optimizer.skipped_steps)
        values["train/lr_factor"] = self.warmup.factor(self.step)
        self.logger.log(self.step, values, kind="train")
        self._last_train = values

    def train(self) -> Dict[str, float]:
        """Run to ``train.max_steps`` (or ``train.epochs``); returns the final metrics (rank 0 writes them)."""
        self._last_train: Dict[str, float] = {}
        self.model.train()
        bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not self.is_rank0, desc="train",
            unit="step", mininterval=1.0 if os.isatty(2) else 30.0, dynamic_ncols=True,
        )
        t_start = time.perf_counter()
        steps_run = 0
        # due before the first step: tokenizer.init_after_steps=0 (other events at this step
        # already happened before the checkpoint we resumed from)
        if self.step < self.total_steps:
            self._handle_events(epoch_done=False, init_only=True)
        source = self._epoch_iterator()
        try:
            while self.step < self.total_steps:
                target = min(self._event_steps())
                self.pipeline.attach(self.model)
                for _ in self._run_segment(self._segment(source, target - self.step)):
                    steps_run += 1
                    bar.update(1)
                    if self._last_train and bar.n % 10 == 0:
                        bar.set_postfix(loss=f"{self._last_train.get('train/loss/total', float('nan')):.4f}",
                                        auc=f"{self._last_train.get('train/rank_auc', float('nan')):.3f}")
                self.pipeline.detach()  # drained: events call the model directly
                reader = self.train_reader
                epoch_done = reader.epoch_done
                if self.step < target and not epoch_done:
                    raise RuntimeError(f"reader ran dry at step {self.step} before the epoch ended")
                if epoch_done and self.step < self.total_steps:
                    self._handle_events(epoch_done=True)
                    source = self._epoch_iterator()
                elif self.step < self.total_steps:
                    self._handle_events(epoch_done=False)
            # final: validation and checkpoint unless the last event already did them
            if self.step == self.total_steps:  # a run ending at the freeze step still serves a sealed table
                self._seal_if_due()
            if self.last_validation_step != self.step:
                self.validate()
            if self.last_checkpoint_step != self.step:
                self.save_checkpoint()
            self._track_best()
            if self.metrics.steps:
                self._log_train()
        finally:
            bar.close()
        elapsed = time.perf_counter() - t_start
        summary = {
            **self.last_validation,
            **{k: v for k, v in self._last_train.items() if k.startswith("train/")},
            "perf/samples_per_s": self._last_train.get("perf/samples_per_s", float("nan")),
            "perf/train_seconds": elapsed,
            "steps": float(self.step),
        }
        if self.is_rank0:
            record = {
                "step": self.step,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "world_size": self.env.world_size,
                "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()},
            }
            (self.run_dir / FINAL_METRICS_FILE).write_text(json.dumps(record, indent=2))
            logger.info("done at step %d: %s", self.step, format_metrics(self.last_validation))
            logger.info("checkpoint: %s", self.last_checkpoint)
        return summary

    def _run_segment(self, batches: Iterator[DIGBatch]) -> Iterator[None]:
        while True:
            self.warmup.apply(self.step)
            self.dense_optimizer.step_index = self.step + 1
            try:
                output = self.pipeline.progress(batches)
            except StopIteration:
                return
            self.step += 1
            # the step's buffer updates (tokenizer EMA, SID table, u2t statistics, BN statistics)
            if self._step_rejected:
                self.dig.on_step_skipped(output)
            else:
                self.dig.on_step_accepted(output)
            faults.fault_point("step", self.step, self.env.rank)  # test-only fault injection
            self.metrics.update(output)
            yield None

    def close(self) -> None:
        """Flush logs and leave the process group (if this trainer created it)."""
        self.logger.close()
        shutdown(self.env)


def read_final_metrics(run_dir: str | Path) -> Dict[str, Any]:
    """``run_dir/final_metrics.json`` written at the end of :meth:`Trainer.train`."""
    return json.loads((Path(run_dir) / FINAL_METRICS_FILE).read_text())
