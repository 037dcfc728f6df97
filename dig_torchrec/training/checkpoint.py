"""Atomic, reshardable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint (``run_dir/checkpoints/step-N/``)::

    .metadata, __<rank>_0.distcp   DCP: sharded tables + dense params ("model.*"), fused + dense
                                   optimizer state ("optim.*"), codebooks / EMA buffers (model buffers)
    config.yaml                    the resolved DIGConfig of the run
    dataset_meta.json              DatasetMeta of the training data (inference needs no dataset)
    train_state.json               step, epoch, world size, per-table sharding types, metrics
    rank_state/rank-<r>.pt         per-rank reader position and RNG state
    COMPLETE                       written last: a directory without it is never loaded

Saving writes into ``checkpoints/.tmp-step-N/`` and renames it to ``step-N`` only after
every rank has finished and ``COMPLETE`` is on disk, so a crash mid-save leaves the
previous checkpoint as the newest complete one. The run directory must be on a file
system every rank sees (one node: any local disk; many nodes: a shared mount).

DCP stores every tensor with its global shape and shard offsets, so a checkpoint
saved on 2 ranks loads on 1 (or 8): each rank reads the slices its new plan owns.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml

from dig_torchrec.config import DIGConfig, config_from_dict, flatten, save_config
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import CheckpointError, ConfigError, NumericalError
from dig_torchrec.training.faults import fault_point

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
CONFIG_FILE = "config.yaml"
DATASET_META_FILE = "dataset_meta.json"
TRAIN_STATE_FILE = "train_state.json"
RANK_STATE_DIR = "rank_state"
_STEP_RE = re.compile(r"^step-(\d+)$")

# Config keys that fix the shapes or meaning of the saved tensors: a checkpoint whose
# value differs cannot be loaded into this model.
MODEL_KEYS: Tuple[str, ...] = (
    "data.history_length",
    "model.embedding_dim",
    "model.din_hidden",
    "model.cross_layers",
    "model.cross_low_rank",
    "model.num_experts",
    "model.expert_hidden",
    "tokenizer.num_layers",
    "tokenizer.num_codes",
    "tokenizer.encoder_layers",
    "tokenizer.encoder_heads",
    "tokenizer.include_item_id",
    "u2t.hidden_dim",
)
# Keys that fix the optimizer state layout (checked only when resuming training).
OPTIMIZER_KEYS: Tuple[str, ...] = ("train.sparse_optimizer",)
# Dataset metadata that fixes table sizes.
META_KEYS: Tuple[str, ...] = ("num_users", "num_items", "user_features", "context_features", "item_features", "u2i_dim")


@dataclass
class CheckpointInfo:
    """What ``train_state.json`` and this rank's ``rank_state`` file hold.

    Args:
        path: the checkpoint directory.
        step: optimizer steps completed when it was written.
        epoch: the epoch the next step belongs to.
        world_size: ranks that wrote it.
        sharding: table name -> sharding type of the plan that wrote it.
        extra: anything else the trainer stored (metrics, epoch progress).
        rank_state: this rank's reader position / RNG state, or None when the world size
            changed (the trainer then decides how to restart the reader).
    """

    path: Path
    step: int
    epoch: int
    world_size: int
    sharding: Dict[str, str] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    rank_state: Optional[Dict[str, Any]] = None


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def is_complete(path: str | Path) -> bool:
    """A checkpoint directory counts only once its ``COMPLETE`` marker exists."""
    p = Path(path)
    return (p / COMPLETE).is_file() and (p / ".metadata").is_file()


def read_train_state(path: str | Path) -> Dict[str, Any]:
    p = Path(path) / TRAIN_STATE_FILE
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{p}: missing (not a dig checkpoint directory?)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON: {e}") from e


def read_config(path: str | Path) -> DIGConfig:
    """The resolved config stored beside a checkpoint."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (not a dig checkpoint directory?)")
    try:
        return config_from_dict(yaml.safe_load(p.read_text()) or {})
    except ConfigError as e:
        raise CheckpointError(f"{p}: stored config is invalid: {e}") from e


