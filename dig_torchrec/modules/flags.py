"""Python-bool mirrors of 0-dim flag buffers, so hot paths do not sync the device to read them.

A flag such as ``DIGTokenizer.initialized`` is a buffer (it must be checkpointed and
broadcast like the codebooks), but reading it with ``int(buf)`` is a host-device sync on
CUDA, and the forward pass used to read it several times per step. :class:`BufferFlag`
caches the value together with the buffer's identity and version counter: any in-place
write (``fill_``, ``copy_``, ``load_state_dict``, a DCP load) bumps the version and
replacing the buffer (``to``, ``to_empty``) changes its identity, so the next read syncs
once and every other read is free.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class BufferFlag:
    """A cached ``bool(int(buffer) != 0)`` for a 0-dim buffer.

    Args:
        initial: the value of the buffer when it is created (read without a sync, so a
            ``meta`` buffer is fine).
        buffer: the buffer the initial value belongs to.
    """

    def __init__(self, initial: bool, buffer: torch.Tensor) -> None:
        self._key: Optional[Tuple[int, int]] = self._key_of(buffer)
        self._value = bool(initial)

    @staticmethod
    def _key_of(buffer: torch.Tensor) -> Tuple[int, int]:
        return id(buffer), buffer._version

    def read(self, buffer: torch.Tensor) -> bool:
        """The flag's value: cached unless ``buffer`` was replaced or written since the last read."""
        key = self._key_of(buffer)
        if key != self._key:
            self._value = bool(int(buffer) != 0)  # one sync, only after a write
            self._key = self._key_of(buffer)
        return self._value
