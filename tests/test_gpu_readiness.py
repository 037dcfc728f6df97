"""GPU code paths checked on a CPU host: launcher, schedule preflight, device errors, RNG resume,
batch transfer contract, the 16-GPU sharding plan, mixed precision and the meta-device guard.

None of these needs a GPU or a process group: they catch, on CPU, the mistakes that would
make a 2 x 8 A100 job fail on its first launch (see README "Launching on GPUs").
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from dig_torchrec.config import load_config
from dig_torchrec.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.common

A100_40GB = 40 * 2**30


def _component():
    spec = importlib.util.spec_from_file_location("dig_components", REPO / "launch" / "components.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------- launcher
def test_gpu_component_sets_cuda_device_and_enough_memory() -> None:
    comp = _component()
    app = comp.train("run_dir=/shared/runs/il", config="configs/industrial_large.yaml", nnodes=2, nproc_per_node=8,
                     gpu=8)
    (role,) = app.roles
    cmd = role.args[1]
    assert "train.device=cuda" in cmd.split()
    assert role.resource.gpu == 8
    # 8 ranks of torch + CUDA + FBGEMM: far above the old 4 GB per node
    assert role.resource.memMB >= 8 * comp.MIN_GPU_RANK_MEM_MB
    assert role.resource.memMB == 8 * comp.GPU_RANK_RESOURCES[1] and role.resource.cpu == 8 * comp.GPU_RANK_RESOURCES[0]
    assert role.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_cpu_component_has_no_device_override_and_per_rank_defaults() -> None:
    comp = _component()
    app = comp.train(nproc_per_node=2)
    (role,) = app.roles
    assert "train.device" not in role.args[1]
    assert role.resource.gpu == 0 and role.resource.cpu == 2 and role.resource.memMB == 2 * comp.CPU_RANK_RESOURCES[1]


@pytest.mark.parametrize("kwargs, words", [
    ({"nproc_per_node": 8, "gpu": 4}, "every GPU rank needs its own GPU"),
    ({"nproc_per_node": 8, "gpu": 8, "memMB": 4096}, "per GPU rank"),
])
def test_gpu_component_rejects_impossible_resources(kwargs: Dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        _component().train(**kwargs)


def test_gpu_component_rejects_cpu_device_override() -> None:
    with pytest.raises(ValueError, match="train.device=cuda"):
        _component().train("train.device=cpu", nproc_per_node=2, gpu=2)
    cmd = _component().train("train.device=cuda", nproc_per_node=2, gpu=2).roles[0].args[1]
    assert cmd.count("train.device=cuda") == 1


# ---------------------------------------------------------------------- schedule preflight
def _industrial_large_slots(world: int) -> List[int]:
    """Rows per reader slot of the industrial_large train split (~6M rows in 65,536-row groups)."""
    from dig_torchrec.data.reader import RowGroup, assign_slots

    train_rows = 6_000_000
    groups = [RowGroup("x", i, min(65_536, train_rows - i * 65_536), i) for i in range(-(-train_rows // 65_536))]
    return [sum(g.num_rows for g in s) for s in assign_slots(groups, world)]


def test_schedule_in_steps_that_can_never_fire_fails_naming_the_key() -> None:
    from dig_torchrec.training.preflight import resolve_schedule

    # the old industrial_large.yaml: 500 / 2000 steps, but 16 ranks make 192 steps per epoch (whole row groups per rank)
    cfg = load_config(REPO / "configs" / "industrial_large.yaml",
                      ["train.tokenizer_init_after_epochs=0", "train.checkpoint_every_epochs=0",
                       "tokenizer.init_after_steps=500", "train.checkpoint_every=2000"])
    with pytest.raises(ConfigError, match=r"'tokenizer.init_after_steps' = 500 can never fire: the run has 192 steps"):
        resolve_schedule(cfg, 16, _industrial_large_slots(16))
    cfg.tokenizer.init_after_steps = 50
    with pytest.raises(ConfigError, match=r"'train.checkpoint_every' = 2000 can never fire.*global batch 32768"):
        resolve_schedule(cfg, 16, _industrial_large_slots(16))
    cfg.train.checkpoint_every, cfg.train.val_every = 100, 500
    with pytest.raises(ConfigError, match=r"'train.val_every' = 500 can never fire"):
        resolve_schedule(cfg, 16, _industrial_large_slots(16))
    cfg.train.val_every = 0
    assert resolve_schedule(cfg, 16, _industrial_large_slots(16)).total_steps == 192


def test_schedule_in_data_scales_with_the_world_size(caplog: pytest.LogCaptureFixture) -> None:
    from dig_torchrec.training.preflight import resolve_schedule

    for world, spe in ((1, 2930), (16, 192)):
        cfg = load_config(REPO / "configs" / "industrial_large.yaml", ["train.val_every_samples=1000000"])
        sched = resolve_schedule(cfg, world, _industrial_large_slots(world))
        assert sched.steps_per_epoch == spe and sched.global_batch == 2048 * world
        assert cfg.tokenizer.init_after_steps == -(-15 * spe // 100)  # 0.15 epoch
        assert cfg.train.checkpoint_every == -(-spe // 4)  # 0.25 epoch
        assert cfg.train.val_every == -(-1_000_000 // (2048 * world))
        assert cfg.train.tokenizer_init_after_epochs == 0 and cfg.train.val_every_samples == 0  # steps only now
    cfg = load_config(REPO / "configs" / "industrial_large.yaml", ["train.checkpoint_every_samples=10"])
    with pytest.raises(ConfigError, match="both set"):
        resolve_schedule(cfg, 1, _industrial_large_slots(1))


def test_schedule_with_max_steps_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    from dig_torchrec.training.preflight import resolve_schedule

    cfg = load_config(REPO / "configs" / "industrial_large.yaml", ["train.max_steps=10"])
    with caplog.at_level(logging.WARNING):
        sched = resolve_schedule(cfg, 16, _industrial_large_slots(16))
    assert sched.total_steps == 10 and "can never fire" in caplog.text


def test_preflight_steps_per_epoch_match_the_reader(tiny_dataset: Path) -> None:
    from dig_torchrec.data.reader import ExposureReader, open_dataset
    from dig_torchrec.training.preflight import check_work_split, steps_per_epoch

    for world, workers in ((1, 0), (2, 0), (3, 2)):
        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={tiny_dataset}", "data.batch_size=64",
                                                           "data.history_length=5", f"data.num_workers={workers}"])
        _, schema = open_dataset(tiny_dataset, cfg.data)
        reader = ExposureReader(tiny_dataset, "train", cfg.data, schema, rank=world - 1, world_size=world)
        assert steps_per_epoch(cfg, check_work_split(cfg, world, "train")) == reader.num_batches


def test_preflight_rejects_a_schedule_that_cannot_fire(tiny_dataset: Path, tmp_path: Path) -> None:
    from dig_torchrec.training.preflight import run_preflight

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'r'}",
                                                       "data.batch_size=64", "data.history_length=5",
                                                       "train.epochs=1", "train.checkpoint_every=100000"])
    with pytest.raises(ConfigError, match="'train.checkpoint_every' = 100000 can never fire"):
        run_preflight(cfg, world_size=2, device_type="cpu", rank=0)
    assert not (tmp_path / "r").exists()  # failed before the run-dir probe


# ---------------------------------------------------------------------- device
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a host without CUDA")
def test_requested_cuda_that_is_absent_is_a_one_line_error(tiny_dataset: Path, tmp_path: Path) -> None:
    from dig_torchrec.distributed.env import select_device
    from dig_torchrec.training.preflight import run_preflight

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'r'}",
                                                       "data.history_length=5", "train.device=cuda"])
    with pytest.raises(ConfigError) as e:
        run_preflight(cfg, world_size=1)
    assert "'train.device' = 'cuda' but no CUDA device" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no CUDA device"):
        select_device("cuda", 0)


# ---------------------------------------------------------------------- RNG resume
class _FakeCuda:
    """Stands in for torch.cuda's RNG calls on a host with ``visible`` GPUs."""

    def __init__(self, visible: int) -> None:
        self.visible = visible
        self.states = [torch.tensor([i], dtype=torch.uint8) for i in range(visible)]
        self.set_calls: List[Any] = []

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        return self.states[torch.device(device).index or 0].clone()

    def get_rng_state_all(self) -> List[torch.Tensor]:
        return [s.clone() for s in self.states]

    def set_rng_state(self, state: torch.Tensor, device: Any = "cuda") -> None:
        index = torch.device(device).index or 0
        if index >= self.visible:
            raise IndexError(index)
        self.set_calls.append((int(state[0]), index))

    def set_rng_state_all(self, states: List[torch.Tensor]) -> None:  # what the old resume called
        for i, s in enumerate(states):
            self.set_rng_state(s, torch.device("cuda", i))


