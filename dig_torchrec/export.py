"""``dig export``: turn a training checkpoint into a serving bundle.

A bundle is what a serving job needs and nothing else (no optimizer state, no reader
position)::

    OUT/
      .metadata, __<r>_0.distcp   DCP checkpoint of the model only ("model.<fqn>" keys),
                                  resharded for --world-size W (W=1: one unsharded file)
      config.yaml                 the resolved DIGConfig (with the export's overrides)
      dataset_meta.json           DatasetMeta the tables were sized from
      dataset_fingerprint.json    the training data's fingerprint (eval/retrieve refuse another dataset)
      sharding_plan.json          table -> sharding type and ranks of the W-rank plan
      COMPLETE                    the checkpoints' completeness marker (checkpoint loaders accept it)
      sid_index/                  sid_table.parquet (item -> SID), inverted_index.parquet
                                  (SID -> items), prefixes.parquet, index.json
      manifest.json               format version, source checkpoint, step, library
                                  versions, and sha256 + size of every other file

The DCP folder is the same kind of checkpoint ``torch.distributed.checkpoint`` writes for
training, so ``dcp_to_torch_save(OUT, "model.pt")`` turns it into one ``torch.save`` file
and ``dig eval`` / ``dig retrieve`` load it in one process (DCP reshards any W to 1).

Resharding to W > 1 spawns W gloo processes on this machine: each builds the model on
``meta``, plans it for W ranks with the training planner, materialises it with
``DistributedModelParallel``, loads its slices of the checkpoint and saves them with
``dcp.save``. W = 1 loads the checkpoint into a plain (unsharded) model in this process.

The export is atomic: everything is written into ``.OUT.export-<pid>`` beside ``OUT`` and
renamed to ``OUT`` only after the manifest is written. Any failure (or Ctrl-C) removes
the temporary folder; a temporary folder left by a killed export is removed by the next
export into the same parent. An existing ``OUT`` is never overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from dig_torchrec.config import DIGConfig, save_config
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "sharding_plan.json"
BUNDLE_FORMAT = "dig-serving-bundle"
BUNDLE_VERSION = 1
_TMP_MARK = ".export-"


# ---------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export", help="write a serving bundle: resharded DCP model, SID index, config, manifest",
        description="Export a training checkpoint (run/checkpoints/step-N) as a serving bundle.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="a complete training checkpoint (run/checkpoints/step-N) or a run directory (its newest one)")
    p.add_argument("--out", required=True, help="bundle directory to create (must not exist)")
    p.add_argument("--world-size", type=int, default=1,
                   help="reshard the model for this many serving ranks (default 1: one unsharded file)")
    p.add_argument("--verify", action="store_true", help="re-read the bundle and check every hash afterwards")
    p.add_argument("overrides", nargs="*",
                   help="dotted config overrides, e.g. data.path=DIR when the dataset moved (its items.parquet "
                        "is read to build the SID index)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """``dig export``: flags, ``--out`` and overrides are checked before torch is imported."""
    from dig_torchrec.retrieval.cli import check_checkpoint_arg, check_overrides

    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    check_out_dir(Path(args.out))
    check_overrides(args.overrides)
    check_checkpoint_arg(args.checkpoint)
    out = export_bundle(args.checkpoint, args.out, world_size=args.world_size, overrides=args.overrides)
    if args.verify:
        verify_bundle(out)
    manifest = read_manifest(out)
    print(json.dumps({"out": str(out), "world_size": manifest["world_size"], "step": manifest.get("step"),
                      "files": len(manifest["files"])}))
    return 0


def check_out_dir(out: Path) -> None:
    """``--out`` must not exist and its parent must be (or be creatable as) a directory.

    Args:
        out: the bundle directory to create.
    """
    if out.exists():
        raise CheckpointError(f"--out {out}: already exists; choose a new directory (a bundle is never overwritten)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise ConfigError(f"--out {out}: directory {parent} is not writable")
            break


# ---------------------------------------------------------------------- hashing / manifest
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _bundle_files(root: Path) -> List[Path]:
    """Every regular file under ``root`` except the manifest, sorted by relative path."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__}
    for name in ("torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "dig_torchrec"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_manifest(root: Path, info: Dict[str, Any]) -> Dict[str, Any]:
    """Hash every file of ``root`` and write ``manifest.json`` (the last file of a bundle).

    Args:
        root: the (temporary) bundle directory.
        info: facts to store beside the hashes (source checkpoint, step, world size...).
    """
    files = {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in _bundle_files(root)}
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **info, "files": files}
    tmp = root / (MANIFEST_FILE + ".part")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST_FILE)
    return manifest