def read_dataset_meta(path: str | Path) -> DatasetMeta:
    p = Path(path) / DATASET_META_FILE
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (not a dig checkpoint directory?)")
    d = json.loads(p.read_text())
    known = set(DatasetMeta.__dataclass_fields__)
    return DatasetMeta(**{k: v for k, v in d.items() if k in known})


def check_compatible(
    path: str | Path,
    cfg: DIGConfig,
    meta: Optional[DatasetMeta] = None,
    *,
    for_training: bool = True,
) -> None:
    """Raise :class:`CheckpointError` naming the first key where ``path`` and ``cfg`` disagree.

    Args:
        path: a checkpoint directory.
        cfg: the config the model is built from now.
        meta: the dataset the model is built for now (table sizes).
        for_training: also compare optimizer keys (the optimizer state is loaded too).
    """
    saved = flatten(read_config(path).to_dict())
    now = flatten(cfg.to_dict())
    keys = MODEL_KEYS + (OPTIMIZER_KEYS if for_training else ())
    for key in keys:
        if saved.get(key) != now.get(key):
            raise CheckpointError(
                f"checkpoint {path} is incompatible: config key '{key}' is {saved.get(key)!r} in the checkpoint "
                f"but {now.get(key)!r} now"
            )
    if meta is not None:
        saved_meta = read_dataset_meta(path)
        for key in META_KEYS:
            a, b = getattr(saved_meta, key), getattr(meta, key)
            if a != b:
                raise CheckpointError(
                    f"checkpoint {path} is incompatible: dataset meta key '{key}' is {a!r} in the checkpoint "
                    f"but {b!r} in the dataset now"
                )


def check_state_shapes(path: str | Path, state: Mapping[str, Any], prefix: str = "model") -> None:
    """Compare global tensor shapes of ``state`` with the DCP metadata; name the first mismatch.

    Args:
        path: a checkpoint directory.
        state: the (possibly sharded) state dict that is about to be loaded.
        prefix: the top-level key ``state`` was saved under.
    """
    md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, value in state.items():
        fqn = f"{prefix}.{name}"
        if not isinstance(value, torch.Tensor):
            continue
        if fqn not in md:
            raise CheckpointError(f"checkpoint {path} has no tensor '{fqn}' (saved by a different model version?)")
        saved_size = getattr(md[fqn], "size", None)
        if saved_size is not None and tuple(saved_size) != tuple(value.size()):
            raise CheckpointError(
                f"checkpoint {path}: tensor '{fqn}' has shape {tuple(saved_size)} in the checkpoint but "
                f"{tuple(value.size())} in this model"
            )


def check_sharding(path: str | Path, current: Mapping[str, str]) -> None:
    """Refuse a checkpoint whose tables were data-parallel where they are sharded now (or back).

    Args:
        path: a checkpoint directory.
        current: table -> sharding type of the plan that will load it.
    """
    saved = read_train_state(path).get("sharding", {})
    for table, now in current.items():
        before = saved.get(table)
        if before is None:
            continue
        if (before == "data_parallel") != (now == "data_parallel"):
            raise CheckpointError(
                f"checkpoint {path}: table '{table}' was {before} there but is {now} in this plan; pin "
                f"config key 'sharding.constraints.{table}' to the same kind (data_parallel or sharded) as the checkpoint"
            )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_run_dir(run_dir: str | Path, min_free_mb: int) -> None:
    """Fail before training when ``run_dir`` is unwritable or its disk is nearly full.

    Args:
        run_dir: the run directory (created if missing).
        min_free_mb: ``train.min_free_disk_mb``.
    """
    p = Path(run_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"config key 'run_dir' = '{run_dir}': directory is not writable ({e.strerror or e})") from e
    free_mb = shutil.disk_usage(p).free // (1 << 20)
    if free_mb < min_free_mb:
        raise ConfigError(
            f"config key 'run_dir' = '{run_dir}': only {free_mb} MB free on its disk, below "
            f"train.min_free_disk_mb={min_free_mb}; free space or lower the limit"
        )


def _all_finite(tensors: Sequence[torch.Tensor]) -> Optional[int]:
    """Index of the first local tensor with a NaN/inf, or None."""
    for i, t in enumerate(tensors):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return i
    return None


