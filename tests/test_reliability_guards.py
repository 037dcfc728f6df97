"""Numerical faults: NaN/inf loss terms and gradients, skip vs error, no NaN in a checkpoint, safe EMA."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from dig_torchrec.errors import NumericalError
from dig_torchrec.modules.quantizer import ResidualQuantizer
from dig_torchrec.training.checkpoint import CheckpointManager
from dig_torchrec.training.guards import check_loss_terms, first_nonfinite, nonfinite_terms
from dig_torchrec.training.optim import GuardedOptimizer

REPO = Path(__file__).resolve().parents[1]


def _losses(**bad: float) -> dict:
    terms = {k: torch.tensor(0.5) for k in ("rank", "recall", "commit", "sem", "u2t")}
    for k, v in bad.items():
        terms[k] = torch.tensor(v)
    terms["total"] = sum(terms.values())
    return terms


# ---------------------------------------------------------------------- loss terms (before backward)
def test_finite_losses_pass_under_both_policies() -> None:
    for policy in ("error", "skip"):
        assert check_loss_terms(3, _losses(), policy) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_error_policy_names_step_and_term(value: float) -> None:
    with pytest.raises(NumericalError, match=r"^step 7: non-finite loss term 'commit' \(train\.nan_policy=error"):
        check_loss_terms(7, _losses(commit=value), "error")


def test_skip_policy_returns_terms_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dig_torchrec.training.guards"):
        assert check_loss_terms(4, _losses(u2t=float("nan"), rank=float("inf")), "skip") == ["rank", "u2t"]
    assert "step 4: non-finite loss term(s) rank, u2t: skipping the batch" in caplog.text


def test_only_total_non_finite_is_reported_as_total() -> None:
    terms = _losses()
    terms["total"] = torch.tensor(float("nan"))
    assert nonfinite_terms(terms) == ["total"]
    assert check_loss_terms(1, terms, "skip") == ["total"]


def test_first_nonfinite_ignores_integer_and_empty_tensors() -> None:
    named = [("ids", torch.tensor([1, 2])), ("empty", torch.zeros(0)), ("w", torch.tensor([0.0, float("nan")]))]
    assert first_nonfinite(named) == "w"
    assert first_nonfinite(named[:2]) is None


# ---------------------------------------------------------------------- dense gradients (before the dense step)
def _dense(policy: str) -> tuple[nn.Linear, GuardedOptimizer]:
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    opt = GuardedOptimizer(KeyedOptimizerWrapper(dict(lin.named_parameters()),
                                                 lambda ps: torch.optim.Adam(ps, lr=0.1)), policy)
    lin(torch.randn(4, 3)).sum().backward()
    lin.bias.grad[1] = float("nan")
    return lin, opt


def test_nan_gradient_error_names_parameter() -> None:
    _, opt = _dense("error")
    opt.step_index = 12
    with pytest.raises(NumericalError, match=r"step 12: non-finite gradient in parameter 'bias'"):
        opt.step()


def test_nan_gradient_skip_leaves_parameters_and_counts() -> None:
    lin, opt = _dense("skip")
    before = {k: v.detach().clone() for k, v in lin.named_parameters()}
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in lin.named_parameters():
        assert torch.equal(v, before[k]), k
        assert v.grad is None  # gradients dropped, the next step starts clean
    lin(torch.randn(4, 3)).sum().backward()  # a finite step afterwards does update
    opt.step()
    assert not torch.equal(lin.weight, before["weight"]) and opt.skipped_steps == 1


# ---------------------------------------------------------------------- checkpoints never hold NaN
def test_checkpoint_with_nan_parameter_is_refused_and_previous_stays_latest(tmp_path: Path) -> None:
    from dig_torchrec.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run_dir={tmp_path}"])
    mgr = CheckpointManager(tmp_path, 3, config=cfg)
    good = mgr.save(1, {"model": {"w": torch.ones(4)}})
    with pytest.raises(NumericalError, match=r"step 2: refusing to write a checkpoint: 'model\.w' holds NaN/inf"):
        mgr.save(2, {"model": {"w": torch.tensor([1.0, float("inf"), 0.0, 0.0])}})
    assert mgr.latest() == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]  # no step-2, no temp dir
    state = {"model": {"w": torch.zeros(4)}}
    mgr.load(good, state)
    assert torch.equal(state["model"]["w"], torch.ones(4))


# ---------------------------------------------------------------------- codebook EMA never divides by zero
def _quantizer(restart: bool) -> ResidualQuantizer:
    torch.manual_seed(0)
    q = ResidualQuantizer(2, 4, 3, decay=0.9, dead_code_threshold=0.5, restart_dead_codes=restart)
    codebooks = torch.randn(2, 4, 3)
    codebooks[0, 3] = 100.0  # far from every input: code (0, 3) never gets an assignment
    q.load_initial_codebooks(codebooks, torch.randint(0, 3, (60, 2)))
    return q


def test_code_without_assignments_is_kept_finite() -> None:
    q = _quantizer(restart=False)
    x = torch.randn(16, 3)
    out = q(x)
    assert not (out.sids[:, 0] == 3).any()  # the EMA step below has an empty code (count 0, sum 0)
    q.ema_update(out, torch.ones(16, dtype=torch.bool))
    assert float(q.ema_count[0, 3]) < 1e-6  # it had no init mass either
    for _ in range(40):
        assert torch.isfinite(q.codebooks).all() and torch.isfinite(q.ema_sum).all()
        q.ema_update(q(x), torch.ones(16, dtype=torch.bool))
    assert torch.isfinite(q.codebooks).all() and int(q.dead_restarts.sum()) == 0  # kept, not restarted


def test_code_without_assignments_is_restarted_on_a_batch_residual() -> None:
    q = _quantizer(restart=True)
    x = torch.randn(16, 3)
    for _ in range(30):
        q.ema_update(q(x), torch.ones(16, dtype=torch.bool))
    assert int(q.dead_restarts[0]) >= 1
    assert torch.isfinite(q.codebooks).all()
    assert float(q.codebooks[0, 3].abs().max()) < 50.0  # moved off the unreachable point onto the data


def test_batch_with_no_real_rows_keeps_every_code() -> None:
    """An all-padding batch (weights 0) right after init used to make 0/0 codebooks."""
    q = _quantizer(restart=True)
    before = q.codebooks.clone()
    q.ema_update(q(torch.randn(8, 3)), torch.zeros(8, dtype=torch.bool))
    assert torch.equal(q.codebooks, before)
    q.ema_update(q(torch.randn(8, 3)), torch.ones(8, dtype=torch.bool))  # the next real batch is fine too
    assert torch.isfinite(q.codebooks).all()


# ---------------------------------------------------------------------- the trainer: skip means no update at all
@pytest.mark.slow
def test_skipped_step_changes_nothing(tiny_dataset: Path, tmp_path: Path) -> None:
    """Step 2's loss is NaN under nan_policy=skip: the model after 2 steps equals the model after 1.

    The tokenizer is initialised before step 1, so step 2's forward also moves the codebook EMA
    and the item SID table; the skip must roll those back too.
    """
    from dig_torchrec.config import load_config
    from dig_torchrec.training.trainer import Trainer

    def cfg(run: str, steps: int):
        return load_config(REPO / "configs" / "tiny.yaml", [
            f"data.path={tiny_dataset}", f"run_dir={tmp_path / run}", "data.batch_size=64", "data.history_length=5",
            "data.retrieval_positives=16", "data.negatives_per_positive=3", "tokenizer.init_after_steps=0",
            "train.val_max_batches=1", "train.deterministic=true", "train.nan_policy=skip", f"train.max_steps={steps}",
        ])

    def state(trainer) -> dict:
        out = {}
        for k, v in trainer.model.state_dict().items():
            t = v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
            if isinstance(t, torch.Tensor):
                out[k] = t.detach().clone()
        return out

    one = Trainer(cfg("one", 1))
    try:
        one.train()
        after_one = state(one)
    finally:
        one.close()
    two = Trainer(cfg("two", 2))
    try:
        dig, original, calls = two.dig, two.dig.forward, {"n": 0}

        def poisoned(batch):
            loss, out = original(batch)
            if dig.training:
                calls["n"] += 1
                if calls["n"] == 2:
                    out.losses["recall"] = torch.tensor(float("nan"))
                    loss = loss * float("nan")
            return loss, out

        dig.forward = poisoned
        two.train()
        assert two.step == 2 and two.dense_optimizer.skipped_steps == 1
        after_two = state(two)
    finally:
        two.close()
    assert after_one.keys() == after_two.keys()
    for k in after_one:  # sparse tables (fused optimizer), dense params (Adam) and buffers (BN, EMA)
        torch.testing.assert_close(after_two[k], after_one[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
