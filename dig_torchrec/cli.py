"""The ``dig`` command: ``dig data|train|eval|retrieve|export|bench ...``.

Each layer registers its own subcommands (``register(subparsers)``) and is imported
lazily, so ``dig data ...`` does not pay for importing the model or the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from dig_torchrec.errors import DIGError

# subcommand -> module that defines register(subparsers)
_COMMANDS = {
    "data": "dig_torchrec.data.cli",
    "train": "dig_torchrec.training.cli",
    "eval": "dig_torchrec.retrieval.cli",
    "retrieve": "dig_torchrec.retrieval.cli",
    "export": "dig_torchrec.export",
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
        try:
            importlib.import_module(mod).register(sub)
        except ModuleNotFoundError as e:  # a layer that is not installed in this build
            if wanted:
                raise
            logging.getLogger(__name__).debug("skipping %s: %s", mod, e)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except DIGError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
