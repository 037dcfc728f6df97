"""Atomic, reshardable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint (``run_dir/checkpoints/step-N/``)::

    .metadata, __<rank>_0.distcp   DCP: sharded tables + dense params ("model.*"), fused + dense
                                   optimizer state ("optim.*"), codebooks / EMA buffers (model buffers)
    config.yaml                    the resolved DIGConfig of the run
    dataset_meta.json              DatasetMeta of the training data (inference needs no dataset)
    train_state.json               step, epoch, world size, per-table sharding types, metrics
    rank_state/rank-<r>.pt         per-rank reader position and RNG state
    dataset_fingerprint.json       sizes, cardinalities and sha256 of meta.json / items.parquet of
                                   the training data: eval/retrieve/export refuse another dataset
    COMPLETE                       written last: a directory without it is never loaded

Saving writes into ``checkpoints/.tmp-step-N/`` and renames it to ``step-N`` only after
every rank has finished and ``COMPLETE`` is on disk, so a crash mid-save leaves the
previous checkpoint as the newest complete one. The run directory must be on a file
system every rank sees (one node: any local disk; many nodes: a shared mount).

DCP stores every tensor with its global shape and shard offsets, so a checkpoint
saved on 2 ranks loads on 1 (or 8): each rank reads the slices its new plan owns.

What is saved is a dict of ``Stateful`` objects (``state_dict()`` / ``load_state_dict()``),
as in torchtitan, handed to :meth:`CheckpointManager.save` / :meth:`CheckpointManager.load`
in three groups, so a new piece of state is one line where the trainer builds them:

* ``states``: sharded or replicated tensors (the DMP model, the combined optimizer),
  written with DCP under their key (``model.*``, ``optim.*``);
* ``rank_states``: this rank's own state (reader position, RNG streams), in
  ``rank_state/rank-<r>.pt``; restored only at the same world size (else the caller
  decides how to restart, :attr:`CheckpointInfo.rank_states_restored` is False);
* ``train_state``: small JSON facts (step, epoch, metrics) in ``train_state.json``.

The run's config, dataset metadata and sharding plan are the manager's (constructor).
The on-disk layout is the one checkpoints had before this API, so older checkpoints load
for resume, evaluation and export as they are.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import zipfile
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from dig_torchrec.config import DIGConfig, config_from_dict, flatten, save_config
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.distributed.env import collective_device
from dig_torchrec.errors import CheckpointError, ConfigError, DIGError, NumericalError, interrupted
from dig_torchrec.files import read_json_file, write_text_atomic
from dig_torchrec.training.faults import fault_point

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
CONFIG_FILE = "config.yaml"
DATASET_META_FILE = "dataset_meta.json"
TRAIN_STATE_FILE = "train_state.json"
RANK_STATE_DIR = "rank_state"
DATASET_FINGERPRINT_FILE = "dataset_fingerprint.json"
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
    # options that add tensors (hist_sid, sid_prefix, history_position): without them here a checkpoint that has the
    # tensors would load into a model without the option and drop them silently
    "model.history_sid",
    "model.history_position",
    "tokenizer.sid_embedding",
)
# Keys that fix the optimizer state layout (checked only when resuming training).
OPTIMIZER_KEYS: Tuple[str, ...] = ("train.sparse_optimizer",)
# Dataset metadata that fixes table sizes.
META_KEYS: Tuple[str, ...] = ("num_users", "num_items", "user_features", "context_features", "item_features", "u2i_dim")


class Stateful(Protocol):
    """What a checkpoint holds: torch's ``Stateful`` protocol (DMP models and keyed optimizers are ones)."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None: ...


@dataclass
class CheckpointInfo:
    """What ``train_state.json`` holds, and whether this rank's own state was restored.

    Args:
        path: the checkpoint directory.
        step: optimizer steps completed when it was written.
        epoch: the epoch the next step belongs to.
        world_size: ranks that wrote it.
        sharding: table name -> sharding type of the plan that wrote it.
        extra: anything else the train state stored (metrics, epoch progress).
        rank_states_restored: the ``rank_states`` were loaded; False when the world size
            changed (the trainer then decides how to restart the reader).
    """

    path: Path
    step: int
    epoch: int
    world_size: int
    sharding: Dict[str, str] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    rank_states_restored: bool = False


