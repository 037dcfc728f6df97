"""Optimizers: a fused sparse optimizer for the embedding tables and dense Adam for the rest.

* Embedding tables get their optimizer fused into the backward pass
  (``apply_optimizer_in_backward``): FBGEMM updates only the rows a batch touched, and
  row-wise Adagrad (the default) keeps one scalar of state per row, so a 20M-row table
  does not carry two Adam moments.
* Everything else (DIN, cross net, experts, VQ encoder, u2t MLP) uses Adam (lr 1e-3 in
  the paper, ``train.lr``) through :class:`KeyedOptimizerWrapper`, optionally with
  gradient-norm clipping (``train.grad_clip``).
* Both are joined in a :class:`CombinedOptimizer`, so one ``step``/``zero_grad``/
  ``state_dict`` covers the model; its state dict is keyed by parameter FQN, which is
  what lets DCP reshard it.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper, OptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from dig_torchrec.config import TrainConfig
from dig_torchrec.distributed.env import collective_device
# the fused sparse optimizer is wired with the sharding (distributed/sharding.py); re-exported here
from dig_torchrec.distributed.sharding import attach_sparse_optimizer, embedding_parameters, sparse_optimizer_spec  # noqa: F401
from dig_torchrec.errors import NumericalError

logger = logging.getLogger(__name__)

class GuardedOptimizer(OptimizerWrapper):
    """Checks dense gradients for NaN/inf before stepping (``train.nan_policy``).

    ``error`` raises :class:`NumericalError` naming the step and parameter; ``skip`` drops
    the step (gradients zeroed) and counts it. Ranks agree through an all-reduce, so DDP
    replicas never diverge. The trainer also sets :attr:`skip_next` when the loss itself
    was non-finite. Sparse tables are updated inside backward, so their gradients are not
    seen here; a non-finite loss is caught before backward instead.

    Args:
        optimizer: the dense keyed optimizer.
        nan_policy: ``error`` or ``skip``.
    """

    def __init__(self, optimizer: KeyedOptimizer, nan_policy: str = "error") -> None:
        super().__init__(optimizer)
        self.nan_policy = nan_policy
        self.step_index = 0  # the trainer's step counter (for messages)
        self.skip_next = False
        self.skipped_steps = 0

    def _first_bad_grad(self) -> Optional[str]:
        """Name of the first parameter whose gradient holds a NaN/inf (reads every flag: error path only)."""
        for name, p in self.params.items():
            g = p.grad
            if g is not None and g.numel() and not bool(torch.isfinite(g).all()):
                return name
        return None

    def _nonfinite_flag(self) -> torch.Tensor:
        """``[1]`` int32 on the gradients' device: 1 when any dense gradient holds a NaN/inf.

        One fused check without a host sync: per-gradient ``isfinite(...).all()`` reductions
        stay on the device and are combined there.
        """
        grads = [p.grad for p in self.params.values() if p.grad is not None and p.grad.numel()]
        if not grads:
            return torch.zeros(1, dtype=torch.int32, device="cpu")
        finite = torch.stack([torch.isfinite(g).all() for g in grads])
        return (~finite.all()).to(torch.int32).reshape(1)

    def step(self, closure: Any = None) -> None:
        """Step unless a gradient (any rank) or the loss was non-finite: one host sync per step."""
        flag = self._nonfinite_flag()
        if self.skip_next:
            flag = torch.ones_like(flag)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = flag.to(collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()):  # the step's one host sync in the dense optimizer
            bad = self._first_bad_grad()
            if self.nan_policy == "error" and not self.skip_next:
                where = f"parameter '{bad}'" if bad else "a parameter on another rank"
                raise NumericalError(f"step {self.step_index}: non-finite gradient in {where} (train.nan_policy=error)")
            self.skipped_steps += 1
            logger.warning("step %d: skipping the dense update (non-finite loss or gradient)", self.step_index)
            self._optimizer.zero_grad(set_to_none=True)
            self.skip_next = False
            return
        self._optimizer.step(closure)


def build_dense_optimizer(model: nn.Module, cfg: TrainConfig) -> GuardedOptimizer:
    """Adam over every parameter without an in-backward optimizer.

    Args:
        model: the sharded (DMP) model.
        cfg: the ``train`` config section (``lr``, ``grad_clip``, ``nan_policy``).
    """
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense: KeyedOptimizer = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(ps, lr=cfg.lr))
    dense.init_state()  # materialize Adam moments now so DCP can load into them in place
    dense.zero_grad(set_to_none=True)
    if cfg.grad_clip > 0:
        dense = GradientClippingOptimizer(dense, clipping=GradientClipping.NORM, max_gradient=cfg.grad_clip)
    return GuardedOptimizer(dense, cfg.nan_policy)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Tuple[CombinedOptimizer, GuardedOptimizer]:
    """``CombinedOptimizer([fused sparse, dense])`` and the dense part (for NaN guarding).

    Args:
        model: the sharded (DMP) model; exposes ``fused_optimizer``.
        cfg: the ``train`` config section.
    """
    dense = build_dense_optimizer(model, cfg)
    combined = CombinedOptimizer([model.fused_optimizer, dense])  # type: ignore[list-item]
    return combined, dense


class LinearWarmup:
    """Linear LR warmup over ``warmup_steps`` for every param group (sparse and dense).

    Stateless: the LR is a function of the step, so a resumed run gets the same LRs.

    Args:
        optimizer: the combined optimizer.
        warmup_steps: steps to ramp from ``1/warmup_steps`` of the base LR to the base LR; 0 disables.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int) -> None:
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]

    def factor(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def apply(self, step: int) -> None:
        """Set the LRs for step ``step`` (0-based)."""
        if self.warmup_steps <= 0:
            return
        f = self.factor(step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