def test_rng_resume_with_fewer_gpus_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    from dig_torchrec.training import trainer

    saving = _FakeCuda(visible=8)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(saving, name))
    state = trainer.rng_state(torch.device("cuda", 5))
    assert isinstance(state["cuda"], torch.Tensor) and int(state["cuda"][0]) == 5  # this rank's device only

    resuming = _FakeCuda(visible=4)  # the job comes back on 4-GPU nodes
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(resuming, name))
    trainer.set_rng_state(state, torch.device("cuda", 1))
    assert resuming.set_calls == [(5, 1)]
    # a checkpoint of the old format (every visible GPU) still loads: this device's entry, or none
    old = {**state, "cuda": saving.get_rng_state_all()}
    trainer.set_rng_state(old, torch.device("cuda", 3))
    assert resuming.set_calls[-1] == (3, 3)
    trainer.set_rng_state({**state, "cuda": old["cuda"][:2]}, torch.device("cuda", 3))  # no IndexError
    assert len(resuming.set_calls) == 2
    trainer.set_rng_state(old, torch.device("cpu"))  # a CPU resume ignores CUDA states
    assert len(resuming.set_calls) == 2


# ---------------------------------------------------------------------- batch transfer contract
def _batch(tiny_dataset: Path):
    from dig_torchrec.data.reader import ExposureReader, open_dataset

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={tiny_dataset}", "data.batch_size=64",
                                                       "data.history_length=5", "data.retrieval_positives=16",
                                                       "data.negatives_per_positive=3"])
    _, schema = open_dataset(tiny_dataset, cfg.data)
    return next(iter(ExposureReader(tiny_dataset, "train", cfg.data, schema)))


