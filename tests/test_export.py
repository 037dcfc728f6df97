"""``dig export``: serving bundles (resharded DCP model, SID index, config, manifest).

The fast tests export a checkpoint written by the real :class:`CheckpointManager` from an
untrained (tokenizer-initialised) micro model; the slow ones reshard for 2 spawned ranks
and kill an export mid-way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dig_torchrec.cli import main as dig_main
from dig_torchrec.config import DIGConfig, DataConfig, ModelConfig, TokenizerConfig, U2TConfig, EvalConfig
from dig_torchrec.errors import CheckpointError
from dig_torchrec.export.bundle import MANIFEST_FILE, is_bundle, read_manifest, sha256_file, verify_bundle
from dig_torchrec.export.writer import export_bundle, load_bundle


def _micro_config(data_path: Path, run_dir: Path) -> DIGConfig:
    cfg = DIGConfig(
        data=DataConfig(path=str(data_path), batch_size=64, eval_batch_size=256, history_length=5,
                        negatives_per_positive=3, retrieval_positives=16),
        model=ModelConfig(embedding_dim=8, din_hidden=[16, 8], cross_layers=1, num_experts=2, expert_hidden=[16, 8]),
        tokenizer=TokenizerConfig(num_layers=2, num_codes=16, encoder_layers=1, encoder_heads=2),
        u2t=U2TConfig(hidden_dim=8),
        eval=EvalConfig(beam_size=8, topk=[5, 10], unified_top_n=10, user_batch_size=16),
    )
    cfg.run_dir = cfg.train.run_dir = str(run_dir)
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete checkpoint (CheckpointManager format) of a micro DIG model with an initialised tokenizer."""
    from dig_torchrec.data.items import ItemTable
    from dig_torchrec.data.reader import open_dataset
    from dig_torchrec.model import DIGModel
    from dig_torchrec.training.checkpoint import CheckpointManager

    run = tmp_path_factory.mktemp("export_run")
    cfg = _micro_config(tiny_dataset, run)
    meta, schema = open_dataset(tiny_dataset, cfg.data)
    torch.manual_seed(0)
    model = DIGModel(cfg, meta, device="cpu").eval()
    items = ItemTable.load(tiny_dataset, schema, meta)
    model.initialize_tokenizer(model.corpus_item_representations(items))
    with torch.no_grad():  # make the BN running statistics non-trivial so a lost buffer would show
        for bn in (model.bn_u, model.bn_v, model.bn_sid):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return CheckpointManager(run, config=cfg, dataset_meta=meta).save(3, {"model": model})


def _reference_state(checkpoint: Path) -> dict:
    from dig_torchrec.inference import load_for_inference

    model, _, _ = load_for_inference(checkpoint)
    return model.state_dict()


def _assert_states_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_bundle_converts_with_dcp_to_torch_save(checkpoint: Path, tmp_path: Path) -> None:
    out = export_bundle(checkpoint, tmp_path / "bundle")
    assert is_bundle(out) and not is_bundle(checkpoint)
    dcp_to_torch_save(out, tmp_path / "model.pt")
    converted = torch.load(tmp_path / "model.pt", weights_only=False)
    assert list(converted) == ["model"]  # the optimizer state is not exported
    _assert_states_equal(converted["model"], _reference_state(checkpoint))
    model, cfg, meta = load_bundle(out, verify=True)
    _assert_states_equal(model.state_dict(), _reference_state(checkpoint))
    assert not model.training
    assert meta.num_items == model.meta.num_items and cfg.tokenizer.num_codes == 16


