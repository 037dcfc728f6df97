"""Cost of verifying a serving bundle on load (``dig eval`` / ``dig retrieve`` / ``load_bundle``)
at ``industrial_large`` size (20M users, 500K items, ``configs/industrial_large.yaml``).

Every bundle load re-hashes every file listed in ``manifest.json`` (sha256) before the
model is built (``inference.py: verify_artifact``). This script measures that cost
on a bundle directory with the byte sizes of a real industrial_large W=1 bundle:

* ``__0_0.distcp``: one file as large as the model's state dict (the DIGModel of the
  industrial_large config built on the ``meta`` device; its tensor bytes are summed), filled
  with pseudo-random bytes (sha256 speed does not depend on content);
* ``sid_index/``: a real :class:`SidIndex` of 500K items with random SIDs (L=4, K=256);
* ``config.yaml``, ``dataset_meta.json``, ``sharding_plan.json``, ``COMPLETE``, and the
  ``manifest.json`` written by the exporter's own :func:`write_manifest`.

It then times :func:`dig_torchrec.export.bundle.verify_bundle` (what every load runs) and, for
comparison, a plain sequential read of the same files (the I/O a DCP load does anyway),
``--repeats`` times each, interleaved. The files were just written, so both run from the
page cache (the warm case: a bundle loaded again on the same host); a cold read adds the
disk time to the load and to the verification alike. What is *not* measured: a real
trained model's tensors (random bytes of the same size stand in) and the DCP load itself.

Training checkpoints have no manifest; ``dig eval`` / ``retrieve`` / ``export`` check the
CRC-32 that every ``torch.save`` record of a DCP file stores. ``--ckpt-scale`` times that on a
real ``dcp.save`` checkpoint holding a fraction of the model bytes (RAM bound) and scales the
time linearly to the full size.

Usage::

    python benchmarks/bundle_verify.py                      # full size (~5.3 GB in a temp dir)
    python benchmarks/bundle_verify.py --scale 0.05         # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, industrial_meta, machine_info  # noqa: E402
from dig_torchrec.config import load_config, save_config  # noqa: E402
from dig_torchrec.export.bundle import sha256_file, verify_bundle, write_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def model_bytes(cfg, meta) -> int:  # noqa: ANN001
    """Bytes of the industrial_large DIGModel's state dict (built on ``meta``: no memory)."""
    from dig_torchrec.model import DIGModel

    model = DIGModel(cfg, meta, device="meta")
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor)))


def write_bundle(root: Path, cfg, meta, nbytes: int, num_items: int) -> None:  # noqa: ANN001
    """A bundle directory with the files and byte sizes of a W=1 export."""
    from dig_torchrec.retrieval.sid_index import SidIndex

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    block = 64 << 20
    with open(root / "__0_0.distcp", "wb") as f:
        left = nbytes
        while left > 0:
            n = min(block, left)
            f.write(rng.bytes(n))
            left -= n
    (root / ".metadata").write_bytes(rng.bytes(200_000))  # a DCP .metadata of a few hundred KB
    save_config(cfg, root / "config.yaml")
    meta.save(root)
    os.replace(root / "meta.json", root / "dataset_meta.json")
    (root / "sharding_plan.json").write_text(json.dumps({"user_id": {"sharding_type": "unsharded", "ranks": [0]}}))
    (root / "COMPLETE").write_text("dig serving bundle\n")
    sids = torch.from_numpy(rng.integers(0, cfg.tokenizer.num_codes, size=(num_items, cfg.tokenizer.num_layers)))
    SidIndex(sids, cfg.tokenizer.num_codes).save(root / "sid_index")


def read_all(root: Path) -> int:
    """Read every file once (no hashing): the I/O a load does anyway."""
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while True:
                    b = f.read(1 << 22)
                    if not b:
                        break
                    n += len(b)
    return n


