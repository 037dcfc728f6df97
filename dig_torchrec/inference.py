"""Load a training checkpoint or a serving bundle as a plain, single-process model for inference.

Evaluation, retrieval and export need neither a process group nor the training plan:
``load_for_inference`` builds an unsharded :class:`DIGModel` from the checkpoint's own
``config.yaml`` and ``dataset_meta.json`` and lets DCP copy every saved shard into the
whole tensors (a checkpoint written by any number of ranks loads here).

Every load is verified before the model sees it: a serving bundle's files are checked
against the sha256 hashes of its manifest, a training checkpoint's metadata and tensor
files must be readable and complete, and the loaded weights must be finite. Each failure
is a :class:`CheckpointError` naming the damaged file.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dig_torchrec.config import DIGConfig, apply_overrides
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import CheckpointError, interrupted
from dig_torchrec.export.bundle import MANIFEST_FILE, verify_bundle
from dig_torchrec.model import DIGModel
from dig_torchrec.training.checkpoint import (
    CheckpointManager,
    check_finite_state,
    check_state_shapes,
    dcp_load_error,
    is_complete,
    read_config,
    read_dataset_meta,
    read_dcp_metadata,
    read_train_state,
    verify_checkpoint_files,
)

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path, flag: str = "--checkpoint") -> Path:
    """A checkpoint (or bundle) directory, or the newest complete checkpoint of a run directory.

    "Newest" is the most recently written complete checkpoint (``train_state.json``
    ``time``, then the step): the current run's, even if an older run left a
    higher-numbered step behind.

    Args:
        path: ``run_dir/checkpoints/step-N``, a serving bundle, or a run directory holding
            ``checkpoints/``.
        flag: the command-line flag ``path`` came from (named in errors).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{flag} {p}: checkpoint directory does not exist")
    if p.is_file():
        raise CheckpointError(f"{flag} {p}: is a file; pass a checkpoint directory (run/checkpoints/step-N), "
                              f"a run directory or a serving bundle")
    if is_complete(p):
        return p
    if (p / "checkpoints").is_dir():
        latest = CheckpointManager(p).latest()  # the most recently written one
        if latest is None:
            raise CheckpointError(f"{flag} {p}: run directory has no complete checkpoint under {p / 'checkpoints'}")
        return latest
    if (p / ".metadata").exists():
        raise CheckpointError(f"{flag} {p}: checkpoint is incomplete (no COMPLETE marker); it was interrupted while saving")
    raise CheckpointError(f"{flag} {p}: not a checkpoint directory (no .metadata / COMPLETE) and not a run directory")


def verify_artifact(path: Path) -> None:
    """Bundles: every file against the manifest's sha256; training checkpoints: metadata and
    tensor files readable and every tensor record's CRC-32 intact.

    Args:
        path: a resolved checkpoint or bundle directory.
    """
    bundle = (path / MANIFEST_FILE).exists()
    if bundle:
        verify_bundle(path)
    verify_checkpoint_files(path, deep=not bundle)  # a bundle's bytes are covered by the sha256 already


def check_tokenizer_initialized(model: Optional[DIGModel], cfg: DIGConfig, path: Path,
                                initialized: Optional[bool] = None) -> None:
    """Refuse a checkpoint saved before tokenizer init: every item would share one SID.

    Args:
        model: the loaded model (or None with ``initialized`` given).
        cfg: its config.
        path: the checkpoint (named in the error with its step).
        initialized: the saved flag, when no model is loaded.
    """
    if initialized is None:
        tok = getattr(model, "tokenizer", None)
        initialized = tok is None or tok.is_initialized
    if initialized:
        return
    try:
        step = read_train_state(path).get("step", "?")
    except CheckpointError:
        step = "?"
    if step == "?" and (path / MANIFEST_FILE).is_file():
        step = json.loads((path / MANIFEST_FILE).read_text()).get("step", "?")
    raise CheckpointError(
        f"{path}: saved at step {step}, before the tokenizer was initialized (tokenizer.init_after_steps="
        f"{cfg.tokenizer.init_after_steps}); its SIDs are meaningless: train past step "
        f"{cfg.tokenizer.init_after_steps} or lower tokenizer.init_after_steps"
    )


TOKENIZER_FLAG = "model.tokenizer.initialized"


def _load_no_dist(state: dict, path: Path) -> None:
    """``dcp.load`` in one process, without DCP's "torch.distributed is disabled" UserWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def check_saved_tokenizer(path: Path, cfg: DIGConfig) -> None:
    """:func:`check_tokenizer_initialized` from the checkpoint alone (one scalar is read), so
    ``dig export`` / ``dig eval`` refuse before building or loading the whole model.

    Args:
        path: a resolved checkpoint or bundle directory.
        cfg: its stored config.
    """
    if TOKENIZER_FLAG not in read_dcp_metadata(path).state_dict_metadata:
        return
    flag = {TOKENIZER_FLAG.split(".", 1)[1]: torch.zeros((), dtype=torch.long)}
    try:
        _load_no_dist({"model": flag}, path)
    except (Exception, CheckpointException):  # a damaged file: the full load names it
        return
    if int(next(iter(flag.values()))) != 1:
        check_tokenizer_initialized(None, cfg, path, initialized=False)


def saved_step(path: Path) -> Optional[int]:
    """Training steps behind a checkpoint (``train_state.json``) or an export bundle (``manifest.json``)."""
    for name in ("train_state.json", "manifest.json"):
        f = path / name
        if f.is_file():
            step = (read_train_state(path) if name == "train_state.json" else json.loads(f.read_text())).get("step")
            if step is not None:
                return int(step)
    return None


def load_for_inference(
    checkpoint_dir: str | Path,
    device: torch.device | str = "cpu",
    overrides: Sequence[str] = (),
    *,
    require_tokenizer: bool = False,
    verify: bool = True,
) -> Tuple[DIGModel, DIGConfig, DatasetMeta]:
    """Single-process, unsharded DIG model in eval mode, with its config and dataset metadata.

    Args:
        checkpoint_dir: a checkpoint (``run_dir/checkpoints/step-N``) or a run directory
            (its newest complete checkpoint is used).
        device: where to put the model.
        overrides: dotted config overrides applied to the stored config that do not change
            the model's shapes (e.g. ``data.path=...``, ``eval.beam_size=128``).
        require_tokenizer: refuse a checkpoint saved before tokenizer init (``dig eval``,
            ``dig retrieve`` and ``dig export`` do).
        verify: check the files first (:func:`verify_artifact`).
    """
    path = resolve_checkpoint(checkpoint_dir)
    if verify:
        verify_artifact(path)
    cfg = apply_overrides(read_config(path), overrides)
    if require_tokenizer:
        check_saved_tokenizer(path, cfg)
    meta = read_dataset_meta(path)
    model = DIGModel(cfg, meta, device="cpu")
    state = model.state_dict()
    check_state_shapes(path, state, "model")
    try:
        _load_no_dist({"model": state}, path)
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        if interrupted(e):
            raise KeyboardInterrupt from e
        raise dcp_load_error(path, e) from e
    check_finite_state(path, state, "model")
    model.load_state_dict(state)
    step = saved_step(path)
    if step is not None:  # tokenizer.freeze_after_steps: were the codebooks (and SIDs) frozen at this step?
        model.tokenizer.restore_schedule(step)
    if require_tokenizer:
        check_tokenizer_initialized(model, cfg, path)
    model.to(device)
    model.eval()
    logger.info("loaded %s for inference (%s)", path, device)
    return model, cfg, meta
