"""Bad-input cases driven through the real ``dig`` CLI (shared by two test modules).

Not a test module. ``tests/test_reliability_bad_input.py`` asserts each case's error and
that nothing was overwritten; ``tests/test_troubleshooting_table.py`` renders the same
runs into README.md's troubleshooting table. Each case builds its inputs (a damaged
copy of the micro dataset, a config override, a run directory, an environment), runs
``dig_torchrec.cli.main(["train", ...])`` in this process and records the exit code and
the ``error:`` line. Paths in the recorded line are replaced by ``DATA`` (the dataset
root) and ``RUN`` (the run directory) so the table does not depend on temp dirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
TRAIN_FILE = Path("train") / "part-00000.parquet"
# overrides every case shares; train.max_steps bounds the damage if a check ever stops firing
BASE_OVERRIDES = ["data.history_length=5", "data.batch_size=64", "data.eval_batch_size=256", "train.max_steps=1",
                  "train.val_max_batches=1", "tokenizer.init_after_steps=100"]


@dataclass
class Workspace:
    """Where the cases run: a clean dataset copy, a prior run that must stay untouched."""

    root: Path
    clean_data: Path
    prior_run: Path

    def damaged_copy(self, name: str, edit: Callable[[Path], None]) -> Path:
        """A copy of the clean dataset with ``edit(copy_root)`` applied (made once per name)."""
        dst = self.root / f"data-{name}"
        if not dst.exists():
            shutil.copytree(self.clean_data, dst, ignore=shutil.ignore_patterns(".dig_validated.json"))
            edit(dst)
        return dst


@dataclass
class Case:
    """One bad input.

    Args:
        id: short name (pytest id).
        title: what is wrong, as the README table shows it.
        expect: regex the error line must match.
        setup: ``workspace -> (dataset root, run dir, CLI flags, config overrides, extra env)``.
    """

    id: str
    title: str
    expect: str
    setup: Callable[[Workspace], Tuple[Path, Path, List[str], List[str], Dict[str, str]]]


@dataclass
class Outcome:
    rc: int
    error_line: str  # normalised: DATA / RUN instead of the temp paths
    raw_lines: List[str]


# ---------------------------------------------------------------------- data edits
def _rewrite_train(root: Path, fn: Callable[[pa.Table], pa.Table]) -> None:
    path = root / TRAIN_FILE
    table = pq.read_table(path)
    pq.write_table(fn(table), path, row_group_size=512)


def _set(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def _int_with(table: pa.Table, col: str, row: int, value: Optional[int]) -> pa.Table:
    values = table.column(col).to_pylist()
    values[row] = value
    return _set(table, col, pa.array(values, type=pa.int64()))


def _u2i_with(table: pa.Table, row: int, value: float) -> pa.Table:
    u2i = table.column("u2i").combine_chunks()
    flat = u2i.flatten().to_numpy(zero_copy_only=False).copy()
    d = u2i.type.list_size
    flat[row * d] = value
    return _set(table, "u2i", pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), d))


def _u2i_length(table: pa.Table, length: int) -> pa.Table:
    u2i = table.column("u2i").combine_chunks()
    d = u2i.type.list_size
    flat = u2i.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)[:, :length].reshape(-1)
    return _set(table, "u2i", pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), length))


def _truncate(root: Path) -> None:
    path = root / TRAIN_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(root: Path) -> None:
    path = root / TRAIN_FILE
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def _empty(root: Path) -> None:
    _rewrite_train(root, lambda t: t.slice(0, 0))


# ---------------------------------------------------------------------- cases
def _data_case(name: str, edit: Callable[[Path], None]):
    def setup(ws: Workspace):
        return ws.damaged_copy(name, edit), ws.prior_run, [], [], {}
    return setup


def _cfg_case(*overrides: str, env: Optional[Dict[str, str]] = None):
    def setup(ws: Workspace):
        return ws.clean_data, ws.prior_run, [], list(overrides), dict(env or {})
    return setup


def _resume_case(target: Callable[[Workspace], str]):
    def setup(ws: Workspace):
        return ws.clean_data, ws.prior_run, ["--resume", target(ws)], [], {}
    return setup


def _unwritable(ws: Workspace):
    blocker = ws.root / "not-a-dir"
    blocker.write_text("a file where the run directory's parent should be\n")
    return ws.clean_data, blocker / "run", [], [], {}


CASES: List[Case] = [
    # data layer (issue 2's list)
    Case("missing_column", "missing column", r"DATA/train/part-00000\.parquet: missing column 'hour'",
         _data_case("missing_column", lambda r: _rewrite_train(r, lambda t: t.drop(["hour"])))),
    Case("wrong_dtype", "wrong dtype", r"DATA/train/part-00000\.parquet: column 'device' has dtype string; expected int64",
         _data_case("wrong_dtype", lambda r: _rewrite_train(
             r, lambda t: _set(t, "device", t.column("device").cast(pa.string()))))),
    Case("null", "null in a required column", r"DATA/train/part-00000\.parquet: column 'user_id' .*null",
         _data_case("null", lambda r: _rewrite_train(r, lambda t: _int_with(t, "user_id", 5, None)))),
    Case("negative_id", "negative id", r"DATA/train/part-00000\.parquet: column 'item_id' .*-1",
         _data_case("negative_id", lambda r: _rewrite_train(r, lambda t: _int_with(t, "item_id", 700, -1)))),
    Case("id_beyond_table", "id beyond the table size", r"DATA/train/part-00000\.parquet: column 'city' .*10\b",
         _data_case("id_beyond_table", lambda r: _rewrite_train(r, lambda t: _int_with(t, "city", 1234, 10)))),
    Case("nan_u2i", "NaN in u2i", r"DATA/train/part-00000\.parquet: column 'u2i' row 42: NaN or inf",
         _data_case("nan_u2i", lambda r: _rewrite_train(r, lambda t: _u2i_with(t, 42, float("nan"))))),
    Case("inf_u2i", "inf in u2i", r"DATA/train/part-00000\.parquet: column 'u2i' row 43: NaN or inf",
         _data_case("inf_u2i", lambda r: _rewrite_train(r, lambda t: _u2i_with(t, 43, float("inf"))))),
    Case("u2i_length", "u2i list of the wrong length",
         r"DATA/train/part-00000\.parquet: column 'u2i' has list length 5; expected d_c=6",
         _data_case("u2i_length", lambda r: _rewrite_train(r, lambda t: _u2i_length(t, 5)))),
    Case("empty_dataset", "empty dataset", r"DATA/train: empty dataset",
         _data_case("empty_dataset", _empty)),
    Case("truncated_parquet", "truncated parquet file", r"DATA/train/part-00000\.parquet: corrupt or truncated parquet",
         _data_case("truncated_parquet", _truncate)),
    Case("corrupt_parquet", "corrupt parquet file (garbage bytes)",
         r"DATA/train/part-00000\.parquet: corrupt or truncated parquet", _data_case("corrupt_parquet", _garbage)),
    # config
    Case("unknown_key", "unknown config key (`data.batchsize=64`)", r"unknown config key 'data\.batchsize'; valid keys",
         _cfg_case("data.batchsize=64")),
    Case("wrong_type", "wrong type (`data.batch_size=abc`)", r"config key 'data\.batch_size': expected int, got str",
         _cfg_case("data.batch_size=abc")),
    Case("batch_size_0", "batch size 0 (`data.batch_size=0`)", r"config key 'data\.batch_size' = 0; must be > 0",
         _cfg_case("data.batch_size=0")),
    Case("catalog_too_big", "K^L smaller than the catalog (`tokenizer.num_codes=2`, L=3, 150 items)",
         r"catalog of 150 items exceeds tokenizer\.num_codes \*\* tokenizer\.num_layers = 2\^3 = 8",
         _cfg_case("tokenizer.num_codes=2")),
    Case("u2i_dim", "d_c not matching the data (`data.u2i_dim=8`, data has 6)",
         r"config key 'data\.u2i_dim' = 8 but the dataset at 'DATA' has d_c = 6", _cfg_case("data.u2i_dim=8")),
    Case("row_wise_cpu", "row_wise sharding on CPU (`sharding.constraints.user_id=[row_wise]`)",
         r"config key 'sharding\.constraints\.user_id': sharding type 'row_wise' needs CUDA",
         _cfg_case("sharding.constraints.user_id=[row_wise]")),
    Case("world_size", "world size that does not divide the work (`WORLD_SIZE=16`, 14 row groups)",
         r"split 'train' of 'DATA' has 14 row group\(s\) but the job reads it with 16 slots .*rank 14 would get no rows",
         _cfg_case(env={"WORLD_SIZE": "16", "RANK": "0"})),
    # checkpoints and the run directory
    Case("checkpoint_other_config", "checkpoint from another model config (`--resume auto`)",
         r"checkpoint RUN/checkpoints/step-2 is incompatible: config key 'model\.embedding_dim' is 8 in the checkpoint but 16 now",
         _resume_case(lambda ws: "auto")),
    Case("checkpoint_missing", "missing checkpoint directory (`--resume RUN/checkpoints/step-999`)",
         r"--resume RUN/checkpoints/step-999: checkpoint directory does not exist",
         _resume_case(lambda ws: str(ws.prior_run / "checkpoints" / "step-999"))),
    Case("run_dir_unwritable", "unwritable output directory (`run_dir` under a file)",
         r"config key 'run_dir' = 'RUN': directory is not writable", _unwritable),
    Case("disk_full", "full disk (free space below `train.min_free_disk_mb`)",
         r"config key 'run_dir' = 'RUN': only N MB free on its disk, below train\.min_free_disk_mb=1000000000",
         _cfg_case("train.min_free_disk_mb=1000000000")),
]


# ---------------------------------------------------------------------- running
def make_workspace(root: Path, clean_data: Path) -> Workspace:
    """A workspace with a copy of ``clean_data`` and a prior run whose checkpoint has ``model.embedding_dim=8``."""
    import torch

    from dig_torchrec.config import load_config, save_config
    from dig_torchrec.data.schema import DatasetMeta
    from dig_torchrec.training.checkpoint import CheckpointManager

    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    if not data.exists():
        shutil.copytree(clean_data, data, ignore=shutil.ignore_patterns(".dig_validated.json"))
    run = root / "prior-run"
    if not (run / "checkpoints" / "step-2").exists():
        other = load_config(CONFIG, [f"data.path={data}", f"run_dir={run}", "model.embedding_dim=8",
                                     "tokenizer.encoder_heads=2", *BASE_OVERRIDES])
        run.mkdir(parents=True, exist_ok=True)
        save_config(other, run / "config.yaml")
        CheckpointManager(run, 3).save(2, {"model": {"w": torch.zeros(3)}}, config=other,
                                       dataset_meta=DatasetMeta.load(data), check_finite=True)
        (run / "final_metrics.json").write_text('{"step": 2}\n')
    return Workspace(root=root, clean_data=data, prior_run=run)


def snapshot(path: Path) -> Dict[str, Tuple[int, int, str]]:
    """relative file path -> (size, mtime_ns, sha256) of every file under ``path``."""
    out = {}
    if not path.exists():
        return out
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        out[str(f.relative_to(path))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def normalise(line: str, data: Path, run: Path) -> str:
    line = line.replace(str(run), "RUN").replace(str(data), "DATA")
    return re.sub(r"only \d+ MB free", "only N MB free", line)


def run_case(case: Case, ws: Workspace) -> Outcome:
    """Run ``dig train`` for one case in this process; return the exit code and its error line."""
    from dig_torchrec.cli import main

    data, run, flags, overrides, env = case.setup(ws)
    argv = ["train", "--config", str(CONFIG), *flags, f"data.path={data}", f"run_dir={run}", *BASE_OVERRIDES,
            *overrides]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            rc = main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _leave_process_group()
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("error: ")]
    line = normalise(lines[-1], data, run) if lines else ""
    return Outcome(rc=rc, error_line=line, raw_lines=lines)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_RESULTS: Dict[str, Dict[str, Outcome]] = {}


def run_all(ws: Workspace) -> Dict[str, Outcome]:
    """Every case once per workspace (cached: both test modules share the runs)."""
    key = str(ws.root)
    if key not in _RESULTS:
        _RESULTS[key] = {case.id: run_case(case, ws) for case in CASES}
    return _RESULTS[key]


def render_table(outcomes: Dict[str, Outcome]) -> str:
    """The README troubleshooting section (markdown)."""
    lines = [
        "<!-- GENERATED by tests/test_troubleshooting_table.py from real `dig train` runs; do not edit.",
        "     Regenerate: .venv/bin/python tests/test_troubleshooting_table.py -->",
        "### Troubleshooting: bad input and what `dig train` prints",
        "",
        "Every case below is a real run of `dig train --config configs/tiny.yaml ...` on a damaged copy of the",
        "micro synthetic dataset (`DATA`) or with a bad flag; `RUN` is the run directory. Each stops before",
        "training starts with exit status 2 and the one line shown, and leaves an existing run directory",
        "untouched.",
        "",
        "| bad input | exit | error printed |",
        "|---|---|---|",
    ]
    for case in CASES:
        o = outcomes[case.id]
        msg = o.error_line.replace("|", "\\|")
        lines.append(f"| {case.title} | {o.rc} | `{msg}` |")
    lines += [
        "",
        "Numerical faults during training stop with `error: step N: non-finite loss term '<term>' "
        "(train.nan_policy=error; ...)`; `train.nan_policy=skip` skips such batches with a warning and counts",
        "them (`train/skipped_steps`). A checkpoint is never written with a NaN/inf tensor.",
        "",
    ]
    return "\n".join(lines)


_WORKSPACES: Dict[str, Workspace] = {}


def shared_workspace(tmp_root: Path, clean_data: Path) -> Workspace:
    """One workspace per pytest session (``tmp_root`` from ``tmp_path_factory``), built on first use."""
    key = str(clean_data)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = make_workspace(tmp_root / "bad-input", clean_data)
        _WORKSPACES[key].prior_snapshot = snapshot(_WORKSPACES[key].prior_run)  # type: ignore[attr-defined]
    return _WORKSPACES[key]
