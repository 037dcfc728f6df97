"""``dig train --config configs/X.yaml [k=v ...] [--resume auto|PATH]``.

Also a module entry point, so launchers can run it directly::

    torchrun --nproc_per_node 2 -m dig_torchrec.training.cli --config configs/tiny.yaml
    torchx run -s local_cwd dist.ddp -j 1x2 -m dig_torchrec.training.cli -- --config configs/tiny.yaml
    torchx run -s local_cwd dist.ddp -j 1x2 --script dig_torchrec/training/cli.py -- --config configs/tiny.yaml

Each process reads its rank from the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); without a launcher it trains as a world of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from dig_torchrec.errors import DIGError

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto': newest complete checkpoint of run_dir (fresh start if none); or a checkpoint directory",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=1 run_dir=runs/x")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser("train", help="train DIG (one process, torchrun, or TorchX)")
    add_arguments(p)
    p.set_defaults(func=run_train)


def _quiet_other_ranks() -> None:
    """Only rank 0 logs INFO; other ranks log warnings and errors. TorchRec's INFO chatter is muted."""
    rank = os.environ.get("RANK", "0")
    if rank not in ("", "0"):
        logging.getLogger().setLevel(logging.WARNING)
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("torchrec").setLevel(logging.WARNING)
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # pipeline re-trace chatter


def run_train(args: argparse.Namespace) -> int:
    """Build the trainer from ``--config`` + overrides and train."""
    from dig_torchrec.config import load_config
    from dig_torchrec.retrieval.validation import RetrievalValidator
    from dig_torchrec.training.trainer import Trainer

    _quiet_other_ranks()
    cfg = load_config(args.config, args.overrides)
    resume = None if args.resume in (None, "", "none") else args.resume
    trainer = Trainer(cfg, resume=resume, retrieval_validator=RetrievalValidator)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Module entry point (``python -m dig_torchrec.training.cli``): same flags as ``dig train``."""
    parser = argparse.ArgumentParser(prog="python -m dig_torchrec.training.cli", description="train DIG")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run_train(args)
    except DIGError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