def _state_dict_of(obj: Any) -> Any:
    """``obj.state_dict()`` of a ``Stateful``; a plain dict is its own state."""
    return obj if isinstance(obj, Mapping) else obj.state_dict()


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def is_complete(path: str | Path) -> bool:
    """A checkpoint directory counts only once its ``COMPLETE`` marker exists."""
    p = Path(path)
    return (p / COMPLETE).is_file() and (p / ".metadata").is_file()


def read_train_state(path: str | Path) -> Dict[str, Any]:
    return read_json_file(Path(path) / TRAIN_STATE_FILE, CheckpointError, "missing (not a dig checkpoint directory?)",
                          "invalid JSON, the checkpoint is damaged")


def saved_time(path: str | Path) -> float:
    """When a checkpoint was written (``train_state.json`` ``time``; 0 if unreadable)."""
    try:
        return float(read_train_state(path).get("time", 0.0))
    except (CheckpointError, TypeError, ValueError):
        return 0.0


def read_config(path: str | Path) -> DIGConfig:
    """The resolved config stored beside a checkpoint."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (not a dig checkpoint directory?)")
    try:
        return config_from_dict(yaml.safe_load(p.read_text()) or {})
    except ConfigError as e:
        raise CheckpointError(f"{p}: stored config is invalid: {e}") from e
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{p}: unreadable YAML, the checkpoint is damaged ({_one_line(e)})") from e


def read_dataset_meta(path: str | Path) -> DatasetMeta:
    p = Path(path) / DATASET_META_FILE
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (not a dig checkpoint directory?)")
    try:
        d = json.loads(p.read_text())
        known = set(DatasetMeta.__dataclass_fields__)
        return DatasetMeta(**{k: v for k, v in d.items() if k in known})
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{p}: unreadable, the checkpoint is damaged ({_one_line(e)})") from e


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
    md = read_dcp_metadata(path).state_dict_metadata
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


# ---------------------------------------------------------------------- verification
def _one_line(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: report the first rank's exception
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def dcp_load_error(path: str | Path, e: BaseException) -> CheckpointError:
    """A one-line :class:`CheckpointError` for a failed ``dcp.load`` of ``path``, naming the
    tensor file when the checkpoint has only one."""
    p = Path(path)
    try:
        files = sorted(storage_files(p))
    except CheckpointError:
        files = []
    where = p / files[0] if len(files) == 1 else p
    return CheckpointError(f"{where}: cannot load, the checkpoint is damaged ({_one_line(e)})")


def read_dcp_metadata(path: str | Path) -> Any:
    """The DCP ``.metadata`` of a checkpoint; a damaged file raises :class:`CheckpointError` naming it."""
    p = Path(path)
    try:
        return dcp.FileSystemReader(str(p)).read_metadata()
    except FileNotFoundError as e:
        raise CheckpointError(f"{p / '.metadata'}: missing (not a checkpoint directory?)") from e
    except Exception as e:  # pickle/EOF/attribute errors of a truncated or overwritten file
        raise CheckpointError(f"{p / '.metadata'}: unreadable, the checkpoint is damaged ({_one_line(e)})") from e


def storage_files(path: str | Path, md: Any = None) -> Dict[str, Tuple[int, List[str]]]:
    """relative tensor file -> (bytes the metadata says it holds at least, tensor names in it).

    Args:
        path: a checkpoint directory.
        md: its DCP metadata (read if omitted).
    """
    md = md if md is not None else read_dcp_metadata(path)
    out: Dict[str, Tuple[int, List[str]]] = {}
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        size, names = out.get(rel, (0, []))
        out[rel] = (max(size, end), names + [getattr(index, "fqn", str(index))])
    return out


def file_of_tensor(path: str | Path, fqn: str, md: Any = None) -> Path:
    """The tensor file of checkpoint ``path`` that holds ``fqn`` (the directory if unknown)."""
    for rel, (_, names) in storage_files(path, md).items():
        if fqn in names:
            return Path(path) / rel
    return Path(path)


class _Slice(io.RawIOBase):
    """A read-only, seekable view of bytes ``[offset, offset + length)`` of an open file."""

    def __init__(self, fh: Any, offset: int, length: int) -> None:
        super().__init__()
        self.fh, self.offset, self.length, self.pos = fh, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, min(self.length, pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos))
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.length - self.pos)
        if n <= 0:
            return 0
        self.fh.seek(self.offset + self.pos)
        data = self.fh.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


_ZIP_HEAD, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # torch.save record: local header ... end of central dir


def _check_records(p: Path, md: Any, deep: bool) -> None:
    """Every tensor record of the DCP files is a whole ``torch.save`` zip; ``deep``: its CRC-32s match."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    by_file: Dict[str, List[Tuple[int, int, str]]] = {}
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        fqn = getattr(index, "fqn", str(index))
        if isinstance(md.state_dict_metadata.get(fqn), TensorStorageMetadata):
            by_file.setdefault(info.relative_path, []).append((int(info.offset), int(info.length), fqn))
    for rel, items in by_file.items():
        f = p / rel
        with open(f, "rb") as fh:
            for offset, length, fqn in sorted(items):
                fh.seek(offset)
                head = fh.read(4)
                fh.seek(offset + length - 22)
                tail = fh.read(4)
                if head != _ZIP_HEAD or tail != _ZIP_END:
                    raise CheckpointError(f"{f}: tensor '{fqn}' (bytes {offset}-{offset + length}) is not a whole record; "
                                          f"the checkpoint is damaged")
                if not deep:
                    continue
                try:
                    bad = zipfile.ZipFile(_Slice(fh, offset, length)).testzip()
                except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                    raise CheckpointError(f"{f}: tensor '{fqn}' is unreadable, the checkpoint is damaged "
                                          f"({_one_line(e)})") from e
                if bad is not None:
                    raise CheckpointError(f"{f}: tensor '{fqn}' fails its CRC-32 check; the checkpoint is damaged")