def is_bundle(path: str | Path) -> bool:
    """True when ``path`` holds a serving bundle's manifest."""
    p = Path(path) / MANIFEST_FILE
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == BUNDLE_FORMAT
    except (json.JSONDecodeError, OSError):
        return False


def read_manifest(path: str | Path) -> Dict[str, Any]:
    """The manifest of bundle ``path`` (raises :class:`CheckpointError` if absent or invalid)."""
    p = Path(path) / MANIFEST_FILE
    if not p.is_file():
        raise CheckpointError(f"{p}: missing (not a dig serving bundle)")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON: {e}") from e
    if m.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{p}: format is {m.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if int(m.get("version", 0)) > BUNDLE_VERSION:
        raise CheckpointError(f"{p}: bundle version {m.get('version')} is newer than this code reads ({BUNDLE_VERSION})")
    return m


def verify_bundle(path: str | Path) -> Dict[str, Any]:
    """Check that every file listed in the manifest exists with the recorded size and sha256.

    Raises :class:`CheckpointError` naming the first missing, changed or unlisted file.

    Args:
        path: the bundle directory.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = Path(path)
    manifest = read_manifest(root)
    listed = manifest["files"]
    for rel, rec in listed.items():  # cheap checks first: presence and size
        f = root / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {MANIFEST_FILE} but missing")
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(f"{f}: sha256 differs from {MANIFEST_FILE} (file changed or corrupted: "
                                  f"{f.stat().st_size} bytes, the manifest says {rec['bytes']})")
    rels = list(listed)
    # hashlib releases the GIL: the files of a W-rank bundle are hashed on several cores
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(rels)))) as pool:
        digests = list(pool.map(lambda rel: sha256_file(root / rel), rels))
    for rel, digest in zip(rels, digests):
        if digest != listed[rel]["sha256"]:
            raise CheckpointError(f"{root / rel}: sha256 differs from {MANIFEST_FILE} (file changed or corrupted)")
    extra = [p.relative_to(root).as_posix() for p in _bundle_files(root) if p.relative_to(root).as_posix() not in listed]
    if extra:
        raise CheckpointError(f"{root / extra[0]}: file is not listed in {MANIFEST_FILE}")
    return manifest


# ---------------------------------------------------------------------- loading
def _read_source(checkpoint: Path, overrides: Sequence[str]) -> Tuple[DIGConfig, DatasetMeta, Dict[str, Any]]:
    """Config (with overrides), dataset meta and train state of a complete checkpoint."""
    from dig_torchrec.retrieval.evaluate import apply_overrides
    from dig_torchrec.training.checkpoint import (
        COMPLETE, is_complete, read_config, read_dataset_meta, read_train_state,
    )

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
    from dig_torchrec.training.loading import load_for_inference

    read_manifest(path)  # a bundle, not a bare checkpoint
    return load_for_inference(path)


# ---------------------------------------------------------------------- resharding
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _export_single(checkpoint: Path, tmp: Path, overrides: Sequence[str]) -> Tuple[torch.nn.Module, Dict]:
    """W = 1: load into a plain model (DCP reshards any W to 1) and save it unsharded, no process group."""
    import torch.distributed.checkpoint as dcp

    from dig_torchrec.distributed.planner import embedding_tables
    from dig_torchrec.training.loading import load_for_inference

    model, _, _ = load_for_inference(checkpoint, overrides=overrides, require_tokenizer=True, verify=False)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp), no_dist=True)
    plan = {name: {"sharding_type": "unsharded", "ranks": [0]} for name in embedding_tables(model)}
    return model, plan


def _reshard_worker(rank: int, world_size: int, port: int, checkpoint: str, cfg_dict: Dict[str, Any],
                    meta_dict: Dict[str, Any], out_dir: str) -> None:
    """One of W spawned ranks: plan for W, load this rank's slices, ``dcp.save`` them."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from dig_torchrec.config import config_from_dict
    from dig_torchrec.distributed.env import init_distributed, shutdown
    from dig_torchrec.distributed.planner import default_sharders, plan_sharding
    from dig_torchrec.model import DIGModel
    from dig_torchrec.training.optim import attach_sparse_optimizer

    cfg = config_from_dict(cfg_dict)
    meta = DatasetMeta(**meta_dict)
    env = init_distributed("cpu")
    try:
        model = DIGModel(cfg, meta, device="meta")
        # Serving needs no optimizer state: SGD is the stateless fused kernel every device has.
        attach_sparse_optimizer(model, type(cfg.train)(sparse_optimizer="sgd"), "cpu")
        plan = plan_sharding(model, cfg.sharding, env.device, world_size, world_size, cfg.data.batch_size,
                             pg=env.process_group)
        dmp = DistributedModelParallel(module=model, env=ShardingEnv.from_process_group(env.process_group),
                                       device=env.device, plan=plan, sharders=default_sharders())
        state = {"model": dmp.state_dict()}
        dcp.load(state, checkpoint_id=checkpoint)
        dcp.save(state, checkpoint_id=out_dir)
        if rank == 0:
            tables = {}
            for path, module_plan in plan.plan.items():
                for table, ps in module_plan.items():  # type: ignore[union-attr]
                    tables[table] = {"module": path, "sharding_type": ps.sharding_type,
                                     "compute_kernel": ps.compute_kernel, "ranks": list(ps.ranks or [])}
            (Path(out_dir) / PLAN_FILE).write_text(json.dumps(tables, indent=2))
        dist.barrier()
    finally:
        shutdown(env)


def _export_sharded(checkpoint: Path, tmp: Path, cfg: DIGConfig, meta: DatasetMeta, world_size: int) -> Dict:
    """W > 1: spawn W gloo ranks that reshard the model into ``tmp``."""
    import dataclasses

    import torch.multiprocessing as mp

    port = _free_port()
    logger.info("resharding %s for %d ranks (spawning %d gloo processes)", checkpoint, world_size, world_size)
    try:
        mp.start_processes(
            _reshard_worker,
            args=(world_size, port, str(checkpoint), cfg.to_dict(), dataclasses.asdict(meta), str(tmp)),
            nprocs=world_size, join=True, start_method="spawn",
        )
    except mp.ProcessRaisedException as e:
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        raise CheckpointError(f"resharding {checkpoint} for {world_size} ranks failed: {last}") from e
    except mp.ProcessExitedException as e:
        raise CheckpointError(f"resharding {checkpoint} for {world_size} ranks failed: a rank exited ({e})") from e
    plan_path = tmp / PLAN_FILE
    plan = json.loads(plan_path.read_text())
    plan_path.unlink()  # rewritten below together with the W = 1 case
    return plan


# ---------------------------------------------------------------------- the export
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
    from dig_torchrec.data.items import ItemTable
    from dig_torchrec.data.reader import open_dataset
    from dig_torchrec.retrieval.sid_index import SID_INDEX_DIR, SidIndex
    from dig_torchrec.training.checkpoint import COMPLETE, DATASET_META_FILE
    from dig_torchrec.training.loading import load_for_inference

    from dig_torchrec.training.checkpoint import DATASET_FINGERPRINT_FILE, check_dataset_fingerprint
    from dig_torchrec.training.loading import check_saved_tokenizer, resolve_checkpoint, verify_artifact

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
            plan = _export_sharded(checkpoint, tmp, cfg, meta, world_size)
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
            "versions": _versions(),
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
