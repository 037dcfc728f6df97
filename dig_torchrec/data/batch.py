"""The batch type the reader yields and the model consumes.

``DIGBatch`` is a torchrec ``Pipelineable`` (``to``, ``record_stream``, ``pin_memory``), so
``TrainPipelineSparseDist`` can copy it to the device and start the sparse all-to-all of
its KeyedJaggedTensors ahead of the forward pass.

Two row sets ride in one batch (paper §4.1):

* exposure rows (ranking samples): ``u2i``, ``labels``, ``weights`` (B rows);
* retrieval rows: every click of the exposure rows, each followed by
  ``negatives_per_positive`` full-corpus random negatives that carry the negative item's
  static features and the u2i computed from the click's ``user_state``:
  ``retrieval_u2i``, ``retrieval_labels``, ``retrieval_weights`` (R rows).

``sparse_features`` holds both row sets, exposure rows first (stride B + R), so the model
makes ONE EmbeddingBagCollection call on ``batch.sparse_features`` per step and
``TrainPipelineSparseDist`` can pipeline its input all-to-all.

Both row sets have a fixed size per step (padding rows copy a real row and have weight 0),
so every rank runs the same number of steps with the same tensor shapes. Evaluation
batches may have R = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


def make_kjt(keys: Sequence[str], values: Sequence[torch.Tensor], lengths: Sequence[torch.Tensor]) -> KeyedJaggedTensor:
    """Build a KJT key by key with ``length_per_key``/``offset_per_key`` precomputed.

    Precomputing them on the host means the KJT never has to sync a device tensor to
    learn its own layout (as in torchrec's Criteo reader).
    """
    length_per_key: List[int] = [int(v.numel()) for v in values]
    offset_per_key = [0]
    for n in length_per_key:
        offset_per_key.append(offset_per_key[-1] + n)
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.cat(list(values)) if values else torch.empty(0, dtype=torch.long),
        lengths=torch.cat(list(lengths)).to(torch.int32),
        stride=int(lengths[0].numel()) if lengths else 0,
        length_per_key=length_per_key,
        offset_per_key=offset_per_key,
    )


@dataclass
class DIGBatch(Pipelineable):
    sparse_features: KeyedJaggedTensor  # B exposure rows then R retrieval rows; keys = FeatureSchema.keys
    u2i: torch.Tensor  # [B, d_c] float32
    labels: torch.Tensor  # [B] float32 in {0, 1}
    weights: torch.Tensor  # [B] float32: 1 real row, 0 padding
    retrieval_u2i: torch.Tensor  # [R, d_c]
    retrieval_labels: torch.Tensor  # [R]
    retrieval_weights: torch.Tensor  # [R]

    def _map(self, fn) -> "DIGBatch":
        return DIGBatch(**{k: fn(getattr(self, k)) for k in self.__dataclass_fields__})

    def to(self, device: torch.device, non_blocking: bool = False) -> "DIGBatch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for k in self.__dataclass_fields__:
            getattr(self, k).record_stream(stream)

    def pin_memory(self) -> "DIGBatch":
        return self._map(lambda t: t.pin_memory())

    @property
    def batch_size(self) -> int:
        return int(self.labels.numel())

    @property
    def retrieval_size(self) -> int:
        return int(self.retrieval_labels.numel())