def _tensors(batch) -> Dict[str, torch.Tensor]:
    kjt = batch.sparse_features
    out = {f: getattr(batch, f) for f in batch.__dataclass_fields__ if f != "sparse_features"}
    out.update({"kjt.values": kjt.values(), "kjt.lengths": kjt.lengths()})
    return out


def test_digbatch_to_record_stream_pin_memory_contract(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dig_torchrec.training.trainer import pin_batch

    batch = _batch(tiny_dataset)
    kjt = batch.sparse_features
    # to(device, non_blocking=True): every field moves, the KJT keeps its host-side layout
    moved = batch.to(torch.device("meta"), non_blocking=True)
    assert all(t.device.type == "meta" for t in _tensors(moved).values())
    assert moved.sparse_features._length_per_key == kjt._length_per_key  # no sync to rebuild it later
    assert moved.batch_size == batch.batch_size and moved.retrieval_size == batch.retrieval_size

    # record_stream: every tensor (the KJT's values and lengths included) is recorded on the stream
    recorded: List[int] = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: recorded.append(id(t)), raising=False)
    batch.record_stream(object())  # type: ignore[arg-type]
    assert {id(t) for t in _tensors(batch).values()} <= set(recorded)

    # pin_memory: every tensor is copied to pinned memory once; an already pinned batch is kept
    pinned_ids: List[int] = []

    def fake_pin(t: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        out = t.clone()
        pinned_ids.append(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pinned = pin_batch(batch)
    assert {id(t) for t in _tensors(pinned).values()} <= set(pinned_ids)
    assert pinned.sparse_features._length_per_key == kjt._length_per_key
    assert pinned.sparse_features._offset_per_key == kjt._offset_per_key
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, *a: True)
    assert pin_batch(pinned) is pinned


def test_trainer_pins_batches_only_on_cuda(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dig_torchrec.training.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'r'}",
                                                       "data.batch_size=64", "data.history_length=5",
                                                       "data.retrieval_positives=16", "data.negatives_per_positive=3",
                                                       "train.max_steps=1"])
    trainer = Trainer(cfg)
    try:
        assert trainer.pin_memory is False  # CPU: pinning would only cost a copy
        calls: List[int] = []
        monkeypatch.setattr("dig_torchrec.training.trainer.pin_batch", lambda b: calls.append(1) or b)
        trainer.pin_memory = True  # what train.pin_memory=true gives on CUDA
        batches = list(trainer._segment(iter(trainer.train_reader), 2))
        assert len(batches) == 2 and calls == [1, 1]
    finally:
        trainer.close()


