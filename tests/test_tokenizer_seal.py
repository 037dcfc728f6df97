"""Sealing the SID table at ``tokenizer.freeze_after_steps``.

Before the freeze, ``item_sid_table`` holds each item's argmin from the last batch it was in,
without collision resolution. Once frozen, that table is what the recall path trains on and
what beam search serves, so the freeze re-assigns the whole catalog on the frozen codebooks
and resolves last-layer collisions (``DIGTokenizer.seal``; the trainer calls it once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch

from dig_torchrec.config import TokenizerConfig, load_config
from dig_torchrec.modules.balanced_kmeans import (
    balanced_tree_assign,
    balanced_tree_init,
    collision_rate,
    resolve_last_layer_collisions,
)
from dig_torchrec.modules.tokenizer import DIGTokenizer

ROOT = Path(__file__).resolve().parents[1]


def _colliding_tokenizer(seal: str = "argmin") -> tuple[DIGTokenizer, torch.Tensor]:
    """L=2, K=4 codebooks on which Eq. 2 puts 3 items in leaf (0, 0), 2 in (1, 0) and 2 in (2, 0)."""
    cfg = TokenizerConfig(num_layers=2, num_codes=4, encoder_layers=1, encoder_heads=1, freeze_after_steps=1,
                          init_kmeans_iters=2, collision_resolution="last_layer", seal=seal)
    torch.manual_seed(0)
    tok = DIGTokenizer(cfg, num_fields=1, dim=2, num_items=8)
    e_v = torch.tensor([
        [10.0, 0.0], [10.1, 0.0], [10.0, 0.1],  # prefix 0, nearest last code 0
        [0.0, 10.0], [0.1, 10.0],  # prefix 1, nearest last code 0
        [-10.0, 0.0], [0.0, -10.0], [-10.0, 0.1],  # prefixes 2, 3, 2
    ])
    tok.initialize(e_v)
    books = torch.zeros_like(tok.quantizer.codebooks)
    books[0] = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [0.0, -10.0]])
    books[1] = torch.tensor([[0.0, 0.0], [5.0, 5.0], [6.0, 6.0], [7.0, 7.0]])
    tok.quantizer.codebooks.copy_(books)
    return tok, e_v


def test_argmin_seal_reassigns_the_catalog_on_the_frozen_codebooks_with_distinct_leaves():
    tok, e_v = _colliding_tokenizer()
    argmin = tok.assign(e_v)
    assert collision_rate(argmin, 4) == pytest.approx(7 / 8)  # what an unsealed table would serve
    tok.item_sid_table.copy_(argmin)
    tok.steps_since_init = 1
    assert tok.ema_frozen

    rate = tok.seal(e_v.reshape(8, -1))

    table = tok.item_sid_table
    assert rate == 0.0 and tok.collision_rate() == 0.0
    assert torch.equal(table[:, 0], argmin[:, 0])  # the prefix is Eq. 2's; only the last token moves
    prefix_sum = tok.quantizer.codebooks[0][argmin[:, 0]]
    want = resolve_last_layer_collisions(argmin, e_v - prefix_sum, tok.quantizer.codebooks[1])
    assert torch.equal(table, want)
    assert len({tuple(s) for s in table.tolist()}) == 8
    # frozen training quantizes with the sealed table, and inference serves it
    ids = torch.arange(8)
    assert torch.equal(tok.quantize(e_v.reshape(8, 1, 2), ids).sids, table)
    assert torch.equal(tok.corpus_sids(e_v), table)


def test_balanced_seal_spreads_a_collapsed_codebook_over_distinct_leaves():
    tok, e_v = _colliding_tokenizer("balanced")
    # the first layer collapses: Eq. 2 sends every item to code 0
    tok.quantizer.codebooks[0] = torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]])
    assert torch.equal(tok.assign(e_v)[:, 0], torch.zeros(8, dtype=torch.long))
    tok.steps_since_init = 1
    assert tok.seal(e_v) == 0.0
    table = tok.item_sid_table
    # balanced: the 8 items take 2 of each layer-1 code, then one of the codes in their node
    assert torch.bincount(table[:, 0], minlength=4).tolist() == [2, 2, 2, 2]
    assert len({tuple(s) for s in table.tolist()}) == 8
    assert torch.equal(table, balanced_tree_assign(e_v, tok.quantizer.codebooks))
    assert torch.equal(tok.quantize(e_v.reshape(8, 1, 2), torch.arange(8)).sids, table)


def test_balanced_tree_assign_on_the_init_codebooks_reproduces_the_init_sids():
    torch.manual_seed(3)
    e_v = torch.randn(300, 6) + torch.randn(5, 6).repeat(60, 1) * 3  # clustered, uneven
    books, sids = balanced_tree_init(e_v, num_codes=8, num_layers=3, kmeans_iters=4, seed=1)
    assert torch.equal(balanced_tree_assign(e_v, books), sids)
    assert collision_rate(sids, 8) == 0.0


def test_auto_seal_keeps_a_table_below_the_threshold_and_seals_one_above():
    tok, e_v = _colliding_tokenizer("auto")
    argmin = tok.assign(e_v)
    tok.steps_since_init = 1
    distinct = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [3, 0], [2, 1]])
    tok.item_sid_table.copy_(distinct)  # no collisions: nothing to fix, every SID stays
    assert tok.seal_mode() is None
    assert tok.seal(None) == 0.0 and torch.equal(tok.item_sid_table, distinct)  # no catalog e_v needed
    tok.item_sid_table.copy_(argmin)  # 7/8 of the items share a leaf: above 1%, sealed (balanced)
    assert tok.seal_mode() == "balanced"
    with pytest.raises(ValueError, match="no e_v, catalog has 8 items"):
        tok.seal(None)
    assert tok.seal(e_v) == 0.0
    assert torch.equal(tok.item_sid_table, balanced_tree_assign(e_v, tok.quantizer.codebooks))
    tok.cfg.seal_collision_threshold = 0.9  # 0.875 <= 0.9: kept as is
    tok.item_sid_table.copy_(argmin)
    assert tok.seal_mode() is None
    assert tok.seal(e_v) == pytest.approx(7 / 8) and torch.equal(tok.item_sid_table, argmin)


def test_seal_rejects_a_catalog_of_the_wrong_size():
    tok, e_v = _colliding_tokenizer()
    with pytest.raises(ValueError, match="catalog has 8 items"):
        tok.seal(e_v[:5])


def _run(run: Path, data: Path, steps: int, monkeypatch: pytest.MonkeyPatch,
         resume: Optional[str] = None) -> Tuple[List[int], int, torch.Tensor, torch.Tensor]:
    """Train the tiny config to ``steps`` (tokenizer init at 10, frozen 5 steps later, checkpoints every 15).

    Returns the ``steps_since_init`` of every ``seal`` call, the start step, and the SID table at
    the start and at the end.
    """
    from dig_torchrec.training.trainer import Trainer

    calls: List[int] = []
    real_seal = DIGTokenizer.seal

    def spy(self: DIGTokenizer, e_v_all: torch.Tensor) -> float:
        calls.append(int(self.steps_since_init))
        return real_seal(self, e_v_all)

    monkeypatch.setattr(DIGTokenizer, "seal", spy)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.path={data}", f"run_dir={run}", "data.history_length=5", "data.batch_size=64",
        f"train.max_steps={steps}", "train.log_every=1000", "train.val_every=0", "train.checkpoint_every=15",
        "tokenizer.init_after_steps=10", "tokenizer.freeze_after_steps=5", "tokenizer.seal=balanced",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = Trainer(cfg, resume=resume)
    try:
        start, before = trainer.step, trainer.dig.tokenizer.item_sid_table.clone()
        trainer.train()
        return calls, start, before, trainer.dig.tokenizer.item_sid_table.clone()
    finally:
        trainer.close()
        torch.set_num_threads(threads)


def test_the_trainer_seals_once_at_the_freeze_and_a_resume_does_not_reseal(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "run"
    calls, _, _, sealed_table = _run(run, tiny_dataset, 15, monkeypatch)
    assert calls == [5]  # at step init_after_steps + freeze_after_steps = 15, the codebooks just frozen
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sealed = [r for r in records if r["kind"] == "tokenizer"]
    assert [r["step"] for r in sealed] == [15]
    # balanced: the tiny catalog (< K^L items) gets one leaf per item
    assert sealed[0]["tokenizer/sealed_collision_rate"] == 0.0 and collision_rate(sealed_table, 16) == 0.0

    calls, start, before, after = _run(run, tiny_dataset, 30, monkeypatch, resume="auto")
    assert start == 15 and calls == []  # the sealed table came with the step-15 checkpoint
    assert torch.equal(before, sealed_table) and torch.equal(after, sealed_table)  # and stays frozen
