"""Load a training checkpoint as a plain, single-process model for inference.

Evaluation, retrieval and export need neither a process group nor the training plan:
``load_for_inference`` builds an unsharded :class:`DIGModel` from the checkpoint's own
``config.yaml`` and ``dataset_meta.json`` and lets DCP copy every saved shard into the
whole tensors (a checkpoint written by any number of ranks loads here).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp

from dig_torchrec.config import DIGConfig
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import CheckpointError
from dig_torchrec.training.checkpoint import (
    CheckpointManager,
    check_state_shapes,
    is_complete,
    read_config,
    read_dataset_meta,
)

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory.

    Args:
        path: ``run_dir/checkpoints/step-N`` or a run directory holding ``checkpoints/``.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint directory does not exist: {p}")
    if is_complete(p):
        return p
    if (p / "checkpoints").is_dir():
        latest = CheckpointManager(p).latest()
        if latest is None:
            raise CheckpointError(f"run directory {p} has no complete checkpoint under {p / 'checkpoints'}")
        return latest
    if (p / ".metadata").exists():
        raise CheckpointError(f"{p}: checkpoint is incomplete (no COMPLETE marker); it was interrupted while saving")
    raise CheckpointError(f"{p}: not a checkpoint directory (no .metadata / COMPLETE) and not a run directory")


def load_for_inference(
    checkpoint_dir: str | Path,
    device: torch.device | str = "cpu",
    overrides: Sequence[str] = (),
) -> Tuple["DIGModel", DIGConfig, DatasetMeta]:  # noqa: F821
    """Single-process, unsharded DIG model in eval mode, with its config and dataset metadata.

    Args:
        checkpoint_dir: a checkpoint (``run_dir/checkpoints/step-N``) or a run directory
            (its newest complete checkpoint is used).
        device: where to put the model.
        overrides: dotted config overrides applied to the stored config that do not change
            the model's shapes (e.g. ``data.path=...``, ``eval.beam_size=128``).
    """
    from dig_torchrec.config import _apply, parse_override, validate  # config helpers (lead's module)
    from dig_torchrec.model import DIGModel

    path = resolve_checkpoint(checkpoint_dir)
    cfg = read_config(path)
    for o in overrides:
        _apply(cfg, parse_override(o))
    validate(cfg)
    meta = read_dataset_meta(path)
    model = DIGModel(cfg, meta, device="cpu")
    state = model.state_dict()
    check_state_shapes(path, state, "model")
    try:
        dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load into the model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    model.load_state_dict(state)
    model.to(device)
    model.eval()
    logger.info("loaded %s for inference (%s)", path, device)
    return model, cfg, meta
