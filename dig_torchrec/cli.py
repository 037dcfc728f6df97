"""The ``dig`` command: ``dig data|train|eval|retrieve|export|bench ...``.

Each layer registers its own subcommands (``register(subparsers)``) and is imported
lazily (by name, ``importlib``), so ``dig data ...`` does not pay for importing the model
or the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from dig_torchrec.errors import DIGError, interrupted  # noqa: F401 - interrupted: re-exported for callers of the CLI layer

# subcommand -> module that defines register(subparsers)
_COMMANDS = {
    "data": "dig_torchrec.data.cli",
    "train": "dig_torchrec.training.cli",
    "eval": "dig_torchrec.retrieval.cli",
    "retrieve": "dig_torchrec.retrieval.cli",
    "export": "dig_torchrec.export.cli",
    "bench": "dig_torchrec.bench",
}


def build_parser(argv: List[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dig", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(_COMMANDS) + "}")
    sub.required = True
    wanted = next((a for a in argv if a in _COMMANDS), None)
    modules = [_COMMANDS[wanted]] if wanted else list(dict.fromkeys(_COMMANDS.values()))
    for mod in modules:
        importlib.import_module(mod).register(sub)
    return parser


# Libraries that log their loader / kernel-argument chatter at INFO on the root logger
# (``fbgemm_gpu/__init__.py``: "Successfully loaded: '...so'", TBE argument dicts).
_CHATTY_LIBRARIES = (f"{os.sep}fbgemm_gpu{os.sep}", f"{os.sep}torchrec{os.sep}")


class LibraryChatterFilter(logging.Filter):
    """Demote INFO records logged from inside fbgemm_gpu / torchrec to DEBUG.

    Args:
        verbose: keep them (relabelled DEBUG) instead of dropping them.
    """

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and any(s in (record.pathname or "") for s in _CHATTY_LIBRARIES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.verbose
        return True


def setup_logging(verbose: bool) -> None:
    """Root logging for the CLI: INFO (DEBUG with ``-v``), library chatter demoted to DEBUG."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, LibraryChatterFilter) for f in handler.filters):
            handler.addFilter(LibraryChatterFilter(verbose))
    if not verbose:  # torch's "is_fx_tracing will return true for both ..." notice on every traced call
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        rc = args.func(args)
    except DIGError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, (SystemExit, GeneratorExit)) or not interrupted(e):
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