def checkpoint_crc(cfg, meta, full: int, scale: float, repeats: int, where) -> Dict[str, object]:  # noqa: ANN001
    """Time ``verify_checkpoint_files`` (structural, and ``deep``: CRC-32 of every record) on a
    real ``dcp.save`` checkpoint holding ``scale`` of the industrial_large model bytes
    (a user table of ``scale * 20M`` rows, the 500K-item table, random values)."""
    import torch.distributed.checkpoint as dcp

    from dig_torchrec.training.checkpoint import verify_checkpoint_files

    d = cfg.model.embedding_dim
    users = int(meta.num_users * scale)
    parent = Path(where) if where else Path(tempfile.mkdtemp(prefix="ckpt_crc_"))
    path = parent / "step-1"
    try:
        state = {"model": {"embedding_bags.user_id.weight": torch.rand(users, d),
                           "embedding_bags.item_id.weight": torch.rand(meta.num_items, d)}}
        t0 = time.perf_counter()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=str(path), no_dist=True)
        t_save = time.perf_counter() - t0
        del state
        nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        deep, shallow, read = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            verify_checkpoint_files(path, deep=True)
            deep.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verify_checkpoint_files(path, deep=False)
            shallow.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            read_all(path)
            read.append(time.perf_counter() - t0)
    finally:
        if not where:
            shutil.rmtree(parent, ignore_errors=True)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {"what": "verify_checkpoint_files on a dcp.save checkpoint (page cache warm); deep = CRC-32 of every "
                    "tensor record, as dig eval/retrieve/export run on a training checkpoint",
            "scale": scale, "bytes": nbytes, "save_seconds": t_save,
            "seconds": {"deep": deep, "structural": shallow, "read_only": read},
            "median_deep_seconds": med(deep), "median_structural_seconds": med(shallow),
            "deep_gb_per_s": nbytes / med(deep) / 1e9,
            "extrapolated_full_size_deep_seconds": med(deep) * full / nbytes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "industrial_large.yaml"))
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the real model bytes to write (1.0: full)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the bundle (default: a temp dir, removed after)")
    p.add_argument("--ckpt-scale", type=float, default=0.25,
                   help="also time the CRC-32 check of a real DCP training checkpoint holding this fraction of the "
                        "model bytes (0: skip); written with dcp.save, so it needs that much RAM")
    p.add_argument("--out", default=str(RESULTS_DIR / "bundle_verify.json"))
    args = p.parse_args()

    cfg = load_config(args.config)
    meta = industrial_meta()
    full = model_bytes(cfg, meta)
    nbytes = int(full * args.scale)
    load_start = os.getloadavg()
    parent = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bundle_verify_"))
    root = parent / "bundle"
    try:
        t0 = time.perf_counter()
        write_bundle(root, cfg, meta, nbytes, meta.num_items)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = write_manifest(root, {"step": 0, "world_size": 1})
        t_manifest = time.perf_counter() - t0
        total = sum(r["bytes"] for r in manifest["files"].values())
        verify: List[float] = []
        read: List[float] = []
        for i in range(args.repeats):
            order = ("verify", "read") if i % 2 == 0 else ("read", "verify")
            for what in order:
                t0 = time.perf_counter()
                if what == "verify":
                    verify_bundle(root)
                    verify.append(time.perf_counter() - t0)
                else:
                    read_all(root)
                    read.append(time.perf_counter() - t0)
        # hashing only (one 256 MB slice of the big file, from the page cache)
        t0 = time.perf_counter()
        sha256_file(root / "__0_0.distcp")
        t_hash_big = time.perf_counter() - t0
    finally:
        if not args.dir:
            shutil.rmtree(parent, ignore_errors=True)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    ckpt_res = checkpoint_crc(cfg, meta, full, args.ckpt_scale, args.repeats, args.dir) if args.ckpt_scale > 0 else None
    res: Dict[str, object] = {
        "command": "python benchmarks/bundle_verify.py " + " ".join(sys.argv[1:]),
        "what": "verify_bundle (sha256 of every manifest file) on a bundle with the byte sizes of an industrial_large "
                "W=1 export; random bytes stand in for the tensors; files in the page cache (just written)",
        "config": args.config,
        "num_users": meta.num_users,
        "num_items": meta.num_items,
        "model_state_bytes_full": full,
        "scale": args.scale,
        "bundle_bytes": total,
        "files": len(manifest["files"]),
        "seconds": {"write_bundle": t_write, "write_manifest": t_manifest, "verify": verify, "read_only": read,
                    "sha256_distcp_only": t_hash_big},
        "median_verify_seconds": med(verify),
        "median_read_seconds": med(read),
        "verify_gb_per_s": total / med(verify) / 1e9,
        "read_gb_per_s": total / med(read) / 1e9,
        "verify_over_read": med(verify) / med(read),
        "extrapolated_full_size_verify_seconds": med(verify) * full / max(nbytes, 1),
        "training_checkpoint_crc": ckpt_res,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "machine": machine_info(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("bundle_bytes", "median_verify_seconds", "median_read_seconds",
                                          "verify_gb_per_s", "verify_over_read",
                                          "extrapolated_full_size_verify_seconds", "training_checkpoint_crc")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
