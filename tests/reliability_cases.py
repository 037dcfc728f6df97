"""The bad-input matrix: real ``dig`` runs on damaged inputs (shared by two test modules).

Not a test module. ``tests/test_reliability_bad_input.py`` asserts each case's exit code,
its first output line and that nothing it was given changed; ``tests/test_troubleshooting_table.py``
renders the same runs into README.md's troubleshooting table.

Each case gets its own directory (the working directory of its run) holding copies of the
inputs it damages: ``data`` (the micro synthetic dataset), ``raw`` (raw MovieLens / KuaiRec
/ Taobao files), ``run`` (a run directory), ``ckpt`` (a checkpoint of a short real
``dig train`` run) or ``bundle`` (its ``dig export``). Paths on the command line are
relative to it, so the recorded lines read like a user's. The whole directory is hashed
before and after the run (:func:`snapshot`): a rejected command must leave every file as
it was and create none.

Every run is a separate process executing ``dig_torchrec.cli.main`` (the ``dig`` console
script's entry point) with its own working directory, environment, stdout and stderr.
To keep ~70 runs within the default test budget, the processes are forked from a
``multiprocessing`` forkserver that has imported torch/torchrec once
(:class:`Runner`); ``tests/test_reliability_bad_input.py`` also runs a sample of cases
through the installed ``dig`` script from a cold interpreter.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the forkserver imports this module by name
    sys.path.insert(0, str(TESTS))
CONFIG = REPO / "configs" / "tiny.yaml"
TRAIN_FILE = Path("train") / "part-00000.parquet"
MICRO = ["data.history_length=5", "data.batch_size=64", "data.eval_batch_size=256", "train.val_max_batches=1"]
# overrides every `dig train` case shares; train.max_steps bounds the damage if a check ever stops firing
BASE_OVERRIDES = [*MICRO, "train.max_steps=1", "tokenizer.init_after_steps=100"]
# the shared trained run: 4 steps, a checkpoint after each, tokenizer initialized after step 2
TRAINED_STEPS, INIT_AFTER = 4, 2
TRAIN_OVERRIDES = [*MICRO, f"train.max_steps={TRAINED_STEPS}", f"tokenizer.init_after_steps={INIT_AFTER}",
                   "train.checkpoint_every=1", "train.keep_latest_k=10", "train.log_every=1"]
# files `dig` may add to an input that passed its checks: the data layer's validation cache
# (ROOT/.dig_validated.json: sizes and mtimes of a dataset that validated)
CACHES = (".dig_validated.json",)
_UNSET_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RESTART_COUNT")


# ---------------------------------------------------------------------- running `dig` in a process
def _child(argv: List[str], cwd: str, env: Dict[str, Optional[str]], out: str, err: str) -> None:
    """Body of one forked run: the ``dig`` entry point with its own cwd, env and output files."""
    import traceback

    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, flags, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(cwd)
    import logging

    root = logging.getLogger()  # as in a fresh interpreter: no handler until `dig` configures one
    for h in list(root.handlers):
        root.removeHandler(h)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        from dig_torchrec.cli import main

        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  what the interpreter would do: traceback, exit 1
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc or 0))


class Runner:
    """Runs ``dig ARGS`` in processes forked from a warm forkserver (torch imported once)."""

    PRELOAD = ["dig_torchrec.cli", "dig_torchrec.data.cli", "dig_torchrec.training.cli", "dig_torchrec.retrieval.cli",
               "dig_torchrec.export.cli", "dig_torchrec.training.trainer", "dig_torchrec.retrieval.evaluate",
               "reliability_cases"]

    def __init__(self) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(self.PRELOAD)

    def run(self, argv: List[str], cwd: Path, env: Optional[Dict[str, Optional[str]]] = None,
            timeout: float = 600.0) -> Tuple[int, str, str, float]:
        """``(exit code, stdout, stderr, seconds)`` of ``dig *argv`` run in ``cwd``."""
        full_env: Dict[str, Optional[str]] = {k: None for k in _UNSET_ENV}
        full_env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        full_env.update(env or {})
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            t0 = time.perf_counter()
            p = self.ctx.Process(target=_child, args=(list(argv), str(cwd), full_env, out, err))
            p.start()
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()
            seconds = time.perf_counter() - t0
            rc = p.exitcode if p.exitcode is not None else -9
            return (rc if rc >= 0 else 128 - rc), Path(out).read_text(), Path(err).read_text(), seconds


# ---------------------------------------------------------------------- the shared inputs
@dataclass
class Workspace:
    """Inputs built once per session and copied into each case's directory."""

    root: Path
    clean_data: Path  # the micro dataset
    other_data: Path  # another micro dataset (other seed): "data.path points at another dataset"
    prior_run: Path  # a run whose checkpoint has model.embedding_dim=8 (tiny.yaml has 16)
    trained_run: Path  # `dig train` for 4 steps, checkpoint after each, tokenizer init after step 2
    bundle: Path  # `dig export` of the trained run's last checkpoint
    runner: Runner

    @property
    def trained_ckpt(self) -> Path:
        return self.trained_run / "checkpoints" / f"step-{TRAINED_STEPS}"

    @property
    def uninit_ckpt(self) -> Path:
        return self.trained_run / "checkpoints" / "step-1"


@dataclass
class Ctx:
    """One case's directory and helpers to put (damaged) inputs into it."""

    ws: Workspace
    dir: Path

    def data(self, edit: Optional[Callable[[Path], None]] = None, name: str = "data", src: Optional[Path] = None) -> str:
        dst = self.dir / name
        shutil.copytree(src or self.ws.clean_data, dst, ignore=shutil.ignore_patterns(".dig_validated.json"))
        if edit:
            edit(dst)
        return name

    def copy(self, src: Path, name: str, edit: Optional[Callable[[Path], None]] = None) -> str:
        dst = self.dir / name
        shutil.copytree(src, dst)
        if edit:
            edit(dst)
        return name

    def ckpt(self, edit: Optional[Callable[[Path], None]] = None, src: Optional[Path] = None) -> str:
        return self.copy(src or self.ws.trained_ckpt, "ckpt", edit)

    def run(self, edit: Optional[Callable[[Path], None]] = None) -> str:
        return self.copy(self.ws.trained_run, "run", edit)

    def bundle(self, edit: Optional[Callable[[Path], None]] = None) -> str:
        return self.copy(self.ws.bundle, "bundle", edit)

    def file(self, rel: str, text: str | bytes = "") -> str:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text)
        return rel

    def users(self, n: int = 2) -> str:
        ids = pq.read_table(self.ws.clean_data / "retrieval" / "test.parquet").column("user_id").to_pylist()[:n]
        return ",".join(map(str, ids))


