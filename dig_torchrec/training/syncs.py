"""Count host-device synchronisations on any device (a CPU stand-in for a CUDA profile).

On CUDA every read of a device value by the host (``Tensor.item()``, ``bool(t)``,
``int(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``) blocks the CPU until
the GPU has finished all queued work, and a training step with a hundred of them runs at
the speed of its slowest kernel launch. On CPU those calls are free, so they creep back in
unnoticed. :class:`HostSyncCounter` counts them while it is active, whatever the device:

* scalar reads through the dispatcher: ``aten::_local_scalar_dense`` (what ``item``,
  ``bool``, ``int`` and ``float`` of a tensor call), counted as ``scalar``;
* ``Tensor.cpu``, ``Tensor.tolist`` and ``Tensor.numpy`` (patched while active), counted
  by name.

Data-dependent shapes (``nonzero``, boolean-mask indexing, ``unique``) also sync on CUDA;
they are counted separately under ``shape`` (``aten::nonzero``, ``aten::unique*``,
``aten::masked_select``) and are *not* part of :attr:`HostSyncCounter.total`.

Every hit is attributed to the innermost Python frame that made it: ``project`` when that
frame is in ``dig_torchrec/`` (what this package controls), else ``library`` (torch,
TorchRec, FBGEMM; e.g. FBGEMM's CPU TBE reads its offsets on the host, which its CUDA
kernel does not). Reads inside ``torch/optim/`` are ignored: a non-capturable torch
optimizer keeps its ``step`` counters on the host, so they are no device sync on CUDA.

Example::

    with HostSyncCounter() as syncs:
        loss, _ = model(batch); loss.backward(); optimizer.step()
    assert syncs.project <= 5, syncs.where
"""

from __future__ import annotations

import collections
import traceback
from typing import Any, Callable, Counter, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_OPS = {torch.ops.aten._local_scalar_dense.default}
_SHAPE_PREFIXES = ("aten.nonzero", "aten.unique", "aten._unique", "aten.masked_select")
_PATCHED = ("cpu", "tolist", "numpy")
_SKIP_FRAMES = ("syncs.py", "torch/_compile.py", "torch/_dynamo/", "torch/utils/_contextlib.py", "torch/_tensor.py")
_HOST_STATE_FRAMES = ("torch/optim/",)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        if func in _SCALAR_OPS:
            self.counter._hit("scalar")
        elif str(func).startswith(_SHAPE_PREFIXES):
            self.counter.shape += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """Context manager counting host syncs (see the module docstring).

    Args:
        record_stacks: keep a short stack of every counted call in :attr:`where` (for
            finding the culprit when a test fails).
    """

    def __init__(self, record_stacks: bool = True) -> None:
        self.counts: Counter[str] = collections.Counter()
        self.origins: Counter[str] = collections.Counter()
        self.shape = 0
        self.where: List[str] = []
        self.record_stacks = record_stacks
        self._originals: Dict[str, Callable[..., Any]] = {}
        self._mode: Optional[_Dispatch] = None
        self._depth = 0  # patched calls that dispatch (cpu) must not count twice

    @property
    def total(self) -> int:
        """Scalar reads + ``cpu`` + ``tolist`` + ``numpy`` calls, wherever they came from."""
        return sum(self.counts.values())

    @property
    def project(self) -> int:
        """The syncs made by ``dig_torchrec`` code itself."""
        return self.origins["project"]

    @property
    def library(self) -> int:
        """The syncs made inside torch / TorchRec / FBGEMM."""
        return self.origins["library"]

    def _hit(self, kind: str) -> None:
        if self._depth:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.endswith(_SKIP_FRAMES)
                  and not any(s in f.filename for s in _SKIP_FRAMES)]
        inner = frames[-1].filename if frames else ""
        if any(s in inner for s in _HOST_STATE_FRAMES):
            return
        origin = "project" if "/dig_torchrec/" in inner else "library"
        self.counts[kind] += 1
        self.origins[origin] += 1
        if self.record_stacks:
            self.where.append(f"{origin} {kind}: " + " <- ".join(
                f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames[-4:])))

    def _patch(self, name: str) -> None:
        original = getattr(torch.Tensor, name)
        self._originals[name] = original
        counter = self

        def wrapper(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter._hit(name)
            counter._depth += 1
            try:
                return original(t, *args, **kwargs)
            finally:
                counter._depth -= 1

        setattr(torch.Tensor, name, wrapper)

    def __enter__(self) -> "HostSyncCounter":
        for name in _PATCHED:
            self._patch(name)
        self._mode = _Dispatch(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        for name, fn in self._originals.items():
            setattr(torch.Tensor, name, fn)
        self._originals.clear()

    def summary(self) -> str:
        """``total=N (scalar=a, cpu=b, ...); shape syncs=M``."""
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return (f"total={self.total} ({parts}; project={self.project}, library={self.library}); "
                f"data-dependent shapes={self.shape}")
