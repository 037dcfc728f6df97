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