@dataclass
class Case:
    """One bad input.

    Args:
        id: short name (pytest id).
        command: the ``dig`` command it exercises (the README table groups by it).
        title: what is wrong, as the README table shows it.
        expect: regex the first non-empty output line (stderr) must match.
        setup: ``ctx -> argv`` (after ``dig``), with inputs placed in ``ctx.dir``.
        rc: expected exit status.
        env: extra environment of the run.
        issue: the "wrong answer with exit 0" item of issue 17 it covers (1-5), if any.
    """

    id: str
    command: str
    title: str
    expect: str
    setup: Callable[[Ctx], List[str]]
    rc: int = 2
    env: Dict[str, str] = field(default_factory=dict)
    issue: Optional[int] = None


@dataclass
class Outcome:
    rc: int
    first_line: str  # normalised: no temp paths
    lines: List[str]  # every non-empty stderr line (raw)
    changed: List[str]  # files of the case directory added (except caches), removed or modified
    seconds: float
    stdout: str = ""


# ---------------------------------------------------------------------- damage helpers
def _rewrite(root: Path, fn: Callable[[pa.Table], pa.Table], rel: Path = TRAIN_FILE) -> None:
    path = root / rel
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


def _state_scaled(table: pa.Table, factor: float, sign: float = 1.0) -> pa.Table:
    """Multiply the first statistic of every user_state entry of the *last* click row of the
    first user with >= 2 click rows by ``factor`` (and ``sign``)."""
    state = table.column("user_state").combine_chunks()
    users = table.column("user_id").to_numpy()
    present = ~state.is_null().to_numpy(zero_copy_only=False)
    lens = state.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(present & (lens > 0))
    u = next(x for x in users[rows] if (users[rows] == x).sum() >= 2)
    ts = table.column("timestamp").to_numpy()
    mine = rows[users[rows] == u]
    last = int(mine[np.argmax(ts[mine])])
    offsets = state.offsets.to_numpy()
    values = state.values
    names = [values.type.field(i).name for i in range(values.type.num_fields)]
    arrays = [values.field(i) for i in range(len(names))]
    first = arrays[1].to_numpy(zero_copy_only=False).copy()
    first[offsets[last]:offsets[last + 1]] *= factor * sign
    arrays[1] = pa.array(first, type=arrays[1].type)
    struct = pa.StructArray.from_arrays(arrays, names=names)
    mask = pa.array(~present)
    return _set(table, "user_state", pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), struct, mask=mask))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def _overwrite_middle(path: Path, n: int = 4096, byte: int = 0xA5) -> None:
    """Overwrite ``n`` bytes in the middle of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes([byte]) * len(data[mid:mid + n])
    path.write_bytes(bytes(data))


def _garble_region(path: Path) -> None:
    """Overwrite a tenth of a file, from a third of the way in, with pseudo-random bytes (same size)."""
    data = bytearray(path.read_bytes())
    lo, n = len(data) // 3, max(8, len(data) // 10)
    data[lo:lo + n] = np.random.default_rng(1).integers(0, 256, len(data[lo:lo + n]), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _flip_bytes(path: Path, n: int = 16) -> None:
    """Add 1 to ``n`` bytes in the middle of a file (inside some tensor's data; same size)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] = (data[i] + 1) % 256
    path.write_bytes(bytes(data))


def _nan_ckpt(ctx: "Ctx") -> str:
    """The trained model re-saved (valid records and CRCs) with one NaN weight, bypassing the
    trainer's refusal to write one (``check_finite=False``)."""
    import torch

    from dig_torchrec.training.checkpoint import CheckpointManager, read_config, read_dataset_meta
    from dig_torchrec.inference import load_for_inference

    model, _, _ = load_for_inference(ctx.ws.trained_ckpt)
    name = next(n for n, p in model.named_parameters() if p.is_floating_point() and p.dim() == 2)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")
    run = ctx.dir / ".nan-run"
    mgr = CheckpointManager(run, config=read_config(ctx.ws.trained_ckpt),
                            dataset_meta=read_dataset_meta(ctx.ws.trained_ckpt))
    path = mgr.save(TRAINED_STEPS, {"model": model}, check_finite=False)
    shutil.move(str(path), str(ctx.dir / "ckpt"))
    shutil.rmtree(run)
    return "ckpt"


# raw files of the three public datasets (small, in the published layouts)
def _flags(*on: int) -> str:
    return "|".join("1" if g in on else "0" for g in range(19))


def movielens_raw(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.occupation").write_text("administrator\nartist\nother\n")
    (d / "u.user").write_text("1|24|M|artist|55105\n2|53|F|other|L9G2B\n3|33|M|other|10001\n")
    (d / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags(3, 4, 5)}\n"
                              f"2|Star Wars (1977)|01-Jan-1977||http://y|{_flags(1)}\n"
                              f"3|Mystery||| |{_flags()}\n", encoding="latin-1")
    rows = [(1, 2, 5, 400), (2, 2, 4, 50), (1, 2, 3, 200), (1, 1, 5, 100), (1, 1, 4, 200), (2, 3, 1, 60),
            (1, 3, 4, 300), (1, 1, 2, 500), (3, 1, 5, 10), (3, 2, 4, 20), (3, 3, 5, 30), (2, 1, 5, 70)]
    (d / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))


