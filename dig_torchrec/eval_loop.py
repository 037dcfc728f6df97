"""The evaluation loop over a split's exposure batches, shared by training validation
(``Trainer.validate``: sharded model, binned AUCs all-reduced over ranks) and ``dig eval``
(``retrieval.evaluate.exposure_aucs``: one process, exact AUCs).

The caller brings the forward (a DMP call, or an unsharded model with a u2t inference
mode) and what to accumulate; the loop owns eval mode, ``no_grad``, the batch budget, the
device copy and the progress bar.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterable, Optional

import torch
from tqdm import tqdm

from dig_torchrec.data.batch import DIGBatch


@torch.no_grad()
def run_eval_loop(
    model: torch.nn.Module,
    batches: Iterable[DIGBatch],
    num_batches: int,
    forward: Callable[[DIGBatch], Any],
    on_output: Callable[[Any], None],
    *,
    device: Optional[torch.device] = None,
    progress: bool = False,
    desc: str = "eval",
) -> int:
    """Feed up to ``num_batches`` batches through ``forward`` in eval mode; each output goes to
    ``on_output``. The model's train/eval mode is restored afterwards.

    Args:
        model: the module whose mode is switched (the DMP wrapper, or the plain model).
        batches: the split's batches (e.g. an ``ExposureReader``).
        num_batches: how many to take (fewer if the reader ends first).
        forward: ``batch -> DIGOutput``.
        on_output: accumulates one output (AUC histograms, exact-AUC inputs, loss means).
        device: move each batch here first (None: as read).
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        The number of batches evaluated.
    """
    was_training = model.training
    model.eval()
    done = 0
    try:
        for batch in tqdm(islice(batches, num_batches), total=num_batches, desc=desc, leave=False,
                          disable=not progress):
            on_output(forward(batch.to(device) if device is not None else batch))
            done += 1
    finally:
        model.train(was_training)
    return done