# ---------------------------------------------------------------------- 16-GPU plan, dry run
def test_planner_dry_run_industrial_large_on_2x8_a100() -> None:
    from benchmarks.common import auto_positive_slots, industrial_meta
    from dig_torchrec.distributed.planner import feature_pooling_factors, plan_sharding, plan_sharding_types
    from dig_torchrec.model import DIGModel
    from dig_torchrec.training.optim import attach_sparse_optimizer

    cfg = load_config(REPO / "configs" / "industrial_large.yaml", ["train.device=cuda"])
    model = DIGModel(cfg, industrial_meta(), device="meta")
    attach_sparse_optimizer(model, cfg.train, "cuda")
    rows = cfg.data.batch_size + auto_positive_slots(0.1077, cfg.data.batch_size) * (1 + cfg.data.negatives_per_positive)
    plan = plan_sharding(model, cfg.sharding, torch.device("cuda"), world_size=16, local_world_size=8,
                         batch_size=rows, pooling=feature_pooling_factors(model), hbm_cap=A100_40GB)
    types = plan_sharding_types(plan)
    assert types["user_id"] == "row_wise"  # 20M rows: spread over every GPU
    assert set(types) == {"user_id", "item_id", "age_bucket", "gender", "city", "hour", "device", "category", "brand",
                          "price_bucket", "sid"}
    assert all(t in ("row_wise", "table_wise") for t in types.values())  # sharded, never replicated
    per_rank = [0] * 16
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            for shard in ps.sharding_spec.shards:
                rows_, cols = shard.shard_sizes
                per_rank[shard.placement.rank()] += rows_ * cols * 4 + rows_ * 4  # fp32 weights + row-wise Adagrad
    assert sum(per_rank) >= (20_000_000 + 500_000) * 64 * 4
    assert max(per_rank) <= A100_40GB
    user_shards = [s for mp in plan.plan.values() for t, ps in mp.items() if t == "user_id"  # type: ignore[union-attr]
                   for s in ps.sharding_spec.shards]
    assert len(user_shards) == 16 and sorted(s.placement.rank() for s in user_shards) == list(range(16))


def test_cpu_planner_never_uses_row_wise_for_big_tables() -> None:
    from dig_torchrec.config import ShardingConfig
    from dig_torchrec.distributed.planner import resolve_sharding_types

    tables = {"user_id": ("embedding_bags", 20_000_000, 64), "city": ("embedding_bags", 1000, 64)}
    assert resolve_sharding_types(ShardingConfig(), tables, "cpu") == {"user_id": ["table_wise"], "city": ["table_wise"]}
    cuda = resolve_sharding_types(ShardingConfig(), tables, "cuda")
    assert cuda == {"user_id": ["row_wise"], "city": ["row_wise", "table_wise"]}
    pinned = resolve_sharding_types(ShardingConfig(constraints={"user_id": ["table_wise"]}), tables, "cuda")
    assert pinned["user_id"] == ["table_wise"]


