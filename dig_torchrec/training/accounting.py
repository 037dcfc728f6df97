"""Row accounting: proof that every training row is consumed exactly once per epoch.

:class:`RowAccounting` wraps the train :class:`~dig_torchrec.data.reader.ExposureReader`
(everything else is delegated to it). For every batch the trainer takes it adds, over
the real (weight-1) exposure rows:

* a row count, and
* an order-independent multiset fingerprint: the sum (mod 2^64) of a 64-bit hash of
  each row's ``user_id``, user and context feature ids, ``item_id`` and ``label``.

Its counters are part of the reader's ``state_dict``, so they travel inside every
checkpoint and a resumed run continues counting *from the checkpoint boundary*: rows a
killed attempt trained on after its last checkpoint are not counted (they are trained
again). When a rank finishes an epoch it records ``run_dir/accounting/rank-<r>.json``::

    {"epochs": {"0": {"rows": 3584, "share_rows": 3584, "reader_rows_consumed": 3584,
                      "fingerprint": "0x...", "batches": 56, "resumed_at": {...} | null, ...}}}

Exactly once means: summed over ranks, ``rows`` equals the split's row count and the
fingerprints add up to :func:`split_fingerprint` of the parquet files (a row read twice
and another missed would change the sum). ``tests/test_failover.py`` checks this after a
worker is killed and the job restarts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

from dig_torchrec.data.batch import DIGBatch
from dig_torchrec.data.schema import ITEM_ID, LABEL, FeatureSchema
from dig_torchrec.files import write_text_atomic

logger = logging.getLogger(__name__)

ACCOUNTING_DIR = "accounting"
_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_hashes(columns: Sequence[np.ndarray]) -> np.ndarray:
    """64-bit hash per row of equally long integer columns (column order matters)."""
    h = np.zeros(len(columns[0]), dtype=np.uint64)
    for j, col in enumerate(columns):
        v = np.asarray(col).astype(np.int64).view(np.uint64)
        h = _mix(h ^ (v + np.uint64(0x9E3779B97F4A7C15 * (j + 1) & _MASK64)))
    return h


def fingerprint(columns: Sequence[np.ndarray]) -> int:
    """Multiset fingerprint of rows: sum of their hashes mod 2^64."""
    if len(columns[0]) == 0:
        return 0
    return int(row_hashes(columns).sum(dtype=np.uint64))


def fingerprint_columns(schema: FeatureSchema) -> List[str]:
    """The columns (= single-valued batch keys + label) a row is identified by."""
    return [*schema.user_features, *schema.context_features, ITEM_ID, LABEL]


def batch_fingerprint(batch: DIGBatch, schema: FeatureSchema) -> tuple[int, int]:
    """(real exposure rows, fingerprint) of a training batch."""
    B = batch.batch_size
    real = (batch.weights[:B] > 0).numpy()
    n = int(real.sum())
    if n == 0:
        return 0, 0
    features = batch.sparse_features.to_dict()
    cols = [features[k].values()[:B].numpy()[real] for k in [*schema.user_features, *schema.context_features, ITEM_ID]]
    cols.append(batch.labels[:B].numpy()[real].astype(np.int64))
    return n, fingerprint(cols)


def split_fingerprint(root: str | Path, split: str, schema: FeatureSchema) -> tuple[int, int]:
    """(rows, fingerprint) of every row of a split's parquet files: the reference."""
    rows, total = 0, 0
    names = fingerprint_columns(schema)
    for f in sorted((Path(root) / split).glob("*.parquet")):
        t = pq.read_table(f, columns=names)
        cols = [t.column(c).to_numpy().astype(np.int64) for c in names]
        rows += t.num_rows
        total = (total + fingerprint(cols)) & _MASK64
    return rows, total


def read_accounting(run_dir: str | Path) -> Dict[int, Dict[str, Any]]:
    """rank -> the rank's accounting record (``run_dir/accounting/rank-<r>.json``)."""
    out = {}
    for p in sorted((Path(run_dir) / ACCOUNTING_DIR).glob("rank-*.json")):
        out[int(p.stem.split("-")[1])] = json.loads(p.read_text())
    return out


