"""Test-only fault injection: make a training process die at a chosen point.

These environment variables exist so the failover and interrupted-write tests can kill
a real worker at a known place. They are **not** for production use; unset, they cost
one dict lookup per step.

``DIG_FAULT_KILL_AT_STEP=N``
    The process SIGKILLs itself right after optimizer step ``N``.
``DIG_FAULT_KILL_IN_CHECKPOINT_SAVE=N``
    The process SIGKILLs itself while writing checkpoint ``step-N``: after the tensor
    files are written, before the checkpoint is marked ``COMPLETE``.
``DIG_FAULT_RANK=r``
    Only rank ``r`` dies (default: every rank that reaches the point).
``DIG_FAULT_SIGNAL=INT``
    Send this signal instead of SIGKILL (``INT``: the Ctrl-C path, which must end with
    ``error: interrupted``, exit 130, and no ``COMPLETE`` checkpoint).

A fault fires only on the first attempt of an elastic job (``TORCHELASTIC_RESTART_COUNT``
unset or 0), so the restarted workers run through.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

KILL_AT_STEP = "DIG_FAULT_KILL_AT_STEP"
KILL_IN_CHECKPOINT_SAVE = "DIG_FAULT_KILL_IN_CHECKPOINT_SAVE"
FAULT_RANK = "DIG_FAULT_RANK"
FAULT_SIGNAL = "DIG_FAULT_SIGNAL"

_POINTS = {"step": KILL_AT_STEP, "checkpoint_save": KILL_IN_CHECKPOINT_SAVE}


def _armed(variable: str, step: int, rank: int) -> bool:
    raw = os.environ.get(variable)
    if not raw:
        return False
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return False  # a restarted attempt: the fault already happened
    only_rank = os.environ.get(FAULT_RANK)
    if only_rank not in (None, "") and int(only_rank) != rank:
        return False
    return int(raw) == step


def fault_point(point: str, step: int, rank: int = 0) -> None:
    """SIGKILL this process if the test-only fault for ``point`` at ``step`` is armed.

    Args:
        point: ``step`` (after an optimizer step) or ``checkpoint_save`` (mid-save).
        step: the current step.
        rank: this process's rank (see ``DIG_FAULT_RANK``).
    """
    if _armed(_POINTS[point], step, rank):
        name = (os.environ.get(FAULT_SIGNAL) or "KILL").upper().removeprefix("SIG")
        what = "SIGKILLs itself" if name == "KILL" else f"sends itself SIG{name}"
        logger.warning("test fault injection (%s=%d): rank %d %s", _POINTS[point], step, rank, what)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
