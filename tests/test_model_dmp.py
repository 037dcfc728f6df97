"""The model built on ``meta``, sharded by DMP on 2 gloo ranks, trains on data-layer batches
(directly and through ``TrainPipelineSparseDist``); tokenizer buffers stay identical across ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        from dig_torchrec.config import DataConfig
        from dig_torchrec.data.items import ItemTable
        from dig_torchrec.data.reader import ExposureReader, open_dataset
        from dig_torchrec.model import DIGModel
        from test_model_helpers import tiny_config

        data_cfg = DataConfig(path=root, batch_size=32, history_length=5, negatives_per_positive=3,
                              retrieval_positives=8, shuffle_buffer=256)
        meta, schema = open_dataset(root, data_cfg)
        cfg = tiny_config()
        cfg.data = data_cfg
        torch.manual_seed(0)
        model = DIGModel(cfg, meta, device="meta")
        apply_optimizer_in_backward(
            torch.optim.SGD,
            [*model.embedding_bags.parameters(), *model.sid_embedding_bags.parameters()], {"lr": 0.05},
        )
        tables = [c.name for c in model.embedding_bags.embedding_bag_configs()] + ["sid"]
        constraints = {t: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for t in tables}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints)
        sharders = [EmbeddingBagCollectionSharder()]
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
        for name, p in dmp.named_parameters():
            assert torch.isfinite(p).all(), f"rank {rank}: {name} not initialised"
        dense_opt = torch.optim.Adam([p for n, p in dmp.named_parameters() if "embedding_bags" not in n], lr=1e-3)
        reader = ExposureReader(root, "train", data_cfg, schema, rank=rank, world_size=world)
        batches = iter(reader)

        def step() -> torch.Tensor:
            dense_opt.zero_grad()
            loss, out = dmp(next(batches))
            loss.backward()
            dense_opt.step()
            dmp.module.on_step_accepted(out)
            assert torch.isfinite(loss)
            return loss

        step()  # rank-path warm-up step (tokenizer not initialised yet)
        inner = dmp.module
        inner.eval()  # e_v of the catalog through the sharded tables (collective: every rank calls it)
        items = ItemTable.load(root, schema, meta)
        inner.initialize_tokenizer(inner.corpus_item_representations(items, batch_size=64))
        inner.train()
        step()
        # the rest through TrainPipelineSparseDist: the embedding_bags call gets pipelined
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(dmp, dense_opt, torch.device("cpu"))
        for _ in range(3):
            out = pipeline.progress(batches)
            inner.on_step_accepted(out)
            assert torch.isfinite(out.losses["total"]) and float(out.losses["recall"]) > 0
        assert inner.embedding_bags.is_pipelined, "embedding_bags was not pipelined"
        pipeline.detach()
        q = inner.tokenizer.quantizer
        for name, buf in (("codebooks", q.codebooks), ("item_sid_table", inner.tokenizer.item_sid_table),
                          ("ema_count", q.ema_count), ("u2i_sum", inner.u2t_stats.u2i_sum)):
            gathered = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(gathered, buf.contiguous())
            assert torch.equal(gathered[0], gathered[1]), f"{name} differs across ranks"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_meta_model_sharded_by_dmp_on_two_gloo_ranks(tiny_dataset: Path):
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_dataset)), nprocs=2, join=True)
