"""``TrainPipelineSparseDist`` for DIG: overlap the batch's embedding input all-to-all with compute.

TorchRec's pipeline finds the sharded modules to pipeline by fx-tracing the model's
``forward`` and keeping those whose input is a plain attribute of the batch. DIG's
forward is not fx-traceable (it branches on batch sizes and calls the tokenizer with
Python control flow), and it should not have to be: the only call worth pipelining is
``embedding_bags(batch.sparse_features)``. So :class:`DIGTrainPipeline` traces a
*stub* module that holds the very same sharded ``embedding_bags`` object and whose
forward is just that call. TorchRec then swaps in its pipelined forward on the real
sharded module exactly as it would after tracing the whole model.

``sid_embedding_bags`` is called inside ``forward`` with a KJT the model builds from SIDs
assigned in the same step, so it cannot be prefetched; it keeps its normal sharded
forward (input all-to-all, lookup, output all-to-all inside the call), as TorchRec does for
any sharded module it cannot pipeline.

This overrides ``TrainPipelineSparseDist._pipeline_model``, a private method, and uses
``_rewrite_model``/``_override_input_dist_forwards`` from torchrec 1.8 (pinned in the
Makefile); ``tests/test_distributed_pipeline.py`` checks the rewrite on real 2-rank runs.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Type

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel, ShardedModule
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.pipeline_context import TrainPipelineContext
from torchrec.distributed.train_pipeline.runtime_forwards import PipelinedForward
from torchrec.distributed.train_pipeline.utils import _override_input_dist_forwards, _rewrite_model

logger = logging.getLogger(__name__)

# model attribute (a sharded module) -> the batch attribute it is called with
DEFAULT_PIPELINED_INPUTS: Dict[str, str] = {"embedding_bags": "sparse_features"}


class _PipelineStub(nn.Module):
    """A traceable stand-in: the model's pipelinable sharded modules, called on batch fields."""

    def __init__(self, modules: Dict[str, nn.Module], inputs: Dict[str, str]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)  # the same objects as in the real model
        self._inputs = dict(inputs)

    def forward(self, batch):  # noqa: ANN001 - traced with a Proxy
        return [getattr(self, name)(getattr(batch, field)) for name, field in self._inputs.items()]


class DIGTrainPipeline(TrainPipelineSparseDist):
    """``TrainPipelineSparseDist`` that pipelines the model's batch-fed sharded modules without tracing it.

    Args:
        model: the DMP-wrapped DIG model.
        optimizer: the combined optimizer (stepped after backward).
        device: compute device.
        pipelined_inputs: sharded module attribute -> batch attribute it consumes.
        **kwargs: passed to ``TrainPipelineSparseDist`` (e.g. ``custom_model_fwd``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        pipelined_inputs: Optional[Dict[str, str]] = None,
        **kwargs,
    ) -> None:
        super().__init__(model, optimizer, device, **kwargs)
        self._pipelined_inputs = dict(pipelined_inputs or DEFAULT_PIPELINED_INPUTS)

    def _stub(self) -> _PipelineStub:
        root = self._model.module if isinstance(self._model, DistributedModelParallel) else self._model
        modules: Dict[str, nn.Module] = {}
        inputs: Dict[str, str] = {}
        for name, field in self._pipelined_inputs.items():
            module = getattr(root, name, None)
            if isinstance(module, ShardedModule):
                modules[name] = module
                inputs[name] = field
            else:
                logger.warning("'%s' is not a sharded module; it runs without pipelining", name)
        return _PipelineStub(modules, inputs)

    def _pipeline_model(
        self,
        batch,  # noqa: ANN001
        context: TrainPipelineContext,
        pipelined_forward: Type[PipelinedForward] = PipelinedForward,
    ) -> None:
        stub = self._stub()
        (
            self._pipelined_modules,
            _,  # the stub: the pipeline keeps driving the real model
            self._original_forwards,
            self._pipelined_postprocs,
            _,
        ) = _rewrite_model(
            model=stub,
            context=context,
            dist_stream=self._data_dist_stream,
            default_stream=torch.get_device_module(self._device).current_stream(),
            batch=batch,
            apply_jit=False,
            pipelined_forward=pipelined_forward,
            pipeline_postproc=False,
        )
        self.start_sparse_data_dist(batch, context)
        self._original_kjt_dist_forwards = _override_input_dist_forwards(self._pipelined_modules)
        logger.debug("pipelined sharded modules: %s", [type(m).__name__ for m in self._pipelined_modules])

    @property
    def pipelined_module_count(self) -> int:
        """How many sharded modules currently run with the prefetched input dist."""
        return len(self._pipelined_modules)
