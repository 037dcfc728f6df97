"""Bad input end to end through the real ``dig train`` CLI: one-line cause, exit 2, nothing overwritten."""

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


@pytest.mark.parametrize("case", rc.CASES, ids=[c.id for c in rc.CASES])
def test_bad_input_gives_one_line_cause_and_exit_2(case: rc.Case, workspace: rc.Workspace) -> None:
    outcome = rc.run_all(workspace)[case.id]
    assert outcome.rc == 2
    assert len(outcome.raw_lines) == 1, outcome.raw_lines  # exactly one error line, no traceback
    assert "\n" not in outcome.error_line
    assert re.search(case.expect, outcome.error_line), outcome.error_line


def test_nothing_in_the_prior_run_was_overwritten(workspace: rc.Workspace) -> None:
    rc.run_all(workspace)
    after = rc.snapshot(workspace.prior_run)
    assert "checkpoints/step-2/COMPLETE" in after and "config.yaml" in after
    assert after == workspace.prior_snapshot  # same files, sizes, mtimes and contents; nothing added


def test_real_dig_process_exits_2_with_the_cause(workspace: rc.Workspace) -> None:
    """The installed ``dig`` console script, as a user runs it (one case; the rest run in-process)."""
    rc.run_all(workspace)  # makes the damaged copies
    data = workspace.damaged_copy("missing_column", lambda r: None)
    dig = Path(sys.executable).with_name("dig")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [str(dig), "train", "--config", str(rc.CONFIG), f"data.path={data}", f"run_dir={workspace.prior_run}",
         *rc.BASE_OVERRIDES],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {data}/train/part-00000.parquet: missing column 'hour'"
    assert "Traceback" not in proc.stderr
