"""Loading verifies artefacts and never rewrites them (issue 17): the good paths next to the
bad-input matrix's failures, on the matrix's shared short training run and its bundle."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import reliability_cases as rc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> rc.Workspace:
    return rc.shared_workspace(tmp_path_factory.getbasetemp(), tiny_dataset)


def test_checkpoints_record_the_dataset_fingerprint(workspace: rc.Workspace) -> None:
    from dig_torchrec.training.checkpoint import DATASET_FINGERPRINT_FILE, dataset_fingerprint

    fp = json.loads((workspace.trained_ckpt / DATASET_FINGERPRINT_FILE).read_text())
    assert fp == dataset_fingerprint(workspace.clean_data)
    assert fp["num_items"] == 150 and set(fp["rows"]) == {"train", "valid", "test"} and len(fp["items_sha256"]) == 64
    assert json.loads((workspace.bundle / DATASET_FINGERPRINT_FILE).read_text()) == fp  # exported with the bundle


def test_a_copy_of_the_dataset_is_the_same_dataset(workspace: rc.Workspace, tmp_path: Path) -> None:
    from dig_torchrec.training.checkpoint import check_dataset_fingerprint

    copy = tmp_path / "moved"
    shutil.copytree(workspace.clean_data, copy)
    check_dataset_fingerprint(workspace.trained_ckpt, copy)  # same bytes elsewhere: accepted


def test_checkpoint_without_fingerprint_loads_with_a_warning(workspace: rc.Workspace, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from dig_torchrec.training.checkpoint import DATASET_FINGERPRINT_FILE, check_dataset_fingerprint

    old = tmp_path / "old"
    shutil.copytree(workspace.trained_ckpt, old)
    (old / DATASET_FINGERPRINT_FILE).unlink()
    check_dataset_fingerprint(old, workspace.other_data)
    assert "records no dataset fingerprint" in caplog.text


def test_run_dir_resolves_to_the_most_recently_written_checkpoint(tmp_path: Path) -> None:
    from dig_torchrec.config import DIGConfig
    from dig_torchrec.training.checkpoint import CheckpointManager
    from dig_torchrec.inference import resolve_checkpoint

    cfg = DIGConfig()
    mgr = CheckpointManager(tmp_path, keep_latest_k=5, config=cfg)
    mgr.save(10, {"model": {"w": torch.zeros(2)}})  # a stale, higher step of an older run
    time.sleep(0.01)
    mgr.save(3, {"model": {"w": torch.ones(2)}})
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-3"


def test_eval_rebuild_index_leaves_the_saved_index_alone(workspace: rc.Workspace, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(workspace.trained_ckpt, ckpt)
    shutil.copytree(workspace.bundle / "sid_index", ckpt / "sid_index")
    table = ckpt / "sid_index" / "sid_table.parquet"
    table.write_bytes(table.read_bytes())  # any content: it must come back byte for byte
    before = rc.snapshot(ckpt)
    code, out, err, _ = workspace.runner.run(
        ["eval", "--checkpoint", "ckpt", "--rebuild-index", "--max-users", "5", "--no-exposures", "--no-full-ranking",
         "--no-progress", "--out", "m.json"], tmp_path)
    assert code == 0, err[-2000:]
    assert rc.snapshot(ckpt) == before
    assert json.loads((tmp_path / "m.json").read_text())["num_users"] == 5


def test_eval_on_a_good_checkpoint_and_bundle_passes_every_check(workspace: rc.Workspace, tmp_path: Path) -> None:
    for name, src in (("ckpt", workspace.trained_ckpt), ("bundle", workspace.bundle)):
        shutil.copytree(src, tmp_path / name)
        code, out, err, _ = workspace.runner.run(
            ["retrieve", "--checkpoint", name, "--users", rc.Ctx(workspace, tmp_path).users(2), "--topk", "3",
             "--no-progress", "--out", f"{name}.json"], tmp_path)
        assert code == 0, err[-2000:]
        recs = json.loads((tmp_path / f"{name}.json").read_text())["results"]
        assert len(recs) == 6 and all(r["score"] == r["score"] for r in recs)  # no NaN scores


def test_fresh_clears_the_old_run(workspace: rc.Workspace, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(workspace.trained_run, run)
    code, _, err, _ = workspace.runner.run(
        ["train", "--config", str(rc.CONFIG), "--fresh", f"data.path={workspace.clean_data}", f"run_dir={run}",
         *rc.BASE_OVERRIDES], tmp_path)
    assert code == 0, err[-2000:]
    assert "--fresh: deleting" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("disk full")])
def test_interrupted_synth_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     exc: BaseException) -> None:
    from dig_torchrec.cli import main as dig_main
    from dig_torchrec.data import synthetic

    real = synthetic.generate

    def dies_after_writing(cfg, out, processes=None):  # noqa: ANN001
        real(cfg, out, processes=processes)
        raise exc

    monkeypatch.setattr(synthetic, "generate", dies_after_writing)
    out = tmp_path / "ds"
    if isinstance(exc, KeyboardInterrupt):
        assert dig_main(["data", "synth", "--preset", "micro", "--out", str(out)]) == 130
    else:
        with pytest.raises(RuntimeError):
            dig_main(["data", "synth", "--preset", "micro", "--out", str(out)])
    assert list(tmp_path.iterdir()) == []  # neither ds/ nor .ds.partial-<pid>
    monkeypatch.setattr(synthetic, "generate", real)
    assert dig_main(["data", "synth", "--preset", "micro", "--out", str(out)]) == 0  # the rerun just works
    assert (out / "meta.json").is_file()


def test_resume_from_an_earlier_step_continues_from_its_own_checkpoints(tmp_path: Path) -> None:
    """Rollback: --resume step-10 in a run that also holds step-20/30; the continuation's step-15
    is what --resume auto and `dig eval RUN` pick, and pruning keeps it."""
    from dig_torchrec.config import DIGConfig
    from dig_torchrec.training.checkpoint import CheckpointManager
    from dig_torchrec.inference import resolve_checkpoint

    mgr = CheckpointManager(tmp_path, keep_latest_k=3, config=DIGConfig())
    for step in (10, 20, 30, 15):
        mgr.save(step, {"model": {"w": torch.full((2,), float(step))}})
        time.sleep(0.01)
    ckpts = tmp_path / "checkpoints"
    assert mgr.latest() == ckpts / "step-15" == mgr.resolve("auto") == resolve_checkpoint(tmp_path)
    assert sorted(s for s, _ in mgr.complete_checkpoints()) == [15, 20, 30]  # step-10, the oldest write, pruned
