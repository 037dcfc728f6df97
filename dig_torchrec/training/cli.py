"""``dig train --config configs/X.yaml [k=v ...] [--resume auto|PATH]``.

Also a module entry point, so launchers can run it directly::

    torchrun --nproc_per_node 2 -m dig_torchrec.training.cli --config configs/tiny.yaml
    torchx run -s local_cwd dist.ddp -j 1x2 -m dig_torchrec.training.cli -- --config configs/tiny.yaml
    torchx run -s local_cwd dist.ddp -j 1x2 --script dig_torchrec/training/cli.py -- --config configs/tiny.yaml

Each process reads its rank from the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); without a launcher it trains as a world of one.

The config, the dataset's ``meta.json`` and the run directory are checked before
torch/torchrec/fbgemm are imported, so a typo fails in well under a second: the trainer,
preflight and retrieval validator (which import torch) are imported inside
:func:`run_train`, after those checks, for that reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from dig_torchrec.cli import setup_logging
from dig_torchrec.config import load_config
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import ConfigError, DIGError, interrupted

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--resume",
        default=None,
        help="'auto': newest complete checkpoint of run_dir (fresh start if none); or a checkpoint directory. "
             "Without --resume the run starts fresh from step 0, and a run_dir that already holds complete "
             "checkpoints is refused (pass --resume auto to continue it, or --fresh to delete them)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start from step 0 even if run_dir holds checkpoints: the old run's checkpoints/, final_metrics.json, "
             "metrics.jsonl, tensorboard/ and accounting/ are deleted once the preflight checks pass",
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


_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_checkpoints(run_dir: str | Path) -> List[Path]:
    """``run_dir/checkpoints/step-N`` directories with a ``COMPLETE`` marker, oldest step first.

    The same rule as ``CheckpointManager.complete_checkpoints``, without importing torch.
    """
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "COMPLETE").is_file() and (p / ".metadata").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def check_fresh_start(run_dir: str | Path, resume: Optional[str], fresh: bool) -> None:
    """Refuse to start a run from step 0 in a run directory that holds complete checkpoints.

    Otherwise the new run's checkpoints would mix with the old ones, and ``dig eval
    --checkpoint RUN_DIR`` would load a stale, higher-numbered step.

    Args:
        run_dir: ``run_dir`` of the config.
        resume: the ``--resume`` argument (None: fresh start).
        fresh: ``--fresh`` was given (the old checkpoints are deleted later).
    """
    if fresh and resume:
        raise ConfigError(f"--fresh and --resume {resume} contradict each other; pass one of them")
    if resume or fresh:
        return
    done = complete_checkpoints(run_dir)
    if done:
        raise ConfigError(
            f"config key 'run_dir' = '{run_dir}' already holds {len(done)} complete checkpoint(s) (newest {done[-1]}); "
            f"pass --resume auto to continue that run, --fresh to delete them and start over, or choose a new run_dir"
        )


# what a run leaves in run_dir; ``--fresh`` deletes these (config.yaml is rewritten anyway)
RUN_OUTPUTS = ("checkpoints", "final_metrics.json", "metrics.jsonl", "tensorboard", "accounting")


def clear_run_dir(run_dir: str | Path) -> None:
    """``--fresh``: delete the previous run's outputs (:data:`RUN_OUTPUTS`; rank 0 only)."""
    p = Path(run_dir)
    for name in RUN_OUTPUTS:
        target = p / name
        if target.is_dir():
            logger.warning("--fresh: deleting %s", target)
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def run_train(args: argparse.Namespace) -> int:
    """Build the trainer from ``--config`` + overrides and train.

    The config, the dataset's ``meta.json`` and the run directory are checked before
    torch/torchrec/fbgemm are imported, so a typo fails in well under a second.
    """
    _quiet_other_ranks()
    cfg = load_config(args.config, args.overrides)
    resume = None if args.resume in (None, "", "none") else args.resume
    fresh = bool(getattr(args, "fresh", False))
    DatasetMeta.load(cfg.data.path)  # a wrong data.path fails here, before the heavy imports
    check_fresh_start(cfg.train.run_dir, resume, fresh)

    from dig_torchrec.retrieval.validation import RetrievalValidator  # after the checks: these import torch
    from dig_torchrec.training.preflight import run_preflight
    from dig_torchrec.training.trainer import Trainer

    if fresh and os.environ.get("RANK", "0") in ("", "0"):
        run_preflight(cfg)  # every check passes before anything of the old run is deleted
        clear_run_dir(cfg.train.run_dir)
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
    setup_logging(args.verbose)
    try:
        return run_train(args)
    except DIGError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:  # Ctrl-C, also when DCP wrapped it in a CheckpointException
        if isinstance(e, (SystemExit, GeneratorExit)) or not interrupted(e):
            raise
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
