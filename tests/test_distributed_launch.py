"""The TorchX component builds the torchrun command the trainer expects (no job is launched)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _component():
    spec = importlib.util.spec_from_file_location("dig_components", REPO / "launch" / "components.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_component_builds_torchrun_of_the_training_module() -> None:
    app = _component().train("train.epochs=1", "run_dir=/tmp/x", config="configs/tiny.yaml", nnodes=2,
                             nproc_per_node=4, gpu=4, max_restarts=2)
    (role,) = app.roles
    assert role.name == "trainer" and role.num_replicas == 2 and role.resource.gpu == 4
    cmd = role.args[1]
    assert cmd.startswith("torchrun --max-restarts 2 ")
    assert "--nnodes 2 --nproc_per_node 4" in cmd
    assert cmd.endswith("-m dig_torchrec.training.cli --config configs/tiny.yaml --resume auto train.device=cuda "
                        "train.epochs=1 run_dir=/tmp/x")


def test_resume_none_and_single_node_defaults() -> None:
    app = _component().train(resume="none")
    cmd = app.roles[0].args[1]
    assert "--resume" not in cmd and "--max-restarts" not in cmd
    assert "--nproc_per_node 2" in cmd and "localhost:0" in cmd  # single node: free rendezvous port
    assert (REPO / ".torchxconfig").read_text().count("scheduler = local_cwd") == 1
