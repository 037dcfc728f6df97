"""Runs the real :class:`Trainer` (under torchrun or alone) and dumps per-rank state for tests.

Not a test module: ``tests/test_train_*.py`` launch it as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_driver.py --dump DIR --config X k=v``.
Each rank writes ``DIR/rank<r>.pt`` (tokenizer buffers, step, reader state) and
``DIR/pred<r>.pt`` (eval-mode logits of one fixed valid batch).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--dump", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("torchrec").setLevel(logging.WARNING)

    from dig_torchrec.config import load_config
    from dig_torchrec.data.reader import ExposureReader
    from dig_torchrec.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume)
    trainer.train()
    rank = trainer.env.rank
    dump = Path(args.dump)
    dump.mkdir(parents=True, exist_ok=True)
    tok = trainer.dig.tokenizer
    torch.save(
        {
            "step": trainer.step,
            "initialized": tok.is_initialized,
            "buffers": {k: v.detach().cpu().clone() for k, v in tok.named_buffers()},
            "reader": trainer.train_reader.state_dict(),
        },
        dump / f"rank{rank}.pt",
    )
    batch = next(iter(ExposureReader(cfg.data.path, "valid", cfg.data, trainer.schema, with_retrieval=False, shuffle=False)))
    trainer.model.eval()
    with torch.no_grad():
        _, out = trainer.model(batch.to(trainer.env.device))
    torch.save({"rank_logits": out.rank_logits.cpu(), "recall_logits": out.recall_logits.cpu()}, dump / f"pred{rank}.pt")
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
