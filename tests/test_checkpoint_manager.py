"""CheckpointManager: atomic layout, keep-latest-k, --resume resolution, compatibility errors.

Single process (no process group): DCP runs in no-dist mode, the file logic is the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dig_torchrec.config import DIGConfig, load_config
from dig_torchrec.data.schema import DatasetMeta
from dig_torchrec.errors import CheckpointError, ConfigError, NumericalError
from dig_torchrec.training.checkpoint import (
    COMPLETE,
    CheckpointManager,
    check_compatible,
    check_run_dir,
    check_sharding,
    is_complete,
    read_config,
)


def _meta(num_items: int = 50) -> DatasetMeta:
    return DatasetMeta(name="t", num_users=10, num_items=num_items, user_features={}, context_features={},
                       item_features={"category": 4}, u2i_dim=2, history_length=3)


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4, 3), value), "b": torch.arange(3.0) * value}}


class _Box:
    """A minimal ``Stateful``."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def _save(mgr: CheckpointManager, step: int, value: float = 1.0, cfg: DIGConfig | None = None) -> Path:
    mgr.config, mgr.dataset_meta, mgr.sharding = cfg or DIGConfig(), _meta(), {"user_id": "table_wise"}
    return mgr.save(step, _state(value), rank_states={"reader": _Box({"batches_in_epoch": step})},
                    train_state=_Box({"epoch": 0, "note": "kept"}))


def test_save_load_roundtrip_and_layout(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_latest_k=3)
    path = _save(mgr, 7, value=2.5)
    assert path == tmp_path / "checkpoints" / "step-7"
    for name in (COMPLETE, ".metadata", "config.yaml", "dataset_meta.json", "train_state.json", "rank_state/rank-0.pt"):
        assert (path / name).exists(), name
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    target = _state(0.0)
    reader, train = _Box({}), _Box({})
    info = mgr.load(path, target, rank_states={"reader": reader}, train_state=train)
    assert torch.equal(target["model"]["w"], torch.full((4, 3), 2.5))
    assert info.step == 7 and info.world_size == 1 and info.sharding == {"user_id": "table_wise"}
    assert info.rank_states_restored and reader.state == {"batches_in_epoch": 7}
    assert train.state["step"] == 7 and train.state["extra"] == {"note": "kept"} and info.extra == {"note": "kept"}
    # Stateful objects are loaded through load_state_dict (torchtitan's shape)
    module = torch.nn.Linear(3, 4)
    with torch.no_grad():
        module.weight.fill_(2.5)
        module.bias.zero_()
    other = torch.nn.Linear(3, 4)
    mgr.load(mgr.save(8, {"model": module}), {"model": other})
    assert torch.equal(other.weight, module.weight) and torch.equal(other.bias, module.bias)
    # another world size: this rank's own state is left for the caller to restart
    resharded = _Box({})
    info = CheckpointManager(tmp_path, world_size=2).load(path, _state(0.0), rank_states={"reader": resharded})
    assert not info.rank_states_restored and resharded.state == {}
    assert read_config(path).model.embedding_dim == DIGConfig().model.embedding_dim


def test_half_written_checkpoint_is_never_picked(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_latest_k=5)
    good = _save(mgr, 10)
    # a crash after DCP wrote its files but before COMPLETE: both the temp dir and a renamed dir
    broken = _save(mgr, 20)
    (broken / COMPLETE).unlink()
    shutil.copytree(good, tmp_path / "checkpoints" / ".tmp-step-30")
    assert not is_complete(broken)
    assert mgr.latest() == good
    assert mgr.resolve("auto") == good
    with pytest.raises(CheckpointError, match=r"incomplete.*COMPLETE"):
        mgr.resolve(str(broken))
    with pytest.raises(CheckpointError, match=r"does not exist"):
        mgr.resolve(str(tmp_path / "nope"))
    assert CheckpointManager(tmp_path / "fresh").resolve("auto") is None
    _save(mgr, 40)  # the next save clears leftovers of interrupted saves
    assert not (tmp_path / "checkpoints" / ".tmp-step-30").exists()


def test_keep_latest_k(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_latest_k=2)
    for step in (1, 2, 3, 4):
        _save(mgr, step)
    assert [s for s, _ in mgr.complete_checkpoints()] == [3, 4]


def test_nan_is_never_written(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    good = _save(mgr, 1)
    bad = _state(1.0)
    bad["model"]["b"][1] = float("nan")
    with pytest.raises(NumericalError, match=r"step 2.*model\.b.*NaN"):
        mgr.save(2, bad)
    assert mgr.latest() == good
    assert not (tmp_path / "checkpoints" / "step-2").exists()


def test_incompatible_config_names_the_key(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    path = _save(mgr, 1, cfg=load_config(None, ["model.embedding_dim=16"]))
    check_compatible(path, load_config(None, ["model.embedding_dim=16", "train.lr=0.5"]), _meta())  # lr is free
    with pytest.raises(CheckpointError, match=r"'model\.embedding_dim' is 16 in the checkpoint but 32 now"):
        check_compatible(path, load_config(None, ["model.embedding_dim=32"]))
    with pytest.raises(CheckpointError, match=r"'train\.sparse_optimizer'"):
        check_compatible(path, load_config(None, ["model.embedding_dim=16", "train.sparse_optimizer=sgd"]))
    check_compatible(path, load_config(None, ["model.embedding_dim=16", "train.sparse_optimizer=sgd"]), for_training=False)
    with pytest.raises(CheckpointError, match=r"dataset meta key 'num_items' is 50"):
        check_compatible(path, load_config(None, ["model.embedding_dim=16"]), _meta(num_items=60))
    # a tensor whose shape changed is named too
    with pytest.raises(CheckpointError, match=r"'model\.w' has shape \(4, 3\) in the checkpoint but \(5, 3\)"):
        mgr.load(path, {"model": {"w": torch.zeros(5, 3), "b": torch.zeros(3)}})


def test_sharding_kind_must_match(tmp_path: Path) -> None:
    path = _save(CheckpointManager(tmp_path), 1)
    check_sharding(path, {"user_id": "column_wise"})  # sharded -> sharded reshards fine
    with pytest.raises(CheckpointError, match=r"'user_id' was table_wise.*sharding\.constraints\.user_id"):
        check_sharding(path, {"user_id": "data_parallel"})


def test_run_dir_checked_before_training(tmp_path: Path) -> None:
    check_run_dir(tmp_path / "run", min_free_mb=1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"'run_dir'.*not writable"):
        check_run_dir(blocker / "run", min_free_mb=1)
    with pytest.raises(ConfigError, match=r"'run_dir'.*MB free.*min_free_disk_mb"):
        check_run_dir(tmp_path / "run", min_free_mb=1 << 40)


def test_saved_step_reads_train_state_then_the_bundle_manifest(tmp_path):
    import json

    from dig_torchrec.inference import saved_step

    assert saved_step(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"step": 7}))
    assert saved_step(tmp_path) == 7
    (tmp_path / "train_state.json").write_text(json.dumps({"step": 12}))
    assert saved_step(tmp_path) == 12