def kuairec_raw(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    header = "user_id,video_id,play_duration,video_duration,time,date,timestamp,watch_ratio\n"
    rows = [(14, 183, 8000, "500.0", 2.0), (14, 148, 10000, "100.0", 1.2), (21, 148, 10000, "50.0", 0.1),
            (14, 183, 8000, "200.5", 0.5), (14, 3649, 60000, "300.0", 0.8), (14, 148, 10000, "400.0", 0.9)]
    (d / "small_matrix.csv").write_text(header + "".join(
        f"{u},{v},{int(w * dd)},{dd},2020-07-05 05:27:48.378,20200705,{t},{w}\n" for u, v, dd, t, w in rows))
    (d / "item_categories.csv").write_text('video_id,feat\n9,[8]\n148,[11]\n183,"[27, 9]"\n3649,"[8, 11]"\n')
    (d / "user_features.csv").write_text(
        "user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,follow_user_num,"
        "follow_user_num_range,fans_user_num,fans_user_num_range,friend_user_num,friend_user_num_range,"
        "register_days,register_days_range\n"
        '14,high_active,0,0,0,5,"(0,10]",1,"[1,10)",0,0,107,61-90\n'
        '21,full_active,0,0,1,386,"(250,500]",4,"[1,10)",2,"[1,5)",327,181-365\n')


def taobao_raw(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "raw_sample.csv").write_text(
        "user,time_stamp,adgroup_id,pid,nonclk,clk\n"
        "581738,300,1,430548_1007,0,1\n581738,100,1,430548_1007,0,1\n7,150,3,430539_1007,1,0\n"
        "581738,200,2,430539_1007,1,0\n581738,500,2,430548_1007,0,1\n581738,400,3,430548_1007,0,1\n")
    (d / "ad_feature.csv").write_text(
        "adgroup_id,cate_id,campaign_id,customer,brand,price\n"
        "1,6406,83237,1,95471,170.0\n2,6406,83238,2,NULL,99.0\n3,4520,83239,3,95471,10.0\n")
    (d / "user_profile.csv").write_text(
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
        "new_user_class_level\n581738,0,5,2,5,,3,0,3\n7,0,1,1,2,1,2,1,\n")
    (d / "behavior_log.csv").write_text("user,time_stamp,btag,cate,brand\n581738,250,buy,6406,95471\n")


_RAW = {"movielens": movielens_raw, "kuairec": kuairec_raw, "taobao": taobao_raw}


def _raw(source: str, edit: Optional[Callable[[Path], None]] = None) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        _RAW[source](ctx.dir / "raw")
        if edit:
            edit(ctx.dir / "raw")
        return ["data", "convert", source, "--src", "raw", "--out", "out"]
    return setup


def _append(name: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_text((d / name).read_text() + text)


def _cut_last_line(name: str, keep_fields: int, sep: str) -> Callable[[Path], None]:
    """Truncate the file inside its last line, after ``keep_fields`` fields (a partial copy)."""
    def edit(d: Path) -> None:
        lines = (d / name).read_text().splitlines()
        lines[-1] = sep.join(lines[-1].split(sep)[:keep_fields]) + sep
        (d / name).write_text("\n".join(lines) + "\n")
    return edit


def _replace_field(name: str, line: int, index: int, value: str, sep: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        lines = (d / name).read_text().splitlines()
        parts = lines[line - 1].split(sep)
        parts[index] = value
        lines[line - 1] = sep.join(parts)
        (d / name).write_text("\n".join(lines) + "\n")
    return edit


def _empty(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_text("")


# ---------------------------------------------------------------------- case builders
def _train(data_edit: Optional[Callable[[Path], None]] = None, *overrides: str, flags: Tuple[str, ...] = (),
           run: Optional[Callable[[Ctx], str]] = None) -> Callable[[Ctx], List[str]]:
    def setup(ctx: Ctx) -> List[str]:
        data = ctx.data(data_edit)
        run_dir = run(ctx) if run else "run"
        return ["train", "--config", str(CONFIG), *flags, f"data.path={data}", f"run_dir={run_dir}",
                *BASE_OVERRIDES, *overrides]
    return setup


def _prior_run(ctx: Ctx) -> str:
    return ctx.copy(ctx.ws.prior_run, "run")


def _trained_run(edit: Optional[Callable[[Path], None]] = None) -> Callable[[Ctx], str]:
    return lambda ctx: ctx.run(edit)


def _resume_trained(edit: Callable[[Path], None]) -> Callable[[Ctx], List[str]]:
    """``dig train --resume auto`` into a copy of the trained run whose newest checkpoint is damaged."""
    def setup(ctx: Ctx) -> List[str]:
        run = ctx.run(lambda r: edit(r / "checkpoints" / f"step-{TRAINED_STEPS}"))
        return ["train", "--config", str(CONFIG), "--resume", "auto", f"data.path={ctx.ws.clean_data}",
                f"run_dir={run}", *TRAIN_OVERRIDES, f"train.max_steps={TRAINED_STEPS + 2}"]
    return setup


def _unwritable_run(ctx: Ctx) -> List[str]:
    ctx.file("not-a-dir", "a file where the run directory's parent should be\n")
    return ["train", "--config", str(CONFIG), f"data.path={ctx.data()}", "run_dir=not-a-dir/run", *BASE_OVERRIDES]


def _cmd(*argv: str, ckpt: Optional[Callable[[Ctx], str]] = None, extra: Callable[[Ctx], List[str]] = lambda c: []
         ) -> Callable[[Ctx], List[str]]:
    """``dig <argv...>`` with ``{ckpt}`` / ``{users}`` / ``{data}`` placeholders filled in."""
    def setup(ctx: Ctx) -> List[str]:
        values = {"ckpt": ckpt(ctx) if ckpt else "", "users": ctx.users(), "other": str(ctx.ws.other_data),
                  "data": str(ctx.ws.clean_data)}
        return [a.format(**values) for a in argv] + extra(ctx)
    return setup


def _ck(edit: Optional[Callable[[Path], None]] = None, uninit: bool = False) -> Callable[[Ctx], str]:
    return lambda ctx: ctx.ckpt(edit, ctx.ws.uninit_ckpt if uninit else None)


def _bd(edit: Optional[Callable[[Path], None]] = None) -> Callable[[Ctx], str]:
    return lambda ctx: ctx.bundle(edit)


def _validate(edit: Callable[[Path], None], command: str = "validate") -> Callable[[Ctx], List[str]]:
    return lambda ctx: ["data", command, ctx.data(edit)]


def _meta_gone(d: Path) -> None:
    (d / "meta.json").unlink()


def _no_complete(d: Path) -> None:
    (d / "COMPLETE").unlink()


def _empty_run(ctx: Ctx) -> str:
    ctx.file("run/checkpoints/.tmp-step-3/.metadata", b"half written")
    return "run"


_TRAIN_PQ = r"data/train/part-00000\.parquet"
_DISTCP = "__0_0.distcp"

CASES: List[Case] = [
    # ------------------------------------------------------------------ dig data synth
    Case("synth_out_is_file", "data synth", "`--out` is an existing file", r"^error: --out out: is a file",
         lambda c: ["data", "synth", "--preset", "micro", "--out", c.file("out", "x\n")]),
    Case("synth_out_has_dataset", "data synth", "`--out` already holds a dataset",
         r"^error: --out data: already holds a dataset", lambda c: ["data", "synth", "--preset", "micro", "--out", c.data()]),
    Case("synth_out_partial", "data synth", "`--out` holds a partial dataset of an interrupted run",
         r"^error: --out out: directory is not empty \(a partial dataset",
         lambda c: ["data", "synth", "--preset", "micro", "--out", c.file("out/train/part-00000.parquet", b"PAR1") and "out"]),
    Case("synth_out_under_file", "data synth", "`--out` under a file", r"^error: --out f/out: f is a file, not a directory",
         lambda c: ["data", "synth", "--preset", "micro", "--out", c.file("f", "x") and "f/out"]),
    Case("synth_unknown_preset", "data synth", "unknown preset (`--preset huge`)", r"^error: unknown synth preset 'huge'",
         lambda c: ["data", "synth", "--preset", "huge", "--out", "out"]),
    Case("synth_zero_rows", "data synth", "`--rows 0`", r"^error: synth sizes must be positive .*rows=0",
         lambda c: ["data", "synth", "--preset", "micro", "--rows", "0", "--out", "out"]),
    # ------------------------------------------------------------------ dig data convert (fuzzed raw files)
    Case("ml_truncated_line", "data convert", "MovieLens `u.data` cut inside its last line (`42\\t523\\t5\\t`)",
         r"^error: raw/u\.data: line 13: column 'timestamp' is empty", _raw("movielens", _append("u.data", "42\t523\t5\t\n")),
         issue=2),
    Case("ml_missing_field", "data convert", "MovieLens `u.data` line with 3 of 4 fields",
         r"^error: raw/u\.data: line 13: expected 4 fields, got 3", _raw("movielens", _append("u.data", "1\t2\t5\n"))),
    Case("ml_garbled", "data convert", "MovieLens `u.data` garbled rating", r"^error: raw/u\.data: line 3: column 'rating' value 'x5' is not an integer",
         _raw("movielens", _replace_field("u.data", 3, 2, "x5", "\t"))),
    Case("ml_rating_range", "data convert", "MovieLens `u.data` rating 7", r"^error: raw/u\.data: line 2: column 'rating' value 7 outside \[1, 5\]",
         _raw("movielens", _replace_field("u.data", 2, 2, "7", "\t"))),
    Case("ml_negative_time", "data convert", "MovieLens `u.data` negative timestamp",
         r"^error: raw/u\.data: line 4: column 'timestamp' value -5 outside \[0, 10000000000000\]",
         _raw("movielens", _replace_field("u.data", 4, 3, "-5", "\t"))),
    Case("ml_empty", "data convert", "MovieLens `u.data` empty", r"^error: raw/u\.data: empty file",
         _raw("movielens", _empty("u.data"))),
    Case("ml_item_truncated", "data convert", "MovieLens `u.item` cut inside its last line",
         r"^error: raw/u\.item: line 3: expected 24 '\|' fields, got 6", _raw("movielens", _cut_last_line("u.item", 5, "|"))),
    Case("ml_user_garbled", "data convert", "MovieLens `u.user` garbled age", r"^error: raw/u\.user: line 2: bad user id or age",
         _raw("movielens", _replace_field("u.user", 2, 1, "fifty", "|"))),
    Case("ml_user_empty", "data convert", "MovieLens `u.user` empty", r"^error: raw/u\.user: no users \(empty file\)",
         _raw("movielens", _empty("u.user"))),
    Case("ml_missing_file", "data convert", "MovieLens `u.item` missing", r"^error: raw/u\.item: MovieLens 100K file not found",
         _raw("movielens", lambda d: (d / "u.item").unlink())),
    Case("kr_truncated_line", "data convert", "KuaiRec matrix cut inside its last line",
         r"^error: raw/small_matrix\.csv: line 7: expected 8 fields, got 4", _raw("kuairec", _cut_last_line("small_matrix.csv", 3, ","))),
    Case("kr_garbled", "data convert", "KuaiRec matrix garbled `user_id`",
         r"^error: raw/small_matrix\.csv: line 3: column 'user_id' value 'u14' is not an integer",
         _raw("kuairec", _replace_field("small_matrix.csv", 3, 0, "u14", ","))),
    Case("kr_empty", "data convert", "KuaiRec matrix empty", r"^error: raw/small_matrix\.csv: empty file",
         _raw("kuairec", _empty("small_matrix.csv"))),
    Case("kr_header_only", "data convert", "KuaiRec matrix with a header only", r"^error: raw/small_matrix\.csv: no usable rows",
         _raw("kuairec", lambda d: (d / "small_matrix.csv").write_text((d / "small_matrix.csv").read_text().splitlines()[0] + "\n"))),
    Case("kr_bad_tags", "data convert", "KuaiRec `item_categories.csv` garbled tag list",
         r"^error: raw/item_categories\.csv: line 3: column 'feat': cannot parse tag list",
         _raw("kuairec", _replace_field("item_categories.csv", 3, 1, "[1x]", ","))),
    Case("tb_truncated_line", "data convert", "Taobao `raw_sample.csv` cut inside its last line",
         r"^error: raw/raw_sample\.csv: line 7: expected 6 fields, got 3", _raw("taobao", _cut_last_line("raw_sample.csv", 2, ","))),
    Case("tb_garbled", "data convert", "Taobao `raw_sample.csv` garbled `clk`",
         r"^error: raw/raw_sample\.csv: line 4: column 'clk' value 'yes' is not an integer",
         _raw("taobao", _replace_field("raw_sample.csv", 4, 5, "yes", ","))),
    Case("tb_empty_field", "data convert", "Taobao `raw_sample.csv` empty `time_stamp`",
         r"^error: raw/raw_sample\.csv: line 2: column 'time_stamp' is empty",
         _raw("taobao", _replace_field("raw_sample.csv", 2, 1, "", ","))),
    Case("tb_empty", "data convert", "Taobao `raw_sample.csv` empty", r"^error: raw/raw_sample\.csv: empty file",
         _raw("taobao", _empty("raw_sample.csv"))),
    Case("tb_ad_garbled", "data convert", "Taobao `ad_feature.csv` garbled price",
         r"^error: raw/ad_feature\.csv: line 2: column 'price' value 'cheap' is not a number",
         _raw("taobao", _replace_field("ad_feature.csv", 2, 5, "cheap", ","))),
    Case("convert_src_missing", "data convert", "`--src` does not exist", r"^error: nowhere: source directory not found",
         lambda c: ["data", "convert", "movielens", "--src", "nowhere", "--out", "out"]),
    Case("convert_out_has_dataset", "data convert", "`--out` already holds a dataset", r"^error: --out data: already holds a dataset",
         lambda c: (movielens_raw(c.dir / "raw"), ["data", "convert", "movielens", "--src", "raw", "--out", c.data()])[1]),
    # ------------------------------------------------------------------ dig data validate
    Case("bad_timestamp", "data validate", "timestamp -9223372036854775808 (a converter's missing field)",
         r"^error: " + _TRAIN_PQ + r": column 'timestamp' row 7: value -9223372036854775808 outside",
         _validate(lambda r: _rewrite(r, lambda t: _int_with(t, "timestamp", 7, -(2**63)))), issue=2),
    Case("prefix_stats_decrease", "data validate", "`user_state` prefix statistics that decrease in time",
         r"^error: " + _TRAIN_PQ + r": column 'user_state' row \d+: statistic 'exposures' summed over keys is .* below",
         _validate(lambda r: _rewrite(r, lambda t: _state_scaled(t, 0.1))), issue=2),
    Case("prefix_stats_negative", "data validate", "negative `user_state` statistic",
         r"^error: " + _TRAIN_PQ + r": column 'user_state' row \d+: statistic 'exposures' is negative, NaN or inf",
         _validate(lambda r: _rewrite(r, lambda t: _state_scaled(t, 1.0, -1.0)))),
    Case("validate_truncated", "data validate", "truncated parquet file",
         r"^error: " + _TRAIN_PQ + r": corrupt or truncated parquet file", _validate(lambda r: _truncate(r / TRAIN_FILE))),
    Case("validate_no_meta", "data validate", "`meta.json` missing", r"^error: data/meta\.json: dataset metadata file not found",
         _validate(_meta_gone)),
    Case("validate_bad_meta", "data validate", "`meta.json` not JSON", r"^error: data/meta\.json: invalid JSON",
         _validate(lambda r: (r / "meta.json").write_text("{\"name\": "))),
    Case("validate_missing_root", "data validate", "dataset root does not exist", r"^error: nowhere: dataset root not found",
         lambda c: ["data", "validate", "nowhere"]),
    # ------------------------------------------------------------------ dig data stats
    Case("stats_truncated", "data stats", "truncated parquet file",
         r"^error: " + _TRAIN_PQ + r": corrupt or truncated parquet file", _validate(lambda r: _truncate(r / TRAIN_FILE), "stats")),
    Case("stats_garbage", "data stats", "parquet file overwritten with garbage",
         r"^error: " + _TRAIN_PQ + r": corrupt or truncated parquet file", _validate(lambda r: _garbage(r / TRAIN_FILE), "stats")),
    Case("stats_negative_id", "data stats", "negative id (statistics still printed, with a warning first)",
         r"^warning: " + _TRAIN_PQ + r": column 'item_id' row 700: negative id -1 \(`dig data validate` fails",
         _validate(lambda r: _rewrite(r, lambda t: _int_with(t, "item_id", 700, -1)), "stats"), rc=0),
    Case("stats_nan_u2i", "data stats", "NaN in u2i (statistics still printed, with a warning first)",
         r"^warning: " + _TRAIN_PQ + r": column 'u2i' row 42: NaN or inf \(`dig data validate` fails",
         _validate(lambda r: _rewrite(r, lambda t: _u2i_with(t, 42, float("nan"))), "stats"), rc=0),
    Case("stats_missing_root", "data stats", "dataset root does not exist", r"^error: nowhere: dataset root not found",
         lambda c: ["data", "stats", "nowhere"]),
    # ------------------------------------------------------------------ dig train: data
    Case("missing_column", "train", "missing column", r"^error: " + _TRAIN_PQ + r": missing column 'hour'",
         _train(lambda r: _rewrite(r, lambda t: t.drop(["hour"])))),
    Case("wrong_dtype", "train", "wrong dtype", r"^error: " + _TRAIN_PQ + r": column 'device' has dtype string; expected int64",
         _train(lambda r: _rewrite(r, lambda t: _set(t, "device", t.column("device").cast(pa.string()))))),
    Case("null", "train", "null in a required column", r"^error: " + _TRAIN_PQ + r": column 'user_id' .*null",
         _train(lambda r: _rewrite(r, lambda t: _int_with(t, "user_id", 5, None)))),
    Case("negative_id", "train", "negative id", r"^error: " + _TRAIN_PQ + r": column 'item_id' .*-1",
         _train(lambda r: _rewrite(r, lambda t: _int_with(t, "item_id", 700, -1)))),
    Case("id_beyond_table", "train", "id beyond the table size", r"^error: " + _TRAIN_PQ + r": column 'city' .*10\b",
         _train(lambda r: _rewrite(r, lambda t: _int_with(t, "city", 1234, 10)))),
    Case("nan_u2i", "train", "NaN in u2i", r"^error: " + _TRAIN_PQ + r": column 'u2i' row 42: NaN or inf",
         _train(lambda r: _rewrite(r, lambda t: _u2i_with(t, 42, float("nan"))))),
    Case("inf_u2i", "train", "inf in u2i", r"^error: " + _TRAIN_PQ + r": column 'u2i' row 43: NaN or inf",
         _train(lambda r: _rewrite(r, lambda t: _u2i_with(t, 43, float("inf"))))),
    Case("u2i_length", "train", "u2i list of the wrong length",
         r"^error: " + _TRAIN_PQ + r": column 'u2i' has list length 5; expected d_c=6",
         _train(lambda r: _rewrite(r, lambda t: _u2i_length(t, 5)))),
    Case("empty_dataset", "train", "empty dataset", r"^error: data/train: empty dataset",
         _train(lambda r: _rewrite(r, lambda t: t.slice(0, 0)))),
    Case("truncated_parquet", "train", "truncated parquet file", r"^error: " + _TRAIN_PQ + r": corrupt or truncated parquet",
         _train(lambda r: _truncate(r / TRAIN_FILE))),
    Case("corrupt_parquet", "train", "corrupt parquet file (garbage bytes)",
         r"^error: " + _TRAIN_PQ + r": corrupt or truncated parquet", _train(lambda r: _garbage(r / TRAIN_FILE))),
    Case("data_path_missing", "train", "`data.path` does not exist", r"^error: nowhere/meta\.json: dataset metadata file not found",
         lambda c: ["train", "--config", str(CONFIG), "data.path=nowhere", "run_dir=run", *BASE_OVERRIDES]),
    # ------------------------------------------------------------------ dig train: config
    Case("unknown_key", "train", "unknown config key (`data.batchsize=64`)", r"^error: unknown config key 'data\.batchsize'; valid keys",
         _train(None, "data.batchsize=64")),
    Case("wrong_type", "train", "wrong type (`data.batch_size=abc`)", r"^error: config key 'data\.batch_size': expected int, got str",
         _train(None, "data.batch_size=abc")),
    Case("batch_size_0", "train", "batch size 0 (`data.batch_size=0`)", r"^error: config key 'data\.batch_size' = 0; must be > 0",
         _train(None, "data.batch_size=0")),
    Case("config_missing", "train", "`--config` file does not exist", r"^error: config file not found: nowhere\.yaml",
         lambda c: ["train", "--config", "nowhere.yaml"]),
    Case("catalog_too_big", "train", "K^L smaller than the catalog (`tokenizer.num_codes=2`, L=3, 150 items)",
         r"^error: catalog of 150 items exceeds tokenizer\.num_codes \*\* tokenizer\.num_layers = 2\^3 = 8",
         _train(None, "tokenizer.num_codes=2")),
    Case("u2i_dim", "train", "d_c not matching the data (`data.u2i_dim=8`, data has 6)",
         r"^error: config key 'data\.u2i_dim' = 8 but the dataset at 'data' has d_c = 6", _train(None, "data.u2i_dim=8")),
    Case("row_wise_cpu", "train", "row_wise sharding on CPU (`sharding.constraints.user_id=[row_wise]`)",
         r"^error: config key 'sharding\.constraints\.user_id': sharding type 'row_wise' needs CUDA",
         _train(None, "sharding.constraints.user_id=[row_wise]")),
    Case("world_size", "train", "world size that does not divide the work (`WORLD_SIZE=16`, 14 row groups)",
         r"^error: split 'train' of 'data' has 14 row group\(s\) but the job reads it with 16 slots .*rank 14 would get no rows",
         _train(None), env={"WORLD_SIZE": "16", "RANK": "0"}),
    # ------------------------------------------------------------------ dig train: run directory and checkpoints
    Case("run_dir_has_checkpoints", "train", "`run_dir` holds a finished run's checkpoints, no `--resume`",
         r"^error: config key 'run_dir' = 'run' already holds \d+ complete checkpoint\(s\) .*pass --resume auto .*--fresh",
         _train(None, run=_trained_run()), issue=3),
    Case("fresh_and_resume", "train", "`--fresh` together with `--resume auto`", r"^error: --fresh and --resume auto contradict",
         _train(None, flags=("--fresh", "--resume", "auto"), run=_trained_run())),
    Case("checkpoint_other_config", "train", "checkpoint from another model config (`--resume auto`)",
         r"^error: checkpoint run/checkpoints/step-2 is incompatible: config key 'model\.embedding_dim' is 8 in the checkpoint but 16 now",
         _train(None, flags=("--resume", "auto"), run=_prior_run)),
    Case("checkpoint_missing", "train", "missing checkpoint directory (`--resume run/checkpoints/step-999`)",
         r"^error: --resume run/checkpoints/step-999: checkpoint directory does not exist",
         _train(None, flags=("--resume", "run/checkpoints/step-999"), run=_prior_run)),
    Case("resume_bad_metadata", "train", "`--resume auto` whose newest checkpoint has a truncated `.metadata`",
         r"^error: run/checkpoints/step-4/\.metadata: unreadable, the checkpoint is damaged",
         _resume_trained(lambda d: _truncate(d / ".metadata"))),
    Case("resume_truncated_tensors", "train", "`--resume auto` whose newest checkpoint has a truncated tensor file",
         r"^error: run/checkpoints/step-4/__0_0\.distcp: truncated \(\d+ bytes, the metadata needs \d+\)",
         _resume_trained(lambda d: _truncate(d / _DISTCP))),
    Case("resume_garbled_tensors", "train", "`--resume auto` whose newest checkpoint has garbled bytes in its tensor file",
         r"^error: run/checkpoints/step-4/__0_0\.distcp: tensor '.*' \(bytes \d+-\d+\) is not a whole record",
         _resume_trained(lambda d: _garble_region(d / _DISTCP))),
    Case("resume_flipped_bytes", "train", "`--resume auto` whose newest checkpoint has 16 changed bytes inside a tensor",
         r"^error: run/checkpoints/step-4/__0_0\.distcp: tensor '.*' fails its CRC-32 check",
         _resume_trained(lambda d: _flip_bytes(d / _DISTCP))),
    Case("resume_bad_rank_state", "train", "`--resume auto` whose newest checkpoint has a damaged `rank_state/rank-0.pt`",
         r"^error: run/checkpoints/step-4/rank_state/rank-0\.pt: unreadable, the checkpoint is damaged",
         _resume_trained(lambda d: _truncate(d / "rank_state" / "rank-0.pt", 0.3))),
    Case("run_dir_unwritable", "train", "unwritable output directory (`run_dir` under a file)",
         r"^error: config key 'run_dir' = 'not-a-dir/run': directory is not writable", _unwritable_run),
    Case("disk_full", "train", "full disk (free space below `train.min_free_disk_mb`)",
         r"^error: config key 'run_dir' = 'run': only N MB free on its disk, below train\.min_free_disk_mb=1000000000",
         _train(None, "train.min_free_disk_mb=1000000000")),
    # ------------------------------------------------------------------ dig eval
    Case("eval_bundle_bytes", "eval", "bundle whose `__0_0.distcp` has overwritten bytes (same size)",
         r"^error: bundle/__0_0\.distcp: sha256 differs from manifest\.json",
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", ckpt=_bd(lambda d: _overwrite_middle(d / _DISTCP))), issue=1),
    Case("eval_nan_weights", "eval", "checkpoint written with a NaN weight (by code that skipped the save check)",
         r"^error: ckpt/__0_0\.distcp: tensor 'model\.embedding_bags\.embedding_bags\.user_id\.weight' holds NaN/inf",
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", ckpt=_nan_ckpt), issue=1),
    Case("eval_uninitialized", "eval", "checkpoint saved before tokenizer init (step 1, `init_after_steps=2`)",
         r"^error: ckpt: saved at step 1, before the tokenizer was initialized \(tokenizer\.init_after_steps=2\)",
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", ckpt=_ck(uninit=True)), issue=4),
    Case("eval_other_dataset", "eval", "`data.path` pointing at another dataset",
         r"^error: config key 'data\.path' = '.*' is not the dataset checkpoint ckpt was trained on",
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", "data.path={other}", ckpt=_ck()), issue=5),
    Case("eval_bad_metadata", "eval", "checkpoint with a truncated `.metadata`",
         r"^error: ckpt/\.metadata: unreadable, the checkpoint is damaged",
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", ckpt=_ck(lambda d: _truncate(d / ".metadata")))),
    Case("eval_truncated_tensors", "eval", "checkpoint with a truncated tensor file",
         r"^error: ckpt/__0_0\.distcp: truncated",
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", ckpt=_ck(lambda d: _truncate(d / _DISTCP)))),
    Case("eval_garbled_tensors", "eval", "checkpoint with garbled bytes in its tensor file (same size)",
         r"^error: ckpt/__0_0\.distcp: tensor '.*' \(bytes \d+-\d+\) is not a whole record",
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", ckpt=_ck(lambda d: _garble_region(d / _DISTCP)))),
    Case("eval_flipped_bytes", "eval", "checkpoint with 16 changed bytes inside a tensor (same size)",
         r"^error: ckpt/__0_0\.distcp: tensor '.*' fails its CRC-32 check", 
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", ckpt=_ck(lambda d: _flip_bytes(d / _DISTCP))), issue=1),
    Case("eval_incomplete", "eval", "checkpoint without `COMPLETE` (interrupted save)",
         r"^error: --checkpoint ckpt: checkpoint is incomplete \(no COMPLETE marker\)",
         _cmd("eval", "--checkpoint", "{ckpt}", "--no-progress", ckpt=_ck(_no_complete))),
    Case("eval_run_dir_empty", "eval", "run directory without a complete checkpoint",
         r"^error: --checkpoint run: run directory has no complete checkpoint",
         _cmd("eval", "--checkpoint", "{ckpt}", ckpt=_empty_run)),
    Case("eval_out_under_file", "eval", "`--out` under a file", r"^error: --out f/x\.json: f is a file, not a directory",
         _cmd("eval", "--checkpoint", "{ckpt}", "--out", "f/x.json", ckpt=lambda c: c.file("f", "x") and c.ckpt())),
    Case("eval_max_users", "eval", "`--max-users -5`", r"^error: --max-users must be >= 0",
         _cmd("eval", "--checkpoint", "{ckpt}", "--max-users", "-5", ckpt=_ck())),
    Case("eval_unknown_key", "eval", "unknown override (`eval.beam_width=3`)", r"^error: unknown config key 'eval\.beam_width'",
         _cmd("eval", "--checkpoint", "{ckpt}", "eval.beam_width=3", ckpt=_ck())),
    Case("eval_checkpoint_file", "eval", "`--checkpoint` is a file", r"^error: --checkpoint f: is a file",
         _cmd("eval", "--checkpoint", "f", ckpt=lambda c: c.file("f", "x"))),
    # ------------------------------------------------------------------ dig retrieve
    Case("retrieve_bundle_bytes", "retrieve", "bundle whose `__0_0.distcp` has overwritten bytes (same size)",
         r"^error: bundle/__0_0\.distcp: sha256 differs from manifest\.json",
         _cmd("retrieve", "--checkpoint", "{ckpt}", "--users", "{users}", "--topk", "3", "--no-progress",
              ckpt=_bd(lambda d: _overwrite_middle(d / _DISTCP))), issue=1),
    Case("retrieve_other_dataset", "retrieve", "`data.path` pointing at another dataset (its SID index stays as it is)",
         r"^error: config key 'data\.path' = '.*' is not the dataset checkpoint ckpt was trained on",
         _cmd("retrieve", "--checkpoint", "{ckpt}", "--users", "{users}", "--no-progress", "data.path={other}",
              ckpt=_ck(lambda d: _sid_index(d))), issue=5),
    Case("retrieve_uninitialized", "retrieve", "checkpoint saved before tokenizer init",
         r"^error: ckpt: saved at step 1, before the tokenizer was initialized \(tokenizer\.init_after_steps=2\)",
         _cmd("retrieve", "--checkpoint", "{ckpt}", "--users", "{users}", "--no-progress", ckpt=_ck(uninit=True)), issue=4),
    Case("retrieve_csv", "retrieve", "`--out recs.csv`", r"^error: --out recs\.csv: use a \.json or \.parquet file name",
         _cmd("retrieve", "--checkpoint", "{ckpt}", "--users", "{users}", "--out", "recs.csv", ckpt=_ck())),
    Case("retrieve_out_exists", "retrieve", "`--out` exists (no `--force`)", r"^error: --out recs\.json: already exists",
         _cmd("retrieve", "--checkpoint", "{ckpt}", "--users", "{users}", "--out", "recs.json",
              ckpt=lambda c: c.file("recs.json", "{}") and c.ckpt())),
    Case("retrieve_users", "retrieve", "`--users abc`", r"^error: --users 'abc': expected comma-separated integer user ids",
         _cmd("retrieve", "--checkpoint", "{ckpt}", "--users", "abc", ckpt=_ck())),
    Case("retrieve_topk", "retrieve", "`--topk 0`", r"^error: --topk must be > 0",
         _cmd("retrieve", "--checkpoint", "{ckpt}", "--users", "{users}", "--topk", "0", ckpt=_ck())),
    Case("retrieve_no_target", "retrieve", "user without a test target (`--users 999999`)",
         r"^error: user 999999 has no test retrieval target",
         _cmd("retrieve", "--checkpoint", "{ckpt}", "--users", "999999", "--no-progress", f"data.path={{data}}",
              ckpt=_bd())),
    # ------------------------------------------------------------------ dig export
    Case("export_uninitialized", "export", "checkpoint saved before tokenizer init",
         r"^error: ckpt: saved at step 1, before the tokenizer was initialized \(tokenizer\.init_after_steps=2\)",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "out", ckpt=_ck(uninit=True)), issue=4),
    Case("export_other_dataset", "export", "`data.path` pointing at another dataset",
         r"^error: config key 'data\.path' = '.*' is not the dataset checkpoint ckpt was trained on",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "out", "data.path={other}", ckpt=_ck()), issue=5),
    Case("export_bad_metadata", "export", "checkpoint with a truncated `.metadata`",
         r"^error: ckpt/\.metadata: unreadable, the checkpoint is damaged",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "out", ckpt=_ck(lambda d: _truncate(d / ".metadata")))),
    Case("export_bad_rank_state", "export", "checkpoint with a damaged `rank_state/rank-0.pt`",
         r"^error: ckpt/rank_state/rank-0\.pt: unreadable, the checkpoint is damaged",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "out",
              ckpt=_ck(lambda d: _truncate(d / "rank_state" / "rank-0.pt", 0.3)))),
    Case("export_flipped_bytes", "export", "checkpoint with 16 changed bytes inside a tensor (same size)",
         r"^error: ckpt/__0_0\.distcp: tensor '.*' fails its CRC-32 check",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "out", ckpt=_ck(lambda d: _flip_bytes(d / _DISTCP)))),
    Case("export_run_dir_empty", "export", "run directory without a complete checkpoint",
         r"^error: --checkpoint run: run directory has no complete checkpoint",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "out", ckpt=_empty_run)),
    Case("export_out_exists", "export", "`--out` exists", r"^error: --out out: already exists",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "out", ckpt=lambda c: c.file("out/keep.txt", "mine") and c.ckpt())),
    Case("export_out_under_file", "export", "`--out` under a file", r"^error: --out f/out: f is a file, not a directory",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "f/out", ckpt=lambda c: c.file("f", "x") and c.ckpt())),
    Case("export_bundle", "export", "`--checkpoint` is already a serving bundle",
         r"^error: --checkpoint bundle: is already a serving bundle", _cmd("export", "--checkpoint", "{ckpt}", "--out", "out",
                                                                          ckpt=_bd())),
    Case("export_world_size", "export", "`--world-size 0`", r"^error: --world-size must be >= 1, got 0",
         _cmd("export", "--checkpoint", "{ckpt}", "--out", "out", "--world-size", "0", ckpt=_ck())),
]


def _sid_index(ckpt: Path) -> None:
    """Give a checkpoint copy a saved SID index (from the bundle), as `dig eval` leaves one."""
    shutil.copytree(ckpt.parents[2] / "shared-bundle" / "sid_index", ckpt / "sid_index")


# ---------------------------------------------------------------------- snapshots and runs
def snapshot(path: Path) -> Dict[str, Tuple[int, int, str]]:
    """relative file path -> (size, mtime_ns, sha256) of every file under ``path``."""
    out = {}
    if not path.exists():
        return out
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        out[str(f.relative_to(path))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def normalise(line: str, ws: Workspace, case_dir: Path) -> str:
    line = line.replace(str(case_dir) + os.sep, "").replace(str(case_dir), ".")
    line = line.replace(str(ws.other_data), "OTHER").replace(str(ws.clean_data), "DATA")
    line = re.sub(r"^\S+ \S+ WARNING \S+: ", "warning: ", line)  # the logging prefix of a warning
    return re.sub(r"only \d+ MB free", "only N MB free", line)


def run_case(case: Case, ws: Workspace) -> Outcome:
    """Set up the case's directory, run it, and compare the directory before and after."""
    case_dir = ws.root / "cases" / case.id
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    argv = case.setup(Ctx(ws, case_dir))
    before = snapshot(case_dir)
    rc, out, err, seconds = ws.runner.run(argv, case_dir, case.env)
    after = snapshot(case_dir)
    changed = sorted(k for k in set(before) | set(after)
                     if before.get(k) != after.get(k) and not (k not in before and Path(k).name in CACHES))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    first = normalise(lines[0], ws, case_dir) if lines else ""
    return Outcome(rc=rc, first_line=first, lines=lines, changed=changed, seconds=seconds, stdout=out)


# ---------------------------------------------------------------------- the shared workspace
def _make_prior_run(run: Path, data: Path) -> None:
    """A run directory whose checkpoint has ``model.embedding_dim=8`` (tiny.yaml has 16)."""
    import torch

    from dig_torchrec.config import load_config, save_config
    from dig_torchrec.data.schema import DatasetMeta
    from dig_torchrec.training.checkpoint import CheckpointManager

    other = load_config(CONFIG, [f"data.path={data}", f"run_dir={run}", "model.embedding_dim=8",
                                 "tokenizer.encoder_heads=2", *BASE_OVERRIDES])
    run.mkdir(parents=True, exist_ok=True)
    save_config(other, run / "config.yaml")
    CheckpointManager(run, 3, config=other, dataset_meta=DatasetMeta.load(data)).save(
        2, {"model": {"w": torch.zeros(3)}}, check_finite=True)
    (run / "final_metrics.json").write_text('{"step": 2}\n')


def make_workspace(root: Path, clean_data: Path) -> Workspace:
    """Build the shared inputs: dataset copies, the prior run, a short real training run and its export."""
    from dig_torchrec.data.synthetic import generate, preset

    root.mkdir(parents=True, exist_ok=True)
    data = root / "shared-data"
    shutil.copytree(clean_data, data, ignore=shutil.ignore_patterns(".dig_validated.json"))
    other = root / "shared-other-data"
    generate(preset("micro", seed=1), other, processes=1)
    prior = root / "shared-prior-run"
    _make_prior_run(prior, data)
    runner = Runner()
    trained = root / "shared-trained-run"
    rc, _, err, _ = runner.run(["train", "--config", str(CONFIG), f"data.path={data}", f"run_dir={trained}",
                                *TRAIN_OVERRIDES], root)
    assert rc == 0, f"training the shared checkpoint failed:\n{err[-3000:]}"
    bundle = root / "shared-bundle"
    rc, _, err, _ = runner.run(["export", "--checkpoint", str(trained / "checkpoints" / f"step-{TRAINED_STEPS}"),
                                "--out", str(bundle)], root)
    assert rc == 0, f"exporting the shared checkpoint failed:\n{err[-3000:]}"
    return Workspace(root=root, clean_data=data, other_data=other, prior_run=prior, trained_run=trained,
                     bundle=bundle, runner=runner)


_RESULTS: Dict[str, Dict[str, Outcome]] = {}
_WORKSPACES: Dict[str, Workspace] = {}


def shared_workspace(tmp_root: Path, clean_data: Path) -> Workspace:
    """One workspace per pytest session (``tmp_root`` from ``tmp_path_factory``), built on first use."""
    key = str(clean_data)
    if key not in _WORKSPACES:
        ws = make_workspace(tmp_root / "bad-input", clean_data)
        ws.shared_snapshot = {p.name: snapshot(p) for p in (ws.clean_data, ws.other_data, ws.prior_run,  # type: ignore[attr-defined]
                                                            ws.trained_run, ws.bundle)}
        _WORKSPACES[key] = ws
    return _WORKSPACES[key]


def run_all(ws: Workspace) -> Dict[str, Outcome]:
    """Every case once per workspace (cached: both test modules share the runs)."""
    key = str(ws.root)
    if key not in _RESULTS:
        _RESULTS[key] = {case.id: run_case(case, ws) for case in CASES}
    return _RESULTS[key]


# ---------------------------------------------------------------------- the README table
def render_table(outcomes: Dict[str, Outcome]) -> str:
    """The README troubleshooting section (markdown), grouped by command."""
    lines = [
        "<!-- GENERATED by tests/test_troubleshooting_table.py from real `dig` runs; do not edit.",
        "     Regenerate: .venv/bin/python tests/test_troubleshooting_table.py -->",
        "### Troubleshooting: bad input and what `dig` prints",
        "",
        f"Each of the {len(CASES)} rows below is a real `dig` run (tests/reliability_cases.py) in a directory",
        "holding damaged copies of its inputs: `data` (the micro synthetic dataset), `raw` (raw MovieLens,",
        "KuaiRec or Taobao files), `run` (a run directory), `ckpt` (a checkpoint of a short `dig train` run),",
        "`bundle` (its `dig export`); `OTHER` is a second dataset. `dig train` runs use",
        "`--config configs/tiny.yaml`. Every run exits with the status shown, prints the line shown",
        "first, and leaves every file it was given unchanged (the test hashes the directory before and",
        "after; the one file `dig` may add is `.dig_validated.json`, the validation cache of a dataset that",
        "passed its checks). Rows marked **(wrong answer before)** used to print a wrong result and exit 0.",
        "",
        "| command | bad input | exit | first line printed |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        o = outcomes[case.id]
        msg = o.first_line.replace("|", "\\|")
        title = case.title + (" **(wrong answer before)**" if case.issue else "")
        lines.append(f"| `dig {case.command}` | {title} | {o.rc} | `{msg}` |")
    lines += [
        "",
        "Numerical faults during training stop with `error: step N: non-finite loss term '<term>' "
        "(train.nan_policy=error; ...)`; `train.nan_policy=skip` skips such batches with a warning and counts",
        "them (`train/skipped_steps`). A checkpoint is never written with a NaN/inf tensor. Ctrl-C (SIGINT)",
        "stops any command with `error: interrupted` and exit status 130; a checkpoint being saved is then",
        "never marked `COMPLETE`, so `--resume auto` picks the previous one.",
        "",
    ]
    return "\n".join(lines)
