"""Golden hashes: the reader yields bit-for-bit the batches of the pre-redesign reader.

Every hash below was recorded by running this file's code against the reader at git tag
``pre-redesign`` (issue 16), before ``data/reader.py`` was split into parts. A batch's
digest is a sha256 over every tensor it carries (KJT keys, values, lengths,
``length_per_key``/``offset_per_key`` and stride, exposure u2i / labels / weights, the
retrieval rows' u2i / labels / weights; the retrieval rows' negatives are the KJT's
``item_id`` values after the exposure rows), and an epoch's hash is the sha256 of its batch
digests in order. The dataset is the ``micro`` synthetic preset (the ``tiny_dataset``
fixture); its own fingerprint is checked first, so a change of the generator is not
mistaken for a change of the reader.

To re-record (only when the batches are MEANT to change): check out the commit whose
batches are the reference, copy this file into it and run
``python tests/test_reader_golden.py``; it prints the dicts to paste below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from dig_torchrec.config import DataConfig
from dig_torchrec.data.reader import ExposureReader, load_targets, open_dataset

# the micro preset's train/valid/test/items/retrieval tables (content, not file bytes)
DATA_FINGERPRINT = '218bbeccbd689693af473c78de24459b771b06c5ebe1d3bf7525daca1bcf9bb2'

# name -> sha256 of a whole epoch's batch digests (see CASES)
GOLDEN_EPOCHS: Dict[str, str] = {
    "uniform_shuffle": "c3afca3dda3d780080122225de25035934555a5fc852c3ab443e8795038bcdd3",
    "popularity_auto_epoch1": "5079a6c070e895cdf07adf30f765604fa1aa267975f55fa958d1e7c49f311092",
    "no_shuffle": "2a9d0beefa2a17e43402519bfcae257c56641b1a6de34aa03fcc03734cb41a46",
    "valid_eval": "5c83dac96225078b89d6a309e153a19d116396c70161596f7d492f8bad1a601d",
    "no_retrieval": "ac2c604cda22b49d8319b4741be4a34883bcb3ea137578f0757ae0355efd8a92",
    "rank0_of_2": "b2f3eb8a8914da38f2f224d47ea1c1d11f5a7582f168d644ceeee58c862fe8b9",
    "rank1_of_2": "c8beca1adaec9a0c2f82148c49f3eb5206a60dbb188ba561e85fe84b7b989cc9",
    "rank2_of_3": "9bfeb51bcc3d0bc3dc92c08332cb5940706b30732d4869a6a95e0a9748867f08",
    "workers2": "7583f121cc4efaa90abd74a0491fad883d5dea7059d00b2f81917b4e4ecf5ffc",
    "uniform_shuffle:epoch1": "e1e3bcfff09968cc95c93a2e722de4b636b388212c78e8cdb5529e82160d4919"
}

# name -> sha256 of the batches a fresh reader yields after resuming at RESUME_AT[name]
GOLDEN_RESUMES: Dict[str, str] = {
    "uniform_shuffle": "2402ecbe5cc84c3ccef6d937a9f6ea7b6f2e08372e8f99f37713acbac31e13cf",
    "popularity_auto_epoch1": "3b9bdd40b9a045f4f50d6ca0743a713656e4e6adcdd96f8333abd7fee92d08e9",
    "rank1_of_2": "c4b845f5a6fbb21a2cb1f79f85fa76f231eab041683e4b22341008aaf71a9e71",
    "rank2_of_3": "14802d3a3b37bcfe8908b0ff73f1c9c34dd0b4ee4c00669271bf113a13c15aac",
    "workers2": "35d5906f00eb215838e4961f26cdd431fee4fae29fbeb14af307fb3faa038cad"
}

# split -> sha256 of load_targets(root, split, schema)
GOLDEN_TARGETS: Dict[str, str] = {
    "valid": "81e1f62ff76af6a02170512a2bb6b7378cdb2e5c69f81309da3d9af2a8d1385d",
    "test": "267f2f7c75d58c32be59d519a3fd91cda17878b917c0b8b4c4d73d2c27231cb0"
}

# the reader's state_dict() keys, in order: checkpoints store them, so they must not change
STATE_KEYS = ["epoch", "batches_in_epoch", "rows_consumed", "retrieval_clicks_dropped", "num_batches", "world_size",
              "num_workers", "seed", "split"]

# name -> the state_dict() values after the epoch (STATE_KEYS order), then rows, retrieval_size and the
# sha256 of negative_sampling_prob() (None: uniform)
POPULARITY = "98d3173b9468b97932206ef12ebe8528ff5cc2f4aac30797d1b442f7d7f173a2"
GOLDEN_STATES: Dict[str, Tuple] = {
    "uniform_shuffle": (0, 112, 7143, 3, 112, 1, 0, 0, "train", 7143, 64, None),
    "popularity_auto_epoch1": (1, 112, 7143, 0, 112, 1, 0, 0, "train", 7143, 80, POPULARITY),
    "no_shuffle": (0, 112, 7143, 42, 112, 1, 0, 0, "train", 7143, 64, None),
    "valid_eval": (0, 4, 793, 116, 4, 1, 0, 0, "valid", 793, 64, None),
    "no_retrieval": (0, 112, 7143, 0, 112, 1, 0, 0, "train", 7143, 0, None),
    "rank0_of_2": (0, 56, 3584, 325, 56, 2, 0, 0, "train", 3584, 16, POPULARITY),
    "rank1_of_2": (0, 56, 3559, 322, 56, 2, 0, 0, "train", 3559, 16, POPULARITY),
    "rank2_of_3": (0, 40, 2048, 0, 40, 3, 0, 0, "train", 2048, 64, None),
    "workers2": (0, 112, 7143, 2, 112, 1, 2, 0, "train", 7143, 64, None),
}


def _base(root: Path) -> DataConfig:
    return DataConfig(path=str(root), batch_size=64, eval_batch_size=256, history_length=5, shuffle_buffer=1024,
                      negatives_per_positive=3, retrieval_positives=16)


# name -> (split, DataConfig overrides, ExposureReader kwargs)
CASES: Dict[str, Tuple[str, Dict[str, object], Dict[str, object]]] = {
    # windows of 2+ row groups: batches straddle windows, the multi-table decode path
    "uniform_shuffle": ("train", {}, {}),
    # one row group per window, auto positives, popularity negatives, a later epoch's order
    "popularity_auto_epoch1": ("train", {"negative_sampling": "popularity", "retrieval_positives": 0,
                                         "shuffle_buffer": 64}, {"epoch": 1}),
    "no_shuffle": ("train", {}, {"shuffle": False}),
    "valid_eval": ("valid", {}, {}),
    "no_retrieval": ("train", {}, {"with_retrieval": False}),
    # 2-rank sharding; few positives, so clicks overflow and are subsampled
    "rank0_of_2": ("train", {"negative_sampling": "popularity", "retrieval_positives": 4}, {"rank": 0, "world_size": 2}),
    "rank1_of_2": ("train", {"negative_sampling": "popularity", "retrieval_positives": 4}, {"rank": 1, "world_size": 2}),
    # unequal slots: weight-0 padding batches
    "rank2_of_3": ("train", {"shuffle_buffer": 300}, {"rank": 2, "world_size": 3}),
    # DataLoader workers (one slot each, round robin)
    "workers2": ("train", {"num_workers": 2, "shuffle_buffer": 700}, {}),
}

# name -> batches consumed before the state_dict is taken and a fresh reader resumes
RESUME_AT: Dict[str, int] = {"uniform_shuffle": 37, "popularity_auto_epoch1": 50, "rank1_of_2": 11, "rank2_of_3": 20,
                             "workers2": 5}


def _update(h: "hashlib._Hash", t: torch.Tensor) -> None:
    a = t.detach().contiguous().numpy()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def batch_digest(batch) -> str:
    """sha256 over every tensor of a DIGBatch, the KJT's layout included."""
    h = hashlib.sha256()
    kjt = batch.sparse_features
    h.update(json.dumps([list(kjt.keys()), kjt.stride(), kjt.length_per_key(), kjt.offset_per_key()]).encode())
    _update(h, kjt.values())
    _update(h, kjt.lengths())
    for t in (batch.u2i, batch.labels, batch.weights, batch.retrieval_u2i, batch.retrieval_labels,
              batch.retrieval_weights):
        _update(h, t)
    return h.hexdigest()


