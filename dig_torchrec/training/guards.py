"""Numerical guards: NaN/inf detection of every loss term and gradient (``train.nan_policy``).

Where each check sits, and why:

* **Loss terms, before backward** (:func:`check_loss_terms`, called from the trainer's
  forward). The embedding tables use a *fused* optimizer (``apply_optimizer_in_backward``):
  FBGEMM applies the sparse update inside ``backward`` itself, so there is no "sparse
  step" left to skip once backward has run. A non-finite loss is therefore caught before
  backward; under ``skip`` the trainer then backpropagates a zero loss that has no path to
  the embedding tables, so the fused update never fires for that batch.
* **Dense gradients, before the dense step** (``GuardedOptimizer`` in ``optim.py``):
  a finite loss can still give a non-finite gradient (e.g. an overflow in backward). Adam
  is skipped (gradients zeroed) or the run stops.
* **Parameters, before every checkpoint** (``CheckpointManager.save(check_finite=True)``,
  using :func:`first_nonfinite`): a NaN is never written to disk; the save raises
  :class:`~dig_torchrec.errors.NumericalError` naming the step and the tensor.

Ranks agree through an all-reduce (MAX of the per-rank flags), so every rank skips the
same step (or raises at the same step) and DDP / the sharded tables never diverge.

Policies:

* ``error`` (default): raise :class:`NumericalError` naming the step and the loss term
  (or parameter), e.g. ``step 3: non-finite loss term 'rank'``.
* ``skip``: log a warning, count the batch (``train/skipped_steps`` in the metrics and
  in checkpoints) and do no update for it.
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from dig_torchrec.distributed.env import collective_device
from dig_torchrec.errors import NumericalError

logger = logging.getLogger(__name__)

NAN_POLICIES = ("error", "skip")


def nonfinite_flags(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[terms]`` int32 on the losses' device: 1 where a term holds a NaN/inf (no host sync)."""
    if not losses:
        return torch.zeros(0, dtype=torch.int32, device="cpu")
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()])
    return (~finite).to(torch.int32)


def nonfinite_terms(losses: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the loss terms (this rank) holding a NaN or inf, in dict order."""
    return [name for name, f in zip(losses, nonfinite_flags(losses).tolist()) if f]


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise MAX of an int flag vector over every rank (identity on one process).

    The result stays on the collective's device (no host copy): read it once.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        reduced = flags.to(collective_device())
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return reduced
    return flags


def check_loss_terms(step: int, losses: Mapping[str, torch.Tensor], policy: str) -> List[str]:
    """Apply ``train.nan_policy`` to a step's loss terms (a collective call on every rank).

    One fused check and one host sync per step: the per-term flags are computed on the
    device, all-reduced there, and read back together.

    Args:
        step: the step being trained (1-based, as logged).
        losses: every loss term of the step, including ``total`` (``DIGOutput.losses``).
        policy: ``error`` or ``skip``.

    Returns:
        The non-finite terms on any rank (``total`` listed only when no single term is):
        empty when the step is fine. Under ``skip`` a non-empty result means "skip it".

    Raises:
        NumericalError: under ``error``, naming the step and the first bad term.
    """
    if policy not in NAN_POLICIES:
        raise ValueError(f"train.nan_policy = {policy!r}; must be one of {', '.join(NAN_POLICIES)}")
    names = list(losses)
    flags = any_rank(nonfinite_flags(losses))
    bad = [n for n, f in zip(names, flags.tolist()) if f]  # the one host sync
    if not bad:
        return []
    terms = [n for n in bad if n != "total"] or ["total"]
    if policy == "error":
        raise NumericalError(
            f"step {step}: non-finite loss term '{terms[0]}' (train.nan_policy=error; "
            f"set train.nan_policy=skip to skip such batches)"
        )
    logger.warning("step %d: non-finite loss term(s) %s: skipping the batch (train.nan_policy=skip)",
                   step, ", ".join(terms))
    return terms


def first_nonfinite(named: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """Name of the first floating-point tensor holding a NaN or inf, or None."""
    for name, t in named:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None
