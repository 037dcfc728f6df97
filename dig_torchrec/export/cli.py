"""``dig export`` (see :mod:`dig_torchrec.export`).

Flags, ``--out`` and overrides are checked before the writer (and with it torch) is
imported, so a typo fails in a fraction of a second: the writer is imported inside
:func:`run_export` for that reason.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dig_torchrec.errors import ConfigError
from dig_torchrec.files import check_out_dir
from dig_torchrec.retrieval.cli import check_checkpoint_arg, check_overrides


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
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    check_out_dir(Path(args.out))
    check_overrides(args.overrides)
    check_checkpoint_arg(args.checkpoint)
    from dig_torchrec.export.bundle import read_manifest, verify_bundle  # after the checks: imports torch
    from dig_torchrec.export.writer import export_bundle

    out = export_bundle(args.checkpoint, args.out, world_size=args.world_size, overrides=args.overrides)
    if args.verify:
        verify_bundle(out)
    manifest = read_manifest(out)
    print(json.dumps({"out": str(out), "world_size": manifest["world_size"], "step": manifest.get("step"),
                      "files": len(manifest["files"])}))
    return 0

