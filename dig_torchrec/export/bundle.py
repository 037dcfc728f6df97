"""The serving bundle's format: its file names, ``manifest.json`` (format, version, facts
and the sha256 + size of every other file) and its verification.

Read by every loader (``dig_torchrec.inference`` verifies a bundle before loading it) and
written by :mod:`dig_torchrec.export.writer`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import torch

from dig_torchrec.errors import CheckpointError
from dig_torchrec.files import read_json_file, write_text_atomic

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "sharding_plan.json"
BUNDLE_FORMAT = "dig-serving-bundle"
BUNDLE_VERSION = 1


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


def versions() -> Dict[str, str]:
    """Versions of the libraries that wrote a bundle (recorded in its manifest)."""
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
    write_text_atomic(root / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=False), fsync=True)
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
    m = read_json_file(p, CheckpointError, "missing (not a dig serving bundle)")
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