def _local_tensors(state: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, torch.Tensor]]:
    out: List[Tuple[str, torch.Tensor]] = []
    for k, v in state.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(_local_tensors(v, name + "."))
        elif hasattr(v, "local_shards"):  # ShardedTensor
            out.extend((name, s.tensor) for s in v.local_shards())
        elif isinstance(v, torch.Tensor):
            out.append((name, v))
    return out


BEST_LINK = "best"  # checkpoints/best -> step-N, the best checkpoint by train.select_metric
BEST_FILE = "best.json"


class CheckpointManager:
    """Writes, lists, prunes and loads the checkpoints of one run directory.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        keep_latest_k: complete checkpoints kept after each save (older ones are deleted).
        rank: this process's rank.
        world_size: ranks in the job.
    """

    def __init__(self, run_dir: str | Path, keep_latest_k: int = 3, *, rank: int = 0, world_size: int = 1) -> None:
        if keep_latest_k <= 0:
            raise ConfigError(f"config key 'train.keep_latest_k' = {keep_latest_k}; must be > 0")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_latest_k = keep_latest_k
        self.rank = rank
        self.world_size = world_size

    # ------------------------------------------------------------------ listing
    def complete_checkpoints(self) -> List[Tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and is_complete(p):
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None."""
        done = self.complete_checkpoints()
        return done[-1][1] if done else None

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """Map ``--resume`` to a checkpoint directory.

        Args:
            resume: None/"" (start fresh), ``auto`` (newest complete checkpoint of this run,
                or fresh if there is none), or a path to a checkpoint directory.
        """
        if not resume:
            return None
        if resume == "auto":
            path = self.latest()
            if path is None:
                logger.info("--resume auto: no complete checkpoint under %s; starting fresh", self.dir)
            return path
        p = Path(resume)
        if not p.is_dir():
            raise CheckpointError(f"--resume {resume}: checkpoint directory does not exist")
        if not is_complete(p):
            raise CheckpointError(f"--resume {resume}: checkpoint is incomplete (no {COMPLETE} marker); it was interrupted while saving")
        return p

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        state: Dict[str, Any],
        *,
        config: DIGConfig,
        dataset_meta: Optional[DatasetMeta] = None,
        epoch: int = 0,
        sharding: Optional[Mapping[str, str]] = None,
        rank_state: Optional[Dict[str, Any]] = None,
        extra: Optional[Dict[str, Any]] = None,
        check_finite: bool = True,
    ) -> Path:
        """Write checkpoint ``step`` atomically on every rank (a collective call).

        Args:
            step: optimizer steps completed.
            state: DCP state: ``{"model": model.state_dict(), "optim": optimizer.state_dict(), ...}``.
            config: the resolved config (saved as ``config.yaml``).
            dataset_meta: the dataset's metadata (saved as ``dataset_meta.json``).
            epoch: the epoch the next step belongs to.
            sharding: table -> sharding type of the current plan.
            rank_state: this rank's reader position / RNG state (torch-saveable).
            extra: small JSON-able facts to keep in ``train_state.json``.
            check_finite: refuse to write a NaN/inf parameter (raises :class:`NumericalError`).
        """
        if check_finite:
            self._check_finite(step, state)
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            (tmp / RANK_STATE_DIR).mkdir()
        self._barrier()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=str(tmp))
        if rank_state is not None:
            part = tmp / RANK_STATE_DIR / f"rank-{self.rank}.pt.part"
            torch.save(rank_state, part)
            os.replace(part, tmp / RANK_STATE_DIR / f"rank-{self.rank}.pt")
        fault_point("checkpoint_save", step, self.rank)  # test-only: die before COMPLETE (training/faults.py)
        self._barrier()
        if self.rank == 0:
            save_config(config, tmp / CONFIG_FILE)
            if dataset_meta is not None:
                dataset_meta.save(tmp)
                os.replace(tmp / "meta.json", tmp / DATASET_META_FILE)
            info = {
                "step": step,
                "epoch": epoch,
                "world_size": self.world_size,
                "sharding": dict(sharding or {}),
                "time": time.time(),
                "extra": extra or {},
            }
            _write_text_atomic(tmp / TRAIN_STATE_FILE, json.dumps(info, indent=2, default=float))
            _write_text_atomic(tmp / COMPLETE, f"step {step}\n")
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            self._prune()
        self._barrier()
        logger.info("saved checkpoint %s (%.1fs)", final, time.perf_counter() - t0)
        return final

    def _check_finite(self, step: int, state: Mapping[str, Any]) -> None:
        tensors = _local_tensors(state)
        bad = _all_finite([t for _, t in tensors])
        flag = torch.tensor([0 if bad is None else 1], dtype=torch.int32)
        if dist.is_initialized() and self.world_size > 1:
            reduced = flag.to(_collective_device())
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
            flag = reduced.cpu()
        if int(flag.item()):
            where = tensors[bad][0] if bad is not None else "a tensor on another rank"
            raise NumericalError(f"step {step}: refusing to write a checkpoint: '{where}' holds NaN/inf")

    # ------------------------------------------------------------------ best
    def mark_best(self, path: Path, metric: str, value: float, step: int) -> None:
        """Point ``checkpoints/best`` at ``path`` and record why in ``checkpoints/best.json`` (rank 0).

        ``best`` is a relative symlink replaced atomically, so ``--checkpoint RUN/checkpoints/best``
        always names one complete checkpoint; pruning never deletes its target.
        """
        if self.rank == 0:
            link = self.dir / BEST_LINK
            tmp = self.dir / f".{BEST_LINK}.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(Path(path).name, tmp)
            _write_text_atomic(self.dir / BEST_FILE, json.dumps(
                {"checkpoint": Path(path).name, "step": step, "metric": metric, "value": value}, indent=2))
            os.replace(tmp, link)
            _fsync_dir(self.dir)
            logger.info("best checkpoint by %s = %.4f: %s", metric, value, path)
        self._barrier()

    def read_best(self) -> Optional[Dict[str, Any]]:
        """``checkpoints/best.json`` if its checkpoint is still complete, else None."""
        f = self.dir / BEST_FILE
        if not f.is_file():
            return None
        info = json.loads(f.read_text())
        return info if is_complete(self.dir / str(info.get("checkpoint", ""))) else None

    def _prune(self) -> None:
        done = self.complete_checkpoints()
        best = self.read_best()
        keep = {best["checkpoint"]} if best else set()
        done = [(s, p) for s, p in done if p.name not in keep]
        for _, p in done[: max(0, len(done) - max(self.keep_latest_k - len(keep), 1))]:
            shutil.rmtree(p, ignore_errors=True)
            logger.info("deleted old checkpoint %s", p)
        for p in self.dir.glob(".tmp-step-*"):  # leftovers of interrupted saves
            shutil.rmtree(p, ignore_errors=True)

    def _barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ loading
    def load(self, path: str | Path, state: Dict[str, Any]) -> CheckpointInfo:
        """Load ``path`` into ``state`` in place (a collective call) and return its facts.

        The tensors in ``state`` (plain or sharded, any world size) receive the saved
        values; the caller then calls ``load_state_dict`` on its modules/optimizers.

        Args:
            path: a complete checkpoint directory.
            state: template state dict with the same top-level keys used at save time.
        """
        p = Path(path)
        if not is_complete(p):
            raise CheckpointError(f"{p}: not a complete checkpoint (no {COMPLETE} marker)")
        if "model" in state:
            check_state_shapes(p, state["model"], "model")
        info_d = read_train_state(p)
        try:
            dcp.load(state, checkpoint_id=str(p))
        except Exception as e:  # DCP raises a bare RuntimeError/CheckpointException with per-rank traces
            raise CheckpointError(f"{p}: cannot load into this model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        rank_state = None
        saved_world = int(info_d.get("world_size", 1))
        rs = p / RANK_STATE_DIR / f"rank-{self.rank}.pt"
        if saved_world == self.world_size and rs.is_file():
            rank_state = torch.load(rs, weights_only=False)
        return CheckpointInfo(
            path=p,
            step=int(info_d["step"]),
            epoch=int(info_d.get("epoch", 0)),
            world_size=saved_world,
            sharding=dict(info_d.get("sharding", {})),
            extra=dict(info_d.get("extra", {})),
            rank_state=rank_state,
        )


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
