"""``train.precision`` and ``train.tf32``: how the dense network computes.

* ``fp32`` (default): everything in float32.
* ``bf16``: the Mixer (DIN + DCNv2 + MoE + head, most of a step's FLOPs) runs under
  ``torch.autocast(dtype=bfloat16)`` and returns float32 logits, so every loss term, the
  loss sum, the codebook EMA (buffers updated under ``no_grad`` from the float32 e_v),
  the embedding tables and the optimizer states stay float32. bf16 needs no loss scaling.
* ``train.tf32`` (default true) lets CUDA run float32 matmuls and convolutions on TF32
  tensor cores (A100 and later); it has no effect on CPU.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from dig_torchrec.config import TrainConfig
from dig_torchrec.errors import ConfigError
from dig_torchrec.modules.mixer import Mixer

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The Mixer's autocast dtype for ``train.precision`` (None: float32, no autocast)."""
    if precision not in _DTYPES:
        raise ConfigError(f"config key 'train.precision' = {precision!r}; must be one of {', '.join(_DTYPES)}")
    return _DTYPES[precision]


def configure_precision(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Apply ``train.precision`` to every Mixer in ``model`` and ``train.tf32`` to CUDA matmuls.

    Args:
        model: the DIG module (unwrapped from DMP/DDP).
        cfg: the ``train`` config section.
        device: this process's compute device.
    """
    dtype = autocast_dtype(cfg.precision)
    for m in model.modules():
        if isinstance(m, Mixer):
            m.autocast_dtype = dtype
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ConfigError("config key 'train.precision' = 'bf16' but this GPU has no bf16 support; use fp32")
    logger.info("precision: Mixer %s, losses/EMA/tables fp32%s", cfg.precision,
                f", TF32 matmuls {'on' if cfg.tf32 else 'off'}" if device.type == "cuda" else "")
