"""Error types. Each one's message is a one-line cause naming the file, column, key or step.

The CLI prints ``error: <message>`` for any :class:`DIGError` and exits with status 2.
"""


class DIGError(Exception):
    """Base class of every user-facing error."""


class ConfigError(DIGError, ValueError):
    """A config key is unknown, has the wrong type, or has an impossible value."""


class DataError(DIGError, ValueError):
    """Bad input data: names the file and the column (and the row where known)."""


class CheckpointError(DIGError):
    """A checkpoint is missing, incomplete or from an incompatible model config."""


class NumericalError(DIGError, FloatingPointError):
    """A NaN or inf loss/gradient under ``train.nan_policy=error``: names the step and term."""


def interrupted(exc: BaseException) -> bool:
    """True when ``exc`` is, wraps or was caused by a KeyboardInterrupt (Ctrl-C / SIGINT).

    ``torch.distributed.checkpoint`` catches every ``BaseException`` of a save or load and
    re-raises it wrapped in a ``CheckpointException``, so a Ctrl-C during a checkpoint save
    arrives as an ordinary exception.
    """
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for wrapped in failures.values():
                inner = wrapped[0] if isinstance(wrapped, tuple) else getattr(wrapped, "exc", wrapped)
                if isinstance(inner, BaseException):
                    stack.append(inner)
                elif "KeyboardInterrupt" in str(wrapped):
                    return True
    return False
