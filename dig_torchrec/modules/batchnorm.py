"""BatchNorm whose running statistics change only when the training step is accepted.

``nn.BatchNorm1d`` updates ``running_mean``/``running_var`` inside every training
forward. DIG's trainer may reject a step after its forward (``train.nan_policy=skip``),
so :class:`StepBatchNorm1d` keeps the step's updated statistics aside (``pending``) and
writes them into its buffers only on :meth:`StepBatchNorm1d.commit`
(``DIGModel.on_step_accepted``); :meth:`StepBatchNorm1d.discard` drops them.

The forward is ``nn.BatchNorm1d``'s own kernel call on a copy of the running statistics,
so outputs and committed statistics are bit-identical to ``nn.BatchNorm1d``. Several
training calls in one step chain on the pending copy, in call order, as the buffers would.
The buffers, parameters and state-dict keys are ``nn.BatchNorm1d``'s.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StepBatchNorm1d"]


class StepBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with running-statistic updates deferred to :meth:`commit`."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.BatchNorm1d's signature
        super().__init__(*args, **kwargs)
        # (running_mean, running_var, training calls) of the open step; None = no training call yet
        self._pending: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        if self._pending is None:
            mean, var, calls = self.running_mean.clone(), self.running_var.clone(), 0
        else:
            mean, var, calls = self._pending
        calls += 1
        # nn.BatchNorm1d's exponential_average_factor, with num_batches_tracked as it would be
        factor = self.momentum if self.momentum is not None else 1.0 / float(int(self.num_batches_tracked) + calls)
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)  # updates mean/var in place
        self._pending = (mean, var, calls)
        return out

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with the running statistics as of now (this step's pending ones if any),
        updating nothing: the model as inference would score ``x`` after this step."""
        mean, var = (self._pending[0], self._pending[1]) if self._pending is not None else (
            self.running_mean, self.running_var)
        return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=self.eps)

    @torch.no_grad()
    def commit(self) -> None:
        """Write the open step's statistics into the buffers."""
        if self._pending is None:
            return
        mean, var, calls = self._pending
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self.num_batches_tracked.add_(calls)
        self._pending = None

    def discard(self) -> None:
        """Drop the open step's statistics (a rejected step, or a new step begins)."""
        self._pending = None
