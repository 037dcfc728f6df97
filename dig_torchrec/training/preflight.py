"""Checks that run before any training starts, so a bad run fails in seconds, not after hours.

:func:`run_preflight` is called by :class:`~dig_torchrec.training.trainer.Trainer` before
it joins the process group or writes anything to ``run_dir``. Each check raises a
:class:`~dig_torchrec.errors.DIGError` whose one-line message names the config key, the
file/column or the split at fault:

============================  =========================================================
check                          error
============================  =========================================================
dataset opens and validates    ``DataError`` naming file + column (+ row) (data layer)
K^L >= catalog                 ``ConfigError`` naming ``tokenizer.num_codes/num_layers``
d_c matches the data           ``ConfigError`` naming ``data.u2i_dim``
sharding valid on the device   ``ConfigError`` naming ``sharding.constraints.<table>``
every rank gets rows           ``ConfigError`` naming the split and ``data.num_workers``
CUDA present if requested      ``ConfigError`` naming ``train.device``
schedule can fire              ``ConfigError`` naming ``tokenizer.init_after_steps`` /
                               ``train.checkpoint_every`` / ``train.val_every``
``--resume`` target            ``CheckpointError``: missing dir, incomplete, other config
``run_dir`` writable, disk     ``ConfigError`` naming ``run_dir`` / ``train.min_free_disk_mb``
============================  =========================================================

The order matters: everything that can fail runs before the first write (the run-dir
probe is last), so a rejected command leaves an existing run directory untouched.
(``data.batch_size=0`` and other impossible scalars are rejected even earlier, by
``load_config``; :func:`run_preflight` repeats that check for configs built in code.)
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from dig_torchrec.config import DIGConfig, validate
from dig_torchrec.data.reader import assign_slots, list_row_groups, open_dataset
from dig_torchrec.data.schema import DatasetMeta, FeatureSchema
from dig_torchrec.distributed.planner import embedding_tables, resolve_sharding_types
from dig_torchrec.errors import ConfigError
from dig_torchrec.model import DIGModel
from dig_torchrec.modules.balanced_kmeans import check_catalog_fits
from dig_torchrec.training.checkpoint import CheckpointManager, check_compatible, check_run_dir

logger = logging.getLogger(__name__)


@dataclass
class PreflightReport:
    """What the checks found (logged on rank 0; handy in tests).

    Args:
        meta: the dataset metadata.
        schema: the feature layout for ``data.history_length``.
        slot_rows: split -> rows of each reader slot (rank-major).
        resume_from: the checkpoint ``--resume`` resolves to, or None.
        free_disk_mb: free space on the run directory's disk.
        schedule: steps per epoch, total steps and the resolved event steps.
    """

    meta: DatasetMeta
    schema: FeatureSchema
    slot_rows: Dict[str, List[int]] = field(default_factory=dict)
    resume_from: Optional[Path] = None
    free_disk_mb: int = 0
    schedule: Optional["Schedule"] = None


def _device_type(preference: str) -> str:
    """``cpu`` or ``cuda`` as :func:`dig_torchrec.distributed.env.select_device` will choose."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def check_catalog(cfg: DIGConfig, meta: DatasetMeta) -> None:
    """K^L >= catalog size: the SID tree must have a leaf for every item (paper §3.2)."""
    check_catalog_fits(meta.num_items, cfg.tokenizer.num_codes, cfg.tokenizer.num_layers)


def check_u2i_dim(cfg: DIGConfig, meta: DatasetMeta) -> None:
    """``data.u2i_dim`` (when set) must equal the dataset's d_c (meta.json ``u2i_dim``)."""
    want = cfg.data.u2i_dim
    if want != 0 and want != meta.u2i_dim:
        raise ConfigError(
            f"config key 'data.u2i_dim' = {want} but the dataset at '{cfg.data.path}' has d_c = {meta.u2i_dim} "
            f"(meta.json u2i_dim); set data.u2i_dim={meta.u2i_dim} or 0"
        )


def check_sharding_constraints(cfg: DIGConfig, meta: DatasetMeta, device_type: str) -> None:
    """Every table's allowed sharding types exist and run on ``device_type`` (row_wise needs CUDA).

    Builds the model on ``meta`` (no memory) only to learn its table names.
    """
    model = DIGModel(cfg, meta, device="meta")
    resolve_sharding_types(cfg.sharding, embedding_tables(model), device_type)