class RowAccounting:
    """Counts the rows (and their fingerprint) a train reader hands out; see the module docstring.

    Args:
        reader: the train ``ExposureReader`` (:attr:`reader`; what the trainer reads of it is named below).
        run_dir: where ``accounting/rank-<rank>.json`` is written.
        schema: the feature layout (which keys identify a row).
    """

    def __init__(self, reader: Any, run_dir: str | Path, schema: FeatureSchema) -> None:
        self._reader = reader
        self._schema = schema
        self._path = Path(run_dir) / ACCOUNTING_DIR / f"rank-{reader.rank}.json"
        self._epoch = reader.epoch
        self._rows = 0
        self._fp = 0
        self._batches = 0
        self._exact = True
        self._resumed_at: Optional[Dict[str, int]] = None

    # ------------------------------------------------------------------ the reader's API the trainer uses
    @property
    def reader(self) -> Any:
        """The wrapped ``ExposureReader``."""
        return self._reader

    @property
    def epoch(self) -> int:
        return self._reader.epoch

    @property
    def num_batches(self) -> int:
        """Batches of this rank's share of one epoch."""
        return self._reader.num_batches

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch handed out so far."""
        return int(self._reader.state_dict()["batches_in_epoch"])

    @property
    def epoch_done(self) -> bool:
        return self.batches_in_epoch >= self.num_batches

    @property
    def retrieval_size(self) -> int:
        """Retrieval rows per batch (R)."""
        return self._reader.retrieval_size

    @property
    def items(self) -> Any:
        """The catalog's ``ItemTable``."""
        return self._reader.items

    def negative_sampling_prob(self) -> Any:
        """The reader's negative-sampling ``p(v)`` (None = uniform)."""
        return self._reader.negative_sampling_prob()

    def __len__(self) -> int:
        return len(self._reader)

    # ------------------------------------------------------------------ state
    def counters(self) -> Dict[str, Any]:
        return {"epoch": self._epoch, "rows": self._rows, "fingerprint": self._fp, "batches": self._batches,
                "exact": self._exact}

    def state_dict(self) -> Dict[str, Any]:
        return {**self._reader.state_dict(), "accounting": self.counters()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        acc = state.pop("accounting", None)
        self._reader.load_state_dict(state)
        self._epoch = self._reader.epoch
        if acc is not None and int(acc["epoch"]) == self._epoch:
            self._rows, self._fp, self._batches = int(acc["rows"]), int(acc["fingerprint"]), int(acc["batches"])
            self._exact = bool(acc.get("exact", True))
        else:  # e.g. resumed at another world size: the rows before the boundary are not known one by one
            self._rows, self._fp, self._batches = int(self._reader.rows_consumed), 0, int(state.get("batches_in_epoch", 0))
            self._exact = False
        self._resumed_at = {"epoch": self._epoch, "batches_in_epoch": self._batches, "rows": self._rows}

    def set_epoch(self, epoch: int) -> None:
        self._reader.set_epoch(epoch)
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch = self._reader.epoch
        self._rows, self._fp, self._batches, self._exact = 0, 0, 0, True
        self._resumed_at = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[DIGBatch]:
        for batch in self._reader:
            if self._reader.epoch != self._epoch:  # the reader rolled over to the next epoch itself
                self._start_epoch()
            n, fp = batch_fingerprint(batch, self._schema)
            self._rows += n
            self._fp = (self._fp + fp) & _MASK64
            self._batches += 1
            if self._reader.state_dict()["batches_in_epoch"] >= self._reader.num_batches:
                self._record_epoch()
            yield batch

    def _record_epoch(self) -> None:
        records: Dict[str, Any] = {"rank": self._reader.rank, "world_size": self._reader.world_size, "epochs": {}}
        if self._path.is_file():
            try:
                records = json.loads(self._path.read_text())
            except (OSError, json.JSONDecodeError):
                logger.warning("%s: unreadable; starting a new accounting record", self._path)
        records["epochs"][str(self._epoch)] = {
            "rows": self._rows,
            "fingerprint": hex(self._fp),
            "batches": self._batches,
            "num_batches": self._reader.num_batches,
            "share_rows": self._reader.rows,
            "reader_rows_consumed": int(self._reader.rows_consumed),
            "exact": self._exact,
            "resumed_at": self._resumed_at,
            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
        }
        write_text_atomic(self._path, json.dumps(records, indent=2), mkdir=True)
        if self._rows != self._reader.rows or not self._exact:
            logger.warning("rank %d epoch %d: %d rows consumed of %d in this rank's share (exact=%s)",
                           self._reader.rank, self._epoch, self._rows, self._reader.rows, self._exact)
