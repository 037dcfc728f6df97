"""Host-device syncs per training step, counted on CPU (``training/syncs.py``).

A step used to read the device ~150 times (a ``bool`` per dense gradient, one per loss term,
``int(initialized)`` per forward, ~25 ``.cpu()`` in the metrics, the collision rate over the
whole SID table). On CUDA each read stalls the host until the GPU drains. This pins what
``dig_torchrec`` itself does in a steady-state step (tokenizer initialised, not a logging
step) at <= 5: the loss-term guard, the dense-gradient guard and the quantizer's two
data-dependent branches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dig_torchrec.config import load_config
from dig_torchrec.training.syncs import HostSyncCounter

REPO = Path(__file__).resolve().parents[1]
MAX_PROJECT_SYNCS_PER_STEP = 5


def test_counter_sees_item_bool_cpu_and_tolist_from_package_code() -> None:
    from dig_torchrec.training.guards import first_nonfinite, nonfinite_terms

    ts = [torch.ones(3), torch.zeros(2), torch.full((2,), 2.0)]
    with HostSyncCounter() as c:
        assert first_nonfinite([(str(i), t) for i, t in enumerate(ts)]) is None  # one bool() per tensor
    assert c.project == 3 and c.counts["scalar"] == 3
    with HostSyncCounter() as c:
        nonfinite_terms({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))})  # fused: one tolist
        torch.ones(2).cpu()  # from this test file: a library/other-origin hit, still counted in total
    assert c.project == 1 and c.counts["tolist"] == 1 and c.counts["cpu"] == 1 and c.total == 2


@pytest.fixture(scope="module")
def trainer(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    from dig_torchrec.training.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("syncs") / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.path={tiny_dataset}", f"run_dir={run_dir}", "data.batch_size=64", "data.history_length=5",
        "data.retrieval_positives=16", "data.negatives_per_positive=3", "tokenizer.init_after_steps=1",
        "train.log_every=1000", "train.max_steps=20", "train.val_max_batches=1",
    ])
    t = Trainer(cfg)
    yield t
    t.close()


def test_steady_state_step_makes_at_most_five_host_syncs(trainer) -> None:
    batches = [b for _, b in zip(range(8), iter(trainer.train_reader))]  # read first: the reader is not the step
    trainer.model.train()
    trainer.initialize_tokenizer()
    trainer.pipeline.attach(trainer.model)
    it = iter(batches)
    counts = []
    for step in range(6):
        trainer.dense_optimizer.step_index = step + 1
        with HostSyncCounter() as c:
            output = trainer.pipeline.progress(it)
            trainer.dig.on_step_accepted(output)  # the step's EMA / u2t / BN updates, as Trainer._run_segment
            trainer.metrics.update(output)  # every step; the window is read at log steps only
        counts.append(c)
    trainer.pipeline.detach()
    steady = counts[2:]  # the first steps re-read the flags written by the init / first EMA step
    for c in steady:
        assert c.project <= MAX_PROJECT_SYNCS_PER_STEP, c.summary() + "\n" + "\n".join(c.where)
    # the metrics window and the tokenizer flags cost nothing per step
    innermost = [w.split(": ", 1)[1].split(" <- ")[0] for c in steady for w in c.where if w.startswith("project")]
    assert not [f for f in innermost if f.startswith(("metrics.py", "tokenizer.py", "u2t.py", "model.py"))], innermost
    with HostSyncCounter() as c:
        values = trainer.metrics.compute(extra={"tokenizer/collision_rate": 0.0})
    assert values["train/loss/total"] > 0 and 0.0 <= values["train/rank_auc"] <= 1.0
    assert c.total > 0  # the logging step is where the window is read


def test_a_reintroduced_per_parameter_check_is_caught(trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard the test above relies on: a per-gradient ``bool`` in the dense optimizer breaks the pin."""
    from dig_torchrec.training.optim import GuardedOptimizer

    def per_parameter_flag(self):  # the pre-fix behaviour: one sync per dense parameter
        bad = self._first_bad_grad()
        return torch.tensor([int(bad is not None)], dtype=torch.int32)

    monkeypatch.setattr(GuardedOptimizer, "_nonfinite_flag", per_parameter_flag)
    batches = [b for _, b in zip(range(2), iter(trainer.train_reader))]
    trainer.model.train()
    trainer.pipeline.attach(trainer.model)
    with HostSyncCounter() as c:
        trainer.pipeline.progress(iter(batches))
    trainer.pipeline.detach()
    assert c.project > MAX_PROJECT_SYNCS_PER_STEP