def check_work_split(cfg: DIGConfig, world_size: int, split: str, *, required: bool = True) -> List[int]:
    """Every reader slot (``world_size x max(1, data.num_workers)``) gets at least one row group.

    The reader assigns whole row groups to slots; an empty slot means a rank (or worker)
    that only steps on padding. Returns the rows of each slot.

    Args:
        cfg: the resolved config.
        world_size: ranks in the job.
        split: ``train`` (required) or ``valid`` (a warning only: validation still aggregates).
        required: raise instead of warning.
    """
    if not required and not (Path(cfg.data.path) / split).exists():
        return []
    groups = list_row_groups(Path(cfg.data.path) / split)
    workers = max(1, cfg.data.num_workers)
    slots = world_size * workers
    rows = [sum(g.num_rows for g in s) for s in assign_slots(groups, slots)]
    empty = [i for i, r in enumerate(rows) if r == 0]
    if empty:
        rank, worker = divmod(empty[0], workers)
        msg = (
            f"split '{split}' of '{cfg.data.path}' has {len(groups)} row group(s) but the job reads it with "
            f"{slots} slots (world size {world_size} x max(1, data.num_workers={cfg.data.num_workers})): rank {rank}"
            f"{f' worker {worker}' if workers > 1 else ''} would get no rows; use at most {len(groups)} slots or "
            f"rewrite the split with smaller row groups"
        )
        if required:
            raise ConfigError(msg)
        logger.warning("%s", msg)
    return rows