def _chain(digests: List[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def data_fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for part in ("items.parquet", "train", "valid", "test", "retrieval/valid.parquet", "retrieval/test.parquet"):
        path = root / part
        table = pq.read_table(path) if path.is_file() else pads.dataset(str(path), format="parquet").to_table()
        h.update(f"{part}:{table.num_rows}:{table.schema}".encode())
        for name in table.column_names:
            for chunk in table.column(name).chunks:
                for buf in chunk.buffers():
                    if buf is not None:
                        h.update(buf.to_pybytes())
    return h.hexdigest()


def targets_digest(root: Path, split: str, schema) -> str:
    t = load_targets(root, split, schema)
    h = hashlib.sha256()
    kjt = t.user_kjt
    h.update(json.dumps([list(kjt.keys()), kjt.stride(), kjt.length_per_key(), kjt.offset_per_key()]).encode())
    for x in (kjt.values(), kjt.lengths(), t.target_item, t.history, t.states.offsets, t.states.keys,
              t.states.stats, t.user_id, t.u2i, t.context):
        _update(h, x)
    return h.hexdigest()


def make_reader(root: Path, schema, name: str) -> ExposureReader:
    split, overrides, kwargs = CASES[name]
    return ExposureReader(root, split, dataclasses.replace(_base(root), **overrides), schema, **kwargs)


def _state(reader: ExposureReader) -> Tuple:
    state = reader.state_dict()
    assert list(state) == STATE_KEYS
    prob = reader.negative_sampling_prob()
    return (*state.values(), reader.rows, reader.retrieval_size,
            None if prob is None else hashlib.sha256(prob.numpy().tobytes()).hexdigest())


def epoch_digests(root: Path, schema, name: str) -> Tuple[List[str], Tuple]:
    reader = make_reader(root, schema, name)
    digests = [batch_digest(b) for b in reader]
    return digests, _state(reader)


def resumed_digests(root: Path, schema, name: str, at: int) -> List[str]:
    """Batches after a mid-epoch state_dict, read by a fresh reader."""
    reader = make_reader(root, schema, name)
    it = iter(reader)
    for _ in range(at):
        next(it)
    state = reader.state_dict()
    del it
    fresh = make_reader(root, schema, name)
    fresh.load_state_dict(state)
    return [batch_digest(b) for b in fresh]


def _schema(root: Path):
    return open_dataset(root, _base(root))[1]


@pytest.fixture(scope="module")
def golden_schema(tiny_dataset):
    assert data_fingerprint(tiny_dataset) == DATA_FINGERPRINT, \
        "the micro synthetic dataset changed: these hashes describe other data (re-record them, see the docstring)"
    return _schema(tiny_dataset)


@pytest.mark.parametrize("name", list(CASES))
def test_epoch_is_bit_identical_to_the_pre_redesign_reader(tiny_dataset, golden_schema, name):
    digests, state = epoch_digests(tiny_dataset, golden_schema, name)
    assert len(digests) == state[STATE_KEYS.index("num_batches")]
    assert state == GOLDEN_STATES[name]
    assert _chain(digests) == GOLDEN_EPOCHS[name]
    if name in RESUME_AT:
        at = RESUME_AT[name]
        resumed = resumed_digests(tiny_dataset, golden_schema, name, at)
        assert resumed == digests[at:]  # the resume continues the uninterrupted epoch exactly
        assert _chain(resumed) == GOLDEN_RESUMES[name]


def test_next_epoch_is_bit_identical(tiny_dataset, golden_schema):
    """Iterating again after an epoch starts the next one (its own shuffle and draws)."""
    reader = make_reader(tiny_dataset, golden_schema, "uniform_shuffle")
    first = [batch_digest(b) for b in reader]
    second = [batch_digest(b) for b in reader]
    assert reader.state_dict()["epoch"] == 1 and second != first
    assert _chain(second) == GOLDEN_EPOCHS["uniform_shuffle:epoch1"]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_retrieval_targets_are_bit_identical(tiny_dataset, golden_schema, split):
    assert targets_digest(tiny_dataset, split, golden_schema) == GOLDEN_TARGETS[split]


def test_golden_hashes_tell_the_cases_apart():
    """Every case reads different batches, so a hash cannot pass by being degenerate."""
    assert len(set(GOLDEN_EPOCHS.values())) == len(GOLDEN_EPOCHS) == len(CASES) + 1
    assert set(GOLDEN_RESUMES) == set(RESUME_AT) and set(GOLDEN_STATES) == set(CASES)


def _record(root: Optional[Path] = None) -> None:
    """Print the golden dicts of the reader this file is run against."""
    from dig_torchrec.data.synthetic import generate, preset

    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            root = Path(tmp) / "micro"
            generate(preset("micro", seed=0), root, processes=1)  # as tests/conftest.py:tiny_dataset
        schema = _schema(root)
        epochs, resumes, states = {}, {}, {}
        for name in CASES:
            digests, states[name] = epoch_digests(root, schema, name)
            epochs[name] = _chain(digests)
            if name in RESUME_AT:
                resumed = resumed_digests(root, schema, name, RESUME_AT[name])
                assert resumed == digests[RESUME_AT[name]:], name
                resumes[name] = _chain(resumed)
        reader = make_reader(root, schema, "uniform_shuffle")
        list(reader)
        epochs["uniform_shuffle:epoch1"] = _chain([batch_digest(b) for b in reader])
        print(f"DATA_FINGERPRINT = {data_fingerprint(root)!r}")
        print(f"GOLDEN_EPOCHS = {json.dumps(epochs, indent=4)}")
        print(f"GOLDEN_RESUMES = {json.dumps(resumes, indent=4)}")
        print(f"GOLDEN_TARGETS = {json.dumps({s: targets_digest(root, s, schema) for s in ('valid', 'test')}, indent=4)}")
        print("GOLDEN_STATES = {")
        for name, state in states.items():
            print(f"    {name!r}: {state!r},")
        print("}")


if __name__ == "__main__":
    _record(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
