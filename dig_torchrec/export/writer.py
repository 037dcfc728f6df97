"""Writing a serving bundle (the format: :mod:`dig_torchrec.export.bundle`).

The export is atomic: everything is written into ``.OUT.export-<pid>`` beside ``OUT`` and
renamed to ``OUT`` only after the manifest is written. Any failure (or Ctrl-C) removes
the temporary folder; a temporary folder left by a killed export is removed by the next
export into the same parent. An existing ``OUT`` is never overwritten.

W = 1 loads the checkpoint into a plain (unsharded) model in this process (DCP reshards
any saved world size to 1); W > 1 reshards in W spawned ranks
(:mod:`dig_torchrec.export.workers`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp

from dig_torchrec.config import DIGConfig, apply_overrides, save_config
from dig_torchrec.data.items import ItemTable
from dig_torchrec.data.reader import open_dataset
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.distributed.planner import embedding_tables
from dig_torchrec.errors import CheckpointError, ConfigError, DataError
from dig_torchrec.export.bundle import PLAN_FILE, is_bundle, read_manifest, versions, write_manifest
from dig_torchrec.export.workers import export_sharded
from dig_torchrec.files import check_out_dir
from dig_torchrec.inference import check_saved_tokenizer, load_for_inference, resolve_checkpoint, verify_artifact
from dig_torchrec.retrieval.sid_index import SID_INDEX_DIR, SidIndex
from dig_torchrec.training.checkpoint import (
    COMPLETE,
    DATASET_FINGERPRINT_FILE,
    DATASET_META_FILE,
    check_dataset_fingerprint,
    is_complete,
    read_config,
    read_dataset_meta,
    read_train_state,
)

logger = logging.getLogger(__name__)

_TMP_MARK = ".export-"


def _read_source(checkpoint: Path, overrides: Sequence[str]) -> Tuple[DIGConfig, DatasetMeta, Dict[str, Any]]:
    """Config (with overrides), dataset meta and train state of a complete checkpoint."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"--checkpoint {checkpoint}: directory does not exist")
    if is_bundle(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint}: is already a serving bundle; export a training checkpoint")
    if not is_complete(checkpoint) and not (checkpoint / "checkpoints").is_dir():
        if (checkpoint / ".metadata").exists():
            raise CheckpointError(f"--checkpoint {checkpoint}: not a complete checkpoint (no {COMPLETE} marker); it "
                                  "was interrupted while saving")
        raise CheckpointError(f"--checkpoint {checkpoint}: not a complete checkpoint (no {COMPLETE} marker or "
                              ".metadata) and not a run directory (no checkpoints/)")
    cfg = apply_overrides(read_config(checkpoint), overrides)
    return cfg, read_dataset_meta(checkpoint), read_train_state(checkpoint)


def load_bundle(path: str | Path, *, verify: bool = False) -> Tuple[torch.nn.Module, DIGConfig, DatasetMeta]:
    """A serving bundle as ``(DIGModel in eval mode, DIGConfig, DatasetMeta)`` in one process.

    ``load_for_inference`` loads a bundle the same way (it is a complete DCP checkpoint
    without optimizer state) and checks every file's sha256 against the manifest first.

    Args:
        path: the bundle directory.
        verify: kept for compatibility: every load verifies the manifest now.
    """
    read_manifest(path)  # a bundle, not a bare checkpoint
    return load_for_inference(path)