def check_device(cfg: DIGConfig) -> None:
    """``train.device=cuda`` needs a CUDA device: fail in one line instead of at the first kernel."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "config key 'train.device' = 'cuda' but no CUDA device is available on this host "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); check the node's GPUs and "
            "driver, or use train.device=cpu"
        )


@dataclass
class Schedule:
    """The run's length in steps, derived from the data and the world size.

    Args:
        world_size: ranks in the job.
        batch_size: exposure rows per step and rank (``data.batch_size``).
        global_batch: exposure rows per step over all ranks.
        steps_per_epoch: steps every rank runs per epoch (the reader's ``num_batches``).
        total_steps: ``train.max_steps`` or ``train.epochs x steps_per_epoch``.
        events: resolved event key -> step interval (or step, for the tokenizer init).
    """

    world_size: int
    batch_size: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    events: Dict[str, int] = field(default_factory=dict)


# (step key, samples key, epochs key): the data forms set the step key
_SCHEDULE_KEYS: Tuple[Tuple[str, str, str], ...] = (
    ("tokenizer.init_after_steps", "train.tokenizer_init_after_samples", "train.tokenizer_init_after_epochs"),
    ("train.checkpoint_every", "train.checkpoint_every_samples", "train.checkpoint_every_epochs"),
    ("train.val_every", "train.val_every_samples", "train.val_every_epochs"),
)


def _get(cfg: DIGConfig, key: str) -> float:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: DIGConfig, key: str, value: float) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def steps_per_epoch(cfg: DIGConfig, slot_rows: List[int]) -> int:
    """Steps per epoch as :class:`~dig_torchrec.data.reader.ExposureReader` runs them.

    Every slot yields ``max over slots of ceil(rows / batch_size)`` batches and a rank
    reads ``max(1, data.num_workers)`` slots.

    Args:
        cfg: the resolved config.
        slot_rows: rows of every reader slot (:func:`check_work_split`).
    """
    per_slot = max([1, *(math.ceil(r / cfg.data.batch_size) for r in slot_rows)])
    return max(1, cfg.data.num_workers) * per_slot


def resolve_schedule(cfg: DIGConfig, world_size: int, slot_rows: List[int],
                     warnings: Optional[List[str]] = None) -> Schedule:
    """Turn the schedule keys given in samples / epochs into steps, and check every event can fire.

    ``train.<event>_samples`` becomes ``ceil(samples / global batch)`` steps and
    ``train.<event>_epochs`` ``ceil(fraction x steps per epoch)`` steps; the step key
    (``tokenizer.init_after_steps``, ``train.checkpoint_every``, ``train.val_every``) is
    overwritten and the data form cleared, so ``cfg`` afterwards holds steps only.

    An event that can never fire in an epoch-driven run (``train.max_steps=0``) is a
    :class:`ConfigError` naming the key: the tokenizer init at or after the last step
    (the recall path would train with weight 0 and zero codebooks), a checkpoint or
    validation interval longer than the run. With ``train.max_steps`` set it is a warning
    (short runs on purpose, e.g. smoke tests).

    Args:
        cfg: the resolved config (modified in place).
        world_size: ranks in the job.
        slot_rows: rows of every train reader slot.
    """
    spe = steps_per_epoch(cfg, slot_rows)
    global_batch = cfg.data.batch_size * world_size
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * spe
    sched = Schedule(world_size, cfg.data.batch_size, global_batch, spe, total)
    for step_key, samples_key, epochs_key in _SCHEDULE_KEYS:
        samples, epochs = _get(cfg, samples_key), _get(cfg, epochs_key)
        if samples and epochs:
            raise ConfigError(f"config keys '{samples_key}' and '{epochs_key}' are both set; give '{step_key}' one way")
        if samples or epochs:
            steps = math.ceil(samples / global_batch) if samples else math.ceil(epochs * spe)
            steps = max(1, steps)
            given = f"{samples_key}={samples}" if samples else f"{epochs_key}={epochs}"
            logger.info("%s -> %s=%d (global batch %d, %d steps per epoch)", given, step_key, steps, global_batch, spe)
            _set(cfg, step_key, steps)
            _set(cfg, samples_key, 0)
            _set(cfg, epochs_key, 0.0)
        sched.events[step_key] = int(_get(cfg, step_key))
    where = (f"the run has {total} steps ({'train.max_steps' if cfg.train.max_steps > 0 else f'{cfg.train.epochs} epoch(s)'}"
             f" x {spe} steps per epoch at world size {world_size}, global batch {global_batch} = data.batch_size "
             f"{cfg.data.batch_size} x {world_size} rank(s))")
    problems = []
    init = sched.events["tokenizer.init_after_steps"]
    if init > 0 and init >= total:
        problems.append(
            f"config key 'tokenizer.init_after_steps' = {init} can never fire: {where}; the tokenizer would never "
            "initialise (recall/commit/sem/u2t weighted 0, zero codebooks). Lower it or give it in data: "
            "train.tokenizer_init_after_epochs=0.1 or train.tokenizer_init_after_samples=N"
        )
    for key, short in (("train.checkpoint_every", "checkpoint_every"), ("train.val_every", "val_every")):
        every = sched.events[key]
        if every > total:
            problems.append(
                f"config key '{key}' = {every} can never fire: {where}. Lower it or give it in data: "
                f"train.{short}_epochs=0.25 or train.{short}_samples=N"
            )
    for msg in problems:
        if cfg.train.max_steps == 0:
            raise ConfigError(msg)
        if warnings is not None:  # the caller logs them once every check has passed
            warnings.append(msg)
        else:
            logger.warning("%s", msg)
    return sched


def check_resume(cfg: DIGConfig, meta: DatasetMeta, resume: Optional[str]) -> Optional[Path]:
    """Resolve ``--resume`` and check the checkpoint's model config against this one.

    Raises :class:`CheckpointError` for a missing or incomplete directory and for a
    checkpoint whose model keys (shapes) or table sizes differ, naming the key.
    """
    path = CheckpointManager(cfg.train.run_dir, cfg.train.keep_latest_k).resolve(resume)
    if path is not None:
        check_compatible(path, cfg, meta, for_training=True)
    return path


def check_run_dir_writable(cfg: DIGConfig) -> int:
    """``run_dir`` can be created and written, and its disk has ``train.min_free_disk_mb`` free.

    Returns the free space in MB.
    """
    check_run_dir(cfg.train.run_dir, cfg.train.min_free_disk_mb)
    return int(shutil.disk_usage(cfg.train.run_dir).free // (1 << 20))


def run_preflight(
    cfg: DIGConfig,
    *,
    resume: Optional[str] = None,
    world_size: Optional[int] = None,
    device_type: Optional[str] = None,
    rank: Optional[int] = None,
) -> PreflightReport:
    """Run every check (see the module docstring); raise the first failure.

    Args:
        cfg: the resolved config.
        resume: the ``--resume`` argument (None, ``auto`` or a checkpoint directory).
        world_size: ranks in the job; default the launcher's ``WORLD_SIZE`` (1 without one).
        device_type: ``cpu``/``cuda``; default what ``train.device`` resolves to.
        rank: this process's rank; default the launcher's ``RANK`` (0 without one). Only rank 0
            resolves ``--resume`` here: on other nodes the run directory may not be visible yet
            (the trainer checks that it is shared and broadcasts rank 0's choice).
    """
    validate(cfg)  # impossible scalars (batch size 0, ...) also for configs built in code, not by load_config
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = rank if rank is not None else int(os.environ.get("RANK", "0") or 0)
    if device_type is None:
        check_device(cfg)
    device = device_type or _device_type(cfg.train.device)
    meta, schema = open_dataset(cfg.data.path, cfg.data)
    check_catalog(cfg, meta)
    check_u2i_dim(cfg, meta)
    check_sharding_constraints(cfg, meta, device)
    report = PreflightReport(meta=meta, schema=schema)
    report.slot_rows["train"] = check_work_split(cfg, world, "train", required=True)
    report.slot_rows["valid"] = check_work_split(cfg, world, "valid", required=False)
    schedule_warnings: List[str] = []
    report.schedule = resolve_schedule(cfg, world, report.slot_rows["train"], schedule_warnings)
    if rank == 0:
        report.resume_from = check_resume(cfg, meta, resume)
    report.free_disk_mb = check_run_dir_writable(cfg)  # last: the first check that writes
    for msg in schedule_warnings:  # after every error: an error stays the first line
        logger.warning("%s", msg)
    logger.debug(
        "preflight ok: %d train rows over %d slots, resume=%s, %d MB free",
        sum(report.slot_rows["train"]), len(report.slot_rows["train"]), report.resume_from, report.free_disk_mb,
    )
    return report