# ---------------------------------------------------------------------- mixed precision
def test_bf16_mixer_keeps_logits_and_losses_fp32(tiny_dataset: Path) -> None:
    from dig_torchrec.data.reader import open_dataset
    from dig_torchrec.model import DIGModel
    from dig_torchrec.training.precision import configure_precision

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={tiny_dataset}", "data.batch_size=64",
                                                       "data.history_length=5", "data.retrieval_positives=16",
                                                       "data.negatives_per_positive=3", "train.precision=bf16"])
    meta, _ = open_dataset(tiny_dataset, cfg.data)
    torch.manual_seed(0)
    model = DIGModel(cfg, meta)
    configure_precision(model, cfg.train, torch.device("cpu"))
    seen: List[torch.dtype] = []
    model.mixer.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.train()
    parts = model.forward_parts(_batch(tiny_dataset))
    assert seen and all(d == torch.bfloat16 for d in seen)  # the Mixer computed in bf16
    out = parts.output
    assert out.rank_logits.dtype == torch.float32 and out.recall_logits.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    assert model.tokenizer.quantizer.codebooks.dtype == torch.float32
    parts.terms.total.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.mixer.parameters())


# ---------------------------------------------------------------------- meta default device
def test_forward_beam_search_and_guards_make_no_tensor_without_a_device(tiny_dataset: Path) -> None:
    """Under ``torch.set_default_device("meta")`` a factory call without ``device=`` makes a meta
    tensor: mixing it with the CPU model fails, and one that escapes shows up in the outputs."""
    from benchmarks.common import init_tokenizer_randomly
    from dig_torchrec.data.reader import open_dataset
    from dig_torchrec.model import DIGModel
    from dig_torchrec.retrieval.beam_search import beam_search
    from dig_torchrec.retrieval.sid_index import SidIndex
    from dig_torchrec.training.guards import check_loss_terms
    from dig_torchrec.training.metrics import TrainMetrics
    from dig_torchrec.training.optim import GuardedOptimizer
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={tiny_dataset}", "data.batch_size=64",
                                                       "data.history_length=5", "data.retrieval_positives=16",
                                                       "data.negatives_per_positive=3"])
    meta, _ = open_dataset(tiny_dataset, cfg.data)
    torch.manual_seed(0)
    model = DIGModel(cfg, meta)
    init_tokenizer_randomly(model)
    batch = _batch(tiny_dataset)
    index = SidIndex(model.tokenizer.item_sid_table, cfg.tokenizer.num_codes)
    dense = {n: p for n, p in model.mixer.named_parameters()}
    opt = GuardedOptimizer(KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adam(ps, lr=1e-3)))
    metrics = TrainMetrics(cfg.tokenizer.num_layers)
    torch.set_default_device("meta")
    try:
        model.train()
        parts = model.forward_parts(batch)
        out = parts.output
        assert check_loss_terms(1, out.losses, "error") == []
        parts.terms.total.backward()
        opt.step()
        metrics.update(out)
        model.eval()
        ctx = model.user_context(batch.sparse_features)
        result = beam_search(lambda u, p: model.recall_logits(ctx, u, p), ctx.num_users, index, beam_size=4)
    finally:
        torch.set_default_device(None)
    escaped = {k: v.device for k, v in {**out.losses, **out.tokenizer_metrics, "rank_logits": out.rank_logits,
                                         "recall_logits": out.recall_logits, "beam": result.codes}.items()
               if v.device.type != "cpu"}
    assert not escaped
    computed = metrics.compute()
    assert 0.0 <= computed["train/rank_auc"] <= 1.0