def _export_single(checkpoint: Path, tmp: Path, overrides: Sequence[str]) -> Tuple[torch.nn.Module, Dict]:
    """W = 1: load into a plain model (DCP reshards any W to 1) and save it unsharded, no process group."""
    model, _, _ = load_for_inference(checkpoint, overrides=overrides, require_tokenizer=True, verify=False)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp), no_dist=True)
    plan = {name: {"sharding_type": "unsharded", "ranks": [0]} for name in embedding_tables(model)}
    return model, plan


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Delete ``.<name>.export-<pid>`` folders whose exporting process no longer runs."""
    for p in parent.glob(f".{name}{_TMP_MARK}*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            logger.info("removing %s left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)


def export_bundle(checkpoint: str | Path, out: str | Path, *, world_size: int = 1,
                  overrides: Sequence[str] = ()) -> Path:
    """Write the serving bundle of ``checkpoint`` to ``out`` atomically (see the module docstring).

    Args:
        checkpoint: a complete training checkpoint (``run/checkpoints/step-N``).
        out: bundle directory to create; must not exist.
        world_size: serving ranks to reshard the model for (1: unsharded).
        overrides: dotted config overrides stored in the bundle's config (e.g. ``data.path=DIR``).

    Returns:
        The bundle path.
    """
    t0 = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    check_out_dir(out)
    if checkpoint.is_dir() and not is_bundle(checkpoint) and (checkpoint / "checkpoints").is_dir():
        checkpoint = resolve_checkpoint(checkpoint)  # a run directory -> its newest complete checkpoint
    cfg, meta, train_state = _read_source(checkpoint, overrides)
    root = Path(cfg.data.path)
    if not (root / "meta.json").is_file():
        raise DataError(f"{root / 'meta.json'}: dataset of checkpoint {checkpoint} not found (config key 'data.path' "
                        f"= {cfg.data.path!r}); pass data.path=DIR; its items.parquet is needed for the SID index")
    verify_artifact(checkpoint)
    check_saved_tokenizer(checkpoint, cfg)
    check_dataset_fingerprint(checkpoint, root)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent, out.name)
    tmp = parent / f".{out.name}{_TMP_MARK}{os.getpid()}"
    tmp.mkdir()
    try:
        # 1. the model, resharded
        if world_size == 1:
            model, plan = _export_single(checkpoint, tmp, overrides)
        else:
            plan = export_sharded(checkpoint, tmp, cfg, meta, world_size)
            model = None
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=2))
        # 2. config and dataset meta
        save_config(cfg, tmp / "config.yaml")
        shutil.copy2(checkpoint / DATASET_META_FILE, tmp / DATASET_META_FILE)
        if (checkpoint / DATASET_FINGERPRINT_FILE).is_file():
            shutil.copy2(checkpoint / DATASET_FINGERPRINT_FILE, tmp / DATASET_FINGERPRINT_FILE)
        # the training checkpoints' completeness marker, so every checkpoint loader
        # (``load_for_inference``, hence ``dig eval`` / ``dig retrieve``) accepts the bundle as is
        (tmp / COMPLETE).write_text("dig serving bundle\n")
        # 3. SID table + inverted index (Eq. 2-3 assignment of the whole corpus)
        if model is None:
            model, _, _ = load_for_inference(tmp)
        _, schema = open_dataset(root, cfg.data)
        items = ItemTable.load(root, schema, meta)
        if items.num_items != meta.num_items:
            raise DataError(f"{root / 'items.parquet'}: {items.num_items} items but the checkpoint's model has "
                            f"{meta.num_items}")
        index = SidIndex.build(model, items)
        index.save(tmp / SID_INDEX_DIR)
        del model
        # 4. manifest (last): its presence marks a finished bundle
        info = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source_checkpoint": str(checkpoint.resolve()),
            "step": train_state.get("step"),
            "trained_world_size": train_state.get("world_size"),
            "world_size": world_size,
            "dcp_keys": "model.<fqn> (no optimizer state)",
            "num_items": index.num_items,
            "sid_shape": [index.num_items, index.num_layers],
            "collisions": index.collision_stats().to_dict(),
            "versions": versions(),
        }
        write_manifest(tmp, info)
        if out.exists():
            raise CheckpointError(f"--out {out}: appeared while exporting; not overwriting it")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s -> %s (world size %d) in %.1fs", checkpoint, out, world_size, time.perf_counter() - t0)
    return out
