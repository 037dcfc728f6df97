"""The bad-input matrix (``tests/reliability_cases.py``) through real ``dig`` processes.

Every case asserts three things: the exit status, that the first output line names the
file, key, column or row at fault, and that no file in the case's directory changed (a
hash of the tree before and after). The matrix covers ``dig data synth | convert |
validate | stats``, ``train``, ``eval``, ``retrieve`` and ``export``, including the five
inputs that used to give a wrong answer with exit status 0 (issue 17).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import reliability_cases as rc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> rc.Workspace:
    return rc.shared_workspace(tmp_path_factory.getbasetemp(), tiny_dataset)


def test_matrix_covers_every_command_and_the_wrong_answers() -> None:
    assert len(rc.CASES) >= 50
    assert len({c.id for c in rc.CASES}) == len(rc.CASES)
    commands = {c.command for c in rc.CASES}
    assert commands >= {"data synth", "data convert", "data validate", "data stats", "train", "eval", "retrieve",
                        "export"}
    assert {c.issue for c in rc.CASES if c.issue} == {1, 2, 3, 4, 5}
    for source in ("MovieLens", "KuaiRec", "Taobao"):  # each converter fuzzed: truncated, garbled, empty
        titles = [c.title for c in rc.CASES if c.command == "data convert" and c.title.startswith(source)]
        assert any("cut inside" in t for t in titles) and any("garbled" in t for t in titles) and \
            any("empty" in t for t in titles), source


@pytest.mark.parametrize("case", rc.CASES, ids=[c.id for c in rc.CASES])
def test_bad_input(case: rc.Case, workspace: rc.Workspace) -> None:
    o = rc.run_all(workspace)[case.id]
    detail = "\n".join(o.lines[-12:])
    assert o.rc == case.rc, detail
    assert "Traceback" not in detail
    assert re.search(case.expect, o.first_line), f"first line: {o.first_line!r}\n{detail}"
    if case.rc == 2:  # one line: the error, first, and nothing else on stderr
        assert o.lines and o.lines[0].startswith("error: ") and len(o.lines) == 1, detail
    assert o.changed == [], f"{case.id} changed {o.changed}"


def test_shared_inputs_unchanged(workspace: rc.Workspace) -> None:
    rc.run_all(workspace)
    for p in (workspace.clean_data, workspace.other_data, workspace.prior_run, workspace.trained_run, workspace.bundle):
        assert rc.snapshot(p) == workspace.shared_snapshot[p.name], p  # type: ignore[attr-defined]


def test_sigint_during_checkpoint_save_exits_130_without_a_traceback(workspace: rc.Workspace, tmp_path: Path) -> None:
    """Ctrl-C while `dig train` writes a checkpoint: one line, exit 130, no COMPLETE checkpoint."""
    run = tmp_path / "run"
    code, _, err, _ = workspace.runner.run(
        ["train", "--config", str(rc.CONFIG), f"data.path={workspace.clean_data}", f"run_dir={run}",
         *rc.TRAIN_OVERRIDES],
        tmp_path, env={"DIG_FAULT_KILL_IN_CHECKPOINT_SAVE": "2", "DIG_FAULT_SIGNAL": "INT"})
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-1"]


def test_interrupted_unwraps_a_dcp_checkpoint_exception() -> None:
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from dig_torchrec.cli import interrupted

    assert interrupted(CheckpointException("save failed", {0: _wrap_exception(KeyboardInterrupt())}))
    assert not interrupted(CheckpointException("save failed", {0: _wrap_exception(OSError("disk"))}))
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert interrupted(e)


def _cold_dig(args, cwd: Path, trace_imports: bool = False) -> subprocess.CompletedProcess:
    dig = Path(sys.executable).with_name("dig")
    env = {k: v for k, v in os.environ.items() if k not in rc._UNSET_ENV}
    env.update({"PYTHONPATH": str(rc.REPO), "OMP_NUM_THREADS": "1"})
    if trace_imports:
        env["PYTHONPROFILEIMPORTTIME"] = "1"  # one "import time: ... | module" line per import on stderr
    return subprocess.run([str(dig), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


_IMPORT_LINE = "import time:"


def _imported_top_level(stderr: str) -> set:
    """Top-level packages imported by the process (``PYTHONPROFILEIMPORTTIME`` lines)."""
    return {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in stderr.splitlines() if ln.startswith(_IMPORT_LINE)}


def _error_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(_IMPORT_LINE)]


def test_config_typo_fails_fast_from_a_cold_dig_process(tmp_path: Path, workspace: rc.Workspace) -> None:
    """The installed ``dig`` script: a config typo fails before torch is imported, error first."""
    proc = _cold_dig(["train", "--config", str(rc.CONFIG), f"data.path={workspace.clean_data}", "run_dir=run",
                      "data.batchsize=64"], tmp_path, trace_imports=True)
    assert proc.returncode == 2
    imported = _imported_top_level(proc.stderr)
    assert "dig_torchrec" in imported, "the import trace is empty: PYTHONPROFILEIMPORTTIME did not reach dig"
    assert not imported & {"torch", "torchrec", "fbgemm_gpu", "pyarrow", "numpy"}, sorted(imported)
    lines = _error_lines(proc.stderr)
    assert lines == ["error: unknown config key 'data.batchsize'; valid keys under 'data' are: path, batch_size, "
                     "eval_batch_size, history_length, shuffle_buffer, num_workers, reader_threads, "
                     "negatives_per_positive, retrieval_positives, negative_sampling, popularity_alpha, hash_ids, "
                     "u2i_dim, seed"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,first", [
    (["eval", "--checkpoint", "ckpt", "eval.beam_width=3"], "error: unknown config key 'eval.beam_width'"),
    (["retrieve", "--checkpoint", "ckpt", "--users", "1", "--out", "recs.csv"], "error: --out recs.csv: use a"),
    (["export", "--checkpoint", "ckpt", "--out", "out", "data.pth=x"], "error: unknown config key 'data.pth'"),
], ids=["eval", "retrieve", "export"])
def test_flag_typos_fail_fast_from_a_cold_dig_process(argv, first: str, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    proc = _cold_dig(argv, tmp_path, trace_imports=True)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(first), proc.stderr
    imported = _imported_top_level(proc.stderr)
    assert "dig_torchrec" in imported and not imported & {"torch", "torchrec", "pyarrow"}, sorted(imported)


@pytest.mark.parametrize("case_id", ["missing_column", "ml_truncated_line", "eval_bundle_bytes"])
def test_sample_cases_from_a_cold_dig_process(case_id: str, workspace: rc.Workspace) -> None:
    """The same first line and exit status from the installed ``dig`` script as from the warm runner."""
    case = next(c for c in rc.CASES if c.id == case_id)
    want = rc.run_all(workspace)[case_id]
    case_dir = workspace.root / "cold" / case_id
    case_dir.mkdir(parents=True)
    argv = case.setup(rc.Ctx(workspace, case_dir))
    before = rc.snapshot(case_dir)
    proc = _cold_dig(argv, case_dir)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == want.rc and "Traceback" not in proc.stderr
    assert rc.normalise(lines[0], workspace, case_dir) == want.first_line
    assert rc.snapshot(case_dir) == before