def test_manifest_hashes_every_file_and_sid_index(checkpoint: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = export_bundle(checkpoint, tmp_path / "bundle")
    manifest = read_manifest(out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    assert set(manifest["files"]) == files
    for rel in (".metadata", "__0_0.distcp", "config.yaml", "dataset_meta.json",
                "sid_index/sid_table.parquet", "sid_index/inverted_index.parquet"):
        assert manifest["files"][rel]["sha256"] == sha256_file(out / rel)
    assert manifest["step"] == 3 and manifest["world_size"] == 1
    # the SID table is the tokenizer's assignment of the whole catalog
    from dig_torchrec.inference import load_for_inference
    from dig_torchrec.data.items import ItemTable
    from dig_torchrec.data.reader import open_dataset

    model, cfg, _ = load_for_inference(checkpoint)
    meta, schema = open_dataset(cfg.data.path, cfg.data)
    want = model.full_corpus_sids(ItemTable.load(cfg.data.path, schema, meta))
    table = pq.read_table(out / "sid_index" / "sid_table.parquet")
    got = torch.stack([torch.tensor(table.column(f"s_{l}").to_pylist()) for l in (1, 2)], 1)
    assert torch.equal(got, want)
    inv = pq.read_table(out / "sid_index" / "inverted_index.parquet").to_pylist()
    assert sorted(v for row in inv for v in row["items"]) == list(range(meta.num_items))


def test_verify_detects_a_changed_file(checkpoint: Path, tmp_path: Path) -> None:
    out = export_bundle(checkpoint, tmp_path / "bundle")
    verify_bundle(out)
    with open(out / "config.yaml", "a") as f:
        f.write("\n# edited\n")
    with pytest.raises(CheckpointError, match="config.yaml: sha256 differs"):
        verify_bundle(out)


def test_existing_out_is_never_overwritten(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        export_bundle(checkpoint, out)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_incomplete_checkpoint_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "step-3"
    shutil.copytree(checkpoint, broken)
    (broken / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        export_bundle(broken, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_export_leaves_nothing(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      exc: BaseException) -> None:
    """A failure after the model was written (while writing the SID index) removes everything."""
    from dig_torchrec.retrieval.sid_index import SidIndex

    def boom(self, directory):  # noqa: ANN001
        assert any((p / ".metadata").exists() for p in tmp_path.glob(".bundle.export-*"))  # really mid-export
        raise exc

    monkeypatch.setattr(SidIndex, "save", boom)
    with pytest.raises(type(exc)):
        export_bundle(checkpoint, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_of_a_killed_export_is_removed(checkpoint: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f".bundle.export-{dead.pid}"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half written")
    export_bundle(checkpoint, tmp_path / "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_eval_and_retrieve_on_bundle_match_checkpoint(checkpoint: Path, tmp_path: Path, tiny_dataset: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "bundle"
    assert dig_main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--verify"]) == 0
    users = pq.read_table(tiny_dataset / "retrieval" / "test.parquet").column("user_id").to_pylist()[:4]
    results = {}
    for name, src in (("ckpt", checkpoint), ("bundle", out)):
        r, e = tmp_path / f"retrieve_{name}.json", tmp_path / f"eval_{name}.json"
        assert dig_main(["retrieve", "--checkpoint", str(src), "--users", ",".join(map(str, users)), "--topk", "5",
                         "--mode", "unified", "--out", str(r), "--no-progress"]) == 0
        assert dig_main(["eval", "--checkpoint", str(src), "--max-users", "30", "--no-progress",
                         "--max-exposure-batches", "2", "--out", str(e)]) == 0
        ev = json.loads(e.read_text())
        for k in ("checkpoint", "seconds", "users_per_second"):
            ev.pop(k)
        results[name] = (json.loads(r.read_text()), ev)
    capsys.readouterr()
    assert results["bundle"][0]["results"] and results["bundle"][0] == results["ckpt"][0]
    assert results["bundle"][1] == results["ckpt"][1]
    verify_bundle(out)  # loading did not write into the bundle


@pytest.mark.slow
def test_reshard_for_two_ranks(checkpoint: Path, tmp_path: Path) -> None:
    out = export_bundle(checkpoint, tmp_path / "bundle2", world_size=2)
    manifest = verify_bundle(out)
    assert manifest["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(manifest["files"])
    plan = json.loads((out / "sharding_plan.json").read_text())
    assert {r for t in plan.values() for r in t["ranks"]} == {0, 1}  # tables really split over 2 ranks
    dcp_to_torch_save(out, tmp_path / "model.pt")
    _assert_states_equal(torch.load(tmp_path / "model.pt", weights_only=False)["model"], _reference_state(checkpoint))
    model, _, _ = load_bundle(out)
    _assert_states_equal(model.state_dict(), _reference_state(checkpoint))


@pytest.mark.slow
def test_killed_export_leaves_no_bundle(checkpoint: Path, tmp_path: Path) -> None:
    """SIGKILL during a 2-rank export: OUT never appears; the next export cleans up and succeeds."""
    out = tmp_path / "bundle"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dig_torchrec.cli", "export", "--checkpoint", str(checkpoint), "--out", str(out),
         "--world-size", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".bundle.export-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    export_bundle(checkpoint, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