def verify_checkpoint_files(path: str | Path, deep: bool = False) -> None:
    """Structural check of a checkpoint before anything is loaded or written.

    ``train_state.json`` parses, ``.metadata`` unpickles, every tensor file it names
    exists and is at least as long as the byte ranges it records, every tensor record in
    it is a whole ``torch.save`` archive, and every ``rank_state/*.pt`` opens. With
    ``deep``, every record's data is also checked against the CRC-32 its archive stores
    (reads every byte once), which catches overwritten tensor bytes. Raises
    :class:`CheckpointError` naming the damaged file (and tensor).

    Args:
        path: a checkpoint (or serving bundle) directory.
        deep: verify the CRC-32 of every tensor record.
    """
    p = Path(path)
    if (p / TRAIN_STATE_FILE).exists():
        read_train_state(p)
    md = read_dcp_metadata(p)
    for rel, (need, _) in storage_files(p, md).items():
        f = p / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: tensor file missing, the checkpoint is damaged")
        size = f.stat().st_size
        if size < need:
            raise CheckpointError(f"{f}: truncated ({size} bytes, the metadata needs {need}); the checkpoint is damaged")
    _check_records(p, md, deep)
    rs = p / RANK_STATE_DIR
    if rs.is_dir():
        for f in sorted(rs.glob("rank-*.pt")):
            load_rank_state(f)


