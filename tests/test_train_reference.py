"""Bit-exact reference of a few training steps, recorded from the pre-redesign code (tag ``pre-redesign``).

The model/loss split and the Stateful checkpoints of issue 16 must not change a single
bit of training. Each case trains the micro dataset for a handful of steps in one
deterministic process and compares, exactly:

* every training forward's loss terms (``total, rank, recall, commit, sem, u2t``, as
  float64 ``repr``), and
* a sha256 over every model tensor (parameters and buffers: BN statistics, codebooks and
  their EMA, the item SID table, u2t statistics; local shards of the sharded tables) and
  every optimizer state tensor after the last step.

The numbers were recorded with ``DIG_RECORD_REFERENCE=1 pytest -s tests/test_train_reference.py``
on the ``pre-redesign`` tree. They are floating-point results of this machine's CPU
kernels (torch 2.x, x86-64): on another CPU or torch build re-record them from
``pre-redesign`` first, then check the current tree against them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from dig_torchrec.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECORD = os.environ.get("DIG_RECORD_REFERENCE") == "1"

BASE = [
    "data.batch_size=64", "data.eval_batch_size=256", "data.history_length=5", "data.retrieval_positives=16",
    "data.negatives_per_positive=3", "data.shuffle_buffer=1024", "tokenizer.init_after_steps=2",
    "train.log_every=2", "train.val_max_batches=1", "train.deterministic=true", "train.max_steps=6",
]
CASES: Dict[str, List[str]] = {
    "default": [],
    "softmax_prefix_negatives": [
        "loss.recall_objective=softmax", "loss.prefix_negatives=2", "data.negative_sampling=popularity",
        "loss.recall_samples=retrieval+exposure", "u2t.train_mlp_prob=0.5",
    ],
    "nan_skip": ["train.nan_policy=skip"],
}
POISON_CALL = {"nan_skip": 4}  # the 4th training forward (after tokenizer init) has a NaN loss

# recorded on the pre-redesign tree (commit 6f95d34); see the module docstring
EXPECTED: Dict[str, Tuple[List[Dict[str, str]], str]] = {'default': ([{'commit': '2.9998388290405273',
               'rank': '0.680072546005249',
               'recall': '0.6833797097206116',
               'sem': '0.9999462962150574',
               'total': '0.680072546005249',
               'u2t': '0.23419253528118134'},
              {'commit': '2.9998676776885986',
               'rank': '0.618243932723999',
               'recall': '0.6601906418800354',
               'sem': '0.9999558925628662',
               'total': '0.618243932723999',
               'u2t': '0.21173298358917236'},
              {'commit': '0.30135875940322876',
               'rank': '0.5785692930221558',
               'recall': '0.6255390644073486',
               'sem': '0.08492708951234818',
               'total': '1.3411390781402588',
               'u2t': '0.5319836735725403'},
              {'commit': '0.3984275460243225',
               'rank': '0.5011362433433533',
               'recall': '0.6151871681213379',
               'sem': '0.11551530659198761',
               'total': '1.236724853515625',
               'u2t': '0.09243070334196091'},
              {'commit': '0.3051302433013916',
               'rank': '0.4555015563964844',
               'recall': '0.5918275713920593',
               'sem': '0.09007338434457779',
               'total': '1.198160171508789',
               'u2t': '0.6554115414619446'},
              {'commit': '0.2099759876728058',
               'rank': '0.3352510631084442',
               'recall': '0.5529937148094177',
               'sem': '0.06360995024442673',
               'total': '1.0166386365890503',
               'u2t': '0.6953885555267334'}],
             'acbac6ca62c7940d8e250609347c74d40f61366e78bb7a1cbab6805e4a875d80'),
 'nan_skip': ([{'commit': '2.9998388290405273',
                'rank': '0.680072546005249',
                'recall': '0.6833797097206116',
                'sem': '0.9999462962150574',
                'total': '0.680072546005249',
                'u2t': '0.23419253528118134'},
               {'commit': '2.9998676776885986',
                'rank': '0.618243932723999',
                'recall': '0.6601906418800354',
                'sem': '0.9999558925628662',
                'total': '0.618243932723999',
                'u2t': '0.21173298358917236'},
               {'commit': '0.30135875940322876',
                'rank': '0.5785692930221558',
                'recall': '0.6255390644073486',
                'sem': '0.08492708951234818',
                'total': '1.3411390781402588',
                'u2t': '0.5319836735725403'},
               {'commit': '0.3984275460243225',
                'rank': '0.5011362433433533',
                'recall': 'nan',
                'sem': '0.11551530659198761',
                'total': '1.236724853515625',
                'u2t': '0.09243070334196091'},
               {'commit': '0.36864611506462097',
                'rank': '0.5103885531425476',
                'recall': '0.5984323620796204',
                'sem': '0.1065189465880394',
                'total': '1.2733044624328613',
                'u2t': '0.616701066493988'},
               {'commit': '0.2673516273498535',
                'rank': '0.4130499064922333',
                'recall': '0.5739590525627136',
                'sem': '0.07766245305538177',
                'total': '1.1480094194412231',
                'u2t': '0.8639630675315857'}],
              '038e57fdf8d22b4254b48cf2457b0873f9a35964a87f9f682ee172ae8ca71239'),
 'softmax_prefix_negatives': ([{'commit': '2.999840259552002',
                                'rank': '0.680072546005249',
                                'recall': '0.6846573352813721',
                                'sem': '0.9999467730522156',
                                'total': '0.680072546005249',
                                'u2t': '0.35761216282844543'},
                               {'commit': '2.999868392944336',
                                'rank': '0.618243932723999',
                                'recall': '0.6332392692565918',
                                'sem': '0.9999561309814453',
                                'total': '0.618243932723999',
                                'u2t': '0.41760993003845215'},
                               {'commit': '0.32361602783203125',
                                'rank': '0.5785693526268005',
                                'recall': '9.022528648376465',
                                'sem': '0.0897895097732544',
                                'total': '9.752517700195312',
                                'u2t': '0.6153688430786133'},
                               {'commit': '0.3874737620353699',
                                'rank': '0.5187006592750549',
                                'recall': '7.901696681976318',
                                'sem': '0.1113467738032341',
                                'total': '8.581538200378418',
                                'u2t': '0.5313644409179688'},
                               {'commit': '0.328913152217865',
                                'rank': '0.47948673367500305',
                                'recall': '8.04500675201416',
                                'sem': '0.09701191633939743',
                                'total': '8.663951873779297',
                                'u2t': '0.47529336810112'},
                               {'commit': '0.2022651582956314',
                                'rank': '0.3808254301548004',
                                'recall': '8.826973915100098',
                                'sem': '0.056984614580869675',
                                'total': '9.314730644226074',
                                'u2t': '0.5066688656806946'}],
                              '2cfe5d3f5f5b9c58145382a86d6b00699ad4a34e0f2516920a25adcb0645adc1')}


def _tensor_digest(named: List[Tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda nt: nt[0]):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _flat_tensors(state: object, prefix: str) -> List[Tuple[str, torch.Tensor]]:
    out: List[Tuple[str, torch.Tensor]] = []
    if isinstance(state, dict):
        for k, v in state.items():
            out.extend(_flat_tensors(v, f"{prefix}.{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.extend(_flat_tensors(v, f"{prefix}.{i}"))
    elif hasattr(state, "local_shards"):
        out.extend((f"{prefix}#{i}", s.tensor) for i, s in enumerate(state.local_shards()))
    elif isinstance(state, torch.Tensor):
        out.append((prefix, state))
    return out


def _run(data: Path, run_dir: Path, case: str) -> Tuple[List[Dict[str, str]], str]:
    from dig_torchrec.training.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={data}", f"run_dir={run_dir}", *BASE, *CASES[case]])
    trainer = Trainer(cfg)
    losses: List[Dict[str, str]] = []
    try:
        dig = trainer.dig
        original = dig.forward
        calls = {"n": 0}

        def recording_forward(batch):
            loss, out = original(batch)
            if dig.training:
                calls["n"] += 1
                if calls["n"] == POISON_CALL.get(case):
                    out.losses["recall"] = torch.tensor(float("nan"))
                    loss = loss * float("nan")
                losses.append({k: repr(float(v)) for k, v in sorted(out.losses.items())})
            return loss, out

        dig.forward = recording_forward
        trainer.train()
        named = _flat_tensors(trainer.model.state_dict(), "model") + _flat_tensors(
            trainer.optimizer.state_dict(), "optim")
        if case in POISON_CALL:
            assert trainer.dense_optimizer.skipped_steps == 1
        return losses, _tensor_digest(named)
    finally:
        trainer.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_is_bit_identical_to_pre_redesign(tiny_dataset: Path, tmp_path: Path, case: str) -> None:
    losses, digest = _run(tiny_dataset, tmp_path / case, case)
    assert len(losses) == 6
    if RECORD:
        print(f"\nREFERENCE {case!r}: ({losses!r}, {digest!r}),")
        return
    want_losses, want_digest = EXPECTED[case]
    for step, (got, want) in enumerate(zip(losses, want_losses), 1):
        assert got == want, f"{case}: step {step} loss terms differ"
    assert digest == want_digest, f"{case}: model/optimizer state after 6 steps differs"
