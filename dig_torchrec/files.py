"""Files: atomic writes (a reader sees the old file or the new one, never half of one) and
the checks of an output path made before any work.

Every writer puts its bytes into a hidden temporary file beside the target (same
directory, so the rename never crosses a filesystem) and ``os.replace``-s it over the
target; a failure removes the temporary file and leaves the target untouched.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Type

from dig_torchrec.errors import CheckpointError, ConfigError, DIGError


def temp_path_for(path: str | Path) -> Path:
    """The temporary file :func:`atomic_path` writes for ``path``: hidden, per process."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path, *, mkdir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    Args:
        path: the file to (re)place.
        mkdir: create the parent directories first.
    """
    p = Path(path)
    if mkdir:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(p)
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = False, mkdir: bool = False) -> None:
    """Write ``text`` to ``path`` atomically.

    Args:
        path: the file to (re)place.
        text: its new content.
        fsync: flush the bytes to disk before the rename (checkpoint markers, manifests), so a
            crash right after cannot leave a renamed but empty file.
        mkdir: create the parent directories first.
    """
    with atomic_path(path, mkdir=mkdir) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def check_writable_parent(flag: str, path: Path, error: Type[DIGError] = ConfigError) -> None:
    """The nearest existing parent of ``path`` is a writable directory (``flag`` names the
    command-line option in the error).

    Args:
        flag: e.g. ``--out``.
        path: the file or directory to create.
        error: the error type raised (the calling layer's: ``DataError`` for dataset roots).
    """
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise error(f"{flag} {path}: directory {parent} is not writable")
            break


def check_out_dir(out: Path) -> None:
    """``--out`` must not exist and its parent must be (or be creatable as) a directory.

    Args:
        out: the directory to create.
    """
    if out.exists():
        raise CheckpointError(f"--out {out}: already exists; choose a new directory (a bundle is never overwritten)")
    check_writable_parent("--out", out)


def read_json_file(path: str | Path, error: Type[DIGError], missing: str, invalid: str = "invalid JSON") -> Any:
    """The JSON value in ``path``, or ``error`` naming the file when it is absent or unparsable.

    Args:
        path: the JSON file.
        error: the calling layer's error type (``DataError``, ``CheckpointError``, ...).
        missing: what the message says when ``path`` is not a file (e.g. "missing (not a ...)").
        invalid: what it says, before the parser's message, when the text is not valid JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: {missing}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{p}: {invalid}: {e}") from e