def load_rank_state(path: Path) -> Dict[str, Any]:
    """One ``rank_state/rank-<r>.pt`` file; a damaged one raises :class:`CheckpointError` naming it."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # "PytorchStreamReader failed reading zip archive", EOFError, ...
        raise CheckpointError(f"{path}: unreadable, the checkpoint is damaged ({_one_line(e)})") from e


def check_finite_state(path: str | Path, state: Mapping[str, Any], prefix: str = "model") -> None:
    """Refuse loaded weights holding NaN/inf, naming the tensor and the file it came from.

    Args:
        path: the checkpoint the state was loaded from.
        state: the loaded state dict.
        prefix: the top-level key it was saved under.
    """
    tensors = _local_tensors(state)
    bad = _all_finite([t for _, t in tensors])
    if bad is not None:
        name = f"{prefix}.{tensors[bad][0]}"
        raise CheckpointError(f"{file_of_tensor(path, name)}: tensor '{name}' holds NaN/inf; the checkpoint is "
                              f"damaged or was written by a diverged run")


# ---------------------------------------------------------------------- dataset fingerprint
_FINGERPRINTS: Dict[Tuple[str, Tuple[Tuple[str, int, int], ...]], Dict[str, Any]] = {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(root: str | Path) -> Dict[str, Any]:
    """What identifies a dataset root: sizes, cardinalities, rows per split (parquet
    footers) and the sha256 of ``meta.json`` and ``items.parquet`` (cached per process).

    Args:
        root: a dataset root made by ``dig data``.
    """
    import pyarrow.parquet as pq

    from dig_torchrec.data.schema import SPLITS

    r = Path(root)
    files = [r / "meta.json", r / "items.parquet"]
    for split in SPLITS:
        files += sorted((r / split).glob("*.parquet"))
    key = (str(r.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    meta = DatasetMeta.load(r)
    rows: Dict[str, int] = {}
    for split in SPLITS:
        try:
            rows[split] = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((r / split).glob("*.parquet")))
        except Exception as e:  # noqa: BLE001  a damaged file: the data layer names it on open
            raise CheckpointError(f"{r / split}: cannot read row counts for the dataset fingerprint ({_one_line(e)})") from e
    fp = {
        "num_users": meta.num_users,
        "num_items": meta.num_items,
        "cardinalities": {**meta.user_features, **meta.context_features, **meta.item_features},
        "u2i_dim": meta.u2i_dim,
        "rows": rows,
        "meta_sha256": _sha256(r / "meta.json"),
        "items_sha256": _sha256(r / "items.parquet") if (r / "items.parquet").is_file() else None,
    }
    _FINGERPRINTS[key] = fp
    return fp


def check_dataset_fingerprint(checkpoint: str | Path, data_root: str | Path) -> None:
    """Refuse to evaluate/retrieve/export ``checkpoint`` on a dataset other than its training data.

    Compares ``CKPT/dataset_fingerprint.json`` with :func:`dataset_fingerprint` of
    ``data_root`` and raises :class:`CheckpointError` naming the first difference.
    Checkpoints written before fingerprints existed are accepted with a warning.

    Args:
        checkpoint: a checkpoint or serving bundle directory.
        data_root: the dataset it is about to read (``data.path``).
    """
    f = Path(checkpoint) / DATASET_FINGERPRINT_FILE
    if not f.is_file():
        logger.warning("%s records no dataset fingerprint (an older checkpoint); cannot check that data.path=%s is "
                       "its training data", checkpoint, data_root)
        return
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{f}: invalid JSON, the checkpoint is damaged ({_one_line(e)})") from e
    now = dataset_fingerprint(data_root)
    labels = {"num_users": "users", "num_items": "items", "cardinalities": "feature cardinalities",
              "u2i_dim": "u2i_dim", "rows": "rows per split", "meta_sha256": "sha256 of meta.json",
              "items_sha256": "sha256 of items.parquet"}
    for k, label in labels.items():
        if k in saved and saved[k] != now.get(k):
            a, b = saved[k], now.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                diff = next((x for x in sorted(set(a) | set(b)) if a.get(x) != b.get(x)), None)
                a, b, label = a.get(diff), b.get(diff), f"{label} ['{diff}']"
            elif isinstance(a, str):
                a, b = a[:12], (b or "none")[:12]
            raise CheckpointError(
                f"config key 'data.path' = '{data_root}' is not the dataset checkpoint {checkpoint} was trained on: "
                f"{label} is {b} there but was {a} in training ({f.name}); pass data.path=<its training dataset>"
            )


def write_dataset_fingerprint(directory: Path, data_root: str | Path) -> None:
    """Write ``dataset_fingerprint.json`` of ``data_root`` into ``directory`` (skipped with a
    warning when the dataset is not readable from here)."""
    try:
        fp = dataset_fingerprint(data_root)
    except (DIGError, OSError) as e:
        logger.warning("no dataset fingerprint in %s: %s", directory, e)
        return
    write_text_atomic(directory / DATASET_FINGERPRINT_FILE, json.dumps(fp, indent=2), fsync=True)


class CheckpointManager:
    """Writes, lists, prunes and loads the checkpoints of one run directory.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints``.
        keep_latest_k: complete checkpoints kept after each save (older ones are deleted).
        rank: this process's rank.
        world_size: ranks in the job.
        config: the run's resolved config, saved as ``config.yaml`` (needed to save).
        dataset_meta: the training data's metadata, saved as ``dataset_meta.json``.
        sharding: table -> sharding type of the current plan (``train_state.json``).
    """

    def __init__(
        self,
        run_dir: str | Path,
        keep_latest_k: int = 3,
        *,
        rank: int = 0,
        world_size: int = 1,
        config: Optional[DIGConfig] = None,
        dataset_meta: Optional[DatasetMeta] = None,
        sharding: Optional[Mapping[str, str]] = None,
    ) -> None:
        if keep_latest_k <= 0:
            raise ConfigError(f"config key 'train.keep_latest_k' = {keep_latest_k}; must be > 0")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_latest_k = keep_latest_k
        self.rank = rank
        self.world_size = world_size
        self.config = config
        self.dataset_meta = dataset_meta
        self.sharding: Dict[str, str] = dict(sharding or {})

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

    def written_order(self) -> List[Tuple[int, Path]]:
        """(step, path) of every complete checkpoint, least recently written first
        (``train_state.json`` ``time``, then the step)."""
        return sorted(self.complete_checkpoints(), key=lambda sp: (saved_time(sp[1]), sp[0]))

    def latest(self) -> Optional[Path]:
        """The most recently written complete checkpoint, or None.

        Normally also the highest step; after ``--resume`` from an earlier step into the
        same run it is the continuation's checkpoint, not a stale higher-numbered one.
        """
        done = self.written_order()
        return done[-1][1] if done else None

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """Map ``--resume`` to a checkpoint directory.

        Args:
            resume: None/"" (start fresh), ``auto`` (newest complete checkpoint of this run,
                or fresh if there is none), or a path to a checkpoint directory.

        The checkpoint's files are verified (:func:`verify_checkpoint_files`; rank 0 also
        checks every tensor record's CRC-32) before it is returned.
        """
        if not resume:
            return None
        if resume == "auto":
            path = self.latest()
            if path is None:
                logger.info("--resume auto: no complete checkpoint under %s; starting fresh", self.dir)
            else:
                verify_checkpoint_files(path, deep=_is_rank_zero())  # before anything in run_dir is written
            return path
        p = Path(resume)
        if not p.is_dir():
            raise CheckpointError(f"--resume {resume}: checkpoint directory does not exist")
        if not is_complete(p):
            raise CheckpointError(f"--resume {resume}: checkpoint is incomplete (no {COMPLETE} marker); it was interrupted while saving")
        verify_checkpoint_files(p, deep=_is_rank_zero())
        return p

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        states: Mapping[str, Any],
        *,
        rank_states: Optional[Mapping[str, Stateful]] = None,
        train_state: Optional[Stateful] = None,
        check_finite: bool = True,
    ) -> Path:
        """Write checkpoint ``step`` atomically on every rank (a collective call).

        Args:
            step: optimizer steps completed.
            states: name -> ``Stateful`` (or a plain state dict) written with DCP under its name.
            rank_states: name -> ``Stateful`` of this rank's own state (torch-saveable).
            train_state: a ``Stateful`` whose state is JSON: ``epoch`` and any other facts
                (kept under ``extra`` in ``train_state.json``; the step is ``step``).
            check_finite: refuse to write a NaN/inf tensor (raises :class:`NumericalError`).
        """
        if self.config is None:
            raise ValueError("CheckpointManager needs the run's config to save (CheckpointManager(..., config=cfg))")
        state = {name: _state_dict_of(obj) for name, obj in states.items()}
        if check_finite:
            self._check_finite(step, state)
        facts = dict(train_state.state_dict()) if train_state is not None else {}
        epoch = int(facts.pop("epoch", 0))
        facts.pop("step", None)
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
        if rank_states:
            part = tmp / RANK_STATE_DIR / f"rank-{self.rank}.pt.part"
            torch.save({name: obj.state_dict() for name, obj in rank_states.items()}, part)
            os.replace(part, tmp / RANK_STATE_DIR / f"rank-{self.rank}.pt")
        fault_point("checkpoint_save", step, self.rank)  # test-only: die before COMPLETE (training/faults.py)
        self._barrier()
        if self.rank == 0:
            config = self.config
            save_config(config, tmp / CONFIG_FILE)
            if self.dataset_meta is not None:
                self.dataset_meta.save(tmp)
                os.replace(tmp / "meta.json", tmp / DATASET_META_FILE)
            if (Path(config.data.path) / "meta.json").is_file():
                write_dataset_fingerprint(tmp, config.data.path)
            info = {
                "step": step,
                "epoch": epoch,
                "world_size": self.world_size,
                "sharding": self.sharding,
                "time": time.time(),
                "extra": facts,
            }
            write_text_atomic(tmp / TRAIN_STATE_FILE, json.dumps(info, indent=2, default=float), fsync=True)
            write_text_atomic(tmp / COMPLETE, f"step {step}\n", fsync=True)
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
            reduced = flag.to(collective_device())
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
            write_text_atomic(self.dir / BEST_FILE, json.dumps(
                {"checkpoint": Path(path).name, "step": step, "metric": metric, "value": value}, indent=2), fsync=True)
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
        done = self.written_order()  # keep the k most recently written, and the best one
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
    def load(
        self,
        path: str | Path,
        states: Mapping[str, Any],
        *,
        rank_states: Optional[Mapping[str, Stateful]] = None,
        train_state: Optional[Stateful] = None,
    ) -> CheckpointInfo:
        """Restore ``path`` into the objects :meth:`save` took (a collective call); return its facts.

        ``states`` receive the saved tensors (plain or sharded, any world size): a
        ``Stateful`` through its ``load_state_dict``, a plain state dict in place. The
        tensor shapes are checked before, and the values for NaN/inf after, the read.
        ``rank_states`` are restored only when the world size is the one that saved it;
        ``train_state`` gets the ``train_state.json`` record (``step``, ``epoch``, ``extra``, ...).

        Args:
            path: a complete checkpoint directory.
            states, rank_states, train_state: as for :meth:`save`.
        """
        p = Path(path)
        if not is_complete(p):
            raise CheckpointError(f"{p}: not a complete checkpoint (no {COMPLETE} marker)")
        state = {name: _state_dict_of(obj) for name, obj in states.items()}
        if "model" in state:
            check_state_shapes(p, state["model"], "model")
        info_d = read_train_state(p)
        try:
            dcp.load(state, checkpoint_id=str(p))
        except (Exception, CheckpointException) as e:  # DCP wraps errors (CheckpointException is a BaseException)
            if interrupted(e):
                raise KeyboardInterrupt from e
            raise dcp_load_error(p, e) from e
        if "model" in state:
            check_finite_state(p, state["model"], "model")
        for name, obj in states.items():
            if not isinstance(obj, Mapping):
                obj.load_state_dict(state[name])
        saved_world = int(info_d.get("world_size", 1))
        rs = p / RANK_STATE_DIR / f"rank-{self.rank}.pt"
        restored = False
        if rank_states and saved_world == self.world_size and rs.is_file():
            saved = load_rank_state(rs)
            for name, obj in rank_states.items():
                if name not in saved:
                    raise CheckpointError(f"{rs}: holds no '{name}' state (written by another version?)")
                obj.load_state_dict(saved[name])
            restored = True
        if train_state is not None:
            train_state.load_state_dict(info_d)
        return CheckpointInfo(
            path=p,
            step=int(info_d["step"]),
            epoch=int(info_d.get("epoch", 0)),
            world_size=saved_world,
            sharding=dict(info_d.get("sharding", {})),
            extra=dict(info_d.get("extra", {})),
            rank_states_restored=restored,
        )


def _is_rank_zero() -> bool:
    """Rank 0 of the launcher's environment (``--resume`` is resolved before the process group
    exists): only it reads every byte of a checkpoint to check its CRC-32s."""
    return os.environ.get("RANK", "0") in ("", "0")


