"""The trainer in-process as a world of one: exact resume, NaN policy, resume errors."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

from dig_torchrec.config import load_config
from dig_torchrec.errors import CheckpointError, NumericalError

REPO = Path(__file__).resolve().parents[1]


def _cfg(data: Path, run_dir: Path, *extra: str):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}", f"run_dir={run_dir}", "data.batch_size=64", "data.eval_batch_size=256",
            "data.history_length=5", "data.retrieval_positives=16", "data.negatives_per_positive=3",
            "data.shuffle_buffer=1024", "tokenizer.init_after_steps=2", "train.log_every=2",
            "train.val_max_batches=1", "train.deterministic=true", *extra,
        ],
    )


def _train(cfg, resume=None):
    from dig_torchrec.training.trainer import Trainer

    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.train()
        params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if isinstance(v, torch.Tensor)}
        sharded = {k: v.local_shards()[0].tensor.clone() for k, v in trainer.model.state_dict().items()
                   if hasattr(v, "local_shards")}
        return trainer.step, {**params, **sharded}, trainer
    finally:
        trainer.close()


def test_resume_after_stop_matches_uninterrupted_run(tiny_dataset: Path, tmp_path: Path) -> None:
    step_a, full, _ = _train(_cfg(tiny_dataset, tmp_path / "a", "train.max_steps=6", "train.checkpoint_every=3"))
    # a run stopped after step 3 left exactly run a's step-3 checkpoint: resume it in a new run dir
    stopped = tmp_path / "a" / "checkpoints" / "step-3"
    step_b, resumed, trainer = _train(_cfg(tiny_dataset, tmp_path / "b", "train.max_steps=6"), resume=str(stopped))
    assert step_a == step_b == 6
    assert trainer.last_checkpoint == tmp_path / "b" / "checkpoints" / "step-6"
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any("embedding_bags" in k for k in full)  # sharded tables were compared too
    # the pipeline prefetched embedding_bags' input dist; sid_embedding_bags ran unpipelined
    pipelined = trainer.pipeline._pipelined_modules
    assert len(pipelined) == 1 and pipelined[0] is trainer.dig.embedding_bags


def _poison(trainer, at_call: int) -> None:
    """Make the model's loss NaN on its ``at_call``-th training forward."""
    dig = trainer.dig
    original = dig.forward
    calls = {"n": 0}

    def forward(batch):
        loss, out = original(batch)
        if dig.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                out.losses["rank"] = torch.tensor(float("nan"))
                loss = loss * float("nan")
        return loss, out

    dig.forward = forward


def test_nan_loss_error_names_step_and_term(tiny_dataset: Path, tmp_path: Path) -> None:
    from dig_torchrec.training.trainer import Trainer

    trainer = Trainer(_cfg(tiny_dataset, tmp_path / "r", "train.max_steps=4", "tokenizer.init_after_steps=10"))
    try:
        _poison(trainer, at_call=3)
        with pytest.raises(NumericalError, match=r"step 3: non-finite loss term 'rank'"):
            trainer.train()
        assert trainer.checkpoints.latest() is None  # nothing written
    finally:
        trainer.close()


def test_nan_loss_skip_policy_skips_and_continues(tiny_dataset: Path, tmp_path: Path) -> None:
    from dig_torchrec.training.trainer import Trainer

    trainer = Trainer(_cfg(tiny_dataset, tmp_path / "r", "train.max_steps=4", "train.nan_policy=skip",
                           "tokenizer.init_after_steps=10"))
    try:
        _poison(trainer, at_call=2)
        trainer.train()
        assert trainer.step == 4 and trainer.dense_optimizer.skipped_steps == 1
        for name, value in trainer.model.state_dict().items():
            tensor = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), name
        assert trainer.checkpoints.latest() == tmp_path / "r" / "checkpoints" / "step-4"
    finally:
        trainer.close()


def test_resume_from_other_model_config_names_the_key(tiny_dataset: Path, tmp_path: Path) -> None:
    _train(_cfg(tiny_dataset, tmp_path / "r", "train.max_steps=2"))
    from dig_torchrec.training.trainer import Trainer

    with pytest.raises(CheckpointError, match=r"'model\.embedding_dim' is 16 in the checkpoint but 8 now"):
        Trainer(_cfg(tiny_dataset, tmp_path / "r", "model.embedding_dim=8", "tokenizer.encoder_heads=2"), resume="auto")
    # an option that adds a tensor must match too: dropping it on resume would discard the trained vectors silently
    with pytest.raises(CheckpointError, match=r"'model\.history_position' is False in the checkpoint but True now"):
        Trainer(_cfg(tiny_dataset, tmp_path / "r", "model.history_position=true"), resume="auto")
    with pytest.raises(CheckpointError, match=r"does not exist"):
        Trainer(_cfg(tiny_dataset, tmp_path / "r"), resume=str(tmp_path / "missing"))
